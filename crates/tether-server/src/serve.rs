//! The accept loop: TLS (optional), HTTP/1.1 with upgrades, limits, graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::app::{App, Db};
use crate::config::ServerConfig;
use crate::http::{precheck, router, PeerAddr};
use crate::hub::Hub;
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Starting or running the server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Binding the address failed.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// Another I/O failure (spawning the journal thread, …).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A bound server, ready to run.
pub struct Server {
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: watch::Sender<bool>,
}

fn tls_acceptor(config: &ServerConfig) -> Result<Option<TlsAcceptor>, ServerError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = match (&config.tls_cert, &config.tls_key) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        _ => return Err(ServerError::Tls("give both a certificate and a key".into())),
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ServerError::Tls(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ServerError::Tls(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(tls))))
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the store, starts the journal and binds the address.
    ///
    /// # Errors
    /// The store, the TLS files or the address.
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let tls = tls_acceptor(&config)?;
        let metrics = Arc::new(Metrics::default());
        let hub = Hub::new(config.outbox, metrics.clone());
        let journal = Journal::start(
            Store::open(&config.data)?,
            hub.clone(),
            metrics.clone(),
            config.history_limit,
        )?;
        let db = Db::new(Store::open(&config.data)?);
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let ws_config = tether::Config::default()
            .max_message_size(64 << 10)
            .max_frame_size(64 << 10)
            // A 64 KiB message in fragments of 16 bytes; more frames for one message is a
            // peer keeping it open on purpose (1009).
            .max_message_fragments(4096)
            .ping_interval(Some(config.ping_interval()))
            .deflate(config.deflate.then(|| {
                // Every message compressed from a fresh state: fan-out compresses it once for
                // all subscribers (tether::Prepared), and idle connections hold no compressor.
                tether::proto::extension::deflate::DeflateConfig::default()
                    .server_no_context_takeover(true)
                    .client_no_context_takeover(true)
            }));
        let cluster = match &config.redis {
            Some(url) => {
                let node = config.node.clone().unwrap_or_else(default_node_name);
                tracing::info!(%node, "joining the cluster through redis");
                Some(crate::cluster::Cluster::start(
                    url,
                    node,
                    hub.clone(),
                    metrics.clone(),
                    config.history_limit,
                )?)
            }
            None => None,
        };
        let (shutdown, rx) = watch::channel(false);
        let app = App::new(
            config,
            ws_config,
            hub,
            journal,
            db,
            metrics,
            tls.is_some(),
            cluster,
            rx,
        )?;
        Ok(Server {
            app,
            listener,
            tls,
            shutdown,
        })
    }

    /// The bound address.
    ///
    /// # Errors
    /// The socket cannot tell.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The server's base URL, `http://ADDR/` or `https://ADDR/`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        match self.local_addr() {
            Ok(addr) => format!("{scheme}://{addr}/"),
            Err(_) => format!("{scheme}://{}/", self.app.config.listen),
        }
    }

    /// Serves until `signal` completes, then shuts down: stops accepting, closes every socket
    /// with 1001, waits for them (at most the configured deadline) and for the journal to
    /// store what it holds.
    pub async fn run(self, signal: impl Future<Output = ()>) {
        let Server {
            app,
            listener,
            tls,
            shutdown,
        } = self;
        let router = router(app.clone());
        tokio::pin!(signal);
        loop {
            tokio::select! {
                () = &mut signal => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let router = router.clone();
                        let tls = tls.clone();
                        tokio::spawn(connection(stream, peer, tls, app.clone(), router));
                    }
                    Err(e) => {
                        // Out of file descriptors or similar: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        tracing::info!(
            connections = app.metrics.connections.load(Relaxed),
            "shutting down: closing sockets with 1001"
        );
        app.begin_shutdown();
        let _ = shutdown.send(true);
        let deadline = tokio::time::Instant::now() + app.config.shutdown_timeout();
        while app.metrics.connections.load(Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = app.metrics.connections.load(Relaxed);
        if left > 0 {
            tracing::warn!(left, "shutdown deadline passed with sockets still open");
        }
        app.journal.flush().await;
        tracing::info!("stopped");
    }
}

fn default_node_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "node".to_owned());
    format!("{host}-{}", std::process::id())
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    app: Arc<App>,
    router: axum::Router,
) {
    let _ = stream.set_nodelay(true);
    match tls {
        Some(acceptor) => {
            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                Ok(Ok(stream)) => serve_http(stream, peer, app, router).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
        None => serve_http(stream, peer, app, router).await,
    }
}

async fn serve_http<S>(stream: S, peer: SocketAddr, app: Arc<App>, router: axum::Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(
        move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            let checked = precheck(&app, req.method(), req.headers());
            let mut router = router.clone();
            async move {
                match checked {
                    None => tower_service::Service::call(&mut router, req).await,
                    Some(refused) => {
                        tracing::info!(%peer, status = refused.status().as_u16(), method = %req.method(), path = req.uri().path(), "request refused before routing");
                        Ok(refused)
                    }
                }
            }
        },
    );
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(64 << 10)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}
