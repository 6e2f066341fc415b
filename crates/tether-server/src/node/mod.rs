//! The node: the one [`Node`] every endpoint and session calls, over the engine, with the
//! hub that fans out to this node's connections, connection slots and shutdown.

mod calls;
pub mod gate;
pub mod hub;
pub mod rooms;
pub mod wakers;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, StatusCode};
use tokio::sync::watch;

use crate::config::ServerConfig;
use crate::engine::store::{CredentialKind, StoreError};
use crate::identity::auth::{self, Identity, Writer};
use crate::identity::guests::{NickHold, Nicknames, GUEST_COOKIE};
use crate::identity::password::PasswordChecker;
use crate::metrics::{Metrics, Refusal};
use crate::node::gate::{Full, Gate, Pass};
use crate::node::hub::Hub;
use crate::node::rooms::Rooms;
use crate::throttle::Throttle;

/// The name of the session cookie.
pub const SESSION_COOKIE: &str = "tether_session";

/// A refusal to answer: the status and a one-line reason for the client and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The HTTP status.
    pub status: StatusCode,
    /// Why.
    pub reason: String,
    /// What to count it as, if it is an upgrade failure.
    pub kind: Refusal,
    /// For a refusal that retrying cannot heal: the close code a client of the channel
    /// protocol is told instead, in a connection it can read (a browser cannot read an
    /// upgrade's HTTP status). See docs/protocol.md, "Disconnect codes".
    pub close: Option<u16>,
}

/// Close codes of permanent refusals (docs/protocol.md).
pub mod refusal_code {
    /// The credentials are wrong or missing.
    pub const BAD_CREDENTIALS: u16 = 4501;
    /// The name is taken or not allowed.
    pub const NAME_REFUSED: u16 = 4503;
    /// Guests are not allowed.
    pub const NO_GUESTS: u16 = 4504;
    /// The client offered only versions of the channel protocol this server does not speak.
    pub const UNSUPPORTED_VERSION: u16 = 4505;
}

impl Refused {
    /// A refusal.
    pub fn new(status: StatusCode, kind: Refusal, reason: impl Into<String>) -> Refused {
        Refused {
            status,
            reason: reason.into(),
            kind,
            close: None,
        }
    }

    /// Marks the refusal as permanent, told to a channel-protocol client with `code`.
    pub fn closing(mut self, code: u16) -> Refused {
        self.close = Some(code);
        self
    }

    fn store(e: &StoreError) -> Refused {
        tracing::error!(error = %e, "store failed");
        Refused::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Refusal::BadRequest,
            "storage failed",
        )
    }
}

/// Everything shared.
#[derive(Debug)]
pub struct Node {
    /// The settings.
    pub config: ServerConfig,
    /// The WebSocket settings every socket shares.
    pub ws_config: Arc<tether::Config>,
    /// The same for the channel protocol's endpoint, which speaks `tether.v1`.
    pub channels_config: Arc<tether::Config>,
    /// Subscriptions and fan-out.
    pub hub: Arc<Hub>,
    /// Rooms and polls, as channels of the hub.
    pub rooms: Arc<Rooms>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Whether the port speaks TLS.
    pub tls: bool,
    /// Where every piece of state lives: this process and its SQLite file, or Redis.
    /// Reached only through the node's calls.
    engine: crate::engine::Engine,
    /// Password checks: a fixed pool of threads behind a bounded queue.
    pub passwords: PasswordChecker,
    /// Failed logins per address.
    pub login_failures: Throttle<IpAddr>,
    /// Failed logins per account at one address.
    pub account_failures: Throttle<(String, IpAddr)>,
    /// Quotas on writes to storage, per identity.
    pub quotas: Quotas,
    /// Guest nicknames in use, each held by one guest.
    pub nicknames: Arc<Nicknames>,
    /// Reverse proxies allowed to name the client's address.
    pub trusted_proxies: Vec<crate::proxy::Cidr>,
    /// Sessions to wake at shutdown that the hub does not know (echo).
    pub wakers: crate::node::wakers::Wakers,
    shutting_down: AtomicBool,
    sockets: Arc<Gate>,
    /// Rooms a first member started lately ([`Node::may_join_room`]), and when: others
    /// joining at the same moment, before the first is in the hub, are not charged again.
    started: std::sync::Mutex<HashMap<Box<str>, Instant>>,
}

