//! Several nodes joined through Redis (`--redis URL`): room history in Redis Streams, live
//! fan-out through Redis pub/sub, presence in expiring sorted-set entries.
//!
//! Every key of a room carries the room's name as its hash tag (`tether:{ROOM}:s` for the stream,
//! `:r` and `:p` for its channels, `:m` for presence, `:e` for its epoch, `:k:…` for idempotency
//! keys), so that in Redis Cluster all of them share one slot and each script touches one slot.
//! Storing and publishing a message is one Lua script, so it is atomic: the script takes the
//! room's next id from the stream's last entry, appends the message to the stream under the id
//! `0-N`, and publishes it on the room's channel. A room is first admitted (listed, under the
//! room cap) by another script on the rooms' list `tether:{tether:rooms}:names`, which also holds
//! the rooms' epoch; each room's stream keeps the epoch it was written under beside it, so a
//! stream that vanished (its Redis, or its shard, lost it) is told from a new room. Every node (the sender's included)
//! delivers what arrives on its subscriptions to its local members, in id order, once (the hub
//! drops ids it has delivered). After a lost subscription the node reads what it missed from
//! the streams of its rooms before going on, so no member sees a gap.
//!
//! A node listens only to the rooms it has members in: it subscribes to a room's channels when
//! the room gains its first local member and unsubscribes when it loses its last, so it
//! receives the rooms its connections watch rather than every message of the cluster. A member
//! reads a room's history only once the node hears the room live, so nothing published between
//! the two is missed.
//!
//! Presence: each node keeps `node\tuser` entries in `tether:{ROOM}:m` for its local members,
//! lists them in a set of its own (`tether:np:{node}`), and announces joins and leaves on
//! `tether:{ROOM}:p`. Entries do not expire: an idle room costs Redis nothing. Instead each
//! node beats once every few seconds in `tether:{tether:nodes}:live`; the first node to find another's
//! heartbeat stale claims it (atomically, with a lease) and sweeps that node's entries,
//! information and nicknames, announcing each leave. A node that finds it was swept (it was
//! paused, or Redis lost its data) writes its presence again.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use tokio::sync::{mpsc, oneshot};

use super::accounts::RedisAccounts;
use super::accounts::REVOKED_CHANNEL;
use super::feed::Feed;
use super::journal::ChatWrite;
use super::link::Link;
use super::local::{Change, Local, Member, Shared};
use super::polls::RedisPolls;
use super::polls::{PollNews, POLLS_CHANNEL};
use super::store::{now_rfc3339, ChatMessage, StoreError};
use super::{Broker, Control, Engine, EngineFuture, Leases, Presence, Reach, Revocations};
use crate::metrics::Metrics;

/// Lua: `epoch` is the rooms' epoch in the key KEYS[K], made from the proposal ARGV[A] when
/// missing (Redis is new or lost its data).
macro_rules! read_or_make_epoch {
    ($k:literal, $a:literal) => {
        concat!(
            "local epoch = redis.call('GET', KEYS[",
            $k,
            "])\n",
            "if not epoch then\n",
            "  epoch = ARGV[",
            $a,
            "]\n",
            "  redis.call('SET', KEYS[",
            $k,
            "], epoch)\n",
            "end\n"
        )
    };
}

/// Stores and publishes a message (KEYS: the room's stream, channel, epoch, idempotency key
/// and [`published_key`]; ARGV: the message's JSON before and after its id, the stream's
/// length, the node's epoch, the idempotency key or '', its window in seconds, '1' when the
/// node just checked its epoch against Redis, '1' when the room's stream should exist, the
/// command that publishes: PUBLISH, or SPUBLISH on Redis Cluster, or '' when the message is
/// published later, by [`PUBLISH_UP_TO`], once replicas hold it). Answers the stored
/// message; an error `EPOCH E` when the room is under epoch E, other than the node's, or
/// `LOST` when the stream of a room that existed is gone.
const APPEND: &str = r#"
if ARGV[5] ~= '' then
  local earlier = redis.call('GET', KEYS[4])
  if earlier then
    local kept = redis.call('XRANGE', KEYS[1], '0-' .. earlier, '0-' .. earlier)
    if #kept > 0 then return kept[1][2][2] end
  end
end
local epoch = redis.call('GET', KEYS[3])
if epoch ~= ARGV[4] then
  if ARGV[7] == '1' or (not epoch and ARGV[8] ~= '1') then
    epoch = ARGV[4]
    redis.call('SET', KEYS[3], epoch)
  elseif epoch then
    return redis.error_reply('EPOCH ' .. epoch)
  else
    return redis.error_reply('LOST the room stream is gone')
  end
end
local last = 0
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top > 0 then last = tonumber(string.match(top[1][1], '%-(%d+)$')) end
local id = last + 1
local msg = ARGV[1] .. id .. ',"epoch":"' .. epoch .. '"' .. ARGV[2]
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '0-' .. id, 'm', msg)
if ARGV[9] ~= '' then
  redis.call(ARGV[9], KEYS[2], msg)
  redis.call('DEL', KEYS[5])
else
  local published = tonumber(redis.call('GET', KEYS[5]) or '-1')
  if published < 0 or published >= id then redis.call('SET', KEYS[5], id - 1) end
end
if ARGV[5] ~= '' then redis.call('SET', KEYS[4], id, 'EX', ARGV[6]) end
return msg
"#;

/// Publishes the messages of a room stored and not yet published, up to id ARGV[1], in order
/// (KEYS: the room's stream, channel and [`published_key`]; ARGV[2]: PUBLISH or SPUBLISH):
/// run once replicas hold them, so that no member hears a message a dying master takes with
/// it. Each is published once, whichever node runs it first; a message stored later by
/// another node is not published before an earlier one; at most the last 1,000 are (more
/// are left to history). Answers how many it published.
const PUBLISH_UP_TO: &str = r#"
local upto = tonumber(ARGV[1])
local published = tonumber(redis.call('GET', KEYS[3]) or (upto - 1))
if published >= upto then return 0 end
local from = math.max(published + 1, upto - 999)
local stored = redis.call('XRANGE', KEYS[1], '0-' .. from, '0-' .. upto)
for _, entry in ipairs(stored) do redis.call(ARGV[2], KEYS[2], entry[2][2]) end
redis.call('SET', KEYS[3], upto)
return #stored
"#;

/// Admits room ARGV[1] (KEYS: [`ROOMS`], [`EPOCH`]): `{epoch, 1}` when it was listed,
/// `{epoch, 0}` when it is listed now; an error at the room cap ARGV[2], or when the sender
/// may start no room (ARGV[3] is not '1'). The epoch is made from ARGV[4] when missing.
const ADMIT: &str = concat!(
    read_or_make_epoch!(2, 4),
    r#"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {epoch, 1} end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return redis.error_reply('ROOMLIMIT the room cap is reached')
end
if ARGV[3] ~= '1' then
  return redis.error_reply('ROOMQUOTA this sender may start no more rooms for now')
end
redis.call('ZADD', KEYS[1], 0, ARGV[1])
return {epoch, 0}
"#
);

/// The rooms' epoch: read, or made (with the node's proposal) when Redis has none, which is
/// when it is new or lost its data.
const EPOCH_SCRIPT: &str = concat!(read_or_make_epoch!(1, 1), "return epoch\n");

/// Claims a guest nickname (hash KEYS[1]: `guest` and a field `n:NODE` per node using it) for
/// guest ARGV[1] on node ARGV[2], unless another guest holds it: 1 when it is this guest's
/// now, 0 when another's.
const CLAIM_NICK: &str = r#"
local holder = redis.call('HGET', KEYS[1], 'guest')
if holder and holder ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'guest', ARGV[1], 'n:' .. ARGV[2], 1)
return 1
"#;

/// Lua: `release(k, g, node)`: node `node` stops using the nickname claimed in hash `k` for
/// guest `g`; the name is free once no node uses it.
macro_rules! release_nick_fn {
    () => {
        r#"
local function release(k, g, node)
  if redis.call('HGET', k, 'guest') == g then
    redis.call('HDEL', k, 'n:' .. node)
    if redis.call('HLEN', k) <= 1 then redis.call('DEL', k) end
  end
end
"#
    };
}

/// Releases a guest nickname (KEYS[1]) that guest ARGV[1] used on node ARGV[2].
const RELEASE_NICK: &str = concat!(
    release_nick_fn!(),
    r#"
release(KEYS[1], ARGV[1], ARGV[2])
return 0
"#
);

/// Where a guest nickname is claimed.
const NICK_PREFIX: &str = "tether:nk:";

fn nick_key(name: &str) -> String {
    format!("{NICK_PREFIX}{name}")
}

/// Live nodes: a sorted set, each scored by when its heartbeat goes stale (ms since 1970).
const NODES: &str = "tether:{tether:nodes}:live";
/// Stale nodes being swept, each scored by when its sweeper's lease ends.
const SWEEPING: &str = "tether:{tether:nodes}:sweeping";

/// The `room\tuser` of each presence entry a node holds (a set).
fn node_entries_key(node: &str) -> String {
    format!("tether:np:{node}")
}

/// The `name\tguest` of each nickname a node uses (a set).
fn node_nicks_key(node: &str) -> String {
    format!("tether:nn:{node}")
}

/// A node's heartbeat (KEYS: [`NODES`], [`SWEEPING`]; ARGV: node, now, stale at, lease end).
/// Returns `{state, claimed}`: state 1 when the node was registered, 0 when it was not (new,
/// swept, or Redis lost its data), 2 when it is being swept (it registers once that is done,
/// or once the sweeper's lease ran out);
/// `claimed` lists the stale nodes this node now sweeps (their lease is its own).
const HEARTBEAT: &str = r#"
local lease = redis.call('ZSCORE', KEYS[2], ARGV[1])
if lease then
  if tonumber(lease) >= tonumber(ARGV[2]) then return {2, {}} end
  -- Its sweeper stopped: what is left of the node is its own to reconcile.
  redis.call('ZREM', KEYS[2], ARGV[1])
end
local was = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
local claimed = {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, 16)) do
  redis.call('ZREM', KEYS[1], node)
  redis.call('ZADD', KEYS[2], ARGV[4], node)
  table.insert(claimed, node)
end
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2], 'LIMIT', 0, 16)) do
  redis.call('ZADD', KEYS[2], ARGV[4], node)
  table.insert(claimed, node)
