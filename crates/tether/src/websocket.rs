//! `WebSocket<S>`: the tokio driver around a [`tether_proto::Connection`].

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use futures_core::Stream;
use futures_sink::Sink;
use tether_proto::{CloseFrame, Lent, Prepared, Role};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::message::Message;

mod direct;
mod driver;
mod idle;
mod lending;
mod sending;
mod split;
mod streaming;
mod wakers;

pub use direct::{DirectIo, DirectSend, DirectWriter, SharedWebSocket};
use driver::Inner;
pub(crate) use driver::Parts;
pub use idle::Idle;
pub use lending::Replies;
use sending::Side;
pub use split::{WsReceiver, WsSender};
pub use streaming::{Incoming, MessageReader, MessageWriter};

/// A WebSocket over a transport `S` (a `TcpStream`, a TLS stream, a hyper upgrade…).
///
/// Receive with [`WebSocket::recv`] or as a [`Stream`]; send with [`WebSocket::send`] (one
/// message, flushed), [`WebSocket::feed`] + [`WebSocket::flush`] (many messages, one write), or as
/// a [`Sink`]. Pings are answered automatically, and the close handshake is completed for you:
/// after [`Message::Close`] the stream ends.
///
/// Receiving also writes what is queued (pongs, a close echo, messages fed but not flushed)
/// whenever it would otherwise wait, so an echo loop that only `feed`s batches its replies.
pub struct WebSocket<S> {
    inner: Inner<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocket<S> {
    /// Wraps a transport whose opening handshake is already done (by another HTTP stack).
    pub fn from_raw(io: S, role: Role, config: Config) -> Self {
        Self::from_parts(Parts {
            io,
            role,
            config: Arc::new(config),
            read_buf: BytesMut::new(),
            protocol: None,
            deflate: None,
            half_close: false,
        })
    }

    /// Wraps a transport whose handshake is done.
    pub(crate) fn from_parts(parts: Parts<S>) -> Self {
        WebSocket {
            inner: Inner::new(parts),
        }
    }

    /// The subprotocol agreed in the handshake, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.inner.protocol()
    }

    /// Whether permessage-deflate was negotiated.
    pub fn is_compressed(&self) -> bool {
        self.inner.conn.deflate_enabled()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Bytes queued for the transport and not yet written.
    pub fn queued_len(&self) -> usize {
        self.inner.conn.queued_len()
    }

    /// The transport.
    pub fn get_ref(&self) -> &S {
        &self.inner.io
    }

    /// Receives the next message; `None` once the connection has ended.
    ///
    /// Pings are answered before they are returned. After [`Message::Close`], the next call
    /// completes the close (waiting at most `close_timeout`) and returns `None`.
    ///
    /// # Errors
    /// [`Error::Protocol`] when the peer broke the protocol (the Close with its code was
    /// sent), [`Error::AbnormalClosure`] when the transport closed without a close handshake,
    /// [`Error::KeepaliveTimeout`], or [`Error::Io`]. The stream ends after an error.
    ///
    /// # Cancel safety
    /// Cancel-safe: use it in `tokio::select!`; no message is lost when the future is dropped.
    pub fn recv(&mut self) -> impl Future<Output = Option<Result<Message>>> + '_ {
        // Not an `async fn`: the futures of `recv`, `feed` and `send` hold only what their
        // poll needs, so that a task awaiting them stays small (see `tests/idle_memory.rs`).
        poll_fn(|cx| self.inner.poll_next_message(cx))
    }

