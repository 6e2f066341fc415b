//! The server's settings: every field has an embedded default, a TOML key of the same name,
//! and a `tether serve` flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// An address to listen on, as people write it: `PORT` (on 127.0.0.1), `:PORT` (on every
/// interface), `HOST:PORT` with an IPv4 address or a name (its first address), or
/// `[IPv6]:PORT`.
///
/// ```
/// use tether_server::config::parse_listen;
/// assert_eq!(parse_listen("8080").unwrap().to_string(), "127.0.0.1:8080");
/// assert_eq!(parse_listen(":8080").unwrap().to_string(), "0.0.0.0:8080");
/// assert_eq!(parse_listen("[::1]:8080").unwrap().to_string(), "[::1]:8080");
/// assert_eq!(parse_listen("localhost:8080").unwrap().port(), 8080);
/// assert!(parse_listen("localhost").is_err());
/// ```
///
/// # Errors
/// A message naming what is wrong: no port, a port that is not 0–65535, a name that does not
/// resolve.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("{text:?}: the port must be a number from 0 to 65535"))
    };
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port(text)?)));
    }
    if let Some(p) = text.strip_prefix(':') {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port(p)?)));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, p)) = text.rsplit_once(':') else {
        return Err(format!(
            "{text:?}: give a port, as PORT, :PORT, HOST:PORT or [IPv6]:PORT"
        ));
    };
    let port = port(p)?;
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| format!("{text:?}: {host} does not resolve: {e}"))?
        .next()
        .ok_or_else(|| format!("{text:?}: {host} has no address"))
}

fn listen_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen(&text).map_err(serde::de::Error::custom)
}

