//! Per connection: the WebSocket sessions of a chat room member and of the echo endpoint,
//! what every session shares, and the channel protocol of `/ws` ([`channels`]), whose session
//! also serves `/ws/polls/ID` in that endpoint's shape.
//!
//! Each session is one task running one loop over three sources, in this priority: the hub's
//! verdict that the connection fell behind (close 1013), the server's shutdown (close 1001),
//! events queued for it (written in batches: everything queued goes out in one flush), and
//! the client's messages (rate-limited, then handed to the journal).

pub mod channels;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::upgrade::UpgradedWebSocket;
use tether::{CloseCode, CloseFrame, Message, Prepared};

use crate::engine::journal::{ChatWrite, Reply};
use crate::engine::store::{ChatMessage, Poll, StoreError, Voter};
use crate::identity::auth::Identity;
use crate::node::hub::{Format, Outbox, Subscription, Verdict};
use crate::node::wakers::Turn;
use crate::node::{Credential, Node, Slot};
use crate::wire::encode;
use crate::wire::rooms::{self, ChatIn, Ready, Welcome};
use futures_util::{Sink as _, Stream as _, StreamExt as _};
use std::future::Future as _;
use std::task::Context;
use std::task::Poll as TaskPoll;

/// Events written per flush at most, so one busy connection cannot starve its own reads.
const BATCH: usize = 256;

/// A token bucket: `rate` per second sustained, bursts of `2 × rate`. Two words: the rate is
/// the caller's, and time is milliseconds since [`since_start`]'s origin.
#[derive(Debug)]
pub(crate) struct RateLimit {
    tokens: f32,
    /// When tokens were last counted.
    last: u64,
}

impl RateLimit {
    pub(crate) fn new(rate: f64) -> RateLimit {
        RateLimit {
            tokens: (rate * 2.0) as f32,
            last: since_start(),
        }
    }

    pub(crate) fn allow(&mut self, rate: f64) -> bool {
        self.allow_at(rate, since_start())
    }

