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
    let reader = std::thread::spawn(move || {
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
    // While the flood is held, health answers (200, or 503 when the HTTP cap is full). A probe
    // that lands in a burst of refusals the server is still working through may go
    // unanswered: the next one, once the server has caught up, must not.
    let during = until(|| async {
        let status = healthz(Ipv4Addr::new(127, 0, 2, 1), addr).await;
        matches!(status, Some(200 | 503)).then_some(status)
    })
    .await;
    assert!(
        during.is_some(),
        "health must answer during the flood: {during:?}"
    );

    // Once the flood leaves, the server gives its places back and is healthy again.
    drop(flood);
    let after = until(|| async {
        let status = healthz(Ipv4Addr::new(127, 0, 2, 1), addr).await;
        (status == Some(200)).then_some(status)
    })
    .await;
    assert_eq!(after, Some(Some(200)), "health did not recover");
    drop(server);
    // The server's stderr is closed with it: everything it logged is read.
    reader.join().unwrap();
    let log = log.lock().unwrap();
    assert!(
        log.iter().any(|l| l.contains("caps lowered to fit")),
        "the lowered caps are logged: {log:?}"
    );
    let failures = log.iter().filter(|l| l.contains("accept failed")).count();
    assert_eq!(failures, 0, "descriptors never ran out: {log:?}");
}

/// Runs `probe` until it gives `Some`, for at most 20 s; its last answer.
async fn until<T, F, Fut>(mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(found) = probe().await {
            return Some(found);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
