//! The hub: who is subscribed to which channel on this node, and fan-out to them.
//!
//! It is channel-generic: a channel is a name, what its first subscriber says it is
//! ([`Kind`]: whether it has presence, whether its publications come from a stream of ids),
//! its subscribers and how far it was delivered. What a name means and how a publication is
//! encoded belong to its callers (node::rooms for rooms and polls); the hub knows outboxes,
//! [`Format`]s and prepared bytes. A subscriber speaks one of the wire's formats, and an event
//! is encoded once per format among a channel's subscribers, before the channel is locked for
//! the fan-out; the same bytes go to every subscriber of that format.
//!
//! Channels are spread over 16 maps, each behind its own lock: deliveries to channels on
//! different cores do not wait for each other.
//!
//! Every subscriber has a bounded outbound queue. Fan-out serializes an event once and hands
//! the same bytes to every queue (a push); a queue that is full marks its connection as
//! a slow consumer, which its task then closes with 1013. Fan-out never waits, so a slow reader
//! never slows the others, and memory per subscriber is bounded by the queue length.
//!
//! A queue whose session waits idle is *parked* ([`Outbox::park`]): instead of waking the
//! session, fan-out hands the queue to a drainer thread, which writes what waits in it straight
//! to the connection's socket.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{
    AtomicU64, AtomicU8, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use serde_json::value::RawValue;
use tether::Prepared;

use crate::engine::local::{Change, Member, MAX_INFOS};
use crate::metrics::Metrics;
pub use crate::wire::format::Format;

/// One event queued for a connection. `id` is the chat message id (0 for other events), so a
/// joining connection can skip live messages that its history already held.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The chat message id, or 0.
    pub id: u64,
    /// The subscription it came through ([`Subscription::id`]; 0 for a reply), so that a
    /// connection with several subscriptions on one outbox knows whose event it is.
    pub sub: u64,
    /// The encoded event, shared by every connection it goes to.
    pub msg: Arc<Prepared>,
}

impl Outgoing {
    /// The `id` of an event that ends its subscription ([`Hub::end_subscriptions`]): the
    /// session leaves the channel, and `msg` tells the client why. No publication has it.
    pub const ENDED: u64 = u64::MAX;
}

/// An event for a channel's subscribers: its publication id (or 0), and how to encode it in
/// each format. Each format is encoded at most once per fan-out: before the topic is locked
/// when the caller knew which formats its subscribers speak (`ready`), else on first need.
struct Fan<'a> {
    id: u64,
    encode: &'a dyn Fn(Format) -> Arc<Prepared>,
    ready: [Option<Arc<Prepared>>; 2],
}

impl<'a> Fan<'a> {
    fn new(id: u64, encode: &'a dyn Fn(Format) -> Arc<Prepared>) -> Fan<'a> {
        Fan {
            id,
            encode,
            ready: [None, None],
        }
    }

    /// The event, encoded now in each format of `speaks` ([`Peers::speaks`]).
    fn encoded(id: u64, encode: &'a dyn Fn(Format) -> Arc<Prepared>, speaks: [bool; 2]) -> Self {
        Fan {
            id,
            encode,
            ready: Format::ALL.map(|f| speaks[f as usize].then(|| encode(f))),
        }
    }
}

/// Why the hub ended a connection's place in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its queue overflowed: it fell too far behind (close 1013).
    Slow,
    /// The room's stream was lost and started again (a new epoch): what the client holds no
    /// longer matches the ids, so it reconnects and resumes from what storage has now (1012).
    Reset,
    /// The server ended this user's connections ([`Hub::disconnect_user`]); the client should
    /// not come back by itself.
    Disconnected,
    /// The server ended this user's connections and asks the client to connect again (its
    /// rights or identity changed).
    Reconnect,
}

/// How fan-out writes to a parked connection ([`Outbox::park`]): straight into its socket.
pub type Direct = tether::DirectWriter<tether::upgrade::UpgradedIo>;

/// What an outbox holds under its lock.
#[derive(Debug)]
struct Queue {
    events: VecDeque<Outgoing>,
    /// The session waiting for events or for the verdict.
    waker: Option<Waker>,
    /// Events queued at most; a push past it makes the connection a slow consumer.
    cap: u32,
    /// The session waits with nothing to write: fan-out writes to its socket directly
    /// ([`Outbox::direct`]).
    parked: bool,
    /// The public information the connection attached (`connect {info}`): others see it in
    /// presence. (Boxed twice: a thin pointer, as most connections attach none.)
    info: Option<Box<Box<RawValue>>>,
    /// Handed to the drainer, which has not taken it yet.
    scheduled: bool,
    /// The drainer gave the parked session back its events, or left bytes in its socket:
    /// it must come and write.
    kicked: bool,
}

/// A connection's outbound queue and the hub's verdict on it, shared by the hub (which pushes)
/// and the connection's session (which takes). An idle queue holds no buffer: it grows while
/// events wait and is let go once drained, so an idle connection costs this struct alone
/// (tokio's bounded channel keeps a 32-slot block or two for good).
///
/// A session that waits with nothing to write may *park* its outbox with a writer to its
/// socket ([`Outbox::park`]). Fan-out then does not wake it: it hands the outbox to one of the
/// hub's drainer threads, which writes every event that waits straight into the socket, many
/// connections' in one pass, with no task scheduled. Whenever that cannot be done at once
/// (the socket is full, busy or closing), the drainer gives the events back to the session
/// and wakes it, and the session writes as usual, under its write timeout and queue limit.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    /// The session's socket, for fan-out to write to while the session is parked (set the
    /// first time it parks; outside the lock, so that a drainer can bring it into the cache
    /// ahead of its turn: [`Outbox::prefetch`]).
    direct: std::sync::OnceLock<Direct>,
    /// Whose connection it is (one allocation of the name for all its subscriptions).
    user: Arc<str>,
    /// 0: none; 1: slow; 2: reset; 3: disconnected; 4: reconnect.
    verdict: AtomicU8,
    /// How the connection speaks.
    format: Format,
}