end
if was then return {1, claimed} end
return {0, claimed}
"#;

/// Entries swept in one round at most.
const SWEEP_BATCH: usize = 256;
/// How long a sweeper holds a stale node before another node may take over.
const SWEEP_LEASE: Duration = Duration::from_secs(30);

/// The key of the rooms' epoch (beside [`ROOMS`], so that admitting a room reads it).
pub(crate) const EPOCH: &str = "tether:{tether:rooms}:epoch";

/// How long a node's heartbeat lasts: a node silent for longer is swept.
const HEARTBEAT_TTL: Duration = Duration::from_secs(15);
/// How often a node beats, and looks for stale nodes.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(3);

/// Key `part` of `room`: every key of a room carries its name as the hash tag.
fn room_key(room: &str, part: &str) -> String {
    format!("tether:{{{room}}}:{part}")
}

/// The room's stream of messages.
pub(crate) fn stream_key(room: &str) -> String {
    room_key(room, "s")
}

/// The epoch the room's stream was written under.
pub(crate) fn epoch_key(room: &str) -> String {
    room_key(room, "e")
}

/// The id up to which a room's messages are published, when they are published only once
/// replicas hold them (`redis_replicas`): readers see no further either.
fn published_key(room: &str) -> String {
    room_key(room, "d")
}

/// Appends sent to Redis in one pipeline at most.
const APPEND_BATCH: usize = 128;
/// Appends waiting at most; a session queuing more waits (backpressure).
const APPEND_QUEUE: usize = 4096;

/// How long Redis remembers a message's idempotency key.
pub const KEY_WINDOW: Duration = Duration::from_secs(3600);

/// Where a message's idempotency key is remembered (per room and sender).
fn key_name(room: &str, user: &str, key: &str) -> String {
    format!("tether:{{{room}}}:k:{user}\t{key}")
}

/// Where a room's stored messages are published.
fn channel(room: &str) -> String {
    room_key(room, "r")
}

/// Where a room's joins and leaves are announced.
fn presence_channel(room: &str) -> String {
    room_key(room, "p")
}

/// Whether `channel` is a room's presence channel.
fn is_presence_channel(channel: &str) -> bool {
    channel.starts_with("tether:{") && channel.ends_with("}:p")
}

/// A node's Redis channels for `rooms`: messages and presence of each.
fn room_channels(rooms: &[Arc<str>]) -> Vec<String> {
    rooms
        .iter()
        .flat_map(|r| [channel(r), presence_channel(r)])
        .collect()
}

/// Rooms (un)subscribed in one command at most.
const SUBSCRIBE_BATCH: usize = 512;

/// How long a member waits for its node to hear a new room live before reading its history
/// anyway (the room is then caught up once it is heard).
const LISTEN_WAIT: Duration = Duration::from_secs(2);

/// Which rooms this node hears on its current Redis subscription.
#[derive(Debug, Default)]
struct Listening {
    /// The subscription is up (set once the rooms that had members when it came are heard).
    up: bool,
    /// Rooms whose channels are subscribed.
    heard: HashSet<Arc<str>>,
    /// Members waiting for a room to be heard before they read its history.
    waiting: HashMap<Arc<str>, Vec<oneshot::Sender<()>>>,
    /// Rooms whose members read history without waiting for them to be heard (Redis was away,
    /// or slow): caught up from their streams once heard.
    unsure: HashSet<Arc<str>>,
}

/// Where a room's presence entries are kept.
fn members_key(room: &str) -> String {
    room_key(room, "m")
}

/// Rooms with stored messages: a sorted set, every score 0, so it pages in name order.
pub(crate) const ROOMS: &str = "tether:{tether:rooms}:names";

/// Moves the keys of the layout before hash tags (`tether:s:ROOM`, `tether:epoch`,
/// `tether:room-names`, …) to today's (ARGV: [`EPOCH`], [`ROOMS`]), once: a Redis without the
/// old epoch and room list has nothing to move, and answers at once. Presence of the old
/// layout is dropped (each node writes its own again). Runs on a single Redis only (it
/// touches keys of many slots), in one script, so no node sees half of it.
const MIGRATE: &str = r#"
local old_epoch = redis.call('GET', 'tether:epoch')
local old_sets = redis.call('TYPE', 'tether:rooms').ok == 'set'
if not old_epoch and not old_sets and redis.call('EXISTS', 'tether:room-names') == 0 then
  return 0
end
if old_sets then
  for _, room in ipairs(redis.call('SMEMBERS', 'tether:rooms')) do
    redis.call('ZADD', ARGV[2], 0, room)
  end
  redis.call('DEL', 'tether:rooms')
end
for _, room in ipairs(redis.call('ZRANGE', 'tether:room-names', 0, -1)) do
  redis.call('ZADD', ARGV[2], 0, room)
end
redis.call('DEL', 'tether:room-names')
if old_epoch then
  redis.call('SET', ARGV[1], old_epoch, 'NX')
  redis.call('DEL', 'tether:epoch')
end
local epoch = redis.call('GET', ARGV[1])
local function each(pattern, f)
  local cursor = '0'
  repeat
    local page = redis.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 1000)
    cursor = page[1]
    for _, k in ipairs(page[2]) do f(k) end
  until cursor == '0'
end
local moved = 0
each('tether:s:*', function(k)
  local room = string.sub(k, 10)
  redis.call('RENAME', k, 'tether:{' .. room .. '}:s')
  if epoch then redis.call('SET', 'tether:{' .. room .. '}:e', epoch, 'NX') end
  moved = moved + 1
end)
each('tether:k:*', function(k)
  local rest = string.sub(k, 10)
  local tab = string.find(rest, '\t', 1, true)
  if tab then
    redis.call('RENAME', k, 'tether:{' .. string.sub(rest, 1, tab - 1) .. '}:k:' .. string.sub(rest, tab + 1))
  else
    redis.call('DEL', k)
  end
end)
each('tether:m:*', function(k) redis.call('DEL', k) end)
each('tether:i:*', function(k) redis.call('DEL', k) end)
redis.call('DEL', 'tether:nodes', 'tether:sweeping')
return moved
"#;
const BROADCAST: &str = "tether:broadcast";
/// Where nodes tell each other to end a user's connections or subscriptions.
const CONTROL: &str = "tether:control";

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads ARGV[2] entries of stream KEYS[1] with ARGV[1] (`XRANGE` from ARGV[3] on, or
/// `XREVRANGE` back from the last to ARGV[3]), no further than the id published (KEYS[2], when
/// set: see `Cluster::read_published`).
const READ_PUBLISHED: &str = r#"
local top = '+'
local published = redis.call('GET', KEYS[2])
if published then
  if published == '0' then return {} end
  top = '0-' .. published
end
if ARGV[1] == 'XRANGE' then
  return redis.call('XRANGE', KEYS[1], ARGV[3], top, 'COUNT', ARGV[2])
end
return redis.call('XREVRANGE', KEYS[1], top, ARGV[3], 'COUNT', ARGV[2])
"#;

/// Where a read of a room's stream starts.
#[derive(Debug, Clone, Copy)]
enum Range {
    /// At this id, oldest first.
    From(u64),
    /// At the last entry, newest first.
    Back,
}

impl Range {
    fn command(self) -> &'static str {
        match self {
            Range::From(_) => "XRANGE",
            Range::Back => "XREVRANGE",
        }
    }

    /// The other end of the range: the first id read, or the oldest entry.
    fn start(self) -> String {
        match self {
            Range::From(first) => format!("0-{first}"),
            Range::Back => "-".to_owned(),
        }
    }
}

/// A presence change announced to the other nodes.
#[derive(Debug, Serialize, Deserialize)]
struct PresenceNote {
    node: String,
    room: String,
    user: String,
    join: bool,
    /// The public information of the connection that joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    info: Option<Box<RawValue>>,
}

/// Where a node keeps the public information its users' connections in a room attached
/// (`{user: [info, …]}`).
fn infos_key(room: &str, node: &str) -> String {
    format!("tether:{{{room}}}:i:{node}")
}

/// An ephemeral event for the other nodes with members in a room, sent on the room's
/// presence channel (the room's side channel for what is not stored).
#[derive(Debug, Serialize, Deserialize)]
struct EventNote {
    node: String,
    room: String,
    /// The channel-protocol push, as the sender's node encoded it.
    event: String,
}

/// A broadcast notice for every node.
#[derive(Debug, Serialize, Deserialize)]
struct BroadcastNote {
    user: String,
    text: String,
    ts: String,
}

/// What every node is told to do to a user's connections ([`CONTROL`]).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum ControlNote {
    /// End every connection of `user`.
    Disconnect { user: String, reconnect: bool },
    /// End `user`'s subscriptions to `channel`.
    Unsubscribe { user: String, channel: String },
}

/// What a node knows of the rooms in Redis, under one epoch.
#[derive(Debug, Default)]
struct Known {
    /// The epoch it was learnt under.
    epoch: String,
    /// Rooms seen listed in [`ROOMS`]: their messages need no admission.
    listed: HashSet<String>,
    /// Rooms whose stream this node saw written: a stream of theirs that is gone was lost.
    written: HashSet<String>,
}

/// This node's link to Redis.
pub struct Cluster {
    node: String,
    commands: Link,
    hub: Arc<dyn Local>,
    metrics: Arc<Metrics>,
    history_limit: usize,
    max_rooms: usize,
    /// New rooms per identity.
    room_quota: crate::engine::journal::RoomQuota,
    /// Messages waiting to be stored, in order.
    appends: mpsc::Sender<ChatWrite>,
    /// Messages queued and not yet answered, and a signal when that falls to none.
    pending: std::sync::atomic::AtomicUsize,
    settled: tokio::sync::Notify,
    epoch: redis::Script,
    connected: AtomicBool,
    /// What Redis holds of this node's presence and nicknames may differ from what it has:
    /// a write failed, or the node was swept. Reconciled after the next heartbeat.
    dirty: AtomicBool,
    /// Redis stopped answering commands (the last heartbeat failed) though the subscription
    /// may look alive: a stalled or overloaded Redis.
    stalled: AtomicBool,
    /// Users of each local room present on other nodes, with the nodes they are on.
    remote: Mutex<HashMap<String, BTreeMap<String, BTreeSet<String>>>>,
    /// This node's guest nicknames, kept claimed in Redis.
    nicknames: std::sync::OnceLock<Arc<crate::identity::guests::Nicknames>>,
    listening: Mutex<Listening>,
    /// What this node knows of the rooms in Redis, under an epoch.
    admitted: Mutex<Known>,
    /// Rooms whose presence information this node keeps in Redis ([`infos_key`]).
    with_infos: Mutex<HashSet<String>>,
    /// Where revocations announced by other nodes (and `tether user`) are signalled.
    revocations: crate::engine::Revocations,
    /// Polls, with what this node announced of them.
    polls: RedisPolls,
    /// Rooms whose messages are stored up to an id and may not be published yet (writes wait
    /// for replicas, and publishing them failed).
    unpublished: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .field("connected", &self.connected.load(Relaxed))
            .finish_non_exhaustive()
    }
}

