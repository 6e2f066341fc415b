//! `tether connect` as scripts use it: the real binary, stdin and stdout as pipes, against
//! `tether echo`, servers that refuse or close with an error, and TLS with a private CA.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::{CloseCode, CloseFrame, Config, Message};
use tokio::net::TcpListener;

mod common;

use common::{serve, BIN};

/// Runs `tether connect ARGS` with `input` on stdin; kills it after 20 s.
fn connect(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(BIN)
        .arg("connect")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let pid = child.id();
    // A watchdog: kills the client if it has not exited in 20 s, and never after it has (its
    // pid may belong to another process by then).
    let (exited, watched) = std::sync::mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        if watched.recv_timeout(Duration::from_secs(20))
            == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    });
    let out = child.wait_with_output().unwrap();
    drop(exited);
    guard.join().unwrap();
    out
}

/// Checks stdout and the exit code, showing stderr when they differ.
fn expect(out: &Output, stdout: &str, code: i32) {
    assert_eq!(text(&out.stdout), stdout, "stderr: {}", text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(code),
        "stderr: {}",
        text(&out.stderr)
    );
}

/// A server that answers its first connection's request with `response` (an HTTP answer, not
/// an upgrade).
fn answering(response: String) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::Read;
        let (mut tcp, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf);
        let _ = tcp.write_all(response.as_bytes());
    });
    addr
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An in-process echo server on a runtime of its own; returns its address.
fn echo_server(config: Config) -> SocketAddr {
    serve(
        move |ws| async move {
            let mut ws = ws;
            while let Some(Ok(msg)) = ws.recv().await {
                if msg.is_data() && ws.send(msg).await.is_err() {
                    break;
                }
            }
        },
        config,
    )
}

#[test]
fn pipe_echoes_each_line_and_exits_zero_at_end_of_input() {
    let addr = echo_server(Config::default());
    let out = connect(&[&format!("ws://{addr}/")], "hello\nsecond line ✓\n");
    expect(&out, "hello\nsecond line ✓\n", 0);
}

#[test]
fn send_and_exit_after_script_a_conversation() {
    let addr = echo_server(Config::default());
    let url = format!("ws://{addr}/");
    let out = connect(
        &[
            &url,
            "--send",
            "one",
            "--send",
            "{\"a\":1}",
            "--exit-after",
            "2",
            "--json",
        ],
        "",
    );
    expect(&out, "one\n{\n  \"a\": 1\n}\n", 0);

    // Nothing to wait for: connect, close normally, exit 0, whatever --send says.
    let out = connect(&[&url, "--send", "unsent", "--exit-after", "0"], "");
    expect(&out, "", 0);
    assert_eq!(text(&out.stderr), "", "no error");
}

