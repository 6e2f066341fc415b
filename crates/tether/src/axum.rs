//! An axum extractor for WebSocket upgrades (the `axum` feature).
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use tether::axum::WebSocketUpgrade;
//!
//! async fn chat(ws: WebSocketUpgrade) -> axum::response::Response {
//!     ws.config(tether::Config::default().protocols(vec!["chat".into()]))
//!         .on_upgrade(|mut socket| async move {
//!             while let Some(Ok(msg)) = socket.recv().await {
//!                 if msg.is_data() && socket.send(msg).await.is_err() {
//!                     break;
//!                 }
//!             }
//!         })
//! }
//!
//! let app: Router = Router::new().route("/chat", get(chat));
//! ```
//!
//! Extraction validates the upgrade (method, `Upgrade`, `Connection`, key, version) and
//! refuses a request that is not one with its HTTP status (405, 400, 426). The subprotocol,
//! permessage-deflate, the Origin policy and the head's size limit come from the
//! [`Config`] given to [`WebSocketUpgrade::config`] and apply when the handler answers: a
//! refused Origin gets 403, an oversized head 431.

use std::future::Future;
use std::sync::Arc;

use axum_core::body::Body;
use axum_core::extract::FromRequestParts;
use axum_core::response::{IntoResponse, Response};
use http::request::Parts;
use hyper::upgrade::OnUpgrade;
use tether_proto::handshake::server::{HandshakeError, Request};

use crate::config::Config;
use crate::handshake::check_origin;
use crate::upgrade::{answer, check_size, head_size, parse, PendingUpgrade, UpgradedWebSocket};

/// A request to upgrade to a WebSocket, extracted from an axum request.
///
/// Answer it with [`WebSocketUpgrade::on_upgrade`] (the socket runs in a task of its own),
/// or with [`WebSocketUpgrade::accept`] to run it yourself.
pub struct WebSocketUpgrade {
    request: Request,
    head: usize,
    on_upgrade: OnUpgrade,
    config: Arc<Config>,
}

impl std::fmt::Debug for WebSocketUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocketUpgrade")
            .field("path", &self.request.path())
            .field("origin", &self.request.origin())
            .finish_non_exhaustive()
    }
}

/// Why a request cannot be upgraded; answered with its HTTP status and a one-line reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeRejection {
    /// Not a valid WebSocket upgrade, or refused by the [`Config`]'s policy.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The connection cannot be upgraded (HTTP/2, or a server without upgrades): 426.
    #[error("this connection cannot be upgraded")]
    NotUpgradable,
}

impl UpgradeRejection {
    /// The HTTP status it is answered with.
    pub fn status(&self) -> u16 {
        match self {
            UpgradeRejection::Handshake(e) => e.status(),
            UpgradeRejection::NotUpgradable => 426,
        }
    }
}

impl IntoResponse for UpgradeRejection {
    fn into_response(self) -> Response {
        let status =
            http::StatusCode::from_u16(self.status()).unwrap_or(http::StatusCode::BAD_REQUEST);
        let mut response = (status, self.to_string()).into_response();
        if status == http::StatusCode::UPGRADE_REQUIRED {
            // The version this server speaks (RFC 6455 §4.4).
            response.headers_mut().insert(
                http::header::SEC_WEBSOCKET_VERSION,
                http::HeaderValue::from_static("13"),
            );
        }
        response
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WebSocketUpgrade {
    type Rejection = UpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let protocol = crate::upgrade::connect_protocol(&parts.extensions);
        let request = parse(
            &parts.method,
            &parts.uri,
            parts.version,
            &parts.headers,
            protocol,
        )?;
        let head = head_size(&parts.method, &parts.uri, &parts.headers);
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(UpgradeRejection::NotUpgradable)?;
        Ok(WebSocketUpgrade {
            request,
            head,
            on_upgrade,
            config: Arc::default(),
        })
    }
}

impl WebSocketUpgrade {
    /// Uses `config` for the socket and for the answer: subprotocols, permessage-deflate,
    /// allowed Origins, the head's size limit, and every limit and timeout after.
    pub fn config(mut self, config: impl Into<Arc<Config>>) -> Self {
        self.config = config.into();
        self
    }

    /// The subprotocols the client offers, in its order of preference.
    pub fn offered_protocols(&self) -> impl Iterator<Item = &str> {
        self.request.protocols()
    }

    /// The request's `Origin`, if any.
    pub fn origin(&self) -> Option<&str> {
        self.request.origin()
    }

    /// Applies the [`Config`]'s policy now (the Origin, the head's size), before work that a
    /// refused request should not cost; [`WebSocketUpgrade::accept`] applies it again.
    ///
    /// # Errors
    /// [`UpgradeRejection`] as [`WebSocketUpgrade::accept`] would return it.
    pub fn check(&self) -> Result<(), UpgradeRejection> {
        check_size(self.head, &self.config)?;
        check_origin(&self.config, &self.request)?;
        Ok(())
    }

    /// Answers the upgrade: the `101` response to return, and a future that resolves to the
    /// WebSocket once hyper hands over the connection (see [`crate::upgrade::upgrade`]).
    ///
    /// # Errors
    /// [`UpgradeRejection`] when the [`Config`] refuses the request (its Origin, its size);
    /// return it as the response.
    pub fn accept(self) -> Result<(Response, PendingUpgrade), UpgradeRejection> {
        check_size(self.head, &self.config)?;
        let (response, agreed) = answer::<Body>(&self.request, &self.config)?;
        Ok((response, agreed.pending(self.on_upgrade, self.config)))
    }

    /// Answers the upgrade and runs `callback` with the WebSocket in a task of its own;
    /// returns the response for the handler to return (the `101`, or the refusal).
    pub fn on_upgrade<F, Fut>(self, callback: F) -> Response
    where
        F: FnOnce(UpgradedWebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        match self.accept() {
            Ok((response, pending)) => {
                tokio::spawn(async move {
                    match pending.await {
                        Ok(socket) => callback(socket).await,
                        Err(e) => tracing::debug!(error = %e, "the upgrade did not complete"),
                    }
                });
                response
            }
            Err(refused) => {
                tracing::debug!(error = %refused, "upgrade refused");
                refused.into_response()
            }
        }
    }
}