    /// [`RateLimit::allow`] at `now` (milliseconds).
    fn allow_at(&mut self, rate: f64, now: u64) -> bool {
        let refill = now.saturating_sub(self.last) as f64 / 1000.0 * rate;
        self.tokens = (f64::from(self.tokens) + refill).min(rate * 2.0) as f32;
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Milliseconds since the first call in this process.
fn since_start() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn error_event(text: &str) -> Arc<Prepared> {
    encode(&rooms::Error { error: text })
}

/// Who a session serves: the identity, the credential that proves it (a guest has none, and
/// it is checked again while the connection lasts), and how it votes (`None`: it may not).
#[derive(Debug)]
pub struct Member {
    /// The registered user or guest.
    pub who: Identity,
    /// The session or token the connection was opened with.
    pub credential: Option<Credential>,
    /// Its key in polls.
    pub voter: Option<Voter>,
    /// Revocations since before the credential was checked.
    pub revocations: tokio::sync::watch::Receiver<u64>,
    /// Whose budget its messages spend, over all its connections: the user, or a guest's
    /// address.
    pub writer: crate::identity::auth::Writer,
    /// Whether its transport takes writes from the hub's drainer threads as they come: plain
    /// HTTP/1.1 over TCP (TLS may need to read before it can write; HTTP/2 writes through
    /// its connection's task).
    pub direct: bool,
}

/// On whose behalf a session stores the client's messages.
#[derive(Clone)]
struct Target {
    /// Whose budget its messages spend, over all its connections.
    writer: crate::identity::auth::Writer,
}

/// How a session ended, for the close frame and the log.
pub(crate) enum End {
    /// The client closed or the connection failed; nothing more to send.
    Gone,
    /// Close with this code and reason.
    Close(CloseCode, &'static str),
}

/// Where a client resumes: after message `since` of the stream of `epoch` (`None`: the
/// client did not say, as before epochs existed; only the position is checked).
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// The last id the client holds.
    pub since: Option<u64>,
    /// The epoch that id belongs to.
    pub epoch: Option<String>,
}

/// Runs a chat room member: welcome, history (after `since`, or the recent messages), ready,
/// then live events and the client's messages.
///
/// History is replayed in pages of `REPLAY_PAGE` messages, each read from storage only once
/// the previous one is written: a client that does not read holds one page and the socket's
/// write buffer, not the whole history, and the write timeout ends it.
pub fn room(
    node: Arc<Node>,
    ws: UpgradedWebSocket,
    slot: Slot,
    room: String,
    member: Member,
    resume: Resume,
) -> impl std::future::Future<Output = ()> + Send {
    // An idle member's session is its live loop and little else. The join runs in an
    // allocation of its own, freed before the member goes live; the arguments go straight
    // into it (an `async fn` would keep a copy of them in its state for the whole session).
    let join = Box::pin(join_room(node.clone(), ws, slot, room, member, resume));
    RoomSession::Joining(node, join)
}

/// A room member's session: the join, then the live loop in the same allocation.
// Live is the state a session spends its life in: boxing it would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum RoomSession {
    Joining(
        Arc<Node>,
        std::pin::Pin<Box<dyn std::future::Future<Output = Option<Live>> + Send>>,
    ),
    Live(Pump),
}

impl std::future::Future for RoomSession {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> TaskPoll<()> {
        loop {
            match &mut *self {
                RoomSession::Joining(node, join) => {
                    match std::task::ready!(join.as_mut().poll(cx)) {
                        Some(live) => *self = RoomSession::Live(pump(node.clone(), live)),
                        None => return TaskPoll::Ready(()),
                    }
                }
                RoomSession::Live(pump) => return std::pin::Pin::new(pump).poll(cx),
            }
        }
    }
}

/// A session that has joined: what the live loop starts from.
struct Live {
    ws: UpgradedWebSocket,
    slot: Slot,
    sub: Subscription,
    target: Target,
    /// Written first (`ready`, or the poll's state).
    first: Vec<Arc<Prepared>>,
    /// Live messages up to this id were already sent as history.
    high: u64,
    /// Resolves when the credential is revoked or expires (a guest has none to check).
    lost: Option<Lost>,
}

/// A credential's check, running while the connection lasts (boxed twice: a thin pointer in
/// the session, and none for a guest).
pub(crate) type Lost = Box<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>;

/// Checks `credential` again while the session lasts (see [`Node::credential_lost`]); `None`
/// for a guest, whose session then holds no timer.
pub(crate) fn check_credential(
    node: &Arc<Node>,
    credential: Option<Credential>,
    revocations: tokio::sync::watch::Receiver<u64>,
) -> Option<Lost> {
    let credential = credential?;
    let node = node.clone();
    let every = node.config.credential_check;
    Some(Box::new(Box::pin(async move {
        node.credential_lost(credential, revocations, every).await;
    })))
}

/// Joins a room: welcome, history, ready; `None` when the session ended meanwhile.
async fn join_room(
    node: Arc<Node>,
    mut ws: UpgradedWebSocket,
    slot: Slot,
    room: String,
    member: Member,
    resume: Resume,
) -> Option<Live> {
    let Member {
        who,
        credential,
        revocations,
        writer,
        ..
    } = member;
    tracing::debug!(%room, user = who.name(), since = ?resume.since, epoch = ?resume.epoch, "joining");
    // Joining a room nobody is in and nobody wrote to brings it into being: that is paid for
    // as starting one, whichever endpoint it comes through.
    if let Err(e) = node.may_join_room(&room, &writer).await {
        let (code, why) = match &e {
            StoreError::Limit(why) => (CloseCode::POLICY_VIOLATION, why.as_str()),
            other => {
                tracing::error!(error = %other, %room, "checking the room failed");
                (CloseCode::INTERNAL_ERROR, "storage unavailable: try again")
            }
        };
        tracing::debug!(%room, user = who.name(), why, "room not joined");
        let _ = ws.feed_prepared(&error_event(why)).await;
        close(&node, &mut ws, code, "room not joined").await;
        return None;
    }
    let joining = async {
        let name: Arc<str> = Arc::from(who.name());
        let joined = join(&node, &room, &name, None, Format::Room, &resume).await?;
        let mut members = joined.members;
        if joined.users <= crate::node::hub::PRESENCE_LIMIT {
            // Members on every node.
            if let Ok(everyone) = node.users_elsewhere(&room).await {
                members.extend(everyone);
                members.sort();
                members.dedup();
            }
        }
        Ok::<_, StoreError>((joined.epoch, joined.subscription, members, joined.plan))
    };
    let (epoch, sub, members, plan) = match joining.await {
        Ok(joined) => joined,
        Err(e) => {
            tracing::error!(error = %e, %room, "loading history failed");
            close(
                &node,
                &mut ws,
                CloseCode::INTERNAL_ERROR,
                "history unavailable",
            )
            .await;
            return None;
        }
    };
    if plan.recovered == Some(false) && !plan.truncated {
        // Another epoch, or a position this room never reached (hostile, or storage that lost
        // data): resuming from it would hide messages from this member.
        tracing::info!(%room, since = ?resume.since, client_epoch = ?resume.epoch, %epoch, last_id = plan.end, "resume position not in this room's stream: sending the recent history");
    }
    let welcome = encode(&Welcome {
        room: &room,
        user: who.name(),
        guest: who.is_guest(),
        members: &members,
        epoch: &epoch,
        recovered: plan.recovered,
        truncated: plan.truncated,
    });
    let mut batch = vec![welcome];
    let replayed = replay(
        &node,
        &mut ws,
        &mut batch,
        &sub.outbox,
        judged,
        &room,
        &plan,
        encode,
    );
    let high = match replayed.await {
        Ok(high) => high,
        Err(end) => {
            finish(&node, ws, slot, sub, end, who.name()).await;
            return None;
        }
    };
    tracing::debug!(%room, user = who.name(), replayed = plan.count, last_id = high, "joined");
    let target = Target { writer };
    // Whatever the replay left unwritten goes first.
    let mut first = batch;
    first.push(encode(&Ready {
        last_id: high,
        epoch: &epoch,
    }));
    Some(Live {
        lost: check_credential(&node, credential, revocations),
        ws,
        slot,
        sub,
        target,
        first,
        high,
    })
}

/// Messages replayed per page (read from storage, then written, before the next is read).
const REPLAY_PAGE: usize = 100;

/// What a joining member is replayed: the stored messages with `start < id <= end`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ReplayPlan {
    /// The member resumes after this id: its `since` (raised to the replay limit), or on a
    /// first join or a failed resume the id before the recent messages.
    pub(crate) start: u64,
    /// The room's last id when the member joined; later messages arrive live.
    pub(crate) end: u64,
    /// Some messages after the member's `since` are not replayed: no longer kept, or past
    /// the replay limit.
    truncated: bool,
    /// For a resume: whether exactly the messages after its `since` follow.
    pub(crate) recovered: Option<bool>,
    /// How many stored messages follow: those after `start` up to `end`, from the first one
    /// kept (a room's ids have no gaps after its oldest kept message).
    pub(crate) count: u64,
}

