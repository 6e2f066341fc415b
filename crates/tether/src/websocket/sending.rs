//! The sending API, written once for a whole socket and for the sending half of a split one:
//! they differ only in how they reach the connection.

use std::future::{poll_fn, Future};
use std::sync::Mutex;
use std::task::{ready, Poll};

use tether_proto::Prepared;
use tokio::io::{AsyncRead, AsyncWrite};

use super::driver::Inner;
use super::split::lock;
use crate::error::Result;
use crate::message::Message;

/// Where a sender reaches the connection: the whole socket owns it, the halves share it.
pub(super) enum Side<'a, S> {
    Whole(&'a mut Inner<S>),
    Half(&'a Mutex<Inner<S>>),
}

impl<S> Side<'_, S> {
    pub(super) fn with<R>(&mut self, f: impl FnOnce(&mut Inner<S>) -> R) -> R {
        match self {
            Side::Whole(inner) => f(inner),
            Side::Half(shared) => f(&mut lock(shared)),
        }
    }
}

/// Queues `msg` and writes everything queued.
pub(super) fn send<'a, S: AsyncRead + AsyncWrite + Unpin>(
    mut side: Side<'a, S>,
    msg: Message,
) -> impl Future<Output = Result<()>> + 'a {
    let mut msg = Some(msg);
    poll_fn(move |cx| {
        side.with(|inner| {
            if msg.is_some() {
                ready!(inner.poll_ready(cx))?;
                inner.start_send(msg.take().expect("checked above"))?;
            }
            inner.poll_flush(cx)
        })
    })
}

/// Queues `msg`, waiting only while the write buffer is over its size.
pub(super) fn feed<'a, S: AsyncRead + AsyncWrite + Unpin>(
    mut side: Side<'a, S>,
    msg: Message,
) -> impl Future<Output = Result<()>> + 'a {
    let mut msg = Some(msg);
    poll_fn(move |cx| {
        side.with(|inner| {
            ready!(inner.poll_ready(cx))?;
            let msg = msg.take().expect("polled after completion");
            Poll::Ready(inner.start_send(msg))
        })
    })
}

/// Queues a message prepared for many connections, waiting like [`feed`].
pub(super) fn feed_prepared<'a, S: AsyncRead + AsyncWrite + Unpin>(
    mut side: Side<'a, S>,
    msg: &'a Prepared,
) -> impl Future<Output = Result<()>> + 'a {
    poll_fn(move |cx| {
        side.with(|inner| {
            ready!(inner.poll_ready(cx))?;
            Poll::Ready(inner.start_send_prepared(msg))
        })
    })
}

/// Writes everything queued.
pub(super) fn flush<'a, S: AsyncRead + AsyncWrite + Unpin>(
    mut side: Side<'a, S>,
) -> impl Future<Output = Result<()>> + 'a {
    poll_fn(move |cx| side.with(|inner| inner.poll_flush(cx)))
}
