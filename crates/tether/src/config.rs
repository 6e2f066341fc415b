//! Limits, timeouts and keepalive for one connection.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tether_proto::extension::deflate::DeflateConfig;
use tether_proto::{Limits, Settings};

/// Every limit and timeout of a connection, each with a default suited to a public server.
///
/// ```
/// use std::time::Duration;
/// let config = tether::Config::default()
///     .max_message_size(1 << 20)
///     .ping_interval(Some(Duration::from_secs(20)));
/// assert_eq!(config.max_message_size, 1 << 20);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The largest handshake head (request or response line plus headers). Larger: the
    /// server answers 431, the client fails. Default 16 KiB.
    pub max_handshake_size: usize,
    /// How long the opening handshake may take, from the first byte awaited to the last
    /// written. Default 10 s.
    pub handshake_timeout: Duration,
    /// The largest frame payload accepted; larger fails with 1009. Default 16 MiB.
    pub max_frame_size: usize,
    /// The largest message accepted (all fragments); larger fails with 1009. Default 64 MiB.
    pub max_message_size: usize,
    /// The most frames one message may span; more fails with 1009 (a peer cannot keep a
    /// message open with endless empty continuations). Default 131,072.
    pub max_message_fragments: u32,
    /// Outbound bytes queued before sending waits for the socket to drain (backpressure).
    /// Default 1 MiB. A single larger message is still accepted, then drained.
    pub write_buffer_size: usize,
    /// How long to wait for the peer's Close (and, as a client, for the server to close TCP)
    /// once ours is sent, and for a failed connection's Close to be written. Default 5 s.
    pub close_timeout: Duration,
    /// How long a write may wait on a peer that takes none of it (its receive window full: it
    /// stopped reading); past it the connection fails with
    /// [`Error::WriteTimeout`](crate::Error::WriteTimeout) and the transport is shut down.
    /// Any progress restarts the wait. `None` waits forever. Default 30 s.
    pub write_timeout: Option<Duration>,
    /// Send a ping this long after the connection opened or the last ping was answered;
    /// `None` (the default) disables keepalive. One ping awaits its pong at a time.
    pub ping_interval: Option<Duration>,
    /// Without a pong this long after a keepalive ping, close with 1011 and fail with
    /// [`Error::KeepaliveTimeout`](crate::Error::KeepaliveTimeout). Default 20 s.
    pub ping_timeout: Duration,
    /// Subprotocols a server supports, in its order of preference; the first one the client
    /// offered wins. Empty (the default): none is selected.
    pub protocols: Vec<String>,
    /// Origins a server accepts (exact `scheme://host[:port]`, case-insensitive). `None`
    /// (the default) accepts any, and requests without an `Origin` (non-browser clients) are
    /// always accepted; a refused origin is answered 403.
    pub allowed_origins: Option<Vec<String>>,
    /// With [`Config::allowed_origins`] set, also accept the server's own origin:
    /// `{scheme}://{Host}`, for the scheme the server is reached by (`"http"` or `"https"`),
    /// so that pages it serves connect without being listed. `None` (the default): only the
    /// list counts.
    pub same_origin_scheme: Option<String>,
    /// permessage-deflate (RFC 7692): a client offers it, a server accepts a client's offer.
    /// `None` (the default) neither offers nor accepts. Inflated messages are capped by
    /// `max_message_size` (a decompression bomb gets 1009); compressor memory is bounded by
    /// the window bits (see [`DeflateConfig`]).
    pub deflate: Option<DeflateConfig>,
    /// The protocol core's settings, made from the fields above once and shared by the
    /// connections that use this configuration.
    core: CoreSettings,
}

/// The core's settings of a [`Config`], once made. A copy of the configuration starts
/// without them (it may be changed before use).
#[derive(Default)]
struct CoreSettings(OnceLock<Arc<Settings>>);

impl Clone for CoreSettings {
    fn clone(&self) -> Self {
        CoreSettings::default()
    }
}

impl std::fmt::Debug for CoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("..")
    }
}

impl Default for Config {
    fn default() -> Self {
        let limits = Limits::default();
        Config {
            max_handshake_size: 16 << 10,
            handshake_timeout: Duration::from_secs(10),
            max_frame_size: limits.max_frame_size,
            max_message_size: limits.max_message_size,
            max_message_fragments: limits.max_message_fragments,
            write_buffer_size: 1 << 20,
            close_timeout: Duration::from_secs(5),
            write_timeout: Some(Duration::from_secs(30)),
            ping_interval: None,
            ping_timeout: Duration::from_secs(20),
            protocols: Vec::new(),
            allowed_origins: None,
            same_origin_scheme: None,
            deflate: None,
            core: CoreSettings::default(),
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        impl Config {
            $(
                $(#[$doc])*
                pub fn $name(mut self, value: $ty) -> Self {
                    self.$name = value;
                    self
                }
            )*
        }
    };
}

setters! {
    /// Sets [`Config::max_handshake_size`].
    max_handshake_size: usize,
    /// Sets [`Config::handshake_timeout`].
    handshake_timeout: Duration,
    /// Sets [`Config::max_frame_size`].
    max_frame_size: usize,
    /// Sets [`Config::max_message_size`].
    max_message_size: usize,
    /// Sets [`Config::max_message_fragments`].
    max_message_fragments: u32,
    /// Sets [`Config::write_buffer_size`].
    write_buffer_size: usize,
    /// Sets [`Config::close_timeout`].
    close_timeout: Duration,
    /// Sets [`Config::write_timeout`].
    write_timeout: Option<Duration>,
    /// Sets [`Config::ping_interval`].
    ping_interval: Option<Duration>,
    /// Sets [`Config::ping_timeout`].
    ping_timeout: Duration,
    /// Sets [`Config::protocols`].
    protocols: Vec<String>,
    /// Sets [`Config::allowed_origins`].
    allowed_origins: Option<Vec<String>>,
    /// Sets [`Config::same_origin_scheme`].
    same_origin_scheme: Option<String>,
    /// Sets [`Config::deflate`].
    deflate: Option<DeflateConfig>,
}

impl Config {
    /// The protocol core's settings: one allocation shared by every connection made with
    /// this configuration while its fields stay as they are.
    pub(crate) fn core_settings(&self) -> Arc<Settings> {
        let fresh = Settings::default()
            .limits(self.limits())
            .timeouts(self.timeouts());
        match self.core.0.get() {
            Some(made) if **made == fresh => made.clone(),
            _ => {
                let made = Arc::new(fresh);
                let _ = self.core.0.set(made.clone());
                made
            }
        }
    }

    /// The protocol core's timers.
    fn timeouts(&self) -> tether_proto::Timeouts {
        tether_proto::Timeouts::default()
            .ping_interval(self.ping_interval)
            .pong_timeout(self.ping_timeout)
            .close_timeout(self.close_timeout)
    }

    /// The protocol core's limits.
    fn limits(&self) -> Limits {
        Limits::default()
            .max_frame_size(self.max_frame_size)
            .max_message_size(self.max_message_size)
            .max_message_fragments(self.max_message_fragments)
    }
}