impl ReplayPlan {
    /// `same_epoch`: the client's `since` belongs to the room's current stream (or it gave
    /// no epoch).
    fn new(
        since: Option<u64>,
        same_epoch: bool,
        first: Option<u64>,
        last: u64,
        config: &crate::ServerConfig,
    ) -> ReplayPlan {
        let mut plan = ReplayPlan::positions(since, same_epoch, first, last, config);
        plan.count = match first {
            Some(first) if first <= plan.end => plan.end - plan.start.max(first.saturating_sub(1)),
            _ => 0,
        };
        plan
    }

    /// Where the replay starts and ends (its `count` left at 0).
    fn positions(
        since: Option<u64>,
        same_epoch: bool,
        first: Option<u64>,
        last: u64,
        config: &crate::ServerConfig,
    ) -> ReplayPlan {
        let fresh = ReplayPlan {
            start: last.saturating_sub(config.history_on_join as u64),
            end: last,
            truncated: false,
            recovered: None,
            count: 0,
        };
        let Some(since) = since else {
            return fresh;
        };
        if !same_epoch || since > last {
            // The client's ids are not this stream's: start it afresh, and say so.
            return ReplayPlan {
                recovered: Some(false),
                ..fresh
            };
        }
        let start = since.max(last.saturating_sub(config.max_replay as u64));
        let truncated = start > since || first.is_some_and(|f| f > since.saturating_add(1));
        ReplayPlan {
            start,
            end: last,
            truncated,
            recovered: Some(!truncated),
            count: 0,
        }
    }
}

/// The rooms' epoch in storage.
pub(crate) async fn current_epoch(node: &Node) -> Result<String, StoreError> {
    node.epoch().await
}

pub(crate) async fn plan_replay(
    node: &Node,
    room: &str,
    since: Option<u64>,
    same_epoch: bool,
) -> Result<ReplayPlan, StoreError> {
    let (first, last) = node.bounds(room).await?;
    Ok(ReplayPlan::new(
        since,
        same_epoch,
        first,
        last,
        &node.config,
    ))
}

/// A connection's new subscription to a room, and what it is replayed.
pub(crate) struct Joining {
    /// The subscription.
    pub(crate) subscription: Subscription,
    /// The rooms' epoch the plan's ids belong to.
    pub(crate) epoch: String,
    /// What the connection is replayed.
    pub(crate) plan: ReplayPlan,
    /// Distinct users present on this node, the joiner included.
    pub(crate) users: usize,
    /// Who they are, in name order (none listed past [`crate::node::hub::PRESENCE_LIMIT`]).
    pub(crate) members: Vec<String>,
}

/// Subscribes a connection of `user` speaking `format` to `room`, its events going to
/// `outbox` (a new one when `None`), and plans its replay from `resume`: every endpoint joins
/// a room this way. The epoch is read first: should storage have a new one, the hub resets
/// the room before this connection is in it, not after.
///
/// # Errors
/// Storage failed (the connection has left the room again).
pub(crate) async fn join(
    node: &Node,
    room: &str,
    user: &Arc<str>,
    outbox: Option<Arc<Outbox>>,
    format: Format,
    resume: &Resume,
) -> Result<Joining, StoreError> {
    let mut epoch = current_epoch(node).await?;
    let joined = node.rooms.join_with(room, user, outbox, format);
    let now = node.rooms.epoch();
    if now != epoch {
        // Storage changed epoch between the read and the join (another task noticed): this
        // connection joined after the reset, so it takes the new one.
        epoch = now;
    }
    let same_epoch = resume.epoch.as_deref().is_none_or(|e| e == epoch);
    let plan = plan_replay(node, room, resume.since, same_epoch).await?;
    Ok(Joining {
        subscription: joined.subscription,
        epoch,
        plan,
        users: joined.users,
        members: joined.members,
    })
}

/// Writes `plan`'s replay of `room` after what `batch` holds, each message as `render`
/// makes it: a page is read from storage only once the previous one is in the socket's write
/// buffer, so a client that asks for all of a room's history and reads none of it holds one
/// page, not the history. Returns the last id replayed (the plan's start when none); what
/// is left in `batch` is not written yet. `Err` ends the session (`judge` words the hub's
/// verdict): the socket took nothing within the write timeout, or storage failed halfway.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn replay(
    node: &Node,
    ws: &mut impl Socket,
    batch: &mut Vec<Arc<Prepared>>,
    outbox: &Outbox,
    judge: fn(&Node, Verdict) -> End,
    room: &str,
    plan: &ReplayPlan,
    render: fn(&ChatMessage) -> Arc<Prepared>,
) -> Result<u64, End> {
    let mut high = plan.start;
    if plan.count == 0 {
        node.rooms.advance(room, high);
        return Ok(high);
    }
    while high < plan.end {
        if let Some(end) = write_all(node, ws, batch, outbox, judge).await {
            return Err(end);
        }
        let page = match read_page(node, room, high, plan.end).await {
            Ok(page) => page,
            Err(e) => {
                tracing::error!(error = %e, %room, "loading history failed");
                return Err(End::Close(CloseCode::INTERNAL_ERROR, "history unavailable"));
            }
        };
        let Some(last) = page.last() else {
            break;
        };
        high = last.id;
        batch.extend(page.iter().map(render));
    }
    node.rooms.advance(room, high);
    Ok(high)
}

