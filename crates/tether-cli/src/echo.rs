//! `tether echo`: an echo server for text and binary messages, the conformance target.

use std::net::SocketAddr;
use std::sync::Arc;

use tether::{Config, Message};
use tokio::net::{TcpListener, TcpStream};

/// Serves echo connections on `listener` until `shutdown` resolves.
///
/// Every accepted connection runs in its own task; a failing connection is logged and never
/// affects the others.
///
/// # Errors
/// Only when accepting fails in a way that is not specific to one connection.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let config = Arc::new(config);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; continuing");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(e),
            },
            () = &mut shutdown => return Ok(()),
        };
        let config = config.clone();
        tokio::spawn(async move { echo_connection(tcp, peer, config).await });
    }
}

/// Accept errors that concern one connection or a passing shortage (file descriptors).
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e
        .raw_os_error()
        .is_some_and(|code| code == 24 || code == 23) // EMFILE, ENFILE
}

/// Echoes every text and binary message until the peer closes.
async fn echo_connection(tcp: TcpStream, peer: SocketAddr, config: Arc<Config>) {
    let _ = tcp.set_nodelay(true);
    // Boxed: the handshake's state (buffers, timer) is freed once it is done instead of
    // staying inside the connection's task for its whole life.
    let mut ws = match Box::pin(tether::accept_with_config(tcp, config)).await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::info!(%peer, error = %e, "handshake failed");
            return;
        }
    };
    tracing::debug!(%peer, "connected");
    while let Some(received) = ws.recv().await {
        match received {
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                // `feed` queues; `recv` writes the queue whenever it would wait, so a burst of
                // small messages is echoed in one write.
                if let Err(e) = ws.feed(msg).await {
                    tracing::info!(%peer, error = %e, "send failed");
                    break;
                }
            }
            Ok(Message::Close(frame)) => tracing::debug!(%peer, ?frame, "peer closed"),
            Ok(_) => {}
            Err(e) => {
                tracing::info!(%peer, error = %e, "connection ended");
                break;
            }
        }
    }
}
