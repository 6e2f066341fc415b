//! The accept loop: TLS (optional), HTTP/1.1 with upgrades and HTTP/2 with extended CONNECT,
//! limits, graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::config::ServerConfig;
use crate::endpoints::http::{precheck, router, PeerAddr};
use crate::engine::journal::Journal;
use crate::engine::store::Db;
use crate::engine::store::{Store, StoreError};
use crate::metrics::Metrics;
use crate::node::gate::{Full, Gate, Pass, Streams};
use crate::node::hub::Hub;
use crate::node::rooms::Rooms;
use crate::node::Node;
use crate::proxy::{client_address, is_trusted};

/// Starting or running the server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Binding the address failed.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// A `trusted_proxies` entry is not an address or address block.
    #[error("trusted_proxies: {0}")]
    TrustedProxy(#[from] crate::proxy::CidrError),
    /// Another I/O failure (spawning the journal thread, …).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A bound server, ready to run.
pub struct Server {
    node: Arc<Node>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
}

fn tls_acceptor(config: &ServerConfig) -> Result<Option<TlsAcceptor>, ServerError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = match (&config.tls_cert, &config.tls_key) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        _ => return Err(ServerError::Tls("give both a certificate and a key".into())),
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ServerError::Tls(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ServerError::Tls(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    tls.alpn_protocols = if config.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Some(TlsAcceptor::from(Arc::new(tls))))
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the store, starts the journal and binds the address.
    ///
    /// # Errors
    /// The store, the TLS files or the address.
    pub async fn bind(mut config: ServerConfig) -> Result<Server, ServerError> {
        fit_to_descriptors(&mut config);
        let trusted_proxies = config
            .trusted_proxies
            .iter()
            .map(|c| c.parse())
            .collect::<Result<Vec<crate::proxy::Cidr>, _>>()?;
        let tls = tls_acceptor(&config)?;
        // Bound before the store is opened: a taken port leaves no data directory behind.
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let metrics = Arc::new(Metrics::default());
        let hub = Hub::new(config.outbox, metrics.clone());
        let rooms = Rooms::new(hub);
        let open = || {
            let store = Store::open(&config.data)?;
            store.limit_size(config.max_database_mb.saturating_mul(1 << 20))?;
            Ok::<_, crate::engine::store::StoreError>(store)
        };
        let room_quota = Arc::new(crate::throttle::Throttle::new(
            config.rooms_per_hour,
            Duration::from_secs(3600) / config.rooms_per_hour.max(1),
            100_000,
        ));
        let journal = Journal::start(
            open()?,
            rooms.clone(),
            metrics.clone(),
            config.history_limit,
            config.max_rooms,
            room_quota.clone(),
        )?;
        let store = open()?;
        let db = Db::new(store)?;
        let ws_config = tether::Config::default()
            .max_message_size(config.max_message_size)
            .max_frame_size(config.max_message_size)
            // A message in fragments of 16 bytes; more frames for one message is a peer
            // keeping it open on purpose (1009).
            .max_message_fragments(
                u32::try_from(config.max_message_size / 16)
                    .unwrap_or(u32::MAX)
                    .max(64),
            )
            .ping_interval(Some(config.ping_interval))
            .ping_timeout(config.pong_timeout)
            // Sessions keep their own write deadline (`config.write_timeout`), which counts
            // and logs the clients it drops.
            .write_timeout(None)
            // Pages this server serves, and the origins the configuration lists.
            .allowed_origins(Some(config.allow_origins.clone()))
            .same_origin_scheme(Some(if tls.is_some() { "https" } else { "http" }.into()))
            .deflate(config.deflate.then(|| {
                // Every message compressed from a fresh state: fan-out compresses it once for
                // all subscribers (tether::Prepared), and idle connections hold no compressor.
                tether::proto::extension::deflate::DeflateConfig::default()
                    .server_no_context_takeover(true)
                    .client_no_context_takeover(true)
            }));
        // The one place that chooses the engine.
        let revocations = crate::engine::Revocations::default();
        let (engine, cluster) = match &config.redis {
            Some(url) => {
                let node = config.node.clone().unwrap_or_else(default_node_name);
                tracing::info!(%node, "joining the cluster through redis");
                let link = crate::engine::link::Link::open(url, Duration::from_secs(2))
                    .map_err(|e| StoreError::Failed(format!("the redis setting: {e}")))?
                    .confirmed_by(config.redis_replicas);
                let accounts = crate::engine::accounts::RedisAccounts::new(
                    link.clone(),
                    node.clone(),
                    revocations.clone(),
                );
                let cluster = crate::engine::redis::Cluster::start(
                    link,
                    node,
                    rooms.clone(),
                    metrics.clone(),
                    config.history_limit,
                    config.max_rooms,
                    room_quota.clone(),
                    revocations.clone(),
                );
                let engine = crate::engine::Engine::redis(cluster.clone(), accounts, revocations);
                (engine, Some(cluster))
            }
            None => {
                let engine = crate::engine::Engine::embedded(
                    db.clone(),
                    journal.clone(),
                    rooms.clone(),
                    revocations,
                );
                (engine, None)
            }
        };
        let bounded = engine
            .accounts
            .bound_token_lifetimes(config.token_lifetime)
            .await?;
        if bounded > 0 {
            tracing::info!(
                tokens = bounded,
                lifetime = %crate::config::format_duration(config.token_lifetime),
                "tokens without an expiry now expire"
            );
        }
        let node = Node::new(
            config,
            ws_config,
            rooms,
            metrics,
            tls.is_some(),
            engine,
            trusted_proxies,
            room_quota,
        )?;
        if let Some(cluster) = &cluster {
            cluster.follow_nicknames(node.nicknames.clone());
        }
        Ok(Server {
            node,
            listener,
            tls,
        })
    }

    /// The bound address.
    ///
    /// # Errors
    /// The socket cannot tell.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The node it serves: what an application embedding the server calls (publish,
    /// presence, disconnect a user, …) while it runs.
    pub fn node(&self) -> Arc<Node> {
        self.node.clone()
    }

    /// The server's base URL, `http://ADDR/` or `https://ADDR/`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        match self.local_addr() {
            Ok(addr) => format!("{scheme}://{addr}/"),
            Err(_) => format!("{scheme}://{}/", self.node.config.listen),
        }
    }

    /// Serves until `signal` completes, then shuts down: stops accepting, closes every socket
    /// with 1001, waits for them (at most the configured deadline) and for the journal to
    /// store what it holds.
    pub async fn run(self, signal: impl Future<Output = ()>) {
        let Server {
            node,
            listener,
            tls,
        } = self;
        let router = router(node.clone());
        let http = Gate::new(
            node.config.max_http_connections,
            node.config.max_http_connections_per_ip,
        );
        let refusals = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
        let mut failures = 0u32;
        tokio::pin!(signal);
        loop {
            tokio::select! {
                () = &mut signal => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if failures > 0 {
                            tracing::info!(failures, "accepting connections again");
                            failures = 0;
                        }
                        // A trusted proxy carries many clients: it counts in the total only.
                        let counted = (!is_trusted(&node.trusted_proxies, peer.ip())).then_some(peer.ip());
                        match http.enter(counted) {
                            Ok(pass) => {
                                let router = router.clone();
                                let tls = tls.clone();
                                tokio::spawn(connection(stream, peer, tls, node.clone(), router, pass));
                            }
                            Err(full) => refuse_connection(stream, peer, full, tls.is_none(), &refusals),
                        }
                    }
                    Err(e) => {
                        // Out of file descriptors or similar: back off (10 ms doubling to 1 s)
                        // instead of spinning, and say so once per burst.
                        failures += 1;
                        if failures == 1 {
                            tracing::warn!(error = %e, "accept failed: backing off until it succeeds");
                        }
                        let delay = Duration::from_millis((10u64 << failures.min(7)).min(1000));
                        tokio::time::sleep(delay).await;
                    }
                },
            }
        }
        drop(listener);
        tracing::info!(
            connections = node.metrics.connections.load(Relaxed),
            "shutting down: closing sockets with 1001"
        );
        node.begin_shutdown();
        let deadline = tokio::time::Instant::now() + node.config.shutdown_timeout;
        while node.metrics.connections.load(Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = node.metrics.connections.load(Relaxed);
        if left > 0 {
            tracing::warn!(left, "shutdown deadline passed with sockets still open");
        }
        node.flush().await;
        tracing::info!("stopped");
    }
}