/// The next page of history: messages with `after < id <= end`, oldest first.
pub(crate) async fn read_page(
    node: &Node,
    room: &str,
    after: u64,
    end: u64,
) -> Result<Vec<ChatMessage>, StoreError> {
    let mut page = node.history(room, after, end, REPLAY_PAGE).await?;
    page.retain(|m| m.id > after && m.id <= end);
    Ok(page)
}

/// Poll `id` as stored now (`None` when there is no such poll), and `voter`'s vote in it.
pub(crate) async fn poll_state(
    node: &Node,
    id: i64,
    voter: Option<&Voter>,
) -> Result<(Option<Poll>, Option<String>), StoreError> {
    node.poll(id, voter.map(|v| v.key.as_str())).await
}

/// Echoes every text and binary message until the client closes or the server shuts down.
pub fn echo(
    node: Arc<Node>,
    ws: UpgradedWebSocket,
    slot: Slot,
) -> impl std::future::Future<Output = ()> + Send {
    Echo::Open(EchoSession {
        node: Registered { node, key: None },
        ws,
        slot,
        turn: Turn::default(),
        stall: Stall::default(),
    })
}

/// An echo session, written out by hand: an `async fn` doing the same kept the close
/// handshake's and each wait's futures in its state beside the socket (592 bytes; this is the
/// socket, its slot and five words).
// Open is the state a session spends its life in: boxing it would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Echo {
    Open(EchoSession),
    /// Sending the close frame, boxed: its timer and frame exist only while it runs.
    Closing(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>),
    Done,
}

struct EchoSession {
    node: Registered,
    ws: UpgradedWebSocket,
    slot: Slot,
    turn: Turn,
    stall: Stall,
}

/// The write deadline of a session whose client takes nothing: set when bytes start to wait,
/// started again whenever what waits shrinks, let go once everything is written.
#[derive(Default)]
struct Stall(Option<Box<Deadline>>);

/// A stall's deadline, and what waited when it was (re)started.
struct Deadline {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    queued: usize,
    waiting: usize,
}

impl Stall {
    /// Nothing waits.
    fn clear(&mut self) {
        self.0 = None;
    }

    /// `Ready` once neither `queued` (bytes) nor `waiting` (messages) went down for `timeout`.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        timeout: Duration,
        queued: usize,
        waiting: usize,
    ) -> TaskPoll<()> {
        let deadline = match &mut self.0 {
            Some(set) if queued >= set.queued && waiting >= set.waiting => {
                // Nothing taken (more may have been queued since).
                (set.queued, set.waiting) = (queued, waiting);
                &mut set.sleep
            }
            stall => {
                let started = Deadline {
                    sleep: Box::pin(tokio::time::sleep(timeout)),
                    queued,
                    waiting,
                };
                &mut stall.insert(Box::new(started)).sleep
            }
        };
        deadline.as_mut().poll(cx)
    }
}

/// The node, and the key of the session's waker among those woken at shutdown (the hub does
/// not know an echo session); the waker is forgotten when this is dropped.
struct Registered {
    node: Arc<Node>,
    key: Option<u64>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.node.wakers.remove(key);
        }
    }
}

impl EchoSession {
    /// Echoes until the session must end.
    fn poll_echo(&mut self, cx: &mut Context<'_>) -> TaskPoll<End> {
        if self.node.key.is_none() {
            self.node.key = Some(self.node.node.wakers.insert(cx.waker()));
        }
        let node = &self.node.node;
        let mut ws = std::pin::Pin::new(&mut self.ws);
        loop {
            if node.is_shutting_down() {
                return TaskPoll::Ready(End::Close(CloseCode::GOING_AWAY, "server shutting down"));
            }
            // Over the write budget, what waits is written out before more is read: a
            // client that sends but never reads is held here, then dropped by the deadline.
            // (Not `poll_ready`: once the client's Close is answered it refuses, and the
            // answer must still be written.)
            if ws.queued_len() >= ws.config().write_buffer_size {
                match ws.as_mut().poll_flush(cx) {
                    TaskPoll::Ready(Ok(())) => {}
                    TaskPoll::Ready(Err(_)) => return TaskPoll::Ready(End::Gone),
                    TaskPoll::Pending => return self.poll_stall(cx),
                }
            }
            match ws.as_mut().poll_next(cx) {
                TaskPoll::Ready(Some(Ok(msg))) if msg.is_data() => {
                    let len = msg.as_payload().len();
                    count_in(node, len);
                    node.metrics.sent(len);
                    if ws.as_mut().start_send(msg).is_err() {
                        return TaskPoll::Ready(End::Gone);
                    }
                    if self.turn.poll_step(cx).is_pending() {
                        return TaskPoll::Pending;
                    }
                }
                TaskPoll::Ready(Some(Ok(_))) => {}
                TaskPoll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "echo connection failed");
                    return TaskPoll::Ready(End::Gone);
                }
                TaskPoll::Ready(None) => return TaskPoll::Ready(End::Gone),
                // Receiving wrote what it could of the echoes.
                TaskPoll::Pending if ws.queued_len() > 0 => return self.poll_stall(cx),
                TaskPoll::Pending => {
                    self.stall.clear();
                    return TaskPoll::Pending;
                }
            }
        }
    }

    /// Bytes wait for the client: it must take some within the write timeout.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> TaskPoll<End> {
        let timeout = self.node.node.config.write_timeout;
        let queued = self.ws.queued_len();
        std::task::ready!(self.stall.poll(cx, timeout, queued, 0));
        TaskPoll::Ready(stalled(&self.node.node))
    }
}

