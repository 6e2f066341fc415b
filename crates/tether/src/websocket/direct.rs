//! A socket that other threads may also write to, directly: fan-out to many idle connections
//! writes each one's messages from the thread doing the fan-out, without waking (and
//! scheduling) every connection's task.
//!
//! One task owns the [`SharedWebSocket`] and uses it like a [`WebSocket`](super::WebSocket).
//! A [`DirectWriter`] taken from it writes prepared messages at once, from any thread, but
//! only when that costs no waiting and cannot take a wake-up from the owner: the connection
//! is open, nothing else is queued, and no one holds it. Otherwise it declines and the caller
//! hands the messages to the owner instead. When the transport takes only part of what it
//! wrote, the rest stays queued for the owner's next write (the owner must then be told to
//! flush: see [`DirectSend::Queued`]).

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, TryLockError};
use std::task::{Context, Poll, Waker};

use bytes::Buf;
use tether_proto::{CloseFrame, Prepared, State};
use tokio::io::{AsyncRead, AsyncWrite};

use super::driver::{Inner, Phase, MAX_IOVECS};
use super::sending::{self, Side};
use super::split::lock;
use crate::error::Result;
use crate::message::Message;

/// A WebSocket owned by one task, which a [`DirectWriter`] may also write to from elsewhere
/// (see [`WebSocket::into_shared`](super::WebSocket::into_shared)).
pub struct SharedWebSocket<S> {
    shared: Arc<Mutex<Inner<S>>>,
}

/// Writes prepared messages to a [`SharedWebSocket`] at once, from any thread, when it can do
/// so without waiting ([`DirectWriter::try_send`]).
pub struct DirectWriter<S> {
    shared: Arc<Mutex<Inner<S>>>,
}

/// What [`DirectWriter::try_send`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectSend {
    /// Every message was written to the transport.
    Written,
    /// Every message was queued, but the transport did not take them all (or failed): the
    /// owner must flush, and finds out about a failure when it does.
    Queued,
    /// Nothing was queued: the connection is busy (the owner holds it or has bytes queued) or
    /// closing. Give the messages to the owner instead.
    Declined,
}