/// How long a room a first member started counts as started without members in the hub:
/// the time its first member's join takes at most.
const STARTING: Duration = Duration::from_secs(10);

/// Addresses (and account-address pairs, identities) whose budgets are remembered at most.
const THROTTLE_CAPACITY: usize = 100_000;

/// The token of an `Authorization: Bearer …` header (the scheme in any case), if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The stored credential (session or token) a connection was opened with, so that it can be
/// checked again while the connection lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credential {
    digest: [u8; 32],
    kind: CredentialKind,
}

/// What a client is told when its identity has used up `identity_message_rate`.
pub const IDENTITY_RATE_REFUSAL: &str =
    "too many messages from you over all your connections: slow down";

/// Budgets on what clients may store: polls, credentials, API publishes.
#[derive(Debug)]
pub struct Quotas {
    /// Polls created.
    pub polls: Throttle<Writer>,
    /// Sessions and tokens issued, per user.
    pub credentials: Throttle<String>,
    /// Messages and broadcasts published through the HTTP API, per user.
    pub publishes: Throttle<String>,
    /// Chat messages and votes sent over sockets, per user or guest address, over all its
    /// connections.
    pub socket_messages: Throttle<Writer>,
    /// Rooms brought into being, per user or guest address: by a first message, or by a
    /// first member joining a room that has none ([`Node::may_join_room`]). Shared with the
    /// journal and the cluster's appender.
    pub rooms: crate::engine::journal::RoomQuota,
}

impl Quotas {
    fn new(config: &ServerConfig, rooms: crate::engine::journal::RoomQuota) -> Quotas {
        let per_hour = |n: u32| Duration::from_secs(3600) / n.max(1);
        Quotas {
            polls: Throttle::new(
                config.polls_per_hour,
                per_hour(config.polls_per_hour),
                THROTTLE_CAPACITY,
            ),
            credentials: Throttle::new(
                config.credentials_per_hour,
                per_hour(config.credentials_per_hour),
                THROTTLE_CAPACITY,
            ),
            publishes: Throttle::new(
                config.api_publish_rate.saturating_mul(2),
                Duration::from_secs(1) / config.api_publish_rate.max(1),
                THROTTLE_CAPACITY,
            ),
            socket_messages: Throttle::new(
                config.identity_message_rate.saturating_mul(2),
                Duration::from_secs(1) / config.identity_message_rate.max(1),
                THROTTLE_CAPACITY,
            ),
            rooms,
        }
    }
}

/// A place among the server's WebSocket connections (and a guest's hold on its nickname);
/// freed on drop.
#[derive(Debug)]
pub struct Slot {
    node: Arc<Node>,
    _pass: Pass,
    /// What only some connections hold, boxed so that a session without it stays small.
    holds: Option<Box<Holds>>,
}

/// What a [`Slot`] may hold besides its place.
#[derive(Debug, Default)]
struct Holds {
    /// A guest's hold on its nickname.
    nickname: Option<NickHold>,
    /// The HTTP/2 stream the WebSocket runs on, counted in use while it lasts.
    stream: Option<Arc<gate::StreamUse>>,
}

impl Slot {
    fn holds(&mut self) -> &mut Holds {
        self.holds.get_or_insert_with(Box::default)
    }

    /// Keeps `hold` on a guest's nickname for as long as this connection lasts.
    pub fn keep(&mut self, hold: NickHold) {
        self.holds().nickname = Some(hold);
    }

    /// Counts the HTTP/2 stream the WebSocket runs on as in use for as long as it lasts.
    pub fn occupy(&mut self, stream: Arc<gate::StreamUse>) {
        self.holds().stream = Some(stream);
    }

