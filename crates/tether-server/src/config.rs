//! The server's settings: one type, [`ServerConfig`], whose every field has an embedded
//! default, a TOML key of the same name, a `tether serve` flag and a `TETHER_…` variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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

/// A span of time as people write it: `30s`, `5m`, `1h 30m`, `7days` (humantime's
/// spelling); a bare number counts seconds.
///
/// ```
/// use std::time::Duration;
/// use tether_server::config::parse_duration;
/// assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
/// assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
/// assert!(parse_duration("soon").is_err());
/// ```
///
/// # Errors
/// A message naming the text and the spelling expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?}: {e}; write a duration as 30s, 5m, 2h or 7days"))
}

/// A duration in the largest unit that holds it whole (`90d`, `36h`, `30s`, `250ms`), which
/// [`parse_duration`] reads back.
///
/// ```
/// use std::time::Duration;
/// use tether_server::config::format_duration;
/// assert_eq!(format_duration(Duration::from_secs(90 * 86_400)), "90d");
/// assert_eq!(format_duration(Duration::from_secs(90)), "90s");
/// assert_eq!(format_duration(Duration::from_secs(120)), "2m");
/// assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
/// ```
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() != 0 {
        if d.subsec_nanos() % 1_000_000 == 0 {
            return format!("{}ms", d.as_millis());
        }
        return format!("{}ns", d.as_nanos());
    }
    let secs = d.as_secs();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs != 0 && secs % size == 0 {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

/// Durations in a config file: a string in [`parse_duration`]'s spelling, or a number of
/// seconds; written back in humantime's spelling.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            Seconds(u64),
            Words(String),
        }
        match Text::deserialize(d)? {
            Text::Seconds(secs) => Ok(Duration::from_secs(secs)),
            Text::Words(text) => super::parse_duration(&text).map_err(serde::de::Error::custom),
        }
    }
}

