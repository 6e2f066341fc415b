//! Messages as streams: sent as fragments while their bytes become available
//! ([`MessageWriter`], an [`AsyncWrite`]), received frame by frame without holding the whole
//! message ([`MessageReader`], an [`AsyncRead`]). A proxy or a file transfer passes on a
//! message of any size in bounded memory.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tether_proto::{CloseCode, CloseFrame, Event, OpCode, Utf8Validator};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::driver::Inner;
use super::sending::Side;
use super::split::lock;
use super::{WebSocket, WsReceiver, WsSender};
use crate::error::{Error, Result};
use crate::message::Message;

/// What [`WebSocket::recv_stream`] received: the start of a data message, to read as it
/// arrives, or a message that came whole (a ping, a pong, the peer's Close, or a data message
/// that started before streaming was asked for).
pub enum Incoming<'a, S> {
    /// A data message, read piece by piece.
    Stream(MessageReader<'a, S>),
    /// A whole message.
    Message(Message),
}

impl<S> std::fmt::Debug for Incoming<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Incoming::Stream(reader) => f.debug_tuple("Stream").field(reader).finish(),
            Incoming::Message(message) => f.debug_tuple("Message").field(message).finish(),
        }
    }
}

/// The first event of a streamed receive, owned, so that the reader can borrow the socket
/// once it is known.
enum First {
    Piece { text: bool, data: Bytes, fin: bool },
    Whole(Message),
}

/// Waits for the start of the next data message, passing over the rest of one whose reader
/// was dropped before its end.
fn poll_first<S: AsyncRead + AsyncWrite + Unpin>(
    inner: &mut Inner<S>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<First>>> {
    inner.conn.set_streaming(true);
    loop {
        return Poll::Ready(match ready!(inner.poll_next_event(cx)) {
            Some(Ok(Event::Fragment {
                text,
                first: true,
                data,
                fin,
            })) => Some(Ok(First::Piece { text, data, fin })),
            Some(Ok(Event::Fragment { .. })) => continue,
            Some(Ok(event)) => Some(Ok(First::Whole(event.into()))),
            Some(Err(e)) => Some(Err(e)),
            None => None,
        });
    }
}

fn incoming<S>(first: Option<Result<First>>, side: Side<'_, S>) -> Option<Result<Incoming<'_, S>>> {
    Some(Ok(match first? {
        Ok(First::Piece { text, data, fin }) => Incoming::Stream(MessageReader {
            side,
            text,
            chunk: data,
            done: fin,
        }),
        Ok(First::Whole(message)) => Incoming::Message(message),
        Err(e) => return Some(Err(e)),
    }))
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocket<S> {
    /// Receives the next message as a stream: a data message is handed over as soon as its
    /// first frame is in, as a [`MessageReader`] that yields each frame's payload as it
    /// arrives, so a message of any size passes through in memory bounded by
    /// `max_frame_size`. Pings, pongs and the peer's Close come whole, as from
    /// [`WebSocket::recv`].
    ///
    /// The message size limit (`max_message_size`) still counts every frame: raise it for
    /// large transfers. A reader dropped before the end of its message leaves the rest to be
    /// passed over by the next receive.
    ///
    /// ```no_run
    /// # async fn f(mut ws: tether::ClientStream) -> tether::Result<()> {
    /// use tether::Incoming;
    /// if let Some(Incoming::Stream(mut message)) = ws.recv_stream().await.transpose()? {
    ///     let mut file = tokio::fs::File::create("upload.bin").await?;
    ///     tokio::io::copy(&mut message, &mut file).await?;
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`WebSocket::recv`].
    pub async fn recv_stream(&mut self) -> Option<Result<Incoming<'_, S>>> {
        let first = poll_fn(|cx| poll_first(&mut self.inner, cx)).await;
        incoming(first, Side::Whole(&mut self.inner))
    }

    /// Starts sending a binary message as a stream: what is written to the
    /// [`MessageWriter`] goes out in fragments of at most `fragment_size` bytes, and
    /// [`MessageWriter::finish`] (or `shutdown`) ends the message.
    pub fn send_stream_binary(&mut self, fragment_size: usize) -> MessageWriter<'_, S> {
        MessageWriter::new(Side::Whole(&mut self.inner), false, fragment_size)
    }

    /// Starts sending a text message as a stream; see [`WebSocket::send_stream_binary`].
    /// What is written must be UTF-8 as a whole (a code point may be split between writes);
    /// a write that cannot be fails with [`io::ErrorKind::InvalidData`].
    pub fn send_stream_text(&mut self, fragment_size: usize) -> MessageWriter<'_, S> {
        MessageWriter::new(Side::Whole(&mut self.inner), true, fragment_size)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsReceiver<S> {
    /// Receives the next message as a stream; see [`WebSocket::recv_stream`].
    ///
    /// # Errors
    /// As [`WebSocket::recv`].
    pub async fn recv_stream(&mut self) -> Option<Result<Incoming<'_, S>>> {
        let first = poll_fn(|cx| poll_first(&mut lock(&self.shared), cx)).await;
        incoming(first, Side::Half(&self.shared))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsSender<S> {
    /// Starts sending a binary message as a stream; see [`WebSocket::send_stream_binary`].
    pub fn send_stream_binary(&mut self, fragment_size: usize) -> MessageWriter<'_, S> {
        MessageWriter::new(Side::Half(&self.shared), false, fragment_size)
    }

    /// Starts sending a text message as a stream; see [`WebSocket::send_stream_text`].
    pub fn send_stream_text(&mut self, fragment_size: usize) -> MessageWriter<'_, S> {
        MessageWriter::new(Side::Half(&self.shared), true, fragment_size)
    }
}

