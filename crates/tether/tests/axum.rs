//! The axum extractor over real loopback sockets: an echo with a chosen subprotocol, over
//! HTTP/1.1 and over HTTP/2 (an extended CONNECT), and the refusals (not an upgrade, a wrong
//! version, a foreign Origin) as HTTP answers.
#![cfg(feature = "axum")]

mod common;

use axum::routing::{any, get};
use axum::Router;
use common::*;
use tether::axum::WebSocketUpgrade;
use tether::{Config, Message};

/// Serves `/ws` (an echo with subprotocol `chat` and only its own origin) and returns the
/// address.
async fn server() -> std::net::SocketAddr {
    let (listener, addr) = listener().await;
    let app = Router::new().route(
        "/ws",
        get(|ws: WebSocketUpgrade| async move {
            let config = Config::default()
                .protocols(vec!["chat".into()])
                .allowed_origins(Some(vec!["http://listed.example".into()]))
                .same_origin_scheme(Some("http".into()));
            ws.config(config).on_upgrade(|mut socket| async move {
                while let Some(Ok(msg)) = socket.recv().await {
                    if msg.is_data() && socket.send(msg).await.is_err() {
                        break;
                    }
                }
            })
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn the_extractor_accepts_an_http2_extended_connect() {
    let (listener, addr) = listener().await;
    // `any`: over HTTP/2 a WebSocket opens with CONNECT, not GET.
    let app = Router::new().route(
        "/ws",
        any(|ws: WebSocketUpgrade| async move {
            ws.config(Config::default().protocols(vec!["chat".into()]))
                .on_upgrade(|mut socket| async move {
                    while let Some(Ok(msg)) = socket.recv().await {
                        if msg.is_data() && socket.send(msg).await.is_err() {
                            break;
                        }
                    }
                })
        }),
    );
    // axum serves HTTP/2 with prior knowledge, extended CONNECT enabled.
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut sender = within(h2_connection(addr, "/ws")).await;
    let mut ws = within(h2_open(&mut sender, addr, "/ws")).await;
    ws.send(Message::text("over h2")).await.unwrap();
    assert_eq!(
        within(ws.recv()).await.unwrap().unwrap(),
        Message::text("over h2")
    );
    within(ws.close(None)).await.unwrap();
}

#[tokio::test]
async fn a_handler_upgrades_with_the_subprotocol_it_supports() {
    let addr = server().await;
    let (mut ws, response) = within(
        tether::ClientBuilder::new(&format!("ws://{addr}/ws"))
            .unwrap()
            .protocol("other")
            .protocol("chat")
            .connect(),
    )
    .await
    .unwrap();
    assert_eq!(response.protocol.as_deref(), Some("chat"));
    ws.send(Message::text("through axum")).await.unwrap();
    assert_eq!(
        within(ws.recv()).await.unwrap().unwrap(),
        Message::text("through axum")
    );
}

#[tokio::test]
async fn what_is_not_an_upgrade_is_refused_with_its_status() {
    let addr = server().await;
    let plain = format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let (_, head) = within(raw_exchange(addr, &plain)).await;
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");

    let old = request(addr, "")
        .replace("GET / ", "GET /ws ")
        .replace("Version: 13", "Version: 8");
    let (_, head) = within(raw_exchange(addr, &old)).await;
    assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-version: 13\r\n"),
        "{head}"
    );
}

#[tokio::test]
async fn the_origin_policy_accepts_its_own_and_listed_origins_only() {
    let addr = server().await;
    let upgrade = |origin: &str| {
        request(addr, &format!("Origin: {origin}\r\n")).replace("GET / ", "GET /ws ")
    };
    for (origin, status) in [
        (format!("http://{addr}"), "101"),
        ("http://listed.example".to_owned(), "101"),
        ("http://elsewhere.example".to_owned(), "403"),
        (format!("https://{addr}"), "403"),
    ] {
        let (_, head) = within(raw_exchange(addr, &upgrade(&origin))).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{origin}: {head}"
        );
    }
}
