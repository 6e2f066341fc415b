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

/// For working on the pages: `TETHER_WEB_DIR=web` serves the embedded files' current versions
/// from that directory (and the client from `clients/js/` beside it), read at each request,
/// so a page's change shows on reload without a rebuild. Only the embedded names are served.
fn from_disk(name: &str) -> Option<Vec<u8>> {
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| std::env::var_os("TETHER_WEB_DIR").map(Into::into));
    let dir = dir.as_ref()?;
    let path = if name == CLIENT.0 {
        dir.join("../clients/js/index.js")
    } else {
        dir.join(name)
    };
    std::fs::read(path).ok()
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
                // Says whose page it is: `tether connect`, pointed at a page, names the
                // WebSocket endpoints instead.
                (header::SERVER, HeaderValue::from_static("tether")),
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
            from_disk(n).map_or_else(
                || axum::body::Body::from(bytes::Bytes::from_static(body)),
                axum::body::Body::from,
            ),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}