/// Why an event was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl Outbox {
    fn new(cap: usize, user: Arc<str>, format: Format) -> Outbox {
        Outbox {
            queue: Mutex::new(Queue {
                events: VecDeque::new(),
                waker: None,
                cap: u32::try_from(cap).unwrap_or(u32::MAX),
                parked: false,
                info: None,
                scheduled: false,
                kicked: false,
            }),
            direct: std::sync::OnceLock::new(),
            user,
            format,
            verdict: AtomicU8::new(0),
        }
    }

    /// Queues `event` unless the queue is full.
    ///
    /// # Errors
    /// [`Full`]: `cap` events wait already.
    pub fn push(&self, event: Outgoing) -> Result<(), Full> {
        if self.queue(event)? {
            // Parked, but not through the drainer: the session takes it.
            self.kick();
        }
        Ok(())
    }

    /// Queues `event`; wakes the session unless it is parked. `Ok(true)`: parked, and the
    /// outbox is not yet in the drainer's hands.
    fn queue(&self, event: Outgoing) -> Result<bool, Full> {
        let waker = {
            let mut queue = lock(&self.queue);
            if queue.events.len() >= queue.cap as usize {
                return Err(Full);
            }
            queue.events.push_back(event);
            if queue.parked {
                return Ok(!std::mem::replace(&mut queue.scheduled, true));
            }
            queue.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(false)
    }

    /// Queues `event` for the session itself, past the cap (the hub's own events are few
    /// and bounded), and wakes it: a parked outbox is unparked first, so that the drainer
    /// does not write it (the session must see it, not only its bytes).
    fn hand_over(&self, event: Outgoing) {
        let waker = {
            let mut queue = lock(&self.queue);
            queue.events.push_back(event);
            queue.parked = false;
            queue.kicked = true;
            queue.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Wakes the session, if it waits.
    fn wake(&self) {
        let waker = lock(&self.queue).waker.take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Parks the outbox while its session waits with nothing to write: until
    /// [`Outbox::unpark`], fan-out writes its events to the socket through `direct` (asked
    /// for the first time only: a connection has one socket) instead of waking it. Refused
    /// (`false`) when events wait: the session takes them first.
    pub fn park(&self, direct: impl FnOnce() -> Direct) -> bool {
        self.direct.get_or_init(direct);
        let mut queue = lock(&self.queue);
        if !queue.events.is_empty() || queue.kicked {
            return false;
        }
        queue.parked = true;
        true
    }

    /// Ends [`Outbox::park`]: from now on events wait for the session. Whatever the drainer
    /// wrote before this returns was written before anything the session writes next.
    pub fn unpark(&self) {
        let mut queue = lock(&self.queue);
        queue.parked = false;
        queue.kicked = false;
    }

    /// Ready when events wait or the drainer handed the parked session its work back
    /// ([`Outbox::take_all`] then takes the events; bytes may be left in the socket to
    /// flush). Otherwise the session is woken when that changes (or a verdict is given).
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut queue = lock(&self.queue);
        if !queue.events.is_empty() || std::mem::take(&mut queue.kicked) {
            return Poll::Ready(());
        }
        register(&mut queue.waker, cx);
        Poll::Pending
    }

    /// Unparks the session and wakes it to take over.
    fn kick(&self) {
        let waker = {
            let mut queue = lock(&self.queue);
            queue.parked = false;
            queue.kicked = true;
            queue.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The drainer's turn: writes every waiting event straight to the parked session's
    /// socket, or hands them back to the session when that cannot be done at once. Returns
    /// what the write did, or `None` when there was nothing to do (the session unparked).
    fn drain(&self) -> Option<tether::DirectSend> {
        let mut queue = lock(&self.queue);
        queue.scheduled = false;
        let (true, Some(direct)) = (queue.parked, self.direct.get()) else {
            // The session unparked since: it takes the events itself.
            return None;
        };
        if queue.events.is_empty() {
            return None;
        }
        let sent = direct.try_send(queue.events.iter().map(|e| &*e.msg));
        match sent {
            tether::DirectSend::Written => {
                // Written: an idle connection keeps no room for events.
                queue.events = VecDeque::new();
                return Some(sent);
            }
            // In the socket now; the session writes what the socket did not take.
            tether::DirectSend::Queued => queue.events = VecDeque::new(),
            // The session writes them itself.
            tether::DirectSend::Declined => {}
        }
        queue.parked = false;
        queue.kicked = true;
        let waker = queue.waker.take();
        drop(queue);
        if let Some(waker) = waker {
            waker.wake();
        }
        Some(sent)
    }

    /// Reads the outbox's first bytes, so that the next touch finds them in the cache: a
    /// loop over thousands of outboxes, whose state is long out of the cache when a
    /// publication comes, reads a few ahead at once, and their cache misses overlap instead
    /// of coming one after the other.
    fn prefetch(this: &Arc<Outbox>) {
        std::hint::black_box(Arc::strong_count(this));
        std::hint::black_box(this.verdict.load(Relaxed));
    }

    /// Reads the first bytes of its socket's state, as [`Outbox::prefetch`] its own.
    fn prefetch_direct(&self) {
        if let Some(direct) = self.direct.get() {
            direct.prefetch();
        }
    }

    /// Whose connection it is.
    pub fn user(&self) -> &Arc<str> {
        &self.user
    }

    /// Attaches the connection's public information (once: later calls change nothing).
    pub fn set_info(&self, info: Box<RawValue>) {
        lock(&self.queue).info.get_or_insert_with(|| Box::new(info));
    }

    /// The connection's public information, if it attached some.
    pub fn info(&self) -> Option<Box<RawValue>> {
        lock(&self.queue).info.as_deref().cloned()
    }

    /// Whether the connection attached public information.
    pub fn has_info(&self) -> bool {
        lock(&self.queue).info.is_some()
    }

    /// The next event, if one waits.
    pub fn try_recv(&self) -> Option<Outgoing> {
        let mut queue = lock(&self.queue);
        let event = queue.events.pop_front();
        if queue.events.is_empty() && queue.events.capacity() > 0 {
            // Drained: an idle connection keeps no room for events.
            queue.events = VecDeque::new();
        }
        event
    }

    /// Every event that waits, taken at once (one lock for the lot).
    pub fn take_all(&self) -> VecDeque<Outgoing> {
        std::mem::take(&mut lock(&self.queue).events)
    }

    /// The next event; without one, the session is woken when one is queued (or a verdict
    /// given).
    pub fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Outgoing> {
        let mut queue = lock(&self.queue);
        match queue.events.pop_front() {
            Some(event) => {
                if queue.events.is_empty() && queue.events.capacity() > 0 {
                    // Drained: an idle connection keeps no room for events.
                    queue.events = VecDeque::new();
                }
                Poll::Ready(event)
            }
            None => {
                register(&mut queue.waker, cx);
                Poll::Pending
            }
        }
    }

    /// The hub's verdict on this connection, if it gave one.
    pub fn verdict(&self) -> Option<Verdict> {
        match self.verdict.load(Acquire) {
            0 => None,
            1 => Some(Verdict::Slow),
            2 => Some(Verdict::Reset),
            3 => Some(Verdict::Disconnected),
            _ => Some(Verdict::Reconnect),
        }
    }

    /// Whether the hub found this connection's queue full.
    pub fn is_slow(&self) -> bool {
        self.verdict() == Some(Verdict::Slow)
    }

    /// The hub's verdict; without one, the session is woken when it comes (or an event is
    /// queued).
    pub fn poll_verdict(&self, cx: &mut Context<'_>) -> Poll<Verdict> {
        if let Some(verdict) = self.verdict() {
            return Poll::Ready(verdict);
        }
        register(&mut lock(&self.queue).waker, cx);
        // A verdict given between the check and the registration woke nobody.
        match self.verdict() {
            Some(verdict) => Poll::Ready(verdict),
            None => Poll::Pending,
        }
    }

    fn mark(&self, verdict: Verdict) {
        let code = match verdict {
            Verdict::Slow => 1,
            Verdict::Reset => 2,
            Verdict::Disconnected => 3,
            Verdict::Reconnect => 4,
        };
        if self
            .verdict
            .compare_exchange(0, code, Release, Relaxed)
            .is_ok()
        {
            self.wake();
        }
    }
}

/// Keeps the waker of the task in `cx` in `slot` (cloned only when it changed).
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// A subscriber: its connection's outbox, which says who it is and how it speaks. A channel
/// of many subscribers holds 16 bytes for each (with its id).
#[derive(Debug)]
struct Peer {
    outbox: Arc<Outbox>,
}

/// Subscribers, and how many speak each format.
#[derive(Debug, Default)]
struct Peers {
    peers: HashMap<u64, Peer>,
    /// How many peers speak each format.
    formats: [u32; 2],
}

impl Peers {
    fn add(&mut self, id: u64, peer: Peer) {
        self.formats[peer.outbox.format as usize] += 1;
        if let Some(old) = self.peers.insert(id, peer) {
            self.formats[old.outbox.format as usize] -= 1;
        }
    }

    fn remove(&mut self, id: u64) -> Option<Peer> {
        let peer = self.peers.remove(&id)?;
        self.formats[peer.outbox.format as usize] -= 1;
        Some(peer)
    }

    /// Which formats its peers speak, in [`Format::ALL`] order.
    fn speaks(&self) -> [bool; 2] {
        self.formats.map(|n| n > 0)
    }

    /// Queues `event` to every peer (except `skip`; only those speaking `only`, if given);
    /// returns how many it reached.
    fn fan_out(
        &self,
        event: &Fan<'_>,
        skip: Option<u64>,
        only: Option<Format>,
        out: &Fanout,
    ) -> usize {
        // Encoded once per format, shared by every peer speaking it.
        let mut encoded = event.ready.clone();
        let mut reached = [0; 2];
        // Parked outboxes for the drainer.
        let mut drain = Vec::new();
        let mut peers = self.peers.iter();
        let mut chunk: [Option<(&u64, &Peer)>; PREFETCH] = [None; PREFETCH];
        loop {
            // A few peers' outboxes read at once (their cache misses overlap), then queued to.
            chunk.fill_with(|| peers.next());
            if chunk[0].is_none() {
                break;
            }
            for (_, peer) in chunk.iter().flatten() {
                Outbox::prefetch(&peer.outbox);
            }
            for &(id, peer) in chunk.iter().flatten() {
                if Some(*id) == skip
                    || only.is_some_and(|f| f != peer.outbox.format)
                    || peer.outbox.verdict().is_some()
                {
                    continue;
                }
                let format = peer.outbox.format;
                let slot = format as usize;
                let msg = encoded[slot].get_or_insert_with(|| (event.encode)(format));
                let outgoing = Outgoing {
                    id: event.id,
                    sub: *id,
                    msg: msg.clone(),
                };
                match peer.outbox.queue(outgoing) {
                    Ok(parked) => {
                        reached[slot] += 1;
                        if parked {
                            drain.push(peer.outbox.clone());
                        }
                    }
                    Err(Full) => {
                        tracing::warn!(user = %peer.outbox.user, "slow consumer: outbound queue full");
                        peer.outbox.mark(Verdict::Slow);
                    }
                }
            }
        }
        // Counted once per fan-out, not per subscriber: the counters are shared by every
        // thread, and a channel of thousands would make them a contended hot spot.
        for (msg, reached) in encoded.iter().zip(reached) {
            if let Some(msg) = msg {
                out.metrics.sent_many(reached, msg.payload().len());
            }
        }
        out.drain(drain);
        reached.iter().sum()
    }
}

/// What a channel is, as its first subscriber says ([`Hub::subscribe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Kind {
    /// Its users' comings and goings are told to its subscribers and shared with other
    /// nodes ([`Hub::on_presence`]), and it is listed ([`Hub::listed_page`]).
    pub presence: bool,
    /// Its publications come from a stream of ids in storage: the hub follows how far it
    /// delivered, tells when the channel gains its first subscriber or loses its last
    /// ([`Hub::on_interest`]), and resets it when the stream starts again
    /// ([`Hub::reset_streams`]).
    pub stream: bool,
}

#[derive(Debug)]
struct Topic {
    peers: Peers,
    kind: Kind,
    /// The last publication id delivered; older or repeated ids are dropped (several nodes,
    /// catch-up after a lost subscription).
    position: u64,
    /// Connections per user, for presence (a user joins with the first, leaves with the last).
    /// (A hash map: a B-tree's nodes cost a room of 100 about half as much again.)
    users: HashMap<Arc<str>, u32>,
}

impl Topic {
    fn new(kind: Kind) -> Topic {
        Topic {
            peers: Peers::default(),
            kind,
            position: 0,
            users: HashMap::new(),
        }
    }

    /// The distinct public information each user's connections attached, at most
    /// [`MAX_INFOS`] per user.
    fn infos(&self) -> HashMap<Arc<str>, Vec<Box<RawValue>>> {
        let mut infos: HashMap<Arc<str>, Vec<Box<RawValue>>> = HashMap::new();
        for peer in self.peers.peers.values() {
            let Some(info) = peer.outbox.info() else {
                continue;
            };
            let list = infos.entry(peer.outbox.user.clone()).or_default();
            if list.len() < MAX_INFOS && !list.iter().any(|i| i.get() == info.get()) {
                list.push(info);
            }
        }
        infos
    }

    /// Forgets what it delivered and tells its subscribers to start again.
    fn reset(&mut self) {
        self.position = 0;
        for peer in self.peers.peers.values() {
            peer.outbox.mark(Verdict::Reset);
        }
    }
}

/// Channels of more users than this stop telling joins and leaves, and a joiner learns how
/// many are there but not who: every join would otherwise cost a push to every member, and a
/// list of every member to the joiner, so filling a channel would cost the square of its size.
pub const PRESENCE_LIMIT: usize = 1000;

/// What the hub tells of a user's comings and goings in a channel with presence, for other
/// nodes: the channel, the user, what changed and the joining connection's public information.
pub type PresenceHook = Box<dyn Fn(&str, &str, Change, Option<&RawValue>) + Send + Sync>;

/// What the hub tells of a stream channel that gained its first subscriber or lost its last.
pub type InterestHook = Box<dyn Fn(&Arc<str>) + Send + Sync>;

/// Every channel subscribed on this node, by name, and fan-out to their subscribers. It
/// knows outboxes, formats and prepared bytes: what a channel's name means, and how a
/// publication is encoded, is its callers' (node::rooms).
pub struct Hub {
    /// By name; a name is one allocation shared with its subscribers' places.
    topics: Shards<Arc<str>, Topic>,
    /// The names of the channels with presence, in order: listing a page of them costs the
    /// page, not every channel (taken after a channel's shard when both are held).
    listed: Mutex<BTreeSet<Arc<str>>>,
    /// Every connection that takes what is sent to everyone by itself, not through its
    /// channels ([`Hub::broadcast`]).
    everyone: Mutex<Peers>,
    next_id: AtomicU64,
    queue_len: usize,
    /// Where local joins and leaves go to be shared with other nodes (cluster mode).
    presence: std::sync::OnceLock<PresenceHook>,
    /// Where stream channels that gain their first local subscriber or lose their last one
    /// go (cluster mode: the node listens to a room's Redis channels only while it has
    /// members).
    interest: std::sync::OnceLock<InterestHook>,
    out: Fanout,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("listed", &lock(&self.listed).len())
            .field("queue_len", &self.queue_len)
            .finish_non_exhaustive()
    }
}

/// What fan-out reports to and hands parked outboxes to.
#[derive(Debug)]
struct Fanout {
    metrics: Arc<Metrics>,
    /// Drainer threads: one per worker thread of the runtime, so that direct writes spread
    /// over as many cores as the sessions' own would.
    drainers: usize,
    /// Their inboxes, once one was needed.
    inboxes: std::sync::OnceLock<Vec<Inbox>>,
    /// Where a short list goes next.
    next: AtomicUsize,
}

/// Where a drainer thread takes parked outboxes from.
type Inbox = std::sync::mpsc::Sender<Vec<Arc<Outbox>>>;

/// Parked outboxes fewer than this go to one drainer, not split among them.
const DRAIN_SPLIT: usize = 256;

/// Outboxes whose state a fan-out or drainer reads ahead at once ([`Outbox::prefetch`]).
const PREFETCH: usize = 8;

impl Fanout {
    fn new(metrics: Arc<Metrics>) -> Fanout {
        // Inside the server's runtime, as many as it has workers; one otherwise.
        let drainers =
            tokio::runtime::Handle::try_current().map_or(1, |rt| rt.metrics().num_workers());
        Fanout {
            metrics,
            drainers: drainers.max(1),
            inboxes: std::sync::OnceLock::new(),
            next: AtomicUsize::new(0),
        }
    }

    /// Hands `outboxes` (parked, each once) to the drainer threads, started on first need;
    /// they end when the hub is dropped.
    fn drain(&self, mut outboxes: Vec<Arc<Outbox>>) {
        if outboxes.is_empty() {
            return;
        }
        let inboxes = self.inboxes.get_or_init(|| {
            (0..self.drainers)
                .map(|i| spawn_drainer(i, self.metrics.clone()))
                .collect()
        });
        let n = inboxes.len();
        if n == 1 || outboxes.len() < DRAIN_SPLIT {
            let i = self.next.fetch_add(1, Relaxed) % n;
            return send(&inboxes[i], outboxes);
        }
        let chunk = outboxes.len().div_ceil(n);
        for inbox in inboxes {
            let part = outboxes.split_off(outboxes.len().saturating_sub(chunk));
            if !part.is_empty() {
                send(inbox, part);
            }
        }
    }
}

/// Gives `outboxes` to a drainer; should it be gone, their sessions are woken instead.
fn send(inbox: &Inbox, outboxes: Vec<Arc<Outbox>>) {
    if let Err(std::sync::mpsc::SendError(outboxes)) = inbox.send(outboxes) {
        for outbox in outboxes {
            outbox.kick();
        }
    }
}

/// Starts drainer thread `i`: each pass writes everything handed to it since the last.
fn spawn_drainer(i: usize, metrics: Arc<Metrics>) -> Inbox {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<Arc<Outbox>>>();
    let spawned = std::thread::Builder::new()
        .name(format!("tether-fanout-{i}"))
        .spawn(move || {
            while let Ok(mut batch) = rx.recv() {
                while let Ok(more) = rx.try_recv() {
                    batch.extend(more);
                }
                let (mut writes, mut handbacks) = (0, 0);
                for chunk in batch.chunks(PREFETCH) {
                    // Each outbox's state, then its socket's, for a few at once (their
                    // cache misses overlap), then the writes.
                    chunk.iter().for_each(Outbox::prefetch);
                    chunk.iter().for_each(|outbox| outbox.prefetch_direct());
                    for outbox in chunk {
                        let sent = outbox.drain();
                        writes += u64::from(matches!(
                            sent,
                            Some(tether::DirectSend::Written | tether::DirectSend::Queued)
                        ));
                        handbacks += u64::from(matches!(
                            sent,
                            Some(tether::DirectSend::Queued | tether::DirectSend::Declined)
                        ));
                    }
                }
                metrics.direct_writes.fetch_add(writes, Relaxed);
                metrics.direct_handbacks.fetch_add(handbacks, Relaxed);
            }
        });
    if let Err(e) = spawned {
        // Its inbox is closed with it: parked sessions are woken as usual (`send`).
        tracing::error!(error = %e, "a fan-out drainer thread could not start");
    }
    tx
}

/// A connection's place in a channel: its outbox, and on drop, its leaving.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    channel: Arc<str>,
    /// Events to send, in order, and the hub's verdict (and whose connection it is).
    pub outbox: Arc<Outbox>,
}

impl Subscription {
    /// Its id, which the events it receives carry ([`Outgoing::sub`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The user whose connection it is.
    pub fn user(&self) -> &str {
        &self.outbox.user
    }

    /// The channel's name.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// This connection's own queue, for replies to what it sent.
    pub fn sender(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    /// Its place alone, for an owner that keeps the hub, the user and the outbox itself (a
    /// connection with many subscriptions holds those once): the place does not leave when
    /// dropped, its owner hands it to [`Hub::leave`].
    pub fn into_place(mut self) -> Place {
        // What is left behind leaves nothing when dropped (no subscription has id 0).
        Place {
            id: std::mem::take(&mut self.id),
            channel: self.channel.clone(),
        }
    }
}

/// A subscription without its hub, user and outbox, which its owner keeps: 24 bytes rather
/// than 56. It stays until handed to [`Hub::leave`].
#[derive(Debug)]
#[must_use = "a place stays in the hub until handed to Hub::leave"]
pub struct Place {
    id: u64,
    channel: Arc<str>,
}

impl Place {
    /// Its id, which the events it receives carry ([`Outgoing::sub`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The channel's name.
    pub fn channel(&self) -> &str {
        &self.channel
    }
}

/// A connection's place among those a broadcast reaches by themselves. Like a [`Place`], it
/// stays until handed to [`Hub::leave_everyone`] (its owner holds the hub).
#[derive(Debug)]
#[must_use = "a connection stays among those a broadcast reaches until Hub::leave_everyone"]
pub struct Everyone {
    id: u64,
}

impl Everyone {
    /// Its id, which the events it receives carry ([`Outgoing::sub`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The place of a connection that is not among those a broadcast reaches by themselves
    /// (it hears broadcasts through its channel): leaving it takes nothing out. Its id is a
    /// reply's (0), so what is queued to the connection as a reply is taken as its own.
    pub fn none() -> Everyone {
        Everyone { id: 0 }
    }
}

/// What a subscribing connection learns.
#[derive(Debug)]
pub struct Joined {
    /// The subscription (leave by dropping it).
    pub subscription: Subscription,
    /// Distinct users present, the joiner included, in name order: only in a channel with
    /// presence, and none past [`PRESENCE_LIMIT`].
    pub members: Vec<String>,
    /// How many distinct users are present, the joiner included.
    pub users: usize,
}

/// How many locks the rooms and the polls are spread over: enough that the sessions and the
/// engine's deliveries on every core rarely meet on one, few enough that a walk over every
/// room (a broadcast, a new epoch) takes few.
const SHARDS: usize = 16;

/// A map spread over [`SHARDS`] maps, each behind its own lock, by its keys' hash: work on
/// one key locks one shard, so that rooms on different cores do not wait for each other.
/// No code holds two shards at once.
#[derive(Debug)]
struct Shards<K, V> {
    shards: Box<[Mutex<HashMap<K, V>>]>,
    hasher: std::hash::RandomState,
}

impl<K: std::hash::Hash + Eq, V> Shards<K, V> {
    fn new() -> Self {
        Shards {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }

    /// The locked shard that holds `key` (whether or not it is there).
    fn of<Q>(&self, key: &Q) -> MutexGuard<'_, HashMap<K, V>>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + ?Sized,
    {
        use std::hash::BuildHasher as _;
        // The hash's low bits pick the shard; HashMap's own use of the same hash then
        // spreads each shard's keys over its buckets by the high bits.
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        lock(&self.shards[i])
    }

    /// Every shard, locked one after another as the caller walks them.
    fn each(&self) -> impl Iterator<Item = MutexGuard<'_, HashMap<K, V>>> {
        self.shards.iter().map(lock)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated in a way that
    // matters more than losing the server, so carry on with the data.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Hub {
    /// A hub whose subscribers each queue at most `queue_len` events.
    pub fn new(queue_len: usize, metrics: Arc<Metrics>) -> Arc<Hub> {
        Arc::new(Hub {
            topics: Shards::new(),
            listed: Mutex::new(BTreeSet::new()),
            everyone: Mutex::new(Peers::default()),
            next_id: AtomicU64::new(1),
            queue_len: queue_len.max(1),
            presence: std::sync::OnceLock::new(),
            interest: std::sync::OnceLock::new(),
            out: Fanout::new(metrics),
        })
    }

    /// The outbound queue of a connection of `user` speaking `format`, for several
    /// subscriptions to share ([`Hub::subscribe`]).
    pub fn outbox(&self, user: &Arc<str>, format: Format) -> Arc<Outbox> {
        Arc::new(Outbox::new(self.queue_len, user.clone(), format))
    }

    /// A new subscriber, on `outbox` (a new one for `user` speaking `format` when `None`).
    fn peer(&self, user: &Arc<str>, outbox: Option<Arc<Outbox>>, format: Format) -> (u64, Peer) {
        let outbox = outbox.unwrap_or_else(|| self.outbox(user, format));
        debug_assert!(outbox.format == format && *outbox.user == **user);
        let id = self.next_id.fetch_add(1, Relaxed);
        (id, Peer { outbox })
    }

    /// Subscribes a connection of `user` speaking `format` to `channel`, its events going to
    /// `outbox` (a new one when `None`). The first subscriber says what the channel is
    /// (`kind`). In a channel with presence, the others learn of a new user. A connection in
    /// several channels passes the same `user` to each, which they share.
    pub fn subscribe(
        self: &Arc<Self>,
        channel: &str,
        kind: Kind,
        user: &Arc<str>,
        outbox: Option<Arc<Outbox>>,
        format: Format,
    ) -> Joined {
        let mut topics = self.topics.of(channel);
        // The names already held are shared, not copied.
        let key = match topics.get_key_value(channel) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(channel);
                if kind.stream {
                    self.interested(&k);
                }
                if kind.presence {
                    lock(&self.listed).insert(k.clone());
                }
                k
            }
        };
        let topic = topics
            .entry(key.clone())
            .or_insert_with(|| Topic::new(kind));
        let user_key = topic
            .users
            .get_key_value(&**user)
            .map_or_else(|| user.clone(), |(k, _)| k.clone());
        let (id, peer) = self.peer(user, outbox, format);
        let outbox = peer.outbox.clone();
        topic.peers.add(id, peer);
        let n = topic.users.entry(user_key).or_insert(0);
        *n += 1;
        let first = *n == 1;
        let users = topic.users.len();
        let presence = topic.kind.presence;
        if presence {
            let info = outbox.info();
            let info = info.as_deref();
            if first {
                if users <= PRESENCE_LIMIT {
                    let encode = |f: Format| f.presence(channel, user, true, users, info);
                    let event = Fan::new(0, &encode);
                    topic.peers.fan_out(&event, Some(id), None, &self.out);
                }
                self.share(channel, user, Change::Join, info);
            } else if info.is_some() {
                self.share(channel, user, Change::Info, None);
            }
        }
        let members = if presence && users <= PRESENCE_LIMIT {
            let mut members: Vec<String> = topic.users.keys().map(|u| u.to_string()).collect();
            members.sort_unstable();
            members
        } else {
            Vec::new()
        };
        Joined {
            subscription: Subscription {
                hub: self.clone(),
                id,
                channel: key,
                outbox,
            },
            members,
            users,
        }
    }

    /// Takes `place` out of its channel.
    pub fn leave(&self, place: Place) {
        self.leave_channel(&place.channel, place.id);
    }

    fn leave_channel(&self, channel: &str, id: u64) {
        let mut topics = self.topics.of(channel);
        let Some(topic) = topics.get_mut(channel) else {
            return;
        };
        let Some(peer) = topic.peers.remove(id) else {
            return;
        };
        let user = &peer.outbox.user;
        let presence = topic.kind.presence;
        if let Some(n) = topic.users.get_mut(&**user) {
            *n -= 1;
            if *n == 0 {
                let told = topic.users.len() <= PRESENCE_LIMIT && presence;
                topic.users.remove(&**user);
                if told {
                    let count = topic.users.len();
                    let encode = |f: Format| f.presence(channel, user, false, count, None);
                    let event = Fan::new(0, &encode);
                    topic.peers.fan_out(&event, None, None, &self.out);
                }
                if presence {
                    self.share(channel, user, Change::Leave, None);
                }
            } else if peer.outbox.has_info() && presence {
                self.share(channel, user, Change::Info, None);
            }
        }
        if topic.peers.peers.is_empty() {
            let kind = topic.kind;
            if let Some((name, _)) = topics.remove_entry(channel) {
                if kind.presence {
                    lock(&self.listed).remove(&name);
                }
                if kind.stream {
                    self.interested(&name);
                }
            }
        }
    }

    /// Wakes every subscriber (at shutdown: each then reads the server's flag).
    pub fn wake_all(&self) {
        let mut outboxes: Vec<Arc<Outbox>> = Vec::new();
        for topics in self.topics.each() {
            for topic in topics.values() {
                outboxes.extend(topic.peers.peers.values().map(|p| p.outbox.clone()));
            }
        }
        outboxes.extend(
            lock(&self.everyone)
                .peers
                .values()
                .map(|p| p.outbox.clone()),
        );
        for outbox in outboxes {
            outbox.wake();
        }
    }

    /// Ends every connection of `user` here with `verdict` ([`Verdict::Disconnected`] or
    /// [`Verdict::Reconnect`]): those in a channel and those taking broadcasts by themselves.
    /// Returns how many connections it ended (one in several channels counts once).
    pub fn disconnect_user(&self, user: &str, verdict: Verdict) -> usize {
        let mut ended: HashSet<*const Outbox> = HashSet::new();
        let mut end = |peers: &Peers| {
            for peer in peers.peers.values() {
                if *peer.outbox.user == *user && ended.insert(Arc::as_ptr(&peer.outbox)) {
                    peer.outbox.mark(verdict);
                }
            }
        };
        for topics in self.topics.each() {
            for topic in topics.values().filter(|t| t.users.contains_key(user)) {
                end(&topic.peers);
            }
        }
        end(&lock(&self.everyone));
        ended.len()
    }

    /// Ends the subscriptions of `user`'s connections to `channel` here: each session is
    /// handed an event ([`Outgoing::ENDED`]) on which it leaves the channel and writes `push`
    /// (a session of a single-channel endpoint, whose one channel it is, closes instead).
    /// Returns how many subscriptions it ended.
    pub fn end_subscriptions(&self, channel: &str, user: &str, push: &Arc<Prepared>) -> usize {
        let topics = self.topics.of(channel);
        let Some(topic) = topics.get(channel).filter(|t| t.users.contains_key(user)) else {
            return 0;
        };
        let mut ended = 0;
        for (id, peer) in &topic.peers.peers {
            if *peer.outbox.user == *user {
                peer.outbox.hand_over(Outgoing {
                    id: Outgoing::ENDED,
                    sub: *id,
                    msg: push.clone(),
                });
                ended += 1;
            }
        }
        ended
    }

    /// Every stream channel forgets what it delivered and its subscribers reconnect
    /// ([`Verdict::Reset`]): the stream started again (a new epoch), so the ids they hold
    /// name other publications. Returns how many channels it reset.
    pub fn reset_streams(&self) -> usize {
        let mut reset = 0;
        for mut topics in self.topics.each() {
            for topic in topics.values_mut().filter(|t| t.kind.stream) {
                topic.reset();
                reset += 1;
            }
        }
        reset
    }

    /// Storage holds fewer publications of `channel` than were delivered here (it lost its
    /// last writes but kept its epoch): the ids delivered past its end will name other
    /// publications. The channel forgets what it delivered and its subscribers reconnect
    /// ([`Verdict::Reset`]).
    pub fn reset(&self, channel: &str) {
        if let Some(topic) = self.topics.of(channel).get_mut(channel) {
            topic.reset();
        }
    }

    /// Publishes to everyone in `channel`; returns how many it reached. `encode` gives the
    /// event in a format; it is called once per format the subscribers speak, before the
    /// channel is locked for the fan-out. A publication of a stream (`id` above 0) at or
    /// below the last id delivered to the channel is dropped.
    pub fn publish(
        &self,
        channel: &str,
        id: u64,
        encode: &dyn Fn(Format) -> Arc<Prepared>,
    ) -> usize {
        // Encoded before the channel is locked for the fan-out, in the formats its
        // subscribers speak now (one who joins between speaking another has it encoded on
        // need).
        let speaks = match self.topics.of(channel).get(channel) {
            Some(topic) if id == 0 || id > topic.position => topic.peers.speaks(),
            _ => return 0,
        };
        let event = Fan::encoded(id, encode, speaks);
        let mut topics = self.topics.of(channel);
        let Some(topic) = topics.get_mut(channel) else {
            return 0;
        };
        if id > 0 {
            if id <= topic.position {
                return 0;
            }
            topic.position = id;
        }
        topic.peers.fan_out(&event, None, None, &self.out)
    }

    /// Sends `msg` to the subscribers of `channel` that speak `only`, but `from` (the
    /// sender's subscription, if it is here); returns how many it reached.
    pub fn publish_to(
        &self,
        channel: &str,
        only: Format,
        from: Option<u64>,
        msg: &Arc<Prepared>,
    ) -> usize {
        let topics = self.topics.of(channel);
        let Some(topic) = topics.get(channel) else {
            return 0;
        };
        let encode = |_: Format| msg.clone();
        let event = Fan::new(0, &encode);
        topic.peers.fan_out(&event, from, Some(only), &self.out)
    }

    /// Sends an event to every connection: to each of those that take it by themselves
    /// ([`Hub::join_everyone`]), and through every stream channel to the subscribers
    /// speaking `through_channels`. Returns how many it reached.
    pub fn broadcast(
        &self,
        through_channels: Format,
        encode: &dyn Fn(Format) -> Arc<Prepared>,
    ) -> usize {
        let event = Fan::new(0, encode);
        let only = Some(through_channels);
        let in_channels: usize = self
            .topics
            .each()
            .map(|topics| {
                topics
                    .values()
                    .filter(|topic| topic.kind.stream)
                    .map(|topic| topic.peers.fan_out(&event, None, only, &self.out))
                    .sum::<usize>()
            })
            .sum();
        let everyone = lock(&self.everyone).fan_out(&event, None, None, &self.out);
        in_channels + everyone
    }

    /// Adds a connection to those a broadcast reaches by themselves, its events going to
    /// `outbox`.
    pub fn join_everyone(&self, user: &Arc<str>, outbox: Arc<Outbox>) -> Everyone {
        let format = outbox.format;
        let (id, peer) = self.peer(user, Some(outbox), format);
        lock(&self.everyone).add(id, peer);
        Everyone { id }
    }

    /// Sends what comes to `everyone` from now on to `outbox` instead (the connection took an
    /// identity): nothing is missed or sent twice in between.
    pub fn move_everyone(&self, everyone: &Everyone, outbox: Arc<Outbox>) {
        lock(&self.everyone).add(everyone.id, Peer { outbox });
    }

    /// Takes a connection out of those a broadcast reaches by themselves.
    pub fn leave_everyone(&self, everyone: &Everyone) {
        lock(&self.everyone).remove(everyone.id);
    }

    /// How many distinct users `channel` has on this node.
    pub fn user_count(&self, channel: &str) -> usize {
        self.topics
            .of(channel)
            .get(channel)
            .map_or(0, |topic| topic.users.len())
    }

    /// The users in `channel` on this node, with how many connections each has there and
    /// the public information they attached, in name order.
    pub fn members(&self, channel: &str) -> Vec<Member> {
        self.topics
            .of(channel)
            .get(channel)
            .map_or_else(Vec::new, |topic| {
                let mut infos = topic.infos();
                let mut members: Vec<Member> = topic
                    .users
                    .iter()
                    .map(|(user, n)| Member {
                        user: user.to_string(),
                        clients: *n as usize,
                        info: infos.remove(user).unwrap_or_default(),
                    })
                    .collect();
                members.sort_unstable_by(|a, b| a.user.cmp(&b.user));
                members
            })
    }

    /// Hands local joins and leaves in channels with presence to `hook` (for the other
    /// nodes), in order (under the channel's lock).
    pub fn on_presence(&self, hook: PresenceHook) {
        let _ = self.presence.set(hook);
    }

    /// Hands each stream channel that gains its first local subscriber or loses its last
    /// one to `hook`, in order (under the channel's lock), so that a listener can follow which
    /// channels this node has ([`Hub::has`] says which way it went).
    pub fn on_interest(&self, hook: InterestHook) {
        let _ = self.interest.set(hook);
    }

    fn interested(&self, channel: &Arc<str>) {
        if let Some(hook) = self.interest.get() {
            hook(channel);
        }
    }

    /// Whether `channel` has local subscribers.
    pub fn has(&self, channel: &str) -> bool {
        self.topics.of(channel).contains_key(channel)
    }

    fn share(&self, channel: &str, user: &str, change: Change, info: Option<&RawValue>) {
        if let Some(hook) = self.presence.get() {
            hook(channel, user, change, info);
        }
    }

    /// Tells local subscribers of `channel` that `user` joined (with the public `info` of
    /// the connection that did) or left on another node (unless the user is also here);
    /// `remote` is how many users the channel has on other nodes.
    pub fn remote_presence(
        &self,
        channel: &str,
        user: &str,
        join: bool,
        remote: usize,
        info: Option<&RawValue>,
    ) {
        let topics = self.topics.of(channel);
        let Some(topic) = topics.get(channel) else {
            return;
        };
        if !topic.kind.presence || topic.users.contains_key(user) {
            return;
        }
        let count = topic.users.len() + remote;
        if count > PRESENCE_LIMIT {
            return;
        }
        let encode = |f: Format| f.presence(channel, user, join, count, info);
        let event = Fan::new(0, &encode);
        topic.peers.fan_out(&event, None, None, &self.out);
    }

    /// After a connection that created `channel` read its stream up to `high`: older ids
    /// need not be delivered here. Only when it is alone, so no other subscriber can miss
    /// anything.
    pub fn advance(&self, channel: &str, high: u64) {
        if let Some(topic) = self.topics.of(channel).get_mut(channel) {
            if topic.peers.peers.len() == 1 {
                topic.position = topic.position.max(high);
            }
        }
    }

    /// The channels with local subscribers, with what each is.
    pub fn channels(&self) -> Vec<(Arc<str>, Kind)> {
        self.topics
            .each()
            .flat_map(|topics| {
                topics
                    .iter()
                    .map(|(name, topic)| (name.clone(), topic.kind))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The last id delivered in `channel` (0 when none or it has no local subscribers).
    pub fn position(&self, channel: &str) -> u64 {
        self.topics
            .of(channel)
            .get(channel)
            .map_or(0, |t| t.position)
    }

    /// Local users per channel with presence.
    pub fn present(&self) -> BTreeMap<String, Vec<String>> {
        let mut local = BTreeMap::new();
        for topics in self.topics.each() {
            for (name, topic) in topics.iter().filter(|(_, t)| t.kind.presence) {
                let users = topic.users.keys().map(|u| u.to_string()).collect();
                local.insert(name.to_string(), users);
            }
        }
        local
    }

    /// The public information local users' connections in `channel` attached, by user
    /// (users whose connections attached none are not in it).
    pub fn infos(&self, channel: &str) -> BTreeMap<String, Vec<Box<RawValue>>> {
        self.topics
            .of(channel)
            .get(channel)
            .map_or_else(BTreeMap::new, |topic| {
                topic
                    .infos()
                    .into_iter()
                    .map(|(user, infos)| (user.to_string(), infos))
                    .collect()
            })
    }

    /// How many channels with presence have subscribers here.
    pub fn listed_count(&self) -> usize {
        lock(&self.listed).len()
    }

    /// The first `limit` channels with presence and local subscribers whose names sort after
    /// `after` (from the first when `None`): `(channel, distinct users)`, in name order.
    /// Costs the page, read from an index of names, whatever the number of channels.
    pub fn listed_page(&self, after: Option<&str>, limit: usize) -> Vec<(Arc<str>, usize)> {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let page: Vec<Arc<str>> = lock(&self.listed)
            .range::<str, _>((start, Bound::Unbounded))
            .take(limit)
            .cloned()
            .collect();
        page.into_iter()
            .filter_map(|name| {
                let users = self.topics.of(&*name).get(&name)?.users.len();
                Some((name, users))
            })
            .collect()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.id != 0 {
            self.hub.leave_channel(&self.channel, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(text: &str) -> Arc<Prepared> {
        Arc::new(Prepared::text(text.to_owned()))
    }

    #[test]
    fn a_channel_is_what_its_first_subscriber_says() {
        let hub = Hub::new(8, Arc::default());
        let followed = Arc::new(Mutex::new(Vec::new()));
        let told = followed.clone();
        hub.on_interest(Box::new(move |c| lock(&told).push(c.to_string())));
        let ann: Arc<str> = Arc::from("ann");
        let stream = Kind {
            presence: false,
            stream: true,
        };
        let s = hub.subscribe("s", stream, &ann, None, Format::Channels);
        let p = hub.subscribe("p", Kind::default(), &ann, None, Format::Channels);
        assert!(
            s.members.is_empty() && p.members.is_empty(),
            "no presence, no list"
        );
        assert_eq!((s.users, p.users), (1, 1), "users are counted all the same");
        // A stream drops the ids it delivered; another channel takes every publication.
        assert_eq!(hub.publish("s", 2, &|_| bytes("a")), 1);
        assert_eq!(hub.publish("s", 2, &|_| bytes("a")), 0);
        assert_eq!(hub.publish("p", 0, &|_| bytes("b")), 1);
        assert_eq!(hub.publish("p", 0, &|_| bytes("b")), 1);
        assert_eq!(hub.publish("nobody", 0, &|_| bytes("c")), 0);
        // A broadcast goes through streams to the format it names, and to everyone.
        let ben: Arc<str> = Arc::from("ben");
        let own = hub.outbox(&ben, Format::Channels);
        let everyone = hub.join_everyone(&ben, own.clone());
        assert_eq!(hub.broadcast(Format::Channels, &|_| bytes("all")), 2);
        hub.leave_everyone(&everyone);
        assert_eq!(own.take_all().len(), 1);
        assert_eq!(hub.reset_streams(), 1);
        assert_eq!(s.subscription.outbox.verdict(), Some(Verdict::Reset));
        assert_eq!(p.subscription.outbox.verdict(), None);
        assert_eq!(
            hub.listed_count(),
            0,
            "only channels with presence are listed"
        );
        drop((s, p));
        assert_eq!(
            *lock(&followed),
            ["s", "s"],
            "a stream is followed, the other is not"
        );
        assert!(hub.channels().is_empty());
    }

    /// Every connection has one, for its whole life: with the `Arc`'s counts, 128 bytes, a
    /// jemalloc size class (the next is 160).
    #[test]
    fn an_outbox_fits_in_112_bytes() {
        let size = std::mem::size_of::<Outbox>();
        assert!(size <= 112, "an outbox takes {size} bytes");
    }

    #[test]
    fn channels_spread_over_every_shard_and_formats_follow_subscribers() {
        let hub = Hub::new(4, Arc::default());
        let ann: Arc<str> = Arc::from("ann");
        let room = Kind {
            presence: true,
            stream: true,
        };
        let held: Vec<_> = (0..200)
            .map(|i| hub.subscribe(&format!("c{i:03}"), room, &ann, None, Format::Room))
            .collect();
        let used = hub.topics.each().filter(|shard| !shard.is_empty()).count();
        assert_eq!(used, SHARDS, "200 channels use every shard");
        assert_eq!(hub.listed_count(), 200);
        // Each format its subscribers speak is encoded once per publication, and only those.
        let ben: Arc<str> = Arc::from("ben");
        let other = hub.subscribe("c000", room, &ben, None, Format::Channels);
        let asked = Mutex::new(Vec::new());
        let encode = |f: Format| {
            lock(&asked).push(f);
            bytes("x")
        };
        assert_eq!(hub.publish("c000", 1, &encode), 2);
        assert_eq!(*lock(&asked), [Format::Room, Format::Channels]);
        drop(other);
        lock(&asked).clear();
        assert_eq!(hub.publish("c000", 2, &encode), 1);
        assert_eq!(*lock(&asked), [Format::Room]);
        assert_eq!(hub.reset_streams(), 200);
        drop(held);
        assert_eq!(hub.listed_count(), 0);
        assert!(hub.topics.each().all(|shard| shard.is_empty()));
    }
}