/// What a server does, with defaults for one machine and no external service.
///
/// This one type is every way to set it: a TOML file's keys are its field names, each field is
/// a `tether serve` flag (`history_limit` is `--history-limit`) and reads the environment
/// variable `TETHER_` and its name in capitals (`TETHER_HISTORY_LIMIT`). The defaults are the
/// flags' defaults, shown by `tether serve --help`; [`ServerConfig::layered`] puts the layers
/// together.
///
/// ```
/// let config: tether_server::ServerConfig =
///     toml::from_str("listen = \"0.0.0.0:9000\"\nguests = false\nwrite_timeout = \"1m\"").unwrap();
/// assert_eq!(config.listen.port(), 9000);
/// assert!(!config.guests);
/// assert_eq!(config.write_timeout.as_secs(), 60);
/// assert_eq!(config.history_on_join, 50);
/// ```
#[derive(Debug, Clone, Deserialize, Serialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Address to listen on: `PORT` (on 127.0.0.1), `:PORT` (every interface), `HOST:PORT`
    /// (an address or a name) or `[IPv6]:PORT`; port 0 picks a free one.
    #[arg(long, env = "TETHER_LISTEN", value_name = "ADDR", default_value = "127.0.0.1:8080", value_parser = parse_listen)]
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    /// Directory of the SQLite file `tether.db`.
    #[arg(
        long,
        env = "TETHER_DATA",
        value_name = "DIR",
        default_value = "tether-data"
    )]
    pub data: PathBuf,
    /// PEM certificate chain; with `tls_key`, the port speaks `https://` and `wss://`.
    #[arg(long, env = "TETHER_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    #[arg(long, env = "TETHER_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Origins allowed to open sockets besides the server's own (`scheme://host[:port]`;
    /// the flag repeats, the variable separates them with commas).
    #[arg(
        long = "allow-origin",
        visible_alias = "allow-origins",
        env = "TETHER_ALLOW_ORIGINS",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    pub allow_origins: Vec<String>,
    /// Reverse proxies (`ADDR` or `ADDR/LEN`) whose `Forwarded` / `X-Forwarded-For` name the
    /// client, whose address then counts for every per-address limit; with none, the headers
    /// are ignored.
    #[arg(
        long = "trusted-proxy",
        visible_alias = "trusted-proxies",
        env = "TETHER_TRUSTED_PROXIES",
        value_name = "ADDR[/LEN]",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<String>,
    /// Whether guests (a `?name=` nickname, no login) may chat and vote (`--guests false`
    /// refuses them).
    #[arg(long, env = "TETHER_GUESTS", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub guests: bool,
    /// Messages kept per room; older ones are deleted.
    #[arg(
        long,
        env = "TETHER_HISTORY_LIMIT",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub history_limit: usize,
    /// Messages sent to a client that joins without `since`.
    #[arg(
        long,
        env = "TETHER_HISTORY_ON_JOIN",
        value_name = "N",
        default_value_t = 50
    )]
    pub history_on_join: usize,
    /// Most messages replayed to a client resuming with `since`; older ones are skipped and
    /// the welcome says `truncated`.
    #[arg(
        long,
        env = "TETHER_MAX_REPLAY",
        value_name = "N",
        default_value_t = 1000
    )]
    pub max_replay: usize,
    /// Rooms with stored messages at most; a message that would start another is refused (an
    /// `error` event, 403 from the API).
    #[arg(
        long,
        env = "TETHER_MAX_ROOMS",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub max_rooms: usize,
    /// Rooms one identity (a user, or a guest's address) may start per hour, in bursts of as
    /// many; past it a message that would start another is refused (403, an `error` event).
    #[arg(
        long,
        env = "TETHER_ROOMS_PER_HOUR",
        value_name = "N",
        default_value_t = 20
    )]
    pub rooms_per_hour: u32,
    /// Size of `tether.db` at most, in MiB (0: no cap); past it writes fail as on a full disk
    /// and `/healthz` says `"storage":"failing"`.
    #[arg(
        long,
        env = "TETHER_MAX_DATABASE_MB",
        value_name = "MIB",
        default_value_t = 4096
    )]
    pub max_database_mb: u64,
    /// Largest chat message text, in bytes.
    #[arg(
        long,
        env = "TETHER_MAX_TEXT",
        value_name = "BYTES",
        default_value_t = 4096
    )]
    pub max_text: usize,
    /// Largest WebSocket message (and frame) a client may send, in bytes; larger closes the
    /// connection with 1009.
    #[arg(long, env = "TETHER_MAX_MESSAGE_SIZE", value_name = "BYTES", default_value_t = 64 << 10)]
    pub max_message_size: usize,
    /// Most WebSocket connections at once; more are answered 503.
    #[arg(
        long,
        env = "TETHER_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub max_connections: usize,
    /// Most WebSocket connections from one address (IPv6: its /64); more are answered 429.
    #[arg(
        long,
        env = "TETHER_MAX_CONNECTIONS_PER_IP",
        value_name = "N",
        default_value_t = 1000
    )]
    pub max_connections_per_ip: usize,
    /// Plain HTTP connections at once (not counting upgraded ones); more are answered 503.
    /// This cap and `max_connections` are lowered to fit the open-file limit.
    #[arg(
        long,
        env = "TETHER_MAX_HTTP_CONNECTIONS",
        value_name = "N",
        default_value_t = 1024
    )]
    pub max_http_connections: usize,
    /// Plain HTTP connections at once from one address (IPv6: its /64); more are answered 429.
    #[arg(
        long,
        env = "TETHER_MAX_HTTP_CONNECTIONS_PER_IP",
        value_name = "N",
        default_value_t = 64
    )]
    pub max_http_connections_per_ip: usize,
    /// Time a request may take from its head to the handler's answer, its body included;
    /// past it, 408.
    #[arg(long, env = "TETHER_REQUEST_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Messages per second a connection may send, in bursts of twice as many; past it the
    /// connection is closed with 1008.
    #[arg(
        long,
        env = "TETHER_MESSAGE_RATE",
        value_name = "PER_SECOND",
        default_value_t = 20.0
    )]
    pub message_rate: f64,
    /// Messages per second one identity (a user, or a guest's address) may send over all its
    /// sockets on every endpoint, chat, votes and typing, in bursts of twice as many; past it a
    /// message gets an `error` event (error 110 on `/ws`) and is neither stored nor relayed.
    #[arg(
        long,
        env = "TETHER_IDENTITY_MESSAGE_RATE",
        value_name = "PER_SECOND",
        default_value_t = 40
    )]
    pub identity_message_rate: u32,
    /// Events queued for one connection before it counts as a slow consumer and is closed
    /// with 1013.
    #[arg(long, env = "TETHER_OUTBOX", value_name = "N", default_value_t = 1024)]
    pub outbox: usize,
    /// Kernel send buffer of each connection, in bytes (Linux doubles it for its
    /// bookkeeping); 0 leaves it to the kernel, whose autotuning grows the buffer of a client
    /// that does not read to 4 MiB.
    #[arg(
        long,
        env = "TETHER_SEND_BUFFER",
        value_name = "BYTES",
        default_value_t = 128 << 10
    )]
    pub send_buffer: usize,
    /// Time a client may accept nothing of what the server writes to it (history, live
    /// events) before it is dropped.
    #[arg(long, env = "TETHER_WRITE_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// Keepalive: a ping after this long without anything from the client.
    #[arg(long, env = "TETHER_PING_INTERVAL", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    /// Keepalive: time a ping's pong may take; past it the connection closes with 1011.
    #[arg(long, env = "TETHER_PONG_TIMEOUT", value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub pong_timeout: Duration,
    /// Time shutdown waits for sockets to finish closing.
    #[arg(long, env = "TETHER_SHUTDOWN_TIMEOUT", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// Whether to accept permessage-deflate when a client offers it (`--deflate false`
    /// refuses it).
    #[arg(long, env = "TETHER_DEFLATE", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub deflate: bool,
    /// Whether TLS connections may speak HTTP/2 (ALPN `h2`, then `http/1.1`), WebSockets
    /// included as extended CONNECT streams (RFC 8441) sharing the page's connection
    /// (`--http2 false` offers HTTP/1.1 only).
    #[arg(long, env = "TETHER_HTTP2", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub http2: bool,
    /// Whether plain (cleartext) connections may speak HTTP/2 with prior knowledge (h2c),
    /// beside HTTP/1.1: for a proxy in front that speaks h2c, and for tests.
    #[arg(long, env = "TETHER_H2C", value_name = "BOOL", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub h2c: bool,
    /// Streams one HTTP/2 connection may have open at once, its WebSockets included; each
    /// WebSocket also counts in `max_connections` and `max_connections_per_ip`.
    #[arg(
        long,
        env = "TETHER_HTTP2_MAX_STREAMS",
        value_name = "N",
        default_value_t = 100
    )]
    pub http2_max_streams: u32,
    /// Time an HTTP/2 connection may carry no stream (no request, no WebSocket) before it is
    /// closed (`GOAWAY`), as an idle HTTP/1.1 connection is after 10 s.
    #[arg(long, env = "TETHER_HTTP2_IDLE_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub http2_idle_timeout: Duration,
    /// Whether fan-out writes to connections of the channel protocol that wait idle straight
    /// from its own thread, without waking each connection's task (`--direct-fanout false`
    /// wakes every one; plain HTTP/1.1 connections only: TLS and HTTP/2 always wake).
    #[arg(long, env = "TETHER_DIRECT_FANOUT", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub direct_fanout: bool,
    /// Lifetime of a login's session cookie.
    #[arg(long, env = "TETHER_SESSION_LIFETIME", value_name = "DURATION", default_value = "7d", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub session_lifetime: Duration,
    /// Lifetime of a bearer token.
    #[arg(long, env = "TETHER_TOKEN_LIFETIME", value_name = "DURATION", default_value = "90d", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub token_lifetime: Duration,
    /// How often an open connection checks that its session or token is still valid (revoked
    /// by `tether user revoke`, or expired); revocations through this server's API, or with
    /// `--redis` through any node or `tether user --redis`, are noticed at once.
    #[arg(long, env = "TETHER_CREDENTIAL_CHECK", value_name = "DURATION", default_value = "1m", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub credential_check: Duration,
    /// Threads that check passwords, each with one reused argon2 work area (19 MiB).
    #[arg(
        long,
        env = "TETHER_PASSWORD_THREADS",
        value_name = "N",
        default_value_t = 2
    )]
    pub password_threads: usize,
    /// Password checks that may wait for a thread; more logins at once are answered 503 with
    /// `Retry-After`.
    #[arg(
        long,
        env = "TETHER_PASSWORD_QUEUE",
        value_name = "N",
        default_value_t = 32
    )]
    pub password_queue: usize,
    /// Failed logins an address (IPv6: its /64) may make in a burst; it regains one every
    /// 10 s, and past it logins from there are answered 429 with `Retry-After`.
    #[arg(
        long,
        env = "TETHER_LOGIN_FAILURES_PER_ADDRESS",
        value_name = "N",
        default_value_t = 20
    )]
    pub login_failures_per_address: u32,
    /// Failed logins for one account from one address in a burst; it regains one a minute.
    /// Counted per address, so guessing from one place never locks the real user out from
    /// another.
    #[arg(
        long,
        env = "TETHER_LOGIN_FAILURES_PER_ACCOUNT",
        value_name = "N",
        default_value_t = 5
    )]
    pub login_failures_per_account: u32,
    /// Who may vote in polls: `everyone` (users, and guests one vote per guest, at most
    /// `guest_votes_per_address` guests per address and poll) or `users`.
    #[arg(long, env = "TETHER_POLL_VOTERS", value_name = "WHO", value_enum, default_value_t = Voters::Everyone)]
    pub poll_voters: Voters,
    /// Guests that may vote in one poll from one address (IPv6: its /64).
    #[arg(
        long,
        env = "TETHER_GUEST_VOTES_PER_ADDRESS",
        value_name = "N",
        default_value_t = 5
    )]
    pub guest_votes_per_address: u32,
    /// Polls one identity (a user, or a guest's address) may create per hour, in bursts of as
    /// many; more are answered 429 with `Retry-After`.
    #[arg(
        long,
        env = "TETHER_POLLS_PER_HOUR",
        value_name = "N",
        default_value_t = 10
    )]
    pub polls_per_hour: u32,
    /// Sessions and tokens one user may be issued per hour, in bursts of as many; more are
    /// answered 429.
    #[arg(
        long,
        env = "TETHER_CREDENTIALS_PER_HOUR",
        value_name = "N",
        default_value_t = 20
    )]
    pub credentials_per_hour: u32,
    /// Messages and broadcasts one user may publish per second through the HTTP API, in
    /// bursts of twice as many; more are answered 429.
    #[arg(
        long,
        env = "TETHER_API_PUBLISH_RATE",
        value_name = "PER_SECOND",
        default_value_t = 20
    )]
    pub api_publish_rate: u32,
    /// `redis://HOST:PORT/`: share rooms, history, presence, accounts and polls with other
    /// nodes through Redis (docs/scaling.md). Without it, one node with everything in SQLite.
    /// To follow a replica promoted after its master died, name the candidates
    /// (`redis://A:6379,redis://B:6379`: the one whose ROLE is master is used) or Redis
    /// Sentinel (`redis+sentinel://S1:26379,S2:26379/SERVICE`); for Redis Cluster, some of its
    /// masters (`redis+cluster://A:7000,B:7001`).
    #[arg(long, env = "TETHER_REDIS", value_name = "URL")]
    pub redis: Option<String>,
    /// Replicas that must hold a write (a message, a vote, an account change) before it is
    /// acknowledged (Redis `WAIT`, half a second at most, or the write is answered as
    /// unconfirmed). With 1 or more, a replica promoted after its master died has every
    /// write the clients were told of, and a message is heard and read only once replicas
    /// hold it (on Redis Cluster, its shard's replicas); with 0, the last writes before the
    /// failure may be lost (the nodes then start a new epoch). Every node uses the same
    /// value; `tether user` takes it too.
    #[arg(
        long,
        env = "TETHER_REDIS_REPLICAS",
        value_name = "N",
        default_value_t = 0
    )]
    pub redis_replicas: usize,
    /// This node's name among the others (by default its host name and process id).
    #[arg(long, env = "TETHER_NODE", value_name = "NAME")]
    pub node: Option<String>,
    /// Worker threads of `tether serve` (by default one per core).
    #[arg(long, env = "TETHER_THREADS", value_name = "N")]
    pub threads: Option<usize>,
}

