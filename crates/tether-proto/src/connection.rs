//! The connection: a value that turns received bytes into events and calls into bytes to send.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rand::{RngCore, SeedableRng};

use crate::close::{CloseFrame, ClosePayloadError};
use std::sync::{Arc, OnceLock};

use crate::config::{Limits, Settings};
use crate::error::{ProtocolError, SendError};
use crate::extension::deflate::Deflate;
use crate::frame::{FrameHeader, OpCode, MAX_CONTROL_PAYLOAD, RSV1};
use crate::mask::apply_mask;
use crate::transmit::Transmit;
use crate::utf8::{Utf8Bytes, Utf8Validator};

mod timers;

pub use timers::Abnormal;
use timers::Timer;

/// Which end of the connection this is: it decides who masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts connections; sends unmasked frames and requires masked ones.
    Server,
    /// Opens connections; masks every frame and refuses masked ones.
    Client,
}

/// The closing state of a connection (RFC 6455 §7).
///
/// ```text
///            send_close()                     peer's Close
///   Open ────────────────────▶ Closing ─────────────────────▶ Closed
///     │                                                          ▲
///     │  peer's Close (our echo is queued at once)               │
///     ├──────────────────────────────────────────────────────────┤
///     │  protocol error (a Close with its code is queued)        │
///     └──────────────────────────────────────────────────────────┘
/// ```
///
/// In `Closed`, the server closes TCP once the queued bytes are written; the client waits
/// (with a timeout) for the server to close it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Messages flow both ways.
    Open,
    /// We sent a Close and wait for the peer's; received data is still delivered.
    Closing,
    /// Both Close frames are exchanged (or the connection failed): nothing more to send.
    Closed,
}

/// What the peer sent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A complete text message, validated UTF-8.
    Text(Utf8Bytes),
    /// A complete binary message.
    Binary(Bytes),
    /// A ping. With auto-pong (the default) the pong is already queued.
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// The peer's close frame (`None` when it carried no status). Our echo is queued if we had
    /// not sent a Close already. This is the last event.
    Close(Option<CloseFrame>),
    /// A piece of a data message that started while streaming was on
    /// ([`Connection::set_streaming`]): one frame's payload as soon as the frame is in; for a
    /// compressed message, what the frame inflates to, in pieces of at most `max_frame_size`
    /// bytes. A text message's pieces may split a code point;
    /// the UTF-8 of the whole is checked as it arrives, and the last piece (`fin`) is only
    /// delivered when the message ends on a whole code point.
    Fragment {
        /// Whether the message is text (the same for each piece of one message).
        text: bool,
        /// Whether this is the message's first piece.
        first: bool,
        /// This piece.
        data: Bytes,
        /// Whether this is the message's last piece.
        fin: bool,
    },
}

/// A data message lent by [`Connection::receive_lent`]: its payload, unmasked (and for text
/// validated) in place in the read buffer, borrowed rather than copied out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lent<'a> {
    /// A text message.
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

impl Lent<'_> {
    /// The payload's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Lent::Text(text) => text.as_bytes(),
            Lent::Binary(data) => data,
        }
    }
}

/// The message being received. Its data so far (the payload of the frames before the current
/// one, or for a compressed message what was inflated) is [`Extras::data`].
#[derive(Debug, Clone, Copy)]
struct Assembly {
    text: bool,
    /// RSV1 was set on the first frame: the payload is permessage-deflate data.
    compressed: bool,
    /// Delivered frame by frame ([`Event::Fragment`]) rather than assembled.
    streamed: bool,
    /// Frames so far, including the one being received.
    frames: u32,
    /// Whether a piece of it was delivered (streamed messages).
    started: bool,
    /// Total bytes so far, including the frame being received.
    len: usize,
}

/// Where receiving stands between calls to [`Connection::receive`]. A frame in progress and a
/// pending event never coexist: a frame yields its event as it completes.
#[derive(Debug)]
enum Rx {
    /// Between frames.
    Idle,
    /// Inside a frame.
    Frame(InFrame),
    /// Stopped at an event; `receive` stops at each one, so there is never a second.
    Event(Event),
}

/// The frame being received: its header is consumed; its payload is the front of the buffer.
#[derive(Debug, Clone, Copy)]
struct InFrame {
    header: FrameHeader,
    /// Payload bytes already unmasked (and validated, for text).
    seen: usize,
}

impl InFrame {
    /// The payload length (`check_header` bounded it by `max_frame_size`, a `usize`).
    fn len(&self) -> usize {
        self.header.payload_len as usize
    }
}

/// What most idle server connections never need, boxed so that they do not carry it:
/// a client's masking keys, permessage-deflate, the error that failed the connection, and the
/// data of a fragmented (or compressed) message.
#[derive(Default)]
struct Extras {
    mask: Option<MaskSource>,
    deflate: Option<Deflate>,
    error: Option<ProtocolError>,
    /// The message being received, so far: the payload of its frames before the current one,
    /// or for a compressed message what was inflated. Empty between messages.
    data: Vec<u8>,
    /// A compressed frame of a streamed message, being inflated a piece at a time.
    inflating: Option<Inflating>,
}

/// What of a compressed frame of a streamed message is not inflated yet: the rest of its
/// payload and, after the message's last frame, of the tail the sender removed.
struct Inflating {
    payload: Bytes,
    used: usize,
    /// The message's last frame: the tail follows its payload.
    fin: bool,
    tail_used: usize,
}

