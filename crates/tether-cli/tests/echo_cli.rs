//! `tether echo` as a user runs it: the real binary, a real client, text and binary echoed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tether::Message;

/// The running binary; killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tether echo --port 0` and returns it with the URL it printed.
fn start() -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["echo", "--port", "0", "--host", "127.0.0.1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tether echo");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (Server(child), url)
}

#[tokio::test]
async fn echo_command_echoes_text_and_binary() {
    let (_server, url) = start();
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
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["echo", "--port", &port])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(tether_cli::exit::FAILURE));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("binding 127.0.0.1:"), "{stderr}");
}
