//! `tether bench` against the real `tether echo`: it measures, verifies and reports.

mod common;

use std::process::{Command, Stdio};

use common::{start_echo, BIN};

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_echo_verifies_every_echo_and_reports_latency() {
    let server = start_echo(&[]);
    for extra in [&["--binary"][..], &["--deflate"][..]] {
        let mut args = vec![
            "echo",
            "--url",
            &server.url,
            "--conns",
            "4",
            "--size",
            "300",
            "--pipeline",
            "4",
            "--duration",
            "0.5",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let summary = bench(&args);
        assert_eq!(summary["errors"], 0, "{summary}");
        assert_eq!(summary["connections"], 4);
        assert!(summary["messages"].as_u64().unwrap() > 10, "{summary}");
        assert!(summary["p50_us"].as_u64().unwrap() <= summary["max_us"].as_u64().unwrap());
    }
}

#[test]
fn bench_idle_holds_its_connections() {
    let server = start_echo(&[]);
    let summary = bench(&[
        "idle",
        "--url",
        &server.url,
        "--conns",
        "50",
        "--hold",
        "0.2",
    ]);
    assert_eq!(summary["held"], 50, "{summary}");
    assert_eq!(summary["failed"], 0);
}