#[test]
fn no_newline_and_binary_modes() {
    let addr = echo_server(Config::default());
    let url = format!("ws://{addr}/");
    let out = connect(
        &[
            &url,
            "--no-newline",
            "--binary",
            "--send",
            "ab",
            "--send",
            "cd",
            "--exit-after",
            "2",
        ],
        "",
    );
    assert_eq!(text(&out.stdout), "abcd");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn deflate_is_offered_and_used() {
    let config = Config::default().deflate(Some(Default::default()));
    let addr = echo_server(config);
    let big = "compress me ".repeat(1000);
    let out = connect(
        &[&format!("ws://{addr}/"), "--deflate", "-v"],
        &format!("{big}\n"),
    );
    assert_eq!(text(&out.stdout), format!("{big}\n"));
    let log = text(&out.stderr);
    assert!(
        log.contains("> Sec-WebSocket-Extensions: permessage-deflate"),
        "{log}"
    );
    assert!(
        log.contains("< Sec-WebSocket-Extensions: permessage-deflate"),
        "{log}"
    );
    // End of input: our close, then the server's answer.
    assert!(log.contains("> close frame, 1000\n"), "{log}");
    assert!(log.contains("< close frame, 1000\n"), "{log}");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn verbose_logs_both_close_frames_when_the_server_closes_first() {
    let addr = common::serve(
        |mut ws| async move {
            let _ = ws
                .close(Some(CloseFrame::new(CloseCode::from(4001), "bye")))
                .await;
        },
        Config::default(),
    );
    // --send and --wait keep our side open for 5 s: the server's close comes first.
    let url = format!("ws://{addr}/");
    let out = connect(&[&url, "-v", "--send", "hi", "--wait", "5"], "");
    let log = text(&out.stderr);
    assert!(
        log.contains("< close frame, 4001 bye\n> close frame, 4001\n"),
        "{log}"
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn headers_auth_origin_and_subprotocol_reach_the_server() {
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<Vec<(String, String)>>();
    let seen_tx = std::sync::Mutex::new(seen_tx);
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (tcp, _) = std_listener.accept().unwrap();
        tcp.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
            let config = Config::default().protocols(vec!["chat".into()]);
            let mut ws = tether::accept_hdr(tcp, config, |req, _| {
                let pick = |n: &str| {
                    (
                        n.to_owned(),
                        req.headers.get_str(n).unwrap_or("").to_owned(),
                    )
                };
                let _ = seen_tx.lock().unwrap().send(vec![
                    pick("x-trace"),
                    pick("authorization"),
                    pick("origin"),
                ]);
                Ok(())
            })
            .await
            .unwrap();
            while let Some(Ok(msg)) = ws.recv().await {
                if msg.is_data() {
                    let _ = ws
                        .send(Message::text(ws.protocol().unwrap_or("none").to_owned()))
                        .await;
                }
            }
        });
    });
    let out = connect(
        &[
            &format!("ws://{addr}/"),
            "-H",
            "X-Trace: abc",
            "--auth",
            "ann:secret",
            "--origin",
            "https://app.example",
            "--subprotocol",
            "chat",
        ],
        "which protocol?\n",
    );
    assert_eq!(text(&out.stdout), "chat\n", "stderr: {}", text(&out.stderr));
    let seen = seen_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(seen[0].1, "abc");
    assert_eq!(seen[1].1, "Basic YW5uOnNlY3JldA==");
    assert_eq!(seen[2].1, "https://app.example");
}

