//! The halves of a split socket: one sends, the other receives (and writes pongs and the
//! close echo); both share the connection behind a lock.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_core::Stream;
use futures_sink::Sink;
use tether_proto::{CloseFrame, Prepared};
use tokio::io::{AsyncRead, AsyncWrite};

use super::driver::Inner;
use super::sending::{self, Side};
use crate::error::{Error, Result};
use crate::message::Message;

impl<S> std::fmt::Debug for WsSender<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsSender").finish_non_exhaustive()
    }
}

impl<S> std::fmt::Debug for WsReceiver<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsReceiver").finish_non_exhaustive()
    }
}

pub(super) fn lock<S>(shared: &Mutex<Inner<S>>) -> std::sync::MutexGuard<'_, Inner<S>> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The sending half of a split [`WebSocket`](super::WebSocket).
pub struct WsSender<S> {
    pub(super) shared: Arc<Mutex<Inner<S>>>,
}

/// The receiving half of a split [`WebSocket`](super::WebSocket); it also writes pongs and the close echo.
pub struct WsReceiver<S> {
    pub(super) shared: Arc<Mutex<Inner<S>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsSender<S> {
    /// Queues `msg` and writes everything queued.
    ///
    /// # Errors
    /// As [`WebSocket::send`](super::WebSocket::send).
    ///
    /// # Cancel safety
    /// If cancelled, the message may be queued and is written by a later call.
    pub fn send(&mut self, msg: Message) -> impl Future<Output = Result<()>> + '_ {
        sending::send(Side::Half(&self.shared), msg)
    }

    /// Queues `msg`, waiting only while more than `write_buffer_size` bytes are queued.
    ///
    /// # Errors
    /// As [`WebSocket::send`](super::WebSocket::send).
    ///
    /// # Cancel safety
    /// Cancel-safe: if cancelled, the message was not queued.
    pub fn feed(&mut self, msg: Message) -> impl Future<Output = Result<()>> + '_ {
        sending::feed(Side::Half(&self.shared), msg)
    }

    /// Queues a prepared message; see [`WebSocket::feed_prepared`](super::WebSocket::feed_prepared).
    ///
    /// # Errors
    /// As [`WebSocket::send`](super::WebSocket::send).
    ///
    /// # Cancel safety
    /// Cancel-safe: if cancelled, the message was not queued.
    pub fn feed_prepared<'a>(
        &'a mut self,
        msg: &'a Prepared,
    ) -> impl Future<Output = Result<()>> + 'a {
        sending::feed_prepared(Side::Half(&self.shared), msg)
    }

    /// Writes everything queued.
    ///
    /// # Errors
    /// [`Error::Io`] when the transport fails.
    ///
    /// # Cancel safety
    /// Cancel-safe.
    pub fn flush(&mut self) -> impl Future<Output = Result<()>> + '_ {
        sending::flush(Side::Half(&self.shared))
    }

    /// Sends a Close (1000 unless `frame` says otherwise) and writes it, waiting at most
    /// `close_timeout` for the peer to take it; the receiving half then sees the peer's Close
    /// (or its close timeout) and ends.
    ///
    /// # Errors
    /// [`Error::Send`] for a code that may not be sent; [`Error::Io`] when the transport
    /// fails; [`Error::CloseTimeout`] when the peer does not read within the close timeout.
    pub async fn close(&mut self, frame: Option<CloseFrame>) -> Result<()> {
        let timeout = {
            let mut inner = lock(&self.shared);
            inner.start_close(frame)?;
            inner.config.close_timeout
        };
        match tokio::time::timeout(timeout, self.flush()).await {
            Ok(result) => result,
            Err(_) => Err(Error::CloseTimeout),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsReceiver<S> {
    /// Receives the next message; see [`WebSocket::recv`](super::WebSocket::recv).
    ///
    /// # Errors
    /// As [`WebSocket::recv`](super::WebSocket::recv).
    ///
    /// # Cancel safety
    /// Cancel-safe.
    pub fn recv(&mut self) -> impl Future<Output = Option<Result<Message>>> + '_ {
        poll_fn(|cx| lock(&self.shared).poll_next_message(cx))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for WsReceiver<S> {
    type Item = Result<Message>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        lock(&self.shared).poll_next_message(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for WsSender<S> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        lock(&self.shared).poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<()> {
        lock(&self.shared).start_send(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        lock(&self.shared).poll_flush(cx)
    }

    /// Sends a normal Close if none was sent and writes it.
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let mut inner = lock(&self.shared);
        inner.start_close(None)?;
        inner.poll_flush(cx)
    }
}