/// A transport a [`DirectWriter`] writes to from another thread than its owner's: at once,
/// never waiting, and without taking a wake-up from the owner.
///
/// The provided methods poll the transport with a waker that wakes no one, which suits any
/// transport (the owner is prompted whenever bytes are left: see [`DirectSend::Queued`]);
/// `impl DirectIo for MyTransport {}` is enough. A TCP stream writes to its socket directly
/// instead, without touching tokio's record of its readiness, which the owner's next write
/// brings up to date.
pub trait DirectIo: AsyncWrite + Unpin {
    /// Writes what the transport takes of `bufs` now: the bytes taken, or an error of kind
    /// [`io::ErrorKind::WouldBlock`] when it takes none.
    ///
    /// # Errors
    /// As the transport's write, and `WouldBlock` when it would wait.
    fn write_now(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(self).poll_write_vectored(&mut cx, bufs) {
            Poll::Ready(written) => written,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Flushes now what the transport buffers itself (a TLS layer's records).
    ///
    /// # Errors
    /// As the transport's flush, and `WouldBlock` when it would wait.
    fn flush_now(&mut self) -> io::Result<()> {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(self).poll_flush(&mut cx) {
            Poll::Ready(flushed) => flushed,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl DirectIo for tokio::net::TcpStream {
    fn write_now(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // The socket is non-blocking (tokio's): `send` answers at once. tokio's readiness
        // stays as it was; should the socket be full, the owner's next write finds out.
        let socket = socket2::SockRef::from(&*self);
        match bufs {
            [one] => socket.send(one),
            _ => socket.send_vectored(bufs),
        }
    }

    fn flush_now(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl DirectIo for tokio::io::DuplexStream {}

#[cfg(unix)]
impl DirectIo for tokio::net::UnixStream {}

#[cfg(feature = "hyper")]
impl<T> DirectIo for hyper_util::rt::TokioIo<T> where Self: AsyncWrite + Unpin {}

#[cfg(feature = "tls")]
impl<S: AsyncRead + AsyncWrite + Unpin> DirectIo for tokio_rustls::server::TlsStream<S> {}

#[cfg(feature = "tls")]
impl<S: AsyncRead + AsyncWrite + Unpin> DirectIo for tokio_rustls::client::TlsStream<S> {}

impl<S: AsyncRead + AsyncWrite + Unpin> DirectIo for crate::tls::MaybeTlsStream<S> {}

impl<S> std::fmt::Debug for SharedWebSocket<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedWebSocket").finish_non_exhaustive()
    }
}

impl<S> std::fmt::Debug for DirectWriter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWriter").finish_non_exhaustive()
    }
}

impl<S> Clone for DirectWriter<S> {
    fn clone(&self) -> Self {
        DirectWriter {
            shared: self.shared.clone(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> SharedWebSocket<S> {
    pub(super) fn new(inner: Inner<S>) -> Self {
        SharedWebSocket {
            shared: Arc::new(Mutex::new(inner)),
        }
    }

    /// A writer for other threads ([`DirectWriter::try_send`]).
    pub fn writer(&self) -> DirectWriter<S> {
        DirectWriter {
            shared: self.shared.clone(),
        }
    }

    /// Bytes queued for the transport and not yet written.
    pub fn queued_len(&self) -> usize {
        lock(&self.shared).conn.queued_len()
    }

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

    /// Queues `msg`; see [`WebSocket::feed`](super::WebSocket::feed).
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

    /// Writes everything queued, a direct writer's leftovers included.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) when the transport fails.
    ///
    /// # Cancel safety
    /// Cancel-safe.
    pub fn flush(&mut self) -> impl Future<Output = Result<()>> + '_ {
        sending::flush(Side::Half(&self.shared))
    }

    /// Closes the connection; see [`WebSocket::close`](super::WebSocket::close).
    ///
    /// # Errors
    /// As [`WebSocket::close`](super::WebSocket::close).
    pub async fn close(&mut self, frame: Option<CloseFrame>) -> Result<()> {
        lock(&self.shared).start_close(frame)?;
        while let Some(msg) = self.recv().await {
            msg?;
        }
        Ok(())
    }
}

impl<S> DirectWriter<S> {
    /// Reads the first bytes of the connection's state without doing anything with them, so
    /// that a [`DirectWriter::try_send`] soon after finds them in the cache. Fan-out to
    /// thousands of connections calls it on the next few before writing to each: their
    /// cache misses then overlap instead of coming one after the other.
    pub fn prefetch(&self) {
        std::hint::black_box(Arc::strong_count(&self.shared));
    }
}

impl<S: AsyncRead + DirectIo> DirectWriter<S> {
    /// Queues `msgs` and writes them now, from the calling thread, never waiting.
    ///
    /// Declines ([`DirectSend::Declined`], nothing queued) unless the connection is open, has
    /// nothing queued and is not in use at this moment: a write from here must not stand
    /// between the owner and a wake-up it waits for, and an owner writing already is the
    /// one to write these too. When the transport takes only part ([`DirectSend::Queued`]),
    /// the rest waits for the owner's next flush, which the caller must prompt.
    pub fn try_send<'a>(&self, msgs: impl IntoIterator<Item = &'a Prepared>) -> DirectSend {
        let mut inner = match self.shared.try_lock() {
            Ok(inner) => inner,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return DirectSend::Declined,
        };
        inner.try_write_direct(msgs)
    }
}

impl<S: AsyncRead + DirectIo> Inner<S> {
    fn try_write_direct<'a>(&mut self, msgs: impl IntoIterator<Item = &'a Prepared>) -> DirectSend {
        if self.phase != Phase::Running
            || self.conn.state() != State::Open
            || self.conn.queued_len() > 0
        {
            return DirectSend::Declined;
        }
        for (i, msg) in msgs.into_iter().enumerate() {
            if self.conn.send_prepared(msg).is_err() {
                // The connection refuses every message alike (closed, or a fragmented
                // message of the owner's unfinished), so this is the first: none was queued.
                // (Were it not, what was queued must still be flushed by the owner.)
                return if i == 0 {
                    DirectSend::Declined
                } else {
                    DirectSend::Queued
                };
            }
        }
        // Nothing was queued, so the owner is not waiting to write: the transport may keep a
        // waker that wakes no one, and the caller prompts the owner when bytes are left (the
        // owner also finds out about a failure when it writes).
        let out = self.conn.transmit();
        while out.has_remaining() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let n = out.chunks_vectored(&mut slices);
            match self.io.write_now(&slices[..n]) {
                Ok(0) | Err(_) => return DirectSend::Queued,
                Ok(n) => out.advance(n),
            }
        }
        match self.io.flush_now() {
            Ok(()) => DirectSend::Written,
            Err(_) => DirectSend::Queued,
        }
    }
}