impl std::future::Future for Echo {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> TaskPoll<()> {
        loop {
            match &mut *self {
                Echo::Open(session) => {
                    let end = std::task::ready!(session.poll_echo(cx));
                    let Echo::Open(session) = std::mem::replace(&mut *self, Echo::Done) else {
                        unreachable!("the session was open");
                    };
                    if let End::Close(code, reason) = end {
                        let EchoSession {
                            node, mut ws, slot, ..
                        } = session;
                        *self = Echo::Closing(Box::pin(async move {
                            close(&node.node, &mut ws, code, reason).await;
                            drop(slot);
                            drop(node);
                        }));
                    }
                }
                Echo::Closing(closing) => {
                    std::task::ready!(closing.as_mut().poll(cx));
                    *self = Echo::Done;
                }
                Echo::Done => return TaskPoll::Ready(()),
            }
        }
    }
}

/// Moves the value out of `boxed` and frees the box at once. `let x = *boxed;` in an `async`
/// body would keep the emptied allocation until `boxed` goes out of scope: for an argument or
/// a captured variable, the whole session.
#[allow(clippy::boxed_local)] // taking the box is the point
pub(crate) fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

/// Resolves once the server is shutting down. It registers no waker: when shutdown begins,
/// every session is polled ([`crate::node::wakers::Sessions::wake_all`]), so an idle one holds
/// nothing for it.
pub(crate) fn shutting_down(node: &Node) -> impl std::future::Future<Output = ()> + '_ {
    std::future::poll_fn(move |_| {
        if node.is_shutting_down() {
            TaskPoll::Ready(())
        } else {
            TaskPoll::Pending
        }
    })
}

pub(crate) fn count_in(node: &Node, len: usize) {
    node.metrics.messages_in.fetch_add(1, Relaxed);
    node.metrics.bytes_in.fetch_add(len as u64, Relaxed);
}

/// What the sessions write through: an upgraded socket, owned whole or shared with the hub's
/// drainer ([`tether::SharedWebSocket`]).
pub(crate) trait Socket: Send {
    /// Bytes queued and not yet written.
    fn queued_len(&self) -> usize;
    /// Queues a prepared message.
    fn feed_prepared<'a>(
        &'a mut self,
        msg: &'a Prepared,
    ) -> impl std::future::Future<Output = tether::Result<()>> + Send + 'a;
    /// Writes what is queued.
    fn flush(&mut self) -> impl std::future::Future<Output = tether::Result<()>> + Send + '_;
    /// Closes with `frame`, waiting for the peer's Close.
    fn close(
        &mut self,
        frame: Option<CloseFrame>,
    ) -> impl std::future::Future<Output = tether::Result<()>> + Send + '_;
}

/// Implements [`Socket`] for a type with the same methods of its own.
macro_rules! socket {
    ($t:ty) => {
        impl Socket for $t {
            fn queued_len(&self) -> usize {
                <$t>::queued_len(self)
            }
            fn feed_prepared<'a>(
                &'a mut self,
                msg: &'a Prepared,
            ) -> impl std::future::Future<Output = tether::Result<()>> + Send + 'a {
                <$t>::feed_prepared(self, msg)
            }
            fn flush(
                &mut self,
            ) -> impl std::future::Future<Output = tether::Result<()>> + Send + '_ {
                <$t>::flush(self)
            }
            fn close(
                &mut self,
                frame: Option<CloseFrame>,
            ) -> impl std::future::Future<Output = tether::Result<()>> + Send + '_ {
                <$t>::close(self, frame)
            }
        }
    };
}

socket!(UpgradedWebSocket);
socket!(tether::SharedWebSocket<tether::upgrade::UpgradedIo>);

pub(crate) async fn close(node: &Node, ws: &mut impl Socket, code: CloseCode, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.to_owned(),
    };
    // The close waits for the peer's Close up to close_timeout; a peer that stopped reading
    // may never let our Close out, so bound the whole attempt.
    let limit = node.ws_config.close_timeout + Duration::from_secs(1);
    let _ = tokio::time::timeout(limit, ws.close(Some(frame))).await;
}

/// Writes `first`, then events and the client's messages until one side ends.
fn pump(node: Arc<Node>, live: Live) -> Pump {
    let Live {
        ws,
        slot,
        sub,
        target,
        first,
        high,
        lost,
    } = live;
    Pump::Live(LiveLoop {
        limit: RateLimit::new(node.config.message_rate),
        node,
        ws,
        slot,
        sub,
        target,
        lost,
        batch: first,
        high,
        turn: Turn::default(),
        stall: Stall::default(),
        handling: None,
    })
}

/// A member's session once it has joined, written out by hand: it is what an idle
/// connection's task holds, and an `async fn` kept each wait's future and temporaries in its
/// state beside the socket (768 bytes). Nothing is reserved ahead: the batch is let go once
/// written, and the rare long steps (a client's message, the end) run in allocations of their
/// own.
// Live is the state a session spends its life in: boxing it would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Pump {
    Live(LiveLoop),
    /// Leaving the hub and sending the close frame.
    Ending(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>),
    Done,
}

