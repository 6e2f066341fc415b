//! Connecting to a `ws://` or `wss://` URL.

use std::net::{IpAddr, SocketAddr};
#[cfg(feature = "tls")]
use std::sync::Arc;

use tether_proto::handshake::client::{ClientRequest, Response};
use tokio::net::TcpStream;
use url::Url;

use crate::config::Config;
use crate::error::{Error, Result, TlsError, UrlError};
use crate::handshake::client_until;
use crate::proxy::Proxy;
use crate::tls::MaybeTlsStream;
use crate::websocket::WebSocket;

/// A WebSocket to a server, over TCP or TLS.
pub type ClientStream = WebSocket<MaybeTlsStream<TcpStream>>;

/// Connects to `url` (`ws://` or `wss://`) with the default configuration.
///
/// ```no_run
/// # async fn run() -> tether::Result<()> {
/// use tether::Message;
/// let (mut ws, _response) = tether::connect("ws://127.0.0.1:9001/").await?;
/// ws.send(Message::text("hello")).await?;
/// if let Some(reply) = ws.recv().await {
///     println!("{:?}", reply?);
/// }
/// ws.close(None).await?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// See [`ClientBuilder::connect`].
pub async fn connect(url: &str) -> Result<(ClientStream, Response)> {
    ClientBuilder::new(url)?.connect().await
}

/// Options for a client connection: subprotocols, headers, limits, TLS roots.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: Url,
    config: Config,
    protocols: Vec<String>,
    headers: Vec<(String, String)>,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ClientConfig>>,
    proxy: Option<Proxy>,
    http: HttpVersion,
    #[cfg(feature = "http2")]
    pool: Option<crate::http2::Pool>,
}

/// The HTTP version a [`ClientBuilder`] opens its WebSocket with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HttpVersion {
    /// `wss://` offers HTTP/2 by ALPN (with the `http2` feature) and opens the WebSocket as
    /// an extended CONNECT (RFC 8441) when the server chooses it, else upgrades HTTP/1.1; an
    /// HTTP/2 server that refuses extended CONNECTs gets a new HTTP/1.1 connection. `ws://`
    /// upgrades HTTP/1.1.
    #[default]
    Auto,
    /// An HTTP/1.1 upgrade only (ALPN `http/1.1`).
    Http1,
    /// HTTP/2 only: ALPN `h2` for `wss://`, prior knowledge (h2c) for `ws://`; fails when the
    /// server does not speak it or refuses extended CONNECTs.
    Http2,
}

impl ClientBuilder {
    /// Options for connecting to `url`.
    ///
    /// # Errors
    /// [`Error::Url`] unless `url` is a `ws://` or `wss://` URL with a host.
    pub fn new(url: &str) -> Result<Self> {
        let given = url;
        let url = Url::parse(given).map_err(|source| UrlError::Parse {
            url: given.to_owned(),
            source,
        })?;
        match url.scheme() {
            "ws" | "wss" => {}
            other => {
                return Err(UrlError::Scheme {
                    url: given.to_owned(),
                    scheme: other.to_owned(),
                    expected: "ws or wss",
                }
                .into())
            }
        }
        if url.host().is_none() {
            return Err(UrlError::NoHost {
                url: given.to_owned(),
            }
            .into());
        }
        Ok(ClientBuilder {
            url,
            config: Config::default(),
            protocols: Vec::new(),
            headers: Vec::new(),
            #[cfg(feature = "tls")]
            tls: None,
            proxy: None,
            http: HttpVersion::default(),
            #[cfg(feature = "http2")]
            pool: None,
        })
    }

    /// Uses `config` for limits and timeouts (`handshake_timeout` covers TCP connect, TLS
    /// and the upgrade).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Offers a subprotocol (repeat for several, in order of preference).
    pub fn protocol(mut self, protocol: impl Into<String>) -> Self {
        self.protocols.push(protocol.into());
        self
    }

    /// Adds a request header (`Origin`, `Authorization`, `Cookie`…).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Uses this rustls configuration for `wss://` (e.g. from [`crate::tls::client_config`]
    /// with a private CA).
    #[cfg(feature = "tls")]
    pub fn tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Tunnels through this HTTP proxy (`CONNECT`); TLS for `wss://` runs inside the tunnel.
    pub fn proxy(mut self, proxy: Proxy) -> Self {
        self.proxy = Some(proxy);
        self
    }

    /// Chooses the HTTP version the WebSocket is opened with ([`HttpVersion::Auto`] unless
    /// told): `HttpVersion::Http1` forces an HTTP/1.1 upgrade.
    pub fn http_version(mut self, version: HttpVersion) -> Self {
        self.http = version;
        self
    }

