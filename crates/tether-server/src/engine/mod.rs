//! The engine seam: what the server asks of the place its state lives. One implementation per
//! deployment is chosen once, at startup ([`crate::serve`]): [`Embedded`] keeps everything in
//! this process and its SQLite file, and the Redis one ([`crate::cluster::Cluster`]) shares it
//! with every node. Handlers and sessions call the traits, never asking which one runs.
//!
//! The parts, gathered in an [`Engine`]:
//! - [`Broker`]: chat streams, with ids, an epoch and history;
//! - [`Presence`]: who is in a room beyond what this node's hub sees;
//! - [`Control`]: what goes to every node (broadcasts), and the health of the link;
//! - [`Leases`]: a name held by one holder across nodes (guest nicknames);
//! - [`Accounts`]: users, password hashes, sessions and tokens, whose revocations reach
//!   every node's connections ([`Revocations`]);
//! - [`Polls`]: polls and votes, whose counts reach every node's members.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::hub::{Hub, Member};
use crate::journal::{ChatWrite, Job, Journal};
use crate::store::Db;
use crate::store::{ChatMessage, StoreError};

pub mod accounts;
pub mod import;
pub mod polls;

pub use accounts::{Accounts, RedisAccounts, Revocations, SqliteAccounts};
pub use polls::{Polls, RedisPolls, SqlitePolls};

/// What the engine's calls return: a boxed future, so that the traits can be objects.
pub type EngineFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Chat streams: each room's messages, with ids that increase by one, an epoch that changes
/// when storage lost them, and their history. Stored messages reach this node's subscribers
/// through the hub, after they are stored, whichever node stored them.
pub trait Broker: Send + Sync + std::fmt::Debug {
    /// Queues `write` for storing; the stored message (or the failure) goes to its reply.
    ///
    /// # Errors
    /// [`StoreError::Closed`] when the writer has stopped.
    fn publish(&self, write: ChatWrite) -> EngineFuture<'_, ()>;

    /// The epoch of the rooms' streams.
    ///
    /// # Errors
    /// Storage failed.
    fn epoch(&self) -> EngineFuture<'_, String>;

    /// The first id `room` still keeps (`None` when it keeps none) and its last id (0 when
    /// none). Once this answers, what is published to `room` afterwards reaches this node.
    ///
    /// # Errors
    /// Storage failed.
    fn bounds<'a>(&'a self, room: &'a str) -> EngineFuture<'a, (Option<u64>, u64)>;

    /// Messages of `room` with `since < id <= until`, oldest first, at most `limit`.
    ///
    /// # Errors
    /// Storage failed.
    fn history<'a>(
        &'a self,
        room: &'a str,
        since: u64,
        until: u64,
        limit: usize,
    ) -> EngineFuture<'a, Vec<ChatMessage>>;

    /// The newest `count` messages of `room`, oldest first.
    ///
    /// # Errors
    /// Storage failed.
    fn recent<'a>(&'a self, room: &'a str, count: usize) -> EngineFuture<'a, Vec<ChatMessage>>;

    /// Whether `room` has stored messages.
    ///
    /// # Errors
    /// Storage failed.
    fn has_messages<'a>(&'a self, room: &'a str) -> EngineFuture<'a, bool>;

    /// Rooms with stored messages, `(room, last id)` in name order: the first `limit` after
    /// `after` (from the start when `None`).
    ///
    /// # Errors
    /// Storage failed.
    fn rooms<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: usize,
    ) -> EngineFuture<'a, Vec<(String, u64)>>;
}

/// Presence as the other nodes hold it. This node's own members are in its hub, which every
/// caller reads first; these calls add what the rest of the deployment knows.
pub trait Presence: Send + Sync + std::fmt::Debug {
    /// The users in each of `rooms` on every node, this one included, in the same order.
    ///
    /// # Errors
    /// The others could not be asked.
    fn counts<'a>(&'a self, rooms: &'a [String]) -> EngineFuture<'a, Vec<usize>>;

    /// The users in `room` on the other nodes (this node's may be among them: callers merge
    /// the answer with the hub's).
    ///
    /// # Errors
    /// The others could not be asked.
    fn users<'a>(&'a self, room: &'a str) -> EngineFuture<'a, BTreeSet<String>>;

