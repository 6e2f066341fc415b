//! What endpoints and sessions ask of the node's state: the one way in to the engine. Each
//! call goes to the part of the engine chosen at startup (this process and its SQLite file,
//! or Redis), and none of its callers knows which.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::engine::journal::{ChatWrite, VoteWrite};
use crate::engine::local::Member;
use crate::engine::store::{ChatMessage, CredentialKind, Poll, StoreError};
use crate::engine::Reach;

use super::Node;

/// Chat streams.
impl Node {
    /// Queues a chat message for storing; the stored message (or the failure) goes to
    /// `write.reply`, and once stored it reaches every node's members.
    ///
    /// # Errors
    /// [`StoreError::Closed`] when the writer has stopped.
    pub async fn publish(&self, write: ChatWrite) -> Result<(), StoreError> {
        self.engine.broker.publish(write).await
    }

    /// Sends an ephemeral event (its push, as text) to `room`'s channel-protocol members on
    /// every node but the sender's subscription `from`; nothing is stored. Returns how many
    /// it reached on this node.
    ///
    /// # Errors
    /// The other nodes could not be told (this node's members have it).
    pub async fn event(&self, room: &str, from: u64, push: &str) -> Result<usize, StoreError> {
        self.engine.broker.event(room, from, push).await
    }

    /// The epoch of the rooms' streams.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn epoch(&self) -> Result<String, StoreError> {
        self.engine.broker.epoch().await
    }

    /// The first id `room` still keeps (`None` when none) and its last id (0 when none).
    ///
    /// # Errors
    /// Storage failed.
    pub async fn bounds(&self, room: &str) -> Result<(Option<u64>, u64), StoreError> {
        self.engine.broker.bounds(room).await
    }

    /// Messages of `room` with `since < id <= until`, oldest first, at most `limit`.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn history(
        &self,
        room: &str,
        since: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        self.engine.broker.history(room, since, until, limit).await
    }

    /// The newest `count` messages of `room`, oldest first.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn recent(&self, room: &str, count: usize) -> Result<Vec<ChatMessage>, StoreError> {
        self.engine.broker.recent(room, count).await
    }

    /// Whether `room` has stored messages.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn has_messages(&self, room: &str) -> Result<bool, StoreError> {
        self.engine.broker.has_messages(room).await
    }

    /// Rooms with stored messages, `(room, last id)` in name order: the first `limit` after
    /// `after`.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn stored_rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        self.engine.broker.rooms(after, limit).await
    }

    /// Resolves once every message queued so far is stored and answered (at shutdown).
    pub async fn flush(&self) {
        self.engine.broker.flush().await;
    }
}

/// Presence over every node.
impl Node {
    /// The users in each of `rooms` on every node, in the same order.
    ///
    /// # Errors
    /// The other nodes could not be asked.
    pub async fn presence_counts(&self, rooms: &[String]) -> Result<Vec<usize>, StoreError> {
        self.engine.presence.counts(rooms).await
    }

    /// The users in `room` on the other nodes (callers merge them with this node's).
    ///
    /// # Errors
    /// The other nodes could not be asked.
    pub async fn users_elsewhere(&self, room: &str) -> Result<BTreeSet<String>, StoreError> {
        self.engine.presence.users(room).await
    }

    /// Who is in `room` on every node: one entry per user, with their connections and infos
    /// summed over the nodes, in name order. When the other nodes cannot be asked, this
    /// node's members alone.
    pub async fn presence(&self, room: &str) -> Vec<Member> {
        let mut members = self.rooms.members(room);
        if let Ok(remote) = self.engine.presence.elsewhere(room).await {
            for other in remote {
                match members.iter_mut().find(|m| m.user == other.user) {
                    Some(member) => {
                        member.clients += other.clients;
                        member.add_infos(other.info);
                    }
                    None => members.push(other),
                }
            }
        }
        members.sort_by(|a, b| a.user.cmp(&b.user));
        members
    }
}

