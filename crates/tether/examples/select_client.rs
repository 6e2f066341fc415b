//! A client that reads and writes at once: what you type goes to the server while what the
//! server sends is printed as it arrives, on one task with `tokio::select!` over the two
//! halves of a split socket.
//!
//! Run: `cargo run -p tether --example select_client -- ws://127.0.0.1:9001/` (with
//! `tether echo --port 9001` running), type lines, end with Ctrl-D.

use tether::Message;
use tokio::io::AsyncBufReadExt;

#[tokio::main]
async fn main() -> Result<(), tether::Error> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:9001/".into());
    let (ws, _) = tether::connect(&url).await?;
    let (mut tx, mut rx) = ws.split();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut typing = true;
    loop {
        tokio::select! {
            // Both branches are cancel-safe: a line or a message is never lost to the other.
            line = lines.next_line(), if typing => match line? {
                Some(line) => tx.send(Message::text(line)).await?,
                None => {
                    // End of input: start the close handshake and read until the server's
                    // Close ends the stream.
                    typing = false;
                    tx.close(None).await?;
                }
            },
            message = rx.recv() => match message {
                Some(Ok(Message::Text(text))) => println!("< {text}"),
                Some(Ok(Message::Binary(data))) => println!("< {} bytes", data.len()),
                Some(Ok(Message::Close(frame))) => println!("closed: {frame:?}"),
                Some(Ok(_)) => {} // pings are answered for us
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
        }
    }
}