/// What a server does, with defaults for one machine and no external service.
///
/// ```
/// let config: tether_server::ServerConfig = toml::from_str("listen = \"0.0.0.0:9000\"\nguests = false").unwrap();
/// assert_eq!(config.listen.port(), 9000);
/// assert!(!config.guests);
/// assert_eq!(config.history_on_join, 50);
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Address to listen on, in any spelling [`parse_listen`] takes. Default `127.0.0.1:8080`.
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    /// Directory of the SQLite file `tether.db`. Default `./tether-data`.
    pub data: PathBuf,
    /// PEM certificate chain; with `tls_key`, the port speaks `https://` and `wss://`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Origins accepted on WebSocket upgrades besides the server's own (`scheme://host[:port]`).
    pub allow_origins: Vec<String>,
    /// Reverse proxies (`ADDR` or `ADDR/LEN`) whose `Forwarded` / `X-Forwarded-For` name the
    /// client: its address then counts for every per-address limit. Default none: the
    /// headers are ignored.
    pub trusted_proxies: Vec<String>,
    /// Whether guests (a `?name=` nickname, no login) may chat and vote. Default true.
    pub guests: bool,
    /// Messages kept per room; older ones are deleted. Default 10,000.
    pub history_limit: usize,
    /// Rooms with stored messages at most; a message that would start another is refused
    /// (an `error` event, 403 from the API). Default 10,000.
    pub max_rooms: usize,
    /// Rooms one identity (a registered user, or a guest's address) may start per hour, in
    /// bursts of as many; past it a message that would start another is refused (403, an
    /// `error` event), so nobody alone can use up `max_rooms`. Default 20.
    pub rooms_per_hour: u32,
    /// Size of the SQLite file at most, in MiB (0: no cap); past it writes fail as on a full
    /// disk and `/healthz` reports storage as failing. Default 4,096.
    pub max_database_mb: u64,
    /// Messages sent to a client that joins without `since`. Default 50.
    pub history_on_join: usize,
    /// Largest chat message text, in bytes. Default 4,096.
    pub max_text: usize,
    /// Most WebSocket connections at once; more are answered 503. Default 10,000.
    pub max_connections: usize,
    /// Most WebSocket connections from one IP address; more are answered 429. Default 1,000.
    pub max_connections_per_ip: usize,
    /// Messages per second a connection may send (sustained); a burst of twice as many is
    /// allowed. Past it the connection is closed with 1008. Default 20.
    pub message_rate: f64,
    /// Messages per second one identity (a registered user, or a guest's address) may send
    /// over all its sockets, chat and votes (sustained; bursts of twice as many). Past it a
    /// message gets an `error` event and is not stored; the connections stay. Default 40.
    pub identity_message_rate: u32,
    /// Messages queued for one connection before it counts as a slow consumer and is closed
    /// with 1013. Default 1,024.
    pub outbox: usize,
    /// Seconds a client may accept nothing of what the server writes to it (history, live
    /// events) before it is dropped. Default 30.
    pub write_timeout_secs: u64,
    /// Most messages replayed to a client resuming with `?since=`; older ones are skipped and
    /// the welcome says `truncated`. Default 1,000.
    pub max_replay: usize,
    /// Plain HTTP connections at once (not counting those upgraded to WebSocket); more are
    /// answered 503 and closed. Default 1,024 (lowered to fit the file-descriptor limit).
    pub max_http_connections: usize,
    /// Plain HTTP connections at once from one address (IPv6: its /64); more are answered 429
    /// and closed. Default 64.
    pub max_http_connections_per_ip: usize,
    /// Seconds a request may take from its head to the handler's answer, its body included;
    /// past it, 408. Default 30.
    pub request_timeout_secs: u64,
    /// Keepalive ping interval in seconds (a missing pong closes with 1011). Default 30.
    pub ping_interval_secs: u64,
    /// Seconds to finish closing sockets on shutdown. Default 5.
    pub shutdown_secs: u64,
    /// Accept permessage-deflate when a client offers it. Default true.
    pub deflate: bool,
    /// Session cookie lifetime in hours. Default 168 (a week).
    pub session_hours: u64,
    /// Bearer token lifetime in days. Default 90.
    pub token_days: u64,
    /// Seconds between checks that an open connection's session or token is still valid
    /// (revoked by `tether user revoke`, or expired); revocations through this server's API
    /// are noticed at once. Default 60.
    pub credential_check_secs: u64,
    /// Threads that check passwords, each with one reused argon2 work area (19 MiB). Default 2.
    pub password_threads: usize,
    /// Password checks that may wait for a thread; more logins at once are answered 503 with
    /// `Retry-After`. Default 32.
    pub password_queue: usize,
    /// Failed logins an address may make in a burst; it regains one every 10 s, and past it
    /// logins from there are answered 429 with `Retry-After`. Default 20.
    pub login_failures_per_address: u32,
    /// Failed logins for one account from one address in a burst; it regains one a minute.
    /// Counted per address, so guessing from one place never locks the real user out from
    /// another. Default 5.
    pub login_failures_per_account: u32,
    /// Who may vote in polls: `"everyone"` (registered users, and guests one vote per guest
    /// id, at most `guest_votes_per_address` guests per address and poll) or `"users"`.
    /// Default `"everyone"`.
    pub poll_voters: Voters,
    /// Guests that may vote in one poll from one address (IPv6: its /64). Default 5.
    pub guest_votes_per_address: u32,
    /// Polls one identity (a user, or a guest's address) may create per hour, in bursts of as
    /// many; more are answered 429 with `Retry-After`. Default 10.
    pub polls_per_hour: u32,
    /// Sessions and tokens one user may be issued per hour, in bursts of as many. Default 20.
    pub credentials_per_hour: u32,
    /// Messages and broadcasts one user may publish per second through the HTTP API, in bursts
    /// of twice as many. Default 20.
    pub api_publish_rate: u32,
    /// `redis://…`: share rooms, history and presence with other nodes through Redis.
    /// `None` (the default): one node, history in SQLite.
    pub redis: Option<String>,
    /// This node's name among the others (default: host name and process id).
    pub node: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data: PathBuf::from("tether-data"),
            tls_cert: None,
            tls_key: None,
            allow_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            guests: true,
            history_limit: 10_000,
            history_on_join: 50,
            max_rooms: 10_000,
            rooms_per_hour: 20,
            max_database_mb: 4096,
            max_text: 4096,
            max_connections: 10_000,
            max_connections_per_ip: 1000,
            message_rate: 20.0,
            identity_message_rate: 40,
            outbox: 1024,
            max_http_connections: 1024,
            max_http_connections_per_ip: 64,
            request_timeout_secs: 30,
            write_timeout_secs: 30,
            max_replay: 1000,
            ping_interval_secs: 30,
            shutdown_secs: 5,
            deflate: true,
            session_hours: 168,
            token_days: 90,
            credential_check_secs: 60,
            password_threads: 2,
            password_queue: 32,
            login_failures_per_address: 20,
            login_failures_per_account: 5,
            poll_voters: Voters::Everyone,
            guest_votes_per_address: 5,
            polls_per_hour: 10,
            credentials_per_hour: 20,
            api_publish_rate: 20,
            redis: None,
            node: None,
        }
    }
}

/// Who may vote in polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Voters {
    /// Registered users, and guests (one vote per guest, a few guests per address).
    Everyone,
    /// Registered users only.
    Users,
}

impl ServerConfig {
    /// The keepalive interval.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs.max(1))
    }

    /// How long a client may accept nothing before it is dropped.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs.max(1))
    }

    /// How long a request may take, body included.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }

    /// How long shutdown waits for sockets to close.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_secs)
    }
}

/// A config file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("config file {path}: {reason}")]
pub struct ConfigError {
    path: String,
    reason: String,
}

impl ServerConfig {
    /// Reads a TOML file; keys it omits keep their defaults.
    ///
    /// # Errors
    /// The file cannot be read or is not valid TOML for this struct (unknown keys included).
    pub fn from_file(path: &std::path::Path) -> Result<ServerConfig, ConfigError> {
        let err = |reason: String| ConfigError {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        toml::from_str(&text).map_err(|e| err(e.to_string()))
    }
}