/// Accounts and credentials.
impl Node {
    /// The registered user whose name matches `name` ignoring case, as registered.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn user_named_like(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.engine.accounts.user_named_like(name).await
    }

    /// The password hash of user `name`, if registered.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn password_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.engine.accounts.password_hash(name).await
    }

    /// Stores a credential (a session or a token) by its digest, for `ttl` (`None`: as long
    /// as the kind's default).
    ///
    /// # Errors
    /// Storage failed.
    pub async fn add_credential(
        &self,
        digest: [u8; 32],
        user: &str,
        kind: CredentialKind,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.engine
            .accounts
            .add_credential(digest, user, kind, ttl)
            .await
    }

    /// Deletes one credential by its digest (a logout); its connections close on every node.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn delete_credential(&self, digest: [u8; 32]) -> Result<usize, StoreError> {
        self.engine.accounts.delete_credential(digest).await
    }

    /// Revokes every session and token of `user`; their connections close on every node.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn revoke_credentials(&self, user: &str) -> Result<usize, StoreError> {
        self.engine.accounts.revoke_credentials(user).await
    }
}

/// Polls and votes.
impl Node {
    /// Creates a poll; its id is unique over every node.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn create_poll(
        &self,
        question: &str,
        options: &[String],
    ) -> Result<Poll, StoreError> {
        self.engine.polls.create(question, options).await
    }

    /// The newest `limit` polls.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn polls(&self, limit: usize) -> Result<Vec<Poll>, StoreError> {
        self.engine.polls.list(limit).await
    }

    /// Poll `id` (`None` when there is none) and the vote of `voter` in it.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn poll(
        &self,
        id: i64,
        voter: Option<&str>,
    ) -> Result<(Option<Poll>, Option<String>), StoreError> {
        self.engine.polls.poll(id, voter).await
    }

    /// Queues a vote; the outcome goes to its reply, and the new counts reach every node.
    ///
    /// # Errors
    /// [`StoreError::Closed`] when the writer has stopped.
    pub async fn vote(&self, vote: VoteWrite) -> Result<(), StoreError> {
        self.engine.polls.vote(vote).await
    }
}

/// What reaches every node.
impl Node {
    /// Sends `text` from `user` to every connection of every node.
    ///
    /// # Errors
    /// The other nodes could not be reached.
    pub async fn broadcast(&self, user: &str, text: &str) -> Result<Reach, StoreError> {
        self.engine.control.broadcast(user, text).await
    }

    /// Ends every connection of `user` (a registered name or a guest's nickname) on every
    /// node: a `disconnect` push and a close with 4506, after which clients do not come back
    /// by themselves, or with 4003 when `reconnect` (its rights or identity changed: they
    /// connect again at once, and the server decides anew). The room and poll endpoints close
    /// with 1008 and 1012. Nothing stops the user from connecting again: take their
    /// credentials first ([`Node::revoke_credentials`]) to keep them out. An empty name (that
    /// of connections without an identity) ends nothing.
    ///
    /// # Errors
    /// The other nodes could not be reached.
    pub async fn disconnect_user(&self, user: &str, reconnect: bool) -> Result<Reach, StoreError> {
        self.engine.control.disconnect_user(user, reconnect).await
    }

    /// Ends the subscriptions of `user`'s connections to `channel` (`room:NAME`, `poll:ID`,
    /// `user:NAME`, `polls`) on every node: each client is told with an `unsub` push (code
    /// 2000) and leaves the channel's presence; a room or poll endpoint, whose one channel it
    /// was, closes with 1008. The user may subscribe again.
    ///
    /// # Errors
    /// The other nodes could not be reached.
    pub async fn unsubscribe_user(&self, user: &str, channel: &str) -> Result<Reach, StoreError> {
        self.engine.control.unsubscribe_user(user, channel).await
    }

    /// What is wrong with the engine's link to the other nodes, if anything (for
    /// `/healthz`).
    pub fn trouble(&self) -> Option<&'static str> {
        self.engine.control.trouble()
    }

    /// Claims the guest nickname `name` for `holder` across nodes: `false` when another
    /// holder has it.
    ///
    /// # Errors
    /// The other nodes could not be asked.
    pub async fn claim_name(&self, name: &str, holder: &str) -> Result<bool, StoreError> {
        self.engine.leases.claim(name, holder).await
    }
}