impl Default for ServerConfig {
    /// The flags' defaults, whatever the environment says.
    fn default() -> Self {
        use clap::{Args as _, FromArgMatches as _};
        let command = ServerConfig::augment_args(clap::Command::new("defaults"))
            .no_binary_name(true)
            .mut_args(|arg| arg.env(None));
        let matches = command
            .try_get_matches_from(std::iter::empty::<&str>())
            .expect("every setting has a default or is optional");
        ServerConfig::from_arg_matches(&matches).expect("the defaults parse")
    }
}

/// Who may vote in polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Voters {
    /// Registered users, and guests (one vote per guest, a few guests per address).
    Everyone,
    /// Registered users only.
    Users,
}

/// A configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read, or is not TOML with the keys of [`ServerConfig`].
    #[error("config file {path}: {reason}")]
    File {
        /// The file as given.
        path: String,
        /// What is wrong, with the line where the TOML parser says.
        reason: String,
    },
    /// A setting's value cannot work.
    #[error("{0}")]
    Invalid(String),
}

impl ServerConfig {
    /// Reads a TOML file; keys it omits keep their defaults.
    ///
    /// # Errors
    /// The file cannot be read or is not valid TOML for this struct (unknown keys included).
    pub fn from_file(path: &std::path::Path) -> Result<ServerConfig, ConfigError> {
        let err = |reason: String| ConfigError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        toml::from_str(&text).map_err(|e| err(e.to_string()))
    }