#[test]
fn a_server_closing_with_an_error_code_gives_a_failing_exit() {
    let addr = serve(
        |mut ws| async move {
            let _ = ws.recv().await;
            let _ = ws
                .close(Some(CloseFrame::new(
                    CloseCode::POLICY_VIOLATION,
                    "not today",
                )))
                .await;
        },
        Config::default(),
    );
    let out = connect(&[&format!("ws://{addr}/")], "hi\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("1008 not today"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_refused_handshake_shows_status_and_body() {
    let addr = answering(
        "HTTP/1.1 403 Forbidden\r\nContent-Length: 22\r\n\r\norigin is not allowed\n".into(),
    );
    let out = connect(&[&format!("ws://{addr}/")], "");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("HTTP 403 Forbidden: origin is not allowed"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn bad_urls_and_unreachable_servers_are_one_line_errors() {
    let out = connect(&["ftp://example.com/"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not ws or wss"),
        "{}",
        text(&out.stderr)
    );

    let (_held, addr) = common::refusing_address();
    let out = connect(&[&format!("ws://{addr}/")], "");
    assert_eq!(out.status.code(), Some(1));
    let said = text(&out.stderr);
    assert_eq!(
        said.trim_end(),
        format!(
            "tether: connecting to {addr}: Connection refused (os error 111) (nothing listens \
             there: is the server running, on this port?)"
        )
    );
}

/// A TLS echo server with a certificate for `localhost` signed by a fresh CA; returns
/// (port, CA PEM).
fn tls_echo_server() -> (u16, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (tls_echo_server_with(&cert, &key), ca.pem())
}

/// A TLS echo server presenting `cert`; returns its port.
fn tls_echo_server_with(cert: &rcgen::Certificate, key: &rcgen::KeyPair) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls_pki_types::CertificateDer::from(cert.der().to_vec())],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let port = std_listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::from_std(std_listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut ws) = tether::accept(tls).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.recv().await {
                        if msg.is_data() && ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    });
    port
}

#[test]
fn wss_with_a_custom_ca_works_and_without_it_explains_why_not() {
    let (port, ca_pem) = tls_echo_server();
    let dir = std::env::temp_dir().join(format!("tether-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let url = format!("wss://localhost:{port}/");

    let out = connect(&[&url, "--ca", ca_file.to_str().unwrap()], "over tls\n");
    expect(&out, "over tls\n", 0);

    let out = connect(&[&url], "");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "tether: TLS: handshake with localhost: the server's certificate is signed by a CA this \
         client does not trust (UnknownIssuer) (pass that CA's certificate with --ca FILE \
         (PEM), or use --insecure for a test server)"
    );

    let out = connect(&[&url, "--insecure"], "anyway\n");
    assert_eq!(
        text(&out.stdout),
        "anyway\n",
        "stderr: {}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_echo_binary_and_the_connect_binary_talk() {
    // The acceptance: `echo hello | tether connect ws://…` against `tether echo`.
    let server = common::start_echo(&[]);
    let out = connect(&[&server.url], "hello\n");
    expect(&out, "hello\n", 0);
}

/// A CONNECT proxy on a free port that records the targets it tunnels to.
fn connect_proxy() -> (SocketAddr, std::sync::mpsc::Receiver<String>) {
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
            let listener = TcpListener::from_std(std_listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let seen_tx = seen_tx.clone();
                tokio::spawn(async move {
                    let mut client = tokio::io::BufReader::new(tcp);
                    let mut first = String::new();
                    client.read_line(&mut first).await.unwrap();
                    let mut line = String::new();
                    while client.read_line(&mut line).await.unwrap() > 2 {
                        line.clear();
                    }
                    let target = first.split_whitespace().nth(1).unwrap().to_owned();
                    let _ = seen_tx.send(first.trim().to_owned());
                    let mut upstream = tokio::net::TcpStream::connect(&target).await.unwrap();
                    let mut client = client.into_inner();
                    client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
    });
    (addr, seen_rx)
}

#[test]
fn proxy_option_and_environment_tunnel_through_connect() {
    let server = common::start_echo(&[]);
    let (proxy, seen) = connect_proxy();
    let out = connect(
        &[&server.url, "--proxy", &format!("http://{proxy}")],
        "via proxy\n",
    );
    expect(&out, "via proxy\n", 0);
    let request = seen.recv_timeout(Duration::from_secs(5)).unwrap();
    let target = server.url.trim_start_matches("ws://").trim_end_matches('/');
    assert_eq!(request, format!("CONNECT {target} HTTP/1.1"));

    // HTTP_PROXY is honoured for ws://, and NO_PROXY bypasses it.
    let run_env = |no_proxy: &str| {
        let mut child = Command::new(BIN)
            .args(["connect", &server.url])
            .env("HTTP_PROXY", format!("http://{proxy}"))
            .env("NO_PROXY", no_proxy)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"env\n").unwrap();
        child.wait_with_output().unwrap()
    };
    expect(&run_env(""), "env\n", 0);
    assert!(seen.recv_timeout(Duration::from_secs(5)).is_ok());
    expect(&run_env("127.0.0.1"), "env\n", 0);
    assert!(
        seen.recv_timeout(Duration::from_millis(300)).is_err(),
        "NO_PROXY was ignored"
    );
}

#[test]
fn a_proxy_that_refuses_is_a_clear_error() {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = std_listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::Read;
        let (mut tcp, _) = std_listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = tcp.read(&mut buf);
        let _ = tcp.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n");
    });
    let out = connect(
        &["ws://127.0.0.1:9/", "--proxy", &format!("http://{proxy}")],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("proxy refused CONNECT 127.0.0.1:9: 407"),
        "{err}"
    );
}

#[test]
fn reconnect_resumes_after_the_server_drops_the_connection() {
    use std::io::BufRead;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // The first connection echoes one message and then vanishes without a close frame;
    // later ones echo normally.
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let addr = serve(
        move |mut ws| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                while let Some(Ok(msg)) = ws.recv().await {
                    if msg.is_data() {
                        let _ = ws.send(msg).await;
                        if n == 0 {
                            return; // dropped: TCP closes without a close handshake
                        }
                    }
                }
            }
        },
        Config::default(),
    );
    let mut child = Command::new(BIN)
        .args(["connect", &format!("ws://{addr}/"), "--reconnect"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        let _ = Command::new("kill").arg(pid.to_string()).status();
    });
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdin.write_all(b"one\n").unwrap();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "one\n");
    // Wait until the client is on its second connection, then carry on.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while connections.load(Ordering::SeqCst) < 2 {
        assert!(std::time::Instant::now() < deadline, "no reconnect");
        std::thread::sleep(Duration::from_millis(20));
    }
    stdin.write_all(b"two\n").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "two\n");
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("connection lost") && err.contains("reconnected after"),
        "{err}"
    );
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "one reconnect, nothing more"
    );
}

