//! Polls and their votes.
//!
//! [`SqlitePolls`] keeps them in the node's SQLite file, votes going through the journal
//! (which delivers the new counts after commit). [`RedisPolls`] keeps them in Redis, where ids
//! come from one counter (polls created on two nodes at once never share one) and each vote is
//! one script that records it, counts it and publishes the poll's new counts on
//! [`POLLS_CHANNEL`]; every node delivers them to its members of the poll, and new polls to
//! its members of the list.
//!
//! Each poll's keys carry the hash tag `{tether:poll:ID}`, so that in Redis Cluster a vote's
//! script touches one shard.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::link::Link;
use super::local::Local;
use super::{EngineFuture, Polls};
use crate::engine::journal::{Job, Journal, VoteWrite};
use crate::engine::store::{now_rfc3339, Db, Poll, StoreError, VoteOutcome};

/// Polls in the node's SQLite file.
#[derive(Debug, Clone)]
pub struct SqlitePolls {
    db: Db,
    journal: Journal,
    hub: Arc<dyn Local>,
}

impl SqlitePolls {
    /// Polls in the store behind `db`, votes through `journal`, news to `hub`.
    pub fn new(db: Db, journal: Journal, hub: Arc<dyn Local>) -> SqlitePolls {
        SqlitePolls { db, journal, hub }
    }
}

impl Polls for SqlitePolls {
    fn create<'a>(&'a self, question: &'a str, options: &'a [String]) -> EngineFuture<'a, Poll> {
        let (question, options) = (question.to_owned(), options.to_vec());
        Box::pin(async move {
            let poll = self
                .db
                .call(move |s| s.create_poll(&question, &options))
                .await?;
            self.hub.poll_created(&poll);
            Ok(poll)
        })
    }

    fn poll<'a>(
        &'a self,
        id: i64,
        voter: Option<&'a str>,
    ) -> EngineFuture<'a, (Option<Poll>, Option<String>)> {
        let voter = voter.map(str::to_owned);
        Box::pin(self.db.call(move |s| {
            let vote = match &voter {
                Some(key) => s.vote_of(id, key)?,
                None => None,
            };
            Ok((s.poll(id)?, vote))
        }))
    }

    fn list(&self, limit: usize) -> EngineFuture<'_, Vec<Poll>> {
        Box::pin(self.db.call(move |s| s.polls(limit)))
    }

    fn vote(&self, vote: VoteWrite) -> EngineFuture<'_, ()> {
        Box::pin(self.journal.submit(Job::Vote(vote)))
    }
}

/// The Redis channel of poll news for every node: new polls and new counts.
pub const POLLS_CHANNEL: &str = "tether:polls";

/// The next poll id (a counter) and the polls by id (a sorted set scored by id).
pub(crate) const NEXT: &str = "tether:{tether:polls}:next";
pub(crate) const LIST: &str = "tether:{tether:polls}:list";

/// Polls created while a node's subscription was down that it announces once it is back, at
/// most (the oldest first; a client that missed more reads the list again).
const MISSED_POLLS: usize = 50;

/// A poll's keys: its question, options and creation time (a hash), the votes (voter →
/// option), the counts (option → votes) and, per address, the guests who voted from it.
pub(crate) fn poll_key(id: i64, part: &str) -> String {
    format!("tether:{{tether:poll:{id}}}:{part}")
}

/// Records voter ARGV[1]'s vote for option ARGV[2] in the poll (KEYS[1] the poll, KEYS[2] its
/// votes, KEYS[3] its counts, KEYS[4] the guests of the voter's address): for a guest
/// (ARGV[3] its address, non-empty) who has not voted yet, only while fewer than ARGV[4]
/// other guests voted from there. The news of the new counts for poll ARGV[6] is published on
/// ARGV[5] (unless empty: the caller publishes it once replicas hold the vote). Returns
/// `{1, news}` when counted, `{0, false}` for no such poll or option, `{2, false}` when the
/// address is full.
const VOTE: &str = r#"
local encoded = redis.call('HGET', KEYS[1], 'options')
if not encoded then return {0, false} end
local options = cjson.decode(encoded)
local known = false
for _, o in ipairs(options) do
  if o == ARGV[2] then known = true end
