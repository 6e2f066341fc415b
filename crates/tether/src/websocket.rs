//! `WebSocket<S>`: the tokio driver around a [`tether_proto::Connection`].

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Wake, Waker};

use bytes::{Buf, BytesMut};
use futures_core::Stream;
use futures_sink::Sink;
use tether_proto::extension::deflate::Deflate;
use tether_proto::{
    CloseCode, CloseFrame, Connection, Event, OpCode, Prepared, Role, SendError, State,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::spare;

mod streaming;
pub use streaming::{Incoming, MessageReader, MessageWriter};

/// How much spare room a read asks for.
const READ_CHUNK: usize = spare::BUFFER;
/// Room made at once for the rest of a large frame is at most this many times what is already
/// buffered (and at least a chunk): a 64 KiB frame is read into one allocation after its first
/// chunk, while a peer that announces a large frame cannot make a connection hold more than
/// about five times what it has sent.
const FRAME_AHEAD_FACTOR: usize = 4;
/// How many buffers one vectored write gathers.
const MAX_IOVECS: usize = 64;

/// Which half of a connection is polling: both can write, after [`WebSocket::split`].
#[derive(Clone, Copy)]
enum Waiter {
    Reader = 0,
    Sender = 1,
}

/// Wakes every task that waits for the socket to become writable.
///
/// The reader (flushing pongs and close echoes) and the sender can both wait for write
/// readiness, but a socket remembers one waker per direction; the socket is given this
/// combined waker, which wakes both.
#[derive(Default)]
struct WriteWakers {
    slots: Mutex<[Option<Waker>; 2]>,
}

impl WriteWakers {
    fn register(&self, who: Waiter, waker: &Waker) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut slots[who as usize];
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }
}

impl Wake for WriteWakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let taken = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            [slots[0].take(), slots[1].take()]
        };
        for waker in taken.into_iter().flatten() {
            waker.wake();
        }
    }
}

/// The wakers of a connection that two tasks poll: the halves of [`WebSocket::split`], or a
/// socket polled from a second task (through `futures`' `StreamExt::split`, say).
struct Shared {
    wakers: Arc<WriteWakers>,
    /// Given to the socket for every write: wakes both tasks.
    write_waker: Waker,
    /// The task last waiting in `poll_next_message`, woken when a Close is queued from the
    /// sending side so that it arms the close timer.
    read_waker: Option<Waker>,
}

impl Shared {
    fn new() -> Self {
        let wakers = Arc::new(WriteWakers::default());
        Shared {
            write_waker: Waker::from(wakers.clone()),
            wakers,
            read_waker: None,
        }
    }
}

/// Keepalive: a ping `ping_interval` after the last pong (or the start), and a deadline for
/// its pong. One timer serves both: it runs to the next ping, or, while a pong is awaited, to
/// the pong's deadline. Two words, kept in the connection itself: a server with keepalive on
/// holds no allocation for it besides the timer.
struct Keepalive {
    timer: Pin<Box<Sleep>>,
    /// Pings sent; the latest one's number is its payload.
    sent: u32,
    /// Whether the latest ping awaits its pong.
    awaiting: bool,
}

impl Keepalive {
    fn new(interval: std::time::Duration) -> Self {
        Keepalive {
            timer: Box::pin(tokio::time::sleep(interval)),
            sent: 0,
            awaiting: false,
        }
    }

    /// Sends a ping when one is due. `Err(())` when a pong is overdue.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut Connection,
        config: &Config,
    ) -> Result<(), ()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            if self.awaiting {
                return Err(());
            }
            let now = Instant::now();
            self.sent = self.sent.wrapping_add(1);
            let payload = u64::from(self.sent).to_be_bytes();
            if conn
                .send_ping(bytes::Bytes::copy_from_slice(&payload))
                .is_ok()
            {
                self.awaiting = true;
                self.timer.as_mut().reset(now + config.ping_timeout);
            } else {
                // Closing: nothing more to prove.
                let interval = config.ping_interval.unwrap_or_default();
                self.timer.as_mut().reset(now + interval);
            }
        }
        Ok(())
    }

    /// A pong: when it answers the latest ping, the peer is alive and the next ping is due
    /// an interval from now.
    fn pong(&mut self, payload: &[u8], config: &Config) {
        if self.awaiting && payload == u64::from(self.sent).to_be_bytes() {
            self.awaiting = false;
            let interval = config.ping_interval.unwrap_or_default();
            self.timer.as_mut().reset(Instant::now() + interval);
        }
    }
}