/// A lock even if a holder panicked: what these locks guard stays consistent between
/// statements.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn redis_error(e: redis::RedisError) -> StoreError {
    StoreError::Failed(format!("redis: {e}"))
}

impl Cluster {
    /// Starts the subscription and presence tasks over `commands` (which connects lazily: a
    /// Redis that is down at start is retried like a lost one).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        commands: Link,
        node: String,
        hub: Arc<dyn Local>,
        metrics: Arc<Metrics>,
        history_limit: usize,
        max_rooms: usize,
        room_quota: crate::engine::journal::RoomQuota,
        revocations: crate::engine::Revocations,
    ) -> Arc<Cluster> {
        let (appends, queued) = mpsc::channel(APPEND_QUEUE);
        let polls = RedisPolls::new(commands.clone(), node.clone(), hub.clone());
        let cluster = Arc::new(Cluster {
            polls,
            node,
            commands,
            hub,
            metrics,
            history_limit,
            max_rooms,
            room_quota,
            appends,
            pending: std::sync::atomic::AtomicUsize::new(0),
            settled: tokio::sync::Notify::new(),
            epoch: redis::Script::new(EPOCH_SCRIPT),
            connected: AtomicBool::new(false),
            // A previous run of this node may have left entries behind.
            dirty: AtomicBool::new(true),
            stalled: AtomicBool::new(false),
            remote: Mutex::new(HashMap::new()),
            nicknames: std::sync::OnceLock::new(),
            listening: Mutex::new(Listening::default()),
            admitted: Mutex::new(Known::default()),
            with_infos: Mutex::new(HashSet::new()),
            revocations,
            unpublished: Mutex::new(HashMap::new()),
        });
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Shared>();
        cluster.hub.share_presence(tx);
        tokio::spawn(cluster.clone().share_forever(rx));
        let (follow, rooms) = mpsc::unbounded_channel();
        cluster.hub.follow_rooms(follow);
        tokio::spawn(cluster.clone().subscribe_forever(rooms));
        tokio::spawn(cluster.clone().append_forever(queued));
        cluster
    }

    /// Whether the subscription to Redis is up and Redis answers commands.
    pub fn is_healthy(&self) -> bool {
        self.connected.load(Relaxed) && !self.stalled.load(Relaxed)
    }

    /// What is wrong with Redis, for `/healthz`: "disconnected" (no subscription) or "not
    /// answering" (commands time out); "ok" otherwise.
    pub fn health(&self) -> &'static str {
        if !self.connected.load(Relaxed) {
            "disconnected"
        } else if self.stalled.load(Relaxed) {
            "not answering"
        } else {
            "ok"
        }
    }

    /// A handle on the connection for commands (with timeouts, reconnection, and following
    /// a promoted replica).
    pub fn commands(&self) -> Link {
        self.commands.clone()
    }

    /// Polls in this Redis, for this node.
    pub fn polls(&self) -> RedisPolls {
        self.polls.clone()
    }

    /// How a room's channels are published to: sharded on Redis Cluster, so that a message
    /// goes to the shard of its room only.
    fn publish(&self) -> &'static str {
        if self.commands.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Queues a message for storing under the room's next id and publishing to every node,
    /// waiting only while the queue is full. Messages are stored in the order they are queued.
    /// The outcome goes to `append.reply`: the stored message (with an idempotency key already
    /// used in this room within [`KEY_WINDOW`], the one stored then); [`StoreError::Unknown`]
    /// when Redis did not answer in time or the connection dropped with the script sent (it may
    /// have run); otherwise a failure means nothing was stored.
    ///
    /// # Errors
    /// [`StoreError::Closed`] when the appender has stopped.
    pub async fn submit(&self, append: ChatWrite) -> Result<(), StoreError> {
        self.pending.fetch_add(1, Relaxed);
        let queued = self.appends.send(append).await;
        if queued.is_err() {
            self.answered(1);
        }
        queued.map_err(|_| StoreError::Closed)
    }

    /// Counts `n` queued messages as answered.
    fn answered(&self, n: usize) {
        if self.pending.fetch_sub(n, Relaxed) == n {
            self.settled.notify_waiters();
        }
    }

    /// Resolves once every message queued so far is stored (or refused) and answered.
    pub async fn appended(&self) {
        loop {
            let settled = self.settled.notified();
            if self.pending.load(Relaxed) == 0 {
                return;
            }
            settled.await;
        }
    }

    /// Stores queued messages in order, many per round trip: each pipeline holds the appends
    /// waiting when the previous one returned. A session that queues a message goes on
    /// draining its own outbox meanwhile, so a burst of its client's messages (after a pause)
    /// cannot make it a slow consumer.
    async fn append_forever(self: Arc<Self>, mut rx: mpsc::Receiver<ChatWrite>) {
        let mut batch = Vec::with_capacity(APPEND_BATCH);
        while rx.recv_many(&mut batch, APPEND_BATCH).await > 0 {
            let answered = batch.len();
            let outcomes = self.store_batch(&batch).await;
            for (job, outcome) in batch.drain(..).zip(outcomes) {
                let outcome = outcome.and_then(|stored| {
                    serde_json::from_str(&stored)
                        .map_err(|e| StoreError::Failed(format!("stored message: {e}")))
                });
                // A refusal at the room cap is no storage failure.
                let failed = matches!(&outcome, Err(e) if !matches!(e, StoreError::Limit(_)));
                self.metrics.stored_in_redis(!failed);
                job.reply.send(outcome, "message not stored");
            }
            self.answered(answered);
        }
    }

    /// Stores `batch` in order: the stored message (its JSON) or the failure of each. Rooms
    /// this node has not seen listed are admitted first; appends that find their room under
    /// another epoch, or its stream gone, are sent once more once the epoch is settled.
    async fn store_batch(&self, batch: &[ChatWrite]) -> Vec<Result<String, StoreError>> {
        let mut outcomes: Vec<Option<Result<String, StoreError>>> =
            batch.iter().map(|_| None).collect();
        let (mut epoch, existed) = match self.admit(batch, &mut outcomes).await {
            Ok(admitted) => admitted,
            Err(e) => {
                let text = match e {
                    StoreError::Failed(text) => text,
                    e => e.to_string(),
                };
                return batch
                    .iter()
                    .map(|_| Err(StoreError::Failed(text.clone())))
                    .collect();
            }
        };
        let mut pending: Vec<usize> = (0..batch.len())
            .filter(|&i| outcomes[i].is_none())
            .collect();
        let mut settled = false;
        while !pending.is_empty() {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in &pending {
                pipe.add_command(self.append_command(&batch[i], &epoch, settled, existed[i]));
            }
            let mut con = self.commands.clone();
            let sent = pipe
                .query_async::<Vec<redis::RedisResult<String>>>(&mut con)
                .await;
            let results = match sent {
                Ok(results) => results,
                Err(e) => {
                    for &i in &pending {
                        outcomes[i] = Some(Err(self.append_error(&e)));
                    }
                    break;
                }
            };
            let (mut again, mut lost) = (Vec::new(), false);
            {
                let mut known = lock(&self.admitted);
                if known.epoch == epoch {
                    for (&i, result) in pending.iter().zip(&results) {
                        if result.is_ok() {
                            known.written.insert(batch[i].room.clone());
                        }
                    }
                }
            }
            for (&i, result) in pending.iter().zip(results) {
                match result {
                    Err(e) if !settled && matches!(e.code(), Some("EPOCH" | "LOST")) => {
                        lost |= e.code() == Some("LOST");
                        again.push(i);
                    }
                    result => outcomes[i] = Some(result.map_err(|e| self.append_error(&e))),
                }
            }
            if !again.is_empty() {
                match self.settle_epoch(&epoch, lost).await {
                    Ok(now) => epoch = now,
                    Err(e) => {
                        for &i in &again {
                            outcomes[i] = Some(Err(StoreError::Failed(e.to_string())));
                        }
                        again.clear();
                    }
                }
            }
            pending = again;
            settled = true;
        }
        self.publish_stored(&outcomes, batch).await;
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Err(StoreError::Closed)))
            .collect()
    }

    /// Admits the rooms of `batch` this node has not seen listed under the current epoch
    /// (listing them, under the room cap and the senders' room quota), failing in `outcomes`
    /// the jobs of rooms refused; the rooms' epoch, and for each job whether its room's
    /// stream should exist already.
    async fn admit(
        &self,
        batch: &[ChatWrite],
        outcomes: &mut [Option<Result<String, StoreError>>],
    ) -> Result<(String, Vec<bool>), StoreError> {
        let known = self.hub.epoch();
        // Each new room once, with the quota token of its first sender: a room with members
        // here was paid for by its first member (`Node::may_join_room`), and a user's
        // notification stream is no room anyone starts (nor listed).
        let now = std::time::Instant::now();
        let mut rooms: Vec<(&str, bool)> = Vec::new();
        {
            let admitted = lock(&self.admitted);
            for job in batch {
                let room = job.room.as_str();
                let listed =
                    !known.is_empty() && admitted.epoch == known && admitted.listed.contains(room);
                if listed || crate::wire::is_personal(room) || rooms.iter().any(|(r, _)| *r == room)
                {
                    continue;
                }
                let paid = self.hub.has_room(room);
                let token = !paid && self.room_quota.take(&job.writer, now).is_ok();
                rooms.push((room, token || paid));
            }
        }
        let mut epoch = known.clone();
        let mut answers = Vec::new();
        if !rooms.is_empty() {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            let proposal = crate::engine::store::new_epoch();
            for (room, may_start) in &rooms {
                pipe.cmd("EVAL")
                    .arg(ADMIT)
                    .arg(2)
                    .arg(ROOMS)
                    .arg(EPOCH)
                    .arg(*room)
                    .arg(self.max_rooms)
                    .arg(if *may_start { "1" } else { "0" })
                    .arg(&proposal);
            }
            let mut con = self.commands.clone();
            // Admitting is idempotent: one that timed out (a busy node, a slow Redis) is sent
            // once more before its messages are refused.
            let mut sent = pipe
                .query_async::<Vec<redis::RedisResult<(String, i64)>>>(&mut con)
                .await;
            if matches!(&sent, Err(e) if e.is_timeout() || e.is_connection_dropped()) {
                sent = pipe
                    .query_async::<Vec<redis::RedisResult<(String, i64)>>>(&mut con)
                    .await;
            }
            answers = match sent {
                Ok(answers) => answers,
                Err(e) => {
                    self.refund(batch, &rooms, &[], now);
                    self.metrics.store_failures.fetch_add(1, Relaxed);
                    // Nothing was stored: the messages were not sent.
                    return Err(redis_error(e));
                }
            };
            if let Some(Ok((now_epoch, _))) = answers.iter().find(|a| a.is_ok()) {
                epoch = now_epoch.clone();
            }
        }
        if epoch.is_empty() || epoch != known {
            // Not known yet, or Redis has another one now (it lost its data): every room
            // here starts again, and so does what this node knew listed.
            epoch = if epoch.is_empty() {
                self.epoch().await?
            } else {
                self.hub.observe_epoch(&epoch);
                epoch
            };
        }
        let mut created = Vec::new();
        let mut existed: Vec<bool> = Vec::with_capacity(batch.len());
        {
            let mut admitted = lock(&self.admitted);
            if admitted.epoch != epoch {
                *admitted = Known {
                    epoch: epoch.clone(),
                    ..Known::default()
                };
            }
            for ((room, _), answer) in rooms.iter().zip(&answers) {
                if let Ok((_, listed)) = answer {
                    if *listed == 0 {
                        created.push(*room);
                    }
                    admitted.listed.insert((*room).to_owned());
                }
            }
            for (i, job) in batch.iter().enumerate() {
                let room = job.room.as_str();
                if let Some(k) = rooms.iter().position(|(r, _)| *r == room) {
                    if let Some(Err(e)) = answers.get(k) {
                        outcomes[i] = Some(Err(self.append_error(e)));
                    }
                }
                // Listed is not enough: a room is listed before its first message is stored.
                existed.push(self.hub.position(room) > 0 || admitted.written.contains(room));
            }
            // Rooms are capped (`max_rooms`), and so is what this remembers of them (users'
            // notification streams are not: what is forgotten costs a check again).
            let most = self.max_rooms.max(1) * 2;
            if admitted.listed.len() > most || admitted.written.len() > most {
                admitted.listed.clear();
                admitted.written.clear();
            }
        }
        self.refund(batch, &rooms, &created, now);
        Ok((epoch, existed))
    }

    /// Gives back the room quota tokens taken for `rooms` that were not `created`.
    fn refund(
        &self,
        batch: &[ChatWrite],
        rooms: &[(&str, bool)],
        created: &[&str],
        now: std::time::Instant,
    ) {
        for (room, _) in rooms {
            if created.contains(room) || self.hub.has_room(room) {
                continue;
            }
            if let Some(job) = batch.iter().find(|j| j.room == *room) {
                self.room_quota.refund(&job.writer, now);
            }
        }
    }

    /// The epoch to append under after an append found its room under epoch other than
    /// `seen`, or (`lost`) its stream gone: the one Redis holds, unless that is `seen` and a
    /// stream was lost, when this node starts a new one (the ids past the lost stream's end
    /// will name other messages).
    async fn settle_epoch(&self, seen: &str, lost: bool) -> Result<String, StoreError> {
        let now = self.epoch().await?;
        if now != seen || !lost {
            return Ok(now);
        }
        tracing::error!(
            "a room's stream is gone from redis though the room was listed: starting a new epoch"
        );
        self.new_epoch().await
    }

    /// The script that stores `job` under `epoch` (EVAL with the script's text: a Redis that
    /// restarted has no cached scripts, and a pipeline cannot load one midway); `settled` when
    /// the epoch was just read from Redis, `existed` when the room's stream should exist.
    fn append_command(
        &self,
        job: &ChatWrite,
        epoch: &str,
        settled: bool,
        existed: bool,
    ) -> redis::Cmd {
        // The message is JSON with the id spliced in by the script: `{…"id":` + N + `,…}`.
        let mut rest = serde_json::json!({
            "room": job.room, "user": job.user, "text": job.text, "ts": now_rfc3339()
        });
        if job.writer.is_guest() {
            rest["guest"] = serde_json::Value::Bool(true);
        }
        let rest = rest.to_string();
        let suffix = format!(",{}", &rest[1..]);
        let key = job.key.as_deref().unwrap_or_default();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(APPEND)
            .arg(5)
            .arg(stream_key(&job.room))
            .arg(channel(&job.room))
            .arg(epoch_key(&job.room))
            .arg(key_name(&job.room, &job.user, key))
            .arg(published_key(&job.room))
            .arg(r#"{"type":"message","id":"#)
            .arg(suffix)
            .arg(self.history_limit.max(1))
            .arg(epoch)
            .arg(key)
            .arg(KEY_WINDOW.as_secs())
            .arg(if settled { "1" } else { "0" })
            .arg(if existed { "1" } else { "0" })
            .arg(if self.commands.confirms() {
                ""
            } else {
                self.publish()
            });
        cmd
    }

    /// Publishes the messages stored in `outcomes` (and all before them in their rooms), now
    /// that replicas hold them, when writes wait for replicas. Rooms whose publication
    /// failed are published with the next batch or heartbeat: their messages are stored,
    /// and readers see them then.
    async fn publish_stored(
        &self,
        outcomes: &[Option<Result<String, StoreError>>],
        batch: &[ChatWrite],
    ) {
        if !self.commands.confirms() {
            return;
        }
        let mut upto = std::mem::take(&mut *lock(&self.unpublished));
        for (job, outcome) in batch.iter().zip(outcomes) {
            if let Some(id) = outcome
                .as_ref()
                .and_then(|o| o.as_ref().ok())
                .and_then(|m| stored_id(m))
            {
                raise(&mut upto, &job.room, id);
            }
        }
        if upto.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (room, id) in &upto {
            pipe.cmd("EVAL")
                .arg(PUBLISH_UP_TO)
                .arg(3)
                .arg(stream_key(room))
                .arg(channel(room))
                .arg(published_key(room))
                .arg(*id)
                .arg(self.publish())
                .ignore();
        }
        // What it publishes is confirmed already: no second wait.
        let mut con = self.commands.unconfirmed();
        if let Err(e) = pipe.query_async::<()>(&mut con).await {
            tracing::warn!(error = %e, rooms = upto.len(), "publishing stored messages failed; again with the next");
            let mut unpublished = lock(&self.unpublished);
            for (room, id) in upto {
                raise(&mut unpublished, &room, id);
            }
        }
    }

    /// What a failed append means for its sender.
    fn append_error(&self, e: &redis::RedisError) -> StoreError {
        if e.code() == Some("ROOMLIMIT") {
            return StoreError::Limit(format!(
                "the server keeps at most {} rooms (max_rooms): pick an existing room",
                self.max_rooms
            ));
        }
        if e.code() == Some("ROOMQUOTA") {
            return StoreError::Limit(crate::engine::journal::ROOM_QUOTA.to_owned());
        }
        self.metrics.store_failures.fetch_add(1, Relaxed);
        if e.is_timeout() || e.is_connection_dropped() {
            return StoreError::Unknown(format!("redis: {e}"));
        }
        redis_error(e.clone())
    }

    /// Shares this node's guest nicknames with the cluster: names it stops using are released
    /// in Redis. What Redis holds of them is checked when the node (re)joins the cluster.
    pub fn follow_nicknames(self: &Arc<Self>, nicknames: Arc<crate::identity::guests::Nicknames>) {
        let _ = self.nicknames.set(nicknames.clone());
        // Bounded: a release that does not fit is made when the node next reconciles.
        let (released, mut releases) = mpsc::channel::<(String, String)>(4096);
        nicknames.share_releases(released);
        let releaser = self.clone();
        tokio::spawn(async move {
            while let Some((name, guest)) = releases.recv().await {
                releaser.release_nickname(&name, &guest).await;
            }
        });
    }

    /// Claims guest nickname `name` (lowercase) for `guest` across the cluster: `true` when
    /// it is this guest's, `false` when a guest on another node holds it. A claim lasts while
    /// any node uses the name for that guest, or until the node's heartbeat goes stale.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn claim_nickname(&self, name: &str, guest: &str) -> Result<bool, StoreError> {
        // Listed as this node's first, so that a sweep of this node finds every name it may
        // hold (a sweep releases a name only for the guest holding it).
        let mut con = self.commands.clone();
        let entry = format!("{name}\t{guest}");
        redis::cmd("SADD")
            .arg(node_nicks_key(&self.node))
            .arg(&entry)
            .query_async::<()>(&mut con)
            .await
            .map_err(redis_error)?;
        let claimed: i64 = redis::Script::new(CLAIM_NICK)
            .key(nick_key(name))
            .arg(guest)
            .arg(&self.node)
            .invoke_async(&mut con)
            .await
            .map_err(redis_error)?;
        if claimed != 1 {
            redis::cmd("SREM")
                .arg(node_nicks_key(&self.node))
                .arg(&entry)
                .query_async::<()>(&mut con)
                .await
                .map_err(redis_error)?;
        }
        Ok(claimed == 1)
    }

    /// Releases a name this node stopped using, unless the guest holds it here again; if the
    /// guest came back while the release was on its way, the name is claimed again (a claim
    /// sent before the release would be undone by it).
    async fn release_nickname(&self, name: &str, guest: &str) {
        let Some(names) = self.nicknames.get() else {
            return;
        };
        if names.holds(name, guest) {
            return;
        }
        let mut con = self.commands.clone();
        let released = redis::Script::new(RELEASE_NICK)
            .key(nick_key(name))
            .arg(guest)
            .arg(&self.node)
            .invoke_async::<i64>(&mut con)
            .await;
        let released = match released {
            Ok(_) => {
                redis::cmd("SREM")
                    .arg(node_nicks_key(&self.node))
                    .arg(format!("{name}\t{guest}"))
                    .query_async::<i64>(&mut con)
                    .await
            }
            failed => failed,
        };
        if let Err(e) = released {
            tracing::debug!(error = %e, name, "nickname not released in redis (released when this node reconciles)");
            self.dirty.store(true, Relaxed);
        } else if names.holds(name, guest) {
            if let Err(e) = self.claim_nickname(name, guest).await {
                tracing::debug!(error = %e, name, "nickname not claimed again in redis");
                self.dirty.store(true, Relaxed);
            }
        }
    }

    /// The rooms' epoch in Redis (made if Redis has none); the hub takes note of it, so a
    /// changed one resets the local rooms.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn epoch(&self) -> Result<String, StoreError> {
        let mut con = self.commands.clone();
        let epoch: String = self
            .epoch
            .key(EPOCH)
            .arg(crate::engine::store::new_epoch())
            .invoke_async(&mut con)
            .await
            .map_err(redis_error)?;
        self.hub.observe_epoch(&epoch);
        Ok(epoch)
    }

    /// Replaces the rooms' epoch (storage lost messages without losing the epoch); the hub
    /// resets every room.
    async fn new_epoch(&self) -> Result<String, StoreError> {
        let epoch = crate::engine::store::new_epoch();
        let mut con = self.commands.clone();
        redis::cmd("SET")
            .arg(EPOCH)
            .arg(&epoch)
            .query_async::<()>(&mut con)
            .await
            .map_err(redis_error)?;
        self.hub.observe_epoch(&epoch);
        Ok(epoch)
    }

    /// Messages of `room` with `id > since`, oldest first, at most `limit`.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn messages(
        &self,
        room: &str,
        since: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let first = since.saturating_add(1);
        self.read_published(room, Range::From(first), limit.max(1))
            .await
    }

    /// `count` entries of `room`'s stream from id `first` on (`Range::From`) or back from its
    /// last (`Range::Back`). When writes wait for replicas, it reads no further than the messages
    /// published: a dying master may take the others with it, so nobody sees them before
    /// their replicas hold them. One round trip either way (the mark and the range are read
    /// by one read-only script).
    async fn read_published(
        &self,
        room: &str,
        range: Range,
        count: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let mut con = self.commands.clone();
        let read = if self.commands.confirms() {
            let mut read = redis::cmd("EVAL_RO");
            read.arg(READ_PUBLISHED)
                .arg(2)
                .arg(stream_key(room))
                .arg(published_key(room))
                .arg(range.command())
                .arg(count)
                .arg(range.start());
            read
        } else {
            let mut read = redis::cmd(range.command());
            read.arg(stream_key(room));
            match range {
                Range::From(_) => read.arg(range.start()).arg("+"),
                Range::Back => read.arg("+").arg(range.start()),
            };
            read.arg("COUNT").arg(count);
            read
        };
        let entries: Vec<Entry> = read.query_async(&mut con).await.map_err(redis_error)?;
        Ok(parse_entries(entries))
    }

    /// The last `count` messages of `room`, oldest first.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn recent(&self, room: &str, count: usize) -> Result<Vec<ChatMessage>, StoreError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut messages = self.read_published(room, Range::Back, count).await?;
        messages.reverse();
        Ok(messages)
    }

    /// The lowest id still stored for `room`.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn first_id(&self, room: &str) -> Result<Option<u64>, StoreError> {
        let first = self.read_published(room, Range::From(0), 1).await?;
        Ok(first.first().map(|m| m.id))
    }

    /// Rooms with stored messages, `(room, last id)` in name order: the first `limit` after
    /// `after` (from the start when `None`).
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let mut con = self.commands.clone();
        let names: Vec<String> = redis::cmd("ZRANGEBYLEX")
            .arg(ROOMS)
            .arg(after.map_or_else(|| "-".to_owned(), |a| format!("({a}")))
            .arg("+")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut con)
            .await
            .map_err(redis_error)?;
        if names.is_empty() {
            // An empty pipeline is an error to the client library.
            return Ok(Vec::new());
        }
        let confirms = self.commands.confirms();
        let mut pipe = redis::pipe();
        for room in &names {
            pipe.cmd("XREVRANGE")
                .arg(stream_key(room))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1);
            if confirms {
                // Also how far it is published (see `read_published`).
                pipe.cmd("GET").arg(published_key(room));
            }
        }
        let tops: Vec<(Vec<Entry>, Option<u64>)> = if confirms {
            pipe.query_async(&mut con).await.map_err(redis_error)?
        } else {
            let tops: Vec<Vec<Entry>> = pipe.query_async(&mut con).await.map_err(redis_error)?;
            tops.into_iter().map(|top| (top, None)).collect()
        };
        Ok(names
            .into_iter()
            .zip(tops)
            .map(|(room, (top, published))| {
                let last = parse_entries(top).first().map_or(0, |m| m.id);
                (
                    room,
                    published.map_or(last, |published| last.min(published)),
                )
            })
            .collect())
    }

    /// Distinct users present in each of `rooms` on every node.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn member_counts(&self, rooms: &[String]) -> Result<Vec<usize>, StoreError> {
        if rooms.is_empty() {
            return Ok(Vec::new());
        }
        let mut con = self.commands.clone();
        let mut pipe = redis::pipe();
        for room in rooms {
            present_in(&mut pipe, room);
        }
        let entries: Vec<Vec<String>> = pipe.query_async(&mut con).await.map_err(redis_error)?;
        Ok(entries
            .iter()
            .map(|entries| {
                entries
                    .iter()
                    .filter_map(|e| e.split_once('\t').map(|(_, user)| user))
                    .collect::<BTreeSet<_>>()
                    .len()
            })
            .collect())
    }

    /// The `node\tuser` entries of `room`.
    async fn present(&self, room: &str) -> Result<Vec<String>, StoreError> {
        let mut con = self.commands.clone();
        let mut pipe = redis::pipe();
        present_in(&mut pipe, room);
        let (entries,): (Vec<String>,) = pipe.query_async(&mut con).await.map_err(redis_error)?;
        Ok(entries)
    }

    /// Distinct users present in `room` on every node.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn members(&self, room: &str) -> Result<BTreeSet<String>, StoreError> {
        let entries = self.present(room).await?;
        Ok(entries
            .iter()
            .filter_map(|e| e.split_once('\t').map(|(_, user)| user.to_owned()))
            .collect())
    }

    /// Sends an ephemeral event to `room`'s members: this node's at once (but the sender's
    /// subscription `from`), the other nodes' through the room's presence channel, which every
    /// node with members there listens to. Returns how many it reached here.
    ///
    /// # Errors
    /// Redis did not take it: the other nodes' members miss it.
    pub async fn event(&self, room: &str, from: u64, push: &str) -> Result<usize, StoreError> {
        let here = self.hub.ephemeral(room, Some(from), push);
        let note = EventNote {
            node: self.node.clone(),
            room: room.to_owned(),
            event: push.to_owned(),
        };
        let mut con = self.commands.clone();
        let _: usize = redis::cmd(self.publish())
            .arg(presence_channel(room))
            .arg(serde_json::to_string(&note).expect("notes serialize"))
            .query_async(&mut con)
            .await
            .map_err(redis_error)?;
        Ok(here)
    }

    /// Sends a notice to every connection of every node.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn broadcast(&self, user: &str, text: &str) -> Result<usize, StoreError> {
        let note = BroadcastNote {
            user: user.to_owned(),
            text: text.to_owned(),
            ts: now_rfc3339(),
        };
        let mut con = self.commands.clone();
        let nodes: usize = redis::cmd("PUBLISH")
            .arg(BROADCAST)
            .arg(serde_json::to_string(&note).expect("notes serialize"))
            .query_async(&mut con)
            .await
            .map_err(redis_error)?;
        Ok(nodes)
    }

    /// Tells every node (this one too, through its subscription) to act on `note`; how many
    /// nodes heard it.
    async fn control(&self, note: &ControlNote) -> Result<usize, StoreError> {
        let mut con = self.commands.clone();
        redis::cmd("PUBLISH")
            .arg(CONTROL)
            .arg(serde_json::to_string(note).expect("notes serialize"))
            .query_async(&mut con)
            .await
            .map_err(redis_error)
    }

    /// Records that a user joined or left a room on this node, and tells the other nodes:
    /// `false` when Redis did not take it.
    async fn presence(&self, shared: Shared) -> bool {
        let Shared {
            room,
            user,
            change,
            info,
        } = shared;
        let mut pipe = redis::pipe();
        self.write_infos(&mut pipe, &room);
        match change {
            Change::Join => self.write_presence(&mut pipe, &room, &user, true, info),
            Change::Leave => self.write_presence(&mut pipe, &room, &user, false, None),
            Change::Info => {}
        }
        if pipe.is_empty() {
            return true;
        }
        let mut con = self.commands.clone();
        if let Err(e) = pipe.query_async::<()>(&mut con).await {
            tracing::warn!(error = %e, %room, %user, "presence not shared (until this node reconciles)");
            return false;
        }
        true
    }

    /// Adds to `pipe` this node's presence entry of `user` in `room` (or its removal) and
    /// the announcement.
    fn write_presence(
        &self,
        pipe: &mut redis::Pipeline,
        room: &str,
        user: &str,
        join: bool,
        info: Option<Box<RawValue>>,
    ) {
        let member = format!("{}\t{user}", self.node);
        let entry = format!("{room}\t{user}");
        if join {
            pipe.cmd("ZADD")
                .arg(members_key(room))
                .arg(0)
                .arg(member)
                .ignore();
            pipe.cmd("SADD")
                .arg(node_entries_key(&self.node))
                .arg(entry)
                .ignore();
        } else {
            pipe.cmd("ZREM").arg(members_key(room)).arg(member).ignore();
            pipe.cmd("SREM")
                .arg(node_entries_key(&self.node))
                .arg(entry)
                .ignore();
        }
        let note = PresenceNote {
            node: self.node.clone(),
            room: room.to_owned(),
            user: user.to_owned(),
            join,
            info,
        };
        pipe.cmd(self.publish())
            .arg(presence_channel(room))
            .arg(serde_json::to_string(&note).expect("notes serialize"))
            .ignore();
    }

    /// Adds to `pipe` the writing of this node's presence information in `room` (what its
    /// users' connections attached), if it has some or had: the key goes when none is left.
    fn write_infos(&self, pipe: &mut redis::Pipeline, room: &str) {
        let infos = self.hub.infos(room);
        let mut rooms = lock(&self.with_infos);
        let key = infos_key(room, &self.node);
        if infos.is_empty() {
            if rooms.remove(room) {
                pipe.cmd("DEL").arg(key).ignore();
            }
        } else {
            rooms.insert(room.to_owned());
            pipe.cmd("SET")
                .arg(key)
                .arg(serde_json::to_string(&infos).expect("raw JSON serializes"))
                .ignore();
        }
    }

    /// Who is in `room` on the other nodes (entries not yet expired), with how many nodes
    /// each is on (as `clients`) and the public information their connections there attached.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn remote_members(&self, room: &str) -> Result<Vec<Member>, StoreError> {
        let entries = self.present(room).await?;
        let mut con = self.commands.clone();
        let mut members: BTreeMap<String, Member> = BTreeMap::new();
        let mut nodes = BTreeSet::new();
        for (node, user) in entries.iter().filter_map(|e| e.split_once('\t')) {
            if node == self.node {
                continue;
            }
            nodes.insert(node);
            members
                .entry(user.to_owned())
                .or_insert_with(|| Member {
                    user: user.to_owned(),
                    clients: 0,
                    info: Vec::new(),
                })
                .clients += 1;
        }
        if !nodes.is_empty() {
            let keys: Vec<String> = nodes.iter().map(|n| infos_key(room, n)).collect();
            let found: Vec<Option<String>> = redis::cmd("MGET")
                .arg(keys)
                .query_async(&mut con)
                .await
                .map_err(redis_error)?;
            for json in found.iter().flatten() {
                let Ok(infos) = serde_json::from_str::<BTreeMap<String, Vec<Box<RawValue>>>>(json)
                else {
                    continue;
                };
                for (user, infos) in infos {
                    let Some(member) = members.get_mut(&user) else {
                        continue;
                    };
                    member.add_infos(infos);
                }
            }
        }
        Ok(members.into_values().collect())
    }

    /// Returns once this node hears `room` live, which a member waits for before reading the
    /// room's history so that nothing published between the two is missed. Without Redis, or
    /// after 2 s, it returns anyway and the room is caught up from its stream
    /// once heard.
    pub async fn listen(&self, room: &str) {
        let heard = {
            let mut listening = lock(&self.listening);
            if listening.heard.contains(room) {
                return;
            }
            let room: Arc<str> = Arc::from(room);
            if !listening.up {
                listening.unsure.insert(room);
                return;
            }
            let (tx, rx) = oneshot::channel();
            listening.waiting.entry(room).or_default().push(tx);
            rx
        };
        if tokio::time::timeout(LISTEN_WAIT, heard).await.is_err() {
            tracing::warn!(%room, "redis is slow to subscribe to this room: reading its history meanwhile");
            lock(&self.listening).unsure.insert(Arc::from(room));
        }
    }

    /// Keeps the subscription up, reconnecting with backoff; after each (re)connect, catches
    /// up every local room from its stream. `rooms` names rooms that gained their first local
    /// member or lost their last one ([`Local::follow_rooms`]).
    async fn subscribe_forever(self: Arc<Self>, mut rooms: mpsc::UnboundedReceiver<Arc<str>>) {
        let mut backoff = Duration::from_millis(100);
        let mut master = self.commands.changes();
        loop {
            let outcome = self.subscription(&mut rooms).await;
            {
                // Nothing is heard now: members read history right away, and their rooms are
                // caught up when the subscription is back.
                let mut listening = lock(&self.listening);
                listening.up = false;
                listening.heard.clear();
                listening.waiting.clear();
            }
            match outcome {
                // It was up: start the next attempts quickly.
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "redis unavailable"),
            }
            if self.connected.swap(false, Relaxed) {
                tracing::error!("lost redis: serving local connections only until it is back");
            }
            // A new master (found by a command meanwhile) is subscribed at once.
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = master.changed() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn subscription(
        &self,
        rooms: &mut mpsc::UnboundedReceiver<Arc<str>>,
    ) -> redis::RedisResult<()> {
        // Subscribed to the master now; a new master (a replica promoted) is subscribed anew.
        let (mut feed, generation) = Feed::open(&self.commands, Duration::from_secs(2)).await?;
        let mut master = self.commands.changes();
        if *master.borrow() != generation {
            // The master moved while this connected: connect to the new one.
            return Ok(());
        }
        feed.everyone(BROADCAST).await?;
        feed.everyone(CONTROL).await?;
        feed.everyone(REVOKED_CHANNEL).await?;
        feed.everyone(POLLS_CHANNEL).await?;
        // Revocations announced while this node did not listen are unknown: every connection
        // checks its credential again.
        self.revocations.announce();
        // The rooms now: what changes from here on is in `rooms`, followed below.
        while rooms.try_recv().is_ok() {}
        let now: Vec<Arc<str>> = self.hub.room_names().into_iter().map(Arc::from).collect();
        for chunk in now.chunks(SUBSCRIBE_BATCH) {
            feed.listen(room_channels(chunk)).await?;
        }
        {
            let mut listening = lock(&self.listening);
            listening.heard.extend(now.iter().cloned());
            listening.up = true;
        }
        // Subscribed: whatever is published from now on arrives; what was missed is read,
        // and so is who is on the other nodes (announcements were lost while away).
        let caught_up = match self.catch_up().await {
            Ok(()) => self.read_remote(&now).await,
            Err(e) => Err(e),
        };
        // Votes counted and polls created while away were not heard either.
        let caught_up = match caught_up {
            Ok(()) => self.polls().refresh().await,
            Err(e) => Err(e),
        };
        if let Err(e) = caught_up {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "catch-up failed",
                e.to_string(),
            )));
        }
        if !self.connected.swap(true, Relaxed) {
            tracing::info!(node = %self.node, "connected to redis");
        }
        let mut handled = 0u32;
        loop {
            let msg = tokio::select! {
                msg = feed.next() => msg,
                Ok(()) = master.changed() => {
                    tracing::info!("subscribing on the new redis master");
                    break;
                }
                Some(room) = rooms.recv() => {
                    let mut changed = BTreeSet::from([room]);
                    while let Ok(room) = rooms.try_recv() {
                        changed.insert(room);
                    }
                    self.follow(&mut feed, changed).await?;
                    continue;
                }
            };
            let Some(msg) = msg else { break };
            // After a pause (this process stopped, a slow scheduler) Redis has a backlog
            // buffered: hand the thread to the sessions now and then, so they drain their
            // outboxes as the burst fills them instead of falling behind it (1013).
            handled = handled.wrapping_add(1);
            if handled % 32 == 0 {
                tokio::task::yield_now().await;
            }
            let channel = msg.get_channel_name().to_owned();
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            if channel == REVOKED_CHANNEL {
                // This node's own were signalled when made.
                if payload != self.node {
                    self.revocations.announce();
                }
            } else if channel == POLLS_CHANNEL {
                if let Ok(news) = serde_json::from_str::<PollNews>(&payload) {
                    self.polls.heard(&news);
                }
            } else if channel == BROADCAST {
                if let Ok(note) = serde_json::from_str::<BroadcastNote>(&payload) {
                    self.hub.broadcast(&note.user, &note.text, &note.ts);
                }
            } else if channel == CONTROL {
                match serde_json::from_str::<ControlNote>(&payload) {
                    Ok(ControlNote::Disconnect { user, reconnect }) => {
                        let ended = self.hub.disconnect_user(&user, reconnect);
                        tracing::info!(%user, reconnect, ended, "disconnecting a user");
                    }
                    Ok(ControlNote::Unsubscribe { user, channel }) => {
                        let ended = self.hub.unsubscribe_user(&user, &channel);
                        tracing::info!(%user, %channel, ended, "unsubscribing a user");
                    }
                    Err(e) => tracing::warn!(error = %e, "an unreadable control note"),
                }
            } else if is_presence_channel(&channel) {
                if let Ok(note) = serde_json::from_str::<PresenceNote>(&payload) {
                    self.remote_presence(note);
                } else if let Ok(note) = serde_json::from_str::<EventNote>(&payload) {
                    // This node's own members had it when it was sent.
                    if note.node != self.node {
                        self.hub.ephemeral(&note.room, None, &note.event);
                    }
                }
            } else if let Ok(message) = serde_json::from_str::<ChatMessage>(&payload) {
                self.hub.deliver(&message);
            }
        }
        Ok(())
    }

    /// Subscribes to the channels of rooms in `changed` that gained local members and
    /// unsubscribes from those that lost them all (a room may have done both since: the hub
    /// says where it stands now). Members waiting for a room are let go once it is heard, and
    /// a room whose members could not wait is caught up from its stream.
    async fn follow(&self, feed: &mut Feed, changed: BTreeSet<Arc<str>>) -> redis::RedisResult<()> {
        let (mut add, mut gone) = (Vec::new(), Vec::new());
        {
            let listening = lock(&self.listening);
            for room in changed {
                match (self.hub.has_room(&room), listening.heard.contains(&room)) {
                    (true, false) => add.push(room),
                    (false, true) => gone.push(room),
                    _ => {}
                }
            }
        }
        for chunk in gone.chunks(SUBSCRIBE_BATCH) {
            {
                // Not heard from now on: a member who joins meanwhile waits for the room to
                // be subscribed again rather than read its history before that.
                let mut listening = lock(&self.listening);
                let mut remote = lock(&self.remote);
                for room in chunk {
                    listening.heard.remove(room);
                    listening.unsure.remove(room);
                    remote.remove(&**room);
                }
            }
            feed.unlisten(room_channels(chunk)).await?;
        }
        for chunk in add.chunks(SUBSCRIBE_BATCH) {
            feed.listen(room_channels(chunk)).await?;
            let mut unsure = Vec::new();
            {
                let mut listening = lock(&self.listening);
                for room in chunk {
                    listening.heard.insert(room.clone());
                    // Dropping the senders lets the waiting members go.
                    listening.waiting.remove(room);
                    if listening.unsure.remove(room) {
                        unsure.push(room.clone());
                    }
                }
            }
            for room in unsure {
                if let Err(e) = self.catch_up_room(&room).await {
                    tracing::warn!(error = %e, %room, "catching up a room failed");
                }
            }
            if let Err(e) = self.read_remote(chunk).await {
                tracing::warn!(error = %e, "reading who is on the other nodes failed");
            }
        }
        tracing::debug!(
            heard = add.len(),
            dropped = gone.len(),
            "redis subscriptions follow the local rooms"
        );
        Ok(())
    }

    /// Delivers what each local room missed while the subscription was down. A Redis that
    /// lost its data has a new epoch: the hub resets every room (its members reconnect and
    /// are told `recovered: false`), and nothing stored since is marked delivered unseen.
    async fn catch_up(&self) -> Result<(), StoreError> {
        let mut con = self.commands.clone();
        // Only one Redis can hold the keys of an earlier version (which knew no cluster).
        let moved: i64 = if self.commands.is_cluster() {
            0
        } else {
            redis::cmd("EVAL")
                .arg(MIGRATE)
                .arg(0)
                .arg(EPOCH)
                .arg(ROOMS)
                .query_async(&mut con)
                .await
                .map_err(redis_error)?
        };
        if moved > 0 {
            tracing::warn!(
                streams = moved,
                "moved the rooms' keys of an earlier version to today's layout"
            );
        }
        self.epoch().await?;
        for room in self.hub.room_names() {
            // The stream's end, published or not: what was delivered here was stored.
            let mut con = self.commands.clone();
            let top: Vec<Entry> = redis::cmd("XREVRANGE")
                .arg(stream_key(&room))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut con)
                .await
                .map_err(redis_error)?;
            let top = parse_entries(top).first().map_or(0, |m| m.id);
            let delivered = self.hub.position(&room);
            if top < delivered {
                // Same epoch, fewer messages: Redis lost its last writes (a restart from an
                // older snapshot). The ids past `top` will be given to other messages, so the
                // streams get a new epoch: every node resets its rooms, and clients that
                // resume tell by the epoch, whether or not they were here to see it.
                tracing::error!(%room, stored = top, delivered = self.hub.position(&room), "redis lost this room's last messages: starting a new epoch");
                self.new_epoch().await?;
            } else if self.commands.confirms() && delivered > 0 {
                // Delivered, so confirmed by replicas: published, though a master that died
                // may not have passed on how far publishing went.
                raise(&mut lock(&self.unpublished), &room, delivered);
            }
            self.catch_up_room(&room).await?;
        }
        self.publish_stored(&[], &[]).await;
        Ok(())
    }

    /// Delivers the messages of `room` stored after the last one delivered here.
    async fn catch_up_room(&self, room: &str) -> Result<(), StoreError> {
        loop {
            let missed = self.messages(room, self.hub.position(room), 500).await?;
            if missed.is_empty() {
                break;
            }
            for m in &missed {
                self.hub.deliver(m);
            }
            if missed.len() < 500 {
                break;
            }
        }
        Ok(())
    }

    fn remote_presence(&self, note: PresenceNote) {
        // A note still on its way after the node stopped hearing the room is dropped.
        if note.node == self.node || !self.hub.has_room(&note.room) {
            return;
        }
        let mut remote = lock(&self.remote);
        let users = remote.entry(note.room.clone()).or_default();
        // A user counts as present while any other node has them.
        let changed = if note.join {
            let nodes = users.entry(note.user.clone()).or_default();
            nodes.insert(note.node) && nodes.len() == 1
        } else {
            let gone = users
                .get_mut(&note.user)
                .is_some_and(|nodes| nodes.remove(&note.node) && nodes.is_empty());
            if gone {
                users.remove(&note.user);
            }
            gone
        };
        if changed {
            self.hub.remote_presence(
                &note.room,
                &note.user,
                note.join,
                users.len(),
                note.info.as_deref(),
            );
        }
    }

    /// Reads who is present in each of `rooms` on other nodes, and tells local members of
    /// whoever came or went since last seen. Called by the subscription task once the rooms
    /// are heard, so every announcement that follows applies on top of what was read.
    async fn read_remote(&self, rooms: &[Arc<str>]) -> Result<(), StoreError> {
        for chunk in rooms.chunks(SUBSCRIBE_BATCH) {
            let mut pipe = redis::pipe();
            for room in chunk {
                present_in(&mut pipe, room);
            }
            let mut con = self.commands.clone();
            let entries: Vec<Vec<String>> =
                pipe.query_async(&mut con).await.map_err(redis_error)?;
            for (room, entries) in chunk.iter().zip(entries) {
                let mut now: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                for (node, user) in entries.iter().filter_map(|e| e.split_once('\t')) {
                    if node != self.node {
                        now.entry(user.to_owned())
                            .or_default()
                            .insert(node.to_owned());
                    }
                }
                let count = now.len();
                let before = {
                    let mut remote = lock(&self.remote);
                    if !self.hub.has_room(room) {
                        continue;
                    }
                    remote
                        .insert(room.to_string(), now.clone())
                        .unwrap_or_default()
                };
                for gone in before.keys().filter(|u| !now.contains_key(*u)) {
                    self.hub.remote_presence(room, gone, false, count, None);
                }
                for came in now.keys().filter(|u| !before.contains_key(*u)) {
                    self.hub.remote_presence(room, came, true, count, None);
                }
            }
        }
        Ok(())
    }

    /// Shares local joins and leaves as they come, beats every few seconds, sweeps the nodes
    /// it finds stale, and reconciles what Redis holds of this node when that may differ.
    async fn share_forever(self: Arc<Self>, mut changes: mpsc::UnboundedReceiver<Shared>) {
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        // Nothing is written before the node is registered: a node that stopped before its
        // first heartbeat could not be swept.
        let mut registered = false;
        loop {
            tokio::select! {
                change = changes.recv() => {
                    let Some(change) = change else { return };
                    if !registered || !self.presence(change).await {
                        self.dirty.store(true, Relaxed);
                    }
                }
                _ = tick.tick() => {
                    if let Some(now) = self.beat().await {
                        registered = now;
                    }
                }
            }
        }
    }

    /// One heartbeat, and what follows from it: whether the node is registered now (`None`
    /// when Redis did not answer).
    async fn beat(self: &Arc<Self>) -> Option<bool> {
        let now = unix_ms();
        let mut con = self.commands.clone();
        // Also the health probe, a write: its success says Redis stores again after a failure.
        let beat: Result<(i64, Vec<String>), _> = redis::Script::new(HEARTBEAT)
            .key(NODES)
            .key(SWEEPING)
            .arg(&self.node)
            .arg(now)
            .arg(now + HEARTBEAT_TTL.as_millis() as u64)
            .arg(now + SWEEP_LEASE.as_millis() as u64)
            .invoke_async(&mut con)
            .await;
        let (state, claimed) = match beat {
            Ok(beat) => beat,
            Err(e) => {
                // Only once the node was up: a Redis away at start is reported as such.
                if self.connected.load(Relaxed) && !self.stalled.swap(true, Relaxed) {
                    tracing::error!(error = %e, "redis does not answer: reporting degraded until it does");
                }
                return None;
            }
        };
        if self.stalled.swap(false, Relaxed) {
            tracing::info!("redis answers again");
        }
        self.metrics.stored_in_redis(true);
        // Messages stored whose publication failed wait for no other message of their room.
        let unpublished = !lock(&self.unpublished).is_empty();
        if unpublished {
            self.publish_stored(&[], &[]).await;
        }
        for node in claimed {
            tokio::spawn(self.clone().sweep(node));
        }
        match state {
            // Being swept: what this node writes now may be swept too. Once the sweep is
            // done, the node registers and writes its presence again.
            2 => {
                self.dirty.store(true, Relaxed);
                return Some(false);
            }
            0 => {
                self.dirty.store(true, Relaxed);
            }
            _ => {}
        }
        if self.dirty.swap(false, Relaxed) {
            if let Err(e) = self.reconcile().await {
                tracing::warn!(error = %e, "presence not reconciled with redis (retried)");
                self.dirty.store(true, Relaxed);
            }
        }
        Some(true)
    }

    /// Removes the presence entries, information and nicknames of `node`, whose heartbeat is
    /// stale, announcing each leave; the lease lets another node take over if this one stops.
    async fn sweep(self: Arc<Self>, node: String) {
        let mut swept = 0;
        loop {
            match self.sweep_some(&node).await {
                Ok(0) => break,
                Ok(n) => swept += n,
                Err(e) => {
                    tracing::warn!(error = %e, %node, "sweeping a stale node failed (another node takes over when the lease ends)");
                    return;
                }
            }
        }
        let mut con = self.commands.clone();
        let done = redis::cmd("ZREM")
            .arg(SWEEPING)
            .arg(&node)
            .query_async::<i64>(&mut con)
            .await;
        match done {
            Ok(_) => tracing::warn!(%node, swept, "a node stopped beating: its users left"),
            Err(e) => tracing::warn!(error = %e, %node, "sweep done but not recorded"),
        }
    }

    /// Sweeps up to [`SWEEP_BATCH`] presence entries and nicknames of stale `node`, and renews
    /// the sweeper's lease: how many it swept (0 when the node is clean). Each entry leaves its
    /// room's keys before it leaves the node's list, so a sweep cut short is taken up again.
    async fn sweep_some(&self, node: &str) -> redis::RedisResult<usize> {
        let mut con = self.commands.clone();
        let (entries, nicks): (Vec<String>, Vec<String>) = redis::pipe()
            .cmd("SRANDMEMBER")
            .arg(node_entries_key(node))
            .arg(SWEEP_BATCH)
            .cmd("SRANDMEMBER")
            .arg(node_nicks_key(node))
            .arg(SWEEP_BATCH)
            .query_async(&mut con)
            .await?;
        if entries.is_empty() && nicks.is_empty() {
            return Ok(0);
        }
        if !entries.is_empty() {
            let mut pipe = redis::pipe();
            for entry in &entries {
                let Some((room, user)) = entry.split_once('\t') else {
                    continue;
                };
                let note = PresenceNote {
                    node: node.to_owned(),
                    room: room.to_owned(),
                    user: user.to_owned(),
                    join: false,
                    info: None,
                };
                pipe.cmd("ZREM")
                    .arg(members_key(room))
                    .arg(format!("{node}\t{user}"))
                    .ignore();
                pipe.cmd("DEL").arg(infos_key(room, node)).ignore();
                pipe.cmd(self.publish())
                    .arg(presence_channel(room))
                    .arg(serde_json::to_string(&note).expect("notes serialize"))
                    .ignore();
            }
            if !pipe.is_empty() {
                pipe.query_async::<()>(&mut con).await?;
            }
            // Only once the rooms forgot them (on Redis Cluster a pipeline's slots go apart).
            redis::cmd("SREM")
                .arg(node_entries_key(node))
                .arg(&entries)
                .query_async::<()>(&mut con)
                .await?;
        }
        for entry in &nicks {
            if let Some((name, guest)) = entry.split_once('\t') {
                redis::Script::new(RELEASE_NICK)
                    .key(nick_key(name))
                    .arg(guest)
                    .arg(node)
                    .invoke_async::<i64>(&mut con)
                    .await?;
            }
        }
        let mut pipe = redis::pipe();
        if !nicks.is_empty() {
            pipe.cmd("SREM")
                .arg(node_nicks_key(node))
                .arg(&nicks)
                .ignore();
        }
        pipe.cmd("ZADD")
            .arg(SWEEPING)
            .arg("XX")
            .arg(unix_ms() + SWEEP_LEASE.as_millis() as u64)
            .arg(node)
            .ignore();
        pipe.query_async::<()>(&mut con).await?;
        Ok(entries.len() + nicks.len())
    }

    /// Makes what Redis holds of this node (presence entries, information, nicknames) what
    /// it has: entries it lacks are written and announced, entries it no longer has are
    /// removed and their leaves announced. Runs in the task that shares joins and leaves, so
    /// none is applied out of order with it.
    async fn reconcile(&self) -> Result<(), StoreError> {
        let local = self.hub.local_users();
        let stored = self.scan_set(&node_entries_key(&self.node)).await?;
        let wanted: HashSet<String> = local
            .iter()
            .flat_map(|(room, users)| users.iter().map(move |u| format!("{room}\t{u}")))
            .collect();
        let changes: Vec<(&String, bool)> = stored
            .difference(&wanted)
            .map(|e| (e, false))
            .chain(wanted.difference(&stored).map(|e| (e, true)))
            .collect();
        let mut rooms: BTreeSet<&str> = local.keys().map(String::as_str).collect();
        let with_infos: Vec<String> = lock(&self.with_infos).iter().cloned().collect();
        rooms.extend(with_infos.iter().map(String::as_str));
        let (added, removed) = (
            wanted.difference(&stored).count(),
            stored.difference(&wanted).count(),
        );
        let mut con = self.commands.clone();
        for chunk in changes.chunks(SUBSCRIBE_BATCH) {
            let mut pipe = redis::pipe();
            for (entry, join) in chunk {
                if let Some((room, user)) = entry.split_once('\t') {
                    self.write_presence(&mut pipe, room, user, *join, None);
                }
            }
            pipe.query_async::<()>(&mut con)
                .await
                .map_err(redis_error)?;
        }
        let rooms: Vec<&str> = rooms.into_iter().collect();
        for chunk in rooms.chunks(SUBSCRIBE_BATCH) {
            let mut pipe = redis::pipe();
            for room in chunk {
                self.write_infos(&mut pipe, room);
            }
            if !pipe.is_empty() {
                pipe.query_async::<()>(&mut con)
                    .await
                    .map_err(redis_error)?;
            }
        }
        self.reconcile_nicknames().await?;
        if added + removed > 0 {
            tracing::info!(
                added,
                removed,
                "presence in redis reconciled with this node's"
            );
        }
        Ok(())
    }

    /// [`Cluster::reconcile`] for guest nicknames.
    async fn reconcile_nicknames(&self) -> Result<(), StoreError> {
        let Some(names) = self.nicknames.get() else {
            return Ok(());
        };
        let stored = self.scan_set(&node_nicks_key(&self.node)).await?;
        let held: HashSet<String> = names
            .held()
            .into_iter()
            .map(|(name, guest)| format!("{name}\t{guest}"))
            .collect();
        for entry in stored.difference(&held) {
            if let Some((name, guest)) = entry.split_once('\t') {
                self.release_nickname(name, guest).await;
            }
        }
        for entry in held.difference(&stored) {
            if let Some((name, guest)) = entry.split_once('\t') {
                if !self.claim_nickname(name, guest).await? {
                    tracing::warn!(name, "a guest on another node holds this nickname too (it was swept while this node was away)");
                }
            }
        }
        Ok(())
    }

    /// The members of set `key`, read in pages (a big set read whole would hold Redis up).
    async fn scan_set(&self, key: &str) -> Result<HashSet<String>, StoreError> {
        let mut con = self.commands.clone();
        let mut members = HashSet::new();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(key)
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .map_err(redis_error)?;
            members.extend(page);
            if next == 0 {
                return Ok(members);
            }
            cursor = next;
        }
    }
}