/// Connections refused with a canned answer at once; past it, refused ones are just closed.
const REFUSALS_AT_ONCE: usize = 64;

/// Descriptors kept, whatever the connections take: the refusals being answered, and the
/// process's own (listener, database and its journal files, Redis, logs, the runtime).
const DESCRIPTOR_RESERVE: usize = REFUSALS_AT_ONCE + 64;

/// Lowers the connection caps to what the open-file limit allows, keeping
/// [`DESCRIPTOR_RESERVE`] descriptors free: a quarter of the rest for plain HTTP, the remainder
/// for WebSocket connections. Running out of descriptors then means answering 503, not failing
/// to accept.
fn fit_to_descriptors(config: &mut ServerConfig) {
    use nix::sys::resource::{getrlimit, Resource};
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let budget = usize::try_from(soft)
        .unwrap_or(usize::MAX)
        .saturating_sub(DESCRIPTOR_RESERVE)
        .max(8);
    let http = config.max_http_connections.min(budget / 4).max(1);
    let sockets = config
        .max_connections
        .min(budget.saturating_sub(http))
        .max(1);
    if http < config.max_http_connections || sockets < config.max_connections {
        tracing::warn!(
            open_files = soft,
            max_connections = sockets,
            max_http_connections = http,
            "the open-file limit is lower than the configured connections: caps lowered to fit"
        );
    }
    config.max_http_connections = http;
    config.max_connections = sockets;
}

