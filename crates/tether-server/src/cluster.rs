//! Several nodes joined through Redis (`--redis URL`): room history in Redis Streams, live
//! fan-out through Redis pub/sub, presence in expiring sorted-set entries.
//!
//! Storing and publishing a message is one Lua script, so it is atomic: the script takes the
//! room's next id from the stream's last entry, appends the message to the stream `tether:s:{room}`
//! under the id `0-N`, and publishes it on `tether:r:{room}`. Every node (the sender's included)
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
//! Presence: each node keeps `node\tuser` entries in `tether:m:{room}` (a sorted set scored by
//! expiry time) for its local members and refreshes them every few seconds, and announces
//! joins and leaves on `tether:p:{room}`. A node that crashes stops refreshing; its users
//! expire and the other nodes announce their leave.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use tokio::sync::{mpsc, oneshot};

use crate::hub::{Hub, Member, Shared};
use crate::journal::ChatWrite;
use crate::metrics::Metrics;
use crate::store::{now_rfc3339, ChatMessage, StoreError};

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

const APPEND: &str = concat!(
    read_or_make_epoch!(4, 5),
    r#"
if ARGV[7] ~= '' then
  local earlier = redis.call('GET', KEYS[5])
  if earlier then
    local kept = redis.call('XRANGE', KEYS[1], '0-' .. earlier, '0-' .. earlier)
    if #kept > 0 then return {kept[1][2][2], 0} end
  end
end
local created = 0
if not redis.call('ZSCORE', KEYS[3], ARGV[4]) then
  if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[6]) then
    return redis.error_reply('ROOMLIMIT the room cap is reached')
  end
  if ARGV[9] ~= '1' then
    return redis.error_reply('ROOMQUOTA this sender may start no more rooms for now')
  end
  created = 1
end
local last = 0
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top > 0 then last = tonumber(string.match(top[1][1], '%-(%d+)$')) end
local id = last + 1
local msg = ARGV[1] .. id .. ',"epoch":"' .. epoch .. '"' .. ARGV[2]
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '0-' .. id, 'm', msg)
redis.call('ZADD', KEYS[3], 0, ARGV[4])
redis.call('PUBLISH', KEYS[2], msg)
if ARGV[7] ~= '' then redis.call('SET', KEYS[5], id, 'EX', ARGV[8]) end
return {msg, created}
"#
);

/// The rooms' epoch: read, or made (with the node's proposal) when Redis has none, which is
/// when it is new or lost its data.
const EPOCH_SCRIPT: &str = concat!(read_or_make_epoch!(1, 1), "return epoch\n");

/// Claims a guest nickname (KEYS[1]) for a guest (ARGV[1]) for ARGV[2] seconds, unless another
/// guest holds it: 1 when it is this guest's now, 0 when another's.
const CLAIM_NICK: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"#;

/// Releases a guest nickname (KEYS[1]) if this guest (ARGV[1]) holds it.
const RELEASE_NICK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"#;

fn nick_key(name: &str) -> String {
    format!("tether:nick:{name}")
}

/// The key of the rooms' epoch.
const EPOCH: &str = "tether:epoch";

/// How long a node's presence entries live without a refresh.
const PRESENCE_TTL: Duration = Duration::from_secs(15);
/// How often a node refreshes its entries and looks for users of crashed nodes.
const PRESENCE_EVERY: Duration = Duration::from_secs(3);

fn stream_key(room: &str) -> String {
    format!("tether:s:{room}")
}

/// Appends sent to Redis in one pipeline at most.
const APPEND_BATCH: usize = 128;
/// Appends waiting at most; a session queuing more waits (backpressure).
const APPEND_QUEUE: usize = 4096;

/// How long Redis remembers a message's idempotency key.
pub const KEY_WINDOW: Duration = Duration::from_secs(3600);

/// Where a message's idempotency key is remembered (per room and sender).
fn key_name(room: &str, user: &str, key: &str) -> String {
    format!("tether:k:{room}\t{user}\t{key}")
}

/// Where a room's stored messages are published.
const ROOM_PREFIX: &str = "tether:r:";
/// Where a room's joins and leaves are announced.
const PRESENCE_PREFIX: &str = "tether:p:";

