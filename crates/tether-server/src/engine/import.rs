//! Moving a single node's SQLite store into Redis, once, so that a deployment grows to several
//! nodes without losing its users or its history (`tether import`).
//!
//! Everything the nodes share moves: users with their password hashes, live sessions and
//! tokens (nobody logs in again), each room's messages under the same ids and the store's
//! epoch (a client resuming with `since` and `epoch` continues where it was), polls under the
//! same ids with their votes. Idempotency keys do not move (they last an hour).
//!
//! The target must hold no key of tether's: the import is made once, before the nodes start,
//! and never merges. It marks Redis while it runs (`tether:imported`), so that an import that
//! stopped midway is told apart, and refused until Redis is emptied.

use super::link::Link;

use super::accounts::{hex, of_key, CredentialRecord, CREDENTIALS, USERS};
use super::polls::{poll_key, LIST, NEXT};
use crate::engine::redis::{epoch_key, stream_key, EPOCH, ROOMS};
use crate::engine::store::{Store, StoreError};

/// What an import moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Imported {
    /// Users.
    pub users: usize,
    /// Live sessions and tokens.
    pub credentials: usize,
    /// Rooms (users' notification streams included).
    pub rooms: usize,
    /// Messages.
    pub messages: usize,
    /// Polls.
    pub polls: usize,
    /// Votes.
    pub votes: usize,
    /// The epoch of the streams, as the store had it.
    pub epoch: String,
}

/// An import that could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// Redis holds data of a deployment already (nodes ran on it, or it was imported into).
    #[error(
        "redis already holds tether data ({rooms} rooms, {users} users, polls: {polls}, \
         other keys: {others}): import into an empty Redis, once, before the nodes start"
    )]
    NotEmpty {
        /// Rooms listed.
        rooms: u64,
        /// Users.
        users: u64,
        /// Whether polls were ever created.
        polls: bool,
        /// Whether other keys of tether's are there (a node's heartbeat, streams).
        others: bool,
    },
    /// An earlier import into this Redis stopped before it was done.
    #[error(
        "an earlier import into this redis did not finish: empty it (redis-cli FLUSHDB) and \
         import again"
    )]
    Unfinished,
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A Redis command failed; what was written before it stays.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Marks an import: `started` while it runs, `done` once everything is written. Checked
/// first, so that a half-written Redis is told apart from a deployment's.
const MARK: &str = "tether:imported";

/// Commands sent in one round trip at most.
const PIPELINE: usize = 1000;

/// How long each batch waits for its replicas (with `redis_replicas`): nobody waits behind
/// an import, so it waits out a busy replica rather than stop unfinished.
const REPLICA_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Messages read from the store at a time.
const PAGE: usize = 1000;

/// Commands gathered and sent [`PIPELINE`] at a time.
struct Writes {
    con: Link,
    pipe: redis::Pipeline,
    queued: usize,
}

impl Writes {
    fn new(con: Link) -> Writes {
        Writes {
            con,
            pipe: redis::pipe(),
            queued: 0,
        }
    }

