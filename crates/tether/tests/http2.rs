//! WebSockets over HTTP/2 (RFC 8441): `tether::upgrade::upgrade` behind hyper's HTTP/2 server
//! with the extended CONNECT enabled, driven by hyper's own HTTP/2 client (a client tether did
//! not write): several WebSockets on one connection, the subprotocol, the close handshake
//! ending each stream, and the requests that must be refused.

#![cfg(feature = "http2")]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{connect_request, h2_connection as connection, h2_open, within};
use futures_util::StreamExt;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tether::proto::extension::deflate::DeflateConfig;
use tether::tls::MaybeTlsStream;
use tether::{ClientBuilder, Config, Error, HttpVersion, Message, Pool};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// An HTTP/2 (prior knowledge) server whose every request goes to `tether::upgrade`; each
/// WebSocket echoes, then reports how it ended on the channel.
async fn server() -> (SocketAddr, mpsc::UnboundedReceiver<Option<String>>) {
    let (addr, ended, _) = server_with(None, true).await;
    (addr, ended)
}

/// The echo server of [`server`], over TLS when `tls` is given (ALPN `h2` and `http/1.1`,
/// HTTP/1.1 upgrades answered too), taking extended CONNECTs or not. Also returns the count
/// of TCP connections it accepted.
async fn server_with(
    tls: Option<Arc<rustls::ServerConfig>>,
    connect_protocol: bool,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Option<String>>,
    Arc<AtomicUsize>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ended, rx) = mpsc::unbounded_channel();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let config = Arc::new(
        Config::default()
            .protocols(vec!["chat".to_owned()])
            .deflate(Some(DeflateConfig::default())),
    );
    let acceptor = tls.map(|tls| {
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(tls))
    });
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let (config, ended, acceptor) = (config.clone(), ended.clone(), acceptor.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |mut req| {
                    let (config, ended) = (config.clone(), ended.clone());
                    async move {
                        let response = match tether::upgrade::upgrade(&mut req, config) {
                            Ok((response, pending)) => {
                                tokio::spawn(async move {
                                    let Ok(mut ws) = pending.await else { return };
                                    let mut error = None;
                                    while let Some(msg) = ws.recv().await {
                                        match msg {
                                            Ok(msg) if msg.is_data() => {
                                                if ws.send(msg).await.is_err() {
                                                    break;
                                                }
                                            }
                                            Ok(_) => {}
                                            Err(e) => error = Some(e.to_string()),
                                        }
                                    }
                                    let _ = ended.send(error);
                                });
                                response
                            }
                            Err(refused) => {
                                let mut response = hyper::Response::new(Empty::<Bytes>::new());
                                *response.status_mut() =
                                    hyper::StatusCode::from_u16(refused.status()).unwrap();
                                response
                            }
                        };
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                if connect_protocol {
                    h2.enable_connect_protocol();
                }
                let Some(acceptor) = acceptor else {
                    let _ = h2.serve_connection(TokioIo::new(tcp), service).await;
                    return;
                };
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    let _ = h2.serve_connection(TokioIo::new(tls), service).await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .with_upgrades()
                        .await;
                }
            });
        }
    });
    (addr, rx, accepted)
}

#[tokio::test]
async fn several_websockets_share_one_http2_connection_and_close_cleanly() {
    let (addr, mut ended) = server().await;
    let mut sender = within(connection(addr, "/chat")).await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(within(h2_open(&mut sender, addr, "/chat")).await);
    }
    // Interleaved on the one connection: each stream echoes its own.
    for round in 0..20 {
        for (i, ws) in sockets.iter_mut().enumerate() {
            ws.feed(Message::text(format!("{i}:{round}")))
                .await
                .unwrap();
        }
        for ws in &mut sockets {
            ws.flush().await.unwrap();
        }
        for (i, ws) in sockets.iter_mut().enumerate() {
            let echo = within(ws.next()).await.unwrap().unwrap();
            assert_eq!(echo, Message::text(format!("{i}:{round}")));
        }
    }
    let big = vec![7u8; 1 << 20];
    sockets[1].send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(
        within(sockets[1].next()).await.unwrap().unwrap(),
        Message::binary(big)
    );
    // The close handshake ends each stream; the connection stays for the others.
    for mut ws in sockets.drain(..2) {
        within(ws.close(None)).await.unwrap();
        assert_eq!(within(ended.recv()).await, Some(None));
    }
    let mut last = sockets.pop().unwrap();
    last.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        within(last.next()).await.unwrap().unwrap(),
        Message::text("still here")
    );
    // And a new one opens beside it.
    let mut again = within(h2_open(&mut sender, addr, "/chat")).await;
    again.send(Message::text("again")).await.unwrap();
    assert_eq!(
        within(again.next()).await.unwrap().unwrap(),
        Message::text("again")
    );
    for mut ws in [last, again] {
        within(ws.close(None)).await.unwrap();
    }
}

#[tokio::test]
async fn a_connect_without_the_websocket_protocol_is_refused() {
    let (addr, _ended) = server().await;
    let mut sender = within(connection(addr, "/chat")).await;
    // A plain CONNECT (a tunnel request): no `:protocol`.
    let plain = sender
        .send_request(connect_request(addr, "/chat", None))
        .await
        .unwrap();
    assert_eq!(plain.status(), 400);
    // Another protocol.
    let other = sender
        .send_request(connect_request(addr, "/chat", Some("webtransport")))
        .await
        .unwrap();
    assert_eq!(other.status(), 400);
    // Without the version.
    let mut unversioned = connect_request(addr, "/chat", Some("websocket"));
    unversioned.headers_mut().remove("sec-websocket-version");
    let unversioned = sender.send_request(unversioned).await.unwrap();
    assert_eq!(unversioned.status(), 426);
    // The connection still serves WebSockets.
    let mut ws = within(h2_open(&mut sender, addr, "/chat")).await;
    ws.send(Message::text("fine")).await.unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text("fine")
    );
}

