//! Counters exported at `GET /metrics` in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why an upgrade was refused, for `tether_handshake_failures_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a valid WebSocket upgrade.
    BadRequest,
    /// The Origin is not allowed.
    Origin,
    /// No or bad credentials.
    Auth,
    /// Too many connections (in all or from one address).
    Limit,
    /// Unknown room name or poll.
    NotFound,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Refusal::BadRequest,
        Refusal::Origin,
        Refusal::Auth,
        Refusal::Limit,
        Refusal::NotFound,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::Origin => "origin",
            Refusal::Auth => "auth",
            Refusal::Limit => "limit",
            Refusal::NotFound => "not_found",
        }
    }
}

/// The server's counters; all updates are relaxed atomics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open WebSocket connections.
    pub connections: AtomicU64,
    /// WebSocket connections ever accepted.
    pub connections_total: AtomicU64,
    /// Of those, the ones opened as an HTTP/2 stream (an extended CONNECT, RFC 8441).
    pub http2_websockets_total: AtomicU64,
    /// HTTP connections (TCP, TLS included) ever served.
    pub http_connections_total: AtomicU64,
    /// Of those, the ones that spoke HTTP/2.
    pub http2_connections_total: AtomicU64,
    /// Messages received from clients.
    pub messages_in: AtomicU64,
    /// Messages queued to clients.
    pub messages_out: AtomicU64,
    /// Payload bytes received.
    pub bytes_in: AtomicU64,
    /// Payload bytes queued to clients.
    pub bytes_out: AtomicU64,
    /// Connections closed with 1013 because their outbound queue overflowed.
    pub slow_consumers: AtomicU64,
    /// Writes fan-out made straight to the sockets of idle connections (each with every
    /// event that waited for that connection).
    pub direct_writes: AtomicU64,
    /// Times fan-out found an idle connection's socket busy or full, and woke its session to
    /// write instead.
    pub direct_handbacks: AtomicU64,
    /// Connections dropped because they accepted nothing within the write timeout.
    pub write_timeouts: AtomicU64,
    /// Connections closed with 1008 for sending too fast.
    pub rate_limited: AtomicU64,
    /// Messages that could not be stored.
    pub store_failures: AtomicU64,
    /// Whether the last write to the SQLite store failed.
    sqlite_failing: std::sync::atomic::AtomicBool,
    /// Whether the last write to Redis failed.
    redis_failing: std::sync::atomic::AtomicBool,
    refusals: [AtomicU64; 5],
}

impl Metrics {
    /// Counts a refused upgrade.
    pub fn refused(&self, why: Refusal) {
        let i = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.refusals[i].fetch_add(1, Relaxed);
    }

    /// Records the outcome of a write to the SQLite store: a failure marks storage as
    /// failing, a success clears it.
    pub fn stored(&self, ok: bool) {
        self.sqlite_failing.store(!ok, Relaxed);
    }

    /// Records the outcome of a write to Redis, as [`Metrics::stored`] for SQLite.
    pub fn stored_in_redis(&self, ok: bool) {
        self.redis_failing.store(!ok, Relaxed);
    }

    /// Whether the last write to either store failed (`/healthz` says degraded until one to
    /// that store succeeds).
    pub fn storage_failing(&self) -> bool {
        self.sqlite_failing.load(Relaxed) || self.redis_failing.load(Relaxed)
    }

    /// Counts one message of `len` payload bytes queued to a client.
    pub fn sent(&self, len: usize) {
        self.sent_many(1, len);
    }

    /// Counts `count` copies of a message of `len` payload bytes queued to clients.
    pub fn sent_many(&self, count: usize, len: usize) {
        if count > 0 {
            self.messages_out.fetch_add(count as u64, Relaxed);
            self.bytes_out.fetch_add((count * len) as u64, Relaxed);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "tether_connections",
            "gauge",
            "Open WebSocket connections.",
            self.connections.load(Relaxed),
        );
        metric(
            "tether_connections_total",
            "counter",
            "WebSocket connections accepted.",
            self.connections_total.load(Relaxed),
        );
        metric(
            "tether_http2_websockets_total",
            "counter",
            "WebSocket connections accepted as a stream of an HTTP/2 connection.",
            self.http2_websockets_total.load(Relaxed),
        );
        metric(
            "tether_http_connections_total",
            "counter",
            "HTTP connections served (each may carry many requests and WebSockets).",
            self.http_connections_total.load(Relaxed),
        );
        metric(
            "tether_http2_connections_total",
            "counter",
            "HTTP connections served that spoke HTTP/2.",
            self.http2_connections_total.load(Relaxed),
        );
        metric(
            "tether_messages_in_total",
            "counter",
            "Messages received from clients.",
            self.messages_in.load(Relaxed),
        );
        metric(
            "tether_messages_out_total",
            "counter",
            "Messages queued to clients.",
            self.messages_out.load(Relaxed),
        );
        metric(
            "tether_bytes_in_total",
            "counter",
            "Payload bytes received.",
            self.bytes_in.load(Relaxed),
        );
        metric(
            "tether_bytes_out_total",
            "counter",
            "Payload bytes queued to clients.",
            self.bytes_out.load(Relaxed),
        );
        metric(
            "tether_slow_consumer_disconnects_total",
            "counter",
            "Connections closed with 1013 because they fell behind.",
            self.slow_consumers.load(Relaxed),
        );
        metric(
            "tether_fanout_direct_writes_total",
            "counter",
            "Writes fan-out made straight to idle connections' sockets.",
            self.direct_writes.load(Relaxed),
        );
        metric(
            "tether_fanout_handbacks_total",
            "counter",
            "Times fan-out found an idle connection's socket busy or full and woke it instead.",
            self.direct_handbacks.load(Relaxed),
        );
        metric(
            "tether_write_timeouts_total",
            "counter",
            "Connections dropped because they accepted nothing within the write timeout.",
            self.write_timeouts.load(Relaxed),
        );
        metric(
            "tether_rate_limited_total",
            "counter",
            "Connections closed with 1008 for sending too fast.",
            self.rate_limited.load(Relaxed),
        );
        metric(
            "tether_store_failures_total",
            "counter",
            "Messages or votes that could not be stored.",
            self.store_failures.load(Relaxed),
        );
        metric(
            "tether_storage_failing",
            "gauge",
            "1 while the last write to storage failed.",
            u64::from(self.storage_failing()),
        );
        let _ = writeln!(
            out,
            "# HELP tether_handshake_failures_total WebSocket upgrades refused.\n# TYPE tether_handshake_failures_total counter"
        );
        for (why, n) in Refusal::ALL.iter().zip(&self.refusals) {
            let _ = writeln!(
                out,
                "tether_handshake_failures_total{{reason=\"{}\"}} {}",
                why.label(),
                n.load(Relaxed)
            );
        }
        out
    }
}
