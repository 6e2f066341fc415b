//! The tether real-time server: one port with the pages, a JSON API and WebSocket endpoints
//! for chat rooms with durable history, live polls and an echo; users with argon2 passwords,
//! sessions and tokens; bounded fan-out with a slow-consumer policy; metrics; graceful
//! shutdown.
//!
//! ```no_run
//! # async fn run() -> Result<(), tether_server::ServerError> {
//! let server = tether_server::Server::bind(tether_server::ServerConfig::default()).await?;
//! println!("listening on {}", server.url());
//! server.run(async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```
//!
//! The layers: [`store`] (SQLite), [`journal`] (the single writer that assigns ids and
//! delivers after commit), [`engine`] (what handlers ask of storage and the other nodes, one
//! implementation per deployment), [`hub`] (subscriptions and fan-out), [`app`] (shared state, auth
//! checks, limits), [`http`] (routes), [`ws`] (socket sessions), [`serve`] (the accept loop).
//! `docs/api.md` is the API reference.

pub mod app;
pub mod auth;
pub mod channels;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod gate;
pub mod guests;
pub mod http;
pub mod hub;
pub mod journal;
pub mod metrics;
pub mod password;
pub mod proxy;
pub mod serve;
pub mod sessions;
pub mod store;
pub mod throttle;
pub mod web;
pub mod ws;

pub use config::ServerConfig;
pub use serve::{Server, ServerError};