/// A data message being received, piece by piece (see [`WebSocket::recv_stream`]); also an
/// [`AsyncRead`] of its bytes. Text is checked as UTF-8 as it arrives: a piece may split a
/// code point, and the message as a whole is valid once it ends.
pub struct MessageReader<'a, S> {
    side: Side<'a, S>,
    text: bool,
    /// What was received and not yet handed out.
    chunk: Bytes,
    /// Whether the last piece is in.
    done: bool,
}

impl<S> std::fmt::Debug for MessageReader<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageReader")
            .field("text", &self.text)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> MessageReader<'_, S> {
    /// Whether the message is text.
    pub fn is_text(&self) -> bool {
        self.text
    }

    /// The next piece of the message (one frame's payload, or what an [`AsyncRead`] read
    /// left of it); `None` at its end.
    ///
    /// # Errors
    /// As [`WebSocket::recv`]; and [`Error::Io`] of kind `UnexpectedEof` when the peer's
    /// Close or the end of the connection comes before the end of the message.
    ///
    /// # Cancel safety
    /// Cancel-safe.
    pub async fn chunk(&mut self) -> Option<Result<Bytes>> {
        poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        loop {
            if !self.chunk.is_empty() {
                return Poll::Ready(Some(Ok(std::mem::take(&mut self.chunk))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            let event = ready!(self.side.with(|inner| inner.poll_next_event(cx)));
            match event {
                Some(Ok(Event::Fragment { data, fin, .. })) => {
                    self.chunk = data;
                    self.done = fin;
                }
                // Answered already (pings), or nothing to do with this message.
                Some(Ok(Event::Ping(_) | Event::Pong(_))) => {}
                Some(Err(e)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Some(Ok(_)) | None => {
                    self.done = true;
                    return Poll::Ready(Some(Err(Error::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection closed in the middle of a message",
                    )))));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MessageReader<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.chunk.is_empty() {
            match ready!(this.poll_chunk(cx)) {
                Some(Ok(chunk)) => this.chunk = chunk,
                Some(Err(e)) => return Poll::Ready(Err(into_io(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.chunk.len().min(buf.remaining());
        buf.put_slice(&this.chunk[..n]);
        this.chunk.advance(n);
        Poll::Ready(Ok(()))
    }
}

fn into_io(e: Error) -> io::Error {
    match e {
        Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

/// A data message being sent as it is written (see [`WebSocket::send_stream_binary`]): an
/// [`AsyncWrite`] whose bytes go out in fragments, waiting like `feed` while the connection's
/// write buffer is full. [`MessageWriter::finish`] (or `shutdown`) sends the last fragment;
/// `flush` sends what is buffered as a fragment and writes it out.
///
/// Dropped before it is finished, after some of the message went out, it closes the
/// connection with 1011: the peer must not take part of a message for the whole.
pub struct MessageWriter<'a, S> {
    side: Side<'a, S>,
    text: bool,
    /// Whether the first fragment went out (the next ones are continuations).
    started: bool,
    finished: bool,
    fragment_size: usize,
    /// Written and not yet sent as a fragment.
    buf: BytesMut,
    utf8: Utf8Validator,
}

impl<S> std::fmt::Debug for MessageWriter<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageWriter")
            .field("text", &self.text)
            .field("started", &self.started)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> MessageWriter<'a, S> {
    fn new(side: Side<'a, S>, text: bool, fragment_size: usize) -> Self {
        MessageWriter {
            side,
            text,
            started: false,
            finished: false,
            fragment_size: fragment_size.max(1),
            buf: BytesMut::new(),
            utf8: Utf8Validator::new(),
        }
    }

    /// Sends the last fragment (with what is buffered) and writes everything out.
    ///
    /// # Errors
    /// [`Error::Send`] when the connection is closing; [`Error::Io`] when the transport
    /// fails, or of kind `InvalidData` when a text message ends inside a code point.
    pub async fn finish(&mut self) -> Result<()> {
        poll_fn(|cx| self.poll_finish(cx)).await
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if !self.finished {
            if self.text && self.utf8.finish().is_err() {
                return Poll::Ready(Err(Error::Io(invalid_text())));
            }
            ready!(self.poll_send(cx, true))?;
            self.finished = true;
        }
        self.side.with(|inner| inner.poll_flush(cx))
    }

    /// Sends what is buffered as the next fragment, once the write buffer has room.
    fn poll_send(&mut self, cx: &mut Context<'_>, fin: bool) -> Poll<Result<()>> {
        let opcode = match (self.started, self.text) {
            (true, _) => OpCode::Continuation,
            (false, true) => OpCode::Text,
            (false, false) => OpCode::Binary,
        };
        ready!(self.side.with(|inner| inner.poll_ready(cx)))?;
        let payload = self.buf.split().freeze();
        self.side
            .with(|inner| inner.start_fragment(opcode, payload, fin))?;
        self.started = true;
        Poll::Ready(Ok(()))
    }
}

fn invalid_text() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "a text message must be UTF-8")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MessageWriter<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if this.buf.len() >= this.fragment_size {
            ready!(this.poll_send(cx, false)).map_err(into_io)?;
        }
        let n = data.len().min(this.fragment_size - this.buf.len());
        if this.text && this.utf8.feed(&data[..n]).is_err() {
            return Poll::Ready(Err(invalid_text()));
        }
        this.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.finished && !this.buf.is_empty() {
            ready!(this.poll_send(cx, false)).map_err(into_io)?;
        }
        this.side
            .with(|inner| inner.poll_flush(cx))
            .map_err(into_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_finish(cx).map_err(into_io)
    }
}

impl<S> Drop for MessageWriter<'_, S> {
    fn drop(&mut self) {
        if self.started && !self.finished {
            self.side.with(|inner| {
                tracing::info!("a streamed message was abandoned: closing the connection");
                let _ = inner.conn.send_close(Some(CloseFrame::new(
                    CloseCode::INTERNAL_ERROR,
                    "message abandoned",
                )));
                // A receiving half parked on a read writes the Close and arms its timer.
                let shared = inner.extra.as_ref().and_then(|x| x.shared.as_ref());
                if let Some(waker) = shared.and_then(|s| s.read_waker.as_ref()) {
                    waker.wake_by_ref();
                }
            });
        }
    }
}
