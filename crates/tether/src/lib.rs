//! # tether
//!
//! WebSocket (RFC 6455) for tokio, on the sans-IO core [`tether_proto`]: accept on any
//! transport or from a hyper/axum request, connect to `ws://` and `wss://`, and exchange
//! [`Message`]s through a cancel-safe [`WebSocket::recv`] or as a `Stream` + `Sink`. Limits,
//! timeouts and keepalive live in one [`Config`].
//!
//! An echo server and a client, on loopback:
//!
//! ```
//! use tether::Message;
//! use tokio::net::TcpListener;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let listener = TcpListener::bind("127.0.0.1:0").await?;
//!     let url = format!("ws://{}/", listener.local_addr()?);
//!
//!     tokio::spawn(async move {
//!         while let Ok((tcp, _)) = listener.accept().await {
//!             tokio::spawn(async move {
//!                 let Ok(mut ws) = tether::accept(tcp).await else { return };
//!                 while let Some(Ok(msg)) = ws.recv().await {
//!                     // `feed` queues; receiving writes the queue whenever it would wait,
//!                     // so the echoes of many small messages leave in one write.
//!                     if msg.is_data() && ws.feed(msg).await.is_err() {
//!                         break;
//!                     }
//!                 }
//!             });
//!         }
//!     });
//!
//!     let (mut ws, _response) = tether::connect(&url).await?;
//!     ws.send(Message::text("hello")).await?;
//!     assert_eq!(ws.recv().await.transpose()?, Some(Message::text("hello")));
//!     ws.close(None).await?; // completes the close handshake
//!     Ok(())
//! }
//! ```
//!
//! ## Receiving without a copy
//!
//! [`WebSocket::poll_next_lent`] lends each message to a callback straight from the read
//! buffer, with [`Replies`] to queue answers copied once into the outgoing buffer: no
//! allocation per message, which is what `tether echo` uses (docs/decisions.md, 23).
//!
//! ## Features
//! - `tls` (default): `wss://` through rustls with the webpki roots ([`tls`]).
//! - `hyper` (default): upgrade a hyper or axum request ([`upgrade`]).
//! - `axum`: an axum extractor, `tether::axum::WebSocketUpgrade`.

#![deny(unsafe_code)]

#[cfg(feature = "axum")]
pub mod axum;
mod client;
mod config;
mod error;
pub mod handshake;
#[cfg(feature = "http2")]
pub mod http2;
mod message;
pub mod proxy;
pub mod tls;
#[cfg(feature = "hyper")]
pub mod upgrade;
mod websocket;

pub use client::{connect, ClientBuilder, ClientStream, HttpVersion};
pub use config::Config;
pub use error::{Error, ProxyError, Result, TlsError, UrlError};
pub use handshake::{accept, accept_hdr, accept_with_config, client};
#[cfg(feature = "http2")]
pub use http2::Pool;
pub use message::Message;
pub use proxy::Proxy;
pub use tether_proto::{self as proto, CloseCode, CloseFrame, Lent, Prepared, Role, Utf8Bytes};
pub use websocket::{
    DirectIo, DirectSend, DirectWriter, Idle, Incoming, MessageReader, MessageWriter, Replies,
    SharedWebSocket, WebSocket, WsReceiver, WsSender,
};
