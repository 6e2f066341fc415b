//! WebSockets over HTTP/2 (RFC 8441): `tether::upgrade::upgrade` behind hyper's HTTP/2 server
//! with the extended CONNECT enabled, driven by hyper's own HTTP/2 client (a client tether did
//! not write): several WebSockets on one connection, the subprotocol, the close handshake
//! ending each stream, and the requests that must be refused.

#![cfg(feature = "http2")]

mod common;

use std::net::SocketAddr;

use common::{connect_request, h2_connection as connection, h2_open, within};
use futures_util::StreamExt;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tether::proto::extension::deflate::DeflateConfig;
use tether::{ClientBuilder, Config, Message};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// An HTTP/2 (prior knowledge) server whose every request goes to `tether::upgrade`; each
/// WebSocket echoes, then reports how it ended on the channel.
async fn server() -> (SocketAddr, mpsc::UnboundedReceiver<Option<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ended, rx) = mpsc::unbounded_channel();
    let config = std::sync::Arc::new(
        Config::default()
            .protocols(vec!["chat".to_owned()])
            .deflate(Some(DeflateConfig::default())),
    );
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (config, ended) = (config.clone(), ended.clone());
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
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .enable_connect_protocol()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, rx)
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
