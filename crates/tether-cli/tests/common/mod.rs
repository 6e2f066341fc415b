//! Shared by the CLI tests: the real `tether echo` binary on a free port, and in-process
//! servers that misbehave on purpose.

#![allow(dead_code)]

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

/// The `tether` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tether");

/// A running `tether echo`, killed (and reaped) when dropped, even when a test fails.
pub struct Echo {
    child: Child,
    /// The URL it printed: `ws://127.0.0.1:PORT/`.
    pub url: String,
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tether echo --port 0 EXTRA...` and waits for the address it prints.
pub fn start_echo(extra: &[&str]) -> Echo {
    let mut child = Command::new(BIN)
        .args(["echo", "--port", "0", "--host", "127.0.0.1"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tether echo");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Echo { child, url }
}

/// Runs `handler` for every WebSocket accepted on a fresh loopback port.
pub fn serve<F, Fut>(handler: F, config: tether::Config) -> std::net::SocketAddr
where
    F: Fn(tether::WebSocket<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let handler = std::sync::Arc::new(handler);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let handler = handler.clone();
                let config = config.clone();
                tokio::spawn(async move {
                    if let Ok(ws) = tether::accept_with_config(tcp, config).await {
                        handler(ws).await;
                    }
                });
            }
        });
    });
    addr
}

/// Runs `command` until it prints its first line on stdout, then kills it; returns the line.
pub fn first_line(command: &mut Command) -> String {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    line.trim().to_owned()
}
