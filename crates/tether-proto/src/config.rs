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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_size: 16 << 20,
            max_message_size: 64 << 20,
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
}
