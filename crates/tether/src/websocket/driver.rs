//! The driver: the connection state that a whole socket or its two halves share, and the loop
//! that reads, hands events out, writes what is queued and runs the timers.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};

use bytes::{Buf, BytesMut};
use tether_proto::buffers;
use tether_proto::extension::deflate::Deflate;
use tether_proto::{
    Abnormal, CloseCode, CloseFrame, Connection, Event, Lent, OpCode, Prepared, Role, SendError,
    State,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use super::lending::Replies;
use super::wakers::{Shared, Waiter};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::message::Message;

/// How many buffers one vectored write gathers.
pub(super) const MAX_IOVECS: usize = 64;

/// Where the connection is in its life, as the driver sees it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Reading and writing.
    Running,
    /// Finishing: write what is queued (the Close), close the transport, then end the stream
    /// with [`Extra::error`] (or cleanly without one).
    Finishing,
    /// Our side of a half-closable transport is shut: reading (and dropping) until the peer
    /// ends its side too, or the close timeout, then ending as [`Phase::Finishing`] would.
    Draining,
    /// The stream has ended.
    Done,
}

/// What a handshake leaves for the connection: the transport, who we are, the settings, the
/// bytes read past the handshake, and what was agreed.
pub(crate) struct Parts<S> {
    pub(crate) io: S,
    pub(crate) role: Role,
    pub(crate) config: Arc<Config>,
    /// Bytes already read past the handshake.
    pub(crate) read_buf: BytesMut,
    pub(crate) protocol: Option<String>,
    pub(crate) deflate: Option<Deflate>,
    /// Whether the transport is a stream of a shared connection (HTTP/2) whose end must be
    /// read after ours: dropping it sooner resets it, and may lose what was written last.
    pub(crate) half_close: bool,
}

/// What most connections never need, boxed so that an idle connection does not carry it.
#[derive(Default)]
pub(super) struct Extra {
    pub(super) protocol: Option<Box<str>>,
    /// Runs while a write waits on a peer that takes nothing; reset by any progress.
    /// Kept once made: a stall re-arms it (cheaply, to a later deadline) rather than
    /// allocating and registering a timer each time a busy socket's buffer fills.
    pub(super) write_timer: Option<Pin<Box<Sleep>>>,
    /// Whether a write is waiting on the peer now (the timer counts only then).
    pub(super) write_stalled: bool,
    /// Set once two tasks poll the connection.
    pub(super) shared: Option<Shared>,
    /// The error a finishing connection ends with.
    pub(super) error: Option<Box<Error>>,
    /// Set when the transport refused a write after our Close: nothing more is written, and
    /// what is left is read (the peer's Close may be on its way).
    pub(super) write_shut: bool,
}

/// The connection state shared by the whole socket or by its two halves.
///
/// An idle connection holds no buffer and no other allocation of its own (the read buffer is
/// freed whenever a read would wait with nothing in it; cold state lives in `extra`), so that
/// a server can hold many: see `tests/idle_memory.rs`.
pub(super) struct Inner<S> {
    pub(super) io: S,
    pub(super) conn: Connection,
    pub(super) read_buf: BytesMut,
    pub(super) config: Arc<Config>,
    /// `None` until something in it is needed.
    pub(super) extra: Option<Box<Extra>>,
    /// Sleeps until the core's next deadline ([`Connection::poll_timeout`]); made when one is
    /// first set, and kept.
    pub(super) timer: Option<Pin<Box<Sleep>>>,
    /// While one task polls the connection: its waker, which the socket is given as is. A
    /// second task moves the connection to [`Extra::shared`] wakers.
    pub(super) task: Option<Waker>,
    pub(super) phase: Phase,
    /// The subprotocol agreed, when it is one of [`Config::protocols`] (a server's always
    /// is): its place there, so that no allocation holds its name.
    pub(super) protocol: Option<u8>,
    /// See [`Parts::half_close`].
    pub(super) half_close: bool,
}

/// The waker a write (or shutdown) by `who` gives the socket: the caller's own while one task
/// polls the connection, otherwise one that wakes both tasks.
pub(super) fn write_waker<'a>(
    extra: &'a Option<Box<Extra>>,
    who: Waiter,
    waker: &'a Waker,
) -> &'a Waker {
    match extra.as_ref().and_then(|x| x.shared.as_ref()) {
        Some(shared) => {
            shared.wakers.register(who, waker);
            &shared.write_waker
        }
        None => waker,
    }
}