end
if not known then return {0, false} end
local before = redis.call('HGET', KEYS[2], ARGV[1])
if ARGV[3] ~= '' and not before then
  if redis.call('SCARD', KEYS[4]) >= tonumber(ARGV[4]) then return {2, false} end
  redis.call('SADD', KEYS[4], ARGV[1])
end
if before ~= ARGV[2] then
  if before then redis.call('HINCRBY', KEYS[3], before, -1) end
  redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
local counts = {}
for _, o in ipairs(options) do
  counts[o] = tonumber(redis.call('HGET', KEYS[3], o) or '0')
end
local news = cjson.encode({poll = tonumber(ARGV[6]), counts = counts})
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], news) end
return {1, news}
"#;

/// News on [`POLLS_CHANNEL`]: a poll created, or a poll's new counts.
#[derive(Debug, Serialize, Deserialize)]
pub struct PollNews {
    /// The poll whose counts these are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll: Option<i64>,
    /// Its counts, by option.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<BTreeMap<String, u64>>,
    /// A poll created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<Poll>,
    /// The node that sent the news and delivered it to its own members already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl PollNews {
    /// Hands the news to the members of node `node`, unless it sent it (and delivered it).
    pub fn deliver(&self, hub: &dyn Local, node: &str) {
        if self.origin.as_deref() == Some(node) {
            return;
        }
        if let Some(poll) = &self.created {
            hub.poll_created(poll);
        }
        if let (Some(poll), Some(counts)) = (self.poll, &self.counts) {
            hub.deliver_counts(poll, counts);
        }
    }
}

/// A command that failed, or an answer that is not what was stored.
fn redis_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Failed(format!("redis: {e}"))
}

/// Polls in Redis, shared by every node; each node's subscription delivers the news
/// ([`PollNews::deliver`]).
#[derive(Clone)]
pub struct RedisPolls {
    commands: Link,
    /// This node's name, and its hub: a poll created here is announced here at once, whether
    /// or not the subscription is up.
    node: String,
    hub: Arc<dyn Local>,
    vote: Arc<redis::Script>,
    /// The newest poll this node announced to its members (created here, or heard of), or
    /// listed when its subscription came up; -1 before the first time.
    announced: Arc<AtomicI64>,
}

impl std::fmt::Debug for RedisPolls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPolls").finish_non_exhaustive()
    }
}

impl RedisPolls {
    /// Polls through `commands` (a connection with timeouts) for node `node`, whose members
    /// are in `hub`.
    pub fn new(commands: Link, node: String, hub: Arc<dyn Local>) -> RedisPolls {
        RedisPolls {
            commands,
            node,
            hub,
            vote: Arc::new(redis::Script::new(VOTE)),
            announced: Arc::new(AtomicI64::new(-1)),
        }
    }

    fn conn(&self) -> Link {
        self.commands.clone()
    }

    /// Publishes a counted vote's `news` (the vote script's) for every node. A failure is
    /// logged, not the vote's: it is stored, and the next vote's counts (or a node's refresh
    /// after a lost subscription) carry it.
    async fn announce_counts(&self, poll: i64, news: String) {
        let published: Result<(), _> = redis::cmd("PUBLISH")
            .arg(POLLS_CHANNEL)
            .arg(news)
            .query_async(&mut self.commands.unconfirmed())
            .await;
        if let Err(e) = published {
            tracing::warn!(poll, error = %e, "a poll's new counts were not announced");
        }
    }