    /// The settings a command line asks for, in layers: each setting from its flag, else its
    /// `TETHER_…` variable, else `file`, else its default. `matches` are those of a command
    /// that flattens [`ServerConfig`]'s arguments.
    ///
    /// ```
    /// use clap::{Args, FromArgMatches};
    /// use tether_server::ServerConfig;
    /// let command = ServerConfig::augment_args(clap::Command::new("serve"));
    /// let matches = command.get_matches_from(["serve", "--history-limit", "7"]);
    /// let config = ServerConfig::layered(&matches, None).unwrap();
    /// assert_eq!(config.history_limit, 7);
    /// ```
    ///
    /// # Errors
    /// The file cannot be used, or the result fails [`ServerConfig::check`].
    pub fn layered(
        matches: &clap::ArgMatches,
        file: Option<&std::path::Path>,
    ) -> Result<ServerConfig, ConfigError> {
        use clap::parser::ValueSource;
        use clap::FromArgMatches as _;
        let given = ServerConfig::from_arg_matches(matches)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let config = match file {
            None => given,
            Some(path) => {
                let invalid = |e: serde_json::Error| ConfigError::Invalid(e.to_string());
                let mut layers =
                    serde_json::to_value(ServerConfig::from_file(path)?).map_err(invalid)?;
                let serde_json::Value::Object(over) =
                    serde_json::to_value(&given).map_err(invalid)?
                else {
                    unreachable!("a struct serialises as an object");
                };
                for (key, value) in over {
                    if matches!(
                        matches.value_source(&key),
                        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                    ) {
                        layers[key.as_str()] = value;
                    }
                }
                serde_json::from_value(layers).map_err(invalid)?
            }
        };
        config.check()?;
        Ok(config)
    }

    /// Refuses settings that cannot work together: one of `tls_cert` and `tls_key` without
    /// the other, a zero keepalive interval or timeout.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`], naming the settings.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "tls_cert and tls_key go together: give both, or neither".into(),
            ));
        }
        for (name, value) in [
            ("request_timeout", self.request_timeout),
            ("write_timeout", self.write_timeout),
            ("ping_interval", self.ping_interval),
            ("pong_timeout", self.pong_timeout),
            ("credential_check", self.credential_check),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Invalid(format!("{name} must be more than 0s")));
            }
        }
        Ok(())
    }
}
