//! The HTTP side: pages, the JSON API, health and metrics, and the WebSocket upgrades.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::Router;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::config::Voters;
use crate::endpoints::web;
use crate::engine::journal::{ChatWrite, Reply};
use crate::engine::store::{CredentialKind, StoreError, Voter};
use crate::engine::Reach;
use crate::identity::auth::{self, Identity, Writer};
use crate::identity::guests::GUEST_COOKIE;
use crate::identity::password::Busy;
use crate::metrics::Refusal;
use crate::node::{Node, Refused, SESSION_COOKIE};
use crate::session;
use crate::throttle::address_key;
use tether::axum::{UpgradeRejection, WebSocketUpgrade};
use tether::handshake::HandshakeError;

/// The most bytes of header fields a request may carry (each name and value with its `: `
/// and line end); more is answered 431. The same as the WebSocket handshake's limit.
pub const MAX_HEADER_BYTES: usize = 16 << 10;

/// Checks a request before it is routed; returns the answer to give instead, if any:
/// - 431 when its header fields exceed [`MAX_HEADER_BYTES`];
/// - for a state-changing method (anything but GET, HEAD and OPTIONS): 415 unless the body is
///   declared `application/json` (a form or a `text/plain` POST from another page of the same
///   site cannot declare it without a CORS preflight, which this server never grants), and
///   403 for a browser `Origin` that is neither the server's own nor allowed.
pub fn precheck(node: &Node, method: &http::Method, headers: &HeaderMap) -> Option<Response> {
    let header_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        node.metrics.refused(Refusal::BadRequest);
        return Some(error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            &format!("request header fields exceed {MAX_HEADER_BYTES} bytes"),
        ));
    }
    if matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::CONNECT
    ) {
        return None;
    }
    if !is_json(headers) {
        return Some(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the body as Content-Type: application/json",
        ));
    }
    node.check_origin(headers)
        .err()
        .map(IntoResponse::into_response)
}

/// Whether the request declares a JSON body (`application/json`, parameters allowed).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// The peer address of a request, set by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// All routes. A WebSocket endpoint answers `GET` (an HTTP/1.1 upgrade) and `CONNECT` (an
/// HTTP/2 extended CONNECT, RFC 8441); the upgrade tells them apart.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/", get(|| async { web::page("index.html") }))
        .route("/polls", get(|| async { web::page("polls.html") }))
        .route("/console", get(|| async { web::page("console.html") }))
        .route(
            "/assets/{name}",
            get(|Path(name): Path<String>| async move { web::page(&name) }),
        )
        .route("/favicon.ico", get(|| async { web::page("favicon.svg") }))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/me", get(me))
        .route("/api/tokens", post(tokens))
        .route("/api/rooms", get(rooms))
        .route("/api/rooms/{room}/messages", get(history).post(publish))
        .route("/api/users/{user}/notifications", post(notify))
        .route("/api/broadcast", post(broadcast))
        .route("/api/polls", get(polls).post(create_poll))
        .route("/api/polls/{id}", get(poll))
        .route("/ws", get(channel_socket).connect(channel_socket))
        .route("/ws/echo", get(echo_socket).connect(echo_socket))
        .route("/ws/rooms/{room}", get(room_socket).connect(room_socket))
        .route("/ws/polls/{id}", get(poll_socket).connect(poll_socket))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such page") })
        .layer(axum::middleware::map_response(json_errors))
        .with_state(node)
}

/// The answers axum makes by itself (a query string that does not parse, a method the route
/// does not take) are plain text or empty; the API answers every error as `{"error": …}`, with
/// the original status and headers (`Allow` on a 405).
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    // These bodies are axum's own short messages; anything longer is cut.
    let text = axum::body::to_bytes(body, 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let reason = match text.trim() {
        "" => status
            .canonical_reason()
            .unwrap_or("refused")
            .to_ascii_lowercase(),
        text => text.to_owned(),
    };
    let mut answer = error(status, &reason);
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().insert(name.clone(), value.clone());
        }
    }
    answer
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response {
    let body = serde_json::to_vec(value).expect("responses serialize");
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// A JSON error answer: `{"error": reason}` with `status`.
pub(crate) fn error(status: StatusCode, reason: &str) -> Response {
    json(status, &serde_json::json!({ "error": reason }))
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        error(self.status, &self.reason)
    }
}

