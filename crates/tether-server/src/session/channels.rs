//! The channel protocol (`/ws`, subprotocol `tether.v1`; docs/protocol.md): one connection,
//! many channels. A session answers the client's commands in order and writes the pushes of
//! every channel it is subscribed to, which all share one outbound queue.
//!
//! The same session serves the single-channel endpoints (`/ws/rooms/NAME`, `/ws/polls/ID`) in
//! their shapes (`Shape`): subscribed to their channel before the session runs, their frames
//! read as messages or votes, their events, errors and closes written in the endpoints'
//! format (docs/api.md). There is one session loop in the server, and one of every defence.

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Poll as TaskPoll;

use futures_util::future::{Either, FutureExt as _};
use futures_util::stream::{FuturesOrdered, StreamExt};
use serde::Serialize;
use serde_json::Value;
use tether::upgrade::UpgradedWebSocket;
use tether::{CloseCode, Message, Prepared};

use crate::engine::journal::{self, ChatWrite, VoteWrite};
use crate::engine::store::{ChatMessage, StoreError};
use crate::node::hub::{Everyone, Format, Hub, Outbox, Outgoing, Place, Subscription, Verdict};
use crate::node::{Node, Slot};
use crate::session::{self, End, Member, RateLimit};
use crate::wire::channels::{
    self, channel_room, channel_stream, disconnect, fail, parse_channel, Code, Command, Failure,
    Name, Present, Reply, Stored, TextData, VoteData,
};
use crate::wire::{encode, rooms};

pub use crate::wire::channels::{FAMILY, PROTOCOL};

/// Commands refused in a row for the rate (error 110) before the connection is closed
/// (4002): a client that ignores the answer only costs the server the reading.
const MAX_REFUSED: u8 = 32;

/// Subscriptions one connection may hold.
const MAX_CHANNELS: usize = 128;
/// Publications `history` returns at most.
const HISTORY_LIMIT: usize = 100;
/// Polls the `polls` channel's reply lists, newest first (as `GET /api/polls`).
const POLL_LIST: usize = 50;
/// The largest ephemeral event's data, encoded.
const MAX_EVENT_DATA: usize = 256;

/// The most a connection's public information (`connect {info}`) may take, encoded.
pub const MAX_INFO: usize = 1024;

/// The deepest a connection's public information may nest (the object itself is depth 1).
/// Every reader of presence parses it again (other sessions, other nodes, browsers): what is
/// let in is well within what each of them reads back.
pub const MAX_INFO_DEPTH: usize = 8;

/// Whether `info`, as sent, is public information a connection may attach: a JSON object of
/// at most [`MAX_INFO`] bytes nesting at most [`MAX_INFO_DEPTH`] deep; the reason otherwise.
fn info_problem(info: &serde_json::value::RawValue) -> Option<String> {
    let raw = info.get();
    if raw.len() > MAX_INFO {
        return Some(format!("info takes at most {MAX_INFO} bytes"));
    }
    // Parsed in full (serde_json stops at 128 levels, where the raw form did not look).
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(_)) => {}
        Ok(_) => return Some("info is an object".into()),
        Err(_) => return Some(format!("info nests at most {MAX_INFO_DEPTH} levels")),
    }
    (json_depth(raw) > MAX_INFO_DEPTH)
        .then(|| format!("info nests at most {MAX_INFO_DEPTH} levels"))
}

/// How deep the arrays and objects of valid JSON text `raw` nest (a scalar is 0).
fn json_depth(raw: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for byte in raw.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// A channel this connection is subscribed to. Its name is not kept: the subscription's
/// topic says it (a room's name is shared with the hub). The session keeps the hub, the
/// user and the outbox once for all its channels ([`Channels`]).
struct Channel {
    sub: Place,
    /// Live publications up to this offset were already written as replay.
    high: u64,
}

impl Channel {
    fn new(sub: Subscription, high: u64) -> Channel {
        Channel {
            sub: sub.into_place(),
            high,
        }
    }
}

/// A connection's channels. Each leaves the hub when removed; the session leaves the rest,
/// and its place among those a broadcast reaches, when it is dropped (it holds the hub once
/// for all of them).
struct Channels {
    list: Vec<Channel>,
}

impl Channels {
    /// Keeps a new subscription, growing the list by one (no spare room kept).
    fn add(&mut self, channel: Channel) {
        self.list.reserve_exact(1);
        self.list.push(channel);
    }

    /// Leaves the channel at `i`.
    fn remove(&mut self, i: usize, hub: &Hub) {
        let channel = self.list.swap_remove(i);
        hub.leave(channel.sub);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let hub = &self.node.hub;
        for channel in self.channels.list.drain(..) {
            hub.leave(channel.sub);
        }
        hub.leave_everyone(&self.everyone);
    }
}

impl std::ops::Deref for Channels {
    type Target = [Channel];

    fn deref(&self) -> &[Channel] {
        &self.list
    }
}

/// A room publication, checked, on its way to storage.
struct Post {
    room: String,
    text: String,
    key: Option<String>,
}

/// Replies to publications on their way to storage, in command order.
type Storing = FuturesOrdered<std::pin::Pin<Box<dyn Future<Output = Arc<Prepared>> + Send>>>;

/// Publications a connection may have on their way to storage at once; past it, its next
/// commands wait.
const MAX_STORING: usize = 64;

/// A subscription's reply, and the publications that follow it.
struct Subscribing {
    reply: channels::Subscribed,
    replay: Option<Replay>,
}

/// A command's reply with fields, encoded, and for a subscription the publications that
/// follow it.
struct Answered {
    reply: Arc<Prepared>,
    replay: Option<Replay>,
}

/// Command `id`'s reply, with `body`'s fields.
fn answered(id: u64, body: impl Serialize) -> Answered {
    Answered {
        reply: encode(&Reply { id, body }),
        replay: None,
    }
}

/// A room's stored publications that follow a subscription's reply, as planned, written a
/// page at a time ([`session::replay`]).
struct Replay {
    room: String,
    plan: session::ReplayPlan,
}

/// Who a connection is, as its session needs it: its name is its outbox's
/// ([`Outbox::user`]), and the credential it came with is watched (`Session::lost`), not
/// kept.
struct Caller {
    kind: Kind,
    /// Its key in polls (boxed: most connections never vote, and every byte of the session's
    /// state is kept for its whole life).
    voter: Option<Box<crate::engine::store::Voter>>,
    writer: crate::identity::auth::Writer,
    /// Revocations since before the credential was checked.
    revocations: tokio::sync::watch::Receiver<u64>,
}

/// What kind of identity a connection has.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    User,
    Guest,
    /// No identity at all: it watches.
    Anonymous,
}

/// The socket of a session of the channel protocol: shared, so that fan-out can write to it
/// directly while the session waits.
type Socket = tether::SharedWebSocket<tether::upgrade::UpgradedIo>;

