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
             (another process is listening on {addr})"
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
