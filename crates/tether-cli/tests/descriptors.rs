//! `tether serve` under a low open-file limit: its connection caps are derived from the limit,
//! so a flood of connections is answered 503 instead of exhausting the descriptors, `/healthz`
//! answers throughout, and the server recovers once the flood leaves.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_tether");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects from `source` (any of 127.0.0.0/8).
async fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.into(), 0)).unwrap();
    tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
        .await
        .expect("connect timed out")
        .unwrap()
}

/// `GET /healthz` on a new connection; the status, or `None` without an answer in 5 s.
async fn healthz(source: Ipv4Addr, addr: SocketAddr) -> Option<u16> {
    let mut tcp = connect_from(source, addr).await;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

#[tokio::test]
async fn a_flood_under_a_low_descriptor_limit_is_answered_503_and_health_stays_reachable() {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new("bash")
        .arg("-c")
        .arg("ulimit -n 256 && exec \"$0\" serve --listen 127.0.0.1:0 --data \"$1\"")
        .arg(BIN)
        .arg(data.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on http://")
        .expect(&line)
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let server = Proc(child);

    // 400 idle connections from 20 addresses: more than the process has descriptors for.
    let mut flood = Vec::new();
    for i in 0..400u32 {
        let source = Ipv4Addr::new(127, 0, 1, 1 + (i % 20) as u8);
        flood.push(connect_from(source, addr).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = healthz(Ipv4Addr::new(127, 0, 2, 1), addr).await;
    assert!(
        matches!(during, Some(200 | 503)),
        "health must answer during the flood: {during:?}"
    );

    drop(flood);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(healthz(Ipv4Addr::new(127, 0, 2, 1), addr).await, Some(200));
    drop(server);
    let log = log.lock().unwrap();
    assert!(
        log.iter().any(|l| l.contains("caps lowered to fit")),
        "the lowered caps are logged: {log:?}"
    );
    let failures = log.iter().filter(|l| l.contains("accept failed")).count();
    assert_eq!(failures, 0, "descriptors never ran out: {log:?}");
}