    /// Shares HTTP/2 connections through `pool`: a WebSocket to an origin (scheme, host and
    /// port) that already has an HTTP/2 connection in the pool opens as a new stream on it
    /// instead of a new TCP connection. Without a pool, each WebSocket over HTTP/2 has a
    /// connection of its own.
    #[cfg(feature = "http2")]
    pub fn pool(mut self, pool: crate::http2::Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Uses the proxy the environment names for this URL (`HTTPS_PROXY` / `HTTP_PROXY` /
    /// `ALL_PROXY`, unless `NO_PROXY` lists the host; see [`Proxy::from_env`]).
    ///
    /// # Errors
    /// [`Error::Proxy`] when the variable holds an unusable URL.
    pub fn proxy_from_env(mut self) -> Result<Self> {
        if let Some(proxy) = Proxy::from_env(&self.url)? {
            self.proxy = Some(proxy);
        }
        Ok(self)
    }

    /// The handshake request this builder sends.
    pub fn request(&self) -> ClientRequest {
        let host = self.url.host_str().unwrap_or_default();
        let host = match self.url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let mut target = self.url.path().to_owned();
        if let Some(query) = self.url.query() {
            target.push('?');
            target.push_str(query);
        }
        let mut request = ClientRequest::new(host, target);
        request.protocols = self.protocols.clone();
        request.headers = self.headers.clone();
        request.extensions = self.config.deflate.as_ref().map(|d| d.offer());
        request
    }

    /// Connects: TCP (no Nagle delay), TLS for `wss://`, then the upgrade.
    ///
    /// # Errors
    /// [`Error::Connect`] when the host cannot be resolved or reached, [`Error::Proxy`],
    /// [`Error::Tls`],
    /// [`Error::ClientHandshake`] when the server refuses, [`Error::HandshakeTimeout`].
    pub async fn connect(self) -> Result<(ClientStream, Response)> {
        let request = self.request();
        self.connect_with(request).await
    }

    /// Connects, sending `request` (from [`ClientBuilder::request`], perhaps logged or
    /// amended) as the handshake.
    ///
    /// # Errors
    /// As [`ClientBuilder::connect`].
    pub async fn connect_with(self, request: ClientRequest) -> Result<(ClientStream, Response)> {
        // One deadline for TCP, the proxy, TLS and the upgrade together.
        let started = tokio::time::Instant::now();
        let timeout = self.config.handshake_timeout;
        #[cfg(feature = "http2")]
        if self.offers_http2() {
            let deadline = started + timeout;
            return match tokio::time::timeout_at(deadline, crate::http2::connect(&self, &request))
                .await
                .map_err(|_| Error::HandshakeTimeout)??
            {
                crate::http2::Opened::WebSocket(ws, response) => Ok((*ws, response)),
                crate::http2::Opened::Http1(transport) => {
                    client_until(transport, request, self.config, deadline).await
                }
                crate::http2::Opened::Refused => {
                    let transport = tokio::time::timeout_at(deadline, self.open(false))
                        .await
                        .map_err(|_| Error::HandshakeTimeout)??;
                    client_until(transport, request, self.config, deadline).await
                }
            };
        }
        #[cfg(not(feature = "http2"))]
        if self.http == HttpVersion::Http2 {
            return Err(Error::Http2Unavailable(
                "this build of tether has no http2 feature".into(),
            ));
        }
        let transport = tokio::time::timeout(timeout, self.open(false))
            .await
            .map_err(|_| Error::HandshakeTimeout)??;
        client_until(transport, request, self.config, started + timeout).await
    }

    /// Whether this connection tries HTTP/2 first.
    #[cfg(feature = "http2")]
    fn offers_http2(&self) -> bool {
        match self.http {
            HttpVersion::Auto => self.url.scheme() == "wss",
            HttpVersion::Http1 => false,
            HttpVersion::Http2 => true,
        }
    }

    /// The builder's URL.
    #[cfg(feature = "http2")]
    pub(crate) fn url(&self) -> &Url {
        &self.url
    }

    /// The builder's configuration.
    #[cfg(feature = "http2")]
    pub(crate) fn config_ref(&self) -> &Config {
        &self.config
    }

    /// The HTTP version asked for.
    #[cfg(feature = "http2")]
    pub(crate) fn http_version_asked(&self) -> HttpVersion {
        self.http
    }

    /// The pool of HTTP/2 connections, if one was given.
    #[cfg(feature = "http2")]
    pub(crate) fn pool_ref(&self) -> Option<&crate::http2::Pool> {
        self.pool.as_ref()
    }

    /// Opens the WebSocket on a new stream of an HTTP/2 connection the caller holds, with an
    /// extended CONNECT (RFC 8441) to this builder's URL: many WebSockets, and the page's
    /// other requests, share one TCP connection. The server must allow extended CONNECTs
    /// (`SETTINGS_ENABLE_CONNECT_PROTOCOL`), and `sender`'s connection must have received its
    /// settings (after a first answered request, say). The subprotocols, headers and
    /// permessage-deflate offer are this builder's, the deadline its `handshake_timeout`;
    /// `wss://` sends `:scheme https` (the caller's connection is already TLS or not).
    ///
    /// # Errors
    /// [`Error::ClientHandshake`] when the server answers other than `2xx` or with a
    /// subprotocol or extension not offered, [`Error::Io`] when the HTTP/2 connection fails,
    /// [`Error::HandshakeTimeout`].
    #[cfg(feature = "http2")]
    pub async fn open_on<B>(
        &self,
        sender: &mut hyper::client::conn::http2::SendRequest<B>,
    ) -> Result<(crate::upgrade::UpgradedWebSocket, Response)>
    where
        B: hyper::body::Body + Default + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let request = self.request();
        let open = async {
            let (io, response, deflate) =
                crate::http2::extended_connect(self, sender, &request).await?;
            let ws = WebSocket::from_parts(crate::websocket::Parts {
                io: io.into(),
                role: tether_proto::Role::Client,
                config: Arc::new(self.config.clone()),
                read_buf: bytes::BytesMut::new(),
                protocol: response.protocol.clone(),
                deflate,
                half_close: true,
            });
            Ok((ws, response))
        };
        tokio::time::timeout(self.config.handshake_timeout, open)
            .await
            .map_err(|_| Error::HandshakeTimeout)?
    }

    /// TCP (through the proxy if any), then TLS for `wss://` offering ALPN `h2` before
    /// `http/1.1` when `h2`.
    pub(crate) async fn open(&self, h2: bool) -> Result<MaybeTlsStream<TcpStream>> {
        let port = self.url.port_or_known_default().unwrap_or(80);
        let tcp = match (&self.proxy, self.url.host()) {
            (Some(proxy), _) => {
                proxy
                    .tunnel(self.url.host_str().unwrap_or_default(), port)
                    .await?
            }
            (None, host) => Self::direct(host, port)
                .await
                .map_err(|source| Error::Connect {
                    host: self.url.host_str().unwrap_or_default().to_owned(),
                    port,
                    source,
                })?,
        };
        tcp.set_nodelay(true)?;
        if self.url.scheme() == "ws" {
            return Ok(MaybeTlsStream::Plain(tcp));
        }
        self.wrap_tls(tcp, h2).await
    }

    /// The builder checked that the URL has a host.
    async fn direct(host: Option<url::Host<&str>>, port: u16) -> std::io::Result<TcpStream> {
        match host {
            Some(url::Host::Ipv4(ip)) => {
                TcpStream::connect(SocketAddr::new(IpAddr::V4(ip), port)).await
            }
            Some(url::Host::Ipv6(ip)) => {
                TcpStream::connect(SocketAddr::new(IpAddr::V6(ip), port)).await
            }
            Some(url::Host::Domain(name)) => TcpStream::connect((name, port)).await,
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the URL has no host",
            )),
        }
    }

    #[cfg(feature = "tls")]
    async fn wrap_tls(&self, tcp: TcpStream, h2: bool) -> Result<MaybeTlsStream<TcpStream>> {
        let mut config = match &self.tls {
            Some(c) => c.clone(),
            None => crate::tls::client_config(&[])?,
        };
        if h2 {
            let mut offering = (*config).clone();
            offering.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            config = Arc::new(offering);
        }
        let host = self.url.host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|source| {
            TlsError::ServerName {
                host: host.to_owned(),
                source,
            }
        })?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| tls_handshake_error(host, e))?;
        Ok(MaybeTlsStream::Rustls(Box::new(stream)))
    }

    #[cfg(not(feature = "tls"))]
    async fn wrap_tls(&self, _tcp: TcpStream, _h2: bool) -> Result<MaybeTlsStream<TcpStream>> {
        Err(TlsError::Disabled.into())
    }
}

/// rustls's own error when the handshake failed on it (tokio-rustls wraps it in an I/O
/// error), else the I/O error.
#[cfg(feature = "tls")]
fn tls_handshake_error(host: &str, e: std::io::Error) -> TlsError {
    let host = host.to_owned();
    if !e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
        return TlsError::Io { host, source: e };
    }
    let kind = e.kind();
    match e
        .into_inner()
        .map(|inner| inner.downcast::<rustls::Error>())
    {
        Some(Ok(source)) => TlsError::Handshake {
            host,
            source: *source,
        },
        // Checked above; an I/O error all the same rather than a panic.
        Some(Err(other)) => TlsError::Io {
            host,
            source: std::io::Error::new(kind, other),
        },
        None => TlsError::Io {
            host,
            source: kind.into(),
        },
    }
}