/// Why a session's wait ended.
enum Woke {
    End(End),
    /// A publication's reply from storage (`None`: none is on its way).
    Stored(Option<Arc<Prepared>>),
    /// Events in the outbox, or bytes the drainer left in the socket (or nothing at all).
    Events,
    /// A command.
    Command(tether::Utf8Bytes),
}

/// What a connection's frames are: the channel protocol's commands and replies, or the shape
/// of a single-channel endpoint, which is this session with a codec in front: its frames are
/// read as that endpoint's, and its events, errors and closes are written in its format.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `/ws`, tether.v1.
    Channels,
    /// `/ws/polls/ID`: the poll's state first, then its counts as they change; the client
    /// sends `{"vote": "…"}`, and hears back only why a vote was not counted. Its one channel
    /// is the poll's, subscribed from the start.
    Poll,
    /// `/ws/rooms/NAME`: `welcome`, the history, `ready`, then the room's events; the client
    /// sends its messages as `{"text": "…"}` or plain text, and hears back only why one was
    /// not stored. Its one channel is the room's, joined before the session runs.
    Room,
}

impl Shape {
    /// How the hub's verdict ends a session of this shape.
    fn judge(self) -> fn(&Node, Verdict) -> End {
        match self {
            Shape::Channels => judged,
            Shape::Poll | Shape::Room => session::judged,
        }
    }

    /// How a revoked or expired credential ends a session of this shape.
    fn lost_credential(self) -> End {
        match self {
            Shape::Channels => {
                End::Close(disconnect::CREDENTIAL_LOST, "credential revoked or expired")
            }
            Shape::Poll | Shape::Room => End::Close(
                CloseCode::POLICY_VIOLATION,
                "credentials revoked or expired",
            ),
        }
    }
}

/// A session of the channel protocol.
struct Session {
    node: Arc<Node>,
    shape: Shape,
    member: Caller,
    /// Resolves when the connection's credential is revoked or expires.
    lost: Option<session::Lost>,
    /// Every channel's pushes, in order, and the hub's verdict on this connection.
    outbox: Arc<Outbox>,
    /// Subscribed to `broadcast` from the start.
    everyone: Everyone,
    /// In the order subscribed; found by name with a scan (at most `MAX_CHANNELS`), which
    /// keeps an idle connection's ten subscriptions in one small allocation.
    channels: Channels,
    limit: RateLimit,
    /// Commands refused in a row for the rate.
    refused: u8,
    connected: bool,
    /// Whether fan-out may write to the socket directly while the session waits idle
    /// ([`Outbox::park`]).
    direct: bool,
    /// Replies and pushes to write next.
    batch: Vec<Arc<Prepared>>,
    /// Room publications on their way to storage (boxed, and only while there are some: an
    /// idle session holds a pointer).
    storing: Option<Box<Storing>>,
}

/// Runs a connection of the channel protocol until either side ends it.
///
/// Not an `async fn`: one keeps its arguments in its state beside the locals they are moved
/// to, for the connection's whole life (1,712 bytes of it). The block below keeps each value
/// once, where it was captured.
pub fn session(
    node: Arc<Node>,
    ws: UpgradedWebSocket,
    slot: Slot,
    member: Member,
) -> impl std::future::Future<Output = ()> + Send {
    let session = Session::new(node, member, Shape::Channels);
    // Held from here on by a pointer: the task keeps the pointer, not the socket.
    drive(session, ws.into_shared(), slot)
}

/// Runs a poll watcher (`/ws/polls/ID`) as a session of its own shape (`Shape::Poll`):
/// the poll's state and this user's vote, then its counts as they change and the client's
/// votes, in the endpoint's format (docs/api.md, `GET /ws/polls/{id}`).
pub fn poll(
    node: Arc<Node>,
    ws: UpgradedWebSocket,
    slot: Slot,
    poll: i64,
    member: Member,
) -> impl std::future::Future<Output = ()> + Send {
    let mut session = Session::new(node, member, Shape::Poll);
    let (user, outbox) = (session.outbox.user(), Some(session.outbox.clone()));
    let sub = session
        .node
        .rooms
        .watch_poll_with(poll, user, outbox, Format::Room);
    session.add(Channel::new(sub, 0));
    drive(session, ws.into_shared(), slot)
}

/// Runs a chat room member (`/ws/rooms/NAME`) as a session of its own shape (`Shape::Room`):
/// `welcome`, the history (after `since`, or the recent messages), `ready`, then the room's
/// events and the client's messages, in the room endpoint's format (docs/api.md).
///
/// History is replayed in pages, each read from storage only once the previous one is
/// written: a client that does not read holds one page and the socket's write buffer, not the
/// whole history, and the write timeout ends it.
pub fn room(
    node: Arc<Node>,
    ws: UpgradedWebSocket,
    slot: Slot,
    room: String,
    member: Member,
    resume: session::Resume,
) -> impl std::future::Future<Output = ()> + Send {
    let session = Session::new(node, member, Shape::Room);
    // The join runs in an allocation of its own, freed before the member goes live: an idle
    // member's task holds its session and little else.
    let join = Box::pin(join_room(session, ws.into_shared(), slot, room, resume));
    join.then(|joined| match joined {
        Some((session, ws, slot)) => Either::Left(drive(session, ws, slot)),
        None => Either::Right(std::future::ready(())),
    })
}