/// Writes what `conn` has queued to `io` (gathering many frames per syscall) and flushes;
/// also tells whether the peer took any of it.
pub(super) fn write_io<S: AsyncWrite + Unpin>(
    io: &mut S,
    conn: &mut Connection,
    wcx: &mut Context<'_>,
) -> (Poll<io::Result<()>>, bool) {
    let out = conn.transmit();
    let mut progressed = false;
    while out.has_remaining() {
        // One contiguous chunk (small frames, the usual case) goes out with a plain write
        // (`send`), which costs the kernel less than a one-element `writev`.
        let written = if out.chunk().len() < out.remaining() && io.is_write_vectored() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let n = out.chunks_vectored(&mut slices);
            Pin::new(&mut *io).poll_write_vectored(wcx, &slices[..n])
        } else {
            Pin::new(&mut *io).poll_write(wcx, out.chunk())
        };
        match written {
            Poll::Pending => return (Poll::Pending, progressed),
            Poll::Ready(Err(e)) => return (Poll::Ready(Err(e)), progressed),
            Poll::Ready(Ok(0)) => {
                return (
                    Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    progressed,
                )
            }
            Poll::Ready(Ok(n)) => {
                out.advance(n);
                progressed = true;
            }
        }
    }
    (Pin::new(io).poll_flush(wcx), progressed)
}