#[tokio::test]
async fn the_client_builder_opens_websockets_on_a_shared_http2_connection() {
    let (addr, mut ended) = server().await;
    let mut sender = within(connection(addr, "/chat")).await;
    let builder = ClientBuilder::new(&format!("ws://{addr}/chat"))
        .unwrap()
        .protocol("chat")
        .config(Config::default().deflate(Some(DeflateConfig::default())));
    let mut sockets = Vec::new();
    for _ in 0..2 {
        let (ws, response) = within(builder.open_on(&mut sender)).await.unwrap();
        // The subprotocol and permessage-deflate were agreed on the stream.
        assert_eq!(response.protocol.as_deref(), Some("chat"));
        assert!(ws.is_compressed(), "{response:?}");
        sockets.push(ws);
    }
    let text = "compressible ".repeat(200);
    for ws in &mut sockets {
        ws.send(Message::text(text.clone())).await.unwrap();
    }
    for ws in &mut sockets {
        assert_eq!(
            within(ws.next()).await.unwrap().unwrap(),
            Message::text(text.clone())
        );
    }
    for mut ws in sockets {
        within(ws.close(None)).await.unwrap();
        assert_eq!(within(ended.recv()).await, Some(None));
    }
}

/// A builder for `path` on the TLS server at `addr`, trusting `ca`.
fn tls_builder(addr: SocketAddr, ca: &str, path: &str) -> ClientBuilder {
    ClientBuilder::new(&format!("wss://localhost:{}{path}", addr.port()))
        .unwrap()
        .protocol("chat")
        .tls_config(tether::tls::client_config(ca.as_bytes()).unwrap())
}

/// Sends `text` and expects it back.
async fn echoes<S>(ws: &mut tether::WebSocket<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text.to_owned())).await.unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text(text.to_owned())
    );
}

#[tokio::test]
async fn connect_chooses_http2_by_alpn_and_a_pool_shares_one_connection() {
    let (ca, tls) = common::pki();
    let (addr, _ended, accepted) = server_with(Some(tls), true).await;
    let pool = Pool::new();
    let mut sockets = Vec::new();
    for i in 0..3 {
        let (mut ws, response) = within(
            tls_builder(addr, &ca, &format!("/room/{i}"))
                .pool(pool.clone())
                .connect(),
        )
        .await
        .unwrap();
        assert!(matches!(ws.get_ref(), MaybeTlsStream::Http2(_)));
        assert_eq!(response.protocol.as_deref(), Some("chat"));
        echoes(&mut ws, &format!("socket {i}")).await;
        sockets.push(ws);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one TCP connection");
    assert_eq!(pool.len(), 1);
    for mut ws in sockets {
        within(ws.close(None)).await.unwrap();
    }

    // Opened at once through a new pool: they wait for the one connection the first makes.
    let pool = Pool::new();
    let opens = (0..20).map(|i| {
        let builder = tls_builder(addr, &ca, &format!("/at-once/{i}")).pool(pool.clone());
        async move { builder.connect().await.unwrap().0 }
    });
    let mut at_once = within(futures_util::future::join_all(opens)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "one more TCP connection"
    );
    echoes(&mut at_once[19], "the last of twenty").await;

    // Without a pool, a connection each; HTTP/1.1 when asked.
    let (mut alone, _) = within(tls_builder(addr, &ca, "/").connect()).await.unwrap();
    assert!(matches!(alone.get_ref(), MaybeTlsStream::Http2(_)));
    echoes(&mut alone, "alone").await;
    let (mut http1, _) = within(
        tls_builder(addr, &ca, "/")
            .http_version(HttpVersion::Http1)
            .connect(),
    )
    .await
    .unwrap();
    assert!(matches!(http1.get_ref(), MaybeTlsStream::Rustls(_)));
    echoes(&mut http1, "over HTTP/1.1").await;
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_server_without_extended_connect_gets_http1_unless_http2_is_required() {
    let (ca, tls) = common::pki();
    let (addr, _ended, accepted) = server_with(Some(tls), false).await;
    let pool = Pool::new();
    // The h2 connection refuses the stream; a new connection upgrades HTTP/1.1.
    let (mut ws, _) = within(tls_builder(addr, &ca, "/").pool(pool.clone()).connect())
        .await
        .unwrap();
    assert!(matches!(ws.get_ref(), MaybeTlsStream::Rustls(_)));
    echoes(&mut ws, "fell back").await;
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert!(pool.is_empty(), "a connection that refuses is not kept");
    let e = within(
        tls_builder(addr, &ca, "/")
            .http_version(HttpVersion::Http2)
            .connect(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Http2Unavailable(_)), "{e}");
}

#[tokio::test]
async fn http2_required_over_plain_tcp_is_h2c_with_prior_knowledge() {
    let (addr, mut ended) = server().await;
    let (mut ws, _) = within(
        ClientBuilder::new(&format!("ws://{addr}/chat"))
            .unwrap()
            .protocol("chat")
            .http_version(HttpVersion::Http2)
            .connect(),
    )
    .await
    .unwrap();
    assert!(matches!(ws.get_ref(), MaybeTlsStream::Http2(_)));
    echoes(&mut ws, "h2c").await;
    within(ws.close(None)).await.unwrap();
    assert_eq!(within(ended.recv()).await, Some(None));
}