/// Joins a room member's session to its room and queues `welcome`, the history and `ready`;
/// `None` when the session ended meanwhile (the client was told why).
async fn join_room(
    mut session: Session,
    mut ws: Socket,
    slot: Slot,
    room: String,
    resume: session::Resume,
) -> Option<(Session, Socket, Slot)> {
    let node = session.node.clone();
    let user = session.outbox.user().clone();
    tracing::debug!(%room, %user, since = ?resume.since, epoch = ?resume.epoch, "joining");
    // Joining a room nobody is in and nobody wrote to brings it into being: that is paid for
    // as starting one, whichever endpoint it comes through.
    if let Err(e) = node.may_join_room(&room, &session.member.writer).await {
        let (code, why) = match &e {
            StoreError::Limit(why) => (CloseCode::POLICY_VIOLATION, why.as_str()),
            other => {
                tracing::error!(error = %other, %room, "checking the room failed");
                (CloseCode::INTERNAL_ERROR, "storage unavailable: try again")
            }
        };
        tracing::debug!(%room, %user, why, "room not joined");
        let _ = session::Socket::feed_prepared(&mut ws, &session::error_event(why)).await;
        finish(session, ws, slot, End::Close(code, "room not joined")).await;
        return None;
    }
    let outbox = Some(session.outbox.clone());
    let joined = session::join(&node, &room, &user, outbox, Format::Room, &resume).await;
    let session::Joining {
        subscription,
        epoch,
        plan,
        users,
        mut members,
    } = match joined {
        Ok(joined) => joined,
        Err(e) => {
            tracing::error!(error = %e, %room, "loading history failed");
            let end = End::Close(CloseCode::INTERNAL_ERROR, "history unavailable");
            finish(session, ws, slot, end).await;
            return None;
        }
    };
    // The session holds the subscription from here, and leaves with it.
    session.add(Channel::new(subscription, 0));
    if users <= crate::node::hub::PRESENCE_LIMIT {
        // Members on every node.
        if let Ok(everyone) = node.users_elsewhere(&room).await {
            members.extend(everyone);
            members.sort();
            members.dedup();
        }
    }
    if plan.recovered == Some(false) && !plan.truncated {
        // Another epoch, or a position this room never reached (hostile, or storage that lost
        // data): resuming from it would hide messages from this member.
        tracing::info!(%room, since = ?resume.since, client_epoch = ?resume.epoch, %epoch, last_id = plan.end, "resume position not in this room's stream: sending the recent history");
    }
    session.batch.push(encode(&rooms::Welcome {
        room: &room,
        user: &user,
        guest: session.member.kind == Kind::Guest,
        members: &members,
        epoch: &epoch,
        recovered: plan.recovered,
        truncated: plan.truncated,
    }));
    let (batch, outbox) = (&mut session.batch, &session.outbox);
    let replayed = session::replay(
        &node,
        &mut ws,
        batch,
        outbox,
        session::judged,
        &room,
        &plan,
        encode,
    );
    let high = match replayed.await {
        Ok(high) => high,
        Err(end) => {
            finish(session, ws, slot, end).await;
            return None;
        }
    };
    tracing::debug!(%room, %user, replayed = plan.count, last_id = high, "joined");
    // Live messages up to the replay's last were written as history (the room's channel is
    // the session's one).
    if let Some(channel) = session.channels.list.first_mut() {
        channel.high = high;
    }
    session.batch.push(encode(&rooms::Ready {
        last_id: high,
        epoch: &epoch,
    }));
    Some((session, ws, slot))
}

/// Runs `session` on `ws` until either side ends it, then leaves everything it holds.
// Not an `async fn`: one keeps its arguments in its state beside the locals they are moved
// to, for the connection's whole life (592 bytes where this takes 384).
#[allow(clippy::manual_async_fn)]
fn drive(
    mut session: Session,
    mut ws: Socket,
    slot: Slot,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let end = session.run(&mut ws).await;
        // Boxed: the goodbye's state would otherwise widen every session's.
        Box::pin(finish(session, ws, slot, end)).await;
    }
}

/// Ends a session: it leaves every channel, then the nickname goes, then the client is told
/// (when there is anything to tell), then the connection's slot is freed.
async fn finish(session: Session, mut ws: Socket, mut slot: Slot, end: End) {
    let user = session.name().to_owned();
    let shape = session.shape;
    let node = session.node.clone();
    drop(session);
    slot.release_nickname();
    match end {
        End::Gone => tracing::debug!(%user, "channel session ended"),
        End::Close(code, reason) => {
            tracing::debug!(%user, code = code.0, reason, "closing channel session");
            goodbye(&node, &mut ws, shape, code, reason).await;
        }
    }
    drop(slot);
}

impl Session {
    /// A session for `member` whose frames take `shape`.
    fn new(node: Arc<Node>, member: Member, shape: Shape) -> Session {
        // One allocation of the name for every subscription the connection makes.
        let name: Arc<str> = Arc::from(member.who.name());
        let kind = if member.who.is_anonymous() {
            Kind::Anonymous
        } else if member.who.is_guest() {
            Kind::Guest
        } else {
            Kind::User
        };
        let (format, everyone) = match shape {
            Shape::Channels => (Format::Channels, true),
            // A broadcast reaches the single-channel endpoints through their channel.
            Shape::Poll | Shape::Room => (Format::Room, false),
        };
        let outbox = node.hub.outbox(&name, format);
        let everyone = if everyone {
            node.hub.join_everyone(&name, outbox.clone())
        } else {
            Everyone::none()
        };
        let lost = session::check_credential(&node, member.credential, member.revocations.clone());
        // A room member never votes: its session keeps no key for polls.
        let voter = member.voter.filter(|_| shape != Shape::Room).map(Box::new);
        Session {
            limit: RateLimit::new(node.config.message_rate),
            refused: 0,
            node,
            shape,
            member: Caller {
                kind,
                voter,
                writer: member.writer,
                revocations: member.revocations,
            },
            lost,
            outbox,
            everyone,
            channels: Channels { list: Vec::new() },
            connected: false,
            direct: member.direct,
            batch: Vec::new(),
            storing: None,
        }
    }
}

/// Tells a client whose connection was refused for good why (see
/// `http::refuse_upgrade`): a `disconnect` push, then a close with `code`.
pub async fn refused(node: &Node, mut ws: UpgradedWebSocket, code: u16, reason: &str) {
    disconnect(node, &mut ws, CloseCode(code), reason).await;
}

/// Ends a connection in its shape's way: the channel protocol's with a `disconnect` push
/// first, a single-channel endpoint's with the close alone.
async fn goodbye(node: &Node, ws: &mut Socket, shape: Shape, code: CloseCode, reason: &str) {
    match shape {
        Shape::Channels => disconnect(node, ws, code, reason).await,
        Shape::Poll | Shape::Room => session::close(node, ws, code, reason).await,
    }
}

/// Ends a connection: the `disconnect` push (whether to reconnect, and why), then the close.
async fn disconnect(node: &Node, ws: &mut impl session::Socket, code: CloseCode, reason: &str) {
    let push = encode(&channels::Disconnect {
        code: code.0,
        reason,
        reconnect: disconnect::reconnects(code),
    });
    let _ = ws.feed_prepared(&push).await;
    session::close(node, ws, code, reason).await;
}

impl Session {
    /// The connection's name (a guest's nickname; empty for one without an identity).
    fn name(&self) -> &str {
        self.outbox.user()
    }

