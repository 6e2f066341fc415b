//! The channel protocol of `/ws` (subprotocol `tether.v1`, docs/protocol.md), as typed
//! values: the commands a client sends, the replies it gets (each carrying its command's id),
//! the pushes of its channels, and the error and disconnect codes. The session
//! (`session::channels`) decides; these types say how it looks on the wire.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tether::Prepared;

use super::{ChatMessage, Poll};
use crate::identity::auth;

/// The subprotocol a client of the channel protocol must offer.
pub const PROTOCOL: &str = "tether.v1";
/// What every version of the channel protocol's subprotocol starts with.
pub const FAMILY: &str = "tether.";

/// An error answer's code (docs/protocol.md, "Errors").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The server failed (storage).
    Internal = 100,
    /// No such channel, or a name that is not one.
    UnknownChannel = 102,
    /// The channel is not this connection's to read or write.
    PermissionDenied = 103,
    /// No such op.
    UnknownOp = 104,
    /// Subscribed already.
    AlreadySubscribed = 105,
    /// A limit of the server or of the connection.
    LimitExceeded = 106,
    /// A field is missing or wrong.
    BadRequest = 107,
    /// The channel does not do that.
    NotAvailable = 108,
    /// Not subscribed to that channel.
    NotSubscribed = 109,
    /// Too many commands or messages: slow down.
    TooManyRequests = 110,
    /// Too large.
    TooLarge = 111,
}

/// Close codes the server ends a connection with (docs/protocol.md, "Disconnect codes").
pub mod disconnect {
    use tether::CloseCode;

    /// The connection fell too far behind its channels.
    pub const SLOW_CONSUMER: CloseCode = CloseCode(4000);
    /// The server asked the connection to reconnect (its user's rights or identity changed).
    pub const RECONNECT: CloseCode = CloseCode(4003);
    /// A channel's stream was lost by storage and started again.
    pub const STREAM_RESET: CloseCode = CloseCode(4001);
    /// Commands refused for the rate, too many in a row.
    pub const TOO_MANY_COMMANDS: CloseCode = CloseCode(4002);
    /// Something that is not a command.
    pub const PROTOCOL_VIOLATION: CloseCode = CloseCode(4500);
    /// The credential the connection came with was revoked or expired.
    pub const CREDENTIAL_LOST: CloseCode = CloseCode(4502);
    /// The server ended the user's connections and does not want them back by themselves.
    pub const BY_SERVER: CloseCode = CloseCode(4506);

    /// Whether a client may reconnect after `code`.
    pub fn reconnects(code: CloseCode) -> bool {
        matches!(code.0, 1001 | 1011..=1013 | 4000..=4499)
    }
}

/// A command as the client sends it: every field any op takes; each op checks its own.
#[derive(Debug, Deserialize)]
pub struct Command {
    /// Echoed in the reply.
    pub id: u64,
    /// What to do: `connect`, `ping`, `subscribe`, `unsubscribe`, `publish`, `event`,
    /// `history`, `presence`.
    pub op: String,
    /// The channel the op is about.
    pub channel: Option<String>,
    /// `subscribe` and `history`: the offset the client holds.
    pub since: Option<u64>,
    /// `subscribe`: the epoch of the stream `since` belongs to.
    pub epoch: Option<String>,
    /// `publish` and `event`: what to send.
    pub data: Option<Value>,
    /// `publish`: an idempotency key.
    pub key: Option<String>,
    /// `event`: its name.
    pub name: Option<String>,
    /// `history`: how many publications at most.
    pub limit: Option<usize>,
    /// `connect`: an API token, for a connection that came without an identity.
    pub token: Option<String>,
    /// `connect`: public information shown with the connection in presence.
    pub info: Option<Box<RawValue>>,
}

/// The data of a publication to a room.
#[derive(Debug, Deserialize)]
pub struct TextData {
    /// The message.
    pub text: String,
}

/// The data of a publication to a poll: a vote.
#[derive(Debug, Deserialize)]
pub struct VoteData {
    /// The option voted for.
    pub vote: String,
}

/// A failed command's answer.
#[derive(Debug)]
pub struct Failure {
    /// Its code.
    pub code: Code,
    /// Why, for people.
    pub message: String,
}