#[test]
fn connect_timeout_bounds_a_silent_server() {
    // Accepts TCP, never answers the handshake.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let started = std::time::Instant::now();
    let out = connect(&[&format!("ws://{addr}/"), "--connect-timeout", "0.5"], "");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("handshake timed out"),
        "{}",
        text(&out.stderr)
    );
    drop(silent);
}

#[test]
fn max_message_size_refuses_a_large_echo_with_1009() {
    let server = common::start_echo(&[]);
    let big = "x".repeat(5000);
    let out = connect(
        &[&server.url, "--max-message-size", "1000", "--send", &big],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("1009"), "{err}");
}

#[test]
fn tls_mistakes_are_explained_with_what_to_do() {
    // A self-signed certificate made as a CA (what `openssl req -x509` makes by default),
    // presented by the server and passed as --ca.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    let port = tls_echo_server_with(&cert, &key);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("self-signed.pem");
    std::fs::write(&ca_file, cert.pem()).unwrap();
    let out = connect(
        &[
            &format!("wss://localhost:{port}/"),
            "--ca",
            ca_file.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "tether: TLS: handshake with localhost: the server presents a CA certificate (CA:TRUE) \
         as its own, which TLS refuses (CaUsedAsEndEntity) (sign a separate server certificate \
         with that CA and pass the CA with --ca, or use --insecure for a test server)"
    );

    // wss:// to a plain server.
    let plain = echo_server(Config::default());
    let out = connect(&[&format!("wss://{plain}/")], "");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "tether: TLS: handshake with 127.0.0.1: the server did not answer in TLS (is it a plain \
         ws:// server?)"
    );
}

#[test]
fn wscat_and_websocat_spellings_are_understood() {
    // Says which subprotocol was agreed, pings, then echoes.
    let addr = serve(
        |mut ws| async move {
            let agreed = ws.protocol().unwrap_or("none").to_owned();
            let _ = ws.send(Message::text(format!("protocol {agreed}"))).await;
            let _ = ws.send(Message::Ping("are you there".into())).await;
            while let Some(Ok(msg)) = ws.recv().await {
                if msg.is_data() && ws.send(msg).await.is_err() {
                    break;
                }
            }
        },
        Config::default().protocols(vec!["chat".into()]),
    );
    // wscat: -c URL, -s, -P, -x, -w; websocat: -k (a no-op for ws://).
    let url = format!("ws://{addr}/");
    let out = connect(
        &[
            "-c", &url, "-k", "-s", "chat", "-P", "-x", "hello", "-w", "0.5",
        ],
        "",
    );
    expect(&out, "protocol chat\nhello\n", 0);
    assert!(
        text(&out.stderr).contains("< ping (13 bytes)"),
        "{}",
        text(&out.stderr)
    );
    let out = connect(
        &[
            &url,
            "--protocol",
            "chat",
            "--execute",
            "again",
            "--wait",
            "0.5",
        ],
        "",
    );
    expect(&out, "protocol chat\nagain\n", 0);

    // http:// is taken as ws://, and an address without a scheme too.
    for given in [
        format!("http://{addr}/"),
        format!("{addr}/"),
        addr.to_string(),
    ] {
        let out = connect(&[&given, "-b"], "bytes\n");
        expect(&out, "protocol none\nbytes\n", 0);
    }
}

