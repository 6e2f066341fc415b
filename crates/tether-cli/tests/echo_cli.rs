//! `tether echo` as a user runs it: the real binary, a real client, text and binary echoed.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{start_echo, BIN};
use tether::Message;

#[tokio::test]
async fn echo_command_echoes_text_and_binary() {
    let server = start_echo(&[]);
    let url = server.url.clone();
    let run = async {
        let (mut ws, _) = tether::connect(&url).await.unwrap();
        ws.send(Message::text("hello from a user")).await.unwrap();
        assert_eq!(
            ws.recv().await.unwrap().unwrap(),
            Message::text("hello from a user")
        );
        let blob: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        ws.send(Message::binary(blob.clone())).await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::binary(blob));
        ws.close(None).await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("timed out");
}

#[test]
fn echo_command_reports_a_port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = Command::new(BIN)
        .args(["echo", "--port", &port])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(tether_cli::exit::FAILURE));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("binding 127.0.0.1:"), "{stderr}");
}

#[test]
fn echo_listens_where_listen_says() {
    let line = common::first_line(Command::new(BIN).args(["echo", "--listen", "0"]));
    assert!(line.starts_with("listening on ws://127.0.0.1:"), "{line}");
}
