//! `tether serve` failing to start, as a person sees it: one line, each cause once, a hint.

mod common;

use std::process::Command;

use common::BIN;

#[test]
fn a_taken_port_is_one_line_with_a_hint_and_leaves_no_data_directory() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(BIN)
        .args(["serve", "--listen", &addr.to_string(), "--data"])
        .arg(&data)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        format!(
            "tether: binding {addr}: Address already in use (os error 98) \
             (another process is listening on {addr}: pick another port with --port)"
        ),
        "one line, the cause once"
    );
    assert!(
        !data.exists(),
        "no data directory is made for a server that cannot start"
    );
}

#[test]
fn a_data_path_that_is_a_file_is_one_line_with_a_hint() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().display().to_string();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data", &path])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "tether: data directory {path}: File exists (os error 17) \
             (--data names a directory to keep the data in, and {path} is a file)"
        )
    );
}

/// Starts `tether serve --listen LISTEN` and returns the first line it prints.
fn first_line_of_serve(listen: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    common::first_line(
        Command::new(BIN)
            .args(["serve", "--listen", listen, "--data"])
            .arg(dir.path())
            .env("RUST_LOG", "off"),
    )
}

#[test]
fn listen_takes_a_port_a_colon_port_and_a_name() {
    for (listen, starts) in [
        ("0", "listening on http://127.0.0.1:"),
        (":0", "listening on http://0.0.0.0:"),
        ("localhost:0", "listening on http://"),
        ("[::1]:0", "listening on http://[::1]:"),
    ] {
        let line = first_line_of_serve(listen);
        assert!(line.starts_with(starts), "--listen {listen}: {line}");
    }
    let out = Command::new(BIN)
        .args(["serve", "--listen", "localhost"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("give a port, as PORT, :PORT, HOST:PORT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serve_and_echo_take_the_same_port_flag_and_name_it_when_the_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    for command in [vec!["serve", "--data"], vec!["echo"]] {
        let mut cmd = Command::new(BIN);
        cmd.args(&command);
        if command[0] == "serve" {
            cmd.arg(dir.path().join("data"));
        }
        let out = cmd
            .args(["--port", &port])
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{command:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("127.0.0.1:{port}"))
                && err.trim_end().ends_with("pick another port with --port)"),
            "{command:?}: {err}"
        );
    }
    // Free ports, by the same flags.
    let line = common::first_line(
        Command::new(BIN)
            .args(["serve", "--port", "0", "--data"])
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "off"),
    );
    assert!(line.starts_with("listening on http://127.0.0.1:"), "{line}");
    let line = common::first_line(
        Command::new(BIN)
            .args(["serve", "--host", "::1", "-p", "0", "--data"])
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "off"),
    );
    assert!(line.starts_with("listening on http://[::1]:"), "{line}");
    let line = common::first_line(
        Command::new(BIN)
            .args(["echo", "--port", "0"])
            .env("RUST_LOG", "off"),
    );
    assert!(line.starts_with("listening on ws://127.0.0.1:"), "{line}");
}