    /// Who is in `room` on the other nodes, with their connections and information.
    ///
    /// # Errors
    /// The others could not be asked.
    fn elsewhere<'a>(&'a self, room: &'a str) -> EngineFuture<'a, Vec<Member>>;
}

/// What reaches every node, and the link's health.
pub trait Control: Send + Sync + std::fmt::Debug {
    /// Sends a notice from `user` to every connection of every node.
    ///
    /// # Errors
    /// The other nodes could not be told.
    fn broadcast<'a>(&'a self, user: &'a str, text: &'a str) -> EngineFuture<'a, Reach>;

    /// What is wrong with the link to the other nodes (`disconnected`, `stalled`), if anything.
    fn trouble(&self) -> Option<&'static str>;
}

/// How far a broadcast went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Delivered to this many connections (one process).
    Connections(usize),
    /// Handed to this many nodes, each delivering to its own connections.
    Nodes(usize),
}

/// Names held by one holder across nodes. This node's own holds are in
/// [`crate::guests::Nicknames`], taken first; a lease extends one to every node.
pub trait Leases: Send + Sync + std::fmt::Debug {
    /// Claims `name` for `holder` on every node: `false` when another holder has it.
    ///
    /// # Errors
    /// The other nodes could not be asked.
    fn claim<'a>(&'a self, name: &'a str, holder: &'a str) -> EngineFuture<'a, bool>;
}

/// The engine a server runs on: one implementation of every part, chosen together at startup.
#[derive(Debug, Clone)]
pub struct Engine {
    /// Chat streams.
    pub broker: Arc<dyn Broker>,
    /// Presence on every node.
    pub presence: Arc<dyn Presence>,
    /// Broadcasts and the link's health.
    pub control: Arc<dyn Control>,
    /// Names across nodes.
    pub leases: Arc<dyn Leases>,
    /// Users and credentials.
    pub accounts: Arc<dyn Accounts>,
    /// Polls and votes.
    pub polls: Arc<dyn Polls>,
    /// Where this node learns of revoked credentials, whoever revoked them.
    pub revocations: Revocations,
}

impl Engine {
    /// One process: this process's store, journal and hub.
    pub fn embedded(db: Db, journal: Journal, hub: Arc<Hub>, revocations: Revocations) -> Engine {
        let accounts = Arc::new(SqliteAccounts::new(db.clone(), revocations.clone()));
        let polls = Arc::new(SqlitePolls::new(db.clone(), journal.clone(), hub.clone()));
        let embedded = Arc::new(Embedded { db, journal, hub });
        Engine {
            broker: embedded.clone(),
            presence: embedded.clone(),
            control: embedded.clone(),
            leases: embedded,
            accounts,
            polls,
            revocations,
        }
    }

    /// Several nodes joined through Redis: `accounts` must announce on the `revocations`
    /// the cluster signals.
    pub fn redis(
        cluster: Arc<crate::cluster::Cluster>,
        accounts: RedisAccounts,
        revocations: Revocations,
    ) -> Engine {
        let polls = Arc::new(RedisPolls::new(cluster.commands()));
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

/// One process: messages go through the journal (the one writer, which delivers after
/// commit), reads go to the store's thread.
#[derive(Debug)]
pub struct Embedded {
    db: Db,
    journal: Journal,
    hub: Arc<Hub>,
}

impl Broker for Embedded {
    fn publish(&self, write: ChatWrite) -> EngineFuture<'_, ()> {
        Box::pin(self.journal.submit(Job::Chat(write)))
    }

    fn epoch(&self) -> EngineFuture<'_, String> {
        Box::pin(async move {
            // Kept by the hub once read: it changes only when the store is replaced.
            let known = self.hub.epoch();
            if !known.is_empty() {
                return Ok(known);
            }
            let epoch = self.db.call(|s| s.epoch()).await?;
            self.hub.observe_epoch(&epoch);
            Ok(epoch)
        })
    }