impl Extras {
    /// Whether dropping it loses nothing.
    fn is_unused(&self) -> bool {
        self.mask.is_none()
            && self.deflate.is_none()
            && self.error.is_none()
            && self.data.capacity() == 0
            && self.inflating.is_none()
    }
}

/// Room made at once for the rest of a large frame is at most this many times what is already
/// buffered (and at least a buffer's worth): a 64 KiB frame is read into one allocation after
/// its first chunk, while a peer that announces a large frame cannot make a connection hold
/// more than about five times what it has sent.
const FRAME_AHEAD_FACTOR: usize = 4;

/// The unit of the last large frame's length as remembered ([`Connection::reserve_read`]):
/// lengths up to 255 units (1020 KiB) are told apart.
const READ_HINT_UNIT: usize = 4096;

/// How many frames as large as the last one a read makes room for, once the peer filled a
/// buffer again.
const READ_AHEAD_FRAMES: usize = 4;

/// The most room made at once on the strength of the last frame's size: frames of 256 KiB
/// and more get room for one.
const MAX_READ_ROOM: usize = 1 << 20;

/// Payloads up to this size are copied out of the read buffer rather than shared with it.
const SMALL_PAYLOAD: usize = 4096;

/// The header at the start of `buf` when it is whole and begins a message that
/// [`Connection::receive_lent`] can lend: one frame (FIN), no RSV bit, text or binary, masked
/// when `masked` (a server's peer) and not otherwise. Returns whether it is text, the masking
/// key, the header's length and the payload's. Anything else is `None` and left to
/// [`Connection::receive`], which delivers it or fails with the precise error.
#[inline]
fn lendable_header(buf: &[u8], masked: bool) -> Option<(bool, Option<[u8; 4]>, usize, u64)> {
    let [b0, b1, ..] = *buf else {
        return None;
    };
    let text = match b0 {
        0x81 => true,
        0x82 => false,
        _ => return None,
    };
    if (b1 & 0x80 != 0) != masked {
        return None;
    }
    let (len, mut at) = match b1 & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        // A length with its top bit set is over any limit: `receive` reports it.
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let key = if masked {
        let key: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    Some((text, key, at, len))
}

/// Whether [`Connection::receive`] copies a payload of `len` bytes out of a read buffer of
/// `capacity` (small ones, so that they do not keep the buffer alive) rather than splitting it
/// off; what it copies, [`Connection::receive_lent`] lends instead.
#[inline]
fn copied_out(len: usize, capacity: usize) -> bool {
    len <= SMALL_PAYLOAD || len < capacity / 8
}

/// A source of client masking keys.
pub type MaskSource = Box<dyn FnMut() -> [u8; 4] + Send>;

/// A WebSocket connection after the handshake, as a value: no I/O, no clock.
///
/// ```
/// use bytes::{Buf, BytesMut};
/// use tether_proto::{Connection, Event, Role};
///
/// let mut client = Connection::new(Role::Client);
/// let mut server = Connection::new(Role::Server);
/// client.send_text("hello".into()).unwrap();
///
/// // What the client would write to its socket, the server reads from its own.
/// let out = client.transmit();
/// let mut wire = BytesMut::from(out.copy_to_bytes(out.remaining()).as_ref());
/// server.receive(&mut wire).unwrap();
/// assert_eq!(server.poll_event(), Some(Event::Text("hello".into())));
/// ```
///
/// An idle connection is small (144 bytes on 64-bit targets) and, once what it queued is
/// written, a server's owns no heap memory: its write buffer goes back to the thread's stock
/// ([`crate::buffers`]), and what only some connections need is boxed on demand.
pub struct Connection {
    /// Limits and timers, shared with the other connections configured alike.
    settings: Arc<Settings>,
    out: Transmit,
    rx: Rx,
    message: Option<Assembly>,
    /// `None` until something in it is needed.
    extras: Option<Box<Extras>>,
    utf8: Utf8Validator,
    role: Role,
    state: State,
    auto_pong: bool,
    close_received: bool,
    /// Fragmented sending: whether a message we send is unfinished.
    sending_fragmented: bool,
    /// Whether messages that start now are delivered frame by frame.
    streaming: bool,
    /// When the running timer is due.
    deadline: Option<std::time::Instant>,
    /// Which timer runs.
    timer: Timer,
    /// How the connection ended, if abnormally.
    abnormal: Option<Abnormal>,
    /// Whether the transport has ended.
    eof: bool,
    /// Keepalive pings sent; the latest one's number is its payload.
    pings: u8,
    /// The length of the last frame received, in [`READ_HINT_UNIT`]s rounded up, when it was
    /// larger than a read buffer (0 otherwise): a peer that sends large frames gets room for
    /// several per read. (A byte: the connection stays within its size.)
    read_hint: u8,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("role", &self.role)
            .field("state", &self.state)
            .field("queued", &self.out.len())
            .field("error", &self.error())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A connection with default [`Settings`]; a client draws masking keys from a CSPRNG.
    pub fn new(role: Role) -> Self {
        static DEFAULT: OnceLock<Arc<Settings>> = OnceLock::new();
        Self::with_settings(role, DEFAULT.get_or_init(Arc::default).clone())
    }

    /// A connection with the given limits and default timers.
    pub fn with_limits(role: Role, limits: Limits) -> Self {
        Self::with_settings(role, Arc::new(Settings::default().limits(limits)))
    }

    /// A connection with the given settings, which a server shares among its connections.
    pub fn with_settings(role: Role, settings: Arc<Settings>) -> Self {
        let extras = match role {
            Role::Server => None,
            Role::Client => {
                let mut rng = rand::rngs::StdRng::from_os_rng();
                let mask: MaskSource = Box::new(move || {
                    let mut key = [0u8; 4];
                    rng.fill_bytes(&mut key);
                    key
                });
                Some(Box::new(Extras {
                    mask: Some(mask),
                    ..Extras::default()
                }))
            }
        };
        Connection {
            settings,
            out: Transmit::default(),
            rx: Rx::Idle,
            message: None,
            extras,
            utf8: Utf8Validator::new(),
            role,
            state: State::Open,
            auto_pong: true,
            close_received: false,
            sending_fragmented: false,
            streaming: false,
            deadline: None,
            timer: Timer::Off,
            abnormal: None,
            eof: false,
            pings: 0,
            read_hint: 0,
        }
    }

    fn extras(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }

    fn deflate(&self) -> Option<&Deflate> {
        self.extras.as_ref()?.deflate.as_ref()
    }

    fn deflate_mut(&mut self) -> Option<&mut Deflate> {
        self.extras.as_mut()?.deflate.as_mut()
    }

    /// Forgets the data of the message being received.
    fn drop_message(&mut self) {
        self.message = None;
        if let Some(extras) = self.extras.as_mut() {
            extras.data = Vec::new();
            extras.inflating = None;
        }
    }

    /// Frees `extras` once nothing in it is needed (after a fragmented message).
    fn release_extras(&mut self) {
        if self.extras.as_ref().is_some_and(|x| x.is_unused()) {
            self.extras = None;
        }
    }

    /// Replaces the client's masking key source (for deterministic tests and fuzzing).
    /// Ignored for a server, which never masks.
    pub fn set_mask_source(&mut self, source: MaskSource) {
        if self.role == Role::Client {
            self.extras().mask = Some(source);
        }
    }

    /// Turns on permessage-deflate with what the handshake agreed (see
    /// [`crate::extension::deflate`]): RSV1 becomes legal on the first frame of a message,
    /// such messages are inflated, and messages of at least the threshold are sent compressed.
    pub fn set_deflate(&mut self, deflate: Deflate) {
        self.extras().deflate = Some(deflate);
    }

    /// Whether permessage-deflate is in use.
    pub fn deflate_enabled(&self) -> bool {
        self.deflate().is_some()
    }

    /// Whether data messages that start from now on are delivered frame by frame, as
    /// [`Event::Fragment`]s, instead of whole (default `false`): a receiver can then pass on a
    /// message of any size holding one frame of it at a time (a compressed frame is inflated a
    /// piece of `max_frame_size` at a time, however far it inflates). Limits still hold: each
    /// frame within `max_frame_size`, the message (as received, so compressed for a compressed one)
    /// within `max_message_size` and `max_message_fragments`. A message already started
    /// keeps the way it started with.
    #[inline]
    pub fn set_streaming(&mut self, on: bool) {
        self.streaming = on;
    }

    /// Whether data messages that start now are delivered frame by frame.
    #[inline]
    pub fn is_streaming(&self) -> bool {
        self.streaming
    }

    /// Whether pings are answered automatically (default `true`).
    pub fn set_auto_pong(&mut self, on: bool) {
        self.auto_pong = on;
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.settings.limits
    }

    /// The settings in force.
    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    /// The closing state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the peer's Close has been received.
    pub fn close_received(&self) -> bool {
        self.close_received
    }

    /// Whether our Close has been queued (by [`Connection::send_close`], an echo, or a failure),
    /// or the connection has otherwise ended: nothing but a Pong may be sent.
    pub fn close_sent(&self) -> bool {
        self.state != State::Open
    }

    /// Whether the connection waits on its peer alone: open, nothing queued to write, no
    /// event waiting to be taken and nothing left to inflate. With its read buffer empty, such
    /// a connection makes progress only when bytes arrive or its deadline
    /// ([`Connection::poll_timeout`]) passes, so a driver may set it aside until then (a
    /// message or frame half received stays where it was).
    pub fn is_at_rest(&self) -> bool {
        self.state == State::Open
            && self.out.is_empty()
            && !matches!(self.rx, Rx::Event(_))
            && !self.is_inflating()
    }

    /// The protocol error that failed the connection, if any.
    pub fn error(&self) -> Option<&ProtocolError> {
        self.extras.as_ref()?.error.as_ref()
    }

    /// Parses frames from the front of `buf` until one yields an event or more bytes are
    /// needed, consuming what it parses.
    ///
    /// Call it after every read, with everything received and not yet consumed (bytes that
    /// followed the handshake first), and again whenever [`Connection::poll_event`] runs dry
    /// while `buf` still holds bytes: parsing stops at each event so that the application
    /// answers a message before a later frame in the same read can fail the connection.
    /// Automatic answers (pong, close echo) are queued for [`Connection::transmit`]. A partial
    /// frame stays in `buf`: its payload is unmasked and, for text, UTF-8-validated as it
    /// arrives, so invalid text fails without waiting for the rest. After the peer's Close,
    /// further bytes are discarded, as they are once the connection ended abnormally
    /// ([`Connection::abnormal`]).
    ///
    /// # Errors
    /// The [`ProtocolError`] that failed the connection. A Close carrying its code is queued;
    /// write it out, then close the transport. The same error is returned on later calls.
    pub fn receive(&mut self, buf: &mut BytesMut) -> Result<(), ProtocolError> {
        if let Some(err) = self.error() {
            return Err(err.clone());
        }
        loop {
            if self.discards_input() {
                buf.clear();
                return Ok(());
            }
            if matches!(self.rx, Rx::Event(_)) {
                return Ok(());
            }
            match self.step(buf) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(err) => {
                    self.fail(err.clone());
                    return Err(err);
                }
            }
        }
    }

    /// Lends every data message that is whole in `buf` as one frame to `f`, in order,
    /// without copying it out, and consumes it once `f` returns; the connection is handed to
    /// `f` so that it can queue answers (`f` may call the `send_*` methods, including
    /// [`Connection::send_lent`], whose copy into the outgoing buffer is then the only one).
    ///
    /// It stops, leaving the rest of `buf` as it is, at the first thing it does not lend: a
    /// control frame, a fragment, a compressed message, a frame not received whole, one that
    /// breaks a limit or the protocol, a payload that [`Connection::receive`] would hand out
    /// without a copy (over 4 KiB and an eighth of the buffer: sharing it costs less than
    /// copying it into an answer), or anything at all while a message is in progress, an
    /// event is pending, streaming is on ([`Connection::set_streaming`]) or the connection is
    /// closing after the peer's Close: call [`Connection::receive`] and
    /// [`Connection::poll_event`] then, as usual, which deliver it or fail with the precise
    /// error. It also stops after a message for which `f` returns
    /// [`ControlFlow::Break`](std::ops::ControlFlow::Break). Returns how many messages were
    /// lent. Lent messages are checked exactly as [`Connection::receive`] checks them.
    ///
    /// # Errors
    /// [`ProtocolError::InvalidUtf8`] for a text message that is not UTF-8 (a Close carrying its
    /// code is queued, as with [`Connection::receive`]), and the error that failed the
    /// connection earlier.
    pub fn receive_lent<F>(&mut self, buf: &mut BytesMut, mut f: F) -> Result<usize, ProtocolError>
    where
        F: FnMut(&mut Connection, Lent<'_>) -> std::ops::ControlFlow<()>,
    {
        if let Some(err) = self.error() {
            return Err(err.clone());
        }
        let limits = &self.settings.limits;
        let limit = limits.max_frame_size.min(limits.max_message_size) as u64;
        let masked = self.role == Role::Server;
        let mut lent = 0;
        // What was lent is consumed at the end, with one `advance`.
        let mut used = 0;
        while matches!(self.rx, Rx::Idle)
            && self.message.is_none()
            && !self.streaming
            && !self.discards_input()
            && !self.is_inflating()
        {
            let Some((text, key, at, len)) = lendable_header(&buf[used..], masked) else {
                break;
            };
            if len > limit || len > (buf.len() - used - at) as u64 {
                break;
            }
            let start = used + at;
            let len = len as usize;
            if !copied_out(len, buf.capacity()) {
                // `receive` hands this one out without a copy: an answer can share it.
                break;
            }
            let payload = &mut buf[start..start + len];
            if let Some(key) = key {
                apply_mask(payload, key, 0);
            }
            self.read_hint = if len > crate::buffers::BUFFER {
                u8::try_from(len.div_ceil(READ_HINT_UNIT)).unwrap_or(u8::MAX)
            } else {
                0
            };
            let message = if text {
                match crate::utf8::whole_str(payload) {
                    Ok(text) => Lent::Text(text),
                    Err(_) => {
                        // What `receive` does with the same frame; its header is consumed.
                        buf.advance(start);
                        self.fail(ProtocolError::InvalidUtf8);
                        return Err(ProtocolError::InvalidUtf8);
                    }
                }
            } else {
                Lent::Binary(payload)
            };
            let flow = f(self, message);
            used = start + len;
            lent += 1;
            if flow.is_break() {
                break;
            }
        }
        buf.advance(used);
        Ok(lent)
    }

    /// Whether [`Connection::receive`] could make progress on `buf` without more bytes:
    /// `buf` holds bytes beyond the partial frame already examined.
    pub fn wants_receive(&self, buf: &BytesMut) -> bool {
        if self.discards_input() || self.error().is_some() {
            return false;
        }
        match &self.rx {
            Rx::Frame(frame) => buf.len() > frame.seen,
            // More of a frame to inflate, or a whole header (or a bad one) is buffered; a
            // partial header needs more bytes.
            Rx::Idle | Rx::Event(_) => {
                self.is_inflating()
                    || FrameHeader::len_at(buf).is_some_and(|n| {
                        buf.len() >= n || OpCode::from_bits(buf[0] & 0x0f).is_none()
                    })
            }
        }
    }

    /// Makes room in `buf` for the next read, suited to what this connection expects: a
    /// buffer from the thread's stock ([`crate::buffers`]) when `buf` is empty and has
    /// little room; room for the rest of a large frame whose header is in, at once rather
    /// than read by read, but at most four times what is buffered (a peer announcing a large
    /// frame cannot make the buffer grow much past what it sent); when the last frame was
    /// larger than a buffer and the peer filled one again, room for four frames of that size
    /// (at most 1 MiB), so that a stream of large frames takes one read for several; a
    /// buffer's worth otherwise. A driver that frees `buf` whenever it waits with nothing in
    /// it (giving it back with [`crate::buffers::give`]) holds no read memory while idle.
    pub fn reserve_read(&self, buf: &mut BytesMut) {
        const CHUNK: usize = crate::buffers::BUFFER;
        if buf.is_empty() && buf.capacity() < CHUNK / 4 {
            // Nothing buffered and no room worth reading into (none after an idle wait, a
            // little left from the handshake): a spare buffer rather than growing this one.
            *buf = crate::buffers::take();
        }
        if buf.capacity() - buf.len() >= CHUNK / 4 {
            return;
        }
        let missing = self.frame_missing(buf);
        let ahead = buf.len().saturating_mul(FRAME_AHEAD_FACTOR);
        let mut room = missing.min(ahead).max(CHUNK);
        let hint = usize::from(self.read_hint) * READ_HINT_UNIT;
        if hint > CHUNK && buf.len() >= CHUNK / 2 {
            // A peer whose last frame was large filled a buffer again: room for a few more
            // such frames in one read, so that a stream of them costs a read for several,
            // not two for each (the first chunk, then the rest).
            room = room.max((READ_AHEAD_FRAMES * (hint + FrameHeader::MAX_LEN)).min(MAX_READ_ROOM));
        }
        buf.reserve(room);
    }

    /// Whether received bytes are passed over: after the peer's Close, or once the connection
    /// ended abnormally (a timeout, or the transport's end mid-frame).
    fn discards_input(&self) -> bool {
        self.close_received || self.abnormal.is_some()
    }

    /// How many bytes past the end of `buf` the frame being received still needs. Zero
    /// between frames.
    pub(crate) fn frame_missing(&self, buf: &BytesMut) -> usize {
        match &self.rx {
            Rx::Frame(frame) if !self.close_received => frame.len().saturating_sub(buf.len()),
            _ => 0,
        }
    }

    fn emit(&mut self, event: Event) {
        debug_assert!(matches!(self.rx, Rx::Idle), "receive stops at every event");
        self.rx = Rx::Event(event);
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        // Only an event is taken out: the usual "nothing yet" costs no move and no drop.
        if !matches!(self.rx, Rx::Event(_)) {
            return None;
        }
        match std::mem::replace(&mut self.rx, Rx::Idle) {
            Rx::Event(event) => Some(event),
            _ => unreachable!("checked above"),
        }
    }

    /// The bytes waiting to be written: a [`Buf`] to write (vectored) and advance.
    pub fn transmit(&mut self) -> &mut Transmit {
        &mut self.out
    }

    /// Queued outbound bytes (for backpressure).
    pub fn queued_len(&self) -> usize {
        self.out.len()
    }

    /// Queues a text message as one frame.
    ///
    /// # Errors
    /// [`SendError::Closed`] after a Close was sent.
    pub fn send_text(&mut self, text: Utf8Bytes) -> Result<(), SendError> {
        self.send_message(OpCode::Text, text.into_bytes())
    }

    /// Queues a binary message as one frame.
    ///
    /// # Errors
    /// [`SendError::Closed`] after a Close was sent.
    pub fn send_binary(&mut self, data: Bytes) -> Result<(), SendError> {
        self.send_message(OpCode::Binary, data)
    }

    /// Queues a message from borrowed bytes, as one frame: a lent message echoed, or any text
    /// or binary the caller holds as a slice. The payload is copied into the outgoing buffer
    /// (or compressed into it), so no `Bytes` is made for it.
    ///
    /// # Errors
    /// [`SendError::Closed`] after a Close was sent.
    pub fn send_lent(&mut self, message: Lent<'_>) -> Result<(), SendError> {
        self.check_can_send()?;
        let (opcode, payload) = match message {
            Lent::Text(text) => (OpCode::Text, text.as_bytes()),
            Lent::Binary(data) => (OpCode::Binary, data),
        };
        match self.deflate_mut() {
            Some(deflate) if deflate.should_compress(payload.len()) => {
                let compressed = deflate.compress(payload);
                self.queue_frame_rsv(opcode, true, RSV1, compressed);
            }
            _ => self.queue_copied(opcode, payload),
        }
        Ok(())
    }

    /// Queues one fragment of a message: `opcode` is [`OpCode::Text`] or [`OpCode::Binary`]
    /// for the first fragment and [`OpCode::Continuation`] after; `fin` ends the message.
    /// Text fragments may split a code point; the receiver validates the whole message.
    ///
    /// # Errors
    /// [`SendError::FragmentOrder`] for a continuation outside a message or a new message
    /// inside one; [`SendError::Closed`] after a Close was sent.
    pub fn send_fragment(
        &mut self,
        opcode: OpCode,
        payload: Bytes,
        fin: bool,
    ) -> Result<(), SendError> {
        if self.state != State::Open {
            return Err(SendError::Closed);
        }
        match (opcode, self.sending_fragmented) {
            (OpCode::Continuation, true) | (OpCode::Text | OpCode::Binary, false) => {}
            _ => return Err(SendError::FragmentOrder),
        }
        self.sending_fragmented = !fin;
        self.queue_frame(opcode, fin, payload);
        Ok(())
    }

    /// Queues a ping (payload ≤ 125 bytes).
    ///
    /// # Errors
    /// [`SendError::ControlTooLong`], or [`SendError::Closed`] after a Close was sent.
    pub fn send_ping(&mut self, payload: Bytes) -> Result<(), SendError> {
        self.send_control(OpCode::Ping, payload)
    }

    /// Queues a pong (payload ≤ 125 bytes); an unsolicited pong is a valid heartbeat.
    ///
    /// # Errors
    /// [`SendError::ControlTooLong`], or [`SendError::Closed`] after a Close was sent.
    pub fn send_pong(&mut self, payload: Bytes) -> Result<(), SendError> {
        self.send_control(OpCode::Pong, payload)
    }

    /// Starts (or, after the peer's Close, completes) the close handshake.
    ///
    /// `None` sends a Close without status. The reason is cut to fit 123 bytes.
    ///
    /// # Errors
    /// [`SendError::InvalidCloseCode`] for a code that may not be sent;
    /// [`SendError::Closed`] if a Close was already sent.
    pub fn send_close(&mut self, frame: Option<CloseFrame>) -> Result<(), SendError> {
        if let Some(f) = &frame {
            if !f.code.is_sendable() {
                return Err(SendError::InvalidCloseCode(f.code.0));
            }
        }
        if self.state != State::Open {
            return Err(SendError::Closed);
        }
        self.queue_close(frame.as_ref());
        Ok(())
    }

    /// Queues a message prepared once for many connections: its payload, or its compressed
    /// form shared with every connection that compresses the same way (see
    /// [`Prepared`](crate::Prepared)), is sent without being copied or compressed again.
    ///
    /// # Errors
    /// [`SendError::Closed`] after a Close was sent; [`SendError::FragmentOrder`] inside a
    /// fragmented message.
    pub fn send_prepared(&mut self, message: &crate::Prepared) -> Result<(), SendError> {
        self.check_can_send()?;
        let (opcode, payload) = (message.opcode(), message.payload());
        match self.deflate_mut() {
            Some(deflate) if deflate.should_compress(payload.len()) => {
                let compressed = match deflate.fresh_per_message() {
                    Some(key) => message.compressed(deflate, key),
                    None => deflate.compress(payload),
                };
                self.queue_frame_rsv(opcode, true, RSV1, compressed);
            }
            _ => self.queue_frame(opcode, true, payload.clone()),
        }
        Ok(())
    }

    fn check_can_send(&self) -> Result<(), SendError> {
        if self.state != State::Open {
            return Err(SendError::Closed);
        }
        if self.sending_fragmented {
            return Err(SendError::FragmentOrder);
        }
        Ok(())
    }

    fn send_message(&mut self, opcode: OpCode, payload: Bytes) -> Result<(), SendError> {
        self.check_can_send()?;
        match self.deflate_mut() {
            Some(deflate) if deflate.should_compress(payload.len()) => {
                let compressed = deflate.compress(&payload);
                self.queue_frame_rsv(opcode, true, RSV1, compressed);
            }
            _ => self.queue_frame(opcode, true, payload),
        }
        Ok(())
    }

    fn send_control(&mut self, opcode: OpCode, payload: Bytes) -> Result<(), SendError> {
        if payload.len() > MAX_CONTROL_PAYLOAD {
            return Err(SendError::ControlTooLong(payload.len()));
        }
        // After our Close only a Pong may follow: a Ping must be answered until the peer's
        // Close arrives (RFC 6455 §5.5.2).
        let allowed = match self.state {
            State::Open => true,
            State::Closing => opcode == OpCode::Pong,
            State::Closed => false,
        };
        if !allowed {
            return Err(SendError::Closed);
        }
        self.queue_frame(opcode, true, payload);
        Ok(())
    }

    fn queue_close(&mut self, frame: Option<&CloseFrame>) {
        let payload = frame.map(CloseFrame::encode).unwrap_or_default();
        self.queue_frame(OpCode::Close, true, payload);
        self.state = if self.close_received || self.error().is_some() {
            State::Closed
        } else {
            State::Closing
        };
    }

    /// Encodes one frame into the transmit queue.
    fn queue_frame(&mut self, opcode: OpCode, fin: bool, payload: Bytes) {
        self.queue_frame_rsv(opcode, fin, 0, payload);
    }

    /// Encodes one frame with reserved bits `rsv` into the transmit queue.
    fn queue_frame_rsv(&mut self, opcode: OpCode, fin: bool, rsv: u8, payload: Bytes) {
        let mask = self.encode_header(opcode, fin, rsv, payload.len());
        match mask {
            Some(key) => self.out.tail_masked(&payload, key),
            None => self.out.push_shared(payload),
        }
    }

    /// Queues a whole, uncompressed frame copied from `payload`.
    fn queue_copied(&mut self, opcode: OpCode, payload: &[u8]) {
        if self.role == Role::Server && payload.len() <= 125 {
            // The usual small answer: a two-byte header, never masked.
            self.out.provide(crate::buffers::take);
            let tail = self.out.tail();
            tail.reserve(2 + payload.len());
            tail.put_u16(u16::from_be_bytes([
                0x80 | opcode.bits(),
                payload.len() as u8,
            ]));
            tail.extend_from_slice(payload);
            return;
        }
        match self.encode_header(opcode, true, 0, payload.len()) {
            Some(key) => self.out.tail_masked(payload, key),
            None => self.out.tail().extend_from_slice(payload),
        }
    }

    /// Appends a frame's header to the outgoing buffer (taking one from the thread's stock if
    /// it has none), with a fresh masking key for a client; returns the key.
    #[inline]
    fn encode_header(&mut self, opcode: OpCode, fin: bool, rsv: u8, len: usize) -> Option<[u8; 4]> {
        let mask = self
            .extras
            .as_mut()
            .and_then(|x| x.mask.as_mut())
            .map(|source| source());
        let header = FrameHeader {
            fin,
            rsv,
            opcode,
            mask,
            payload_len: len as u64,
        };
        self.out.provide(crate::buffers::take);
        header.encode(self.out.tail());
        mask
    }

    /// Fails the connection: queues a Close with the error's code, keeps the error.
    fn fail(&mut self, err: ProtocolError) {
        let code = err.close_code();
        self.extras().error = Some(err);
        self.stop_receiving();
        if self.state == State::Open {
            self.queue_close(Some(&CloseFrame::new(code, "")));
        }
        self.state = State::Closed;
    }

    /// Whether a compressed frame of a streamed message has more to inflate.
    fn is_inflating(&self) -> bool {
        self.extras.as_ref().is_some_and(|x| x.inflating.is_some())
    }

    /// Makes progress on one frame. `Ok(true)`: a frame (or a piece of one) completed;
    /// `Ok(false)`: need more bytes.
    fn step(&mut self, buf: &mut BytesMut) -> Result<bool, ProtocolError> {
        if self.is_inflating() {
            self.inflate_piece()?;
            return Ok(true);
        }
        // A new frame's header stays in `buf` (`at` bytes) until the frame is whole or known
        // to be partial: a frame that arrived whole is consumed with one `advance`.
        let (mut frame, at) = match self.rx {
            Rx::Frame(frame) => {
                self.rx = Rx::Idle;
                (frame, 0)
            }
            Rx::Idle | Rx::Event(_) => {
                let Some((header, header_len)) = FrameHeader::parse(buf)? else {
                    return Ok(false);
                };
                self.check_header(&header)?;
                (InFrame { header, seen: 0 }, header_len)
            }
        };
        let len = frame.len();
        let available = (buf.len() - at).min(len);
        if available > frame.seen {
            let fresh = &mut buf[at + frame.seen..at + available];
            if let Some(key) = frame.header.mask {
                apply_mask(fresh, key, frame.seen);
            }
            if self.is_text_payload(frame.header.opcode) {
                self.utf8
                    .feed(fresh)
                    .map_err(|_| ProtocolError::InvalidUtf8)?;
            }
            frame.seen = available;
        }
        if frame.seen < len {
            buf.advance(at);
            self.rx = Rx::Frame(frame);
            return Ok(false);
        }
        self.read_hint = if len > crate::buffers::BUFFER {
            u8::try_from(len.div_ceil(READ_HINT_UNIT)).unwrap_or(u8::MAX)
        } else {
            0
        };
        // Large payloads are handed out without a copy; small ones are copied so that they do
        // not keep a whole read buffer (possibly megabytes) alive for as long as they live.
        let payload = if copied_out(len, buf.capacity()) {
            let small = Bytes::copy_from_slice(&buf[at..at + len]);
            buf.advance(at + len);
            small
        } else {
            buf.advance(at);
            buf.split_to(len).freeze()
        };
        self.on_frame(frame.header, payload)?;
        Ok(true)
    }

    fn is_text_payload(&self, opcode: OpCode) -> bool {
        match opcode {
            OpCode::Text | OpCode::Continuation => self
                .message
                .as_ref()
                .is_some_and(|m| m.text && !m.compressed),
            _ => false,
        }
    }

    /// Checks a header against the role, the fragmentation state and the limits, and starts
    /// message assembly for a new data frame.
    fn check_header(&mut self, h: &FrameHeader) -> Result<(), ProtocolError> {
        // RSV1 belongs to permessage-deflate, and only on a message's first frame.
        let allowed = match h.opcode {
            OpCode::Text | OpCode::Binary if self.deflate().is_some() => RSV1,
            _ => 0,
        };
        if h.rsv & !allowed != 0 {
            return Err(ProtocolError::ReservedBits(h.rsv));
        }
        match (self.role, h.mask.is_some()) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedFrame),
            (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
            _ => {}
        }
        if h.opcode.is_control() {
            if !h.fin {
                return Err(ProtocolError::FragmentedControl);
            }
            if h.payload_len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(ProtocolError::ControlTooLong(h.payload_len));
            }
            return Ok(());
        }
        let limits = &self.settings.limits;
        if h.payload_len > limits.max_frame_size as u64 {
            return Err(ProtocolError::FrameTooLarge {
                size: h.payload_len,
                limit: limits.max_frame_size,
            });
        }
        let len = h.payload_len as usize;
        let max_message = limits.max_message_size;
        let max_frames = limits.max_message_fragments;
        match (h.opcode, &mut self.message) {
            (OpCode::Continuation, None) => Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Continuation, Some(m)) => {
                m.frames = m.frames.saturating_add(1);
                if m.frames > max_frames {
                    return Err(ProtocolError::TooManyFragments { limit: max_frames });
                }
                m.len = m.len.saturating_add(len);
                if m.len > max_message {
                    return Err(ProtocolError::MessageTooLarge { limit: max_message });
                }
                Ok(())
            }
            (_, Some(_)) => Err(ProtocolError::ExpectedContinuation),
            (opcode, None) => {
                if len > max_message {
                    return Err(ProtocolError::MessageTooLarge { limit: max_message });
                }
                self.utf8 = Utf8Validator::new();
                self.message = Some(Assembly {
                    text: opcode == OpCode::Text,
                    compressed: h.rsv & RSV1 != 0,
                    streamed: self.streaming,
                    frames: 1,
                    started: false,
                    len,
                });
                Ok(())
            }
        }
    }

    fn on_frame(&mut self, h: FrameHeader, payload: Bytes) -> Result<(), ProtocolError> {
        match h.opcode {
            OpCode::Ping => {
                if self.auto_pong && self.state != State::Closed {
                    self.queue_frame(OpCode::Pong, true, payload.clone());
                }
                self.emit(Event::Ping(payload));
            }
            OpCode::Pong => {
                self.on_pong(&payload);
                self.emit(Event::Pong(payload));
            }
            OpCode::Close => self.on_close(&payload)?,
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                let Some(message) = self.message else {
                    return Err(ProtocolError::UnexpectedContinuation);
                };
                if message.compressed {
                    return self.on_compressed_frame(h.fin, payload);
                }
                if message.streamed {
                    return self.deliver_piece(message, payload, h.fin);
                }
                if !h.fin {
                    self.extras().data.extend_from_slice(&payload);
                    return Ok(());
                }
                self.message = None;
                let data = match self.extras.as_mut() {
                    Some(extras) if !extras.data.is_empty() => {
                        let mut data = std::mem::take(&mut extras.data);
                        data.extend_from_slice(&payload);
                        self.release_extras();
                        Bytes::from(data)
                    }
                    _ => payload,
                };
                self.deliver(message.text, data)?;
            }
        }
        Ok(())
    }

    /// Queues a complete message; text must end on a code point boundary.
    fn deliver(&mut self, text: bool, data: Bytes) -> Result<(), ProtocolError> {
        let event = if text {
            self.utf8.finish().map_err(|_| ProtocolError::InvalidUtf8)?;
            Event::Text(Utf8Bytes::from_validated(data))
        } else {
            Event::Binary(data)
        };
        self.emit(event);
        Ok(())
    }

    /// Delivers one frame of a streamed message; the last one ends the message, once its text
    /// proves whole.
    fn deliver_piece(
        &mut self,
        message: Assembly,
        data: Bytes,
        fin: bool,
    ) -> Result<(), ProtocolError> {
        if fin {
            self.message = None;
            if message.text {
                self.utf8.finish().map_err(|_| ProtocolError::InvalidUtf8)?;
            }
        } else if let Some(m) = self.message.as_mut() {
            m.started = true;
        }
        self.emit(Event::Fragment {
            text: message.text,
            first: !message.started,
            data,
            fin,
        });
        Ok(())
    }

    /// Inflates one frame of a compressed message; the last one completes the message.
    fn on_compressed_frame(&mut self, fin: bool, payload: Bytes) -> Result<(), ProtocolError> {
        let limit = self.settings.limits.max_message_size;
        let (Some(message), Some(extras)) = (self.message, self.extras.as_deref_mut()) else {
            return Err(ProtocolError::ReservedBits(RSV1));
        };
        if message.streamed {
            extras.inflating = Some(Inflating {
                payload,
                used: 0,
                fin,
                tail_used: 0,
            });
            return self.inflate_piece();
        }
        let Some(deflate) = extras.deflate.as_mut() else {
            return Err(ProtocolError::ReservedBits(RSV1));
        };
        let before = extras.data.len();
        deflate.inflate(&payload, fin, &mut extras.data, limit)?;
        if message.text {
            self.utf8
                .feed(&extras.data[before..])
                .map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        if !fin {
            return Ok(());
        }
        self.message = None;
        let data = std::mem::take(&mut extras.data);
        self.deliver(message.text, Bytes::from(data))
    }

    /// Inflates and delivers the next piece of a compressed frame of a streamed message: at
    /// most `max_frame_size` bytes, as an uncompressed frame's piece would be, so that a frame
    /// that inflates to gigabytes costs the receiver one piece at a time.
    fn inflate_piece(&mut self) -> Result<(), ProtocolError> {
        let cap = self.settings.limits.max_frame_size.max(1);
        let (Some(message), Some(extras)) = (self.message, self.extras.as_deref_mut()) else {
            return Err(ProtocolError::ReservedBits(RSV1));
        };
        let Extras {
            deflate: Some(deflate),
            inflating: Some(frame),
            data,
            ..
        } = extras
        else {
            return Err(ProtocolError::ReservedBits(RSV1));
        };
        if frame.used < frame.payload.len() {
            frame.used += deflate.inflate_some(&frame.payload[frame.used..], data, cap)?;
        }
        let tail = &Deflate::TAIL;
        if frame.used == frame.payload.len() && frame.fin && data.len() < cap {
            frame.tail_used += deflate.inflate_some(&tail[frame.tail_used..], data, cap)?;
        }
        let done =
            frame.used == frame.payload.len() && (!frame.fin || frame.tail_used == tail.len());
        let fin = done && frame.fin;
        if done {
            extras.inflating = None;
            if fin {
                deflate.end_inflate();
            }
        }
        if message.text {
            self.utf8
                .feed(&extras.data)
                .map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        let data = Bytes::from(std::mem::take(&mut extras.data));
        self.deliver_piece(message, data, fin)
    }

    fn on_close(&mut self, payload: &[u8]) -> Result<(), ProtocolError> {
        let frame = CloseFrame::parse(payload).map_err(|e| match e {
            ClosePayloadError::Truncated => ProtocolError::TruncatedClose,
            ClosePayloadError::InvalidCode(code) => ProtocolError::InvalidCloseCode(code),
            ClosePayloadError::InvalidUtf8 => ProtocolError::InvalidUtf8,
        })?;
        self.close_received = true;
        self.drop_message();
        if self.state == State::Open {
            // Echo the status code (RFC 6455 §5.5.1); no status is echoed as no status.
            let echo = frame.as_ref().map(|f| CloseFrame::new(f.code, ""));
            self.queue_close(echo.as_ref());
        }
        self.state = State::Closed;
        self.emit(Event::Close(frame));
        Ok(())
    }
}

#[cfg(test)]
mod tests;