/// Answers a connection over the HTTP caps with a canned 503 (all full) or 429 (its address
/// has its share) on plain ports, and closes it; never waits on it for more than a second.
fn refuse_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    full: Full,
    plain: bool,
    refusals: &Arc<Semaphore>,
) {
    tracing::debug!(%peer, ?full, "HTTP connection refused: over the cap");
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        return; // dropped: closed at once
    };
    if !plain {
        return;
    }
    let (status, reason) = match full {
        Full::Total => ("503 Service Unavailable", "too many connections"),
        Full::Address => (
            "429 Too Many Requests",
            "too many connections from this address",
        ),
    };
    let body = format!("{{\"error\":\"{reason}\"}}");
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nRetry-After: 1\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        let _ =
            tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer.as_bytes())).await;
        drop(permit);
    });
}

fn default_node_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "node".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Serves one TCP connection; `_pass` holds its place among the HTTP connections until it
/// ends or is upgraded (a WebSocket then holds a place of its own).
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    node: Arc<Node>,
    router: axum::Router,
    _pass: Pass,
) {
    let _ = stream.set_nodelay(true);
    if node.config.send_buffer > 0 {
        // Fixed, so that a client that never reads holds this much kernel memory at most.
        let _ = nix::sys::socket::setsockopt(
            &stream,
            nix::sys::socket::sockopt::SndBuf,
            &node.config.send_buffer,
        );
    }
    match tls {
        Some(acceptor) => {
            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    let versions = if h2 { Versions::Http2 } else { Versions::Http1 };
                    serve_http(stream, peer, node, router, versions).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
        None => {
            let versions = if node.config.h2c {
                match sniff_version(&stream).await {
                    Some(versions) => versions,
                    None => {
                        tracing::debug!(%peer, "no request in time");
                        return;
                    }
                }
            } else {
                Versions::Http1
            };
            serve_http(stream, peer, node, router, versions).await;
        }
    }
}

/// The HTTP version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Versions {
    /// HTTP/1.1 (and 1.0).
    Http1,
    /// HTTP/2: chosen by ALPN, or its preface on a cleartext port with h2c on.
    Http2,
}

/// Flow-control window of one HTTP/2 stream: what a peer may send on it before the server
/// reads it. A WebSocket reads as it goes, so this bounds what waits unread per stream.
const H2_STREAM_WINDOW: u32 = 256 << 10;
/// Flow-control window of a whole HTTP/2 connection: what waits unread on all its streams.
const H2_CONNECTION_WINDOW: u32 = 1 << 20;
/// What the server buffers for one HTTP/2 stream that its peer does not take (the peer's
/// window is the peer's to choose, so it bounds nothing): past it, the stream's writer waits,
/// and a WebSocket's write deadline ends it.
const H2_SEND_BUFFER: usize = 64 << 10;
/// Streams a peer may open and reset before the server answers them (rapid reset,
/// CVE-2023-44487): past it, the connection ends with `ENHANCE_YOUR_CALM`.
const H2_PENDING_RESETS: usize = 20;
/// Streams the server may reset for a peer's errors before it ends the connection.
const H2_ERROR_RESETS: usize = 256;
/// Largest header list (HPACK-decoded) an HTTP/2 request may carry.
const H2_MAX_HEADER_LIST: u32 = 64 << 10;