    fn bounds<'a>(&'a self, room: &'a str) -> EngineFuture<'a, (Option<u64>, u64)> {
        let room = room.to_owned();
        Box::pin(
            self.db
                .call(move |s| Ok((s.first_id(&room)?, s.last_id(&room)?))),
        )
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        since: u64,
        until: u64,
        limit: usize,
    ) -> EngineFuture<'a, Vec<ChatMessage>> {
        let room = room.to_owned();
        Box::pin(
            self.db
                .call(move |s| s.messages(&room, since, until, limit)),
        )
    }

    fn recent<'a>(&'a self, room: &'a str, count: usize) -> EngineFuture<'a, Vec<ChatMessage>> {
        let room = room.to_owned();
        Box::pin(self.db.call(move |s| {
            let until = s.last_id(&room)?;
            s.recent(&room, until, count)
        }))
    }

    fn has_messages<'a>(&'a self, room: &'a str) -> EngineFuture<'a, bool> {
        let room = room.to_owned();
        Box::pin(self.db.call(move |s| Ok(s.last_id(&room)? > 0)))
    }

    fn rooms<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: usize,
    ) -> EngineFuture<'a, Vec<(String, u64)>> {
        let after = after.map(str::to_owned);
        Box::pin(self.db.call(move |s| s.rooms(after.as_deref(), limit)))
    }
}

/// One process: there are no other nodes, and the hub knows everyone.
impl Presence for Embedded {
    fn counts<'a>(&'a self, rooms: &'a [String]) -> EngineFuture<'a, Vec<usize>> {
        Box::pin(async move { Ok(rooms.iter().map(|r| self.hub.user_count(r)).collect()) })
    }

    fn users<'a>(&'a self, _room: &'a str) -> EngineFuture<'a, BTreeSet<String>> {
        Box::pin(async { Ok(BTreeSet::new()) })
    }

    fn elsewhere<'a>(&'a self, _room: &'a str) -> EngineFuture<'a, Vec<Member>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

impl Control for Embedded {
    fn broadcast<'a>(&'a self, user: &'a str, text: &'a str) -> EngineFuture<'a, Reach> {
        let ts = crate::store::now_rfc3339();
        Box::pin(async move { Ok(Reach::Connections(self.hub.broadcast(user, text, &ts))) })
    }

    fn trouble(&self) -> Option<&'static str> {
        None
    }
}

/// One process: the hub's holds are all there is.
impl Leases for Embedded {
    fn claim<'a>(&'a self, _name: &'a str, _holder: &'a str) -> EngineFuture<'a, bool> {
        Box::pin(async { Ok(true) })
    }
}

impl Control for crate::cluster::Cluster {
    fn broadcast<'a>(&'a self, user: &'a str, text: &'a str) -> EngineFuture<'a, Reach> {
        // Every node delivers it to its own connections.
        Box::pin(async move {
            Ok(Reach::Nodes(
                crate::cluster::Cluster::broadcast(self, user, text).await?,
            ))
        })
    }

    fn trouble(&self) -> Option<&'static str> {
        (!self.is_healthy()).then(|| self.health())
    }
}

impl Leases for crate::cluster::Cluster {
    fn claim<'a>(&'a self, name: &'a str, holder: &'a str) -> EngineFuture<'a, bool> {
        Box::pin(self.claim_nickname(name, holder))
    }
}

impl Presence for crate::cluster::Cluster {
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

impl Broker for crate::cluster::Cluster {
    fn publish(&self, write: ChatWrite) -> EngineFuture<'_, ()> {
        Box::pin(self.submit(write))
    }

    fn epoch(&self) -> EngineFuture<'_, String> {
        Box::pin(crate::cluster::Cluster::epoch(self))
    }

    fn bounds<'a>(&'a self, room: &'a str) -> EngineFuture<'a, (Option<u64>, u64)> {
        Box::pin(async move {
            // Read only once this node hears the room: what is published after the read
            // then arrives live.
            self.listen(room).await;
            let last = crate::cluster::Cluster::recent(self, room, 1)
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
        Box::pin(crate::cluster::Cluster::recent(self, room, count))
    }

    fn has_messages<'a>(&'a self, room: &'a str) -> EngineFuture<'a, bool> {
        Box::pin(async move { Ok(self.first_id(room).await?.is_some()) })
    }

    fn rooms<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: usize,
    ) -> EngineFuture<'a, Vec<(String, u64)>> {
        Box::pin(crate::cluster::Cluster::rooms(self, after, limit))
    }
}