struct LiveLoop {
    node: Arc<Node>,
    ws: UpgradedWebSocket,
    slot: Slot,
    sub: Subscription,
    target: Target,
    lost: Option<Lost>,
    limit: RateLimit,
    /// Events to write (`ready` or the poll's state first).
    batch: Vec<Arc<Prepared>>,
    /// Live messages up to this id were already sent as history.
    high: u64,
    turn: Turn,
    stall: Stall,
    /// The client's message being handed to storage; its reply, if any, is written next.
    /// Boxed twice: a thin pointer in the session, for a step most sessions rarely take.
    handling: Option<Box<Handling>>,
}

/// A client's message on its way to storage.
type Handling = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Arc<Prepared>>> + Send>>;

impl LiveLoop {
    fn poll_live(&mut self, cx: &mut Context<'_>) -> TaskPoll<End> {
        loop {
            if let Some(handling) = &mut self.handling {
                let reply = std::task::ready!(handling.as_mut().as_mut().poll(cx));
                self.handling = None;
                self.batch.extend(reply);
            }
            std::task::ready!(self.turn.poll_step(cx));
            match self.poll_write(cx) {
                TaskPoll::Ready(Ok(())) => {}
                TaskPoll::Ready(Err(end)) => return TaskPoll::Ready(end),
                TaskPoll::Pending => return TaskPoll::Pending,
            }
            if self.batch.capacity() > 0 {
                // Written: an idle session keeps no room for a batch.
                self.batch = Vec::new();
            }
            let woke = wait(
                cx,
                &self.node,
                &self.sub,
                &mut self.lost,
                &mut self.ws,
                &mut self.batch,
                self.high,
            );
            match std::task::ready!(woke) {
                Woke::End(end) => return TaskPoll::Ready(end),
                Woke::Events => {}
                Woke::Message(incoming) => {
                    if let Some(end) = self.take(incoming) {
                        return TaskPoll::Ready(end);
                    }
                }
            }
        }
    }

    /// Writes the batch. While the socket takes nothing, the hub's verdict and the server's
    /// shutdown still end the session, and so does the write timeout: each message must find
    /// room, and the flush must shrink what is queued, within it. A slow reader goes on; one
    /// that accepts nothing is dropped (a close frame could not reach it either).
    fn poll_write(&mut self, cx: &mut Context<'_>) -> TaskPoll<Result<(), End>> {
        match write_now(&mut self.ws, &mut self.batch, cx) {
            Err(()) => return TaskPoll::Ready(Err(End::Gone)),
            Ok(true) => {
                self.stall.clear();
                return TaskPoll::Ready(Ok(()));
            }
            Ok(false) => {}
        }
        if let TaskPoll::Ready(verdict) = self.sub.outbox.poll_verdict(cx) {
            return TaskPoll::Ready(Err(judged(&self.node, verdict)));
        }
        if self.node.is_shutting_down() {
            let end = End::Close(CloseCode::GOING_AWAY, "server shutting down");
            return TaskPoll::Ready(Err(end));
        }
        let timeout = self.node.config.write_timeout;
        let (queued, waiting) = (self.ws.queued_len(), self.batch.len());
        std::task::ready!(self.stall.poll(cx, timeout, queued, waiting));
        TaskPoll::Ready(Err(stalled(&self.node)))
    }

    /// Takes what the client sent; `Some` when the session must end.
    fn take(&mut self, incoming: Option<tether::Result<Message>>) -> Option<End> {
        match incoming {
            Some(Ok(Message::Text(text))) => {
                count_in(&self.node, text.len());
                if !self.limit.allow(self.node.config.message_rate) {
                    self.node.metrics.rate_limited.fetch_add(1, Relaxed);
                    tracing::warn!(user = self.sub.user(), "message rate limit exceeded");
                    let end =
                        End::Close(CloseCode::POLICY_VIOLATION, "message rate limit exceeded");
                    return Some(end);
                }
                // The same person over several connections: the message is refused, the
                // connections stay (none of them alone went too fast).
                if !self.node.spend_socket_message(&self.target.writer) {
                    self.batch
                        .push(error_event(crate::node::IDENTITY_RATE_REFUSAL));
                    return None;
                }
                let (node, target) = (self.node.clone(), self.target.clone());
                let room =
                    crate::wire::channels::channel_room(self.sub.channel()).map(str::to_owned);
                let (user, sender) = (self.sub.user().to_owned(), self.sub.sender());
                self.handling = Some(Box::new(Box::pin(async move {
                    handle(&node, &target, room, user, &text, sender).await
                })));
                None
            }
            Some(Ok(Message::Binary(_))) => {
                self.batch.push(error_event("send JSON text, not binary"));
                None
            }
            Some(Ok(_)) => None,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "connection failed");
                Some(End::Gone)
            }
            None => Some(End::Gone),
        }
    }
}

impl std::future::Future for Pump {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> TaskPoll<()> {
        loop {
            match &mut *self {
                Pump::Live(live) => {
                    let end = std::task::ready!(live.poll_live(cx));
                    let Pump::Live(live) = std::mem::replace(&mut *self, Pump::Done) else {
                        unreachable!("the session was live");
                    };
                    let LiveLoop {
                        node,
                        ws,
                        slot,
                        sub,
                        ..
                    } = live;
                    *self = Pump::Ending(Box::pin(async move {
                        let user = sub.user().to_owned();
                        finish(&node, ws, slot, sub, end, &user).await;
                    }));
                }
                Pump::Ending(ending) => {
                    std::task::ready!(ending.as_mut().poll(cx));
                    *self = Pump::Done;
                }
                Pump::Done => return TaskPoll::Ready(()),
            }
        }
    }
}

/// What woke a waiting session.
enum Woke {
    /// The session must end.
    End(End),
    /// Events to write are in the batch.
    Events,
    /// The client sent something, or its connection ended.
    Message(Option<tether::Result<Message>>),
}

