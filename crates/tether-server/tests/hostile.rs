//! What a hostile peer tries, over real sockets on loopback: resume positions the room never
//! reached, requests from other pages of the same site, oversized headers, misleading names and
//! texts, messages that never end. Each is refused the documented way, and the server keeps
//! serving everyone else.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::*;

async fn a_first_member_resuming_past_the_end_does_not_silence_the_room(kind: Kind) {
    let dir = Setup::new(kind);
    let server = start(dir.config()).await;
    let max = u64::MAX;
    let mut ann = connect(&server.ws(&format!("/ws/rooms/quiet?name=ann&since={max}"))).await;
    assert_eq!(next(&mut ann).await["recovered"], false);
    assert_ready(&next(&mut ann).await, 0);

    let mut ben = connect(&server.ws("/ws/rooms/quiet?name=ben")).await;
    next_of(&mut ben, "ready").await;
    say(&mut ben, "anyone?").await;
    for ws in [&mut ann, &mut ben] {
        let m = next_of(ws, "message").await;
        assert_eq!(
            (m["id"].as_u64(), m["text"].as_str()),
            (Some(1), Some("anyone?"))
        );
    }
    server.stop().await;
}

async fn state_changing_requests_must_declare_json_and_come_from_our_origin(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("alice", "pw").await;
    let server = start(dir.config()).await;
    let addr = server.addr;
    let poll = json!({"question": "Lunch?", "options": ["a", "b"]});
    let login = json!({"user": "alice", "password": "pw"});

    // What a page on another port of this host can send without a CORS preflight.
    for kind in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        for (path, body) in [("/api/polls", &poll), ("/api/login", &login)] {
            let (status, reply) = http(
                addr,
                "POST",
                path,
                &[("Content-Type", kind)],
                Some(body.clone()),
            )
            .await;
            assert_eq!(status, 415, "{kind} to {path}: {reply}");
            assert!(reply["error"]
                .as_str()
                .unwrap()
                .contains("application/json"));
        }
    }
    let (status, _) = http(
        addr,
        "POST",
        "/api/logout",
        &[("Content-Type", "text/plain")],
        None,
    )
    .await;
    assert_eq!(status, 415);

    // Declared JSON, but from a foreign origin: refused; from our own, or none (a script), fine.
    let foreign = [("Origin", "http://127.0.0.1:1")];
    let (status, _) = http(addr, "POST", "/api/polls", &foreign, Some(poll.clone())).await;
    assert_eq!(status, 403);
    let own = format!("http://{addr}");
    let (status, _) = http(
        addr,
        "POST",
        "/api/polls",
        &[("Origin", &own)],
        Some(poll.clone()),
    )
    .await;
    assert_eq!(status, 201);
    let json_utf8 = [("Content-Type", "application/json; charset=utf-8")];
    let (status, _) = http(addr, "POST", "/api/login", &json_utf8, Some(login)).await;
    assert_eq!(status, 200);
    let (_, polls) = http(addr, "GET", "/api/polls", &[], None).await;
    assert_eq!(
        polls.as_array().unwrap().len(),
        1,
        "only the same-origin poll exists"
    );
    server.stop().await;
}