    /// Hands `hub` the counts of every poll its connections watch, as stored now, and
    /// announces the polls created since the newest it announced: after a lost subscription,
    /// the votes and polls published meanwhile were not heard.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let watched = self.hub.watched_polls();
        for chunk in watched.chunks(100) {
            for poll in self.read(chunk, None).await?.0 {
                self.hub.deliver_counts(poll.id, &poll.counts);
            }
        }
        let known = self.announced.load(Relaxed);
        let newer: Vec<i64> = if known < 0 {
            // The first time: nothing was announced here yet, only the newest is noted.
            let mut cmd = redis::cmd("ZREVRANGE");
            cmd.arg(LIST).arg(0).arg(0);
            cmd
        } else {
            let mut cmd = redis::cmd("ZRANGEBYSCORE");
            cmd.arg(LIST).arg(format!("({known}")).arg("+inf");
            cmd.arg("LIMIT").arg(0).arg(MISSED_POLLS);
            cmd
        }
        .query_async(&mut self.conn())
        .await
        .map_err(redis_error)?;
        if known >= 0 {
            // Oldest first, as they were created; one created as this reads is announced
            // again by its news (a client keys polls by id).
            for poll in self.read(&newer, None).await?.0 {
                self.hub.poll_created(&poll);
            }
        }
        self.announced
            .fetch_max(newer.last().copied().unwrap_or(0), Relaxed);
        Ok(())
    }

    /// Hands news heard on [`POLLS_CHANNEL`] to this node's members, noting the poll it
    /// announces.
    pub fn heard(&self, news: &PollNews) {
        if let Some(poll) = &news.created {
            self.announced.fetch_max(poll.id, Relaxed);
        }
        news.deliver(&*self.hub, &self.node);
    }

    /// Polls `ids` as stored, in the same order (those missing left out), with `voter`'s
    /// option in the first.
    async fn read(
        &self,
        ids: &[i64],
        voter: Option<&str>,
    ) -> Result<(Vec<Poll>, Option<String>), StoreError> {
        if ids.is_empty() {
            // An empty pipeline is an error to the client library.
            return Ok((Vec::new(), None));
        }
        let mut pipe = redis::pipe();
        for &id in ids {
            pipe.cmd("HGETALL").arg(poll_key(id, "p"));
            pipe.cmd("HGETALL").arg(poll_key(id, "c"));
        }
        if let (Some(voter), Some(&first)) = (voter, ids.first()) {
            pipe.cmd("HGET").arg(poll_key(first, "v")).arg(voter);
        }
        let mut replies: Vec<redis::Value> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(redis_error)?;
        let vote: Option<String> = match voter.is_some() && !ids.is_empty() {
            true => redis::from_redis_value(replies.pop().unwrap_or(redis::Value::Nil))
                .map_err(redis_error)?,
            false => None,
        };
        let mut polls = Vec::with_capacity(ids.len());
        let mut replies = replies.into_iter();
        for &id in ids {
            let (Some(fields), Some(counted)) = (replies.next(), replies.next()) else {
                break;
            };
            let fields: BTreeMap<String, String> =
                redis::from_redis_value(fields).map_err(redis_error)?;
            let counted: BTreeMap<String, u64> =
                redis::from_redis_value(counted).map_err(redis_error)?;
            let (Some(question), Some(options), Some(created)) = (
                fields.get("question"),
                fields.get("options"),
                fields.get("created"),
            ) else {
                continue;
            };
            let options: Vec<String> = serde_json::from_str(options).unwrap_or_default();
            let counts: BTreeMap<String, u64> = options
                .iter()
                .map(|o| (o.clone(), counted.get(o).copied().unwrap_or(0)))
                .collect();
            polls.push(Poll {
                id,
                question: question.clone(),
                options,
                total: counts.values().sum(),
                counts,
                created: created.clone(),
            });
        }
        Ok((polls, vote))
    }
}

