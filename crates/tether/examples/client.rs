//! A client: connects, sends each command-line word as a text message, prints the replies,
//! and closes cleanly.
//!
//! Run: `cargo run -p tether --example client -- ws://127.0.0.1:9001/ hello world`
//! (with `tether echo --port 9001` or the `echo_server` example running).

use tether::Message;

#[tokio::main]
async fn main() -> Result<(), tether::Error> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "ws://127.0.0.1:9001/".into());
    let words: Vec<String> = args.collect();

    let (mut ws, response) = tether::connect(&url).await?;
    println!("connected (subprotocol: {:?})", response.protocol);
    for word in &words {
        ws.send(Message::text(word.clone())).await?;
    }
    for _ in &words {
        match ws.recv().await {
            Some(Ok(Message::Text(text))) => println!("< {text}"),
            Some(Ok(other)) => println!("< {other:?}"),
            Some(Err(e)) => return Err(e),
            None => break,
        }
    }
    ws.close(None).await
}
