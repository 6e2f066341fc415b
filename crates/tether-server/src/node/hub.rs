//! The hub: who is subscribed to which room or poll, and fan-out to them.
//!
//! A subscriber speaks one of two formats: the single-channel endpoints' events
//! ([`Format::Room`]) or the channel protocol's pushes ([`Format::Channels`], docs/protocol.md).
//! An event is encoded once per format among a topic's subscribers, and the same bytes go to
//! every subscriber of that format. A stored message or a poll's counts is encoded before its
//! topic is locked for the fan-out.
//!
//! Rooms and polls are spread over 16 maps, each behind its own lock: deliveries to
//! rooms on different cores do not wait for each other.
//!
//! Every subscriber has a bounded outbound queue. Fan-out serializes an event once and hands
//! the same bytes to every queue (a push); a queue that is full marks its connection as
//! a slow consumer, which its task then closes with 1013. Fan-out never waits, so a slow reader
//! never slows the others, and memory per subscriber is bounded by the queue length.
//!
//! A queue whose session waits idle is *parked* ([`Outbox::park`]): instead of waking the
//! session, fan-out hands the queue to a drainer thread, which writes what waits in it straight
//! to the connection's socket.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{
    AtomicU64, AtomicU8, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use serde_json::value::RawValue;
use tether::Prepared;
use tokio::sync::mpsc;

use crate::engine::local::{Change, Local, Member, Sender, Shared, MAX_INFOS};
use crate::metrics::Metrics;
use crate::wire::{self, channels, encode, is_personal, rooms, ChatMessage};

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

/// How a subscriber's connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The single-channel endpoints' events (`/ws/rooms/…`, `/ws/polls/…`).
    Room,
    /// The channel protocol's pushes (`/ws`, tether.v1).
    Channels,
}