/// Waits for whatever comes first, in this order: the hub's verdict, the server's shutdown,
/// the credential's loss, events (taken into `batch`), the client. Written as a function
/// polled in place rather than a `select!` of futures, so a waiting session holds references
/// and nothing else.
fn wait(
    cx: &mut Context<'_>,
    node: &Node,
    sub: &Subscription,
    lost: &mut Option<Lost>,
    ws: &mut UpgradedWebSocket,
    batch: &mut Vec<Arc<Prepared>>,
    high: u64,
) -> TaskPoll<Woke> {
    if let TaskPoll::Ready(verdict) = sub.outbox.poll_verdict(cx) {
        return TaskPoll::Ready(Woke::End(judged(node, verdict)));
    }
    if node.is_shutting_down() {
        let end = End::Close(CloseCode::GOING_AWAY, "server shutting down");
        return TaskPoll::Ready(Woke::End(end));
    }
    if let Some(check) = lost {
        if check.as_mut().as_mut().poll(cx).is_ready() {
            tracing::info!(user = sub.user(), "credential revoked or expired: closing");
            let end = End::Close(
                CloseCode::POLICY_VIOLATION,
                "credentials revoked or expired",
            );
            return TaskPoll::Ready(Woke::End(end));
        }
    }
    while batch.len() < BATCH {
        match sub.outbox.poll_recv(cx) {
            // Live messages already sent as history are skipped (ids only grow).
            TaskPoll::Ready(o) if o.id == 0 || o.id > high => batch.push(o.msg),
            TaskPoll::Ready(_) => {}
            TaskPoll::Pending => break,
        }
    }
    if !batch.is_empty() {
        return TaskPoll::Ready(Woke::Events);
    }
    ws.poll_next_unpin(cx).map(Woke::Message)
}

/// Writes what the socket takes without waiting: `Ok(true)` when all of `batch` is written and
/// flushed, `Ok(false)` when it would wait (`batch` keeps what is not queued yet). Polled with
/// the session's own waker (`now_or_never`'s would make the socket track a second task).
fn write_now(
    ws: &mut UpgradedWebSocket,
    batch: &mut Vec<Arc<Prepared>>,
    cx: &mut Context<'_>,
) -> Result<bool, ()> {
    let mut queued = 0;
    for msg in batch.iter() {
        match std::pin::pin!(ws.feed_prepared(msg)).poll(cx) {
            TaskPoll::Ready(Ok(())) => queued += 1,
            TaskPoll::Ready(Err(_)) => return Err(()),
            TaskPoll::Pending => break,
        }
    }
    batch.drain(..queued);
    if !batch.is_empty() {
        return Ok(false);
    }
    match std::pin::pin!(ws.flush()).poll(cx) {
        TaskPoll::Ready(Ok(())) => Ok(true),
        TaskPoll::Ready(Err(_)) => Err(()),
        TaskPoll::Pending => Ok(false),
    }
}

/// Polls `fut` once, with the session's own waker: its output if it is done at once.
async fn at_once<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        TaskPoll::Ready(output) => TaskPoll::Ready(Some(output)),
        TaskPoll::Pending => TaskPoll::Ready(None),
    })
    .await
}

