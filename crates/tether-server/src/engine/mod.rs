//! The engine seam: what the server asks of the place its state lives. One implementation per
//! deployment is chosen once, at startup ([`crate::endpoints::serve`]): [`embedded::Embedded`] keeps
//! everything in this process and its SQLite file, and the Redis one ([`redis::Cluster`])
//! shares it with every node. Handlers and sessions call the traits, never asking which one
//! runs. This file holds the traits; each implementation lives in a module of its own below
//! it, and nothing here uses the implementations.
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
use std::time::Duration;

use tokio::sync::watch;

use journal::ChatWrite;
use journal::VoteWrite;
use local::Member;
use store::{ChatMessage, CredentialInfo, CredentialKind, Poll, StoreError, UserInfo};

pub mod accounts;
pub mod embedded;
pub mod feed;
pub mod import;
pub mod journal;
pub mod link;
pub mod local;
pub mod polls;
pub mod redis;
pub mod store;

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

    /// Resolves once every message queued before the call is stored and answered (at
    /// shutdown, after the sockets closed).
    fn flush(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>;

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

    /// Sends an ephemeral event, `push` (its channel-protocol push, as text), to the
    /// channel-protocol members of `room` on every node: here to all but the sender's
    /// subscription `from`, elsewhere to all. Nothing is stored. Returns how many it reached
    /// here.
    ///
    /// # Errors
    /// The other nodes could not be told (it reached this node's members all the same).
    fn event<'a>(&'a self, room: &'a str, from: u64, push: &'a str) -> EngineFuture<'a, usize>;
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

    /// Ends every connection of `user` on every node, asking them to come back when
    /// `reconnect`.
    ///
    /// # Errors
    /// The other nodes could not be told.
    fn disconnect_user<'a>(&'a self, user: &'a str, reconnect: bool) -> EngineFuture<'a, Reach>;

    /// Ends the subscriptions of `user`'s connections to `channel` on every node.
    ///
    /// # Errors
    /// The other nodes could not be told.
    fn unsubscribe_user<'a>(&'a self, user: &'a str, channel: &'a str) -> EngineFuture<'a, Reach>;

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
/// [`crate::identity::guests::Nicknames`], taken first; a lease extends one to every node.
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

/// Users, their password hashes, sessions and tokens.
pub trait Accounts: Send + Sync + std::fmt::Debug {
    /// Adds user `name` with an already hashed password.
    ///
    /// # Errors
    /// [`StoreError::UserExists`] when a user has this name ignoring ASCII case (`Alice` and
    /// `alice` would look the same to people); storage failed.
    fn add_user<'a>(&'a self, name: &'a str, hash: &'a str) -> EngineFuture<'a, ()>;

    /// The registered user whose name equals `name` ignoring ASCII case, as registered.
    ///
    /// # Errors
    /// Storage failed.
    fn user_named_like<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Option<String>>;

    /// The password hash of the user named exactly `name`, if there is one.
    ///
    /// # Errors
    /// Storage failed.
    fn password_hash<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Option<String>>;

    /// Every user, by name, with their live sessions and tokens counted.
    ///
    /// # Errors
    /// Storage failed.
    fn users(&self) -> EngineFuture<'_, Vec<UserInfo>>;

    /// Removes the user named exactly `name` with every credential of theirs (their messages
    /// and votes stay); whether there was one.
    ///
    /// # Errors
    /// Storage failed.
    fn remove_user<'a>(&'a self, name: &'a str) -> EngineFuture<'a, bool>;

    /// Replaces the password hash of the user named exactly `name` and revokes every
    /// credential of theirs (whoever knew the old password may hold one); whether there was one.
    ///
    /// # Errors
    /// Storage failed.
    fn set_password_hash<'a>(&'a self, name: &'a str, hash: &'a str) -> EngineFuture<'a, bool>;

    /// Stores a session or token (its digest) for `user`, valid for `ttl` (forever if `None`).
    ///
    /// # Errors
    /// Storage failed.
    fn add_credential<'a>(
        &'a self,
        digest: [u8; 32],
        user: &'a str,
        kind: CredentialKind,
        ttl: Option<Duration>,
    ) -> EngineFuture<'a, ()>;

    /// Whose the credential with `digest` is, if it exists, is of `kind` and has not expired.
    ///
    /// # Errors
    /// Storage failed.
    fn credential_user(
        &self,
        digest: [u8; 32],
        kind: CredentialKind,
    ) -> EngineFuture<'_, Option<String>>;

    /// The live sessions and tokens of the user named exactly `user`, newest first.
    ///
    /// # Errors
    /// Storage failed.
    fn credentials<'a>(&'a self, user: &'a str) -> EngineFuture<'a, Vec<CredentialInfo>>;

    /// Deletes the credential with `digest` (a logout); how many went (0 or 1).
    ///
    /// # Errors
    /// Storage failed.
    fn delete_credential(&self, digest: [u8; 32]) -> EngineFuture<'_, usize>;

    /// Deletes the credential of `user` whose [`CredentialInfo::id`] is `id`; how many went.
    ///
    /// # Errors
    /// Storage failed.
    fn revoke_credential<'a>(&'a self, user: &'a str, id: &'a str) -> EngineFuture<'a, usize>;

    /// Deletes every credential of `user` (any case of the name); how many went.
    ///
    /// # Errors
    /// Storage failed.
    fn revoke_credentials<'a>(&'a self, user: &'a str) -> EngineFuture<'a, usize>;

    /// Gives tokens stored without an expiry (by versions before tokens had a lifetime) one
    /// of `ttl` from now; how many.
    ///
    /// # Errors
    /// Storage failed.
    fn bound_token_lifetimes(&self, ttl: Duration) -> EngineFuture<'_, usize>;
}

/// Tells this node's open connections that credentials were revoked, so that each checks its
/// own again. Cloned handles share one signal.
#[derive(Debug, Clone)]
pub struct Revocations(Arc<watch::Sender<u64>>);

impl Default for Revocations {
    fn default() -> Self {
        Revocations(Arc::new(watch::channel(0).0))
    }
}

impl Revocations {
    /// Signals a revocation to every receiver.
    pub fn announce(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Revocations from now on: take it before checking a credential, so that one made
    /// between the check and the wait is not missed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }

    /// How many revocations were signalled so far (wrapping).
    pub fn generation(&self) -> u64 {
        *self.0.borrow()
    }
}

/// Polls, votes and their counts.
pub trait Polls: Send + Sync + std::fmt::Debug {
    /// Creates a poll (already validated) and tells every node's members of the poll list.
    ///
    /// # Errors
    /// Storage failed.
    fn create<'a>(&'a self, question: &'a str, options: &'a [String]) -> EngineFuture<'a, Poll>;

    /// Poll `id` with its counts, and the option `voter` (a [`crate::engine::store::Voter`]'s key)
    /// chose in it.
    ///
    /// # Errors
    /// Storage failed.
    fn poll<'a>(
        &'a self,
        id: i64,
        voter: Option<&'a str>,
    ) -> EngineFuture<'a, (Option<Poll>, Option<String>)>;

    /// The newest `limit` polls, newest first.
    ///
    /// # Errors
    /// Storage failed.
    fn list(&self, limit: usize) -> EngineFuture<'_, Vec<Poll>>;

    /// Queues `vote`; what became of it goes to its reply, and the poll's new counts to every
    /// node's members of the poll.
    ///
    /// # Errors
    /// [`StoreError::Closed`] when the writer has stopped.
    fn vote(&self, vote: VoteWrite) -> EngineFuture<'_, ()>;
}