/// Where the connection is in its life, as the driver sees it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading and writing.
    Running,
    /// Finishing: write what is queued (the Close), close the transport, then end the stream
    /// with [`Extra::error`] (or cleanly without one).
    Finishing,
    /// The stream has ended.
    Done,
}

/// What most connections never need, boxed so that an idle connection does not carry it.
#[derive(Default)]
struct Extra {
    protocol: Option<Box<str>>,
    close_timer: Option<Pin<Box<Sleep>>>,
    /// Runs while a write waits on a peer that takes nothing; reset by any progress.
    write_timer: Option<Pin<Box<Sleep>>>,
    /// Set once two tasks poll the connection.
    shared: Option<Shared>,
    /// The error a finishing connection ends with.
    error: Option<Box<Error>>,
}

/// The connection state shared by the whole socket or by its two halves.
///
/// An idle connection holds no buffer and no other allocation of its own (the read buffer is
/// freed whenever a read would wait with nothing in it; cold state lives in `extra`), so that
/// a server can hold many: see `tests/idle_memory.rs`.
pub(crate) struct Inner<S> {
    io: S,
    conn: Connection,
    read_buf: BytesMut,
    config: Arc<Config>,
    /// `None` until something in it is needed.
    extra: Option<Box<Extra>>,
    keepalive: Option<Keepalive>,
    /// While one task polls the connection: its waker, which the socket is given as is. A
    /// second task moves the connection to [`Extra::shared`] wakers.
    task: Option<Waker>,
    phase: Phase,
    eof: bool,
}