/// An event for a topic's subscribers: its chat message id (or 0), and how to encode it in
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

    /// The event, encoded now in each format of `speaks` ([`Topic::speaks`]).
    fn encoded(id: u64, encode: &'a dyn Fn(Format) -> Arc<Prepared>, speaks: [bool; 2]) -> Self {
        Fan {
            id,
            encode,
            ready: [Format::Room, Format::Channels].map(|f| speaks[f as usize].then(|| encode(f))),
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
    /// 0: none; 1: slow; 2: reset.
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
            _ => Some(Verdict::Reset),
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

/// A subscriber: its connection's outbox, which says who it is and how it speaks. A topic
/// of many subscribers holds 16 bytes for each (with its id).
#[derive(Debug)]
struct Peer {
    outbox: Arc<Outbox>,
}

#[derive(Debug, Default)]
struct Topic {
    peers: HashMap<u64, Peer>,
    /// How many peers speak each format.
    formats: [u32; 2],
}

impl Topic {
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

    /// Which formats its peers speak, in [`Format`] order.
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
        // thread, and a room of thousands would make them a contended hot spot.
        for (msg, reached) in encoded.iter().zip(reached) {
            if let Some(msg) = msg {
                out.metrics.sent_many(reached, msg.payload().len());
            }
        }
        out.drain(drain);
        reached.iter().sum()
    }
}

#[derive(Debug, Default)]
struct RoomState {
    topic: Topic,
    /// The last message id delivered; older or repeated ids are dropped (several nodes,
    /// catch-up after a lost subscription).
    position: u64,
    /// Connections per user, for presence (a user joins with the first, leaves with the last).
    /// (A hash map: a B-tree's nodes cost a room of 100 about half as much again.)
    users: HashMap<Arc<str>, u32>,
}

impl RoomState {
    /// The distinct public information each user's connections attached, at most
    /// [`MAX_INFOS`] per user.
    fn infos(&self) -> HashMap<Arc<str>, Vec<Box<RawValue>>> {
        let mut infos: HashMap<Arc<str>, Vec<Box<RawValue>>> = HashMap::new();
        for peer in self.topic.peers.values() {
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
}

#[derive(Debug, Default)]
struct PollState {
    topic: Topic,
}

/// Rooms of more users than this stop telling joins and leaves, and a joiner learns how many
/// are there but not who: every join would otherwise cost a push to every member, and a list
/// of every member to the joiner, so filling a room would cost the square of its size.
pub const PRESENCE_LIMIT: usize = 1000;

/// Subscriptions of every room and poll on this node.
#[derive(Debug)]
pub struct Hub {
    /// The epoch of the rooms' streams in storage, once known (empty before).
    epoch: Mutex<String>,
    /// By name; a name is one allocation shared with its members' subscriptions.
    rooms: Shards<Arc<str>, RoomState>,
    /// The names of `rooms`, users' notification streams left out, in order: listing a page
    /// of them costs the page, not every room (taken after a room's shard when both are
    /// held).
    names: Mutex<BTreeSet<Arc<str>>>,
    polls: Shards<i64, PollState>,
    /// Every connection of the channel protocol: what `broadcast` reaches besides rooms.
    everyone: Mutex<Topic>,
    /// Subscribers of the `polls` channel: told of each poll created here.
    poll_list: Mutex<Topic>,
    next_id: AtomicU64,
    queue_len: usize,
    /// Where local joins and leaves go to be shared with other nodes (cluster mode).
    presence: std::sync::OnceLock<mpsc::UnboundedSender<Shared>>,
    /// Where the names of rooms that gain their first local member or lose their last one go
    /// (cluster mode: the node listens to a room's Redis channels only while it has members).
    interest: std::sync::OnceLock<mpsc::UnboundedSender<Arc<str>>>,
    out: Fanout,
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

/// A connection's place in a room or poll: its outbox, and on drop, its leaving.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    topic: TopicKey,
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

    /// The room, for a room's subscription.
    pub fn room(&self) -> Option<&str> {
        self.topic.room()
    }

    /// The poll, for a poll's subscription ([`POLL_LIST`] for the list of polls).
    pub fn poll(&self) -> Option<i64> {
        self.topic.poll()
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
        let topic = std::mem::replace(&mut self.topic, TopicKey::Poll(POLL_LIST));
        Place {
            id: std::mem::take(&mut self.id),
            topic,
        }
    }
}

/// A subscription without its hub, user and outbox, which its owner keeps: 24 bytes rather
/// than 56. It stays until handed to [`Hub::leave`].
#[derive(Debug)]
#[must_use = "a place stays in the hub until handed to Hub::leave"]
pub struct Place {
    id: u64,
    topic: TopicKey,
}

impl Place {
    /// Its id, which the events it receives carry ([`Outgoing::sub`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The room, for a room's place.
    pub fn room(&self) -> Option<&str> {
        self.topic.room()
    }

    /// The poll, for a poll's place ([`POLL_LIST`] for the list of polls).
    pub fn poll(&self) -> Option<i64> {
        self.topic.poll()
    }
}

#[derive(Debug, Clone)]
enum TopicKey {
    Room(Arc<str>),
    /// A poll by id; [`POLL_LIST`] is the list of polls. (A third variant would make every
    /// subscription 8 bytes bigger: a name's pointer has room for only one more.)
    Poll(i64),
}

impl TopicKey {
    fn room(&self) -> Option<&str> {
        match self {
            TopicKey::Room(room) => Some(room),
            TopicKey::Poll(_) => None,
        }
    }

    fn poll(&self) -> Option<i64> {
        match self {
            TopicKey::Room(_) => None,
            TopicKey::Poll(poll) => Some(*poll),
        }
    }
}

/// The poll id that stands for the `polls` channel (real ones start at 1).
pub const POLL_LIST: i64 = 0;

/// A channel-protocol connection's place among those a broadcast reaches. Like a [`Place`],
/// it stays until handed to [`Hub::leave_everyone`] (its owner holds the hub).
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
}

/// What a joining connection learns.
#[derive(Debug)]
pub struct Joined {
    /// The subscription (leave by dropping it).
    pub subscription: Subscription,
    /// Distinct users present, the joiner included (none listed past [`PRESENCE_LIMIT`]).
    pub members: Vec<String>,
    /// How many distinct users are present, the joiner included.
    pub users: usize,
}

/// A presence change in `format`.
fn presence(
    format: Format,
    room: &str,
    user: &str,
    join: bool,
    count: usize,
    info: Option<&RawValue>,
) -> Arc<Prepared> {
    let kind = if join { "join" } else { "leave" };
    match format {
        Format::Room => encode(&rooms::Presence {
            room,
            user,
            event: kind,
            count,
        }),
        Format::Channels => encode(&channels::Presence {
            kind,
            channel: &channels::room_channel(room),
            user,
            count,
            info,
        }),
    }
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
            epoch: Mutex::new(String::new()),
            rooms: Shards::new(),
            names: Mutex::new(BTreeSet::new()),
            polls: Shards::new(),
            everyone: Mutex::new(Topic::default()),
            poll_list: Mutex::new(Topic::default()),
            next_id: AtomicU64::new(1),
            queue_len: queue_len.max(1),
            presence: std::sync::OnceLock::new(),
            interest: std::sync::OnceLock::new(),
            out: Fanout::new(metrics),
        })
    }

    /// The outbound queue of a connection of `user` speaking `format`, for several
    /// subscriptions to share ([`Hub::join_with`]).
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

    /// Subscribes a connection of `user` to `room`; the others learn of a new user.
    pub fn join(self: &Arc<Self>, room: &str, user: &str) -> Joined {
        self.join_with(room, &Arc::from(user), None, Format::Room)
    }

    /// Subscribes a connection speaking `format` to `room`, its events going to `outbox` (a
    /// new one when `None`); the others learn of a new user. A connection in several rooms
    /// passes the same `user` to each, which they share.
    pub fn join_with(
        self: &Arc<Self>,
        room: &str,
        user: &Arc<str>,
        outbox: Option<Arc<Outbox>>,
        format: Format,
    ) -> Joined {
        let mut rooms = self.rooms.of(room);
        // The names already held are shared, not copied.
        let room_key = match rooms.get_key_value(room) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(room);
                self.interested(&k);
                if !is_personal(&k) {
                    lock(&self.names).insert(k.clone());
                }
                k
            }
        };
        let state = rooms.entry(room_key.clone()).or_default();
        let user_key = state
            .users
            .get_key_value(&**user)
            .map_or_else(|| user.clone(), |(k, _)| k.clone());
        let (id, peer) = self.peer(user, outbox, format);
        let outbox = peer.outbox.clone();
        let info = outbox.info();
        let info = info.as_deref();
        state.topic.add(id, peer);
        let n = state.users.entry(user_key.clone()).or_insert(0);
        *n += 1;
        let first = *n == 1;
        let users = state.users.len();
        // A user's own devices on their notifications have no presence to tell.
        if first && !is_personal(room) {
            if users <= PRESENCE_LIMIT {
                let encode = |f: Format| presence(f, room, user, true, users, info);
                let event = Fan::new(0, &encode);
                state.topic.fan_out(&event, Some(id), None, &self.out);
            }
            self.share(room, user, Change::Join, info);
        } else if info.is_some() && !is_personal(room) {
            self.share(room, user, Change::Info, None);
        }
        let members = if users <= PRESENCE_LIMIT {
            let mut members: Vec<String> = state.users.keys().map(|u| u.to_string()).collect();
            members.sort_unstable();
            members
        } else {
            Vec::new()
        };
        Joined {
            subscription: Subscription {
                hub: self.clone(),
                id,
                topic: TopicKey::Room(room_key),
                outbox,
            },
            members,
            users,
        }
    }

    fn leave_room(&self, room: &str, id: u64) {
        let mut rooms = self.rooms.of(room);
        let Some(state) = rooms.get_mut(room) else {
            return;
        };
        let Some(peer) = state.topic.remove(id) else {
            return;
        };
        let user = &peer.outbox.user;
        if let Some(n) = state.users.get_mut(&**user) {
            *n -= 1;
            if *n == 0 {
                let told = state.users.len() <= PRESENCE_LIMIT && !is_personal(room);
                state.users.remove(&**user);
                if told {
                    let count = state.users.len();
                    let encode = |f: Format| presence(f, room, user, false, count, None);
                    let event = Fan::new(0, &encode);
                    state.topic.fan_out(&event, None, None, &self.out);
                }
                if !is_personal(room) {
                    self.share(room, user, Change::Leave, None);
                }
            } else if peer.outbox.has_info() && !is_personal(room) {
                self.share(room, user, Change::Info, None);
            }
        }
        if state.topic.peers.is_empty() {
            if let Some((name, _)) = rooms.remove_entry(room) {
                lock(&self.names).remove(&name);
                self.interested(&name);
            }
        }
    }

    /// Takes `place` out of its room or poll.
    pub fn leave(&self, place: Place) {
        self.leave_topic(&place.topic, place.id);
    }

    fn leave_topic(&self, topic: &TopicKey, id: u64) {
        match topic {
            TopicKey::Room(room) => self.leave_room(room, id),
            TopicKey::Poll(POLL_LIST) => {
                lock(&self.poll_list).remove(id);
            }
            TopicKey::Poll(poll) => self.leave_poll(*poll, id),
        }
    }

    /// The epoch of the rooms' streams, as last seen in storage (empty before it is known).
    pub fn epoch(&self) -> String {
        lock(&self.epoch).clone()
    }

    /// Takes note of the rooms' epoch as read from storage. When it differs from the one seen
    /// before, storage lost the streams and started their ids again: every room here forgets
    /// what it delivered and every member is told to reconnect ([`Verdict::Reset`]), since
    /// the ids it holds now name other messages. Returns whether that happened.
    pub fn observe_epoch(&self, epoch: &str) -> bool {
        let mut current = lock(&self.epoch);
        if *current == epoch {
            return false;
        }
        let known = !current.is_empty();
        let before = std::mem::replace(&mut *current, epoch.to_owned());
        if !known {
            return false;
        }
        let mut reset = 0;
        for mut rooms in self.rooms.each() {
            reset += rooms.len();
            for state in rooms.values_mut() {
                Self::reset(state);
            }
        }
        tracing::error!(old = %before, new = %epoch, rooms = reset, "storage lost the rooms' history (a new epoch): their members reconnect and resume from what it holds now");
        true
    }

    /// Wakes every room and poll member (at shutdown: each then reads the server's flag).
    pub fn wake_all(&self) {
        let mut outboxes: Vec<Arc<Outbox>> = Vec::new();
        for rooms in self.rooms.each() {
            for state in rooms.values() {
                outboxes.extend(state.topic.peers.values().map(|p| p.outbox.clone()));
            }
        }
        for polls in self.polls.each() {
            for state in polls.values() {
                outboxes.extend(state.topic.peers.values().map(|p| p.outbox.clone()));
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

    fn reset(state: &mut RoomState) {
        state.position = 0;
        for peer in state.topic.peers.values() {
            peer.outbox.mark(Verdict::Reset);
        }
    }

    /// Delivers a stored message to everyone in its room; returns how many it reached. An id
    /// at or below the last one delivered to the room is dropped. A message of another epoch
    /// resets every room first ([`Hub::observe_epoch`]).
    pub fn deliver(&self, message: &ChatMessage) -> usize {
        if let Some(epoch) = &message.epoch {
            self.observe_epoch(epoch);
        }
        let room = message.room.as_str();
        // Encoded before the room is locked for the fan-out, in the formats its members
        // speak now (one who joins between speaking another has it encoded on need).
        let speaks = match self.rooms.of(room).get(room) {
            Some(state) if message.id > state.position => state.topic.speaks(),
            _ => return 0,
        };
        let encode = |f: Format| match f {
            Format::Room => encode(message),
            Format::Channels => channels::publication(message),
        };
        let event = Fan::encoded(message.id, &encode, speaks);
        let mut rooms = self.rooms.of(room);
        let Some(state) = rooms.get_mut(room) else {
            return 0;
        };
        if message.id <= state.position {
            return 0;
        }
        state.position = message.id;
        state.topic.fan_out(&event, None, None, &self.out)
    }

    /// Sends a notice to every connection in every room, and to every connection of the
    /// channel protocol (on its `broadcast` channel); returns how many it reached.
    pub fn broadcast(&self, user: &str, text: &str, ts: &str) -> usize {
        let encode = |f: Format| match f {
            Format::Room => encode(&rooms::Broadcast { user, text, ts }),
            Format::Channels => encode(&channels::Publication {
                channel: "broadcast",
                offset: None,
                user: Some(user),
                guest: false,
                ts: Some(ts),
                data: channels::Text { text },
            }),
        };
        let event = Fan::new(0, &encode);
        let only = Some(Format::Room);
        let in_rooms: usize = self
            .rooms
            .each()
            .map(|rooms| {
                rooms
                    .values()
                    .map(|state| state.topic.fan_out(&event, None, only, &self.out))
                    .sum::<usize>()
            })
            .sum();
        let everyone = lock(&self.everyone).fan_out(&event, None, None, &self.out);
        in_rooms + everyone
    }

    /// Adds a connection of the channel protocol to those a broadcast reaches, its events
    /// going to `outbox`.
    pub fn join_everyone(&self, user: &Arc<str>, outbox: Arc<Outbox>) -> Everyone {
        let (id, peer) = self.peer(user, Some(outbox), Format::Channels);
        lock(&self.everyone).add(id, peer);
        Everyone { id }
    }

    /// Sends what comes to `everyone` from now on to `outbox` instead (the connection took an
    /// identity): nothing is missed or sent twice in between.
    pub fn move_everyone(&self, everyone: &Everyone, outbox: Arc<Outbox>) {
        lock(&self.everyone).add(everyone.id, Peer { outbox });
    }

    /// Takes a connection out of those a broadcast reaches.
    pub fn leave_everyone(&self, everyone: &Everyone) {
        lock(&self.everyone).remove(everyone.id);
    }

    /// Sends an ephemeral event (its push, as text) to the channel-protocol members of
    /// `room` but `from` (the sender's subscription, if it is here); returns how many it
    /// reached. The push is prepared once, outside the room's lock, when the room is here.
    pub fn ephemeral(&self, room: &str, from: Option<u64>, push: &str) -> usize {
        if !self.has_room(room) {
            return 0;
        }
        let push = Arc::new(Prepared::text(push.to_owned()));
        let rooms = self.rooms.of(room);
        let Some(state) = rooms.get(room) else {
            return 0;
        };
        let encode = |_: Format| push.clone();
        let event = Fan::new(0, &encode);
        let only = Some(Format::Channels);
        state.topic.fan_out(&event, from, only, &self.out)
    }

    /// How many distinct users `room` has on this node.
    pub fn user_count(&self, room: &str) -> usize {
        self.rooms
            .of(room)
            .get(room)
            .map_or(0, |state| state.users.len())
    }

    /// The users in `room` on this node, with how many connections each has there and the
    /// public information they attached, in name order.
    pub fn members(&self, room: &str) -> Vec<Member> {
        self.rooms
            .of(room)
            .get(room)
            .map_or_else(Vec::new, |state| {
                let mut infos = state.infos();
                let mut members: Vec<Member> = state
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

    /// Sends local joins and leaves to `tx` (for the other nodes).
    pub fn share_presence(&self, tx: mpsc::UnboundedSender<Shared>) {
        let _ = self.presence.set(tx);
    }

    /// Sends the name of each room that gains its first local member or loses its last one
    /// to `tx`, in order (under the room's shard lock), so that a listener can follow which rooms
    /// this node has ([`Hub::has_room`] says which way it went).
    pub fn follow_rooms(&self, tx: mpsc::UnboundedSender<Arc<str>>) {
        let _ = self.interest.set(tx);
    }

    fn interested(&self, room: &Arc<str>) {
        if let Some(tx) = self.interest.get() {
            let _ = tx.send(room.clone());
        }
    }

    /// Whether `room` has local members.
    pub fn has_room(&self, room: &str) -> bool {
        self.rooms.of(room).contains_key(room)
    }

    fn share(&self, room: &str, user: &str, change: Change, info: Option<&RawValue>) {
        if let Some(tx) = self.presence.get() {
            let _ = tx.send(Shared {
                room: room.to_owned(),
                user: user.to_owned(),
                change,
                info: info.map(ToOwned::to_owned),
            });
        }
    }

    /// Tells local members that `user` joined (with the public `info` of the connection that
    /// did) or left on another node (unless the user is also here); `remote` is how many users
    /// the room has on other nodes.
    pub fn remote_presence(
        &self,
        room: &str,
        user: &str,
        join: bool,
        remote: usize,
        info: Option<&RawValue>,
    ) {
        let rooms = self.rooms.of(room);
        let Some(state) = rooms.get(room) else {
            return;
        };
        if state.users.contains_key(user) {
            return;
        }
        let count = state.users.len() + remote;
        if count > PRESENCE_LIMIT {
            return;
        }
        let encode = |f: Format| presence(f, room, user, join, count, info);
        let event = Fan::new(0, &encode);
        state.topic.fan_out(&event, None, None, &self.out);
    }

    /// After a connection that created `room` read its history up to `high`: older ids need
    /// not be delivered here. Only when it is alone, so no other member can miss anything.
    pub fn advance(&self, room: &str, high: u64) {
        if let Some(state) = self.rooms.of(room).get_mut(room) {
            if state.topic.peers.len() == 1 {
                state.position = state.position.max(high);
            }
        }
    }

    /// Storage holds fewer messages of `room` than were delivered here (it lost its last
    /// writes but kept its epoch): the ids delivered past its end will name other messages.
    /// The room forgets what it delivered and its members reconnect ([`Verdict::Reset`]).
    pub fn reset_room(&self, room: &str) {
        if let Some(state) = self.rooms.of(room).get_mut(room) {
            Self::reset(state);
        }
    }

    /// The rooms with local members.
    pub fn room_names(&self) -> Vec<String> {
        self.rooms
            .each()
            .flat_map(|rooms| rooms.keys().map(|r| r.to_string()).collect::<Vec<_>>())
            .collect()
    }

    /// The last id delivered in `room` (0 when none or the room has no local members).
    pub fn position(&self, room: &str) -> u64 {
        self.rooms.of(room).get(room).map_or(0, |s| s.position)
    }

    /// Local users per room, users' notification streams left out (they have no presence).
    pub fn local_users(&self) -> BTreeMap<String, Vec<String>> {
        let mut local = BTreeMap::new();
        for rooms in self.rooms.each() {
            for (room, state) in rooms.iter().filter(|(room, _)| !is_personal(room)) {
                let users = state.users.keys().map(|u| u.to_string()).collect();
                local.insert(room.to_string(), users);
            }
        }
        local
    }

    /// The public information local users' connections in `room` attached, by user (users
    /// whose connections attached none are not in it).
    pub fn infos(&self, room: &str) -> BTreeMap<String, Vec<Box<RawValue>>> {
        self.rooms
            .of(room)
            .get(room)
            .map_or_else(BTreeMap::new, |state| {
                state
                    .infos()
                    .into_iter()
                    .map(|(user, infos)| (user.to_string(), infos))
                    .collect()
            })
    }

    /// How many rooms have members here (users' notification streams are no rooms).
    pub fn room_count(&self) -> usize {
        lock(&self.names).len()
    }

    /// The first `limit` rooms with connected members whose names sort after `after` (from
    /// the first when `None`): `(room, distinct users)`, in name order. Costs the page, read
    /// from an index of names, whatever the number of rooms.
    pub fn rooms_page(&self, after: Option<&str>, limit: usize) -> Vec<(String, usize)> {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let page: Vec<Arc<str>> = lock(&self.names)
            .range::<str, _>((start, Bound::Unbounded))
            .take(limit)
            .cloned()
            .collect();
        page.into_iter()
            .filter_map(|name| {
                let users = self.rooms.of(&*name).get(&name)?.users.len();
                Some((name.to_string(), users))
            })
            .collect()
    }

    /// Subscribes a connection to poll `poll`'s counts.
    pub fn watch_poll(self: &Arc<Self>, poll: i64, user: &str) -> Subscription {
        self.watch_poll_with(poll, &Arc::from(user), None, Format::Room)
    }

    /// Subscribes a connection speaking `format` to poll `poll`'s counts, its events going to
    /// `outbox` (a new one when `None`).
    pub fn watch_poll_with(
        self: &Arc<Self>,
        poll: i64,
        user: &Arc<str>,
        outbox: Option<Arc<Outbox>>,
        format: Format,
    ) -> Subscription {
        let (id, peer) = self.peer(user, outbox, format);
        let outbox = peer.outbox.clone();
        let mut polls = self.polls.of(&poll);
        polls.entry(poll).or_default().topic.add(id, peer);
        Subscription {
            hub: self.clone(),
            id,
            topic: TopicKey::Poll(poll),
            outbox,
        }
    }

    /// The polls this node's connections watch.
    pub fn watched_polls(&self) -> Vec<i64> {
        self.polls
            .each()
            .flat_map(|polls| polls.keys().copied().collect::<Vec<_>>())
            .collect()
    }

    fn leave_poll(&self, poll: i64, id: u64) {
        let mut polls = self.polls.of(&poll);
        if let Some(state) = polls.get_mut(&poll) {
            state.topic.remove(id);
            if state.topic.peers.is_empty() {
                polls.remove(&poll);
            }
        }
    }

    /// Subscribes a channel-protocol connection to the `polls` channel, its events going to
    /// `outbox`.
    pub fn watch_poll_list(self: &Arc<Self>, user: &Arc<str>, outbox: Arc<Outbox>) -> Subscription {
        let (id, peer) = self.peer(user, Some(outbox), Format::Channels);
        let outbox = peer.outbox.clone();
        lock(&self.poll_list).add(id, peer);
        Subscription {
            hub: self.clone(),
            id,
            topic: TopicKey::Poll(POLL_LIST),
            outbox,
        }
    }

    /// Tells the `polls` channel's subscribers of a new poll; returns how many it reached.
    pub fn poll_created(&self, poll: &wire::Poll) -> usize {
        let encode = |_: Format| {
            encode(&channels::Publication {
                channel: "polls",
                offset: None,
                user: None,
                guest: false,
                ts: None,
                data: channels::Created { created: poll },
            })
        };
        let event = Fan::new(0, &encode);
        lock(&self.poll_list).fan_out(&event, None, None, &self.out)
    }

    /// Sends poll `poll`'s new counts to everyone watching it.
    pub fn deliver_counts(&self, poll: i64, counts: &BTreeMap<String, u64>) -> usize {
        let Some(speaks) = self.polls.of(&poll).get(&poll).map(|s| s.topic.speaks()) else {
            return 0;
        };
        let total = counts.values().sum();
        let encode = |f: Format| match f {
            Format::Room => encode(&rooms::Counts {
                id: poll,
                counts,
                total,
            }),
            Format::Channels => encode(&channels::Publication {
                channel: &format!("poll:{poll}"),
                offset: None,
                user: None,
                guest: false,
                ts: None,
                data: channels::Counts { counts, total },
            }),
        };
        let event = Fan::encoded(0, &encode, speaks);
        let polls = self.polls.of(&poll);
        let Some(state) = polls.get(&poll) else {
            return 0;
        };
        state.topic.fan_out(&event, None, None, &self.out)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.id != 0 {
            self.hub.leave_topic(&self.topic, self.id);
        }
    }
}

impl Sender for Outbox {
    /// Queues an `error` event.
    fn failed(&self, text: &str) {
        let event = serde_json::json!({"type": "error", "error": text});
        let _ = self.push(Outgoing {
            id: 0,
            sub: 0,
            msg: encode(&event),
        });
    }
}

/// The engine's view of this node: each call is the hub's own.
impl Local for Hub {
    fn deliver(&self, message: &ChatMessage) {
        Hub::deliver(self, message);
    }

    fn deliver_counts(&self, poll: i64, counts: &BTreeMap<String, u64>) {
        Hub::deliver_counts(self, poll, counts);
    }

    fn poll_created(&self, poll: &wire::Poll) {
        Hub::poll_created(self, poll);
    }

    fn broadcast(&self, user: &str, text: &str, ts: &str) -> usize {
        Hub::broadcast(self, user, text, ts)
    }

    fn ephemeral(&self, room: &str, from: Option<u64>, push: &str) -> usize {
        Hub::ephemeral(self, room, from, push)
    }

    fn remote_presence(
        &self,
        room: &str,
        user: &str,
        join: bool,
        remote: usize,
        info: Option<&RawValue>,
    ) {
        Hub::remote_presence(self, room, user, join, remote, info);
    }

    fn has_room(&self, room: &str) -> bool {
        Hub::has_room(self, room)
    }

    fn room_names(&self) -> Vec<String> {
        Hub::room_names(self)
    }

    fn position(&self, room: &str) -> u64 {
        Hub::position(self, room)
    }

    fn epoch(&self) -> String {
        Hub::epoch(self)
    }

    fn observe_epoch(&self, epoch: &str) -> bool {
        Hub::observe_epoch(self, epoch)
    }

    fn watched_polls(&self) -> Vec<i64> {
        Hub::watched_polls(self)
    }

    fn user_count(&self, room: &str) -> usize {
        Hub::user_count(self, room)
    }

    fn local_users(&self) -> BTreeMap<String, Vec<String>> {
        Hub::local_users(self)
    }

    fn infos(&self, room: &str) -> BTreeMap<String, Vec<Box<RawValue>>> {
        Hub::infos(self, room)
    }

    fn share_presence(&self, tx: mpsc::UnboundedSender<Shared>) {
        Hub::share_presence(self, tx);
    }

    fn follow_rooms(&self, tx: mpsc::UnboundedSender<Arc<str>>) {
        Hub::follow_rooms(self, tx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(o: &Outgoing) -> &str {
        std::str::from_utf8(o.msg.payload()).unwrap()
    }

    fn message(room: &str, id: u64) -> ChatMessage {
        ChatMessage {
            id,
            room: room.into(),
            user: "ann".into(),
            text: "hi".into(),
            ts: "2026-01-01T00:00:00.000Z".into(),
            guest: false,
            epoch: None,
        }
    }

    #[test]
    fn presence_counts_users_not_connections() {
        let hub = Hub::new(16, Arc::default());
        let ann = hub.join("r", "ann").subscription;
        let ben1 = hub.join("r", "ben");
        assert_eq!(ben1.members, ["ann", "ben"]);
        let ben2 = hub.join("r", "ben");
        assert_eq!(ben2.members, ["ann", "ben"]);
        drop(ben1);
        drop(ben2);
        let join = ann.outbox.try_recv().unwrap();
        assert!(text(&join).contains("\"event\":\"join\""));
        let leave = ann.outbox.try_recv().unwrap();
        assert!(text(&leave).contains("\"event\":\"leave\""));
        assert!(
            ann.outbox.try_recv().is_none(),
            "one join and one leave for two connections"
        );
    }

    #[test]
    fn a_crowd_is_counted_not_listed_and_its_comings_and_goings_are_not_told() {
        let hub = Hub::new(4, Arc::default());
        let first = hub.join("r", "u0").subscription;
        let mut others = Vec::new();
        for i in 1..PRESENCE_LIMIT {
            others.push(hub.join("r", &format!("u{i}")));
            while first.outbox.try_recv().is_some() {}
        }
        assert_eq!(others.last().unwrap().members.len(), PRESENCE_LIMIT);
        let crowd = hub.join("r", "one-too-many");
        assert_eq!((crowd.users, crowd.members.len()), (PRESENCE_LIMIT + 1, 0));
        assert!(first.outbox.try_recv().is_none(), "no join past the limit");
        assert_eq!(hub.user_count("r"), PRESENCE_LIMIT + 1);
        others.pop();
        assert!(first.outbox.try_recv().is_none(), "no leave from a crowd");
        others.pop();
        let leave = first.outbox.try_recv().expect("told again at the limit");
        assert!(text(&leave).contains("\"event\":\"leave\""));
        assert!(text(&leave).contains(&format!("\"count\":{}", PRESENCE_LIMIT - 1)));
    }

    /// Every connection has one, for its whole life: with the `Arc`'s counts, 128 bytes, a
    /// jemalloc size class (the next is 160).
    #[test]
    fn an_outbox_fits_in_112_bytes() {
        let size = std::mem::size_of::<Outbox>();
        assert!(size <= 112, "an outbox takes {size} bytes");
    }

    #[test]
    fn full_queue_marks_only_that_subscriber_slow() {
        let hub = Hub::new(2, Arc::default());
        let slow = hub.join("r", "slow").subscription;
        let fast = hub.join("r", "fast").subscription;
        for id in 1..=3 {
            assert!(hub.deliver(&message("r", id)) >= 1);
            while fast.outbox.try_recv().is_some() {}
        }
        assert!(slow.outbox.is_slow());
        assert!(!fast.outbox.is_slow());
        assert_eq!(hub.out.metrics.messages_out.load(Relaxed), 5);
    }

    #[test]
    fn a_new_epoch_resets_every_room_and_its_members() {
        let hub = Hub::new(16, Arc::default());
        assert!(!hub.observe_epoch("a"), "the first epoch seen is no change");
        let ann = hub.join("r", "ann").subscription;
        assert_eq!(hub.deliver(&message("r", 7)), 1);
        assert_eq!(hub.position("r"), 7);
        assert!(!hub.observe_epoch("a"));
        assert_eq!(ann.outbox.verdict(), None);
        let mut lost = message("r", 1);
        lost.epoch = Some("b".into());
        // Id 1 of the new stream is below what was delivered, yet it is a new message.
        hub.deliver(&lost);
        assert_eq!(hub.epoch(), "b");
        assert_eq!(ann.outbox.verdict(), Some(Verdict::Reset));
        assert_eq!(hub.position("r"), 1, "the new stream's ids are followed");
        let ben = hub.join("r", "ben").subscription;
        assert_eq!(ben.outbox.verdict(), None, "later members are not reset");
    }

    #[test]
    fn rooms_are_listed_in_pages_by_name() {
        let hub = Hub::new(4, Arc::default());
        let held: Vec<_> = ["c", "a", "d", "b"]
            .into_iter()
            .map(|r| hub.join(r, "ann"))
            .collect();
        let _own = hub.join(&crate::wire::personal("ann"), "ann");
        let _two = hub.join("b", "ben");
        let names = |page: Vec<(String, usize)>| page.into_iter().map(|r| r.0).collect::<Vec<_>>();
        assert_eq!(names(hub.rooms_page(None, 2)), ["a", "b"]);
        assert_eq!(hub.rooms_page(Some("a"), 1), [("b".to_owned(), 2)]);
        assert_eq!(
            names(hub.rooms_page(Some("b"), 10)),
            ["c", "d"],
            "no user streams"
        );
        drop(held);
        assert_eq!(names(hub.rooms_page(None, 10)), ["b"]);
    }

    #[test]
    fn empty_rooms_are_forgotten() {
        let hub = Hub::new(4, Arc::default());
        let s = hub.join("r", "ann");
        assert_eq!(hub.rooms_page(None, 10), [("r".to_owned(), 1)]);
        drop(s);
        assert!(hub.rooms_page(None, 10).is_empty());
        assert_eq!(hub.deliver(&message("r", 1)), 0);
    }

    #[test]
    fn each_format_is_encoded_once_and_reaches_its_speakers() {
        let hub = Hub::new(16, Arc::default());
        let room = hub.join("r", "ann").subscription;
        let user: Arc<str> = Arc::from("ben");
        let outbox = hub.outbox(&user, Format::Channels);
        let channels = hub.join_with("r", &user, Some(outbox), Format::Channels);
        let channels = channels.subscription;
        room.outbox.take_all();
        assert_eq!(hub.deliver(&message("r", 1)), 2);
        let (a, b) = (
            room.outbox.try_recv().unwrap(),
            channels.outbox.try_recv().unwrap(),
        );
        assert!(text(&a).starts_with(r#"{"type":"message""#), "{}", text(&a));
        assert!(
            text(&b).starts_with(r#"{"type":"pub","channel":"room:r""#),
            "{}",
            text(&b)
        );
        assert!(!Arc::ptr_eq(&a.msg, &b.msg));
        // The room's formats follow its members: with the channel member gone, only the
        // room's format is spoken.
        drop(channels);
        let speaks = hub.rooms.of("r").get("r").map(|s| s.topic.speaks());
        assert_eq!(speaks, Some([true, false]));
        room.outbox.take_all();
        assert_eq!(hub.deliver(&message("r", 2)), 1);
    }

    #[test]
    fn rooms_over_every_shard_are_kept_listed_and_reset() {
        let hub = Hub::new(4, Arc::default());
        assert!(!hub.observe_epoch("a"));
        let names: Vec<String> = (0..200).map(|i| format!("room{i:03}")).collect();
        let held: Vec<_> = names.iter().map(|r| hub.join(r, "ann")).collect();
        let used = hub.rooms.each().filter(|shard| !shard.is_empty()).count();
        assert_eq!(used, SHARDS, "200 rooms use every shard");
        assert_eq!(hub.room_count(), 200);
        let mut listed = hub.room_names();
        listed.sort();
        assert_eq!(listed, names);
        assert_eq!(hub.local_users().len(), 200);
        let page: Vec<String> = hub
            .rooms_page(Some("room099"), 3)
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(page, ["room100", "room101", "room102"]);
        for (i, room) in names.iter().enumerate() {
            assert_eq!(hub.deliver(&message(room, 5)), 1, "room {i}");
        }
        assert!(hub.observe_epoch("b"));
        for joined in &held {
            assert_eq!(joined.subscription.outbox.verdict(), Some(Verdict::Reset));
        }
        assert!(names.iter().all(|room| hub.position(room) == 0));
        drop(held);
        assert_eq!(hub.room_count(), 0);
        assert!(hub.rooms.each().all(|shard| shard.is_empty()));
    }
}
