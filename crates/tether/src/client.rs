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
        let transport = tokio::time::timeout(timeout, self.open())
            .await
            .map_err(|_| Error::HandshakeTimeout)??;
        client_until(transport, request, self.config, started + timeout).await
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
        fn io_error(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
            Error::Io(std::io::Error::other(e))
        }
        let request = self.request();
        let scheme = if self.url.scheme() == "wss" {
            "https"
        } else {
            "http"
        };
        let mut builder = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("{scheme}://{}{}", request.host, request.target));
        for (name, value) in request.extended_connect_headers()? {
            builder = builder.header(name, value);
        }
        let mut req = builder.body(B::default()).map_err(io_error)?;
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let open = async {
            let response = sender.send_request(req).await.map_err(io_error)?;
            let headers = crate::upgrade::headers_of(response.headers());
            let checked = request.check_extended_connect(response.status().as_u16(), headers)?;
            let deflate = crate::handshake::accept_deflate(&self.config, &checked)?;
            let upgraded = hyper::upgrade::on(response).await.map_err(io_error)?;
            let ws = WebSocket::from_parts(crate::websocket::Parts {
                io: hyper_util::rt::TokioIo::new(upgraded),
                role: tether_proto::Role::Client,
                config: Arc::new(self.config.clone()),
                read_buf: bytes::BytesMut::new(),
                protocol: checked.protocol.clone(),
                deflate,
            });
            Ok((ws, checked))
        };
        tokio::time::timeout(self.config.handshake_timeout, open)
            .await
            .map_err(|_| Error::HandshakeTimeout)?
    }

    async fn open(&self) -> Result<MaybeTlsStream<TcpStream>> {
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
        self.wrap_tls(tcp).await
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
    async fn wrap_tls(&self, tcp: TcpStream) -> Result<MaybeTlsStream<TcpStream>> {
        let config = match &self.tls {
            Some(c) => c.clone(),
            None => crate::tls::client_config(&[])?,
        };
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
    async fn wrap_tls(&self, _tcp: TcpStream) -> Result<MaybeTlsStream<TcpStream>> {
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
