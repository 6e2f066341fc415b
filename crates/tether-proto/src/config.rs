//! Protocol limits of one connection.

/// Limits the protocol core enforces on what the peer sends.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// The largest frame payload accepted; larger fails with 1009 as soon as the header is read.
    /// Default 16 MiB.
    pub max_frame_size: usize,
    /// The largest message (all fragments together) accepted; larger fails with 1009.
    /// Default 64 MiB.
    pub max_message_size: usize,
    /// The most frames one message may span (its first frame and every continuation); more
    /// fails with 1009. Without it, a peer could keep one message open with endless empty
    /// continuation frames, which cost the receiver work but never reach `max_message_size`.
    /// Default 131,072 (a 64 MiB message in 512-byte fragments).
    pub max_message_fragments: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_size: 16 << 20,
            max_message_size: 64 << 20,
            max_message_fragments: 1 << 17,
        }
    }
}

impl Limits {
    /// Sets [`Limits::max_frame_size`].
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame_size = bytes;
        self
    }

    /// Sets [`Limits::max_message_size`].
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets [`Limits::max_message_fragments`].
    pub fn max_message_fragments(mut self, frames: u32) -> Self {
        self.max_message_fragments = frames;
        self
    }
}
