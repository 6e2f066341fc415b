//! `tether connect` under a pseudo terminal, as a person uses it: type a message and see the
//! echo with a timestamp, ping, send hex as binary, get help for a wrong command, close.

mod common;

use std::process::Command;

use rexpect::session::spawn_command;

#[test]
fn interactive_session_against_tether_echo() -> Result<(), rexpect::error::Error> {
    let server = common::start_echo(&[]);
    let url = server.url.clone();

    let mut client = Command::new(common::BIN);
    client.args(["connect", &url]);
    let mut p = spawn_command(client, Some(10_000))?;
    p.exp_string(&format!("connected to {url}; /help for commands"))?;
    p.exp_string("> ")?;
    p.send_line("/help")?;
    p.exp_string("commands: /ping [data] sends a ping")?;
    p.send_line("hello from a terminal")?;
    p.exp_regex(r"< \[\d\d:\d\d:\d\d\] hello from a terminal")?;
    p.send_line("/ping are you there")?;
    p.exp_string("pong (13 bytes) are you there")?;
    p.send_line("/binary 68 69 ff")?;
    p.exp_string("binary (3 bytes): 68 69 ff")?;
    p.send_line("/frobnicate")?;
    p.exp_string("unknown command /frobnicate: try /help")?;
    p.send_line("/close 4001 see you")?;
    p.exp_string("closed (4001")?;
    p.exp_eof()?;
    drop(server);
    Ok(())
}

#[test]
fn an_interactive_session_reconnects_when_the_server_restarts() -> Result<(), rexpect::error::Error>
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tether::{CloseCode, CloseFrame};
    // The first connection is closed with 1001 (going away, as in a restart); the next
    // ones echo.
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let addr = common::serve(
        move |mut ws| {
            let first = count.fetch_add(1, Ordering::Relaxed) == 0;
            async move {
                if first {
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    let frame = CloseFrame::new(CloseCode::GOING_AWAY, "restarting");
                    let _ = ws.close(Some(frame)).await;
                }
                while let Some(Ok(msg)) = ws.recv().await {
                    if msg.is_data() && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            }
        },
        tether::Config::default(),
    );
    let mut client = Command::new(common::BIN);
    client.args(["connect", "--reconnect", &format!("ws://{addr}/")]);
    let mut p = spawn_command(client, Some(10_000))?;
    p.exp_string("> ")?;
    p.exp_string("closed by the server: 1001 restarting); reconnecting in")?;
    p.exp_string("reconnected after")?;
    p.send_line("still here")?;
    p.exp_regex(r"< \[\d\d:\d\d:\d\d\] still here")?;
    p.send_line("/quit")?;
    p.exp_eof()?;
    Ok(())
}
