//! Shared by the CLI tests: the real `tether echo` binary on a free port, and in-process
//! servers that misbehave on purpose.

#![allow(dead_code)]

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

/// The `tether` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tether");

/// A running `tether echo`, killed (and reaped) when dropped, even when a test fails.
pub struct Echo {
    child: Child,
    /// The URL it printed: `ws://127.0.0.1:PORT/`.
    pub url: String,
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tether echo --port 0 EXTRA...` and waits for the address it prints.
pub fn start_echo(extra: &[&str]) -> Echo {
    spawn_echo(extra, None).0
}

/// Starts `tether echo` as [`start_echo`] does, logging what `filter` (`RUST_LOG`) lets
/// through to the pipe returned: read it, or the server stops once the pipe is full.
pub fn start_echo_logging(extra: &[&str], filter: &str) -> (Echo, std::process::ChildStderr) {
    let (echo, stderr) = spawn_echo(extra, Some(filter));
    (echo, stderr.expect("stderr is piped"))
}

fn spawn_echo(extra: &[&str], filter: Option<&str>) -> (Echo, Option<std::process::ChildStderr>) {
    let mut command = Command::new(BIN);
    command
        .args(["echo", "--port", "0", "--host", "127.0.0.1"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    match filter {
        Some(filter) => command.env("RUST_LOG", filter).stderr(Stdio::piped()),
        None => command.stderr(Stdio::null()),
    };
    let mut child = command.spawn().expect("start tether echo");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let stderr = child.stderr.take();
    (Echo { child, url }, stderr)
}

/// Runs `handler` for every WebSocket accepted on a fresh loopback port.
pub fn serve<F, Fut>(handler: F, config: tether::Config) -> std::net::SocketAddr
where
    F: Fn(tether::WebSocket<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let handler = std::sync::Arc::new(handler);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let handler = handler.clone();
                let config = config.clone();
                tokio::spawn(async move {
                    if let Ok(ws) = tether::accept_with_config(tcp, config).await {
                        handler(ws).await;
                    }
                });
            }
        });
    });
    addr
}

/// Runs `command` until it prints its first line on stdout, then kills it; returns the line.
pub fn first_line(command: &mut Command) -> String {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    line.trim().to_owned()
}

/// A blocking HTTP/1.1 exchange with `addr` (`HOST:PORT`): the status and the JSON body
/// (`Null` when it is not JSON).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    use std::io::Write as _;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    let auth = auth
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(tcp, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut raw = String::new();
    std::io::Read::read_to_string(&mut tcp, &mut raw).unwrap();
    let status = raw[9..12].parse().unwrap();
    let body = raw.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// A running `tether serve`, killed (and reaped) when dropped.
pub struct Serve {
    child: Child,
    /// `HOST:PORT` it listens on.
    pub addr: String,
}

impl Serve {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tether serve --listen 127.0.0.1:0 EXTRA...` and waits for the address it prints.
pub fn start_serve(extra: &[&str]) -> Serve {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tether serve");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .trim_end_matches('/')
        .to_owned();
    Serve { child, addr }
}

/// An address nothing listens on, and the socket that holds it (bound, not listening) so
/// that nothing else takes the port while a test expects its connections to be refused.
pub fn refusing_address() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}
