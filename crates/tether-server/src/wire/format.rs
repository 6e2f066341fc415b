//! How a connection speaks: the two shapes its events take.

use std::sync::Arc;

use serde_json::value::RawValue;
use tether::Prepared;

use super::{channels, encode, rooms};

/// How a connection speaks: which of the two shapes its events take. The hub keeps, per
/// channel, how many subscribers speak each, and encodes an event once per format among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The single-channel endpoints' events (`/ws/rooms/…`, `/ws/polls/…`: [`rooms`]).
    Room,
    /// The channel protocol's pushes (`/ws`, tether.v1: [`channels`]).
    Channels,
}

impl Format {
    /// Every format, in the order the hub counts them.
    pub const ALL: [Format; 2] = [Format::Room, Format::Channels];

    /// `user` joined (`join`) or left `channel`, which has `count` users now; `info` is the
    /// public information of the connection that joined.
    pub fn presence(
        self,
        channel: &str,
        user: &str,
        join: bool,
        count: usize,
        info: Option<&RawValue>,
    ) -> Arc<Prepared> {
        let kind = if join { "join" } else { "leave" };
        match self {
            Format::Room => encode(&rooms::Presence {
                room: channels::channel_room(channel).unwrap_or(channel),
                user,
                event: kind,
                count,
            }),
            Format::Channels => encode(&channels::Presence {
                kind,
                channel,
                user,
                count,
                info,
            }),
        }
    }
}