impl<S> Inner<S> {
    /// The subprotocol agreed, if any.
    pub(super) fn protocol(&self) -> Option<&str> {
        match self.protocol {
            Some(i) => self
                .config
                .protocols
                .get(usize::from(i))
                .map(String::as_str),
            None => self.extra.as_ref()?.protocol.as_deref(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Inner<S> {
    pub(super) fn new(parts: Parts<S>) -> Self {
        let Parts {
            io,
            role,
            config,
            read_buf,
            protocol,
            deflate,
            half_close,
        } = parts;
        let mut conn = Connection::with_settings(role, config.core_settings());
        if let Some(deflate) = deflate {
            conn.set_deflate(deflate);
        }
        if config.ping_interval.is_some() {
            // Keepalive starts now.
            conn.handle_timeout(Instant::now().into_std());
        }
        let known = protocol.as_deref().and_then(|p| {
            let i = config.protocols.iter().position(|q| q == p)?;
            u8::try_from(i).ok()
        });
        let extra = protocol.filter(|_| known.is_none()).map(|protocol| {
            Box::new(Extra {
                protocol: Some(protocol.into_boxed_str()),
                ..Extra::default()
            })
        });
        Inner {
            io,
            conn,
            read_buf,
            config,
            extra,
            timer: None,
            task: None,
            phase: Phase::Running,
            protocol: known,
            half_close,
        }
    }

    pub(super) fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    pub(super) fn shared(&mut self) -> Option<&mut Shared> {
        self.extra.as_mut()?.shared.as_mut()
    }

    /// Notes the task polling as `who`. From a second task on (or after `split`), the
    /// connection keeps wakers for both, so that neither loses a wake-up.
    pub(super) fn track_task(&mut self, cx: &Context<'_>, who: Waiter) {
        let waker = cx.waker();
        if let Some(shared) = self.shared() {
            if matches!(who, Waiter::Reader)
                && !shared
                    .read_waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(waker))
            {
                shared.read_waker = Some(waker.clone());
            }
            return;
        }
        match self.task.take() {
            // The same task, even when `will_wake` says otherwise: a waker's data is its task,
            // but its vtable may be one of several copies of the same (one per codegen unit,
            // as with the waker of a current-thread runtime's `block_on`).
            Some(task) if task.data() == waker.data() => self.task = Some(task),
            None => self.task = Some(waker.clone()),
            Some(first) => {
                // The first task may be waiting to write with its own waker, which the
                // socket is about to forget: the shared wakers wake it too.
                let shared = self.start_sharing();
                let (other, reader) = match who {
                    Waiter::Reader => (Waiter::Sender, waker.clone()),
                    Waiter::Sender => (Waiter::Reader, first.clone()),
                };
                shared.wakers.register(other, &first);
                shared.read_waker = Some(reader);
            }
        }
    }

    /// Switches to the wakers of a connection polled by two tasks.
    pub(super) fn start_sharing(&mut self) -> &mut Shared {
        self.task = None;
        self.extra().shared.get_or_insert_with(Shared::new)
    }

    /// Writes queued frames (gathering many per syscall) and flushes the transport; fails the
    /// connection with [`Error::WriteTimeout`] when the peer takes nothing for
    /// `write_timeout`.
    pub(super) fn poll_write_out(&mut self, cx: &mut Context<'_>, who: Waiter) -> Poll<Result<()>> {
        if self.extra.as_ref().is_some_and(|x| x.write_shut) {
            let out = self.conn.transmit();
            out.advance(out.remaining());
            return Poll::Ready(Ok(()));
        }
        let mut wcx = Context::from_waker(write_waker(&self.extra, who, cx.waker()));
        let (result, progressed) = write_io(&mut self.io, &mut self.conn, &mut wcx);
        if let Poll::Ready(result) = result {
            if let Some(x) = self.extra.as_mut() {
                x.write_stalled = false;
            }
            return Poll::Ready(result.map_err(Error::from));
        }
        let Some(timeout) = self.config.write_timeout else {
            return Poll::Pending;
        };
        // The peer took nothing, or not all: wait for it, at most `timeout` since it last
        // took anything.
        let extra = self.extra();
        let fresh = !std::mem::replace(&mut extra.write_stalled, true);
        let mut timer = match extra.write_timer.take() {
            Some(mut timer) => {
                if fresh || progressed {
                    timer.as_mut().reset(tokio::time::Instant::now() + timeout);
                }
                timer
            }
            None => Box::pin(tokio::time::sleep(timeout)),
        };
        let mut wcx = Context::from_waker(write_waker(&self.extra, who, cx.waker()));
        if timer.as_mut().poll(&mut wcx).is_pending() {
            self.extra().write_timer = Some(timer);
            return Poll::Pending;
        }
        tracing::info!(
            ?timeout,
            "the peer took nothing we wrote within the write timeout; dropping the connection"
        );
        self.extra().error = Some(Box::new(Error::WriteTimeout));
        self.mark_done();
        Poll::Ready(Err(Error::WriteTimeout))
    }

    /// The stream's end once the connection is done: the error that ended it, if one is
    /// still to be reported, else the end.
    pub(super) fn end_done<T>(&mut self) -> Poll<Option<Result<T>>> {
        let error = self.extra.as_mut().and_then(|x| x.error.take());
        Poll::Ready(error.map(|err| Err(*err)))
    }

    /// Starts finishing the connection; the stream ends with `err` once the transport is closed.
    pub(super) fn finish(&mut self, err: Option<Error>) {
        if let Some(e) = &err {
            tracing::info!(code = e.close_code().0, error = %e, "closing WebSocket connection");
        }
        if self.phase == Phase::Running {
            self.phase = Phase::Finishing;
            if let Some(err) = err {
                self.extra().error = Some(Box::new(err));
            }
        }
    }

    pub(super) fn end<T>(&mut self) -> Poll<Option<Result<T>>> {
        let error = match self.mark_done() {
            Phase::Finishing | Phase::Draining => self.extra.as_mut().and_then(|x| x.error.take()),
            _ => None,
        };
        Poll::Ready(error.map(|err| Err(*err)))
    }

    /// Ends the connection for both halves: the transport is shut down (best effort) and a
    /// sender waiting to write is woken to find it closed. Returns the previous phase.
    pub(super) fn mark_done(&mut self) -> Phase {
        let previous = std::mem::replace(&mut self.phase, Phase::Done);
        if previous != Phase::Done {
            let shared = self.extra.as_ref().and_then(|x| x.shared.as_ref());
            let waker = shared.map_or(Waker::noop(), |s| &s.write_waker);
            let _ = Pin::new(&mut self.io).poll_shutdown(&mut Context::from_waker(waker));
            if let Some(shared) = shared {
                Wake::wake_by_ref(&shared.wakers);
            }
        }
        previous
    }

    /// Frees the read buffer while the connection waits with nothing in it (the write buffer
    /// goes back by itself once written), so an idle connection holds no buffer memory; the
    /// next read takes one again.
    pub(super) fn release_idle_buffers(&mut self) {
        if self.read_buf.is_empty() && self.read_buf.capacity() > 0 {
            buffers::give(std::mem::take(&mut self.read_buf));
        }
    }

    /// Wakes the receiving side when another task polls it (it arms the close timer once a
    /// Close is queued).
    pub(super) fn wake_reader(&self) {
        let shared = self.extra.as_ref().and_then(|x| x.shared.as_ref());
        if let Some(waker) = shared.and_then(|s| s.read_waker.as_ref()) {
            waker.wake_by_ref();
        }
    }

    /// Before a wait: tells the core the time (when a timer could be running) and sleeps
    /// until its next deadline. `true` when a timer fired: go round again, to write what it
    /// queued or to end.
    pub(super) fn timer_fired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.conn.poll_timeout().is_none() && !self.conn.close_sent() {
            // Open, without keepalive: no timer can run, and the clock is not read.
            return false;
        }
        let now = Instant::now();
        let due = self
            .conn
            .poll_timeout()
            .is_some_and(|d| d <= now.into_std());
        self.conn.handle_timeout(now.into_std());
        if due {
            self.after_timeout();
            return true;
        }
        let Some(deadline) = self.conn.poll_timeout().map(Instant::from_std) else {
            return false;
        };
        let timer = match &mut self.timer {
            Some(timer) => {
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        // The timer's clock reached the deadline.
        self.conn.handle_timeout(deadline.into_std());
        self.after_timeout();
        true
    }

    /// What a timer that fired means for the driver: a keepalive failure ends the stream
    /// with its error once the Close is written.
    fn after_timeout(&mut self) {
        if self.conn.abnormal() == Some(Abnormal::KeepaliveTimeout) && self.phase == Phase::Running
        {
            self.finish(Some(Error::KeepaliveTimeout));
        }
    }

    /// The next whole message. The pieces of a message that started streamed (see
    /// [`WebSocket::recv_stream`]) are passed over.
    pub(super) fn poll_next_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message>>> {
        if self.conn.is_streaming() {
            self.conn.set_streaming(false);
        }
        self.poll_next_with(cx, &mut Messages)
    }

    /// The next event of the connection, as the core emits it; drives reading, writing and
    /// the timers.
    pub(super) fn poll_next_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event>>> {
        self.poll_next_with(cx, &mut Events)
    }

    /// Lends the data messages buffered to `f` (at least one), or the next one once it
    /// arrives; returns how many. See [`WebSocket::poll_next_lent`].
    pub(super) fn poll_next_lent<F>(
        &mut self,
        cx: &mut Context<'_>,
        f: F,
    ) -> Poll<Option<Result<usize>>>
    where
        F: FnMut(Lent<'_>, &mut Replies<'_>),
    {
        if self.conn.is_streaming() {
            self.conn.set_streaming(false);
        }
        self.poll_next_with(cx, &mut Lending(f))
    }

    /// Queues one piece of a message sent as a stream.
    pub(super) fn start_fragment(
        &mut self,
        opcode: OpCode,
        payload: bytes::Bytes,
        fin: bool,
    ) -> Result<()> {
        self.conn.send_fragment(opcode, payload, fin)?;
        Ok(())
    }

    /// Drives the connection (reading, writing what is queued, the timers) until the core
    /// emits an event that `map` keeps (`Some`); events it drops are passed over. Generic, so
    /// that each caller's conversion is compiled into the loop.
    #[inline]
    fn poll_next_with<R: Receiver>(
        &mut self,
        cx: &mut Context<'_>,
        receiver: &mut R,
    ) -> Poll<Option<Result<R::Item>>> {
        self.track_task(cx, Waiter::Reader);
        loop {
            if let Some(event) = self.conn.poll_event() {
                match receiver.event(&mut self.conn, event) {
                    Some(item) => return Poll::Ready(Some(Ok(item))),
                    None => continue,
                }
            }
            if self.phase == Phase::Done {
                return self.end_done();
            }
            if self.phase == Phase::Draining {
                if self.conn.is_finished() {
                    tracing::debug!("close timeout elapsed before the peer ended its side");
                    return self.end();
                }
                // What the peer still sends is past our Close: read and dropped until its
                // side ends too (an HTTP/2 stream's END_STREAM or reset).
                self.read_buf.clear();
                self.conn.reserve_read(&mut self.read_buf);
                match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read_buf)
                {
                    Poll::Ready(Ok(0) | Err(_)) => return self.end(),
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Pending => {
                        if self.timer_fired(cx) {
                            continue;
                        }
                        return Poll::Pending;
                    }
                }
            }

            // Frames already buffered come before anything new: parse them first.
            if self.phase == Phase::Running {
                match receiver.lend(&mut self.conn, &mut self.read_buf) {
                    Ok(Some(item)) => return Poll::Ready(Some(Ok(item))),
                    Ok(None) => {}
                    Err(err) => {
                        self.finish(Some(Error::Protocol(err)));
                        continue;
                    }
                }
            }
            if self.phase == Phase::Running && self.conn.wants_receive(&self.read_buf) {
                let before = self.read_buf.len();
                if let Err(err) = self.conn.receive(&mut self.read_buf) {
                    self.finish(Some(Error::Protocol(err)));
                    continue;
                }
                if let Some(event) = self.conn.poll_event() {
                    match receiver.event(&mut self.conn, event) {
                        Some(item) => return Poll::Ready(Some(Ok(item))),
                        None => continue,
                    }
                }
                if self.read_buf.len() != before {
                    continue;
                }
            }

            let flushed = match self.poll_write_out(cx, Waiter::Reader) {
                Poll::Ready(Ok(())) => true,
                // The peer's Close arrived: it may drop the transport before taking our echo.
                Poll::Ready(Err(_)) if self.conn.close_received() => return self.end(),
                // Our Close is out (or on its way) and the transport takes no more: the peer
                // ended its side, as an HTTP/2 server resets a stream (NO_ERROR) once its own
                // Close is sent. That Close may still wait to be read: read on, writing nothing.
                Poll::Ready(Err(e)) if self.conn.close_sent() && self.phase == Phase::Running => {
                    tracing::debug!(error = %e, "the transport refused a write after our Close; reading what is left");
                    self.extra().write_shut = true;
                    continue;
                }
                Poll::Ready(Err(Error::WriteTimeout)) => return self.end_done(),
                Poll::Ready(Err(e)) => {
                    self.phase = Phase::Done;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending => false,
            };

            if self.conn.is_finished() {
                tracing::debug!("close timeout elapsed; closing the transport");
                return self.end();
            }
            if self.conn.abnormal() == Some(Abnormal::Eof) && self.phase == Phase::Running {
                // The peer vanished without a close handshake.
                self.mark_done();
                return Poll::Ready(Some(Err(Error::AbnormalClosure)));
            }
            // A server closes the transport once its Close is written, as does a failed
            // connection; a client that closed cleanly waits for the server to close it
            // first (RFC 6455 §7.1.1), up to the close timeout.
            if self.phase == Phase::Finishing || self.conn.should_close_transport() {
                if !flushed {
                    if self.timer_fired(cx) {
                        continue;
                    }
                    return Poll::Pending;
                }
                let waker = write_waker(&self.extra, Waiter::Reader, cx.waker());
                let mut wcx = Context::from_waker(waker);
                if Pin::new(&mut self.io).poll_shutdown(&mut wcx).is_ready() {
                    if self.half_close {
                        self.phase = Phase::Draining;
                        continue;
                    }
                    return self.end();
                }
                // Shutting down waits on the peer (a TLS close_notify to write), up to the
                // close timeout.
                if self.timer_fired(cx) {
                    continue;
                }
                return Poll::Pending;
            }

            // Backpressure: don't take in more while our own output is over its budget.
            if !flushed && self.conn.queued_len() > self.config.write_buffer_size {
                if self.timer_fired(cx) {
                    continue;
                }
                return Poll::Pending;
            }

            self.conn.reserve_read(&mut self.read_buf);
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read_buf) {
                Poll::Pending => {
                    self.release_idle_buffers();
                    if self.timer_fired(cx) {
                        continue;
                    }
                    return Poll::Pending;
                }
                // After both Close frames, a reset instead of a FIN still ends the connection.
                Poll::Ready(Err(_))
                    if self.conn.state() == State::Closed && self.conn.close_received() =>
                {
                    self.conn.receive_eof();
                    continue;
                }
                Poll::Ready(Err(e)) => {
                    self.mark_done();
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Ok(0)) => {
                    self.conn.receive_eof();
                    continue;
                }
                Poll::Ready(Ok(_)) => {}
            }
            if self.conn.close_received() {
                // Waiting for the peer to close TCP: whatever it still sends is discarded.
                self.read_buf.clear();
            }
        }
    }

    pub(super) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.track_task(cx, Waiter::Sender);
        if self.conn.close_sent() || self.phase == Phase::Done {
            return Poll::Ready(Err(Error::Send(SendError::Closed)));
        }
        if self.conn.queued_len() >= self.config.write_buffer_size {
            ready!(self.poll_write_out(cx, Waiter::Sender))?;
        }
        Poll::Ready(Ok(()))
    }

    pub(super) fn start_send(&mut self, msg: Message) -> Result<()> {
        match msg {
            Message::Text(t) => self.conn.send_text(t)?,
            Message::Binary(b) => self.conn.send_binary(b)?,
            Message::Ping(b) => self.conn.send_ping(b)?,
            Message::Pong(b) => self.conn.send_pong(b)?,
            Message::Close(frame) => {
                self.conn.send_close(frame)?;
                self.wake_reader();
            }
        }
        Ok(())
    }

    pub(super) fn start_send_prepared(&mut self, msg: &Prepared) -> Result<()> {
        self.conn.send_prepared(msg)?;
        Ok(())
    }

    pub(super) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.track_task(cx, Waiter::Sender);
        if self.phase == Phase::Done && self.conn.queued_len() > 0 {
            // The transport is closed: what is still queued will never be written.
            return Poll::Ready(Err(Error::Send(SendError::Closed)));
        }
        ready!(self.poll_write_out(cx, Waiter::Sender))?;
        Poll::Ready(Ok(()))
    }

    /// Queues a normal Close unless one was sent.
    pub(super) fn start_close(&mut self, frame: Option<CloseFrame>) -> Result<()> {
        if self.conn.state() == State::Open {
            self.conn.send_close(Some(
                frame.unwrap_or_else(|| CloseFrame::new(CloseCode::NORMAL, "")),
            ))?;
            self.wake_reader();
        }
        Ok(())
    }
}

/// What a receiving loop hands out: items made from the core's events, and, for the lending
/// receive, data messages lent straight from the read buffer before any event is parsed.
trait Receiver {
    type Item;

