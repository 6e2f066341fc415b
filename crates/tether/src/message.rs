//! Messages, as applications send and receive them.

use bytes::Bytes;
use tether_proto::{CloseFrame, Event, Utf8Bytes};

/// A WebSocket message: data, or a control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Text, always valid UTF-8.
    Text(Utf8Bytes),
    /// Binary data.
    Binary(Bytes),
    /// A ping (≤ 125 bytes). Received pings are answered automatically.
    Ping(Bytes),
    /// A pong (≤ 125 bytes).
    Pong(Bytes),
    /// A close frame; received, it is the last message of the stream.
    Close(Option<CloseFrame>),
}

impl Message {
    /// A text message.
    pub fn text(text: impl Into<Utf8Bytes>) -> Self {
        Message::Text(text.into())
    }

    /// A binary message.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Message::Binary(data.into())
    }

    /// Whether this is a text or binary message.
    pub fn is_data(&self) -> bool {
        matches!(self, Message::Text(_) | Message::Binary(_))
    }

    /// The payload bytes (empty for a close).
    pub fn as_payload(&self) -> &[u8] {
        match self {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b,
            Message::Close(_) => &[],
        }
    }

    /// The text, if this is a text message.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Message::Text(t) => Some(t.as_str()),
            _ => None,
        }
    }
}

impl From<Event> for Message {
    fn from(event: Event) -> Self {
        match event {
            Event::Text(t) => Message::Text(t),
            Event::Binary(b) => Message::Binary(b),
            Event::Ping(b) => Message::Ping(b),
            Event::Pong(b) => Message::Pong(b),
            Event::Close(f) => Message::Close(f),
            // Event is non-exhaustive; a newer core's event is surfaced as a close.
            #[allow(unreachable_patterns)]
            _ => Message::Close(None),
        }
    }
}

impl From<String> for Message {
    fn from(s: String) -> Self {
        Message::Text(s.into())
    }
}

impl From<&'static str> for Message {
    fn from(s: &'static str) -> Self {
        Message::Text(s.into())
    }
}

impl From<Vec<u8>> for Message {
    fn from(b: Vec<u8>) -> Self {
        Message::Binary(b.into())
    }
}

impl From<Bytes> for Message {
    fn from(b: Bytes) -> Self {
        Message::Binary(b)
    }
}