    async fn add(&mut self, cmd: redis::Cmd) -> Result<(), ImportError> {
        self.pipe.add_command(cmd).ignore();
        self.queued += 1;
        if self.queued >= PIPELINE {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ImportError> {
        if self.queued > 0 {
            let pipe = std::mem::replace(&mut self.pipe, redis::pipe());
            self.queued = 0;
            let () = pipe.query_async(&mut self.con).await?;
        }
        Ok(())
    }
}

/// Copies what `store` holds into the Redis at `url`. With `replicas` (the nodes'
/// `redis_replicas`), each batch of writes counts as written only once that many replicas
/// of its master hold it (`WAIT`), as the nodes' own writes do: an import that returns is
/// held by them, and one that could not be confirmed stops, unfinished.
///
/// # Errors
/// [`ImportError::NotEmpty`] before anything is written when Redis holds rooms, users or
/// polls; otherwise a failure of either side (an invalid URL, Redis unreachable, fewer
/// replicas than `replicas` confirming a batch within ten seconds).
pub async fn sqlite_into_redis(
    store: &Store,
    url: &str,
    replicas: usize,
) -> Result<Imported, ImportError> {
    let con = Link::open(url, std::time::Duration::from_secs(30))?
        .confirmed_by(replicas)
        .waiting(REPLICA_WAIT);
    let mut check = con.clone();
    let mark: Option<String> = redis::cmd("GET").arg(MARK).query_async(&mut check).await?;
    if mark.as_deref() == Some("started") {
        return Err(ImportError::Unfinished);
    }
    let (rooms, users, polls): (u64, u64, bool) = redis::pipe()
        .cmd("ZCARD")
        .arg(ROOMS)
        .cmd("HLEN")
        .arg(USERS)
        .cmd("EXISTS")
        .arg(NEXT)
        .query_async(&mut check)
        .await?;
    // Any key of tether's, on any master of a cluster: a node's heartbeat or epoch, a stream
    // of a room not yet listed.
    let others = mark.is_some() || con.any_key("tether:*").await?;
    if rooms > 0 || users > 0 || polls || others {
        return Err(ImportError::NotEmpty {
            rooms,
            users,
            polls,
            others,
        });
    }
    // Claimed, so that two imports at once cannot both go on.
    let claimed: redis::Value = redis::cmd("SET")
        .arg(MARK)
        .arg("started")
        .arg("NX")
        .query_async(&mut check)
        .await?;
    if claimed == redis::Value::Nil {
        return Err(ImportError::Unfinished);
    }
    let mut done = Imported {
        epoch: store.epoch()?,
        ..Imported::default()
    };
    let mut writes = Writes::new(con);
    writes
        .add(redis::cmd("SET").arg(EPOCH).arg(&done.epoch).clone())
        .await?;

    for user in store.export_users()? {
        let record = format!("{}\t{}\t{}", user.name, user.created, user.hash);
        let cmd = redis::cmd("HSETNX")
            .arg(USERS)
            .arg(user.name.to_ascii_lowercase())
            .arg(record)
            .clone();
        writes.add(cmd).await?;
        done.users += 1;
    }
    for c in store.export_credentials()? {
        let digest = hex(&c.digest);
        let record = CredentialRecord {
            user: c.user.clone(),
            kind: c.kind,
            created: c.created,
            expires: c.expires,
        };
        let set = redis::cmd("HSET")
            .arg(CREDENTIALS)
            .arg(&digest)
            .arg(record.format())
            .clone();
        writes.add(set).await?;
        let listed = redis::cmd("SADD").arg(of_key(&c.user)).arg(&digest).clone();
        writes.add(listed).await?;
        done.credentials += 1;
    }

    let mut after: Option<String> = None;
    loop {
        let page = store.rooms(after.as_deref(), PAGE)?;
        let Some((last_room, _)) = page.last() else {
            break;
        };
        after = Some(last_room.clone());
        for (room, last) in &page {
            done.messages += copy_room(store, &mut writes, room, *last, &done.epoch).await?;
            let under = redis::cmd("SET")
                .arg(epoch_key(room))
                .arg(&done.epoch)
                .clone();
            writes.add(under).await?;
            if !crate::wire::is_personal(room) {
                let listed = redis::cmd("ZADD").arg(ROOMS).arg(0).arg(room).clone();
                writes.add(listed).await?;
            }
            done.rooms += 1;
        }
    }

    let mut highest = 0;
    for id in store.poll_ids()? {
        let Some(poll) = store.poll(id)? else {
            continue;
        };
        let options = serde_json::to_string(&poll.options).expect("strings serialize");
        let stored = redis::cmd("HSET")
            .arg(poll_key(id, "p"))
            .arg("question")
            .arg(&poll.question)
            .arg("options")
            .arg(options)
            .arg("created")
            .arg(&poll.created)
            .clone();
        writes.add(stored).await?;
        for (option, n) in poll.counts.iter().filter(|(_, n)| **n > 0) {
            let counted = redis::cmd("HSET")
                .arg(poll_key(id, "c"))
                .arg(option)
                .arg(n)
                .clone();
            writes.add(counted).await?;
        }
        for vote in store.export_votes(id)? {
            let cast = redis::cmd("HSET")
                .arg(poll_key(id, "v"))
                .arg(&vote.voter)
                .arg(&vote.option)
                .clone();
            writes.add(cast).await?;
            if let Some(address) = &vote.address {
                let from = redis::cmd("SADD")
                    .arg(poll_key(id, &format!("a:{address}")))
                    .arg(&vote.voter)
                    .clone();
                writes.add(from).await?;
            }
            done.votes += 1;
        }
        let listed = redis::cmd("ZADD").arg(LIST).arg(id).arg(id).clone();
        writes.add(listed).await?;
        highest = highest.max(id);
        done.polls += 1;
    }
    if highest > 0 {
        writes
            .add(redis::cmd("SET").arg(NEXT).arg(highest).clone())
            .await?;
    }
    writes
        .add(redis::cmd("SET").arg(MARK).arg("done").clone())
        .await?;
    writes.flush().await?;
    Ok(done)
}

/// Copies the messages of `room` (up to id `last`) into its stream under their ids, marked
/// with `epoch` as the nodes store them; returns how many.
async fn copy_room(
    store: &Store,
    writes: &mut Writes,
    room: &str,
    last: u64,
    epoch: &str,
) -> Result<usize, ImportError> {
    let (mut since, mut copied) = (0, 0);
    loop {
        let page = store.messages(room, since, last, PAGE)?;
        let Some(newest) = page.last() else {
            return Ok(copied);
        };
        since = newest.id;
        for message in &page {
            let mut stored = serde_json::to_value(message).expect("a message serializes");
            stored["epoch"] = epoch.into();
            let cmd = redis::cmd("XADD")
                .arg(stream_key(room))
                .arg(format!("0-{}", message.id))
                .arg("m")
                .arg(stored.to_string())
                .clone();
            writes.add(cmd).await?;
            copied += 1;
        }
    }
}
