//! This node as the engine sees it: what the engine tells the node (each stored message, poll
//! news, broadcasts, joins and leaves on other nodes) and what it asks of it (which rooms and
//! polls its connections follow, how far each room was delivered). The hub implements
//! [`Local`]; the engine holds it as a trait object, so it sits below the hub and never
//! reaches up into it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::wire::{ChatMessage, Poll};

/// Distinct `info` objects listed per user in presence: a user's other connections are
/// counted, not described.
pub const MAX_INFOS: usize = 4;

/// A user present in a room.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    /// Who.
    pub user: String,
    /// How many of their connections are there.
    pub clients: usize,
    /// The distinct public information those connections attached.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub info: Vec<Box<RawValue>>,
}

impl Member {
    /// Adds what `infos` holds that this member's list does not, up to [`MAX_INFOS`].
    pub fn add_infos(&mut self, infos: impl IntoIterator<Item = Box<RawValue>>) {
        for info in infos {
            if self.info.len() >= MAX_INFOS {
                break;
            }
            if !self.info.iter().any(|i| i.get() == info.get()) {
                self.info.push(info);
            }
        }
    }
}

/// What changed in a room on this node, for the other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The user's first connection here joined.
    Join,
    /// The user's last connection here left.
    Leave,
    /// Another connection of a user present here joined or left with public information:
    /// the room's information changed, not its members.
    Info,
}

/// A local join or leave, for the other nodes.
#[derive(Debug)]
pub struct Shared {
    /// The room.
    pub room: String,
    /// Who.
    pub user: String,
    /// What changed.
    pub change: Change,
    /// The joining connection's public information.
    pub info: Option<Box<RawValue>>,
}

/// The socket that sent a job, told when it failed.
pub trait Sender: Send + Sync + std::fmt::Debug {
    /// Tells the client that its job failed, in `text`.
    fn failed(&self, text: &str);
}

/// This node's connections, for the engine.
pub trait Local: Send + Sync + std::fmt::Debug {
    /// Delivers a stored message to the room's members here (an id already delivered is
    /// dropped; a message of another epoch resets every room first).
    fn deliver(&self, message: &ChatMessage);

    /// Sends poll `poll`'s counts to those watching it here.
    fn deliver_counts(&self, poll: i64, counts: &BTreeMap<String, u64>);

    /// Tells those watching the list of polls here of a new poll.
    fn poll_created(&self, poll: &Poll);

    /// Sends a notice to every connection here; how many it reached.
    fn broadcast(&self, user: &str, text: &str, ts: &str) -> usize;

    /// Ends every connection of `user` here, asking them to come back when `reconnect`;
    /// how many it ended.
    fn disconnect_user(&self, user: &str, reconnect: bool) -> usize;

    /// Ends the subscriptions of `user`'s connections here to `channel` (a channel
    /// protocol's name: `room:NAME`, `poll:ID`, …), telling each client; how many.
    fn unsubscribe_user(&self, user: &str, channel: &str) -> usize;

    /// Sends an ephemeral event (its push, as text) to the channel-protocol members of `room`
    /// here but the subscription `from` (none when `None`); how many it reached.
    fn ephemeral(&self, room: &str, from: Option<u64>, push: &str) -> usize;

    /// Tells the members of `room` here that `user` joined (with the joining connection's
    /// public `info`) or left on another node; `remote` is how many users the room has on
    /// other nodes.
    fn remote_presence(
        &self,
        room: &str,
        user: &str,
        join: bool,
        remote: usize,
        info: Option<&RawValue>,
    );

    /// Whether `room` has members here.
    fn has_room(&self, room: &str) -> bool;

    /// The rooms with members here.
    fn room_names(&self) -> Vec<String>;

    /// The last id delivered in `room` here (0 when none, or the room has no members here).
    fn position(&self, room: &str) -> u64;

    /// The rooms' epoch as last seen here (empty before it is known).
    fn epoch(&self) -> String;

    /// Takes note of the rooms' epoch as read from storage; when it differs from the one
    /// seen before, every room here starts again. Whether that happened.
    fn observe_epoch(&self, epoch: &str) -> bool;

    /// The polls watched here.
    fn watched_polls(&self) -> Vec<i64>;

    /// How many distinct users `room` has here.
    fn user_count(&self, room: &str) -> usize;

    /// The users here per room (users' notification streams left out).
    fn local_users(&self) -> BTreeMap<String, Vec<String>>;

    /// The public information the connections here in `room` attached, by user.
    fn infos(&self, room: &str) -> BTreeMap<String, Vec<Box<RawValue>>>;

    /// Sends joins and leaves here to `tx`, for the other nodes.
    fn share_presence(&self, tx: mpsc::UnboundedSender<Shared>);

    /// Sends the name of each room that gains its first member here or loses its last one
    /// to `tx`, in order ([`Local::has_room`] says which way it went).
    fn follow_rooms(&self, tx: mpsc::UnboundedSender<Arc<str>>);
}
