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
    p.exp_string("> ")?;
    p.send_line("hello from a terminal")?;
    p.exp_regex(r"< \[\d\d:\d\d:\d\d\] hello from a terminal")?;
    p.send_line("/ping are you there")?;
    p.exp_string("pong (13 bytes) are you there")?;
    p.send_line("/binary 68 69 ff")?;
    p.exp_string("binary (3 bytes): 68 69 ff")?;
    p.send_line("/frobnicate")?;
    p.exp_string("unknown command /frobnicate")?;
    p.send_line("/close 4001 see you")?;
    p.exp_string("closed (4001")?;
    p.exp_eof()?;
    drop(server);
    Ok(())
}