    async fn run(&mut self, ws: &mut Socket) -> End {
        let node = self.node.clone();
        if self.shape == Shape::Poll {
            // Boxed: what opening takes is not kept for the session's life.
            if let Err(end) = Box::pin(self.open_poll()).await {
                return end;
            }
        }
        loop {
            if !self.batch.is_empty() || ws.queued_len() > 0 {
                // In an allocation of its own: an idle session's state holds none of it.
                let write = Box::pin(session::write_all(
                    &node,
                    ws,
                    &mut self.batch,
                    &self.outbox,
                    self.shape.judge(),
                ));
                if let Some(end) = write.await {
                    return end;
                }
            }
            if self.batch.capacity() > 0 {
                // Written: an idle session keeps no room for a batch.
                self.batch = Vec::new();
            }
            // Nothing to write: fan-out may write to the socket itself until the session
            // wakes (once no replay can be overtaken by what the hub delivers now).
            let parked =
                self.direct && self.replays_delivered() && self.outbox.park(|| ws.writer());
            if parked {
                // Every publication a replay held was delivered before the check above, and
                // taken (and dropped) since: the outbox was empty when it parked. What comes
                // now is newer than any replay.
                for channel in &mut self.channels.list {
                    channel.high = 0;
                }
            }
            let shape = self.shape;
            let lost = &mut self.lost;
            let lost_fut = std::future::poll_fn(|cx| match lost.as_mut() {
                Some(lost) => lost.as_mut().as_mut().poll(cx),
                None => TaskPoll::Pending,
            });
            let outbox = self.outbox.clone();
            let room_for_more = self.storing.as_ref().is_none_or(|s| s.len() < MAX_STORING);
            let storing = &mut self.storing;
            let stored = std::future::poll_fn(|cx| match storing {
                Some(storing) => storing.poll_next_unpin(cx),
                None => TaskPoll::Pending,
            });
            // Only a command's text outlives the wait: the message it came in (and the wait's
            // own state) would otherwise take room in the session's state for its whole life.
            let woke = tokio::select! {
                biased;
                verdict = std::future::poll_fn(|cx| outbox.poll_verdict(cx)) => {
                    Woke::End(shape.judge()(&node, verdict))
                }
                () = session::shutting_down(&node) => {
                    Woke::End(End::Close(CloseCode::GOING_AWAY, "server shutting down"))
                }
                () = lost_fut => {
                    tracing::info!(user = %outbox.user(), "credential revoked or expired: closing");
                    Woke::End(shape.lost_credential())
                }
                reply = stored => Woke::Stored(reply),
                () = std::future::poll_fn(|cx| outbox.poll_ready(cx)) => Woke::Events,
                message = ws.recv(), if room_for_more => match message {
                    Some(Ok(Message::Text(text))) => Woke::Command(text),
                    Some(Ok(Message::Binary(_))) if shape == Shape::Channels => {
                        Woke::End(End::Close(disconnect::PROTOCOL_VIOLATION, "binary frames are not part of tether.v1"))
                    }
                    Some(Ok(Message::Binary(_))) => {
                        self.batch.push(session::error_event("send JSON text, not binary"));
                        Woke::Events
                    }
                    // A ping or pong: nothing to do but wait again.
                    Some(Ok(_)) => Woke::Events,
                    Some(Err(_)) | None => Woke::End(End::Gone),
                }
            };
            if parked {
                self.outbox.unpark();
            }
            let text = match woke {
                Woke::End(end) => return end,
                Woke::Stored(Some(reply)) => {
                    self.batch.push(reply);
                    continue;
                }
                Woke::Stored(None) => {
                    self.storing = None;
                    continue;
                }
                Woke::Events => {
                    for event in self.outbox.take_all() {
                        if let Err(end) = self.take(event) {
                            return end;
                        }
                    }
                    continue;
                }
                Woke::Command(text) => text,
            };
            session::count_in(&node, text.len());
            // Boxed: a command's futures (storage, replay) would otherwise stay in the
            // session's state for its whole life.
            if let Err(end) = Box::pin(self.text(ws, &text)).await {
                return end;
            }
        }
    }

    /// The poll a poll watcher watches: its one channel, subscribed from the start.
    fn watched_poll(&self) -> Result<i64, End> {
        let channel = self.channels.first().map_or("", |c| c.sub.channel());
        match parse_channel(channel) {
            Ok(Name::Poll(id)) => Ok(id),
            _ => Err(End::Close(CloseCode::INTERNAL_ERROR, "poll unavailable")),
        }
    }

    /// A poll watcher's start: the poll's state and this user's vote, written first.
    async fn open_poll(&mut self) -> Result<(), End> {
        let id = self.watched_poll()?;
        let voter = self.member.voter.as_deref();
        match session::poll_state(&self.node, id, voter).await {
            Ok((Some(poll), vote)) => {
                let vote = vote.as_deref();
                self.batch
                    .push(encode(&rooms::PollState { poll: &poll, vote }));
                Ok(())
            }
            Ok((None, _)) => Err(End::Close(CloseCode::POLICY_VIOLATION, "no such poll")),
            Err(e) => {
                tracing::error!(error = %e, poll = id, "loading a poll failed");
                Err(End::Close(CloseCode::INTERNAL_ERROR, "poll unavailable"))
            }
        }
    }

    /// Charges a single-channel endpoint's message to the connection's rate and to its
    /// identity's over all its connections: `Err` ends a connection past its own rate (1008);
    /// `Ok(false)` when the identity's is spent (the client is told; the connection stays).
    fn spend(&mut self) -> Result<bool, End> {
        if !self.limit.allow(self.node.config.message_rate) {
            self.node.metrics.rate_limited.fetch_add(1, Relaxed);
            tracing::warn!(user = self.name(), "message rate limit exceeded");
            let why = "message rate limit exceeded";
            return Err(End::Close(CloseCode::POLICY_VIOLATION, why));
        }
        // The same person over several connections: the message is refused, the connections
        // stay (none of them alone went too fast).
        if !self.node.spend_socket_message(&self.member.writer) {
            let refusal = crate::node::IDENTITY_RATE_REFUSAL;
            self.batch.push(session::error_event(refusal));
            return Ok(false);
        }
        Ok(true)
    }

    /// A room member's message: stored, then heard by the room, this member included; why
    /// one was not stored comes back as an `error` event.
    async fn room_text(&mut self, text: &str) -> Result<(), End> {
        if !self.spend()? {
            return Ok(());
        }
        let channel = self.channels.first().map_or("", |c| c.sub.channel());
        let Some(room) = channel_room(channel).map(str::to_owned) else {
            return Err(End::Close(CloseCode::INTERNAL_ERROR, "room unavailable"));
        };
        let (user, sender) = (self.name().to_owned(), self.outbox.clone());
        let writer = &self.member.writer;
        if let Some(event) = session::chat(&self.node, writer, room, user, text, sender).await {
            self.batch.push(event);
        }
        Ok(())
    }

    /// A poll watcher's message: a vote. Why one was not counted comes back as an `error`
    /// event (through the outbox, from the writer); a counted one is heard in the counts.
    async fn poll_text(&mut self, text: &str) -> Result<(), End> {
        let id = self.watched_poll()?;
        if !self.spend()? {
            return Ok(());
        }
        let Ok(rooms::VoteIn { vote }) = serde_json::from_str(text) else {
            let expected = "expected {\"vote\": \"option\"}";
            self.batch.push(session::error_event(expected));
            return Ok(());
        };
        let Some(voter) = self.member.voter.as_deref().cloned() else {
            let why = "only registered users vote here: log in to vote";
            self.batch.push(session::error_event(why));
            return Ok(());
        };
        let write = VoteWrite {
            poll: id,
            voter,
            option: vote,
            reply: journal::Reply::Socket(self.outbox.clone()),
        };
        if let Err(e) = self.node.vote(write).await {
            self.batch.push(session::error_event(&e.to_string()));
        }
        Ok(())
    }

