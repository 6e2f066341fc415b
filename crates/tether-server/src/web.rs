//! The pages, embedded in the binary (no CDN, works offline).

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};

macro_rules! files {
    ($($name:literal),* $(,)?) => {
        const FILES: &[(&str, &[u8])] = &[
            $(($name, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../web/", $name)))),*
        ];
    };
}

files!(
    "index.html",
    "polls.html",
    "console.html",
    "assets/style.css",
    "assets/common.js",
    "assets/chat.js",
    "assets/polls.js",
    "assets/console.js",
    "assets/favicon.svg",
);

/// The channel protocol's JavaScript client (clients/js), for the pages and for any page of
/// another application that talks to this server: `/assets/tether-client.js`.
const CLIENT: (&str, &[u8]) = (
    "assets/tether-client.js",
    include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../clients/js/index.js"
    )),
);

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

/// The embedded file `name` (a page, or an asset by its name under `assets/`).
pub fn page(name: &str) -> Response {
    let found = FILES
        .iter()
        .chain(std::iter::once(&CLIENT))
        .find(|(n, _)| *n == name || n.strip_prefix("assets/") == Some(name));
    match found {
        Some((n, body)) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(content_type(n)),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                (
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(
                        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; frame-ancestors 'self'",
                    ),
                ),
                (
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                ),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}
