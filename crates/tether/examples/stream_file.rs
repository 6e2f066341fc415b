//! Sends a file of any size as one WebSocket message, and receives one, in bounded memory:
//! the sender writes the file into a message stream (fragments of 256 KiB), the receiver
//! copies the message stream into a file as its frames arrive.
//!
//! Run: `cargo run -p tether --example stream_file -- receive 127.0.0.1:9002 copy.bin` in one
//! terminal, `cargo run -p tether --example stream_file -- send ws://127.0.0.1:9002/ big.bin`
//! in another.

use tether::{Config, Incoming};

const FRAGMENT: usize = 256 << 10;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Streams `path` to the server at `url` as one binary message.
async fn send(url: &str, path: &str) -> Result<(), BoxError> {
    let mut file = tokio::fs::File::open(path).await?;
    let (mut ws, _) = tether::connect(url).await?;
    let mut message = ws.send_stream_binary(FRAGMENT);
    let bytes = tokio::io::copy(&mut file, &mut message).await?;
    message.finish().await?;
    drop(message);
    println!("sent {bytes} bytes");
    ws.close(None).await?;
    Ok(())
}

/// Accepts one connection on `addr` and writes its first message to `path`.
async fn receive(addr: &str, path: &str) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("waiting on ws://{}/", listener.local_addr()?);
    let (tcp, _) = listener.accept().await?;
    // Messages are limited to 64 MiB by default: a file may be larger. Frames stay small,
    // and they are all that is held at once.
    let config = Config::default()
        .max_message_size(usize::MAX)
        .max_message_fragments(u32::MAX)
        .max_frame_size(4 << 20);
    let mut ws = tether::accept_with_config(tcp, config).await?;
    while let Some(incoming) = ws.recv_stream().await {
        if let Incoming::Stream(mut message) = incoming? {
            let mut file = tokio::fs::File::create(path).await?;
            let bytes = tokio::io::copy(&mut message, &mut file).await?;
            println!("received {bytes} bytes into {path}");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["send", url, path] => send(url, path).await,
        ["receive", addr, path] => receive(addr, path).await,
        _ => Err("usage: stream_file send URL FILE | stream_file receive ADDR FILE".into()),
    }
}
