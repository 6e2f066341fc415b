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
//! The layers, each using only those below it (`scripts/layers` checks it, with no circle):
//! - the server: [`serve`] (the accept loop), [`http`] (routes and upgrades);
//! - per connection: [`channels`] (the channel protocol of `/ws`), [`ws`] (room and poll
//!   sessions, and what every session shares);
//! - the node: [`app`] (shared state, credentials, limits over the engine);
//! - [`engine`]: the seam (its traits), its two implementations ([`engine::embedded`] over
//!   [`engine::store`] and [`engine::journal`], [`engine::redis`]) and [`engine::import`];
//! - [`hub`]: subscriptions and fan-out to this node's connections;
//! - foundations: [`wire`] (what goes to clients), [`auth`], [`config`], [`metrics`],
//!   [`throttle`] and the other limits.
//!
//! `docs/api.md` is the API reference.

pub mod app;
pub mod auth;
pub mod channels;
pub mod config;
pub mod engine;
pub mod gate;
pub mod guests;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod password;
pub mod proxy;
pub mod serve;
pub mod sessions;
pub mod throttle;
pub mod web;
pub mod wire;
pub mod ws;

pub use config::ServerConfig;
pub use serve::{Server, ServerError};