fn store_error(e: &StoreError) -> Response {
    match e {
        StoreError::Limit(why) => return error(StatusCode::FORBIDDEN, why),
        StoreError::Unknown(_) => {
            tracing::warn!(error = %e, "store did not answer in time");
            return error(StatusCode::GATEWAY_TIMEOUT, &e.to_string());
        }
        _ => {}
    }
    tracing::error!(error = %e, "store failed");
    error(StatusCode::INTERNAL_SERVER_ERROR, "storage failed")
}

/// The largest request body accepted: every command of the API is a small JSON object.
pub const MAX_BODY: usize = 64 << 10;

/// Reads a request body of at most [`MAX_BODY`] bytes into one buffer of its own. Each chunk
/// is copied as it arrives, so the transport's buffers are released at once: a body sent a byte
/// at a time costs its bytes, not a buffer per byte. How long it may take is bounded by the
/// request timeout around every request.
///
/// # Errors
/// 413 past the limit (at once when `Content-Length` says so), 400 when the body fails.
async fn read_body(mut body: Body) -> Result<Bytes, Response> {
    use http_body_util::BodyExt as _;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body exceeds {MAX_BODY} bytes"),
        )
    };
    let hint = http_body::Body::size_hint(&body);
    if hint.lower() > MAX_BODY as u64 {
        return Err(too_large());
    }
    let mut buf = bytes::BytesMut::with_capacity(hint.exact().map_or(0, |n| n as usize));
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|_| error(StatusCode::BAD_REQUEST, "the body could not be read"))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > MAX_BODY {
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Refused> {
    serde_json::from_slice(body).map_err(|e| {
        Refused::new(
            StatusCode::BAD_REQUEST,
            Refusal::BadRequest,
            format!("bad JSON body: {e}"),
        )
    })
}

async fn healthz(State(node): State<Arc<Node>>) -> Response {
    if node.is_shutting_down() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    let mut report = serde_json::Map::new();
    if let Some(trouble) = node.trouble() {
        report.insert("redis".into(), trouble.into());
    }
    if node.metrics.storage_failing() {
        // The last write failed (a full disk, a broken database, Redis refusing writes).
        report.insert("storage".into(), "failing".into());
    }
    if report.is_empty() {
        json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
    } else {
        report.insert("status".into(), "degraded".into());
        json(StatusCode::SERVICE_UNAVAILABLE, &report)
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        format!(
            "{}# HELP tether_password_checks_total Password checks run (stand-ins for unknown users included).\n\
             # TYPE tether_password_checks_total counter\n\
             tether_password_checks_total {}\n",
            node.metrics.render(),
            node.passwords.checks()
        ),
    )
        .into_response()
}

#[derive(Deserialize)]
struct Credentials {
    user: String,
    password: String,
}

/// The longest password checked; longer ones are wrong without a check.
const MAX_PASSWORD: usize = 1024;

/// Why a login was not granted.
enum LoginRefused {
    /// Wrong user or password (401).
    Wrong,
    /// Too many failures from this address, or for this account from it (429).
    Throttled(Duration),
    /// Every password-check thread is busy and the queue is full (503).
    Busy,
    /// Any other answer, ready to send.
    Answer(Response),
}

/// An error answer that says when to try again (`Retry-After`, whole seconds, at least 1).
fn retry(status: StatusCode, reason: &str, after: Duration) -> Response {
    let mut response = error(status, reason);
    let secs = after.as_secs_f64().ceil().max(1.0) as u64;
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

/// Spends one of `writer`'s `quota`; when none is left, the 429 to answer, saying what was
/// exceeded and when to retry.
fn spend<K: Eq + std::hash::Hash + Clone>(
    quota: &crate::throttle::Throttle<K>,
    writer: &K,
    what: &str,
) -> Option<Response> {
    let wait = quota.take(writer, Instant::now()).err()?;
    tracing::info!(what, "write quota exceeded");
    Some(retry(
        StatusCode::TOO_MANY_REQUESTS,
        &format!("too many {what}: wait before trying again"),
        wait,
    ))
}

impl IntoResponse for LoginRefused {
    fn into_response(self) -> Response {
        match self {
            LoginRefused::Wrong => error(StatusCode::UNAUTHORIZED, "wrong user or password"),
            LoginRefused::Throttled(after) => retry(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed logins: wait before trying again",
                after,
            ),
            LoginRefused::Busy => retry(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many logins at once: try again",
                Duration::from_secs(1),
            ),
            LoginRefused::Answer(response) => response,
        }
    }
}

/// Checks `c` for a login from `ip`: a failure is spent from the address's and the account's
/// budgets first (cheap, and before the check, so that attempts made at once cannot all pass),
/// then the password is checked on a check thread and a success gives it back. An unknown
/// user costs the same check as a wrong password.
async fn check_password(node: &Node, ip: IpAddr, c: &Credentials) -> Result<(), LoginRefused> {
    if !auth::valid_user(&c.user) || c.password.len() > MAX_PASSWORD {
        // No such user can exist: refused before it can key a budget or reach a check.
        return Err(LoginRefused::Wrong);
    }
    let now = Instant::now();
    let ip = address_key(ip);
    let account = (c.user.to_ascii_lowercase(), ip);
    node.login_failures
        .take(&ip, now)
        .map_err(LoginRefused::Throttled)?;
    if let Err(wait) = node.account_failures.take(&account, now) {
        node.login_failures.refund(&ip, now);
        return Err(LoginRefused::Throttled(wait));
    }
    let refund = || {
        let now = Instant::now();
        node.login_failures.refund(&ip, now);
        node.account_failures.refund(&account, now);
    };
    let hash = match node.password_hash(&c.user).await {
        Ok(hash) => hash,
        Err(e) => {
            refund();
            return Err(LoginRefused::Answer(store_error(&e)));
        }
    };
    match node.passwords.verify(hash, c.password.clone()).await {
        Ok(true) => {
            refund();
            node.account_failures.forgive(&account);
            Ok(())
        }
        Ok(false) => Err(LoginRefused::Wrong),
        Err(Busy) => {
            refund();
            Err(LoginRefused::Busy)
        }
    }
}

async fn issue(
    node: &Node,
    peer: Option<PeerAddr>,
    body: &[u8],
    kind: CredentialKind,
    ttl: Option<Duration>,
) -> Result<(String, String), Response> {
    let c: Credentials = parse(body).map_err(IntoResponse::into_response)?;
    let ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.0.ip());
    if let Err(refused) = check_password(node, ip, &c).await {
        // The name as given, cut short: it may be anything up to the body limit.
        let user: String = c.user.chars().take(64).collect();
        match &refused {
            LoginRefused::Wrong => tracing::warn!(%user, %ip, "login failed"),
            LoginRefused::Throttled(_) => {
                tracing::warn!(%user, %ip, "login refused: too many failures");
            }
            LoginRefused::Busy => tracing::warn!(%ip, "login refused: password checks busy"),
            LoginRefused::Answer(_) => {}
        }
        return Err(refused.into_response());
    }
    let quota = &node.quotas.credentials;
    if let Some(refused) = spend(quota, &c.user.to_ascii_lowercase(), "sessions and tokens") {
        return Err(refused);
    }
    let secret = auth::new_secret();
    let digest = auth::digest(&secret);
    node.add_credential(digest, &c.user, kind, ttl)
        .await
        .map_err(|e| store_error(&e))?;
    Ok((c.user, secret))
}

async fn login(
    State(node): State<Arc<Node>>,
    peer: Option<Extension<PeerAddr>>,
    body: Body,
) -> Response {
    let ttl = node.config.session_lifetime;
    let peer = peer.map(|p| p.0);
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match issue(&node, peer, &body, CredentialKind::Session, Some(ttl)).await {
        Ok((user, secret)) => {
            tracing::info!(%user, "logged in");
            let secure = if node.tls { "; Secure" } else { "" };
            let cookie = format!(
                "{SESSION_COOKIE}={secret}; HttpOnly; SameSite=Lax; Path=/; Max-Age={}{secure}",
                ttl.as_secs()
            );
            let mut response = json(StatusCode::OK, &serde_json::json!({"user": user}));
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
        Err(response) => response,
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LogoutIn {
    /// Revoke every session and token of the user, not only the one presented.
    everywhere: bool,
}

/// Revokes the session cookie and the bearer token the request presents (or, with
/// `{"everywhere": true}`, every credential of their user); connections opened with them close.
async fn logout(State(node): State<Arc<Node>>, headers: HeaderMap, body: Body) -> Response {
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let input: LogoutIn = if body.is_empty() {
        LogoutIn::default()
    } else {
        match parse(&body) {
            Ok(i) => i,
            Err(r) => return r.into_response(),
        }
    };
    // The accounts tell open connections (on every node) when a credential actually went.
    if input.everywhere {
        match node.user(&headers, None).await {
            Ok(Some(user)) => match node.revoke_credentials(&user).await {
                Ok(n) => tracing::info!(%user, revoked = n, "logged out everywhere"),
                Err(e) => return store_error(&e),
            },
            Ok(None) => return error(StatusCode::UNAUTHORIZED, "not logged in"),
            Err(refused) => return refused.into_response(),
        }
    } else {
        let bearer = crate::node::bearer(&headers).map(str::to_owned);
        let presented = node.session(&headers).into_iter().chain(bearer);
        for secret in presented {
            let digest = auth::digest(&secret);
            if let Err(e) = node.delete_credential(digest).await {
                return store_error(&e);
            }
        }
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("tether_session=; HttpOnly; SameSite=Lax; Path=/; Max-Age=0"),
    );
    response
}

async fn me(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    match node.user(&headers, None).await {
        Ok(Some(user)) => json(
            StatusCode::OK,
            &serde_json::json!({"user": user, "guest": false, "guests": node.config.guests}),
        ),
        // Not logged in is an answer, not an error (a page asks on every load, and a 401
        // would be a red line in every guest's console); `guests` tells a page whether to
        // offer a nickname at all. A credential that is bad or expired is still 401.
        Ok(None) => json(
            StatusCode::OK,
            &serde_json::json!({"user": null, "guest": true, "guests": node.config.guests}),
        ),
        Err(refused) => refused.into_response(),
    }
}

async fn tokens(
    State(node): State<Arc<Node>>,
    peer: Option<Extension<PeerAddr>>,
    body: Body,
) -> Response {
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let ttl = node.config.token_lifetime;
    match issue(
        &node,
        peer.map(|p| p.0),
        &body,
        CredentialKind::Token,
        Some(ttl),
    )
    .await
    {
        Ok((user, token)) => {
            tracing::info!(%user, "token issued");
            json(StatusCode::CREATED, &serde_json::json!({"token": token}))
        }
        Err(response) => response,
    }
}

/// The user of a bearer token: the publish API needs one.
async fn token_user(node: &Node, headers: &HeaderMap) -> Result<String, Response> {
    if !headers.contains_key(header::AUTHORIZATION) {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "an API token is required (Authorization: Bearer)",
        ));
    }
    match node.user(headers, None).await {
        Ok(Some(user)) => Ok(user),
        Ok(None) => Err(error(StatusCode::UNAUTHORIZED, "invalid token")),
        Err(refused) => Err(refused.into_response()),
    }
}

#[derive(Deserialize)]
struct RoomsPage {
    after: Option<String>,
    limit: Option<usize>,
}

/// Rooms listed per page by default, and at most.
const ROOMS_PAGE: usize = 100;
const ROOMS_PAGE_MAX: usize = 1000;

/// Rooms with stored messages or members here, in name order, a page at a time: the first
/// `limit` after `after`. A full page links to the next (`Link: <…>; rel="next"`).
async fn rooms(State(node): State<Arc<Node>>, Query(page): Query<RoomsPage>) -> Response {
    let limit = page.limit.unwrap_or(ROOMS_PAGE).clamp(1, ROOMS_PAGE_MAX);
    let after = page.after;
    let stored = match node.stored_rooms(after.as_deref(), limit).await {
        Ok(r) => r,
        Err(e) => return store_error(&e),
    };
    // The page is the first `limit` names after `after` among stored rooms and rooms with
    // members here: whichever page a name falls in, it is listed exactly once.
    let mut all: std::collections::BTreeMap<String, (usize, u64)> =
        std::collections::BTreeMap::new();
    // Users' notification streams are stored as rooms, named to sort after every room: a
    // page that meets one has listed every room before it.
    for (room, last) in stored {
        if !crate::wire::is_personal(&room) {
            all.entry(room).or_default().1 = last;
        }
    }
    for (room, members) in node.rooms.rooms_page(after.as_deref(), limit) {
        all.entry(room).or_default().0 = members;
    }
    let mut list: Vec<(String, (usize, u64))> = all.into_iter().take(limit).collect();
    // Members on every node, not only here.
    let names: Vec<String> = list.iter().map(|(room, _)| room.clone()).collect();
    match node.presence_counts(&names).await {
        Ok(counts) => {
            for ((_, (members, _)), everywhere) in list.iter_mut().zip(counts) {
                *members = (*members).max(everywhere);
            }
        }
        Err(e) => tracing::warn!(error = %e, "member counts of other nodes unavailable"),
    }
    let next = (list.len() == limit).then(|| {
        let last = &list[list.len() - 1].0;
        format!("</api/rooms?after={last}&limit={limit}>; rel=\"next\"")
    });
    let body: Vec<_> = list
        .into_iter()
        .map(|(room, (members, last_id))| serde_json::json!({"room": room, "members": members, "last_id": last_id}))
        .collect();
    let mut response = json(StatusCode::OK, &body);
    if let Some(next) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        response.headers_mut().insert(header::LINK, next);
    }
    response
}

#[derive(Deserialize)]
struct Page {
    since: Option<u64>,
    limit: Option<usize>,
    /// The last `last` messages instead of a page from `since`: what a page shows before
    /// joining (at most 1,000).
    last: Option<usize>,
}

async fn history(
    State(node): State<Arc<Node>>,
    Path(room): Path<String>,
    Query(page): Query<Page>,
) -> Response {
    if !auth::valid_room(&room) {
        return error(StatusCode::BAD_REQUEST, auth::ROOM_RULE);
    }
    if page.last.is_some() && (page.since.is_some() || page.limit.is_some()) {
        return error(
            StatusCode::BAD_REQUEST,
            "last= reads the newest messages: it goes without since= and limit=",
        );
    }
    let since = page.since.unwrap_or(0);
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    let messages = match page.last {
        Some(last) => node.recent(&room, last.min(1000)).await,
        None => node.history(&room, since, u64::MAX, limit).await,
    };
    match messages {
        Ok(messages) => json(StatusCode::OK, &messages),
        Err(e) => store_error(&e),
    }
}

#[derive(Deserialize)]
struct TextIn {
    text: String,
}

fn check_text(node: &Node, text: &str) -> Result<(), Refused> {
    node.text_problem(text).map_or(Ok(()), |reason| {
        Err(Refused::new(
            StatusCode::BAD_REQUEST,
            Refusal::BadRequest,
            reason,
        ))
    })
}

async fn publish(
    State(node): State<Arc<Node>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Credentials and the room first: an anonymous client never gets to make us read a body.
    let user = match token_user(&node, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    if !auth::valid_room(&room) {
        return error(StatusCode::BAD_REQUEST, auth::ROOM_RULE);
    }
    store_text(&node, user, room, &headers, body).await
}

/// `POST /api/users/{user}/notifications`: a notification to every device of a registered
/// user, on its `user:NAME` channel (stored like a room's message, so it resumes and pages).
async fn notify(
    State(node): State<Arc<Node>>,
    Path(to): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let user = match token_user(&node, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    if !auth::valid_user(&to) {
        return error(StatusCode::NOT_FOUND, "no such user");
    }
    let to = match node.user_named_like(&to).await {
        Ok(Some(name)) => name,
        Ok(None) => return error(StatusCode::NOT_FOUND, "no such user"),
        Err(e) => return store_error(&e),
    };
    store_text(&node, user, crate::wire::personal(&to), &headers, body).await
}

/// Stores the text of `body` (`{"text": …}`, idempotent by the `Idempotency-Key` header) from
/// `user` in `room`'s stream, which delivers it: 201 with the stored message.
async fn store_text(
    node: &Node,
    user: String,
    room: String,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    if let Some(refused) = spend(&node.quotas.publishes, &user, "publishes") {
        return refused;
    }
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let input: TextIn = match parse(&body) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = check_text(node, &input.text) {
        return r.into_response();
    }
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(key)) if auth::valid_key(key) => Some(key),
        Some(_) => return error(StatusCode::BAD_REQUEST, auth::KEY_RULE),
    };
    let stored = Reply::wait(|reply| {
        node.publish(ChatWrite {
            writer: Writer::User(user.as_str().into()),
            room,
            user,
            text: input.text,
            key: key.map(str::to_owned),
            reply,
        })
    })
    .await;
    match stored {
        Ok(message) => json(StatusCode::CREATED, &message),
        Err(e) => store_error(&e),
    }
}

async fn broadcast(State(node): State<Arc<Node>>, headers: HeaderMap, body: Body) -> Response {
    let user = match token_user(&node, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    if let Some(refused) = spend(&node.quotas.publishes, &user, "publishes") {
        return refused;
    }
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let input: TextIn = match parse(&body) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = check_text(&node, &input.text) {
        return r.into_response();
    }
    match node.broadcast(&user, &input.text).await {
        Ok(Reach::Connections(delivered)) => {
            tracing::info!(%user, delivered, "broadcast");
            json(StatusCode::OK, &serde_json::json!({"delivered": delivered}))
        }
        Ok(Reach::Nodes(nodes)) => {
            tracing::info!(%user, nodes, "broadcast");
            json(StatusCode::OK, &serde_json::json!({"nodes": nodes}))
        }
        Err(e) => store_error(&e),
    }
}

#[derive(Deserialize)]
struct NewPoll {
    question: String,
    options: Vec<String>,
}

async fn create_poll(
    State(node): State<Arc<Node>>,
    peer: Option<Extension<PeerAddr>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let user = match node.user(&headers, None).await {
        Ok(None) if !node.config.guests => {
            return error(StatusCode::UNAUTHORIZED, "log in to create a poll")
        }
        Err(refused) => return refused.into_response(),
        Ok(user) => user,
    };
    let writer = Writer::new(user.as_deref(), peer.map(|p| p.0 .0.ip()));
    if let Some(refused) = spend(&node.quotas.polls, &writer, "polls") {
        return refused;
    }
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let new: NewPoll = match parse(&body) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let question = new.question.trim().to_owned();
    let options: Vec<String> = new.options.iter().map(|o| o.trim().to_owned()).collect();
    let distinct = options
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        == options.len();
    if question.is_empty()
        || question.chars().count() > 200
        || !(2..=20).contains(&options.len())
        || !distinct
        || options
            .iter()
            .any(|o| o.is_empty() || o.chars().count() > 100)
    {
        return error(
            StatusCode::BAD_REQUEST,
            "a poll has a question of 1-200 characters and 2-20 distinct options of 1-100",
        );
    }
    if !auth::valid_text(&question) || !options.iter().all(|o| auth::valid_text(o)) {
        return error(StatusCode::BAD_REQUEST, auth::FORBIDDEN_CHARS);
    }
    match node.create_poll(&question, &options).await {
        Ok(poll) => json(StatusCode::CREATED, &poll),
        Err(e) => store_error(&e),
    }
}

async fn polls(State(node): State<Arc<Node>>) -> Response {
    match node.polls(50).await {
        Ok(polls) => json(StatusCode::OK, &polls),
        Err(e) => store_error(&e),
    }
}

async fn poll(State(node): State<Arc<Node>>, Path(id): Path<i64>) -> Response {
    match node.poll(id, None).await {
        Ok((Some(poll), _)) => json(StatusCode::OK, &poll),
        Ok((None, _)) => error(StatusCode::NOT_FOUND, "no such poll"),
        Err(e) => store_error(&e),
    }
}

#[derive(Deserialize, Default)]
struct SocketQuery {
    since: Option<u64>,
    epoch: Option<String>,
    name: Option<String>,
    token: Option<String>,
}

/// Refuses an upgrade: counted, logged, answered with its status.
fn refuse(node: &Node, peer: Option<SocketAddr>, refused: Refused) -> Response {
    node.metrics.refused(refused.kind);
    tracing::info!(peer = ?peer, status = refused.status.as_u16(), reason = %refused.reason, "upgrade refused");
    refused.into_response()
}

/// Refuses an upgrade. To a client of the channel protocol, a refusal that retrying cannot
/// heal is told in a connection it can read: the upgrade is accepted, then a `disconnect` push
/// and a close with the refusal's code (a browser never sees an upgrade's HTTP status). Other
/// refusals, and any to other endpoints, are the HTTP status.
fn refuse_upgrade(
    node: &Arc<Node>,
    peer: Option<SocketAddr>,
    endpoint: Endpoint,
    ws: WebSocketUpgrade,
    refused: Refused,
) -> Response {
    let (Endpoint::Channels, Some(code)) = (endpoint, refused.close) else {
        return refuse(node, peer, refused);
    };
    // The short-lived connection still counts against the limits.
    let slot = match node.slot(peer.map(|p| p.ip())) {
        Ok(slot) => slot,
        Err(busy) => return refuse(node, peer, busy),
    };
    node.metrics.refused(refused.kind);
    tracing::info!(peer = ?peer, code, reason = %refused.reason, "channel connection refused: telling the client");
    match ws.accept() {
        Ok((response, pending)) => {
            let node = node.clone();
            tokio::spawn(async move {
                if let Ok(socket) = pending.await {
                    crate::session::channels::refused(&node, socket, code, &refused.reason).await;
                }
                drop(slot);
            });
            response
        }
        Err(rejection) => refuse(node, peer, upgrade_refusal(rejection)),
    }
}

/// What an endpoint asks of an upgrade.
#[derive(Clone, Copy)]
enum Endpoint {
    /// Any client: no identity (`/ws/echo`).
    Anonymous,
    /// A user or a guest (the single-channel endpoints).
    Identified,
    /// A user or a guest offering the channel protocol's subprotocol (`/ws`).
    Channels,
}

/// The checks every upgrade passes (Origin, identity, limits), then the upgrade itself; the
/// session runs in its own task.
async fn upgrade<F, Fut>(
    node: Arc<Node>,
    req: Request,
    query: SocketQuery,
    endpoint: Endpoint,
    session: F,
) -> Response
where
    F: FnOnce(
            Arc<Node>,
            tether::upgrade::UpgradedWebSocket,
            crate::node::Slot,
            session::Member,
        ) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (mut parts, _) = req.into_parts();
    let peer = parts.extensions.get::<PeerAddr>().map(|p| p.0);
    // The request must be an upgrade that the WebSocket configuration accepts (its Origin
    // policy, its head limit) before anything else is spent on it.
    let config = match endpoint {
        Endpoint::Channels => node.channels_config.clone(),
        Endpoint::Anonymous | Endpoint::Identified => node.ws_config.clone(),
    };
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws.config(config),
        Err(rejection) => return refuse(&node, peer, upgrade_refusal(rejection)),
    };
    let unsupported = matches!(endpoint, Endpoint::Channels)
        && !ws
            .offered_protocols()
            .any(|p| p == crate::session::channels::PROTOCOL);
    // A client of another version of the protocol is told in it, since a browser cannot
    // read an upgrade's status; anything else is not a client of the protocol at all.
    let other_version = unsupported
        && ws
            .offered_protocols()
            .any(|p| p.starts_with(crate::session::channels::FAMILY));
    if unsupported && !other_version {
        let reason = "offer the tether.v1 subprotocol (Sec-WebSocket-Protocol: tether.v1)";
        return refuse(
            &node,
            peer,
            Refused::new(StatusCode::BAD_REQUEST, Refusal::BadRequest, reason),
        );
    }
    let needs_identity = !matches!(endpoint, Endpoint::Anonymous);
    if let Err(rejection) = ws.check() {
        return refuse(&node, peer, upgrade_refusal(rejection));
    }
    if other_version {
        let reason = "unsupported protocol version: this server speaks tether.v1";
        let refused = Refused::new(StatusCode::BAD_REQUEST, Refusal::BadRequest, reason)
            .closing(crate::node::refusal_code::UNSUPPORTED_VERSION);
        return refuse_upgrade(&node, peer, endpoint, ws, refused);
    }
    let headers = &parts.headers;
    let revocations = node.revocations();
    let (who, credential) = if needs_identity {
        match node
            .identify(
                headers,
                query.token.as_deref(),
                query.name.as_deref(),
                // A channel-protocol client may connect without an identity, to watch.
                matches!(endpoint, Endpoint::Channels),
            )
            .await
        {
            Ok(found) => found,
            Err(refused) => return refuse_upgrade(&node, peer, endpoint, ws, refused),
        }
    } else {
        (Identity::Guest(String::new()), None)
    };
    // A guest's nickname belongs to that guest (its cookie) while any connection uses it.
    let mut nickname = None;
    let mut new_guest = None;
    let mut voter = match &who {
        Identity::User(name) => Some(Voter {
            key: name.clone(),
            guest: None,
        }),
        Identity::Guest(_) => None,
    };
    if let (true, Identity::Guest(name)) = (needs_identity && !who.is_anonymous(), &who) {
        let (guest, is_new) = node.guest_id(headers);
        if node.config.poll_voters == Voters::Everyone {
            let address = peer.map_or_else(String::new, |p| address_key(p.ip()).to_string());
            voter = Some(Voter {
                key: format!("guest:{guest}"),
                guest: Some((address, node.config.guest_votes_per_address)),
            });
        }
        let taken = || {
            Refused::new(
                StatusCode::CONFLICT,
                Refusal::Auth,
                "this nickname is in use by another guest: pick another",
            )
            .closing(crate::node::refusal_code::NAME_REFUSED)
        };
        let Some(hold) = node.nicknames.hold(name, &guest) else {
            return refuse_upgrade(&node, peer, endpoint, ws, taken());
        };
        // Not held by a guest on another node either.
        match node.claim_name(hold.key(), &guest).await {
            Ok(true) => {}
            Ok(false) => return refuse_upgrade(&node, peer, endpoint, ws, taken()),
            Err(e) => {
                tracing::warn!(error = %e, "nickname not claimed on the other nodes: checked on this node only");
            }
        }
        nickname = Some(hold);
        new_guest = is_new.then_some(guest);
    }
    let mut slot = match node.slot(peer.map(|p| p.ip())) {
        Ok(slot) => slot,
        Err(refused) => return refuse(&node, peer, refused),
    };
    if let Some(hold) = nickname {
        slot.keep(hold);
    }
    if let Some(stream) = parts
        .extensions
        .remove::<Arc<crate::node::gate::StreamUse>>()
    {
        slot.occupy(stream);
    }
    match ws.accept() {
        Ok((mut response, pending)) => {
            if let Some(guest) = new_guest {
                let secure = if node.tls { "; Secure" } else { "" };
                let cookie = format!(
                    "{GUEST_COOKIE}={guest}; HttpOnly; SameSite=Lax; Path=/; Max-Age=31536000{secure}"
                );
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    response.headers_mut().insert(header::SET_COOKIE, v);
                }
            }
            // The task of an idle connection should hold its session and little else: the
            // upgrade's future and what the session starts from wait in allocations of their
            // own, freed as the session starts, which is itself boxed in a block that ends
            // before it is awaited (a value alive across an `.await` stays in the task's state).
            let pending = Box::pin(pending);
            let direct =
                node.config.direct_fanout && !node.tls && parts.version == http::Version::HTTP_11;
            if parts.version == http::Version::HTTP_2 {
                node.metrics
                    .http2_websockets_total
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let writer = Writer::new((!who.is_guest()).then(|| who.name()), peer.map(|p| p.ip()));
            let start = Box::new((
                node,
                slot,
                session,
                who,
                credential,
                voter,
                revocations,
                writer,
            ));
            tokio::spawn(async move {
                let session = match pending.await {
                    Ok(socket) => {
                        let (node, slot, session, who, credential, voter, revocations, writer) =
                            session::unbox(start);
                        let member = session::Member {
                            who,
                            credential,
                            voter,
                            revocations,
                            writer,
                            direct,
                        };
                        Box::pin(session(node, socket, slot, member))
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "upgrade did not complete");
                        return;
                    }
                };
                session.await;
            });
            response
        }
        Err(rejection) => refuse(&node, peer, upgrade_refusal(rejection)),
    }
}

