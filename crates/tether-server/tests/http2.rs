//! WebSockets over HTTP/2 (RFC 8441): pages and WebSockets on one TLS connection chosen by
//! ALPN, cleartext h2c behind its setting, the same checks as over HTTP/1.1, and the limits of
//! a shared connection (streams per connection, WebSockets per address, streams abandoned or
//! reset in the middle of a message).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tether::{ClientBuilder, Message};
use tokio::io::AsyncWriteExt as _;

mod common;
use common::*;

type Sender = SendRequest<Empty<Bytes>>;

/// An HTTP/2 connection over TLS to `addr`, offering `alpn`; returns the sender and the
/// protocol the server chose.
async fn tls_connection(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    alpn: &[&[u8]],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Option<Vec<u8>>,
) {
    let mut config = (**tls).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = within(connector.connect(name, tcp)).await.unwrap();
    let chosen = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    (stream, chosen)
}

/// Runs the client side of an HTTP/2 connection over `io` (prior knowledge).
async fn h2<I>(io: I) -> hyper::Result<Sender>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// `GET path` on the connection: status, version and body.
async fn get(sender: &mut Sender, authority: &str, path: &str) -> (u16, http::Version, String) {
    let req = hyper::Request::get(format!("https://{authority}{path}"))
        .body(Empty::new())
        .unwrap();
    let response = within(sender.send_request(req)).await.unwrap();
    let (status, version) = (response.status().as_u16(), response.version());
    let body = within(response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    (status, version, String::from_utf8_lossy(&body).into_owned())
}

/// A WebSocket to `url` on a new stream of `sender`'s connection.
async fn open(sender: &mut Sender, url: &str) -> tether::upgrade::UpgradedWebSocket {
    within(ClientBuilder::new(url).unwrap().open_on(sender))
        .await
        .unwrap()
        .0
}

/// The status an extended CONNECT to `path` is refused with.
async fn refused(sender: &mut Sender, url: &str) -> String {
    within(ClientBuilder::new(url).unwrap().open_on(sender))
        .await
        .unwrap_err()
        .to_string()
}

/// Waits until the server counts `n` WebSockets open.
async fn until_connections(sender: &mut Sender, authority: &str, n: u64) {
    within(async {
        loop {
            let (_, _, metrics) = get(sender, authority, "/metrics").await;
            if metric(&metrics, "tether_connections") == n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn a_page_and_its_websockets_share_one_tls_connection(kind: Kind) {
    let dir = Setup::new(kind);
    let mut c = quick_stop(&dir);
    let tls = with_tls(&mut c, dir.path());
    let server = start(c).await;
    let authority = format!("localhost:{}", server.addr.port());

    let (stream, alpn) = tls_connection(server.addr, &tls, &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "the server chooses h2");
    let mut sender = within(h2(stream)).await.unwrap();
    let (status, version, page) = get(&mut sender, &authority, "/").await;
    assert_eq!((status, version), (200, http::Version::HTTP_2));
    assert!(page.contains("<html"), "{page}");

    // Two chat members and an echo, each on a stream of the page's connection.
    let room = format!("wss://{authority}/ws/rooms/lobby");
    let mut ann = open(&mut sender, &format!("{room}?name=ann")).await;
    assert_eq!(next(&mut ann).await["type"], "welcome");
    next_of(&mut ann, "ready").await;
    let mut ben = open(&mut sender, &format!("{room}?name=ben")).await;
    assert_eq!(next(&mut ben).await["members"], json!(["ann", "ben"]));
    say(&mut ben, "over one connection").await;
    for ws in [&mut ann, &mut ben] {
        assert_eq!(next_of(ws, "message").await["text"], "over one connection");
    }
    let mut echo = open(&mut sender, &format!("wss://{authority}/ws/echo")).await;
    // More than a stream's flow-control window, in messages under the size limit.
    let big = Bytes::from(vec![7u8; 60 << 10]);
    for _ in 0..8 {
        echo.send(Message::Binary(big.clone())).await.unwrap();
    }
    for _ in 0..8 {
        match within(echo.recv()).await {
            Some(Ok(Message::Binary(b))) => assert_eq!(b, big),
            other => panic!("expected the echo, got {other:?}"),
        }
    }
    until_connections(&mut sender, &authority, 3).await;
    let (_, _, metrics) = get(&mut sender, &authority, "/metrics").await;
    assert_eq!(metric(&metrics, "tether_http2_websockets_total"), 3);
    // One HTTP/2 connection carried them (the others the test made, if any, were HTTP/1.1).
    assert_eq!(metric(&metrics, "tether_http2_connections_total"), 1);

    // A close ends its stream, and the others go on.
    within(echo.close(None)).await.unwrap();
    until_connections(&mut sender, &authority, 2).await;
    say(&mut ann, "still here").await;
    assert_eq!(next_of(&mut ben, "message").await["text"], "still here");

    // A client that offers HTTP/1.1 only gets it, on the same port.
    let (_, alpn) = tls_connection(server.addr, &tls, &[b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    server.stop().await;
}

async fn http2_off_offers_http1_only(kind: Kind) {
    let dir = Setup::new(kind);
    let mut c = quick_stop(&dir);
    c.http2 = false;
    let tls = with_tls(&mut c, dir.path());
    let server = start(c).await;
    let (_, alpn) = tls_connection(server.addr, &tls, &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    server.stop().await;
}

async fn cleartext_http2_is_behind_its_setting(kind: Kind) {
    let dir = Setup::new(kind);
    let server = start(quick_stop(&dir)).await;
    // By default a plain port speaks HTTP/1.1 only: HTTP/2's preface is not a request.
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let refused = match h2(tcp).await {
        Err(_) => true,
        Ok(mut sender) => {
            let req = hyper::Request::get(format!("http://{}/healthz", server.addr))
                .body(Empty::new())
                .unwrap();
            within(sender.send_request(req)).await.is_err()
        }
    };
    assert!(refused, "h2c answered with the setting off");
    server.stop().await;

    let mut c = quick_stop(&dir);
    c.h2c = true;
    let server = start(c).await;
    let authority = server.addr.to_string();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut sender = within(h2(tcp)).await.unwrap();
    assert_eq!(get(&mut sender, &authority, "/healthz").await.0, 200);
    let mut echo = open(&mut sender, &format!("ws://{authority}/ws/echo")).await;
    echo.send(Message::text("h2c")).await.unwrap();
    assert!(matches!(within(echo.recv()).await, Some(Ok(Message::Text(t))) if t == "h2c"));
    // HTTP/1.1 still works beside it.
    let mut ws = connect(&server.ws("/ws/echo")).await;
    ws.send(Message::text("h1")).await.unwrap();
    assert!(matches!(within(ws.recv()).await, Some(Ok(Message::Text(t))) if t == "h1"));
    server.stop().await;
}

/// The test configuration, with a short shutdown: the tests end with WebSockets open that
/// nobody reads, whose Close would otherwise be awaited for the whole shutdown timeout.
fn quick_stop(dir: &Setup) -> tether_server::ServerConfig {
    let mut c = dir.config();
    c.shutdown_timeout = std::time::Duration::from_millis(200);
    c
}

/// A server with h2c on, and a connection to it.
async fn h2c_server(
    dir: &Setup,
    tune: impl FnOnce(&mut tether_server::ServerConfig),
) -> (Running, Sender) {
    let mut c = quick_stop(dir);
    c.h2c = true;
    tune(&mut c);
    let server = start(c).await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut sender = within(h2(tcp)).await.unwrap();
    // The server's settings (extended CONNECT allowed) arrive with its first answer.
    assert_eq!(
        get(&mut sender, &server.addr.to_string(), "/healthz")
            .await
            .0,
        200
    );
    (server, sender)
}

async fn an_extended_connect_passes_the_same_checks_as_an_upgrade(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("ann", "correct horse").await;
    let (server, mut sender) = h2c_server(&dir, |_| {}).await;
    let base = format!("ws://{}", server.addr);

    // Origin policy, identity, the channel protocol's subprotocol, an unknown path.
    let evil = ClientBuilder::new(&format!("{base}/ws/echo"))
        .unwrap()
        .header("Origin", "https://evil.example");
    let e = within(evil.open_on(&mut sender))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("403"), "{e}");
    let e = refused(&mut sender, &format!("{base}/ws/rooms/lobby?token=forged")).await;
    assert!(e.contains("401"), "{e}");
    let e = refused(&mut sender, &format!("{base}/ws")).await;
    assert!(e.contains("400"), "no tether.v1 offered: {e}");
    let e = refused(&mut sender, &format!("{base}/ws/nowhere")).await;
    assert!(e.contains("404"), "{e}");

    // A token, the channel protocol with its subprotocol, permessage-deflate.
    let token = token(server.addr, "ann", "correct horse").await;
    let (mut ws, response) = within(
        ClientBuilder::new(&format!("{base}/ws?token={token}"))
            .unwrap()
            .protocol("tether.v1")
            .config(tether::Config::default().deflate(Some(Default::default())))
            .open_on(&mut sender),
    )
    .await
    .unwrap();
    assert_eq!(response.protocol.as_deref(), Some("tether.v1"));
    assert!(ws.is_compressed());
    let connect = json!({"op": "connect", "id": 1}).to_string();
    ws.send(Message::text(connect)).await.unwrap();
    let connected = next(&mut ws).await;
    assert_eq!(connected["id"], 1, "{connected}");
    assert!(connected.to_string().contains("\"ann\""), "{connected}");

    // CONNECT without `:protocol` (a tunnel) and with another protocol are not WebSockets.
    let tunnel = hyper::Request::connect(server.addr.to_string())
        .body(Empty::new())
        .unwrap();
    let status = within(sender.send_request(tunnel)).await.unwrap().status();
    assert!(status.is_client_error(), "{status}");
    let mut other = hyper::Request::connect(format!("{base}/ws/echo").replacen("ws", "http", 1))
        .header("sec-websocket-version", "13")
        .body(Empty::new())
        .unwrap();
    other
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("chat"));
    let status = within(sender.send_request(other)).await.unwrap().status();
    assert_eq!(status, 400);
    server.stop().await;
}

async fn streams_and_websockets_are_limited_per_connection_and_address(kind: Kind) {
    let dir = Setup::new(kind);
    let (server, mut sender) = h2c_server(&dir, |c| {
        c.http2_max_streams = 2;
        c.max_connections_per_ip = 3;
    })
    .await;
    let authority = server.addr.to_string();
    let echo = format!("ws://{authority}/ws/echo");
    // Two WebSockets fill the connection's two streams: a third waits for a stream (the
    // client keeps to the server's SETTINGS_MAX_CONCURRENT_STREAMS) ...
    let mut first = open(&mut sender, &echo).await;
    let second = open(&mut sender, &echo).await;
    let mut third_sender = sender.clone();
    let url = echo.clone();
    let mut third = Box::pin(async move {
        ClientBuilder::new(&url)
            .unwrap()
            .open_on(&mut third_sender)
            .await
    });
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), &mut third)
            .await
            .is_err(),
        "a stream beyond the server's limit was opened"
    );
    // ... and gets one as soon as one closes.
    first.close(None).await.unwrap();
    last_close_code(&mut first).await;
    let mut third = within(third).await.unwrap().0;
    third.send(Message::text("third")).await.unwrap();
    assert!(matches!(within(third.recv()).await, Some(Ok(Message::Text(t))) if t == "third"));

    // WebSockets count per address whatever connection carries them: two here, one more on
    // another connection, and the next is refused.
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut other = within(h2(tcp)).await.unwrap();
    assert_eq!(get(&mut other, &authority, "/healthz").await.0, 200);
    let _fourth = open(&mut other, &echo).await;
    let e = refused(&mut other, &echo).await;
    assert!(e.contains("429"), "{e}");

    // A stream dropped without a close (RST_STREAM) ends its WebSocket on the server.
    drop(second);
    until_connections(&mut other, &authority, 2).await;
    server.stop().await;
}

async fn a_stream_reset_in_the_middle_of_a_message_ends_only_its_websocket(kind: Kind) {
    let dir = Setup::new(kind);
    let (server, mut sender) = h2c_server(&dir, |_| {}).await;
    let authority = server.addr.to_string();
    let mut survivor = open(&mut sender, &format!("ws://{authority}/ws/echo")).await;
    // A raw stream: a masked binary frame that announces 1,000 bytes, then 10 of them, then
    // the stream is reset.
    let mut req = hyper::Request::connect(format!("http://{authority}/ws/echo"))
        .header("sec-websocket-version", "13")
        .body(Empty::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let response = within(sender.send_request(req)).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut raw = TokioIo::new(within(hyper::upgrade::on(response)).await.unwrap());
    let mut frame = vec![0x82, 0x80 | 126, 0x03, 0xe8, 1, 2, 3, 4];
    frame.extend_from_slice(&[0u8; 10]);
    raw.write_all(&frame).await.unwrap();
    raw.flush().await.unwrap();
    until_connections(&mut sender, &authority, 2).await;
    drop(raw);
    until_connections(&mut sender, &authority, 1).await;
    // The connection and its other WebSocket are untouched.
    survivor.send(Message::text("still")).await.unwrap();
    assert!(matches!(within(survivor.recv()).await, Some(Ok(Message::Text(t))) if t == "still"));
    server.stop().await;
}

async fn a_connection_without_streams_is_closed_once_idle(kind: Kind) {
    let dir = Setup::new(kind);
    let idle = std::time::Duration::from_millis(300);
    let (server, mut sender) = h2c_server(&dir, |c| c.http2_idle_timeout = idle).await;
    let authority = server.addr.to_string();
    // A WebSocket keeps its connection in use however long it is quiet ...
    let mut ws = open(&mut sender, &format!("ws://{authority}/ws/echo")).await;
    tokio::time::sleep(idle * 4).await;
    assert!(!sender.is_closed(), "closed under an open WebSocket");
    ws.send(Message::text("still open")).await.unwrap();
    assert!(matches!(within(ws.recv()).await, Some(Ok(Message::Text(t))) if t == "still open"));
    // ... and once it has ended, the connection, carrying nothing, is closed.
    within(ws.close(None)).await.unwrap();
    within(async {
        while !sender.is_closed() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    server.stop().await;
}

on_both_engines!(
    a_page_and_its_websockets_share_one_tls_connection,
    http2_off_offers_http1_only,
    cleartext_http2_is_behind_its_setting,
    an_extended_connect_passes_the_same_checks_as_an_upgrade,
    streams_and_websockets_are_limited_per_connection_and_address,
    a_stream_reset_in_the_middle_of_a_message_ends_only_its_websocket,
    a_connection_without_streams_is_closed_once_idle,
);