/// The HTTP/2 server of one connection, extended CONNECT (RFC 8441) allowed, with its limits.
fn http2_builder(config: &ServerConfig) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(config.http2_max_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_SEND_BUFFER)
        .max_pending_accept_reset_streams(H2_PENDING_RESETS)
        .max_local_error_reset_streams(H2_ERROR_RESETS)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        // A peer gone without a word: pinged, and dropped when it does not answer.
        .keep_alive_interval(config.ping_interval)
        .keep_alive_timeout(config.pong_timeout);
    builder
}

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4); no HTTP/1 request starts so.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells a cleartext connection's HTTP version from its first bytes, without consuming them:
/// HTTP/2 when they are its preface. A peer that sends too little for as long as a request
/// head may take is dropped (`None`).
async fn sniff_version(stream: &TcpStream) -> Option<Versions> {
    let sniff = async {
        let mut first = [0u8; H2_PREFACE.len()];
        loop {
            let n = stream.peek(&mut first).await.ok()?;
            if n == 0 {
                return None;
            }
            if first[..n] != H2_PREFACE[..n] {
                return Some(Versions::Http1);
            }
            if n == H2_PREFACE.len() {
                return Some(Versions::Http2);
            }
            // Part of the preface: the rest is on its way (peeking again at once would see the
            // same bytes).
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(HEADER_READ_TIMEOUT, sniff)
        .await
        .ok()
        .flatten()
}

/// Serves an HTTP/2 connection until it ends, closing it gracefully (`GOAWAY`, then the end
/// once nothing is in flight) when it carried no stream for between `idle` and twice that.
async fn until_idle<I, S, B>(
    connection: hyper::server::conn::http2::Connection<I, S, TokioExecutor>,
    streams: &Streams,
    idle: Duration,
) -> hyper::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    tokio::pin!(connection);
    let mut last = streams.usage().1;
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => return result,
            () = tokio::time::sleep(idle), if !closing => {
                let (open, opened) = streams.usage();
                if open == 0 && opened == last {
                    tracing::debug!(?idle, "HTTP/2 connection idle: closing it");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                last = opened;
            }
        }
    }
}

/// Time a client may take to send a request head, or its first bytes.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve_http<S>(
    stream: S,
    peer: SocketAddr,
    node: Arc<Node>,
    router: axum::Router,
    versions: Versions,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http2 = (versions == Versions::Http2).then(|| http2_builder(&node.config));
    node.metrics.http_connections_total.fetch_add(1, Relaxed);
    if http2.is_some() {
        node.metrics.http2_connections_total.fetch_add(1, Relaxed);
    }
    let streams = Arc::new(Streams::default());
    let counted = http2.is_some().then(|| streams.clone());
    let idle = node.config.http2_idle_timeout;
    let service = hyper::service::service_fn(
        move |mut req: hyper::Request<hyper::body::Incoming>| {
            let client = client_address(&node.trusted_proxies, peer.ip(), req.headers());
            req.extensions_mut()
                .insert(PeerAddr(SocketAddr::new(client, peer.port())));
            // In use while the request is answered, and for as long as a WebSocket it opens
            // lasts (the upgrade takes it from the request).
            if let Some(streams) = &counted {
                req.extensions_mut().insert(Arc::new(streams.enter()));
            }
            let checked = precheck(&node, req.method(), req.headers());
            let mut router = router.clone();
            let timeout = node.config.request_timeout;
            async move {
                match checked {
                    None => {
                        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
                        let answer = tokio::time::timeout(
                            timeout,
                            tower_service::Service::call(&mut router, req),
                        );
                        match answer.await {
                            Ok(answered) => answered,
                            Err(_) => {
                                tracing::info!(%peer, %method, path, ?timeout, "request timed out");
                                Ok(crate::endpoints::http::error(
                                    StatusCode::REQUEST_TIMEOUT,
                                    "the request took too long",
                                ))
                            }
                        }
                    }
                    Some(refused) => {
                        tracing::info!(%peer, status = refused.status().as_u16(), method = %req.method(), path = req.uri().path(), "request refused before routing");
                        Ok(refused)
                    }
                }
            }
        },
    );
    let result = match http2 {
        // Extended CONNECTs are upgraded without asking: each takes one stream.
        Some(builder) => {
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            until_idle(connection, &streams, idle).await
        }
        None => {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(64 << 10)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}
