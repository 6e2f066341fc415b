//! An echo server in a dozen lines: every text and binary message comes back.
//!
//! Run: `cargo run -p tether --example echo_server -- 127.0.0.1:9001`, then connect with
//! `cargo run -p tether --example client -- ws://127.0.0.1:9001/` or a browser's
//! `new WebSocket("ws://127.0.0.1:9001/")`.

use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into());
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on ws://{}/", listener.local_addr()?);
    loop {
        let (tcp, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let mut ws = match tether::accept(tcp).await {
                Ok(ws) => ws,
                Err(e) => return eprintln!("{peer}: handshake failed: {e}"),
            };
            while let Some(msg) = ws.recv().await {
                match msg {
                    // `feed` queues the echo; `recv` writes queued messages before it waits.
                    Ok(msg) if msg.is_data() => {
                        if ws.feed(msg).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {} // pings are answered for us; a Close ends the loop next turn
                    Err(e) => return eprintln!("{peer}: {e}"),
                }
            }
        });
    }
}
