//! Per connection: what every session shares (joining a room and replaying its history,
//! writing under the write timeout, closing, the rate limit), the echo endpoint's session, and
//! the channel protocol of `/ws` ([`channels`]), whose one session also serves the
//! single-channel endpoints (`/ws/rooms/NAME`, `/ws/polls/ID`) in their shapes.
//!
//! Each session is one task running one loop over its sources, in this priority: the hub's
//! verdict that the connection fell behind, the server's shutdown (close 1001), the loss of its
//! credential, events queued for it (written in batches: everything queued goes out in one
//! flush), and the client's messages (rate-limited, then handed to the engine).

pub mod channels;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::upgrade::UpgradedWebSocket;
use tether::{CloseCode, CloseFrame, Prepared};

use crate::engine::journal::{ChatWrite, Reply};
use crate::engine::store::{ChatMessage, Poll, StoreError, Voter};
use crate::identity::auth::Identity;
use crate::node::hub::{Format, Outbox, Subscription, Verdict};
use crate::node::wakers::Turn;
use crate::node::{Credential, Node, Slot};
use crate::wire::encode;
use crate::wire::rooms::{self, ChatIn};
use futures_util::{Sink as _, Stream as _};
use std::future::Future as _;
use std::task::Context;
use std::task::Poll as TaskPoll;

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
        Verdict::Disconnected => {
            End::Close(CloseCode::POLICY_VIOLATION, "disconnected by the server")
        }
        Verdict::Reconnect => End::Close(
            CloseCode::SERVICE_RESTART,
            "the server asks this connection to reconnect",
        ),
    }
}

/// Hands a room member's message (`{"text": "…"}`, or plain text) to the journal on behalf of
/// `writer`, whose budget it spends; returns an error event for the client, if any. A
/// failure to store it comes back later, through `sender`.
pub(crate) async fn chat(
    node: &Node,
    writer: &crate::identity::auth::Writer,
    room: String,
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
        room,
        user,
        text,
        key,
        writer: writer.clone(),
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