/// Sends a raw request with one extra header of `size` bytes; returns the status.
async fn status_with_header(
    addr: std::net::SocketAddr,
    path: &str,
    upgrade: bool,
    size: usize,
) -> u16 {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let upgrade = if upgrade {
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    } else {
        "Connection: close\r\n"
    };
    let filler = "x".repeat(size);
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{upgrade}X-Filler: {filler}\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    within(tcp.read_exact(&mut head)).await.unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

async fn header_fields_over_16_kib_are_431_on_pages_api_and_upgrades(kind: Kind) {
    let dir = Setup::new(kind);
    let server = start(dir.config()).await;
    let addr = server.addr;
    for (path, upgrade) in [("/", false), ("/api/rooms", false), ("/ws/echo", true)] {
        let fine = status_with_header(addr, path, upgrade, 8 << 10).await;
        assert_eq!(
            fine,
            if upgrade { 101 } else { 200 },
            "{path} with an 8 KiB header"
        );
        assert_eq!(
            status_with_header(addr, path, upgrade, 20 << 10).await,
            431,
            "{path} with 20 KiB"
        );
    }
    server.stop().await;
}

async fn misleading_names_and_texts_are_refused(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("alice", "pw").await;
    let server = start(dir.config()).await;
    let addr = server.addr;
    let bearer = format!("Bearer {}", token(addr, "alice", "pw").await);
    let auth = [("Authorization", bearer.as_str())];

    // `.` and `..` are path segments a browser resolves away: never room names.
    for room in [".", ".."] {
        let (status, _) = http(
            addr,
            "GET",
            &format!("/api/rooms/{room}/messages"),
            &[],
            None,
        )
        .await;
        assert_eq!(status, 400, "room {room:?}");
    }
    let (status, _) = http(addr, "GET", "/api/rooms/.a/messages", &[], None).await;
    assert_eq!(status, 200);

    // A right-to-left override, NUL and other controls, over HTTP and over a socket.
    for text in [
        "invoice\u{202e}fdp.exe",
        "nul\0byte",
        "bell\u{7}",
        "iso\u{2067}late",
    ] {
        let body = json!({"text": text});
        let (status, reply) =
            http(addr, "POST", "/api/rooms/lobby/messages", &auth, Some(body)).await;
        assert_eq!(status, 400, "{text:?}: {reply}");
        let poll = json!({"question": text, "options": ["a", "b"]});
        let (status, _) = http(addr, "POST", "/api/polls", &[], Some(poll)).await;
        assert_eq!(status, 400, "poll question {text:?}");
    }
    let mut ann = connect(&server.ws("/ws/rooms/lobby?name=ann")).await;
    next_of(&mut ann, "ready").await;
    say(&mut ann, "look: \u{202e}txt.exe").await;
    let refused = next_of(&mut ann, "error").await;
    assert!(
        refused["error"].as_str().unwrap().contains("bidirectional"),
        "{refused}"
    );
    say(&mut ann, "multi\nline\tis fine ✓").await;
    assert_eq!(
        next_of(&mut ann, "message").await["text"],
        "multi\nline\tis fine ✓"
    );

    // Pages may be framed by the server's own pages only.
    let page = http_text(addr, "/").await;
    let csp = page
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("content-security-policy:")
        })
        .expect("a CSP header");
    assert!(csp.contains("frame-ancestors 'self'"), "{csp}");
    server.stop().await;
}

