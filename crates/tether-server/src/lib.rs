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
//! An application that embeds the server reaches its [`node::Node`] while it runs, for what it
//! decides itself: a notice to everyone, a user's subscription to a channel ended, every
//! connection of a user closed, on every node of a cluster.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let server = tether_server::Server::bind(tether_server::ServerConfig::default()).await?;
//! let node = server.node();
//! tokio::spawn(server.run(std::future::pending()));
//! node.unsubscribe_user("mallory", "room:lobby").await?;
//! node.disconnect_user("mallory", false).await?;
//! # Ok(()) }
//! ```
//!
//! The layers, in folders, each using only those below it (`scripts/layers` checks it, with
//! no circle):
//! - [`endpoints`]: the accept loop ([`endpoints::serve`]), routes and upgrades
//!   ([`endpoints::http`]), the pages;
//! - [`session`]: per connection, the room and poll sessions and what every session shares,
//!   and the channel protocol of `/ws` ([`session::channels`]);
//! - [`node`]: the [`node::Node`] every endpoint and session calls (credentials, limits,
//!   publishing, history, presence, polls, control over the engine), the hub that fans out
//!   to this node's connections ([`node::hub`]), connection slots and shutdown;
//! - [`engine`]: the seam (its traits), its two implementations ([`engine::embedded`] over
//!   [`engine::store`] and [`engine::journal`], [`engine::redis`]) and [`engine::import`];
//! - [`identity`]: users' names, passwords, credentials' digests, guests' nicknames;
//! - foundations: [`wire`] (what goes to clients), [`config`], [`metrics`], [`throttle`],
//!   [`proxy`].
//!
//! `docs/api.md` is the API reference.

pub mod config;
pub mod endpoints;
pub mod engine;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod proxy;
pub mod session;
pub mod throttle;
pub mod wire;

pub use config::ServerConfig;
pub use endpoints::serve::{Server, ServerError};