    /// Whether the hub has delivered every publication that each channel's replay held, so
    /// none of them can come again as a live one (which [`Session::take`] would drop).
    fn replays_delivered(&self) -> bool {
        self.channels.iter().filter(|c| c.high > 0).all(|channel| {
            let name = channel.sub.channel();
            channel_stream(name).is_none() || self.node.hub.position(name) >= channel.high
        })
    }

    /// Queues a push from the hub, unless its channel's replay already held it or the
    /// channel was left since it was queued.
    fn take(&mut self, event: crate::node::hub::Outgoing) -> Result<(), End> {
        if event.sub != self.everyone.id() {
            let Some(i) = self.channels.iter().position(|c| c.sub.id() == event.sub) else {
                return Ok(());
            };
            if event.id == Outgoing::ENDED {
                // The server ended this subscription (`Hub::end_subscriptions`).
                return self.ended(i, event.msg);
            }
            let channel = &mut self.channels.list[i];
            if event.id != 0 {
                if event.id <= channel.high {
                    return Ok(());
                }
                // The hub delivers a room's ids in order: none at or below the replay's
                // last can follow.
                channel.high = 0;
            }
        }
        self.batch.push(event.msg);
        Ok(())
    }

    /// Leaves the channel at `i`, which the server ended: the client is told by `push`; a
    /// single-channel endpoint, left without its channel, closes.
    fn ended(&mut self, i: usize, push: Arc<Prepared>) -> Result<(), End> {
        let channel = self.channels.list[i].sub.channel().to_owned();
        self.channels.remove(i, &self.node.hub);
        tracing::info!(user = %self.name(), %channel, "subscription ended by the server");
        match self.shape {
            Shape::Channels => {
                self.batch.push(push);
                Ok(())
            }
            Shape::Poll => Err(End::Close(
                CloseCode::POLICY_VIOLATION,
                "removed from the poll by the server",
            )),
            Shape::Room => Err(End::Close(
                CloseCode::POLICY_VIOLATION,
                "removed from the room by the server",
            )),
        }
    }

    /// Takes a text frame in the session's shape; `Err` ends the session.
    async fn text(&mut self, ws: &mut Socket, text: &str) -> Result<(), End> {
        match self.shape {
            Shape::Channels => self.command(ws, text).await,
            Shape::Poll => self.poll_text(text).await,
            Shape::Room => self.room_text(text).await,
        }
    }

    /// Answers one command; `Err` ends the session. A subscription's replay is written
    /// here, page by page, before the next command is read.
    async fn command(&mut self, ws: &mut Socket, text: &str) -> Result<(), End> {
        let Ok(mut command) = serde_json::from_str::<Command>(text) else {
            return Err(End::Close(
                disconnect::PROTOCOL_VIOLATION,
                "expected a command: {\"id\": N, \"op\": \"…\", …}",
            ));
        };
        if command.id == 0 || command.id > i32::MAX as u64 {
            return Err(End::Close(
                disconnect::PROTOCOL_VIOLATION,
                "a command's id is from 1 to 2147483647",
            ));
        }
        if !self.connected && command.op != "connect" {
            return Err(End::Close(
                disconnect::PROTOCOL_VIOLATION,
                "the first command must be connect",
            ));
        }
        if command.op == "connect" && !self.connected {
            if let Some(token) = &command.token {
                self.identify(token).await?;
            }
        }
        let id = command.id;
        let allowed = self.limit.allow(self.node.config.message_rate);
        self.refused = if allowed { 0 } else { self.refused + 1 };
        if self.refused > MAX_REFUSED {
            return Err(End::Close(
                disconnect::TOO_MANY_COMMANDS,
                "too many commands, again and again: reconnect later",
            ));
        }
        // Whatever reaches other people (a publication, a vote, an event such as typing) is
        // charged to this identity over all its connections, on every endpoint.
        if allowed
            && matches!(command.op.as_str(), "publish" | "event")
            && !self.node.spend_socket_message(&self.member.writer)
        {
            self.stored().await;
            let refusal = fail(Code::TooManyRequests, crate::node::IDENTITY_RATE_REFUSAL);
            self.batch.push(encode(&refusal.reply(id)));
            return Ok(());
        }
        if allowed && command.op == "publish" {
            // A room's publication goes to storage while the next commands are read: a
            // client may keep many in flight, and storage and fan-out take them in batches.
            // Its reply takes its place in line with the others.
            match self.post(&mut command) {
                Ok(Some(post)) => {
                    self.storing(id, post);
                    return Ok(());
                }
                Ok(None) => {}
                Err(failure) => {
                    self.stored().await;
                    self.batch.push(encode(&failure.reply(id)));
                    return Ok(());
                }
            }
        }
        // Every other reply follows those of the publications before it.
        self.stored().await;
        let result = if allowed {
            self.answer(command).await
        } else {
            self.node.metrics.rate_limited.fetch_add(1, Relaxed);
            Err(fail(Code::TooManyRequests, "too many commands: slow down"))
        };
        match result {
            Ok(Some(Answered { reply, replay })) => {
                self.batch.push(reply);
                if let Some(replay) = replay {
                    self.replay(ws, replay).await?;
                }
            }
            Ok(None) => self.batch.push(encode(&Reply {
                id,
                body: channels::Done {},
            })),
            Err(failure) => self.batch.push(encode(&failure.reply(id))),
        }
        Ok(())
    }

    /// Takes the identity of API token `token` for a connection that came without one (a
    /// token in the first message stays out of URLs and their logs). One that is not valid,
    /// or a connection that already has another identity, ends the session as the upgrade
    /// would have been refused: 4501.
    async fn identify(&mut self, token: &str) -> Result<(), End> {
        const BAD: End = End::Close(CloseCode(4501), "invalid token");
        let headers = http::HeaderMap::new();
        let Ok(Some((user, credential))) =
            self.node.user_and_credential(&headers, Some(token)).await
        else {
            return Err(BAD);
        };
        match self.member.kind {
            Kind::Anonymous => {}
            // The same user (a page's cookie and a token of its own): nothing changes.
            Kind::User if self.name() == user => return Ok(()),
            _ => {
                return Err(End::Close(
                    CloseCode(4501),
                    "this connection already has another identity",
                ))
            }
        }
        let revocations = self.member.revocations.clone();
        self.lost = session::check_credential(&self.node, Some(credential), revocations);
        self.member.writer = crate::identity::auth::Writer::new(Some(&user), None);
        self.member.voter = Some(Box::new(crate::engine::store::Voter {
            key: user.clone(),
            guest: None,
        }));
        let name: Arc<str> = Arc::from(user.as_str());
        self.member.kind = Kind::User;
        // An outbox in its name now (it has no channels yet: connect comes first), and among
        // the connections a broadcast reaches under that name; what came before is kept.
        let before = std::mem::replace(
            &mut self.outbox,
            self.node.hub.outbox(&name, Format::Channels),
        );
        self.node
            .hub
            .move_everyone(&self.everyone, self.outbox.clone());
        while let Some(event) = before.try_recv() {
            // Broadcasts only: there is no channel yet whose end could end the session.
            let _ = self.take(event);
        }
        Ok(())
    }

