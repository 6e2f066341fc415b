//! Helpers shared by the socket tests: listeners on 127.0.0.1:0, a raw peer that speaks
//! WebSocket by hand (to misbehave on purpose), hyper's HTTP/2 client opening WebSockets with
//! extended CONNECTs (RFC 8441), and timeouts around every wait.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::client::conn::http2::SendRequest;
use hyper::ext::Protocol;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tether::{Config, Role, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every wait in these tests is bounded by this.
pub const LIMIT: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test if it takes longer than [`LIMIT`].
pub async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.expect("timed out")
}

/// A listener on a free loopback port.
pub async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// A client handshake request, as raw text.
pub fn request(addr: SocketAddr, extra: &str) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Connects and sends `req`; returns the stream and the response head.
pub async fn raw_exchange(addr: SocketAddr, req: &str) -> (TcpStream, String) {
    raw_exchange_bytes(addr, req.as_bytes()).await
}

/// Connects and sends `bytes` (a request, and perhaps more behind it); returns the stream
/// and the response head.
pub async fn raw_exchange_bytes(addr: SocketAddr, bytes: &[u8]) -> (TcpStream, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    (tcp, String::from_utf8_lossy(&head).into_owned())
}

/// A raw peer past the handshake: for sending frames a well-behaved endpoint never would.
pub async fn raw_client(addr: SocketAddr) -> TcpStream {
    let (tcp, head) = raw_exchange(addr, &request(addr, "")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

/// A masked client frame.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [9u8, 8, 7, 6];
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// Reads unmasked server frames until a Close; returns its code (1005 for none) and the
/// opcodes seen before it. `None` if the stream ends without a Close.
pub async fn read_until_close(tcp: &mut TcpStream) -> Option<(u16, Vec<u8>)> {
    let mut seen = Vec::new();
    loop {
        let mut head = [0u8; 2];
        tcp.read_exact(&mut head).await.ok()?;
        let len = match head[1] & 0x7f {
            126 => {
                let mut ext = [0u8; 2];
                tcp.read_exact(&mut ext).await.ok()?;
                u64::from(u16::from_be_bytes(ext))
            }
            127 => {
                let mut ext = [0u8; 8];
                tcp.read_exact(&mut ext).await.ok()?;
                u64::from_be_bytes(ext)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; len as usize];
        tcp.read_exact(&mut payload).await.ok()?;
        let opcode = head[0] & 0x0f;
        if opcode == 0x8 {
            let code = if payload.len() >= 2 {
                u16::from_be_bytes([payload[0], payload[1]])
            } else {
                1005
            };
            return Some((code, seen));
        }
        seen.push(opcode);
    }
}

/// One HTTP/2 connection to `addr`, past the server's SETTINGS (a first request was answered:
/// an extended CONNECT may be sent only once the server said it takes them). That request is
/// a GET of the WebSocket at `path`, which over HTTP/2 is no opening: 405.
pub async fn h2_connection(addr: SocketAddr, path: &str) -> SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let get = hyper::Request::get(format!("http://{addr}{path}"))
        .body(Empty::new())
        .unwrap();
    assert_eq!(sender.send_request(get).await.unwrap().status(), 405);
    sender
}

/// An extended CONNECT (RFC 8441) to `path`, offering the subprotocol `chat`, with
/// `:protocol` as given.
pub fn connect_request(
    addr: SocketAddr,
    path: &str,
    protocol: Option<&'static str>,
) -> hyper::Request<Empty<Bytes>> {
    let mut req = hyper::Request::connect(format!("http://{addr}{path}"))
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "chat")
        .body(Empty::new())
        .unwrap();
    if let Some(protocol) = protocol {
        req.extensions_mut().insert(Protocol::from_static(protocol));
    }
    req
}

/// Opens a WebSocket to `path` on a new stream of `sender`'s connection, offering the
/// subprotocol `chat`.
pub async fn h2_open(
    sender: &mut SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> WebSocket<TokioIo<hyper::upgrade::Upgraded>> {
    let response = sender
        .send_request(connect_request(addr, path, Some("websocket")))
        .await
        .unwrap();
    // RFC 8441 §5: a 2xx, the subprotocol, and no Sec-WebSocket-Accept.
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
    assert!(!response.headers().contains_key("sec-websocket-accept"));
    let upgraded = hyper::upgrade::on(response).await.unwrap();
    WebSocket::from_raw(TokioIo::new(upgraded), Role::Client, Config::default())
}

/// A CA and a `localhost` certificate it signed: (CA PEM, server rustls config).
pub fn pki() -> (String, std::sync::Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    (ca.pem(), std::sync::Arc::new(server))
}
