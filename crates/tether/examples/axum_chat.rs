//! A chat room in an axum app: the handler takes the upgrade next to axum's own extractors
//! (`State`, `Query`), every message goes to everyone in the room, and the socket is split so
//! that one task writes what the room says while the handler reads what its client says.
//!
//! Run: `cargo run -p tether --features axum --example axum_chat -- 127.0.0.1:3000`, then in two
//! terminals `tether connect 'ws://127.0.0.1:3000/chat?name=ann'` and `…?name=bob`.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tether::axum::WebSocketUpgrade;
use tether::Message;
use tokio::sync::broadcast;

/// What every connection shares: the room's channel (the last 64 lines wait for slow readers).
struct Room {
    said: broadcast::Sender<String>,
}

#[derive(serde::Deserialize)]
struct Who {
    name: String,
}

async fn chat(
    ws: WebSocketUpgrade,
    State(room): State<Arc<Room>>,
    Query(who): Query<Who>,
) -> Response {
    // The extractor already checked the handshake; its Config sets limits, subprotocols, the
    // Origin policy. A refusal would be an HTTP answer, not a socket.
    ws.on_upgrade(move |socket| async move {
        let (mut tx, mut rx) = socket.split();
        let mut heard = room.said.subscribe();
        let _ = room.said.send(format!("{} joined", who.name));
        // The room → this client.
        let writer = tokio::spawn(async move {
            while let Ok(line) = heard.recv().await {
                if tx.send(Message::text(line)).await.is_err() {
                    break;
                }
            }
        });
        // This client → the room, until it closes.
        while let Some(Ok(message)) = rx.recv().await {
            if let Message::Text(text) = message {
                let _ = room.said.send(format!("{}: {text}", who.name));
            }
        }
        writer.abort();
        let _ = room.said.send(format!("{} left", who.name));
    })
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    let room = Arc::new(Room {
        said: broadcast::channel(64).0,
    });
    let app = Router::new().route("/chat", get(chat)).with_state(room);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("chat on ws://{}/chat?name=YOU", listener.local_addr()?);
    axum::serve(listener, app).await
}