impl Polls for RedisPolls {
    fn create<'a>(&'a self, question: &'a str, options: &'a [String]) -> EngineFuture<'a, Poll> {
        Box::pin(async move {
            let id: i64 = redis::cmd("INCR")
                .arg(NEXT)
                .query_async(&mut self.conn())
                .await
                .map_err(redis_error)?;
            let poll = Poll {
                id,
                question: question.to_owned(),
                options: options.to_vec(),
                counts: options.iter().map(|o| (o.clone(), 0)).collect(),
                total: 0,
                created: now_rfc3339(),
            };
            let encoded = serde_json::to_string(options).expect("strings serialize");
            let news = PollNews {
                poll: None,
                counts: None,
                created: Some(poll.clone()),
                origin: Some(self.node.clone()),
            };
            let news = serde_json::to_string(&news).expect("a poll serializes");
            // The poll before its place in the list, and the news last: whoever sees it
            // listed or announced can read it. (Its keys and the list's are on different
            // shards in Redis Cluster, so this is not one script.)
            let _: () = redis::pipe()
                .cmd("HSET")
                .arg(poll_key(id, "p"))
                .arg("question")
                .arg(question)
                .arg("options")
                .arg(encoded)
                .arg("created")
                .arg(&poll.created)
                .ignore()
                .cmd("ZADD")
                .arg(LIST)
                .arg(id)
                .arg(id)
                .ignore()
                .cmd("PUBLISH")
                .arg(POLLS_CHANNEL)
                .arg(news)
                .ignore()
                .query_async(&mut self.conn())
                .await
                .map_err(redis_error)?;
            self.hub.poll_created(&poll);
            self.announced.fetch_max(id, Relaxed);
            Ok(poll)
        })
    }

    fn poll<'a>(
        &'a self,
        id: i64,
        voter: Option<&'a str>,
    ) -> EngineFuture<'a, (Option<Poll>, Option<String>)> {
        Box::pin(async move {
            let (mut polls, vote) = self.read(&[id], voter).await?;
            Ok((polls.pop(), vote))
        })
    }

    fn list(&self, limit: usize) -> EngineFuture<'_, Vec<Poll>> {
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let ids: Vec<i64> = redis::cmd("ZREVRANGE")
                .arg(LIST)
                .arg(0)
                .arg(limit - 1)
                .query_async(&mut self.conn())
                .await
                .map_err(redis_error)?;
            Ok(self.read(&ids, None).await?.0)
        })
    }

    fn vote(&self, vote: VoteWrite) -> EngineFuture<'_, ()> {
        let this = self.clone();
        Box::pin(async move {
            // The caller goes on (a socket serves its client meanwhile); the outcome goes to
            // the vote's reply.
            tokio::spawn(async move {
                let (address, cap) = match &vote.voter.guest {
                    Some((address, cap)) => (address.clone(), *cap),
                    None => (String::new(), 0),
                };
                // Waiting for replicas, the counts are published once they hold the vote:
                // nobody hears of a vote that a failover could still lose.
                let confirms = this.commands.confirms();
                let channel = if confirms { "" } else { POLLS_CHANNEL };
                let ran: Result<(i64, Option<String>), _> = this
                    .vote
                    .key(poll_key(vote.poll, "p"))
                    .key(poll_key(vote.poll, "v"))
                    .key(poll_key(vote.poll, "c"))
                    .key(poll_key(vote.poll, &format!("a:{address}")))
                    .arg(&vote.voter.key)
                    .arg(&vote.option)
                    .arg(&address)
                    .arg(cap)
                    .arg(channel)
                    .arg(vote.poll)
                    .invoke_async(&mut this.conn())
                    .await;
                match ran {
                    Ok((1, news)) => {
                        if let (true, Some(news)) = (confirms, news) {
                            this.announce_counts(vote.poll, news).await;
                        }
                        vote.answer(VoteOutcome::Counted);
                    }
                    Ok((2, _)) => vote.answer(VoteOutcome::AddressFull),
                    Ok(_) => vote.answer(VoteOutcome::Unknown),
                    Err(e) => vote.reply.send(Err(redis_error(e)), "vote not stored"),
                }
            });
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn news_reads_back_what_was_written() {
        let news: PollNews = serde_json::from_str(r#"{"poll":3,"counts":{"a":1,"b":0}}"#).unwrap();
        assert_eq!(news.poll, Some(3));
        assert_eq!(news.counts.unwrap()["a"], 1);
        assert!(news.created.is_none());
        assert_eq!(poll_key(7, "v"), "tether:{tether:poll:7}:v");
    }
}