#[test]
fn a_pipe_ends_with_the_connection_while_stdin_stays_open() {
    // Closes each connection 200 ms after it opens, normally or with an error.
    for (code, exit) in [(CloseCode::NORMAL, 0), (CloseCode::INTERNAL_ERROR, 1)] {
        let addr = serve(
            move |mut ws| async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = ws.close(Some(CloseFrame::new(code, "bye"))).await;
                while let Some(Ok(_)) = ws.recv().await {}
            },
            Config::default(),
        );
        let mut child = Command::new(BIN)
            .args(["connect", &format!("ws://{addr}/")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Held open and silent, like `tail -f | tether connect`.
        let _stdin = child.stdin.take().unwrap();
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if started.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(exit),
            "connect must exit when the server closes with {code}, stdin open or not"
        );
    }
}

#[test]
fn text_from_the_server_reaches_the_terminal_escaped() {
    // A close reason that would retitle the window and clear the screen.
    let addr = serve(
        |mut ws| async move {
            let reason = "\u{1b}]0;pwned\u{7}\u{1b}[2J\rfake line";
            let frame = CloseFrame::new(CloseCode::POLICY_VIOLATION, reason);
            let _ = ws.close(Some(frame)).await;
            while let Some(Ok(_)) = ws.recv().await {}
        },
        Config::default(),
    );
    let out = connect(&[&format!("ws://{addr}/")], "");
    let err = text(&out.stderr);
    assert!(!err.contains('\u{1b}') && !err.contains('\r'), "{err:?}");
    assert!(
        err.contains("closed by the server: 1008 \\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{d}fake line"),
        "{err}"
    );

    // A refusal whose body carries the same.
    let body = "\u{1b}[2Jgo away\u{202e}";
    let refusing = answering(format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    let out = connect(&[&format!("ws://{refusing}/")], "");
    let err = text(&out.stderr);
    assert!(
        !err.contains('\u{1b}') && !err.contains('\u{202e}'),
        "{err:?}"
    );
    assert!(
        err.contains("HTTP 403 Forbidden: \\u{1b}[2Jgo away\\u{202e}"),
        "{err}"
    );
}

#[test]
fn reconnecting_to_a_server_that_closes_at_once_backs_off() {
    // Accepts, then closes with 1011 at once: every connection opens and fails.
    let opened = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let counter = opened.clone();
    let addr = serve(
        move |mut ws| {
            counter.lock().unwrap().push(Instant::now());
            async move {
                let frame = CloseFrame::new(CloseCode::INTERNAL_ERROR, "down");
                let _ = ws.close(Some(frame)).await;
                while let Some(Ok(_)) = ws.recv().await {}
            }
        },
        Config::default(),
    );
    let mut child = Command::new(BIN)
        .args(["connect", "--reconnect", &format!("ws://{addr}/")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Three connections, however slowly this machine runs them.
    let started = Instant::now();
    while opened.lock().unwrap().len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "fewer than 3 connections in 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    // The waits are 0.125–0.25 s, then 0.25–0.5 s, ...: load can only lengthen the gaps.
    let at = opened.lock().unwrap().clone();
    let gaps = [at[1] - at[0], at[2] - at[1]];
    assert!(
        gaps[0] >= Duration::from_millis(125) && gaps[1] >= Duration::from_millis(250),
        "{gaps:?}: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("reconnecting in"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_server_that_never_reads_is_given_up_after_the_write_timeout() {
    // It completes the handshake, then takes nothing more.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let mut reader = std::io::BufReader::new(tcp.try_clone().unwrap());
        let mut key = String::new();
        loop {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
            if let Some(k) = line.strip_prefix("Sec-WebSocket-Key: ") {
                key = k.trim().to_owned();
            }
            if line == "\r\n" {
                break;
            }
        }
        let accept = tether::proto::handshake::accept_key(key.as_bytes());
        write!(&tcp, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_secs(20));
        drop(tcp);
    });
    let mut child = Command::new(BIN)
        .args([
            "connect",
            &format!("ws://{addr}/"),
            "--write-timeout",
            "0.5",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Far more than the kernel buffers between us; writing stops when the client exits.
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        let line = format!("{}\n", "x".repeat(60_000));
        while stdin.write_all(line.as_bytes()).is_ok() {}
    });
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("the peer took nothing we wrote within the write timeout"),
        "{stderr}"
    );
}

#[test]
fn a_web_page_is_named_not_printed_and_tether_serve_says_its_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_serve(&["--data", dir.path().to_str().unwrap()]);
    // The URL the server prints on start: its front page.
    let out = connect(&[&format!("ws://{}/", server.addr)], "");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.len() < 300, "short: {err}");
    assert!(
        err.contains("HTTP 200 OK: a web page (") && err.contains("not a WebSocket endpoint"),
        "{err}"
    );
    assert!(err.contains("/ws, /ws/echo and /ws/rooms/NAME"), "{err}");

    // Any other server's long answer is cut.
    let body = "no\n".repeat(1000);
    let addr = answering(format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    let out = connect(&[&format!("ws://{addr}/")], "");
    let err = text(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("HTTP 400 Bad Request: no no no"), "{err}");
    assert!(err.contains("no no…") && err.len() < 400, "{err}");
}

