//! Shared by the server's integration tests: start a server on a fresh port, speak HTTP and
//! WebSocket to it, read its events.
#![allow(dead_code)] // each test binary uses its own subset

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tether::{ClientStream, Message, WebSocket};
use tether_server::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

pub mod v1;

/// What a WebSocket of these helpers runs over: TCP, TLS, or a stream of an HTTP/2
/// connection.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Io for T {}

pub const LIMIT: Duration = Duration::from_secs(15);

pub async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.expect("timed out")
}

pub struct Running {
    pub addr: SocketAddr,
    /// What the server runs on, for calls an embedding application makes.
    #[allow(dead_code)]
    pub node: std::sync::Arc<tether_server::node::Node>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        within(&mut self.done).await.unwrap();
    }

    pub fn ws(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }
}

pub fn config(data: &Path) -> ServerConfig {
    let mut c = ServerConfig::default();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.data = data.to_owned();
    c
}

/// Serves `config` over TLS: a private CA and a certificate for `localhost`, written into
/// `dir` as the PEM files an operator has. Returns a client configuration that trusts the CA.
pub fn with_tls(config: &mut ServerConfig, dir: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    config.tls_cert = Some(cert_path);
    config.tls_key = Some(key_path);
    tether::tls::client_config(ca.pem().as_bytes()).unwrap()
}

/// Starts a server; one on Redis is returned once `/healthz` says it hears Redis, as a load
/// balancer would wait.
pub async fn start(config: ServerConfig) -> Running {
    let on_redis = config.redis.is_some();
    let tls = config.tls_cert.is_some();
    let server = Server::bind(config).await.unwrap();
    let addr = server.local_addr().unwrap();
    let node = server.node();
    let (tx, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    if on_redis {
        within(async {
            while healthz(addr, tls).await != 200 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    Running {
        addr,
        node,
        stop: Some(tx),
        done,
    }
}

/// The status of `GET /healthz`, over TLS (any certificate) when `tls`.
async fn healthz(addr: SocketAddr, tls: bool) -> u16 {
    if !tls {
        return http(addr, "GET", "/healthz", &[], None).await.0;
    }
    let any = tether::tls::insecure_client_config().unwrap();
    https_get(addr, any, "/healthz").await[9..12]
        .parse()
        .unwrap()
}

/// `GET path` over TLS (HTTP/1.1, `Host: localhost`): the whole answer, head and body.
pub async fn https_get(
    addr: SocketAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
    path: &str,
) -> String {
    let connector = tokio_rustls::TlsConnector::from(tls);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = within(connector.connect(name, tcp)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    within(stream.read_to_string(&mut raw)).await.ok();
    raw
}

/// The engine a test's server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One process and its SQLite file.
    Embedded,
    /// A `redis-server` of the test's own (`--redis`).
    Redis,
}

/// Where a test's server keeps its state: a data directory, and for [`Kind::Redis`] a Redis.
pub struct Setup {
    dir: tempfile::TempDir,
    redis: Option<RedisServer>,
}

impl Setup {
    /// A fresh data directory, and a fresh Redis when `kind` asks for one.
    pub fn new(kind: Kind) -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
            redis: (kind == Kind::Redis).then(RedisServer::start),
        }
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The test configuration on this setup's storage.
    pub fn config(&self) -> ServerConfig {
        let mut c = config(self.path());
        if let Some(redis) = &self.redis {
            c.redis = Some(redis.url.clone());
            c.node = Some("test".into());
        }
        c
    }

    /// The accounts the server will use, opened as another process would (`tether user`).
    pub fn accounts(&self) -> Box<dyn tether_server::engine::Accounts> {
        use tether_server::engine::accounts::{RedisAccounts, SqliteAccounts};
        use tether_server::engine::Revocations;
        match &self.redis {
            None => {
                let store = tether_server::engine::store::Store::open(self.path()).unwrap();
                let db = tether_server::engine::store::Db::new(store).unwrap();
                Box::new(SqliteAccounts::new(db, Revocations::default()))
            }
            Some(redis) => Box::new(
                RedisAccounts::connect(&redis.url, 0, "test setup".into(), Revocations::default())
                    .unwrap(),
            ),
        }
    }

    /// Stores what `fill` writes into the SQLite store in the directory it is given, where
    /// the server will find it: in the data directory itself, or for Redis in a scratch store
    /// then imported into Redis (`tether import`), as a deployment that grew from one node
    /// has it. Call it first: an import goes into an empty Redis only.
    pub async fn seed(&self, fill: impl FnOnce(&Path)) {
        match &self.redis {
            None => fill(self.path()),
            Some(redis) => {
                let scratch = tempfile::tempdir().unwrap();
                fill(scratch.path());
                let store = tether_server::engine::store::Store::open(scratch.path()).unwrap();
                tether_server::engine::import::sqlite_into_redis(&store, &redis.url, 0)
                    .await
                    .unwrap();
            }
        }
    }

    /// Adds a user where the server will look for it.
    pub async fn add_user(&self, name: &str, password: &str) {
        let hash = tether_server::identity::auth::hash_password(password).unwrap();
        self.accounts().add_user(name, &hash).await.unwrap();
    }
}

/// Runs each named test, an `async fn(Kind)`, once on each engine: `NAME::embedded` and
/// `NAME::redis`. One body for both, so that the Redis engine cannot drift from the embedded one.
/// `multi_thread:` before the names runs them on two worker threads.
#[macro_export]
macro_rules! on_both_engines {
    (multi_thread: $($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name($crate::common::Kind::Embedded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name($crate::common::Kind::Redis).await
            }
        }
    )*};
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn embedded() {
                super::$name($crate::common::Kind::Embedded).await
            }
            #[tokio::test]
            async fn redis() {
                super::$name($crate::common::Kind::Redis).await
            }
        }
    )*};
}