    /// A room publication checked and ready for storage; `None` when the channel is not a
    /// room (a poll's vote, or a refusal [`Session::publish`] words).
    fn post(&self, command: &mut Command) -> Result<Option<Post>, Failure> {
        let channel = required(command.channel.as_deref(), "channel")?;
        let Name::Room(room) = parse_channel(channel)? else {
            return Ok(None);
        };
        self.subscribed(channel)?;
        // A room's publication: its data is taken, not copied (nothing else reads it).
        let Some(Ok(TextData { text })) = command.data.take().map(serde_json::from_value) else {
            return Err(fail(Code::BadRequest, "data is {\"text\": \"…\"}"));
        };
        if let Some(problem) = self.node.text_problem(&text) {
            let code = if text.len() > self.node.config.max_text {
                Code::TooLarge
            } else {
                Code::BadRequest
            };
            return Err(fail(code, problem));
        }
        let key = command.key.take();
        if key
            .as_deref()
            .is_some_and(|k| !crate::identity::auth::valid_key(k))
        {
            return Err(fail(Code::BadRequest, crate::identity::auth::KEY_RULE));
        }
        Ok(Some(Post {
            room: room.to_owned(),
            text,
            key,
        }))
    }

    /// Hands publication `post` (command `id`) to storage; its reply joins the line.
    fn storing(&mut self, id: u64, post: Post) {
        let node = self.node.clone();
        let (user, writer) = (self.name().to_owned(), self.member.writer.clone());
        let stored = async move {
            let write = |reply| ChatWrite {
                room: post.room,
                user,
                text: post.text,
                key: post.key,
                writer,
                reply,
            };
            match journal::Reply::wait(|reply| node.publish(write(reply))).await {
                Ok(message) => encode(&Reply {
                    id,
                    body: channels::Published { offset: message.id },
                }),
                Err(e) => encode(&fail(Code::Internal, format!("not stored: {e}")).reply(id)),
            }
        };
        self.storing
            .get_or_insert_with(Box::default)
            .push_back(Box::pin(stored));
    }

    /// Waits for every publication on its way to storage and queues their replies.
    async fn stored(&mut self) {
        if let Some(mut storing) = self.storing.take() {
            while let Some(reply) = storing.next().await {
                self.batch.push(reply);
            }
        }
    }

    /// Runs one command: `Some` carries a reply with fields (and, for a subscription, the
    /// publications to replay after it); `None` is an empty success.
    async fn answer(&mut self, command: Command) -> Result<Option<Answered>, Failure> {
        let id = command.id;
        match command.op.as_str() {
            "connect" => {
                if self.connected {
                    return Err(fail(Code::BadRequest, "already connected"));
                }
                if let Some(info) = command.info {
                    if let Some(problem) = info_problem(&info) {
                        return Err(fail(Code::BadRequest, problem));
                    }
                    self.outbox.set_info(info);
                }
                self.connected = true;
                let kind = self.member.kind;
                Ok(Some(answered(
                    id,
                    channels::Connected {
                        client: format!("{:x}", self.everyone.id()),
                        // A visitor without an identity watches: no name to show.
                        user: (kind != Kind::Anonymous).then(|| self.name()),
                        guest: kind != Kind::User,
                        limits: channels::Limits {
                            channels: MAX_CHANNELS,
                            commands_per_second: self.node.config.message_rate,
                            message_size: self.node.ws_config.max_message_size,
                        },
                    },
                )))
            }
            "ping" => Ok(None),
            "subscribe" => {
                let channel = required(command.channel.as_deref(), "channel")?;
                let subscribed = self
                    .subscribe(channel, command.since, command.epoch)
                    .await?;
                let mut answer = answered(id, &subscribed.reply);
                answer.replay = subscribed.replay;
                Ok(Some(answer))
            }
            "unsubscribe" => {
                let channel = required(command.channel.as_deref(), "channel")?;
                match self.position(channel) {
                    Some(i) => {
                        self.channels.remove(i, &self.node.hub);
                        Ok(None)
                    }
                    None => Err(fail(Code::NotSubscribed, "not subscribed to that channel")),
                }
            }
            "publish" => {
                let channel = required(command.channel.as_deref(), "channel")?;
                self.publish(channel, command.data).await.map(|()| None)
            }
            "event" => {
                let channel = required(command.channel.as_deref(), "channel")?;
                let name = required(command.name.as_deref(), "name")?;
                self.event(channel, name, command.data.unwrap_or(Value::Null))
                    .await?;
                Ok(None)
            }
            "history" => {
                let channel = required(command.channel.as_deref(), "channel")?;
                let room = match parse_channel(channel)? {
                    Name::Room(room) => self.may_read(room)?.to_owned(),
                    Name::User(user) => self.own(user)?,
                    _ => return Err(fail(Code::NotAvailable, "only rooms keep history")),
                };
                let limit = command
                    .limit
                    .unwrap_or(HISTORY_LIMIT)
                    .clamp(1, HISTORY_LIMIT);
                let (epoch, offset, messages) = self.history(&room, command.since, limit).await?;
                let history = channels::History {
                    epoch,
                    offset,
                    publications: messages.iter().map(Stored::of).collect(),
                };
                Ok(Some(answered(id, history)))
            }
            "presence" => {
                let channel = required(command.channel.as_deref(), "channel")?;
                let Name::Room(room) = parse_channel(channel)? else {
                    return Err(fail(Code::NotAvailable, "only rooms have presence"));
                };
                let room = self.may_read(room)?;
                // A crowd is counted, not listed (see `PRESENCE_LIMIT`), as on subscribing.
                let users = self.node.rooms.user_count(room);
                let present = if users > crate::node::hub::PRESENCE_LIMIT {
                    Present::Users { users }
                } else {
                    match self.presence(room).await {
                        members if members.len() > crate::node::hub::PRESENCE_LIMIT => {
                            Present::Users {
                                users: members.len(),
                            }
                        }
                        members => Present::Members { members },
                    }
                };
                Ok(Some(answered(id, present)))
            }
            other => Err(fail(Code::UnknownOp, format!("unknown op: {other:.32}"))),
        }
    }