#[test]
fn wscat_habits_mean_what_they_mean_there() {
    let addr = echo_server(Config::default());
    let url = format!("ws://{addr}/");
    // `-x` without `-w` closes 2 s after sending, showing the answer.
    let started = Instant::now();
    let out = connect(&[&url, "-x", "hi"], "");
    expect(&out, "hi\n", 0);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // `-n` is wscat's --no-check (a no-op for ws://), not "no newline".
    let out = connect(&[&url, "-n", "-x", "a", "-w", "0.2"], "");
    expect(&out, "a\n", 0);
    // `-o` sends an Origin: tether serve refuses a browser from elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_serve(&["--data", dir.path().to_str().unwrap()]);
    let echo = format!("ws://{}/ws/echo", server.addr);
    let out = connect(&[&echo, "-o", "http://elsewhere.example", "-x", "a"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("HTTP 403"),
        "{}",
        text(&out.stderr)
    );
    // A pipe into a room, as the README shows: plain text is a message, and the answer
    // that comes after the input ended is shown.
    let room = format!("ws://{}/ws/rooms/lobby?name=bob", server.addr);
    let out = connect(&[&room], "hello from a pipe\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = text(&out.stdout).lines().any(|line| {
        serde_json::from_str::<serde_json::Value>(line).is_ok_and(|m| {
            m["type"] == "message" && m["text"] == "hello from a pipe" && m["user"] == "bob"
        })
    });
    assert!(said, "{}", text(&out.stdout));
    // `-w` applies to the end of stdin too.
    let out = connect(&[&room, "-w", "0.3"], "and again\n");
    assert!(
        text(&out.stdout).contains("and again"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn http2_opens_the_websocket_as_an_extended_connect_and_http1_upgrades() {
    let data = tempfile::tempdir().unwrap();
    let serve = common::start_serve(&["--data", data.path().to_str().unwrap(), "--h2c"]);
    let url = format!("ws://{}/ws/echo", serve.addr);
    let out = connect(
        &[
            &url,
            "--http2",
            "-v",
            "--send",
            "over h2",
            "--exit-after",
            "1",
        ],
        "",
    );
    expect(&out, "over h2\n", 0);
    assert!(
        text(&out.stderr).contains("< HTTP/2 200"),
        "{}",
        text(&out.stderr)
    );
    let out = connect(
        &[
            &url,
            "--http1",
            "-v",
            "--send",
            "over h1",
            "--exit-after",
            "1",
        ],
        "",
    );
    expect(&out, "over h1\n", 0);
    assert!(
        text(&out.stderr).contains("< HTTP/1.1 101"),
        "{}",
        text(&out.stderr)
    );

    // A server without HTTP/2: --http2 says so.
    let plain = tempfile::tempdir().unwrap();
    let serve = common::start_serve(&["--data", plain.path().to_str().unwrap()]);
    let url = format!("ws://{}/ws/echo", serve.addr);
    let out = connect(&[&url, "--http2", "--send", "x", "--exit-after", "1"], "");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).is_empty());
}