/// Adds to `pipe` the reading of `room`'s presence entries (`node\tuser`). Entries scored
/// otherwise than 0 come from nodes of an earlier version (they scored entries by expiry
/// time) and are left out.
fn present_in(pipe: &mut redis::Pipeline, room: &str) {
    pipe.cmd("ZRANGEBYSCORE")
        .arg(members_key(room))
        .arg(0)
        .arg(0);
}

/// A stream entry as Redis returns it: its id and its fields.
type Entry = (String, Vec<(String, String)>);

/// Raises `room`'s id in `upto` to `id`, if lower (or absent).
fn raise(upto: &mut HashMap<String, u64>, room: &str, id: u64) {
    let top = upto.entry(room.to_owned()).or_default();
    *top = (*top).max(id);
}

/// The id of a message as [`APPEND`] answers it (`{"type":"message","id":N,…`).
fn stored_id(message: &str) -> Option<u64> {
    let rest = message.strip_prefix(r#"{"type":"message","id":"#)?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

fn parse_entries(entries: Vec<Entry>) -> Vec<ChatMessage> {
    entries
        .into_iter()
        .filter_map(|(_, fields)| {
            let (_, json) = fields.into_iter().find(|(k, _)| k == "m")?;
            serde_json::from_str(&json).ok()
        })
        .collect()
}

impl Engine {
    /// Several nodes joined through Redis: `accounts` must announce on the `revocations`
    /// the cluster signals.
    pub fn redis(
        cluster: Arc<Cluster>,
        accounts: RedisAccounts,
        revocations: Revocations,
    ) -> Engine {
        let polls = Arc::new(cluster.polls());
        Engine {
            broker: cluster.clone(),
            presence: cluster.clone(),
            control: cluster.clone(),
            leases: cluster,
            accounts: Arc::new(accounts),
            polls,
            revocations,
        }
    }
}

impl Control for Cluster {
    fn broadcast<'a>(&'a self, user: &'a str, text: &'a str) -> EngineFuture<'a, Reach> {
        // Every node delivers it to its own connections.
        Box::pin(async move { Ok(Reach::Nodes(Cluster::broadcast(self, user, text).await?)) })
    }

    fn disconnect_user<'a>(&'a self, user: &'a str, reconnect: bool) -> EngineFuture<'a, Reach> {
        Box::pin(async move {
            let note = ControlNote::Disconnect {
                user: user.to_owned(),
                reconnect,
            };
            Ok(Reach::Nodes(self.control(&note).await?))
        })
    }

    fn unsubscribe_user<'a>(&'a self, user: &'a str, channel: &'a str) -> EngineFuture<'a, Reach> {
        Box::pin(async move {
            let note = ControlNote::Unsubscribe {
                user: user.to_owned(),
                channel: channel.to_owned(),
            };
            Ok(Reach::Nodes(self.control(&note).await?))
        })
    }

    fn trouble(&self) -> Option<&'static str> {
        (!self.is_healthy()).then(|| self.health())
    }
}