    async fn subscribe(
        &mut self,
        channel: &str,
        since: Option<u64>,
        epoch: Option<String>,
    ) -> Result<Subscribing, Failure> {
        let name = parse_channel(channel)?;
        if self.position(channel).is_some() {
            return Err(fail(Code::AlreadySubscribed, "already subscribed"));
        }
        if self.channels.len() >= MAX_CHANNELS {
            return Err(fail(
                Code::LimitExceeded,
                format!("at most {MAX_CHANNELS} channels per connection"),
            ));
        }
        let room = match name {
            Name::Room(room) => self.may_read(room)?.to_owned(),
            Name::User(user) => self.own(user)?,
            Name::Poll(id) => return self.subscribe_poll(id).await,
            Name::Polls => return self.subscribe_polls().await,
            Name::Broadcast => {
                return Err(fail(
                    Code::AlreadySubscribed,
                    "every connection receives broadcast",
                ))
            }
        };
        let node = self.node.clone();
        let room = room.as_str();
        // Subscribing to a room nobody is in and nobody wrote to brings it into being: that
        // is paid for as starting one.
        node.may_join_room(room, &self.member.writer)
            .await
            .map_err(|e| match e {
                StoreError::Limit(why) => fail(Code::LimitExceeded, why),
                other => internal(other),
            })?;
        let resume = session::Resume { since, epoch };
        let joining = session::join(
            &node,
            room,
            self.outbox.user(),
            Some(self.outbox.clone()),
            Format::Channels,
            &resume,
        );
        let session::Joining {
            subscription,
            epoch: current,
            plan,
            users,
            ..
        } = joining.await.map_err(internal)?;
        // Publications up to the plan's end come as replay (written after the reply); live
        // ones at or below it are dropped as they arrive.
        let high = if plan.count > 0 { plan.end } else { plan.start };
        if plan.count == 0 {
            node.rooms.advance(room, high);
        }
        // A crowd is counted, not listed (see `PRESENCE_LIMIT`).
        let personal = crate::wire::is_personal(room);
        let members = if users <= crate::node::hub::PRESENCE_LIMIT && !personal {
            Some(self.presence(room).await)
        } else {
            None
        };
        self.add(Channel::new(subscription, high));
        let reply = channels::Subscribed::Room(channels::RoomSubscribed {
            epoch: current,
            offset: plan.end,
            replayed: plan.count,
            users: (members.is_none() && !personal).then_some(users),
            presence: members,
            recovered: plan.recovered,
        });
        let replay = (plan.count > 0).then(|| Replay {
            room: room.to_owned(),
            plan,
        });
        Ok(Subscribing { reply, replay })
    }

    /// Writes a subscription's replay after its reply ([`session::replay`]). `Err` ends the
    /// session: the socket took nothing within the write timeout, or storage failed halfway
    /// (the reply promised what it could not send).
    async fn replay(&mut self, ws: &mut Socket, replay: Replay) -> Result<(), End> {
        let node = self.node.clone();
        let Replay { room, plan } = replay;
        let (batch, outbox) = (&mut self.batch, &self.outbox);
        let render = channels::publication;
        session::replay(&node, ws, batch, outbox, judged, &room, &plan, render).await?;
        Ok(())
    }

    /// `room`, when this connection has the right to subscribe to it, which reading its
    /// history and presence also needs: a name (a user's, or a guest's nickname).
    fn may_read<'r>(&self, room: &'r str) -> Result<&'r str, Failure> {
        if self.member.kind == Kind::Anonymous {
            return Err(fail(
                Code::PermissionDenied,
                "rooms need a name: log in, or connect with ?name=NICK",
            ));
        }
        Ok(room)
    }

    /// The stream of `user`'s notifications, when that user is who this connection is.
    fn own(&self, user: &str) -> Result<String, Failure> {
        match self.member.kind {
            Kind::User if self.name() == user => Ok(crate::wire::personal(user)),
            _ => Err(fail(
                Code::PermissionDenied,
                format!("only {user}, logged in, receives user:{user}"),
            )),
        }
    }

    /// This connection's subscription to `channel`, which publishing and events need.
    fn subscribed(&self, channel: &str) -> Result<&Channel, Failure> {
        self.position(channel)
            .map(|i| &self.channels[i])
            .ok_or_else(|| fail(Code::NotSubscribed, "subscribe to the channel first"))
    }

    /// Where the subscription to `channel` is, if there is one.
    fn position(&self, channel: &str) -> Option<usize> {
        // One spelling per channel: a name that parses is the one its subscription holds.
        parse_channel(channel).ok()?;
        self.channels
            .iter()
            .position(|c| c.sub.channel() == channel)
    }

    fn add(&mut self, channel: Channel) {
        self.channels.add(channel);
    }

    /// A poll's channel: its state and this client's vote in the reply, then its counts as
    /// they change (`pub` pushes without an offset).
    async fn subscribe_poll(&mut self, id: i64) -> Result<Subscribing, Failure> {
        // Watching first: a vote counted while the state loads is pushed after it.
        let sub = self.node.rooms.watch_poll_with(
            id,
            self.outbox.user(),
            Some(self.outbox.clone()),
            Format::Channels,
        );
        let state = session::poll_state(&self.node, id, self.member.voter.as_deref())
            .await
            .map_err(internal)?;
        let (Some(poll), vote) = state else {
            return Err(fail(Code::UnknownChannel, "no such poll"));
        };
        self.add(Channel::new(sub, 0));
        let reply = channels::Subscribed::Poll(channels::PollSubscribed {
            poll,
            vote,
            can_vote: self.member.voter.is_some(),
            replayed: 0,
        });
        Ok(Subscribing {
            reply,
            replay: None,
        })
    }

    /// The `polls` channel: the latest polls in the reply, then each new one as it is created.
    async fn subscribe_polls(&mut self) -> Result<Subscribing, Failure> {
        // Watching first: a poll created while the list loads is pushed after it (and may be
        // in the list too; a client keys polls by id).
        let sub = self
            .node
            .rooms
            .watch_poll_list(self.outbox.user(), self.outbox.clone());
        let polls = self.node.polls(POLL_LIST).await.map_err(internal)?;
        self.add(Channel::new(sub, 0));
        let reply = channels::Subscribed::Polls(channels::PollsSubscribed { polls, replayed: 0 });
        Ok(Subscribing {
            reply,
            replay: None,
        })
    }

    /// Publishes to a channel other than a room (whose publications `post` takes): a vote in
    /// a poll, answered once counted, or a refusal.
    async fn publish(&mut self, channel: &str, data: Option<Value>) -> Result<(), Failure> {
        match parse_channel(channel)? {
            Name::Poll(id) => {
                self.subscribed(channel)?;
                self.vote(id, data).await
            }
            Name::Polls => Err(fail(
                Code::PermissionDenied,
                "polls are created with POST /api/polls",
            )),
            Name::User(user) => Err(fail(
                Code::PermissionDenied,
                format!("notifications are sent with POST /api/users/{user}/notifications"),
            )),
            Name::Broadcast | Name::Room(_) => Err(fail(
                Code::PermissionDenied,
                "only the server publishes to broadcast",
            )),
        }
    }

    /// Votes in poll `id`: `data` is `{"vote": "OPTION"}`.
    async fn vote(&mut self, id: i64, data: Option<Value>) -> Result<(), Failure> {
        let Some(Ok(VoteData { vote })) = data.map(serde_json::from_value) else {
            return Err(fail(Code::BadRequest, "data is {\"vote\": \"…\"}"));
        };
        let Some(voter) = self.member.voter.as_deref().cloned() else {
            return Err(fail(
                Code::PermissionDenied,
                "only registered users vote here: log in to vote",
            ));
        };
        let node = &self.node;
        let counted = journal::Reply::wait(|reply| {
            node.vote(VoteWrite {
                poll: id,
                voter,
                option: vote,
                reply,
            })
        })
        .await
        .map_err(|e| fail(Code::Internal, format!("vote not counted: {e}")))?;
        if counted {
            Ok(())
        } else {
            Err(fail(
                Code::BadRequest,
                "not counted: no such option, or too many guests have voted from this address",
            ))
        }
    }

    async fn event(&mut self, channel: &str, name: &str, data: Value) -> Result<(), Failure> {
        let room = match parse_channel(channel)? {
            Name::Room(room) => room,
            Name::Poll(_) | Name::Polls => {
                return Err(fail(Code::NotAvailable, "polls take no events"))
            }
            Name::User(_) => return Err(fail(Code::NotAvailable, "user channels take no events")),
            Name::Broadcast => {
                return Err(fail(
                    Code::PermissionDenied,
                    "only the server sends to broadcast",
                ))
            }
        };
        let subscribed = self.subscribed(channel)?;
        if name.is_empty() || name.len() > 32 {
            return Err(fail(Code::BadRequest, "an event's name is 1 to 32 bytes"));
        }
        if data.to_string().len() > MAX_EVENT_DATA {
            return Err(fail(
                Code::BadRequest,
                format!("an event's data is at most {MAX_EVENT_DATA} bytes"),
            ));
        }
        let from = subscribed.sub.id();
        let push = serde_json::to_string(&channels::Event {
            channel,
            name,
            user: self.name(),
            data: &data,
        })
        .expect("events serialize");
        self.node
            .event(room, from, &push)
            .await
            .map_err(|e| fail(Code::Internal, format!("not sent to other nodes: {e}")))?;
        Ok(())
    }

    async fn history(
        &mut self,
        room: &str,
        since: Option<u64>,
        limit: usize,
    ) -> Result<(String, u64, Vec<ChatMessage>), Failure> {
        let node = &self.node;
        let epoch = session::current_epoch(node).await.map_err(internal)?;
        let plan = session::plan_replay(node, room, None, true)
            .await
            .map_err(internal)?;
        let messages = match since {
            Some(since) => node.history(room, since, u64::MAX, limit).await,
            None => node.recent(room, limit).await,
        }
        .map_err(internal)?;
        Ok((epoch, plan.end, messages))
    }

    /// Who is in `room`: one entry per user, with their connections on every node.
    async fn presence(&mut self, room: &str) -> Vec<Value> {
        let members = self.node.presence(room).await;
        // Every info was checked at its door (`info_problem`), on this node or another; one
        // that fails here anyway costs its own entry, never this session.
        members
            .into_iter()
            .filter_map(|member| match serde_json::to_value(&member) {
                Ok(value) => Some(value),
                Err(e) => {
                    tracing::warn!(error = %e, user = %member.user, "presence entry left out: its info does not read back");
                    None
                }
            })
            .collect()
    }
}