    /// The item for `event`, or `None` to pass over it.
    fn event(&mut self, conn: &mut Connection, event: Event) -> Option<Self::Item>;

    /// Items taken from the buffer without events (none by default).
    #[inline]
    fn lend(
        &mut self,
        _conn: &mut Connection,
        _buf: &mut BytesMut,
    ) -> std::result::Result<Option<Self::Item>, tether_proto::ProtocolError> {
        Ok(None)
    }
}

/// Whole messages; the pieces of a streamed message are passed over.
struct Messages;

impl Receiver for Messages {
    type Item = Message;

    #[inline]
    fn event(&mut self, _conn: &mut Connection, event: Event) -> Option<Message> {
        match event {
            Event::Fragment { .. } => None,
            event => Some(event.into()),
        }
    }
}

/// The core's events as they are.
struct Events;

impl Receiver for Events {
    type Item = Event;

    #[inline]
    fn event(&mut self, _conn: &mut Connection, event: Event) -> Option<Event> {
        Some(event)
    }
}

/// Data messages lent to a callback, counted; control frames are passed over (pings are
/// answered, the close handshake completes and ends the stream).
struct Lending<F>(F);

impl<F: FnMut(Lent<'_>, &mut Replies<'_>)> Receiver for Lending<F> {
    type Item = usize;

    fn event(&mut self, conn: &mut Connection, event: Event) -> Option<usize> {
        let lent = match &event {
            Event::Text(text) => Lent::Text(text.as_str()),
            Event::Binary(data) => Lent::Binary(data),
            _ => return None,
        };
        (self.0)(lent, &mut Replies::new(conn, Some(&event)));
        Some(1)
    }

    #[inline]
    fn lend(
        &mut self,
        conn: &mut Connection,
        buf: &mut BytesMut,
    ) -> std::result::Result<Option<usize>, tether_proto::ProtocolError> {
        let f = &mut self.0;
        let lent = conn.receive_lent(buf, |conn, message| {
            f(message, &mut Replies::new(conn, None));
            std::ops::ControlFlow::Continue(())
        })?;
        Ok((lent > 0).then_some(lent))
    }
}
