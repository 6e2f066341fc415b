//! Tunnelling through an HTTP proxy with `CONNECT` (RFC 9110 §9.3.6).

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use url::Url;

use crate::error::{ProxyError, UrlError};

/// The largest proxy response head read.
const MAX_HEAD: usize = 8 << 10;

/// An HTTP proxy that tunnels with `CONNECT`: `http://[user:password@]host[:port]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    host: String,
    port: u16,
    /// `Proxy-Authorization` value, from the URL's credentials.
    authorization: Option<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credentials stay out of logs.
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("authorization", &self.authorization.as_ref().map(|_| "…"))
            .finish()
    }
}

impl Proxy {
    /// Parses `http://[user:password@]host[:port]` (port 80 by default; a bare `host:port`
    /// is read as `http://host:port`).
    ///
    /// # Errors
    /// [`ProxyError::Url`] for another scheme or a URL without a host.
    pub fn parse(url: &str) -> Result<Proxy, ProxyError> {
        let with_scheme = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        let parsed = Url::parse(&with_scheme).map_err(|source| {
            ProxyError::Url(UrlError::Parse {
                url: url.to_owned(),
                source,
            })
        })?;
        if parsed.scheme() != "http" {
            return Err(ProxyError::Url(UrlError::Scheme {
                url: url.to_owned(),
                scheme: parsed.scheme().to_owned(),
                expected: "http (the only proxies supported)",
            }));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| {
                ProxyError::Url(UrlError::NoHost {
                    url: url.to_owned(),
                })
            })?
            .to_owned();
        let authorization = (!parsed.username().is_empty()).then(|| {
            let user = percent_decode(parsed.username());
            let password = percent_decode(parsed.password().unwrap_or(""));
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Basic {token}")
        });
        Ok(Proxy {
            host,
            port: parsed.port().unwrap_or(80),
            authorization,
        })
    }

    /// The proxy the environment names for `target`: `HTTPS_PROXY` for `wss://`,
    /// `HTTP_PROXY` for `ws://` (either case), then `ALL_PROXY`; `None` when none is set or
    /// `NO_PROXY` lists the host (comma-separated names, matching the host or a parent
    /// domain; `*` for all).
    ///
    /// # Errors
    /// [`ProxyError::Url`] when the variable holds an unusable URL.
    pub fn from_env(target: &Url) -> Result<Option<Proxy>, ProxyError> {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        let configured = match target.scheme() {
            "wss" => var(&["HTTPS_PROXY", "https_proxy"]),
            _ => var(&["HTTP_PROXY", "http_proxy"]),
        }
        .or_else(|| var(&["ALL_PROXY", "all_proxy"]));
        let Some(url) = configured else {
            return Ok(None);
        };
        let host = target.host_str().unwrap_or_default();
        if var(&["NO_PROXY", "no_proxy"]).is_some_and(|list| no_proxy_matches(&list, host)) {
            return Ok(None);
        }
        Proxy::parse(&url).map(Some)
    }

    /// Opens a tunnel to `host:port` through the proxy.
    pub(crate) async fn tunnel(&self, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
        let io = |source| ProxyError::Io {
            addr: format!("{}:{}", self.host, self.port),
            source,
        };
        let mut tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(io)?;
        tcp.set_nodelay(true).map_err(io)?;
        let authority = format!("{host}:{port}");
        let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(auth) = &self.authorization {
            request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        request.push_str("\r\n");
        tcp.write_all(request.as_bytes()).await.map_err(io)?;
        // Read the answer byte by byte: nothing past its head may be consumed, it belongs
        // to the tunnel.
        let mut head = Vec::with_capacity(256);
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() >= MAX_HEAD {
                return Err(ProxyError::HeadTooLarge { limit: MAX_HEAD });
            }
            head.push(tcp.read_u8().await.map_err(io)?);
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        response.parse(&head).map_err(ProxyError::Malformed)?;
        match response.code {
            Some(200..=299) => Ok(tcp),
            Some(status) => Err(ProxyError::Refused {
                authority,
                status,
                reason: response.reason.unwrap_or("").to_owned(),
            }),
            // A complete head always has a status.
            None => Err(ProxyError::Malformed(httparse::Error::Status)),
        }
    }
}

/// Whether `host` is excluded by a `NO_PROXY` list.
pub fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            let entry = entry.to_ascii_lowercase();
            let entry = entry
                .split(':')
                .next()
                .unwrap_or_default()
                .trim_start_matches('.');
            entry == "*" || host == entry || host.ends_with(&format!(".{entry}"))
        })
}

/// Decodes `%XX` escapes of URL credentials.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proxy_urls_with_credentials() {
        let p = Proxy::parse("http://ann:p%40ss@proxy.local:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.local", 3128));
        // "ann:p@ss" in base64.
        assert_eq!(p.authorization.as_deref(), Some("Basic YW5uOnBAc3M="));
        assert_eq!(Proxy::parse("proxy.local:8080").unwrap().port, 8080);
        assert!(matches!(
            Proxy::parse("https://proxy.local"),
            Err(ProxyError::Url(UrlError::Scheme { .. }))
        ));
        assert!(!format!("{p:?}").contains("YW5u"));
    }

    #[test]
    fn no_proxy_matches_hosts_and_parent_domains() {
        assert!(no_proxy_matches(
            "localhost, .internal.example",
            "api.internal.example"
        ));
        assert!(no_proxy_matches("example.com", "example.com"));
        assert!(no_proxy_matches("example.com:443", "www.example.com"));
        assert!(no_proxy_matches("*", "anything"));
        assert!(!no_proxy_matches("example.com", "notexample.com"));
        assert!(!no_proxy_matches("", "example.com"));
    }

    #[tokio::test]
    async fn a_refused_tunnel_carries_the_status_and_an_unreachable_proxy_its_cause() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(tcp.read_u8().await.unwrap());
            }
            tcp.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                .await
                .unwrap();
        });
        let proxy = Proxy::parse(&addr.to_string()).unwrap();
        let err = proxy.tunnel("example.test", 80).await.unwrap_err();
        assert!(
            matches!(&err, ProxyError::Refused { status: 407, authority, .. } if authority == "example.test:80"),
            "{err:?}"
        );

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let err = Proxy::parse(&gone.to_string())
            .unwrap()
            .tunnel("example.test", 80)
            .await
            .unwrap_err();
        let cause =
            std::error::Error::source(&err).and_then(|e| e.downcast_ref::<std::io::Error>());
        assert_eq!(
            cause.map(std::io::Error::kind),
            Some(std::io::ErrorKind::ConnectionRefused),
            "{err:?}"
        );
    }
}