fn required<'a>(value: Option<&'a str>, field: &str) -> Result<&'a str, Failure> {
    value.ok_or_else(|| fail(Code::BadRequest, format!("{field} is required")))
}

fn internal(e: StoreError) -> Failure {
    tracing::error!(error = %e, "store failed");
    fail(Code::Internal, "storage unavailable: try again")
}

/// How a session ends on the hub's verdict.
fn judged(node: &Node, verdict: Verdict) -> End {
    match verdict {
        Verdict::Slow => {
            node.metrics.slow_consumers.fetch_add(1, Relaxed);
            End::Close(disconnect::SLOW_CONSUMER, "slow consumer: too far behind")
        }
        Verdict::Reset => End::Close(
            disconnect::STREAM_RESET,
            "a channel's stream was reset: reconnect",
        ),
        Verdict::Disconnected => End::Close(disconnect::BY_SERVER, "disconnected by the server"),
        Verdict::Reconnect => End::Close(
            disconnect::RECONNECT,
            "the server asks this connection to reconnect",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned_size<F, Fut>(_: F) -> usize
    where
        F: FnOnce(Arc<Node>, UpgradedWebSocket, Slot, Member) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// What an idle connection's task points to: at most 384 bytes, a jemalloc size class
    /// (the next is 448). The socket itself is shared with fan-out's drainer, behind a
    /// pointer (in an allocation of 320 bytes). A value kept across an `.await` in the
    /// session widens every connection's state; keep such values boxed or short-lived.
    #[test]
    fn info_is_a_small_shallow_object() {
        let raw = |text: &str| serde_json::value::RawValue::from_string(text.into()).unwrap();
        assert_eq!(
            info_problem(&raw(r#"{"device": "phone", "tags": ["a"]}"#)),
            None
        );
        let nested = |depth: usize| {
            format!(
                "{}{}",
                "{\"a\":".repeat(depth),
                "1".to_owned() + &"}".repeat(depth)
            )
        };
        assert_eq!(info_problem(&raw(&nested(MAX_INFO_DEPTH))), None);
        assert!(info_problem(&raw(&nested(MAX_INFO_DEPTH + 1))).is_some());
        // Deeper than serde_json reads back (128), in under 1,024 bytes.
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        assert!(deep.len() < MAX_INFO);
        assert!(info_problem(&raw(&deep)).is_some());
        // Brackets inside strings do not count.
        assert_eq!(
            info_problem(&raw(r#"{"a": "[[[[[[[[[[[[{{{{{{{{\"]]"}"#)),
            None
        );
        assert!(info_problem(&raw("[1]")).is_some());
        assert!(info_problem(&raw(&format!("{{\"a\": \"{}\"}}", "x".repeat(MAX_INFO)))).is_some());
    }

    #[test]
    fn a_session_fits_in_384_bytes() {
        let size = returned_size(session);
        assert!(size <= 384, "a channel session takes {size} bytes");
        let size = returned_size(|n, w, s, m| poll(n, w, s, 1, m));
        assert!(size <= 384, "a poll watcher's session takes {size} bytes");
        let resume = session::Resume::default;
        let size = returned_size(|n, w, s, m| room(n, w, s, String::new(), m, resume()));
        assert!(size <= 384, "a room member's session takes {size} bytes");
    }
}
