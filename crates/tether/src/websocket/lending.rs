//! The lending receive's side for answers: [`Replies`] queues messages from borrowed bytes
//! while a lent message is being handled.

use tether_proto::{Connection, Event, Lent};

use crate::error::Result;

/// Queues answers while [`WebSocket::poll_next_lent`](super::WebSocket::poll_next_lent) lends
/// a message: each is copied (or compressed) straight into the outgoing buffer, as one frame,
/// and written with the rest of the batch (like [`WebSocket::feed`](super::WebSocket::feed)).
/// The write budget is not checked here: the receive that lends stops reading while more than
/// [`Config::write_buffer_size`](crate::Config::write_buffer_size) is queued.
#[derive(Debug)]
pub struct Replies<'a> {
    conn: &'a mut Connection,
    /// The lent message's own payload, when it was received as one (a message assembled from
    /// fragments, or too large to copy): sending that message back shares it.
    owned: Option<&'a Event>,
}

impl<'a> Replies<'a> {
    pub(super) fn new(conn: &'a mut Connection, owned: Option<&'a Event>) -> Self {
        Replies { conn, owned }
    }

    /// Queues `message`: a lent message (an echo), or [`Lent::Text`] / [`Lent::Binary`] made
    /// from any slice. A lent message that was assembled or is large goes out sharing its
    /// payload; anything else is copied.
    ///
    /// # Errors
    /// [`Error::Send`](crate::Error::Send) with
    /// [`SendError::Closed`](tether_proto::SendError::Closed) once a Close was sent.
    #[inline]
    pub fn send(&mut self, message: Lent<'_>) -> Result<()> {
        let same = |payload: &[u8]| std::ptr::eq(message.as_bytes(), payload);
        match (message, self.owned) {
            (Lent::Text(_), Some(Event::Text(text))) if same(text.as_bytes()) => {
                self.conn.send_text(text.clone())?;
            }
            (Lent::Binary(_), Some(Event::Binary(data))) if same(data) => {
                self.conn.send_binary(data.clone())?;
            }
            _ => self.conn.send_lent(message)?,
        }
        Ok(())
    }

    /// Queues a text message copied from `text`.
    ///
    /// # Errors
    /// As [`Replies::send`].
    pub fn send_text(&mut self, text: &str) -> Result<()> {
        self.send(Lent::Text(text))
    }

    /// Queues a binary message copied from `data`.
    ///
    /// # Errors
    /// As [`Replies::send`].
    pub fn send_binary(&mut self, data: &[u8]) -> Result<()> {
        self.send(Lent::Binary(data))
    }

    /// Bytes queued and not yet written, these answers included.
    pub fn queued_len(&self) -> usize {
        self.conn.queued_len()
    }
}
