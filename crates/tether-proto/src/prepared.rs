//! A message encoded once for many connections.
//!
//! Fan-out sends the same message to many peers. A [`Prepared`] message holds its payload as
//! shared [`Bytes`] and, for peers with permessage-deflate whose server-to-client direction
//! has no context takeover, the compressed payload, computed once per window size and level
//! and then shared: each message is compressed from a fresh state there, so the same bytes
//! are valid for every such peer. Peers with context takeover compress it themselves (their
//! compressor's history differs), peers without compression get the payload as it is.

use std::sync::Mutex;

use bytes::Bytes;

use crate::extension::deflate::Deflate;
use crate::frame::OpCode;
use crate::utf8::Utf8Bytes;

/// A text or binary message to send to many connections with
/// [`Connection::send_prepared`](crate::Connection::send_prepared).
#[derive(Debug)]
pub struct Prepared {
    opcode: OpCode,
    payload: Bytes,
    /// Compressed payloads by (window bits, level); a handful at most.
    compressed: Mutex<Vec<(u8, u32, Bytes)>>,
}

impl Prepared {
    /// A text message.
    pub fn text(text: impl Into<Utf8Bytes>) -> Prepared {
        Prepared::new(OpCode::Text, text.into().into_bytes())
    }

    /// A binary message.
    pub fn binary(data: impl Into<Bytes>) -> Prepared {
        Prepared::new(OpCode::Binary, data.into())
    }

    fn new(opcode: OpCode, payload: Bytes) -> Prepared {
        Prepared {
            opcode,
            payload,
            compressed: Mutex::new(Vec::new()),
        }
    }

    /// The uncompressed payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Whether this is a text message.
    pub fn is_text(&self) -> bool {
        self.opcode == OpCode::Text
    }

    pub(crate) fn opcode(&self) -> OpCode {
        self.opcode
    }

    /// How many compressed forms are cached.
    #[cfg(test)]
    pub(crate) fn cached(&self) -> usize {
        self.compressed.lock().map_or(0, |c| c.len())
    }

    /// The payload compressed as `deflate` would compress it from a fresh state, shared by
    /// every connection with the same window size and level.
    pub(crate) fn compressed(&self, deflate: &mut Deflate, key: (u8, u32)) -> Bytes {
        let mut cache = self
            .compressed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, _, bytes)) = cache.iter().find(|(b, l, _)| (*b, *l) == key) {
            return bytes.clone();
        }
        let bytes = deflate.compress(&self.payload);
        cache.push((key.0, key.1, bytes.clone()));
        bytes
    }
}