/// A failure with `code`.
pub fn fail(code: Code, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// A channel's name, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name<'a> {
    /// `room:NAME`.
    Room(&'a str),
    /// `poll:ID`.
    Poll(i64),
    /// `polls`: the list of polls, told of each new one.
    Polls,
    /// `user:NAME`: a user's notifications.
    User(&'a str),
    /// `broadcast`: what the server sends to everyone.
    Broadcast,
}

/// Reads a channel's name.
///
/// # Errors
/// [`Code::UnknownChannel`], saying what the names are.
pub fn parse_channel(channel: &str) -> Result<Name<'_>, Failure> {
    match channel {
        "broadcast" => return Ok(Name::Broadcast),
        "polls" => return Ok(Name::Polls),
        _ => {}
    }
    match channel.split_once(':') {
        Some(("room", room)) if auth::valid_room(room) => Ok(Name::Room(room)),
        Some(("room", _)) => Err(fail(Code::UnknownChannel, auth::ROOM_RULE)),
        Some(("user", user)) if auth::valid_user(user) => Ok(Name::User(user)),
        Some(("user", _)) => Err(fail(Code::UnknownChannel, "a user channel is user:NAME")),
        // One spelling per poll (no leading zeros), so that a name is one subscription.
        Some(("poll", text)) => match text.parse::<i64>() {
            Ok(id) if id > 0 && id.to_string() == text => Ok(Name::Poll(id)),
            _ => Err(fail(Code::UnknownChannel, "a poll channel is poll:ID")),
        },
        _ => Err(fail(
            Code::UnknownChannel,
            format!(
                "no such channel: {channel} (room:NAME, poll:ID, polls, user:NAME or broadcast)"
            ),
        )),
    }
}

/// The channel name of a room, or of a user's notifications (`user:NAME`, kept as the
/// stream [`super::personal`] names).
pub fn room_channel(room: &str) -> String {
    match room.strip_prefix(super::PERSONAL) {
        Some(user) => format!("user:{user}"),
        None => format!("room:{room}"),
    }
}

/// The room of a `room:NAME` channel (`None` for any other channel).
pub fn channel_room(channel: &str) -> Option<&str> {
    channel.strip_prefix("room:")
}

/// The stream a room or user channel is stored as: `room:NAME` is room `NAME`, `user:NAME`
/// the user's notification stream ([`super::personal`]); the inverse of [`room_channel`].
pub fn channel_stream(channel: &str) -> Option<std::borrow::Cow<'_, str>> {
    match channel.split_once(':')? {
        ("room", room) => Some(room.into()),
        ("user", user) => Some(super::personal(user).into()),
        _ => None,
    }
}

// Replies.

/// A reply: its command's id, and what the op answers (nothing for most).
#[derive(Debug, Serialize)]
pub struct Reply<T: Serialize> {
    /// The command's id.
    pub id: u64,
    /// The answer's fields.
    #[serde(flatten)]
    pub body: T,
}

/// The reply of an op that answers nothing but its id.
#[derive(Debug, Serialize)]
pub struct Done {}

/// A failed command's reply: `{"id", "error": {"code", "message"}}`.
#[derive(Debug, Serialize)]
pub struct ErrorReply<'a> {
    /// The command's id.
    pub id: u64,
    /// What failed.
    pub error: ErrorBody<'a>,
}

/// An error's code and message.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    /// The code ([`Code`]).
    pub code: u16,
    /// Why.
    pub message: &'a str,
}

impl Failure {
    /// The reply to command `id` that failed so.
    pub fn reply(&self, id: u64) -> ErrorReply<'_> {
        ErrorReply {
            id,
            error: ErrorBody {
                code: self.code as u16,
                message: &self.message,
            },
        }
    }
}

/// `connect`'s reply.
#[derive(Debug, Serialize)]
pub struct Connected<'a> {
    /// The connection's id on this node, in hex.
    pub client: String,
    /// Its name (absent for a visitor without an identity).
    pub user: Option<&'a str>,
    /// Whether it is not a registered user.
    pub guest: bool,
    /// What it may do.
    pub limits: Limits,
}

/// A connection's limits, told on `connect`.
#[derive(Debug, Serialize)]
pub struct Limits {
    /// Subscriptions at once.
    pub channels: usize,
    /// Commands per second.
    pub commands_per_second: f64,
    /// The largest message, in bytes.
    pub message_size: usize,
}

/// A stored publication as `history` returns it (a `pub` push without its type).
#[derive(Debug, Serialize)]
pub struct Stored<'a> {
    /// Its channel.
    pub channel: String,
    /// Its offset in the channel's stream.
    pub offset: u64,
    /// Who published it.
    pub user: &'a str,
    /// Whether the publisher was a guest (absent when not).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub guest: bool,
    /// When it was stored.
    pub ts: &'a str,
    /// What was published.
    pub data: Text<'a>,
}

impl<'a> Stored<'a> {
    /// `message` as `history` returns it.
    pub fn of(message: &'a ChatMessage) -> Stored<'a> {
        Stored {
            channel: room_channel(&message.room),
            offset: message.id,
            user: &message.user,
            guest: message.guest,
            ts: &message.ts,
            data: Text {
                text: &message.text,
            },
        }
    }
}

/// `history`'s reply.
#[derive(Debug, Serialize)]
pub struct History<'a> {
    /// The stream's epoch.
    pub epoch: String,
    /// The stream's last offset.
    pub offset: u64,
    /// The publications, oldest first.
    pub publications: Vec<Stored<'a>>,
}