/// A minimal HTTP/1.1 exchange: returns the status and the parsed JSON body (Null if none).
/// A POST declares its body JSON unless `headers` name another `Content-Type`.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let (status, _, body) =
        http_from([127, 0, 0, 1].into(), addr, method, path, headers, body).await;
    (status, body)
}

/// [`http`] from the local address `source` (any of 127.0.0.0/8); also returns the head.
pub async fn http_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, String, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    let typed = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    if method == "POST" && !typed {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut tcp = within(socket.connect(addr)).await.unwrap();
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    within(tcp.read_to_end(&mut raw)).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    let status = text[9..12].parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        status,
        head.to_owned(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

pub async fn add_user(data: &Path, name: &str, password: &str) {
    let hash = tether_server::identity::auth::hash_password(password).unwrap();
    tether_server::engine::store::Store::open(data)
        .unwrap()
        .add_user(name, &hash)
        .unwrap();
}

pub async fn token(addr: SocketAddr, user: &str, password: &str) -> String {
    let (status, body) = http(
        addr,
        "POST",
        "/api/tokens",
        &[],
        Some(json!({"user": user, "password": password})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

pub async fn connect(url: &str) -> ClientStream {
    within(tether::connect(url)).await.unwrap().0
}

/// The next JSON event, skipping nothing.
pub async fn next<S: Io>(ws: &mut WebSocket<S>) -> Value {
    loop {
        match within(ws.recv()).await {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

/// The next event of `kind`, skipping others (presence and the like).
pub async fn next_of<S: Io>(ws: &mut WebSocket<S>, kind: &str) -> Value {
    loop {
        let v = next(ws).await;
        if v["type"] == kind {
            return v;
        }
    }
}

pub async fn say<S: Io>(ws: &mut WebSocket<S>, text: &str) {
    ws.send(Message::text(json!({"text": text}).to_string()))
        .await
        .unwrap();
}

/// The close code the server ends with.
pub async fn close_code<S: Io>(ws: &mut WebSocket<S>) -> u16 {
    loop {
        match within(ws.recv()).await {
            Some(Ok(Message::Close(frame))) => return frame.map_or(1005, |f| f.code.0),
            Some(Ok(_)) => {}
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

/// Reads what is left of a connection: the code of the Close it ends with, or `None` when
/// the transport was cut first.
pub async fn last_close_code<S: Io>(ws: &mut WebSocket<S>) -> Option<u16> {
    let mut code = None;
    while let Some(msg) = within(ws.recv()).await {
        match msg {
            Ok(Message::Close(f)) => code = f.map(|f| f.code.0),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    code
}

pub async fn http_text(addr: SocketAddr, path: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    within(tcp.read_to_string(&mut raw)).await.unwrap();
    raw
}

/// Opens a WebSocket on `path` by hand (a receive buffer of `recv_buffer` bytes when given),
/// reads the 101 and nothing more: the raw stream, for a peer that misbehaves.
pub async fn raw_upgrade(
    addr: SocketAddr,
    path: &str,
    recv_buffer: Option<u32>,
) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let mut tcp = within(socket.connect(addr)).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        within(tcp.read_exact(&mut byte)).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// This process's resident set size, in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Connects as a new guest (no cookie); returns the socket and the guest cookie the server set
/// (`tether_guest=…`), to send again as a browser would.
pub async fn connect_guest(url: &str) -> (ClientStream, String) {
    let (ws, response) = within(tether::connect(url)).await.unwrap();
    let cookie = response
        .headers
        .get_str("set-cookie")
        .expect("a guest cookie")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    (ws, cookie)
}

/// Connects sending `cookie`.
pub async fn connect_with_cookie(url: &str, cookie: &str) -> ClientStream {
    let builder = tether::ClientBuilder::new(url)
        .unwrap()
        .header("Cookie", cookie);
    within(builder.connect()).await.unwrap().0
}

/// Asserts `event` is a `ready` at `last_id`, with an epoch (16 hex digits).
pub fn assert_ready(event: &Value, last_id: u64) {
    assert_eq!(
        (&event["type"], event["last_id"].as_u64()),
        (&serde_json::json!("ready"), Some(last_id)),
        "{event}"
    );
    let epoch = event["epoch"].as_str().unwrap_or_default();
    assert!(
        epoch.len() == 16 && epoch.bytes().all(|b| b.is_ascii_hexdigit()),
        "{event}"
    );
}

/// The value of metric `name` in the `/metrics` text.
#[allow(dead_code)]
pub fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name}"))
        .parse()
        .unwrap()
}

/// A `redis-server` of the test's own on a free loopback port, keeping nothing on disk;
/// killed when dropped. Needs `redis-server` on the PATH (scripts/test installs Debian's).
pub struct RedisServer {
    child: std::process::Child,
    /// `redis://127.0.0.1:PORT/`.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one and waits until it accepts connections.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is needed (apt-get install redis-server)");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < LIMIT, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
            _dir: dir,
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
