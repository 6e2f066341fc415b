//! The shapes of the room and poll endpoints (`/ws/rooms/NAME`, `/ws/polls/ID`; docs/api.md):
//! one room or poll per connection, messages typed by a `type` field. The sessions
//! (`session`) decide; these types say how it looks on the wire.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Poll;

/// The first message of a room connection.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "welcome")]
pub struct Welcome<'a> {
    /// The room.
    pub room: &'a str,
    /// Who the connection is.
    pub user: &'a str,
    /// Whether it is a guest.
    pub guest: bool,
    /// The users in the room (none listed in a crowd).
    pub members: &'a [String],
    /// The epoch of the room's stream of ids: a client resumes with it and `since`.
    pub epoch: &'a str,
    /// Only when the client asked to resume: whether exactly the messages after its `since`
    /// follow. `false`: what it holds is stale (another epoch, a position the room never
    /// reached, or messages no longer kept); the recent history follows instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// The room has more users than are listed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// The end of a room connection's history: live messages follow.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "ready")]
pub struct Ready<'a> {
    /// The id of the last message sent before.
    pub last_id: u64,
    /// The stream's epoch.
    pub epoch: &'a str,
}

/// The first message of a poll connection: the poll and the connection's vote.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "poll")]
pub struct PollState<'a> {
    /// The poll.
    pub poll: &'a Poll,
    /// This connection's vote, if any.
    pub vote: Option<&'a str>,
}

/// A chat message a room client sends.
#[derive(Debug, Deserialize)]
pub struct ChatIn {
    /// The text.
    pub text: String,
    /// An idempotency key: sending again with it cannot store the message twice.
    pub key: Option<String>,
}

/// A vote a poll client sends.
#[derive(Debug, Deserialize)]
pub struct VoteIn {
    /// The option.
    pub vote: String,
}

/// A refusal of what the client sent: `{"type": "error", "error"}`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "error")]
pub struct Error<'a> {
    /// Why.
    pub error: &'a str,
}

/// A user joined or left a room.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "presence")]
pub struct Presence<'a> {
    /// The room.
    pub room: &'a str,
    /// Who.
    pub user: &'a str,
    /// `join` or `leave`.
    pub event: &'static str,
    /// Users in the room now.
    pub count: usize,
}

/// A broadcast from a user to every connection.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "broadcast")]
pub struct Broadcast<'a> {
    /// Who sent it.
    pub user: &'a str,
    /// The text.
    pub text: &'a str,
    /// When.
    pub ts: &'a str,
}

/// A poll's counts changed.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "counts")]
pub struct Counts<'a> {
    /// The poll.
    pub id: i64,
    /// Votes per option.
    pub counts: &'a BTreeMap<String, u64>,
    /// All votes.
    pub total: u64,
}
