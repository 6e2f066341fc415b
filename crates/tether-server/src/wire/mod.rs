//! What goes over the wire to clients, defined once near the bottom of the crate: the
//! messages and polls every endpoint sends (here), the channel protocol's commands, replies
//! and pushes ([`channels`]), and the shapes of the room and poll endpoints ([`rooms`]).
//! Storage, the hub and the sessions all speak these types; none of them owns them.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tether::Prepared;

pub mod channels;
pub mod format;
pub mod rooms;

/// Serializes a message once into a text message that many connections can share.
pub fn encode(message: &impl Serialize) -> Arc<Prepared> {
    // The wire's types are structs of strings, numbers and JSON values: they always
    // serialize.
    let json = serde_json::to_string(message).expect("wire messages serialize");
    Arc::new(Prepared::text(json))
}

/// One chat message as stored and as sent to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "message")]
pub struct ChatMessage {
    /// Strictly increasing per room, starting at 1.
    pub id: u64,
    /// The room.
    pub room: String,
    /// Who sent it (a user or a guest nickname).
    pub user: String,
    /// Whether the sender was a guest (a nickname, not a registered user): pages show it, so
    /// that a guest cannot pass for a user. Absent from the JSON when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guest: bool,
    /// The text.
    pub text: String,
    /// When it was stored, RFC 3339 with milliseconds, UTC.
    pub ts: String,
    /// The epoch of the stream it belongs to, when it came from shared storage (Redis): a
    /// node learns from it that the stream was lost and started again. Not sent to clients
    /// (`welcome` and `ready` carry the epoch).
    #[serde(default, skip_serializing)]
    pub epoch: Option<String>,
}

/// A poll with its current counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Poll {
    /// The poll's id.
    pub id: i64,
    /// The question.
    pub question: String,
    /// The options, in the creator's order.
    pub options: Vec<String>,
    /// Votes per option (every option present, zero included).
    pub counts: BTreeMap<String, u64>,
    /// All votes.
    pub total: u64,
    /// When it was created (RFC 3339).
    pub created: String,
}

/// What starts the name of a user's notification stream, which is stored and delivered as a
/// room's: a character no room name may hold, and one that sorts after every character a room
/// name may, so that listing rooms in name order meets those streams only at its end.
pub const PERSONAL: char = '~';

/// The stream of `user`'s notifications (the `user:NAME` channel).
pub fn personal(user: &str) -> String {
    format!("{PERSONAL}{user}")
}

/// Whether `room` is a user's notification stream rather than a room.
pub fn is_personal(room: &str) -> bool {
    room.starts_with(PERSONAL)
}