/// What a request that is not an acceptable upgrade is answered with.
fn upgrade_refusal(rejection: UpgradeRejection) -> Refused {
    if let UpgradeRejection::Handshake(HandshakeError::OriginRefused(origin)) = &rejection {
        tracing::warn!(%origin, "cross-origin request refused");
        return Refused::new(StatusCode::FORBIDDEN, Refusal::Origin, "origin not allowed");
    }
    let status = StatusCode::from_u16(rejection.status()).unwrap_or(StatusCode::BAD_REQUEST);
    Refused::new(status, Refusal::BadRequest, rejection.to_string())
}

async fn echo_socket(State(node): State<Arc<Node>>, req: Request) -> Response {
    upgrade(
        node,
        req,
        SocketQuery::default(),
        Endpoint::Anonymous,
        |node, socket, slot, _| session::echo(node, socket, slot),
    )
    .await
}

async fn room_socket(
    State(node): State<Arc<Node>>,
    Path(room): Path<String>,
    Query(query): Query<SocketQuery>,
    req: Request,
) -> Response {
    if !auth::valid_room(&room) {
        node.metrics.refused(Refusal::BadRequest);
        return error(StatusCode::BAD_REQUEST, auth::ROOM_RULE);
    }
    let resume = session::Resume {
        since: query.since,
        // Epochs are 16 hex digits: anything long is not one (and is not worth logging).
        epoch: query
            .epoch
            .clone()
            .map(|e| if e.len() <= 64 { e } else { String::new() }),
    };
    upgrade(
        node,
        req,
        query,
        Endpoint::Identified,
        move |node, socket, slot, member| {
            session::channels::room(node, socket, slot, room, member, resume)
        },
    )
    .await
}

async fn poll_socket(
    State(node): State<Arc<Node>>,
    Path(id): Path<i64>,
    Query(query): Query<SocketQuery>,
    req: Request,
) -> Response {
    let poll = match node.poll(id, None).await {
        Ok((Some(poll), _)) => poll.id,
        Ok((None, _)) => {
            node.metrics.refused(Refusal::NotFound);
            return error(StatusCode::NOT_FOUND, "no such poll");
        }
        Err(e) => return store_error(&e),
    };
    upgrade(
        node,
        req,
        query,
        Endpoint::Identified,
        move |node, socket, slot, member| session::channels::poll(node, socket, slot, poll, member),
    )
    .await
}

/// `/ws`: the channel protocol (docs/protocol.md).
async fn channel_socket(
    State(node): State<Arc<Node>>,
    Query(query): Query<SocketQuery>,
    req: Request,
) -> Response {
    upgrade(
        node,
        req,
        query,
        Endpoint::Channels,
        crate::session::channels::session,
    )
    .await
}
