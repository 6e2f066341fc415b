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

/// `--park-after`: a connection quiet for a second is set aside (its task and registration
/// let go, the server says so in its trace log), then answers as before when spoken to: a
/// small message, a large one, and a close handshake.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_connection_is_set_aside_and_answers_when_spoken_to() {
    use std::io::BufRead;
    let (server, stderr) =
        common::start_echo_logging(&["--park-after", "1s"], "tether_cli::echo=trace");
    // Every "set aside" the server logs, as it logs it.
    let (tx, set_aside) = std::sync::mpsc::channel();
    let stderr = std::io::BufReader::new(stderr);
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if line.contains(" set aside peer=") && tx.send(()).is_err() {
                return;
            }
        }
    });
    let wait_set_aside = |n: usize| {
        for _ in 0..n {
            set_aside
                .recv_timeout(Duration::from_secs(20))
                .expect("the server never set a quiet connection aside");
        }
    };
    let run = async {
        let mut clients = Vec::new();
        for i in 0..3 {
            let (mut ws, _) = tether::connect(&server.url).await.unwrap();
            ws.send(Message::text(format!("hello {i}"))).await.unwrap();
            assert_eq!(
                ws.recv().await.unwrap().unwrap(),
                Message::text(format!("hello {i}"))
            );
            clients.push(ws);
        }
        tokio::task::block_in_place(|| wait_set_aside(3));
        for (i, ws) in clients.iter_mut().enumerate() {
            ws.send(Message::text(format!("again {i}"))).await.unwrap();
            assert_eq!(
                ws.recv().await.unwrap().unwrap(),
                Message::text(format!("again {i}"))
            );
        }
        let blob: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        clients[0]
            .send(Message::binary(blob.clone()))
            .await
            .unwrap();
        assert_eq!(
            clients[0].recv().await.unwrap().unwrap(),
            Message::binary(blob)
        );
        // Quiet again: set aside again, and a close handshake wakes it and completes.
        tokio::task::block_in_place(|| wait_set_aside(3));
        for mut ws in clients {
            ws.close(None).await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("timed out");
}
