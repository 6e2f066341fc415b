//! The Autobahn TestSuite client runner: connects to a `wstest -m fuzzingserver`, runs
//! every case as an echo client, then asks the server to write its reports. Every case makes
//! the same permessage-deflate offer (`permessage-deflate; client_max_window_bits`) and
//! honours whatever valid answer the server gives.
//!
//! Run: `cargo run --release -p tether --example autobahn_client -- ws://127.0.0.1:9001 tether`
//! (arguments: the fuzzing server's URL and the agent name). `conformance/run.py client`
//! starts the fuzzing server and runs this.

use tether::proto::extension::deflate::DeflateConfig;
use tether::{Config, Message};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let base = args.next().unwrap_or_else(|| "ws://127.0.0.1:9001".into());
    let agent = args.next().unwrap_or_else(|| "tether".into());
    let base = base.trim_end_matches('/');

    let count: u32 = {
        let (mut ws, _) = tether::connect(&format!("{base}/getCaseCount")).await?;
        let mut count = None;
        while let Some(msg) = ws.recv().await {
            if let Message::Text(text) = msg? {
                count = Some(text.parse()?);
            }
        }
        count.ok_or("the fuzzing server sent no case count")?
    };
    println!("running {count} cases as agent {agent:?}");

    for case in 1..=count {
        let url = format!("{base}/runCase?case={case}&agent={agent}");
        if let Err(e) = run_case(&url).await {
            println!("case {case}: {e}");
        }
    }

    let (mut ws, _) = tether::connect(&format!("{base}/updateReports?agent={agent}")).await?;
    while let Some(msg) = ws.recv().await {
        msg?;
    }
    println!("reports updated");
    Ok(())
}

/// Echoes every message of one case until the server closes.
async fn run_case(url: &str) -> tether::Result<()> {
    let config = Config::default()
        .max_message_size(64 << 20)
        .max_frame_size(64 << 20)
        .deflate(Some(DeflateConfig::default()));
    let (mut ws, _) = tether::ClientBuilder::new(url)?
        .config(config)
        .connect()
        .await?;
    while let Some(msg) = ws.recv().await {
        let msg = msg?;
        if msg.is_data() {
            ws.feed(msg).await?;
        }
    }
    Ok(())
}