impl Leases for Cluster {
    fn claim<'a>(&'a self, name: &'a str, holder: &'a str) -> EngineFuture<'a, bool> {
        Box::pin(self.claim_nickname(name, holder))
    }
}

impl Presence for Cluster {
    fn counts<'a>(&'a self, rooms: &'a [String]) -> EngineFuture<'a, Vec<usize>> {
        Box::pin(self.member_counts(rooms))
    }

    fn users<'a>(&'a self, room: &'a str) -> EngineFuture<'a, BTreeSet<String>> {
        Box::pin(self.members(room))
    }

    fn elsewhere<'a>(&'a self, room: &'a str) -> EngineFuture<'a, Vec<Member>> {
        Box::pin(self.remote_members(room))
    }
}

impl Broker for Cluster {
    fn publish(&self, write: ChatWrite) -> EngineFuture<'_, ()> {
        Box::pin(self.submit(write))
    }

    fn event<'a>(&'a self, room: &'a str, from: u64, push: &'a str) -> EngineFuture<'a, usize> {
        Box::pin(Cluster::event(self, room, from, push))
    }

    fn epoch(&self) -> EngineFuture<'_, String> {
        Box::pin(Cluster::epoch(self))
    }

    fn bounds<'a>(&'a self, room: &'a str) -> EngineFuture<'a, (Option<u64>, u64)> {
        Box::pin(async move {
            // Read only once this node hears the room: what is published after the read
            // then arrives live.
            self.listen(room).await;
            let last = Cluster::recent(self, room, 1)
                .await?
                .first()
                .map_or(0, |m| m.id);
            Ok((self.first_id(room).await?, last))
        })
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        since: u64,
        until: u64,
        limit: usize,
    ) -> EngineFuture<'a, Vec<ChatMessage>> {
        Box::pin(async move {
            let mut page = self.messages(room, since, limit).await?;
            page.retain(|m| m.id <= until);
            Ok(page)
        })
    }

    fn recent<'a>(&'a self, room: &'a str, count: usize) -> EngineFuture<'a, Vec<ChatMessage>> {
        Box::pin(Cluster::recent(self, room, count))
    }

    fn flush(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.appended())
    }

    fn has_messages<'a>(&'a self, room: &'a str) -> EngineFuture<'a, bool> {
        Box::pin(async move { Ok(self.first_id(room).await?.is_some()) })
    }

    fn rooms<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: usize,
    ) -> EngineFuture<'a, Vec<(String, u64)>> {
        Box::pin(Cluster::rooms(self, after, limit))
    }
}