    /// Receives without copying: each data message is lent to `f` borrowed from the read
    /// buffer (unmasked and, for text, validated in place), together with [`Replies`] to queue
    /// answers, which are copied once, into the outgoing buffer. All the messages already
    /// buffered are lent in one call (at least one: it waits for the next otherwise);
    /// returns how many. What uWebSockets' message handler does, for servers whose work per
    /// message ends with the callback (an echo, a relay, a parser that reads the payload
    /// once): no `Bytes` is allocated for a message that arrived in one frame.
    ///
    /// A message that arrived in several frames or compressed, whose frame took more than one
    /// read, or that is large (over 4 KiB and an eighth of the read buffer: it is split off
    /// the buffer rather than copied) is received as usual and lent from there; sending it
    /// back with [`Replies::send`] then shares its bytes. Pings are answered, pongs are
    /// passed over, and the peer's Close completes the close handshake and ends the stream
    /// (`None`), as with [`WebSocket::recv`]; a protocol error is returned once, then the
    /// stream ends.
    /// Queued answers are written whenever receiving would wait, as after
    /// [`WebSocket::feed`].
    ///
    /// ```no_run
    /// # async fn run(mut ws: tether::WebSocket<tokio::net::TcpStream>) -> tether::Result<()> {
    /// use std::future::poll_fn;
    /// use std::pin::Pin;
    ///
    /// // An echo: every message goes back as it came.
    /// while let Some(lent) = poll_fn(|cx| {
    ///     Pin::new(&mut ws).poll_next_lent(cx, |message, replies| {
    ///         let _ = replies.send(message);
    ///     })
    /// })
    /// .await
    /// {
    ///     lent?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn poll_next_lent<F>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        f: F,
    ) -> Poll<Option<Result<usize>>>
    where
        F: FnMut(Lent<'_>, &mut Replies<'_>),
    {
        self.get_mut().inner.poll_next_lent(cx, f)
    }

    /// Queues `msg` and writes everything queued.
    ///
    /// # Errors
    /// [`Error::Send`] after a Close was sent or for an oversized control frame;
    /// [`Error::Io`] when the transport fails.
    ///
    /// # Cancel safety
    /// If cancelled, the message may be queued and is written by a later call.
    pub fn send(&mut self, msg: Message) -> impl Future<Output = Result<()>> + '_ {
        sending::send(Side::Whole(&mut self.inner), msg)
    }

    /// Queues `msg`, waiting only while more than `write_buffer_size` bytes are queued.
    ///
    /// # Errors
    /// As [`WebSocket::send`].
    ///
    /// # Cancel safety
    /// Cancel-safe: if cancelled, the message was not queued.
    pub fn feed(&mut self, msg: Message) -> impl Future<Output = Result<()>> + '_ {
        sending::feed(Side::Whole(&mut self.inner), msg)
    }

    /// Queues a message prepared once for many connections (see [`Prepared`]): fan-out
    /// encodes, and with permessage-deflate without server context takeover compresses, each
    /// message once and shares the bytes. Waits like [`WebSocket::feed`].
    ///
    /// # Errors
    /// As [`WebSocket::send`].
    ///
    /// # Cancel safety
    /// Cancel-safe: if cancelled, the message was not queued.
    pub fn feed_prepared<'a>(
        &'a mut self,
        msg: &'a Prepared,
    ) -> impl Future<Output = Result<()>> + 'a {
        sending::feed_prepared(Side::Whole(&mut self.inner), msg)
    }

    /// Writes everything queued.
    ///
    /// # Errors
    /// [`Error::Io`] when the transport fails.
    ///
    /// # Cancel safety
    /// Cancel-safe: what was written stays written; the rest stays queued.
    pub fn flush(&mut self) -> impl Future<Output = Result<()>> + '_ {
        sending::flush(Side::Whole(&mut self.inner))
    }

    /// Closes the connection: sends a Close (1000 unless `frame` says otherwise), then reads
    /// until the peer's Close — discarding messages — and the transport closes, waiting at
    /// most `close_timeout`.
    ///
    /// # Errors
    /// [`Error::Send`] for a close code that may not be sent; any error that ends the stream.
    pub async fn close(&mut self, frame: Option<CloseFrame>) -> Result<()> {
        self.inner.start_close(frame)?;
        while let Some(msg) = self.recv().await {
            msg?;
        }
        Ok(())
    }

    /// Makes this socket one that other threads may also write to, directly
    /// ([`SharedWebSocket::writer`]); the task that owns it uses it as before.
    pub fn into_shared(self) -> SharedWebSocket<S> {
        SharedWebSocket::new(self.inner)
    }

    /// Splits into a sending and a receiving half, usable from two tasks.
    pub fn split(mut self) -> (WsSender<S>, WsReceiver<S>) {
        self.inner.start_sharing();
        let shared = Arc::new(Mutex::new(self.inner));
        (
            WsSender {
                shared: shared.clone(),
            },
            WsReceiver { shared },
        )
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for WebSocket<S> {
    type Item = Result<Message>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().inner.poll_next_message(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for WebSocket<S> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.get_mut().inner.poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<()> {
        self.get_mut().inner.start_send(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.get_mut().inner.poll_flush(cx)
    }

    /// Sends a normal Close if none was sent, then completes the close handshake.
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let inner = &mut self.get_mut().inner;
        inner.start_close(None)?;
        while let Some(msg) = ready!(inner.poll_next_message(cx)) {
            msg?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S> std::fmt::Debug for WebSocket<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocket")
            .field("connection", &self.inner.conn)
            .field("protocol", &self.inner.protocol())
            .finish_non_exhaustive()
    }
}
