//! tokio-tungstenite's documented echo server (its `examples/echo-server.rs`): `accept_async`,
//! then the read half is forwarded into the write half, text and binary messages only.
//!
//! `tungstenite-echo --port 0` prints `listening on ws://ADDR/`.

use futures_util::{future, StreamExt, TryStreamExt};
use tokio::net::TcpStream;

fn main() {
    tether_bench_peers::run(|listener| async move {
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(accept_connection(stream));
        }
    });
}

async fn accept_connection(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(ws_stream) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (write, read) = ws_stream.split();
    // The example's `.expect(...)` would abort the whole server on one bad peer; ignore instead.
    let _ = read
        .try_filter(|msg| future::ready(msg.is_text() || msg.is_binary()))
        .forward(write)
        .await;
}