async fn a_message_of_endless_fragments_is_closed_with_1009(kind: Kind) {
    let dir = Setup::new(kind);
    let server = start(dir.config()).await;
    let mut tcp = raw_upgrade(server.addr, "/ws/echo", None).await;

    // A text message opened with an empty frame, then empty masked continuations, never FIN:
    // far more than any real sender splits 64 KiB into.
    let mut frames = vec![0x01, 0x80, 1, 2, 3, 4];
    for _ in 0..20_000 {
        frames.extend_from_slice(&[0x00, 0x80, 1, 2, 3, 4]);
    }
    // The server may close before it has read everything: a failed write is fine.
    let _ = tcp.write_all(&frames).await;
    let mut close = [0u8; 4];
    within(tcp.read_exact(&mut close)).await.unwrap();
    assert_eq!(close[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1009);
    server.stop().await;
}

async fn an_echo_client_that_sends_but_never_reads_is_dropped_by_the_write_timeout(kind: Kind) {
    let dir = Setup::new(kind);
    let mut c = dir.config();
    c.write_timeout = Duration::from_secs(1);
    let server = start(c).await;
    let mut tcp = raw_upgrade(server.addr, "/ws/echo", Some(4096)).await;
    // Masked 16 KiB binary messages, far more than the socket buffers and the server's write
    // budget hold: the echoes back up until the server stops reading.
    let mut frame = vec![0x82, 0xFE, 0x40, 0x00, 0, 0, 0, 0];
    frame.resize(8 + (16 << 10), 0);
    let sending = tokio::spawn(async move {
        for _ in 0..1024 {
            if tcp.write_all(&frame).await.is_err() {
                break;
            }
        }
        tcp
    });
    let dropped = async {
        loop {
            let metrics = http_text(server.addr, "/metrics").await;
            if metric(&metrics, "tether_write_timeouts_total") == 1
                && metric(&metrics, "tether_connections") == 0
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    within(dropped).await;
    // Nothing reads the server's close: the connection is cut, and the sender stops.
    drop(within(sending).await);
    server.stop().await;
}

/// Reads what the server sends until it closes (at most 15 s).
async fn read_all(tcp: &mut TcpStream) -> String {
    let mut raw = Vec::new();
    let _ = within(tcp.read_to_end(&mut raw)).await;
    String::from_utf8_lossy(&raw).into_owned()
}

async fn requests_have_deadlines_and_credentials_come_before_bodies(kind: Kind) {
    let dir = Setup::new(kind);
    let mut c = dir.config();
    c.request_timeout = Duration::from_secs(1);
    let server = start(c).await;
    let addr = server.addr;
    let head = |path: &str, extra: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: 100\r\n{extra}\r\n{{\"te"
        )
    };

    // A body that never arrives: 408 once the request timeout passes.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head("/api/polls", "").as_bytes())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let answer = read_all(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    // Without a token, the publish API refuses before reading a byte of the body.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head("/api/rooms/lobby/messages", "").as_bytes())
        .await
        .unwrap();
    let mut status = [0u8; 12];
    within(tcp.read_exact(&mut status)).await.unwrap();
    assert_eq!(&status[9..12], b"401");

    // A body over 64 KiB is 413, announced or not.
    let big = "x".repeat(70 << 10);
    let (status, _) = http(
        addr,
        "POST",
        "/api/login",
        &[],
        Some(json!({"user": big, "password": "x"})),
    )
    .await;
    assert_eq!(status, 413);
    server.stop().await;
}

async fn plain_http_connections_are_capped_per_address_and_in_all(kind: Kind) {
    let dir = Setup::new(kind);
    let mut c = dir.config();
    c.max_http_connections = 6;
    c.max_http_connections_per_ip = 4;
    let server = start(c).await;
    let addr = server.addr;
    let from = |ip: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind((std::net::Ipv4Addr::from(ip), 0).into())
            .unwrap();
        within(socket.connect(addr)).await.unwrap()
    };
    let healthz = |ip: [u8; 4]| async move {
        http_from(ip.into(), addr, "GET", "/healthz", &[], None)
            .await
            .0
    };

    // Four idle connections (no request yet) fill 127.0.0.1's share: the next one from there is
    // answered 429 and closed, while another address is served.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(from([127, 0, 0, 1]).await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut fifth = from([127, 0, 0, 1]).await;
    let answer = read_all(&mut fifth).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("Retry-After: 1"), "{answer}");
    assert_eq!(healthz([127, 0, 0, 2]).await, 200);

    // Two more from a third address fill the total of six: everyone else gets 503.
    for _ in 0..2 {
        idle.push(from([127, 0, 0, 3]).await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut late = from([127, 0, 0, 4]).await;
    assert!(read_all(&mut late).await.starts_with("HTTP/1.1 503"));

    // Places come back when connections end; upgraded sockets do not hold one.
    drop(idle);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut sockets = Vec::new();
    for i in 0..8 {
        let mut ws = connect(&server.ws(&format!("/ws/rooms/r?name=u{i}"))).await;
        next_of(&mut ws, "ready").await;
        sockets.push(ws);
    }
    assert_eq!(healthz([127, 0, 0, 1]).await, 200);
    server.stop().await;
}

async fn writes_to_storage_have_quotas_per_identity(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("alice", "pw").await;
    let mut c = dir.config();
    c.polls_per_hour = 3;
    c.credentials_per_hour = 3;
    c.api_publish_rate = 1;
    let server = start(c).await;
    let addr = server.addr;
    let retry_after = |head: &str| -> u64 {
        let line = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("retry-after:"))
            .unwrap_or_else(|| panic!("no Retry-After: {head}"));
        line[12..].trim().parse().unwrap()
    };

    // Polls: three an hour from one address, then 429 until one is regained (20 minutes);
    // another address has its own.
    let poll = json!({"question": "Q?", "options": ["a", "b"]});
    let create = |ip: [u8; 4]| {
        let poll = poll.clone();
        async move { http_from(ip.into(), addr, "POST", "/api/polls", &[], Some(poll)).await }
    };
    for _ in 0..3 {
        assert_eq!(create([127, 0, 0, 1]).await.0, 201);
    }
    let (status, head, body) = create([127, 0, 0, 1]).await;
    assert_eq!(status, 429, "{body}");
    assert!((1100..=1200).contains(&retry_after(&head)), "{head}");
    assert_eq!(create([127, 0, 0, 2]).await.0, 201);

    // Sessions and tokens: three an hour for alice, however they are asked for.
    let bearer = format!("Bearer {}", token(addr, "alice", "pw").await);
    token(addr, "alice", "pw").await;
    let login = json!({"user": "alice", "password": "pw"});
    let (status, _) = http(addr, "POST", "/api/login", &[], Some(login.clone())).await;
    assert_eq!(status, 200);
    let (status, _) = http(addr, "POST", "/api/login", &[], Some(login)).await;
    assert_eq!(status, 429);

    // Publishing through the API: bursts of twice the rate (here 1/s), then 429 for a second.
    let auth = [("Authorization", bearer.as_str())];
    let publish = || async {
        let text = json!({"text": "news"});
        http_from(
            [127, 0, 0, 1].into(),
            addr,
            "POST",
            "/api/rooms/news/messages",
            &auth,
            Some(text),
        )
        .await
    };
    // Six at once cannot all pass (they could only if they took over four seconds): sent
    // together, so that a slow machine does not spread them over that long.
    let answers = futures_util::future::join_all((0..6).map(|_| publish())).await;
    let mut refused = None;
    for (status, head, _) in answers {
        match status {
            201 => {}
            429 => refused = Some(head),
            other => panic!("publish answered {other}"),
        }
    }
    let head = refused.expect("the publish quota refused some");
    assert_eq!(retry_after(&head), 1);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(publish().await.0, 201);
    server.stop().await;
}

async fn tokens_expire_and_revocations_close_open_sockets(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("alice", "pw").await;
    // Checks every hour: only the revocation itself can close a socket within the test.
    let mut c = dir.config();
    c.credential_check = Duration::from_secs(3600);
    let server = start(c).await;
    let addr = server.addr;
    let publish = |token: String| async move {
        let bearer = format!("Bearer {token}");
        let text = Some(json!({"text": "hi"}));
        http(
            addr,
            "POST",
            "/api/rooms/r/messages",
            &[("Authorization", &bearer)],
            text,
        )
        .await
        .0
    };

    // Logging out with a bearer token revokes it; its open socket is closed with 1008 at once.
    let token_a = token(addr, "alice", "pw").await;
    let mut ws = connect(&server.ws(&format!("/ws/rooms/r?token={token_a}"))).await;
    next_of(&mut ws, "ready").await;
    let bearer = format!("Bearer {token_a}");
    let (status, _) = http(
        addr,
        "POST",
        "/api/logout",
        &[("Authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(close_code(&mut ws).await, 1008);
    assert_eq!(publish(token_a).await, 401);

    // Everywhere: every token of the user goes at once.
    let (token_b, token_c) = (
        token(addr, "alice", "pw").await,
        token(addr, "alice", "pw").await,
    );
    let bearer = format!("Bearer {token_b}");
    let everywhere = Some(json!({"everywhere": true}));
    let (status, _) = http(
        addr,
        "POST",
        "/api/logout",
        &[("Authorization", &bearer)],
        everywhere,
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(publish(token_c).await, 401);

    server.stop().await;

    // Revoked by another process (`tether user revoke` writes the store): open sockets notice
    // at the next check.
    let mut c = dir.config();
    c.credential_check = Duration::from_secs(1);
    let server = start(c).await;
    let addr = server.addr;
    let token_d = token(addr, "alice", "pw").await;
    let mut ws = connect(&server.ws(&format!("/ws/rooms/r?token={token_d}"))).await;
    next_of(&mut ws, "ready").await;
    let revoked = dir.accounts().revoke_credentials("ALICE").await.unwrap();
    assert_eq!(revoked, 1);
    assert_eq!(close_code(&mut ws).await, 1008);
    server.stop().await;

    // Tokens have a lifetime: with a zero lifetime, one is expired as soon as it is issued.
    let mut c = dir.config();
    c.token_lifetime = Duration::ZERO;
    let server = start(c).await;
    let token_e = token(server.addr, "alice", "pw").await;
    let addr = server.addr;
    let bearer = format!("Bearer {token_e}");
    let (status, _) = http(addr, "GET", "/api/me", &[("Authorization", &bearer)], None).await;
    assert_eq!(status, 401);
    server.stop().await;
}

async fn behind_a_trusted_proxy_limits_count_the_forwarded_client(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("alice", "pw").await;
    let mut c = dir.config();
    c.trusted_proxies = vec!["127.0.0.2".into()];
    let server = start(c).await;
    let addr = server.addr;
    let login = |source: [u8; 4], forwarded: &'static str| async move {
        let body = json!({"user": "alice", "password": "guess"});
        let headers = [("X-Forwarded-For", forwarded)];
        http_from(
            source.into(),
            addr,
            "POST",
            "/api/login",
            &headers,
            Some(body),
        )
        .await
        .0
    };

    // Through the proxy, each client has its own budget.
    for _ in 0..5 {
        assert_eq!(login([127, 0, 0, 2], "203.0.113.1").await, 401);
    }
    assert_eq!(login([127, 0, 0, 2], "203.0.113.1").await, 429);
    assert_eq!(login([127, 0, 0, 2], "6.6.6.6, 203.0.113.2").await, 401);

    // From anyone else the header proves nothing: rotating it does not escape the budget.
    for forwarded in [
        "198.51.100.1",
        "198.51.100.2",
        "198.51.100.3",
        "198.51.100.4",
        "198.51.100.5",
    ] {
        assert_eq!(login([127, 0, 0, 1], forwarded).await, 401);
    }
    assert_eq!(login([127, 0, 0, 1], "198.51.100.6").await, 429);
    server.stop().await;
}

async fn a_guest_nickname_belongs_to_one_guest_and_registered_names_to_their_users(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("alice", "pw").await;
    let server = start(dir.config()).await;

    // A registered name is reserved in every case.
    for name in ["alice", "Alice", "ALICE"] {
        let url = server.ws(&format!("/ws/rooms/r?name={name}"));
        let err = within(tether::connect(&url)).await.unwrap_err().to_string();
        assert!(err.contains("401"), "{name}: {err}");
    }
    assert!(
        dir.accounts().add_user("ALICE", "x").await.is_err(),
        "no user differing only in case"
    );

    // Bob's nickname is Bob's (his cookie) while he is connected: another guest gets 409,
    // Bob himself may open a second tab.
    let url = server.ws("/ws/rooms/r?name=bob");
    let (mut bob, cookie) = connect_guest(&url).await;
    next_of(&mut bob, "ready").await;
    assert!(cookie.starts_with("tether_guest="), "{cookie}");
    let err = within(tether::connect(&server.ws("/ws/rooms/r?name=BOB")))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("409"), "{err}");
    let mut tab = connect_with_cookie(&url, &cookie).await;
    next_of(&mut tab, "ready").await;
    say(&mut tab, "from bob's second tab").await;
    assert_eq!(next_of(&mut bob, "message").await["user"], "bob");

    // Once Bob has gone, the name is free for anyone.
    drop(bob);
    drop(tab);
    let free = async {
        loop {
            if let Ok((ws, _)) = tether::connect(&server.ws("/ws/rooms/r?name=bob")).await {
                return ws;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let mut carol_as_bob = within(free).await;
    next_of(&mut carol_as_bob, "ready").await;
    server.stop().await;
}

async fn vote(ws: &mut tether::ClientStream, option: &str) {
    let msg = tether::Message::text(json!({"vote": option}).to_string());
    ws.send(msg).await.unwrap();
}

async fn a_poll_counts_people_not_sockets_or_nicknames(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("alice", "pw").await;
    let mut c = dir.config();
    c.guest_votes_per_address = 3;
    let server = start(c).await;
    let poll = json!({"question": "Lunch?", "options": ["soup", "salad"]});
    let (status, created) = http(server.addr, "POST", "/api/polls", &[], Some(poll)).await;
    assert_eq!(status, 201);
    let id = created["id"].as_i64().unwrap();

    // A guest who changes nickname is still one voter: its cookie is its identity.
    let url = server.ws(&format!("/ws/polls/{id}?name=g1"));
    let (mut g1, cookie) = connect_guest(&url).await;
    next_of(&mut g1, "poll").await;
    vote(&mut g1, "soup").await;
    assert_eq!(next_of(&mut g1, "counts").await["total"], 1);
    let renamed = server.ws(&format!("/ws/polls/{id}?name=g1-again"));
    let mut again = connect_with_cookie(&renamed, &cookie).await;
    assert_eq!(
        next_of(&mut again, "poll").await["vote"],
        "soup",
        "its vote follows it"
    );
    vote(&mut again, "salad").await;
    let counts = next_of(&mut g1, "counts").await;
    assert_eq!(
        (counts["total"].as_u64(), counts["counts"]["salad"].as_u64()),
        (Some(1), Some(1))
    );

    // New guests (no cookie) from the same address: three in all may vote, then not.
    let mut guests = Vec::new();
    for i in 2..=4 {
        let (mut g, _) = within(tether::connect(
            &server.ws(&format!("/ws/polls/{id}?name=g{i}")),
        ))
        .await
        .unwrap();
        next_of(&mut g, "poll").await;
        vote(&mut g, "soup").await;
        guests.push(g);
    }
    let refused = next_of(&mut guests[2], "error").await;
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("log in to vote"),
        "{refused}"
    );
    let (_, stored) = http(server.addr, "GET", &format!("/api/polls/{id}"), &[], None).await;
    assert_eq!(stored["total"], 3, "{stored}");

    // A registered user always has a vote of their own.
    let token = token(server.addr, "alice", "pw").await;
    let (mut alice, _) = within(tether::connect(
        &server.ws(&format!("/ws/polls/{id}?token={token}")),
    ))
    .await
    .unwrap();
    next_of(&mut alice, "poll").await;
    vote(&mut alice, "soup").await;
    assert_eq!(next_of(&mut alice, "counts").await["total"], 4);
    server.stop().await;

    // With poll_voters = "users", guests watch but do not vote.
    let mut c = dir.config();
    c.poll_voters = tether_server::config::Voters::Users;
    let server = start(c).await;
    let (mut guest, _) = within(tether::connect(
        &server.ws(&format!("/ws/polls/{id}?name=late")),
    ))
    .await
    .unwrap();
    next_of(&mut guest, "poll").await;
    vote(&mut guest, "salad").await;
    let refused = next_of(&mut guest, "error").await;
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("registered users"),
        "{refused}"
    );
    server.stop().await;
}

async fn many_connections_of_one_person_share_one_message_budget(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("mal", "pw").await;
    let mut c = dir.config();
    c.message_rate = 1000.0;
    c.identity_message_rate = 10;
    let server = start(c).await;
    let token = token(server.addr, "mal", "pw").await;
    // Ten connections of one user, each far below its own limit, 100 messages in all.
    let mut sockets = Vec::new();
    for _ in 0..10 {
        let mut ws = connect(&server.ws(&format!("/ws/rooms/spam?token={token}"))).await;
        next_of(&mut ws, "ready").await;
        sockets.push(ws);
    }
    let sending = std::time::Instant::now();
    for (k, ws) in sockets.iter_mut().enumerate() {
        for i in 0..10 {
            say(ws, &format!("s{k} m{i}")).await;
        }
    }
    // Each of a connection's ten is either stored (every member hears it) or refused (an
    // error on that connection); none is closed.
    let (mut stored, mut refused) = (0, 0);
    for (k, ws) in sockets.iter_mut().enumerate() {
        let own = format!("s{k} ");
        let (mut mine, mut errors) = (0, 0);
        while mine + errors < 10 {
            let event = next(ws).await;
            match event["type"].as_str() {
                Some("error") => {
                    assert!(
                        event["error"]
                            .as_str()
                            .unwrap()
                            .contains("all your connections"),
                        "{event}"
                    );
                    errors += 1;
                }
                Some("message") if event["text"].as_str().unwrap().starts_with(&own) => mine += 1,
                _ => {}
            }
        }
        stored += mine;
        refused += errors;
    }
    // A burst of twice the rate, plus what refilled (10/s) while the server judged them,
    // however long this machine took.
    let refilled = (10.0 * sending.elapsed().as_secs_f64()).ceil() as usize;
    assert!(
        (20..=20 + refilled).contains(&stored),
        "{stored} of 100 stored, {refused} refused, {refilled} refilled"
    );
    assert_eq!(stored + refused, 100);
    // Another identity (a guest, by its address) has a budget of its own.
    let mut ann = connect(&server.ws("/ws/rooms/spam?name=ann")).await;
    next_of(&mut ann, "ready").await;
    say(&mut ann, "hello").await;
    assert_eq!(next_of(&mut ann, "message").await["text"], "hello");
    server.stop().await;
}

on_both_engines!(
    a_first_member_resuming_past_the_end_does_not_silence_the_room,
    state_changing_requests_must_declare_json_and_come_from_our_origin,
    header_fields_over_16_kib_are_431_on_pages_api_and_upgrades,
    misleading_names_and_texts_are_refused,
    a_message_of_endless_fragments_is_closed_with_1009,
    an_echo_client_that_sends_but_never_reads_is_dropped_by_the_write_timeout,
    requests_have_deadlines_and_credentials_come_before_bodies,
    plain_http_connections_are_capped_per_address_and_in_all,
    writes_to_storage_have_quotas_per_identity,
    tokens_expire_and_revocations_close_open_sockets,
    behind_a_trusted_proxy_limits_count_the_forwarded_client,
    a_guest_nickname_belongs_to_one_guest_and_registered_names_to_their_users,
    a_poll_counts_people_not_sockets_or_nicknames,
    many_connections_of_one_person_share_one_message_budget,
);