/// Who is in a room, as `presence` and a room's `subscribe` tell it.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Present {
    /// Each member, with its connections and their infos.
    Members {
        /// The members, in name order.
        members: Vec<Value>,
    },
    /// A crowd is counted, not listed.
    Users {
        /// How many users.
        users: usize,
    },
}

/// `subscribe`'s reply for a room or a user's notifications.
#[derive(Debug, Serialize)]
pub struct RoomSubscribed {
    /// The stream's epoch.
    pub epoch: String,
    /// The stream's last offset.
    pub offset: u64,
    /// How many publications the replay after this reply holds.
    pub replayed: u64,
    /// The members (a room with few), as `presence` lists them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<Vec<Value>>,
    /// How many users (a room with many).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<usize>,
    /// When resuming: whether exactly the publications after `since` follow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
}

/// `subscribe`'s reply for a poll.
#[derive(Debug, Serialize)]
pub struct PollSubscribed {
    /// The poll and its counts.
    pub poll: Poll,
    /// This connection's vote, if it voted.
    pub vote: Option<String>,
    /// Whether it may vote.
    pub can_vote: bool,
    /// Always 0: a poll's counts are its state.
    pub replayed: u64,
}

/// `subscribe`'s reply for the list of polls.
#[derive(Debug, Serialize)]
pub struct PollsSubscribed {
    /// The newest polls.
    pub polls: Vec<Poll>,
    /// Always 0.
    pub replayed: u64,
}

/// A `subscribe` reply.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Subscribed {
    /// To a room or a user's notifications.
    Room(RoomSubscribed),
    /// To a poll.
    Poll(PollSubscribed),
    /// To the list of polls.
    Polls(PollsSubscribed),
}

/// `publish`'s reply for a room: the offset the publication was stored at.
#[derive(Debug, Serialize)]
pub struct Published {
    /// Its offset.
    pub offset: u64,
}

// Pushes.

/// A publication: `{"type": "pub", …}`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "pub")]
pub struct Publication<'a, D: Serialize> {
    /// Its channel.
    pub channel: &'a str,
    /// Its offset in the channel's stream (absent for channels without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Who published it (absent for the server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    /// The publisher was a guest, not a registered user (absent when not).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub guest: bool,
    /// When it was stored or sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<&'a str>,
    /// What was published.
    pub data: D,
}

/// A stored chat message as a `pub` push: the same bytes live and replayed.
pub fn publication(message: &ChatMessage) -> Arc<Prepared> {
    super::encode(&Publication {
        channel: &room_channel(&message.room),
        offset: Some(message.id),
        user: Some(&message.user),
        guest: message.guest,
        ts: Some(&message.ts),
        data: Text {
            text: &message.text,
        },
    })
}

/// A chat message's data: `{"text"}`.
#[derive(Debug, Serialize)]
pub struct Text<'a> {
    /// The text.
    pub text: &'a str,
}

/// The data of a publication to `polls`: a new poll.
#[derive(Debug, Serialize)]
pub struct Created<'a> {
    /// The poll.
    pub created: &'a Poll,
}

/// The data of a publication to a poll: its counts.
#[derive(Debug, Serialize)]
pub struct Counts<'a> {
    /// Votes per option.
    pub counts: &'a BTreeMap<String, u64>,
    /// All votes.
    pub total: u64,
}

/// A user's first connection subscribed, or its last one left: `{"type": "join"|"leave", …}`.
#[derive(Debug, Serialize)]
pub struct Presence<'a> {
    /// `join` or `leave`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The channel.
    pub channel: &'a str,
    /// Who.
    pub user: &'a str,
    /// Users in the channel now.
    pub count: usize,
    /// The public information of the connection that joined, if it attached some.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<&'a RawValue>,
}

/// An ephemeral event in a room: `{"type": "event", …}`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "event")]
pub struct Event<'a> {
    /// The room's channel.
    pub channel: &'a str,
    /// The event's name.
    pub name: &'a str,
    /// Who sent it.
    pub user: &'a str,
    /// Its data.
    pub data: &'a Value,
}

/// The server ended a subscription: `{"type": "unsub", "channel", "code", "reason"}`. The
/// client should not subscribe again by itself.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "unsub")]
pub struct Unsubscribed<'a> {
    /// The channel no longer subscribed.
    pub channel: &'a str,
    /// Why, as a number ([`UNSUBSCRIBED_BY_SERVER`]).
    pub code: u16,
    /// Why, in words.
    pub reason: &'a str,
}

/// The `unsub` code of a subscription the server ended.
pub const UNSUBSCRIBED_BY_SERVER: u16 = 2000;

/// The last thing a closing connection is told: `{"type": "disconnect", …}`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "disconnect")]
pub struct Disconnect<'a> {
    /// The close code that follows.
    pub code: u16,
    /// Why.
    pub reason: &'a str,
    /// Whether to reconnect.
    pub reconnect: bool,
}