/// The waker a write (or shutdown) by `who` gives the socket: the caller's own while one task
/// polls the connection, otherwise one that wakes both tasks.
fn write_waker<'a>(extra: &'a Option<Box<Extra>>, who: Waiter, waker: &'a Waker) -> &'a Waker {
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
fn write_io<S: AsyncWrite + Unpin>(
    io: &mut S,
    conn: &mut Connection,
    wcx: &mut Context<'_>,
) -> (Poll<io::Result<()>>, bool) {
    let out = conn.transmit();
    let mut progressed = false;
    while out.has_remaining() {
        let written = if io.is_write_vectored() {
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

impl<S: AsyncRead + AsyncWrite + Unpin> Inner<S> {
    fn new(
        io: S,
        role: Role,
        config: Arc<Config>,
        read_buf: BytesMut,
        protocol: Option<String>,
        deflate: Option<Deflate>,
    ) -> Self {
        let mut conn = Connection::with_limits(role, config.limits());
        if let Some(deflate) = deflate {
            conn.set_deflate(deflate);
        }
        let keepalive = config
            .ping_interval
            .filter(|i| !i.is_zero())
            .map(Keepalive::new);
        let extra = protocol.map(|protocol| {
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
            keepalive,
            task: None,
            phase: Phase::Running,
            eof: false,
        }
    }

    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    fn shared(&mut self) -> Option<&mut Shared> {
        self.extra.as_mut()?.shared.as_mut()
    }

    /// Notes the task polling as `who`. From a second task on (or after `split`), the
    /// connection keeps wakers for both, so that neither loses a wake-up.
    fn track_task(&mut self, cx: &Context<'_>, who: Waiter) {
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
    fn start_sharing(&mut self) -> &mut Shared {
        self.task = None;
        self.extra().shared.get_or_insert_with(Shared::new)
    }

    /// Writes queued frames (gathering many per syscall) and flushes the transport; fails the
    /// connection with [`Error::WriteTimeout`] when the peer takes nothing for
    /// `write_timeout`.
    fn poll_write_out(&mut self, cx: &mut Context<'_>, who: Waiter) -> Poll<Result<()>> {
        let mut wcx = Context::from_waker(write_waker(&self.extra, who, cx.waker()));
        let (result, progressed) = write_io(&mut self.io, &mut self.conn, &mut wcx);
        if let Poll::Ready(result) = result {
            if let Some(x) = self.extra.as_mut() {
                x.write_timer = None;
            }
            return Poll::Ready(result.map_err(Error::from));
        }
        let Some(timeout) = self.config.write_timeout else {
            return Poll::Pending;
        };
        // The peer took nothing, or not all: wait for it, at most `timeout` since it last
        // took anything.
        let mut timer = match self.extra().write_timer.take() {
            Some(mut timer) => {
                if progressed {
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
    fn end_done<T>(&mut self) -> Poll<Option<Result<T>>> {
        let error = self.extra.as_mut().and_then(|x| x.error.take());
        Poll::Ready(error.map(|err| Err(*err)))
    }

    /// Starts finishing the connection; the stream ends with `err` once the transport is closed.
    fn finish(&mut self, err: Option<Error>) {
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

    fn end<T>(&mut self) -> Poll<Option<Result<T>>> {
        let error = match self.mark_done() {
            Phase::Finishing => self.extra.as_mut().and_then(|x| x.error.take()),
            _ => None,
        };
        Poll::Ready(error.map(|err| Err(*err)))
    }

    /// Ends the connection for both halves: the transport is shut down (best effort) and a
    /// sender waiting to write is woken to find it closed. Returns the previous phase.
    fn mark_done(&mut self) -> Phase {
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

    /// Frees the read and write buffers while the connection waits with nothing in them, so
    /// an idle connection holds no buffer memory; the next read allocates again.
    fn release_idle_buffers(&mut self) {
        if self.read_buf.is_empty() && self.read_buf.capacity() > 0 {
            spare::give(std::mem::take(&mut self.read_buf));
        }
        if let Some(tail) = self.conn.transmit().release() {
            spare::give(tail);
        }
    }

    /// Makes room in the read buffer when little is left: a spare buffer when it is empty,
    /// room for the rest of a large frame whose header is in (one allocation rather than
    /// regrowing read by read, but at most [`FRAME_AHEAD_FACTOR`] times what is buffered),
    /// a chunk otherwise.
    fn reserve_read(&mut self) {
        let buf = &mut self.read_buf;
        if buf.is_empty() && buf.capacity() < READ_CHUNK / 4 {
            // Nothing buffered, and no room worth reading into (none after an idle wait, a
            // little left from the handshake): a spare buffer rather than growing this one.
            *buf = spare::take();
        }
        if buf.capacity() - buf.len() >= READ_CHUNK / 4 {
            return;
        }
        let missing = self.conn.frame_missing(buf);
        let ahead = buf.len().saturating_mul(FRAME_AHEAD_FACTOR);
        buf.reserve(missing.min(ahead).max(READ_CHUNK));
    }

    /// Wakes the receiving side when another task polls it (it arms the close timer once a
    /// Close is queued).
    fn wake_reader(&self) {
        let shared = self.extra.as_ref().and_then(|x| x.shared.as_ref());
        if let Some(waker) = shared.and_then(|s| s.read_waker.as_ref()) {
            waker.wake_by_ref();
        }
    }

    /// Arms the close timer (once) and tells whether it has fired.
    fn close_timer_fired(&mut self, cx: &mut Context<'_>) -> bool {
        let timeout = self.config.close_timeout;
        let timer = self
            .extra()
            .close_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        timer.as_mut().poll(cx).is_ready()
    }

    /// Hands an event to the caller as a message; a Pong answering our latest ping proves the
    /// peer alive.
    fn deliver(&mut self, event: Event) -> Event {
        if let (Event::Pong(payload), Some(k)) = (&event, &mut self.keepalive) {
            k.pong(payload, &self.config);
        }
        event
    }

    /// The next whole message. The pieces of a message that started streamed (see
    /// [`WebSocket::recv_stream`]) are passed over.
    fn poll_next_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message>>> {
        self.conn.set_streaming(false);
        loop {
            return Poll::Ready(match ready!(self.poll_next_event(cx)) {
                Some(Ok(Event::Fragment { .. })) => continue,
                Some(Ok(event)) => Some(Ok(event.into())),
                Some(Err(e)) => Some(Err(e)),
                None => None,
            });
        }
    }

    /// Queues one piece of a message sent as a stream.
    fn start_fragment(&mut self, opcode: OpCode, payload: bytes::Bytes, fin: bool) -> Result<()> {
        self.conn.transmit().provide(spare::take);
        self.conn.send_fragment(opcode, payload, fin)?;
        Ok(())
    }

    /// The next event of the connection, as the core emits it; drives reading, writing and
    /// the timers.
    fn poll_next_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event>>> {
        self.track_task(cx, Waiter::Reader);
        loop {
            if let Some(event) = self.conn.poll_event() {
                return Poll::Ready(Some(Ok(self.deliver(event))));
            }
            if self.phase == Phase::Done {
                return self.end_done();
            }
            if self.phase == Phase::Running {
                if let Some(keepalive) = &mut self.keepalive {
                    if keepalive.poll(cx, &mut self.conn, &self.config).is_err() {
                        let _ = self.conn.send_close(Some(CloseFrame::new(
                            CloseCode::INTERNAL_ERROR,
                            "keepalive timeout",
                        )));
                        self.finish(Some(Error::KeepaliveTimeout));
                    }
                }
            }

            // Frames already buffered come before anything new: parse them first.
            if self.phase == Phase::Running && self.conn.wants_receive(&self.read_buf) {
                let before = self.read_buf.len();
                if let Err(err) = self.conn.receive(&mut self.read_buf) {
                    self.finish(Some(Error::Protocol(err)));
                    continue;
                }
                if let Some(event) = self.conn.poll_event() {
                    return Poll::Ready(Some(Ok(self.deliver(event))));
                }
                if self.read_buf.len() != before {
                    continue;
                }
            }

            let flushed = match self.poll_write_out(cx, Waiter::Reader) {
                Poll::Ready(Ok(())) => true,
                // The peer's Close arrived: it may drop the transport before taking our echo.
                Poll::Ready(Err(_)) if self.conn.close_received() => return self.end(),
                Poll::Ready(Err(Error::WriteTimeout)) => return self.end_done(),
                Poll::Ready(Err(e)) => {
                    self.phase = Phase::Done;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending => false,
            };

            let finishing = self.phase != Phase::Running;
            let state = self.conn.state();
            if finishing || state != State::Open {
                if self.close_timer_fired(cx) {
                    tracing::debug!("close timeout elapsed; closing the transport");
                    return self.end();
                }
                if finishing || state == State::Closed {
                    if !flushed {
                        return Poll::Pending;
                    }
                    // After a clean close handshake a client waits for the server to close
                    // TCP first (RFC 6455 §7.1.1); a server, or a failed connection, closes now.
                    let wait_for_peer = !finishing && self.conn.role() == Role::Client && !self.eof;
                    if !wait_for_peer {
                        let waker = write_waker(&self.extra, Waiter::Reader, cx.waker());
                        let mut wcx = Context::from_waker(waker);
                        let _ = ready!(Pin::new(&mut self.io).poll_shutdown(&mut wcx));
                        return self.end();
                    }
                }
            }
            if self.eof {
                // Open or closing, and the peer vanished without a close handshake.
                self.mark_done();
                return Poll::Ready(Some(Err(Error::AbnormalClosure)));
            }

            // Backpressure: don't take in more while our own output is over its budget.
            if !flushed && self.conn.queued_len() > self.config.write_buffer_size {
                return Poll::Pending;
            }

            self.reserve_read();
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read_buf) {
                Poll::Pending => {
                    self.release_idle_buffers();
                    return Poll::Pending;
                }
                // After both Close frames, a reset instead of a FIN still ends the connection.
                Poll::Ready(Err(_))
                    if self.conn.state() == State::Closed && self.conn.close_received() =>
                {
                    self.eof = true;
                    continue;
                }
                Poll::Ready(Err(e)) => {
                    self.mark_done();
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Ok(0)) => {
                    self.eof = true;
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

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.track_task(cx, Waiter::Sender);
        if self.conn.close_sent() || self.phase == Phase::Done {
            return Poll::Ready(Err(Error::Send(SendError::Closed)));
        }
        if self.conn.queued_len() >= self.config.write_buffer_size {
            ready!(self.poll_write_out(cx, Waiter::Sender))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(&mut self, msg: Message) -> Result<()> {
        self.conn.transmit().provide(spare::take);
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

    fn start_send_prepared(&mut self, msg: &Prepared) -> Result<()> {
        self.conn.transmit().provide(spare::take);
        self.conn.send_prepared(msg)?;
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.track_task(cx, Waiter::Sender);
        if self.phase == Phase::Done && self.conn.queued_len() > 0 {
            // The transport is closed: what is still queued will never be written.
            return Poll::Ready(Err(Error::Send(SendError::Closed)));
        }
        ready!(self.poll_write_out(cx, Waiter::Sender))?;
        // All written: the tail's buffer serves other connections until the next send (a
        // sending half may flush and then wait long while its reader is parked).
        if let Some(tail) = self.conn.transmit().release() {
            spare::give(tail);
        }
        Poll::Ready(Ok(()))
    }

    /// Queues a normal Close unless one was sent.
    fn start_close(&mut self, frame: Option<CloseFrame>) -> Result<()> {
        if self.conn.state() == State::Open {
            self.conn.send_close(Some(
                frame.unwrap_or_else(|| CloseFrame::new(CloseCode::NORMAL, "")),
            ))?;
            self.wake_reader();
        }
        Ok(())
    }
}

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
        Self::from_parts(io, role, Arc::new(config), BytesMut::new(), None, None)
    }

    /// Wraps a transport whose handshake is done; `read_buf` holds bytes already read past it.
    pub(crate) fn from_parts(
        io: S,
        role: Role,
        config: Arc<Config>,
        read_buf: BytesMut,
        protocol: Option<String>,
        deflate: Option<Deflate>,
    ) -> Self {
        WebSocket {
            inner: Inner::new(io, role, config, read_buf, protocol, deflate),
        }
    }

    /// The subprotocol agreed in the handshake, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.inner.extra.as_ref()?.protocol.as_deref()
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

    /// Queues `msg` and writes everything queued.
    ///
    /// # Errors
    /// [`Error::Send`] after a Close was sent or for an oversized control frame;
    /// [`Error::Io`] when the transport fails.
    ///
    /// # Cancel safety
    /// If cancelled, the message may be queued and is written by a later call.
    pub fn send(&mut self, msg: Message) -> impl Future<Output = Result<()>> + '_ {
        let mut msg = Some(msg);
        poll_fn(move |cx| {
            if msg.is_some() {
                ready!(self.inner.poll_ready(cx))?;
                self.inner.start_send(msg.take().expect("checked above"))?;
            }
            self.inner.poll_flush(cx)
        })
    }

    /// Queues `msg`, waiting only while more than `write_buffer_size` bytes are queued.
    ///
    /// # Errors
    /// As [`WebSocket::send`].
    ///
    /// # Cancel safety
    /// Cancel-safe: if cancelled, the message was not queued.
    pub fn feed(&mut self, msg: Message) -> impl Future<Output = Result<()>> + '_ {
        let mut msg = Some(msg);
        poll_fn(move |cx| {
            ready!(self.inner.poll_ready(cx))?;
            let msg = msg.take().expect("polled after completion");
            Poll::Ready(self.inner.start_send(msg))
        })
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
        poll_fn(move |cx| {
            ready!(self.inner.poll_ready(cx))?;
            Poll::Ready(self.inner.start_send_prepared(msg))
        })
    }

    /// Writes everything queued.
    ///
    /// # Errors
    /// [`Error::Io`] when the transport fails.
    ///
    /// # Cancel safety
    /// Cancel-safe: what was written stays written; the rest stays queued.
    pub fn flush(&mut self) -> impl Future<Output = Result<()>> + '_ {
        poll_fn(|cx| self.inner.poll_flush(cx))
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
            .field(
                "protocol",
                &self.inner.extra.as_ref().and_then(|x| x.protocol.as_ref()),
            )
            .finish_non_exhaustive()
    }
}

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

fn lock<S>(shared: &Mutex<Inner<S>>) -> std::sync::MutexGuard<'_, Inner<S>> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The sending half of a split [`WebSocket`].
pub struct WsSender<S> {
    shared: Arc<Mutex<Inner<S>>>,
}

/// The receiving half of a split [`WebSocket`]; it also writes pongs and the close echo.
pub struct WsReceiver<S> {
    shared: Arc<Mutex<Inner<S>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsSender<S> {
    /// Queues `msg` and writes everything queued.
    ///
    /// # Errors
    /// As [`WebSocket::send`].
    ///
    /// # Cancel safety
    /// If cancelled, the message may be queued and is written by a later call.
    pub fn send(&mut self, msg: Message) -> impl Future<Output = Result<()>> + '_ {
        let mut msg = Some(msg);
        poll_fn(move |cx| {
            let mut inner = lock(&self.shared);
            if msg.is_some() {
                ready!(inner.poll_ready(cx))?;
                inner.start_send(msg.take().expect("checked above"))?;
            }
            inner.poll_flush(cx)
        })
    }

    /// Queues `msg`, waiting only while more than `write_buffer_size` bytes are queued.
    ///
    /// # Errors
    /// As [`WebSocket::send`].
    ///
    /// # Cancel safety
    /// Cancel-safe: if cancelled, the message was not queued.
    pub fn feed(&mut self, msg: Message) -> impl Future<Output = Result<()>> + '_ {
        let mut msg = Some(msg);
        poll_fn(move |cx| {
            let mut inner = lock(&self.shared);
            ready!(inner.poll_ready(cx))?;
            let msg = msg.take().expect("polled after completion");
            Poll::Ready(inner.start_send(msg))
        })
    }

    /// Queues a prepared message; see [`WebSocket::feed_prepared`].
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
        poll_fn(move |cx| {
            let mut inner = lock(&self.shared);
            ready!(inner.poll_ready(cx))?;
            Poll::Ready(inner.start_send_prepared(msg))
        })
    }

    /// Writes everything queued.
    ///
    /// # Errors
    /// [`Error::Io`] when the transport fails.
    ///
    /// # Cancel safety
    /// Cancel-safe.
    pub fn flush(&mut self) -> impl Future<Output = Result<()>> + '_ {
        poll_fn(|cx| lock(&self.shared).poll_flush(cx))
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
    /// Receives the next message; see [`WebSocket::recv`].
    ///
    /// # Errors
    /// As [`WebSocket::recv`].
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