    /// Frees the nickname now, rather than after the close handshake (the guest may be
    /// reconnecting already).
    pub fn release_nickname(&mut self) {
        if let Some(holds) = &mut self.holds {
            holds.nickname = None;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.node.metrics.connections.fetch_sub(1, Relaxed);
    }
}

impl Node {
    /// Assembles the shared state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: ServerConfig,
        ws_config: tether::Config,
        rooms: Arc<Rooms>,
        metrics: Arc<Metrics>,
        tls: bool,
        engine: crate::engine::Engine,
        trusted_proxies: Vec<crate::proxy::Cidr>,
        room_quota: crate::engine::journal::RoomQuota,
    ) -> std::io::Result<Arc<Node>> {
        let passwords = PasswordChecker::start(config.password_threads, config.password_queue)?;
        let config_limits = (config.max_connections, config.max_connections_per_ip);
        let login_failures = Throttle::new(
            config.login_failures_per_address,
            Duration::from_secs(10),
            THROTTLE_CAPACITY,
        );
        let account_failures = Throttle::new(
            config.login_failures_per_account,
            Duration::from_secs(60),
            THROTTLE_CAPACITY,
        );
        let quotas = Quotas::new(&config, room_quota);
        Ok(Arc::new(Node {
            engine,
            nicknames: Nicknames::new(),
            trusted_proxies,
            wakers: crate::node::wakers::Wakers::default(),
            quotas,
            passwords,
            login_failures,
            account_failures,
            config,
            channels_config: Arc::new(
                ws_config
                    .clone()
                    .protocols(vec![crate::wire::channels::PROTOCOL.to_owned()]),
            ),
            ws_config: Arc::new(ws_config),
            hub: rooms.hub().clone(),
            rooms,
            metrics,
            tls,
            shutting_down: AtomicBool::new(false),
            sockets: Gate::new(config_limits.0, config_limits.1),
            started: std::sync::Mutex::default(),
        }))
    }

