//! The settings of one connection: protocol limits and timers.

use std::time::Duration;

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

/// The timers a connection runs: keepalive and the close handshake's deadline (see
/// [`Connection::handle_timeout`](crate::Connection::handle_timeout)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timeouts {
    /// A ping this long after the first [`Connection::handle_timeout`](crate::Connection::handle_timeout),
    /// and this long after each keepalive ping that was answered; `None` (the default) sends
    /// none.
    pub ping_interval: Option<Duration>,
    /// How long a keepalive ping waits for the pong that answers it before the connection
    /// fails with 1011. Default 20 s.
    pub pong_timeout: Duration,
    /// How long the close handshake may take once our Close is queued (sent by us, echoed,
    /// or after a failure): for the peer's Close and our Close to be written, and for a
    /// client, for the server to close the transport. Default 5 s.
    pub close_timeout: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            ping_interval: None,
            pong_timeout: Duration::from_secs(20),
            close_timeout: Duration::from_secs(5),
        }
    }
}

impl Timeouts {
    /// Sets [`Timeouts::ping_interval`]; zero turns keepalive off as `None` does.
    pub fn ping_interval(mut self, interval: Option<Duration>) -> Self {
        self.ping_interval = interval.filter(|i| !i.is_zero());
        self
    }

    /// Sets [`Timeouts::pong_timeout`].
    pub fn pong_timeout(mut self, timeout: Duration) -> Self {
        self.pong_timeout = timeout;
        self
    }

    /// Sets [`Timeouts::close_timeout`].
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }
}

/// Everything a connection is configured with. Many connections share one through an
/// [`Arc`](std::sync::Arc) (see [`Connection::with_settings`](crate::Connection::with_settings)),
/// so that a connection carries a pointer rather than a copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settings {
    /// What the peer may send.
    pub limits: Limits,
    /// Keepalive and the close handshake's deadline.
    pub timeouts: Timeouts,
}

impl Settings {
    /// Sets [`Settings::limits`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets [`Settings::timeouts`].
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }
}