fn channel(room: &str) -> String {
    format!("{ROOM_PREFIX}{room}")
}

fn presence_channel(room: &str) -> String {
    format!("{PRESENCE_PREFIX}{room}")
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

fn members_key(room: &str) -> String {
    format!("tether:m:{room}")
}

/// Rooms with stored messages: a sorted set, every score 0, so it pages in name order.
const ROOMS: &str = "tether:room-names";
/// Where clusters before the sorted set listed their rooms (a set); moved once.
const OLD_ROOMS: &str = "tether:rooms";

const MOVE_ROOMS: &str = r#"
if redis.call('TYPE', KEYS[1]).ok == 'set' then
  for _, room in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    redis.call('ZADD', KEYS[2], 0, room)
  end
  redis.call('DEL', KEYS[1])
end
return 0
"#;
const BROADCAST: &str = "tether:broadcast";

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
/// (`{user: [info, …]}`), expiring unless refreshed.
fn infos_key(room: &str, node: &str) -> String {
    format!("tether:i:{room}\t{node}")
}

/// A broadcast notice for every node.
#[derive(Debug, Serialize, Deserialize)]
struct BroadcastNote {
    user: String,
    text: String,
    ts: String,
}

/// This node's link to Redis.
pub struct Cluster {
    node: String,
    commands: ConnectionManager,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    history_limit: usize,
    max_rooms: usize,
    /// New rooms per identity.
    room_quota: crate::journal::RoomQuota,
    /// Messages waiting to be stored, in order.
    appends: mpsc::Sender<ChatWrite>,
    epoch: redis::Script,
    connected: AtomicBool,
    /// Redis stopped answering commands (the last presence refresh failed) though the
    /// subscription may look alive: a stalled or overloaded Redis.
    stalled: AtomicBool,
    /// Users of each local room present on other nodes, as last seen.
    remote: Mutex<HashMap<String, BTreeSet<String>>>,
    listening: Mutex<Listening>,
    /// Rooms whose presence information this node keeps in Redis ([`infos_key`]).
    with_infos: Mutex<HashSet<String>>,
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
    /// Connects (lazily: a Redis that is down at start is retried like a lost one) and
    /// starts the subscription and presence tasks.
    ///
    /// # Errors
    /// The URL is not a valid Redis URL.
    pub fn start(
        url: &str,
        node: String,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        history_limit: usize,
        max_rooms: usize,
        room_quota: crate::journal::RoomQuota,
    ) -> Result<Arc<Cluster>, StoreError> {
        let client = redis::Client::open(url).map_err(redis_error)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let commands =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(redis_error)?;
        let (appends, queued) = mpsc::channel(APPEND_QUEUE);
        let cluster = Arc::new(Cluster {
            node,
            commands,
            hub,
            metrics,
            history_limit,
            max_rooms,
            room_quota,
            appends,
            epoch: redis::Script::new(EPOCH_SCRIPT),
            connected: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            remote: Mutex::new(HashMap::new()),
            listening: Mutex::new(Listening::default()),
            with_infos: Mutex::new(HashSet::new()),
        });
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Shared>();
        cluster.hub.share_presence(tx);
        let sharer = cluster.clone();
        tokio::spawn(async move {
            while let Some(shared) = rx.recv().await {
                sharer.presence(shared).await;
            }
        });
        let (follow, rooms) = mpsc::unbounded_channel();
        cluster.hub.follow_rooms(follow);
        tokio::spawn(cluster.clone().subscribe_forever(client, rooms));
        tokio::spawn(cluster.clone().append_forever(queued));
        tokio::spawn(cluster.clone().presence_forever());
        Ok(cluster)
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
        self.appends
            .send(append)
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Stores queued messages in order, many per round trip: each pipeline holds the appends
    /// waiting when the previous one returned. A session that queues a message goes on
    /// draining its own outbox meanwhile, so a burst of its client's messages (after a pause)
    /// cannot make it a slow consumer.
    async fn append_forever(self: Arc<Self>, mut rx: mpsc::Receiver<ChatWrite>) {
        let mut batch = Vec::with_capacity(APPEND_BATCH);
        while rx.recv_many(&mut batch, APPEND_BATCH).await > 0 {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            // Each sender may start a room only with a token of its room quota in hand; the
            // token goes back unless the script did start one.
            let now = std::time::Instant::now();
            // A room with members here was paid for by its first member
            // (`App::may_join_room`): its first message needs no token of its own.
            let mut taken = Vec::with_capacity(batch.len());
            for job in &batch {
                let paid = self.hub.has_room(&job.room);
                let token = !paid && self.room_quota.take(&job.writer, now).is_ok();
                taken.push(token);
                pipe.add_command(self.append_command(job, paid || token));
            }
            let mut con = self.commands.clone();
            let sent = pipe
                .query_async::<Vec<redis::RedisResult<(String, i64)>>>(&mut con)
                .await;
            for ((job, token), result) in batch.iter().zip(&taken).zip(sent.iter().flatten()) {
                if *token && !matches!(result, Ok((_, 1))) {
                    self.room_quota.refund(&job.writer, now);
                }
            }
            match sent {
                Ok(results) => {
                    for (job, result) in batch.drain(..).zip(results) {
                        let outcome =
                            result
                                .map_err(|e| self.append_error(&e))
                                .and_then(|(s, _)| {
                                    serde_json::from_str(&s).map_err(|e| {
                                        StoreError::Failed(format!("stored message: {e}"))
                                    })
                                });
                        // A refusal at the room cap is no storage failure.
                        let failed =
                            matches!(&outcome, Err(e) if !matches!(e, StoreError::Limit(_)));
                        self.metrics.stored_in_redis(!failed);
                        job.reply.send(outcome, "message not stored");
                    }
                }
                Err(e) => {
                    self.metrics.stored_in_redis(false);
                    for job in batch.drain(..) {
                        job.reply
                            .send(Err(self.append_error(&e)), "message not stored");
                    }
                }
            }
        }
    }

    /// The script that stores `job` (EVAL with the script's text: a Redis that restarted has
    /// no cached scripts, and a pipeline cannot load one midway).
    fn append_command(&self, job: &ChatWrite, may_start_room: bool) -> redis::Cmd {
        // The message is JSON with the id spliced in by the script: `{…"id":` + N + `,…}`.
        let rest = serde_json::json!({
            "room": job.room, "user": job.user, "text": job.text, "ts": now_rfc3339()
        });
        let rest = rest.to_string();
        let suffix = format!(",{}", &rest[1..]);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(APPEND)
            .arg(5)
            .arg(stream_key(&job.room))
            .arg(channel(&job.room))
            .arg(ROOMS)
            .arg(EPOCH)
            .arg(
                job.key
                    .as_deref()
                    .map_or_else(String::new, |k| key_name(&job.room, &job.user, k)),
            )
            .arg(r#"{"type":"message","id":"#)
            .arg(suffix)
            .arg(self.history_limit.max(1))
            .arg(&job.room)
            .arg(crate::store::new_epoch())
            .arg(self.max_rooms)
            .arg(job.key.as_deref().unwrap_or_default())
            .arg(KEY_WINDOW.as_secs())
            .arg(if may_start_room { "1" } else { "0" });
        cmd
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
            return StoreError::Limit(crate::journal::ROOM_QUOTA.to_owned());
        }
        self.metrics.store_failures.fetch_add(1, Relaxed);
        if e.is_timeout() || e.is_connection_dropped() {
            return StoreError::Unknown(format!("redis: {e}"));
        }
        redis_error(e.clone())
    }

    /// Shares this node's guest nicknames with the cluster: names it stops using are released
    /// in Redis, names in use are claimed again every few seconds.
    pub fn follow_nicknames(self: &Arc<Self>, nicknames: Arc<crate::guests::Nicknames>) {
        // Bounded: a release that does not fit is left to expire (15 s).
        let (released, mut releases) = mpsc::channel::<(String, String)>(4096);
        nicknames.share_releases(released);
        let releaser = self.clone();
        let names = nicknames.clone();
        tokio::spawn(async move {
            while let Some((name, guest)) = releases.recv().await {
                // The guest may have come back since (its claim went out already): then the
                // name is still its own and stays claimed.
                if !names.holds(&name, &guest) {
                    releaser.release_nickname(&name, &guest).await;
                }
            }
        });
        tokio::spawn(self.clone().refresh_nicknames_forever(nicknames));
    }

    /// Claims guest nickname `name` (lowercase) for `guest` across the cluster: `true` when
    /// it is this guest's, `false` when a guest on another node holds it. Held names are
    /// refreshed every few seconds and expire when their node stops refreshing them.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn claim_nickname(&self, name: &str, guest: &str) -> Result<bool, StoreError> {
        let mut con = self.commands.clone();
        let claimed: i64 = redis::Script::new(CLAIM_NICK)
            .key(nick_key(name))
            .arg(guest)
            .arg(PRESENCE_TTL.as_secs())
            .invoke_async(&mut con)
            .await
            .map_err(redis_error)?;
        Ok(claimed == 1)
    }

    async fn release_nickname(&self, name: &str, guest: &str) {
        let mut con = self.commands.clone();
        let released = redis::Script::new(RELEASE_NICK)
            .key(nick_key(name))
            .arg(guest)
            .invoke_async::<i64>(&mut con)
            .await;
        if let Err(e) = released {
            tracing::debug!(error = %e, name, "nickname not released in redis (it expires)");
        }
    }

    /// Keeps this node's nicknames claimed in Redis: one pipeline a round.
    async fn refresh_nicknames_forever(self: Arc<Self>, nicknames: Arc<crate::guests::Nicknames>) {
        let mut tick = tokio::time::interval(PRESENCE_EVERY);
        loop {
            tick.tick().await;
            let held = nicknames.held();
            if held.is_empty() || !self.connected.load(Relaxed) {
                continue;
            }
            let mut pipe = redis::pipe();
            for (name, guest) in &held {
                pipe.cmd("EVAL")
                    .arg(CLAIM_NICK)
                    .arg(1)
                    .arg(nick_key(name))
                    .arg(guest)
                    .arg(PRESENCE_TTL.as_secs());
            }
            let mut con = self.commands.clone();
            match pipe.query_async::<Vec<i64>>(&mut con).await {
                Ok(claimed) => {
                    for ((name, _), ok) in held.iter().zip(claimed) {
                        if ok != 1 {
                            tracing::warn!(name, "a guest on another node holds this nickname too (it expired here while redis was away)");
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "nicknames not refreshed"),
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
            .arg(crate::store::new_epoch())
            .invoke_async(&mut con)
            .await
            .map_err(redis_error)?;
        self.hub.observe_epoch(&epoch);
        Ok(epoch)
    }

    /// Replaces the rooms' epoch (storage lost messages without losing the epoch); the hub
    /// resets every room.
    async fn new_epoch(&self) -> Result<(), StoreError> {
        let epoch = crate::store::new_epoch();
        let mut con = self.commands.clone();
        redis::cmd("SET")
            .arg(EPOCH)
            .arg(&epoch)
            .query_async::<()>(&mut con)
            .await
            .map_err(redis_error)?;
        self.hub.observe_epoch(&epoch);
        Ok(())
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
        let mut con = self.commands.clone();
        let entries: Vec<Entry> = redis::cmd("XRANGE")
            .arg(stream_key(room))
            .arg(format!("0-{}", since.saturating_add(1)))
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut con)
            .await
            .map_err(redis_error)?;
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
        let mut con = self.commands.clone();
        let entries: Vec<Entry> = redis::cmd("XREVRANGE")
            .arg(stream_key(room))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut con)
            .await
            .map_err(redis_error)?;
        let mut messages = parse_entries(entries);
        messages.reverse();
        Ok(messages)
    }

    /// The lowest id still stored for `room`.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn first_id(&self, room: &str) -> Result<Option<u64>, StoreError> {
        let mut con = self.commands.clone();
        let entries: Vec<Entry> = redis::cmd("XRANGE")
            .arg(stream_key(room))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut con)
            .await
            .map_err(redis_error)?;
        Ok(parse_entries(entries).first().map(|m| m.id))
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
        let mut pipe = redis::pipe();
        for room in &names {
            pipe.cmd("XREVRANGE")
                .arg(stream_key(room))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1);
        }
        let tops: Vec<Vec<Entry>> = pipe.query_async(&mut con).await.map_err(redis_error)?;
        Ok(names
            .into_iter()
            .zip(tops)
            .map(|(room, top)| {
                let last = parse_entries(top).first().map_or(0, |m| m.id);
                (room, last)
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
            pipe.cmd("ZRANGEBYSCORE")
                .arg(members_key(room))
                .arg(unix_ms())
                .arg("+inf");
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

    /// The `node\tuser` entries of `room` not yet expired.
    async fn present(&self, room: &str) -> Result<Vec<String>, StoreError> {
        let mut con = self.commands.clone();
        redis::cmd("ZRANGEBYSCORE")
            .arg(members_key(room))
            .arg(unix_ms())
            .arg("+inf")
            .query_async(&mut con)
            .await
            .map_err(redis_error)
    }

    /// Distinct users present in `room` on every node (entries not yet expired).
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

    /// Records that a user joined or left a room on this node, and tells the other nodes.
    pub async fn presence(&self, shared: Shared) {
        let Shared {
            room,
            user,
            join,
            info,
        } = shared;
        let room = room.as_str();
        let member = format!("{}\t{user}", self.node);
        let mut con = self.commands.clone();
        let mut pipe = redis::pipe();
        self.write_infos(&mut pipe, room);
        let note = PresenceNote {
            node: self.node.clone(),
            room: room.to_owned(),
            user,
            join,
            info,
        };
        let user = &note.user;
        if join {
            pipe.cmd("ZADD")
                .arg(members_key(room))
                .arg(unix_ms() + PRESENCE_TTL.as_millis() as u64)
                .arg(&member);
        } else {
            pipe.cmd("ZREM").arg(members_key(room)).arg(&member);
        }
        pipe.cmd("PUBLISH")
            .arg(presence_channel(room))
            .arg(serde_json::to_string(&note).expect("notes serialize"));
        if let Err(e) = pipe.query_async::<()>(&mut con).await {
            tracing::warn!(error = %e, %room, %user, "presence not shared");
        }
    }

    /// Adds to `pipe` the writing of this node's presence information in `room` (what its
    /// users' connections attached), if it has some or had: the key expires unless
    /// refreshed, and goes when none is left.
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
                .arg("PX")
                .arg(PRESENCE_TTL.as_millis() as u64)
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
    /// member or lost their last one ([`Hub::follow_rooms`]).
    async fn subscribe_forever(
        self: Arc<Self>,
        client: redis::Client,
        mut rooms: mpsc::UnboundedReceiver<Arc<str>>,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let outcome = self.subscription(&client, &mut rooms).await;
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
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn subscription(
        &self,
        client: &redis::Client,
        rooms: &mut mpsc::UnboundedReceiver<Arc<str>>,
    ) -> redis::RedisResult<()> {
        let pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))??;
        let (mut sink, mut messages) = pubsub.split();
        sink.subscribe(BROADCAST).await?;
        // The rooms now: what changes from here on is in `rooms`, followed below.
        while rooms.try_recv().is_ok() {}
        let now: Vec<Arc<str>> = self.hub.room_names().into_iter().map(Arc::from).collect();
        for chunk in now.chunks(SUBSCRIBE_BATCH) {
            sink.subscribe(room_channels(chunk)).await?;
        }
        {
            let mut listening = lock(&self.listening);
            listening.heard.extend(now);
            listening.up = true;
        }
        // Subscribed: whatever is published from now on arrives; what was missed is read.
        if let Err(e) = self.catch_up().await {
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
                msg = messages.next() => msg,
                Some(room) = rooms.recv() => {
                    let mut changed = BTreeSet::from([room]);
                    while let Ok(room) = rooms.try_recv() {
                        changed.insert(room);
                    }
                    self.follow(&mut sink, changed).await?;
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
            if channel == BROADCAST {
                if let Ok(note) = serde_json::from_str::<BroadcastNote>(&payload) {
                    self.hub.broadcast(&note.user, &note.text, &note.ts);
                }
            } else if channel.starts_with(PRESENCE_PREFIX) {
                if let Ok(note) = serde_json::from_str::<PresenceNote>(&payload) {
                    self.remote_presence(note);
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
    async fn follow(
        &self,
        sink: &mut redis::aio::PubSubSink,
        changed: BTreeSet<Arc<str>>,
    ) -> redis::RedisResult<()> {
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
            sink.unsubscribe(room_channels(chunk)).await?;
        }
        for chunk in add.chunks(SUBSCRIBE_BATCH) {
            sink.subscribe(room_channels(chunk)).await?;
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
        redis::Script::new(MOVE_ROOMS)
            .key(OLD_ROOMS)
            .key(ROOMS)
            .invoke_async::<i64>(&mut con)
            .await
            .map_err(redis_error)?;
        self.epoch().await?;
        for room in self.hub.room_names() {
            let top = self.recent(&room, 1).await?.first().map_or(0, |m| m.id);
            if top < self.hub.position(&room) {
                // Same epoch, fewer messages: Redis lost its last writes (a restart from an
                // older snapshot). The ids past `top` will be given to other messages, so the
                // streams get a new epoch: every node resets its rooms, and clients that
                // resume tell by the epoch, whether or not they were here to see it.
                tracing::error!(%room, stored = top, delivered = self.hub.position(&room), "redis lost this room's last messages: starting a new epoch");
                self.new_epoch().await?;
            }
            self.catch_up_room(&room).await?;
        }
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
        let changed = if note.join {
            users.insert(note.user.clone())
        } else {
            users.remove(&note.user)
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

    /// Refreshes this node's presence entries and notices users whose node stopped refreshing.
    async fn presence_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PRESENCE_EVERY);
        loop {
            tick.tick().await;
            if !self.connected.load(Relaxed) {
                continue;
            }
            let local: BTreeMap<String, Vec<String>> = self.hub.local_users();
            let expiry = unix_ms() + PRESENCE_TTL.as_millis() as u64;
            let mut con = self.commands.clone();
            let mut pipe = redis::pipe();
            // Also the health probe, a write, when there is nothing to refresh: its success
            // says Redis stores again after a failure.
            pipe.cmd("SET")
                .arg(format!("tether:n:{}", self.node))
                .arg(unix_ms())
                .arg("EX")
                .arg(60)
                .ignore();
            for (room, users) in &local {
                for user in users {
                    pipe.cmd("ZADD")
                        .arg(members_key(room))
                        .arg(expiry)
                        .arg(format!("{}\t{user}", self.node))
                        .ignore();
                }
                pipe.cmd("ZREMRANGEBYSCORE")
                    .arg(members_key(room))
                    .arg("-inf")
                    .arg(unix_ms())
                    .ignore();
                self.write_infos(&mut pipe, room);
            }
            if let Err(e) = pipe.query_async::<()>(&mut con).await {
                if !self.stalled.swap(true, Relaxed) {
                    tracing::error!(error = %e, "redis does not answer: reporting degraded until it does");
                }
                continue;
            }
            if self.stalled.swap(false, Relaxed) {
                tracing::info!("redis answers again");
            }
            self.metrics.stored_in_redis(true);
            for (room, users) in local {
                let Ok(everyone) = self.members(&room).await else {
                    continue;
                };
                let here: BTreeSet<String> = users.into_iter().collect();
                let now_remote: BTreeSet<String> = everyone.difference(&here).cloned().collect();
                let before = {
                    let mut remote = lock(&self.remote);
                    remote
                        .insert(room.clone(), now_remote.clone())
                        .unwrap_or_default()
                };
                for gone in before.difference(&now_remote) {
                    self.hub
                        .remote_presence(&room, gone, false, now_remote.len(), None);
                }
                for came in now_remote.difference(&before) {
                    self.hub
                        .remote_presence(&room, came, true, now_remote.len(), None);
                }
            }
        }
    }
}

/// A stream entry as Redis returns it: its id and its fields.
type Entry = (String, Vec<(String, String)>);

fn parse_entries(entries: Vec<Entry>) -> Vec<ChatMessage> {
    entries
        .into_iter()
        .filter_map(|(_, fields)| {
            let (_, json) = fields.into_iter().find(|(k, _)| k == "m")?;
            serde_json::from_str(&json).ok()
        })
        .collect()
}