    /// Marks the server as shutting down (health turns 503, upgrades are refused) and wakes
    /// every WebSocket session, which then closes with 1001.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Relaxed);
        self.hub.wake_all();
        self.wakers.wake_all();
    }

    /// Charges one message a client sent over a socket (a chat message, a vote, an event such
    /// as typing) to `writer`, over all its connections whichever endpoint they came through:
    /// `false` when its budget (`identity_message_rate`) is spent, and the message is refused
    /// ([`IDENTITY_RATE_REFUSAL`]) while its connections stay.
    pub fn spend_socket_message(&self, writer: &Writer) -> bool {
        let spent = self
            .quotas
            .socket_messages
            .take(writer, std::time::Instant::now())
            .is_err();
        if spent {
            self.metrics.rate_limited.fetch_add(1, Relaxed);
        }
        !spent
    }

    /// Whether `writer` may join `room`. A room that exists (members on this node, or stored
    /// messages) is open to anyone; joining one that does not brings it into being, which
    /// takes a token of the writer's `rooms_per_hour` (the same budget a first message
    /// spends, so a room is paid for once) and room under `max_rooms` among the rooms with
    /// members here. A user's own notification stream is not a room anyone starts.
    ///
    /// # Errors
    /// [`StoreError::Limit`] with the reason to tell the client; another [`StoreError`] when
    /// storage could not say whether the room exists.
    pub async fn may_join_room(&self, room: &str, writer: &Writer) -> Result<(), StoreError> {
        if crate::wire::is_personal(room) || self.rooms.has_room(room) {
            return Ok(());
        }
        if self.has_messages(room).await? {
            return Ok(());
        }
        // Checked and charged in one step, with no wait between: of several first members
        // joining at once, one starts the room and pays for it.
        let now = Instant::now();
        let mut started = self
            .started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        started.retain(|_, at| now.duration_since(*at) < STARTING);
        if started.contains_key(room) {
            return Ok(());
        }
        if self.rooms.room_count() >= self.config.max_rooms {
            self.metrics.rate_limited.fetch_add(1, Relaxed);
            return Err(StoreError::Limit(format!(
                "the server holds at most {} rooms with members (max_rooms): join an existing room",
                self.config.max_rooms
            )));
        }
        if self.quotas.rooms.take(writer, now).is_err() {
            self.metrics.rate_limited.fetch_add(1, Relaxed);
            return Err(StoreError::Limit(
                crate::engine::journal::ROOM_QUOTA.to_owned(),
            ));
        }
        // At most `max_rooms` remembered: past it, a late joiner may be charged again.
        if started.len() < self.config.max_rooms {
            started.insert(room.into(), now);
        }
        Ok(())
    }

    /// Whether the server is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Relaxed)
    }

    /// Takes a connection slot, within the total and per-address limits (IPv6 addresses
    /// count by their /64).
    ///
    /// # Errors
    /// 503 when the server is full or shutting down, 429 when `ip` has too many.
    pub fn slot(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Slot, Refused> {
        if self.is_shutting_down() {
            return Err(Refused::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Refusal::Limit,
                "shutting down",
            ));
        }
        let pass = self.sockets.enter(ip).map_err(|full| match full {
            Full::Total => Refused::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Refusal::Limit,
                "too many connections",
            ),
            Full::Address => Refused::new(
                StatusCode::TOO_MANY_REQUESTS,
                Refusal::Limit,
                "too many connections from this address",
            ),
        })?;
        self.metrics.connections.fetch_add(1, Relaxed);
        self.metrics.connections_total.fetch_add(1, Relaxed);
        Ok(Slot {
            node: self.clone(),
            _pass: pass,
            holds: None,
        })
    }

    /// The registered user a bearer token (header, or `query_token` on an upgrade) or a
    /// session cookie proves; `None` when the request carries neither.
    ///
    /// # Errors
    /// 401 for a token that is not valid (a stale session cookie is ignored instead, so a
    /// browser that kept one can still join as a guest).
    pub async fn user(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<Option<String>, Refused> {
        Ok(self
            .user_and_credential(headers, query_token)
            .await?
            .map(|(user, _)| user))
    }

    /// [`Node::user`], with the credential that proves it.
    ///
    /// # Errors
    /// As [`Node::user`].
    pub async fn user_and_credential(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<Option<(String, Credential)>, Refused> {
        let bearer = bearer(headers).or(query_token);
        if let Some(token) = bearer {
            let d = auth::digest(token);
            let credential = Credential {
                digest: d,
                kind: CredentialKind::Token,
            };
            return match self
                .engine
                .accounts
                .credential_user(d, CredentialKind::Token)
                .await
            {
                Ok(Some(user)) => Ok(Some((user, credential))),
                Ok(None) => {
                    Err(
                        Refused::new(StatusCode::UNAUTHORIZED, Refusal::Auth, "invalid token")
                            .closing(refusal_code::BAD_CREDENTIALS),
                    )
                }
                Err(e) => Err(Refused::store(&e)),
            };
        }
        if let Some(session) = self.session(headers) {
            let d = auth::digest(&session);
            let credential = Credential {
                digest: d,
                kind: CredentialKind::Session,
            };
            return match self
                .engine
                .accounts
                .credential_user(d, CredentialKind::Session)
                .await
            {
                Ok(user) => Ok(user.map(|user| (user, credential))),
                Err(e) => Err(Refused::store(&e)),
            };
        }
        Ok(None)
    }

    /// Whether `credential` is still valid (not revoked, not expired). A storage failure
    /// counts as valid: an outage must not log everyone out.
    pub async fn credential_valid(&self, credential: Credential) -> bool {
        let Credential { digest, kind } = credential;
        !matches!(
            self.engine.accounts.credential_user(digest, kind).await,
            Ok(None)
        )
    }

    /// Revocations from now on, for [`Node::credential_lost`]: take it before checking a
    /// credential, so that a revocation between the check and the session is not missed.
    pub fn revocations(&self) -> watch::Receiver<u64> {
        self.engine.revocations.subscribe()
    }

    /// Resolves once `credential` is revoked or expired: checked again at every revocation on
    /// this server since `revoked` was taken, and every `every` (revocations by another
    /// process, expiry).
    pub async fn credential_lost(
        &self,
        credential: Credential,
        mut revoked: watch::Receiver<u64>,
        every: std::time::Duration,
    ) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                changed = revoked.changed() => if changed.is_err() {
                    return std::future::pending().await;
                },
            }
            if !self.credential_valid(credential).await {
                return;
            }
        }
    }

    /// The guest id of the request's `tether_guest` cookie, or a new one (`true`: to be set).
    pub fn guest_id(&self, headers: &HeaderMap) -> (String, bool) {
        let known = headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|h| auth::cookie(h, GUEST_COOKIE))
            .filter(|id| (16..=64).contains(&id.len()));
        match known {
            Some(id) => (id.to_owned(), false),
            None => (auth::new_secret(), true),
        }
    }

    /// What is wrong with a chat or broadcast text, if anything (see
    /// [`auth::text_problem`]).
    pub fn text_problem(&self, text: &str) -> Option<String> {
        auth::text_problem(text, self.config.max_text)
    }

    /// The session secret of the request's cookie, if any.
    pub fn session(&self, headers: &HeaderMap) -> Option<String> {
        headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|h| auth::cookie(h, SESSION_COOKIE))
            .map(str::to_owned)
    }

    /// Who opens a socket: a token or session's user (with that credential), else a guest with
    /// `name`, else (when `anonymous` allows it) a visitor without an identity.
    ///
    /// # Errors
    /// 401 for a bad token, no identity at all (unless `anonymous`), a guest when guests are off, or a nickname
    /// that belongs to a registered user; 400 for an invalid nickname.
    pub async fn identify(
        &self,
        headers: &HeaderMap,
        token: Option<&str>,
        name: Option<&str>,
        anonymous: bool,
    ) -> Result<(Identity, Option<Credential>), Refused> {
        if let Some((user, credential)) = self.user_and_credential(headers, token).await? {
            return Ok((Identity::User(user), Some(credential)));
        }
        if name.is_none() && anonymous {
            return Ok((Identity::Guest(String::new()), None));
        }
        let Some(name) = name else {
            return Err(Refused::new(
                StatusCode::UNAUTHORIZED,
                Refusal::Auth,
                "log in, pass a token, or pick a nickname with ?name=",
            )
            .closing(refusal_code::BAD_CREDENTIALS));
        };
        if !self.config.guests {
            return Err(Refused::new(
                StatusCode::UNAUTHORIZED,
                Refusal::Auth,
                "guests are not allowed here: log in",
            )
            .closing(refusal_code::NO_GUESTS));
        }
        if !auth::valid_user(name) {
            return Err(Refused::new(
                StatusCode::BAD_REQUEST,
                Refusal::BadRequest,
                "a nickname is 1-32 of A-Z a-z 0-9 _ - .",
            )
            .closing(refusal_code::NAME_REFUSED));
        }
        match self.user_named_like(name).await {
            Ok(Some(_)) => Err(Refused::new(
                StatusCode::UNAUTHORIZED,
                Refusal::Auth,
                "this name belongs to a registered user: log in",
            )
            .closing(refusal_code::NAME_REFUSED)),
            Ok(None) => Ok((Identity::Guest(name.to_owned()), None)),
            Err(e) => Err(Refused::store(&e)),
        }
    }

    /// Checks the `Origin` of a browser request (an upgrade, or a request that changes state)
    /// against the server's own and the allowed list; a request without one (not a browser)
    /// passes.
    ///
    /// # Errors
    /// 403 for any other origin.
    pub fn check_origin(&self, headers: &HeaderMap) -> Result<(), Refused> {
        let Some(origin) = headers.get(http::header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().unwrap_or("");
        let host = headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok());
        let scheme = if self.tls { "https" } else { "http" };
        if auth::origin_allowed(origin, scheme, host, &self.config.allow_origins) {
            Ok(())
        } else {
            tracing::warn!(%origin, "cross-origin request refused");
            Err(Refused::new(
                StatusCode::FORBIDDEN,
                Refusal::Origin,
                "origin not allowed",
            ))
        }
    }
}