/// Writes `batch` (emptying it) unless the session must end first: the hub gave up on a slow
/// consumer, the server is shutting down, the connection failed, or the client accepted
/// nothing for the write timeout (it may never read again: a close frame could not reach it
/// either, so the connection is just dropped). `judge` turns the hub's verdict into the
/// session's end, in the close codes of its protocol.
pub(crate) async fn write_all(
    node: &Node,
    ws: &mut impl Socket,
    batch: &mut Vec<Arc<Prepared>>,
    outbox: &crate::node::hub::Outbox,
    judge: fn(&Node, Verdict) -> End,
) -> Option<End> {
    if batch.is_empty() && ws.queued_len() == 0 {
        return None;
    }
    // The deadline runs only while nothing moves: each message must find room in the write
    // buffer, and the flush must shrink what is queued, within the write timeout. A slow
    // reader keeps going; one that accepts nothing is dropped.
    let timeout = node.config.write_timeout;
    let write = async {
        for msg in batch.drain(..) {
            // Usually there is room at once: no timer for that (fan-out feeds every message).
            match at_once(ws.feed_prepared(&msg)).await {
                Some(Ok(())) => continue,
                Some(Err(_)) => return Some(End::Gone),
                None => {}
            }
            match tokio::time::timeout(timeout, ws.feed_prepared(&msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Some(End::Gone),
                Err(_) => return Some(stalled(node)),
            }
        }
        let mut queued = ws.queued_len();
        loop {
            match tokio::time::timeout(timeout, ws.flush()).await {
                Ok(Ok(())) => return None,
                Ok(Err(_)) => return Some(End::Gone),
                Err(_) if ws.queued_len() < queued => queued = ws.queued_len(),
                Err(_) => return Some(stalled(node)),
            }
        }
    };
    let end = tokio::select! {
        biased;
        verdict = std::future::poll_fn(|cx| outbox.poll_verdict(cx)) => Some(judge(node, verdict)),
        () = shutting_down(node) => Some(End::Close(CloseCode::GOING_AWAY, "server shutting down")),
        end = write => end,
    };
    batch.clear();
    end
}

/// A client that accepted nothing for the write timeout: counted, logged, dropped (a close
/// frame could not reach it either).
fn stalled(node: &Node) -> End {
    node.metrics.write_timeouts.fetch_add(1, Relaxed);
    tracing::info!(timeout = ?node.config.write_timeout, "client accepted nothing within the write timeout: dropping it");
    End::Gone
}

/// Ends a session: leaves the hub, sends the close frame if there is one to send, frees the
/// connection's slot.
async fn finish(
    node: &Node,
    mut ws: UpgradedWebSocket,
    mut slot: Slot,
    sub: Subscription,
    end: End,
    user: &str,
) {
    // Leave first, then free the nickname: nobody else can take it while the room still
    // counts this connection under it.
    drop(sub);
    slot.release_nickname();
    match end {
        End::Gone => tracing::debug!(user, "session ended"),
        End::Close(code, reason) => {
            tracing::debug!(user, code = code.0, reason, "closing session");
            close(node, &mut ws, code, reason).await;
        }
    }
    drop(slot);
}

/// How a session ends on the hub's verdict.
pub(crate) fn judged(node: &Node, verdict: Verdict) -> End {
    match verdict {
        Verdict::Slow => {
            node.metrics.slow_consumers.fetch_add(1, Relaxed);
            End::Close(CloseCode::TRY_AGAIN_LATER, "slow consumer: too far behind")
        }
        Verdict::Reset => End::Close(
            CloseCode::SERVICE_RESTART,
            "the room's history was reset: reconnect",
        ),
    }
}

/// Hands a client's message to the journal; returns an error event for the client, if any.
async fn handle(
    node: &Node,
    target: &Target,
    room: Option<String>,
    user: String,
    text: &str,
    sender: Arc<crate::node::hub::Outbox>,
) -> Option<Arc<Prepared>> {
    let (text, key) = match serde_json::from_str::<ChatIn>(text) {
        Ok(ChatIn { text, key }) => (text, key),
        // Plain text, as wscat and `tether connect` send it: the message is the text.
        Err(_) if !text.trim_start().starts_with('{') => (text.to_owned(), None),
        Err(_) => {
            return Some(error_event(
                "expected {\"text\": \"...\"}, or plain text that does not start with {",
            ))
        }
    };
    if let Some(problem) = node.text_problem(&text) {
        return Some(error_event(&problem));
    }
    if key
        .as_deref()
        .is_some_and(|k| !crate::identity::auth::valid_key(k))
    {
        return Some(error_event(crate::identity::auth::KEY_RULE));
    }
    // Stored, then delivered to the room, this member included; a failure comes back as an
    // error event.
    let write = ChatWrite {
        room: room.unwrap_or_default(),
        user,
        text,
        key,
        writer: target.writer.clone(),
        reply: Reply::Socket(sender),
    };
    match node.publish(write).await {
        Ok(()) => None,
        Err(e) => Some(error_event(&format!("message not stored: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(since: Option<u64>, same_epoch: bool, first: Option<u64>, last: u64) -> ReplayPlan {
        let config = crate::ServerConfig {
            history_on_join: 50,
            max_replay: 1000,
            ..crate::ServerConfig::default()
        };
        ReplayPlan::new(since, same_epoch, first, last, &config)
    }

    #[test]
    fn replay_plans() {
        let fresh = |recovered| ReplayPlan {
            start: 450,
            end: 500,
            truncated: false,
            recovered,
            count: 50,
        };
        assert_eq!(plan(None, true, Some(1), 500), fresh(None), "first join");
        assert_eq!(
            plan(Some(10_000), true, Some(1), 500),
            fresh(Some(false)),
            "ahead of the room"
        );
        assert_eq!(
            plan(Some(400), false, Some(1), 500),
            fresh(Some(false)),
            "another epoch"
        );
        let exact = plan(Some(400), true, Some(1), 500);
        assert_eq!((exact.start, exact.recovered), (400, Some(true)));
        let trimmed = plan(Some(5), true, Some(100), 500);
        assert_eq!(
            (
                trimmed.start,
                trimmed.truncated,
                trimmed.recovered,
                trimmed.count
            ),
            (5, true, Some(false), 401)
        );
        let capped = plan(Some(5), true, Some(1), 5000);
        assert_eq!(
            (
                capped.start,
                capped.truncated,
                capped.recovered,
                capped.count
            ),
            (4000, true, Some(false), 1000)
        );
        assert_eq!(plan(None, true, None, 0).count, 0, "an empty room");
        assert_eq!(plan(Some(3), true, Some(1), 3).count, 0, "up to date");
        assert_eq!(
            plan(Some(500), true, Some(1), 500).recovered,
            Some(true),
            "up to date"
        );
    }

    /// What an idle room member's task points to: at most 512 bytes, jemalloc's size class
    /// below 640 (about 128 bytes per member; docs/decisions.md, 14).
    #[test]
    fn a_room_session_fits_in_512_bytes() {
        let size = std::mem::size_of::<RoomSession>();
        assert!(size <= 512, "a room session takes {size} bytes");
    }

    #[test]
    fn rate_limit_allows_a_burst_then_the_rate() {
        let mut limit = RateLimit::new(5.0);
        let start = limit.last;
        assert!(
            (0..10).all(|_| limit.allow_at(5.0, start)),
            "a burst of twice the rate"
        );
        assert!(!limit.allow_at(5.0, start));
        let later = start + 400;
        assert!(
            limit.allow_at(5.0, later) && limit.allow_at(5.0, later),
            "0.4 s refills two"
        );
        assert!(!limit.allow_at(5.0, later));
    }
}
