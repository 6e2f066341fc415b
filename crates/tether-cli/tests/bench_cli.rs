//! `tether bench` against the real `tether echo`: it measures, verifies and reports.

mod common;

use std::process::{Command, Stdio};

use common::{start_echo, start_serve, BIN};

/// Runs `tether bench ARGS --json`: its summary, exit code and stderr.
fn run_bench(args: &[&str]) -> (serde_json::Value, Option<i32>, String) {
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let summary = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no summary ({e}): {stderr}"));
    (summary, out.status.code(), stderr)
}

/// Runs a bench that must succeed; returns its summary.
fn bench(args: &[&str]) -> serde_json::Value {
    let (summary, code, stderr) = run_bench(args);
    assert_eq!(code, Some(0), "{stderr}");
    summary
}

#[test]
fn bench_echo_verifies_every_echo_and_reports_latency() {
    let server = start_echo(&[]);
    let modes = [
        &["--binary"][..],
        &["--deflate"][..],
        &["--prebuilt"][..],
        &["--prebuilt", "--binary"][..],
    ];
    for extra in modes {
        let mut args = vec![
            "echo",
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
fn bench_prebuilt_checks_the_handshake_and_every_length_form() {
    let server = start_echo(&[]);
    // 7-bit, 16-bit and 64-bit payload lengths: the expected frames must match the server's.
    for size in ["100", "1000", "70000"] {
        let summary = bench(&[
            "echo",
            &server.url,
            "--conns",
            "2",
            "--size",
            size,
            "--pipeline",
            "2",
            "--duration",
            "0.3",
            "--quiet",
            "--prebuilt",
            "--binary",
        ]);
        assert_eq!(summary["errors"], 0, "{size}: {summary}");
        assert!(
            summary["messages"].as_u64().unwrap() > 0,
            "{size}: {summary}"
        );
    }
    // A plain TCP echo is not a WebSocket server: the handshake fails, loudly.
    let out = Command::new(BIN)
        .args([
            "bench",
            "echo",
            &tcp_echo(|_| {}),
            "--prebuilt",
            "--duration",
            "0.2",
        ])
        .args(["--conns", "1", "--quiet"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("handshake"));
}

#[test]
fn bench_idle_holds_its_connections() {
    let server = start_echo(&[]);
    // http:// is taken as ws://, as `connect` takes it; --json names the URL used.
    let summary = bench(&[
        "idle",
        &server.url.replace("ws://", "http://"),
        "--conns",
        "50",
        "--hold",
        "0.2",
    ]);
    assert_eq!(summary["params"]["url"], server.url.as_str());
    assert_eq!(summary["held"], 50, "{summary}");
    assert_eq!(summary["failed"], 0);
}

/// A plain TCP echo on 127.0.0.1:0, one thread per connection, that applies `corrupt` to
/// every chunk before writing it back. Returns its `ws://` URL; the threads end with the test.
fn tcp_echo(corrupt: fn(&mut [u8])) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    corrupt(&mut buf[..n]);
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

#[test]
fn bench_echo_raw_gets_back_exactly_the_frames_it_sent() {
    let url = tcp_echo(|_| {});
    // 7-bit, 16-bit and 64-bit payload lengths; text and binary.
    for (size, extra) in [
        ("20", &["--binary"][..]),
        ("300", &[]),
        ("70000", &["--binary"]),
    ] {
        let mut args = vec![
            "echo",
            "--raw",
            &url,
            "--conns",
            "3",
            "--size",
            size,
            "--pipeline",
            "4",
            "--duration",
            "0.3",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let summary = bench(&args);
        assert_eq!(summary["errors"], 0, "{size}: {summary}");
        assert_eq!(summary["connections"], 3);
        assert!(summary["messages"].as_u64().unwrap() > 10, "{summary}");
    }
}

#[test]
fn bench_echo_raw_counts_an_echo_that_differs_as_an_error() {
    let url = tcp_echo(|chunk| chunk[chunk.len() - 1] ^= 1);
    let (summary, code, stderr) = run_bench(&[
        "echo",
        "--raw",
        "--url",
        &url,
        "--conns",
        "2",
        "--size",
        "100",
        "--duration",
        "0.3",
        "--quiet",
    ]);
    assert_eq!(summary["errors"], 2, "{summary}");
    assert_eq!(summary["messages"], 0, "{summary}");
    // A run with errors fails, and says what the first was; the summary names the run.
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "tether: 2 errors; the first: an echo differs from the frame sent"
    );
    assert_eq!(
        summary["first_error"],
        "an echo differs from the frame sent"
    );
    assert_eq!(summary["params"]["url"], url.as_str());
    assert_eq!(summary["params"]["size"], 100);
}

#[test]
fn bench_idle_fails_when_connections_do_not_hold() {
    let (_held, addr) = common::refusing_address();
    let url = format!("ws://{addr}/");
    let (summary, code, stderr) = run_bench(&["idle", &url, "--conns", "5", "--hold", "0.1"]);
    assert_eq!(summary["held"], 0, "{summary}");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("tether: 5 of 5 connections failed to open or did not stay open"),
        "{stderr}"
    );
}

#[test]
fn bench_idle_raw_holds_plain_tcp_connections() {
    let url = tcp_echo(|_| {});
    let summary = bench(&["idle", "--raw", &url, "--conns", "20", "--hold", "0.2"]);
    assert_eq!(summary["held"], 20, "{summary}");
}

#[test]
fn a_reader_that_went_away_is_not_an_error() {
    let server = start_echo(&[]);
    let mut child = Command::new(BIN)
        .args([
            "bench",
            "echo",
            &server.url,
            "--conns",
            "1",
            "--duration",
            "0.2",
        ])
        .arg("--quiet")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // `| head -0`
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bench_idle_shows_a_live_count_on_a_terminal() -> Result<(), rexpect::error::Error> {
    let server = start_echo(&[]);
    let mut command = Command::new(BIN);
    command.args(["bench", "idle", &server.url, "--conns", "7", "--hold", "2"]);
    let mut p = rexpect::session::spawn_command(command, Some(10_000))?;
    p.exp_regex(r"holding 7 of 7 \(0 dropped\), [12] s left")?;
    p.exp_string("7 of 7 connections held (0 failed)")?;
    p.exp_eof()?;
    Ok(())
}

#[test]
fn bench_idle_subscribes_over_the_channel_protocol() {
    let data = tempfile::tempdir().unwrap();
    let server = start_serve(&["--data", data.path().to_str().unwrap()]);
    let url = format!("ws://{}/ws?name=g{{n}}", server.addr);
    let summary = bench(&[
        "idle",
        &url,
        "--conns",
        "6",
        "--hold",
        "0.3",
        "--subscribe",
        "room:r{n/3}",
        "--subscribe",
        "room:all",
    ]);
    assert_eq!(summary["held"], 6, "{summary}");
    // A channel the server refuses: no connection counts as open.
    let (summary, code, _) = run_bench(&[
        "idle",
        &url,
        "--conns",
        "2",
        "--hold",
        "0.2",
        "--subscribe",
        "nowhere:x",
    ]);
    assert_eq!(code, Some(1));
    assert_eq!(summary["held"], 0, "{summary}");
}

#[test]
fn bench_fanout_counts_every_delivery_over_the_channel_protocol_and_a_plain_relay() {
    let data = tempfile::tempdir().unwrap();
    let server = start_serve(&[
        "--data",
        data.path().to_str().unwrap(),
        "--message-rate",
        "100000",
        "--identity-message-rate",
        "100000",
    ]);
    // tether.v1: everyone subscribes to one room; the first publishes to it.
    let channels = format!("ws://{}/ws?name=f{{n}}", server.addr);
    // A plain relay to every connection: with one connection, an echo server is one.
    let echo = start_echo(&[]);
    for (url, channel, subscribers) in [(&channels, Some("room:fan"), 30), (&echo.url, None, 1)] {
        let n = subscribers.to_string();
        let mut args = vec![
            "fanout",
            url,
            "--subscribers",
            &n,
            "--duration",
            "0.5",
            "--window",
            "2",
            "--quiet",
        ];
        args.extend(channel.map(|c| ["--channel", c]).iter().flatten());
        let summary = bench(&args);
        let publications = summary["publications"].as_u64().unwrap();
        assert!(publications > 0, "{summary}");
        assert_eq!(
            summary["deliveries"],
            publications * subscribers,
            "{summary}"
        );
        assert_eq!(
            (&summary["missing"], &summary["errors"]),
            (&0.into(), &0.into())
        );
        assert!(summary["p99_us"].as_u64().unwrap() > 0, "{summary}");
    }
    // Replayed history is not counted as this run's: a second run in the same room.
    let again = bench(&[
        "fanout",
        &channels,
        "--subscribers",
        "5",
        "--duration",
        "0.2",
        "--channel",
        "room:fan",
        "--quiet",
    ]);
    assert_eq!(
        again["deliveries"],
        again["publications"].as_u64().unwrap() * 5,
        "{again}"
    );
    // Ephemeral events: stored nowhere, each reaches everyone but its sender.
    let events = bench(&[
        "fanout",
        &channels,
        "--subscribers",
        "6",
        "--duration",
        "0.3",
        "--channel",
        "room:fan",
        "--events",
        "--quiet",
    ]);
    let sent = events["publications"].as_u64().unwrap();
    assert!(sent > 0, "{events}");
    assert_eq!(
        (&events["deliveries"], &events["missing"], &events["errors"]),
        (&(sent * 5).into(), &0.into(), &0.into()),
        "{events}"
    );
}

#[test]
fn bench_fanout_reports_what_the_server_refuses() {
    let data = tempfile::tempdir().unwrap();
    // The default command rate: a publisher keeping 8 in flight is soon told to slow down.
    let server = start_serve(&["--data", data.path().to_str().unwrap()]);
    let url = format!("ws://{}/ws?name=f{{n}}", server.addr);
    let (summary, code, stderr) = run_bench(&[
        "fanout",
        &url,
        "--subscribers",
        "3",
        "--duration",
        "2",
        "--window",
        "8",
        "--channel",
        "room:slow",
        "--quiet",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(summary["errors"].as_u64().unwrap() > 0, "{summary}");
    let first = summary["first_error"].as_str().unwrap();
    assert!(first.contains("110"), "{summary}");
    // It names what to raise.
    assert!(
        first.contains("--message-rate") && first.contains("--identity-message-rate"),
        "{summary}"
    );
}

#[test]
fn bench_fanout_paces_its_publications_and_marks_the_publishing() {
    // One connection to an echo server is a relay to every subscriber.
    let echo = start_echo(&[]);
    let (summary, code, stderr) = run_bench(&[
        "fanout",
        &echo.url,
        "--subscribers",
        "1",
        "--duration",
        "1",
        "--window",
        "8",
        "--rate",
        "40",
        "--marks",
        "--quiet",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let publications = summary["publications"].as_u64().unwrap();
    // At most one more than 40 a second allows in the second (the first goes at once); a
    // late wake-up sends what is due together, so hardly fewer.
    assert!((30..=41).contains(&publications), "{summary}");
    assert_eq!(
        summary["deliveries"].as_u64(),
        Some(publications),
        "{summary}"
    );
    let marks: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("publish"))
        .collect();
    assert_eq!(marks, ["publishing", "published"], "{stderr}");
}

#[test]
fn bench_echo_idle_and_fanout_over_http2_share_connections() {
    let data = tempfile::tempdir().unwrap();
    let server = start_serve(&[
        "--data",
        data.path().to_str().unwrap(),
        "--h2c",
        "--message-rate",
        "100000",
        "--identity-message-rate",
        "100000",
        // The subscribers all come from one address (over few connections), and joining a
        // room at once they may each be the one starting it.
        "--rooms-per-hour",
        "1000000",
    ]);
    let url = format!("ws://{}/ws/echo", server.addr);
    let echo = [
        "echo",
        &url,
        "--conns",
        "20",
        "--duration",
        "0.5",
        "--quiet",
    ];
    let summary = bench(&[&echo[..], &["--http2", "--http2-connections", "2"]].concat());
    assert_eq!(summary["connections"], 20, "{summary}");
    assert!(summary["messages"].as_u64().unwrap() > 0, "{summary}");
    let idle = ["idle", &url, "--conns", "30", "--hold", "0.2", "--quiet"];
    let summary = bench(&[&idle[..], &["--http2", "--http2-connections", "3"]].concat());
    assert_eq!(summary["held"], 30, "{summary}");
    let channels = format!("ws://{}/ws?name=f{{n}}", server.addr);
    let fanout = [
        "fanout",
        &channels,
        "--subscribers",
        "40",
        "--duration",
        "0.5",
    ];
    let more = [
        "--channel",
        "room:h2",
        "--quiet",
        "--http2",
        "--http2-connections",
        "4",
    ];
    let summary = bench(&[&fanout[..], &more].concat());
    let publications = summary["publications"].as_u64().unwrap();
    assert!(publications > 0, "{summary}");
    assert_eq!(summary["deliveries"], publications * 40, "{summary}");
    // Two connections for the echo run, three for the idle one, four for the fan-out.
    let mut tcp = std::net::TcpStream::connect(&server.addr).unwrap();
    let get = format!(
        "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.addr
    );
    std::io::Write::write_all(&mut tcp, get.as_bytes()).unwrap();
    let mut metrics = String::new();
    std::io::Read::read_to_string(&mut tcp, &mut metrics).unwrap();
    assert!(
        metrics.contains("tether_http2_connections_total 9"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tether_http2_websockets_total 90"),
        "{metrics}"
    );
}
