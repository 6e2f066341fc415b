//! Logins under attack, over real sockets: a flood of wrong passwords costs bounded memory,
//! failures are throttled per address and per account at an address (never locking the real
//! user out from elsewhere), unknown users cost a real check, and a full queue answers 503.
//!
//! One test binary of its own: the memory test reads this process's RSS, which other tests
//! running beside it would disturb; its two runs (one per engine) take turns.

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::json;

mod common;
use common::*;

async fn login(
    source: IpAddr,
    addr: std::net::SocketAddr,
    user: &str,
    password: &str,
) -> (u16, String) {
    let body = json!({"user": user, "password": password});
    let (status, head, _) = http_from(source, addr, "POST", "/api/login", &[], Some(body)).await;
    (status, head)
}

fn retry_after(head: &str) -> Option<u64> {
    head.lines()
        .find_map(|l| {
            l.strip_prefix("retry-after: ")
                .or_else(|| l.strip_prefix("Retry-After: "))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// One run at a time: each reads the process's RSS.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn logins_are_throttled_and_a_flood_of_wrong_passwords_costs_bounded_memory(kind: Kind) {
    let _turn = TURN.lock().await;
    // 1. Throttling with the default budgets.
    let dir = Setup::new(kind);
    dir.add_user("alice", "pw").await;
    let server = start(dir.config()).await;
    let addr = server.addr;
    let (guesser, elsewhere): (IpAddr, IpAddr) = ([127, 0, 0, 1].into(), [127, 0, 0, 2].into());

    for _ in 0..5 {
        assert_eq!(login(guesser, addr, "alice", "guess").await.0, 401);
    }
    let (status, head) = login(guesser, addr, "alice", "guess").await;
    assert_eq!(status, 429, "{head}");
    assert!(
        retry_after(&head).is_some_and(|s| (1..=60).contains(&s)),
        "{head}"
    );
    // Refused before the check: even the right password waits, from the guessing address...
    assert_eq!(login(guesser, addr, "alice", "pw").await.0, 429);
    // ...but the real user, elsewhere, is not locked out.
    assert_eq!(login(elsewhere, addr, "alice", "pw").await.0, 200);

    // Unknown users cost a real check (the same time as a wrong password) and count as
    // failures of the address: 15 more reach its budget of 20.
    let checks = |metrics: &str| -> u64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with("tether_password_checks_total "))
            .expect("the checks metric");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let before = checks(&http_text(addr, "/metrics").await);
    for i in 0..15 {
        assert_eq!(
            login(guesser, addr, &format!("nobody{i}"), "x").await.0,
            401
        );
    }
    assert_eq!(checks(&http_text(addr, "/metrics").await), before + 15);
    assert_eq!(login(guesser, addr, "nobody99", "x").await.0, 429);
    assert_eq!(login(elsewhere, addr, "nobody99", "x").await.0, 401);
    server.stop().await;

    // 2. A flood: 300 wrong passwords, 40 at a time, with throttling out of the way and a
    //    queue deep enough to check them all. The checks run on two threads that reuse one
    //    work area each.
    let dir = Setup::new(kind);
    dir.add_user("alice", "pw").await;
    let mut c = dir.config();
    c.login_failures_per_address = u32::MAX;
    c.login_failures_per_account = u32::MAX;
    c.password_queue = 64;
    let server = start(c).await;
    let addr = server.addr;
    let start_kib = rss_kib();
    let gate = Arc::new(tokio::sync::Semaphore::new(40));
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            login(guesser, addr, "alice", "wrong").await
        }));
    }
    for task in tasks {
        let (status, head) = task.await.unwrap();
        assert_eq!(status, 401, "{head}");
    }
    let grown_kib = rss_kib().saturating_sub(start_kib);
    println!("300 wrong logins, 40 at a time: RSS grew {grown_kib} KiB");
    // Two work areas of 19 MiB, and room for the allocator's slack: a stranded buffer per
    // check would be gigabytes.
    assert!(grown_kib < 96 << 10, "RSS grew {grown_kib} KiB");
    // The right password still gets through once the flood is over.
    assert_eq!(login(guesser, addr, "alice", "pw").await.0, 200);
    server.stop().await;

    // 3. Past the queue, logins are refused at once with 503 and Retry-After instead of
    //    queueing without end (a legitimate login would wait behind all of them).
    let dir = Setup::new(kind);
    dir.add_user("alice", "pw").await;
    let mut c = dir.config();
    c.password_threads = 1;
    c.password_queue = 1;
    // A check in progress counts against the budgets until it succeeds: take them out of
    // the way to see the queue alone.
    c.login_failures_per_address = u32::MAX;
    c.login_failures_per_account = u32::MAX;
    let server = start(c).await;
    let addr = server.addr;
    let attempts = (0..12).map(|_| login(guesser, addr, "alice", "pw"));
    let answers = futures_util::future::join_all(attempts).await;
    let busy: Vec<_> = answers
        .iter()
        .filter(|(status, _)| *status == 503)
        .collect();
    assert!(!busy.is_empty(), "{answers:?}");
    assert!(
        busy.iter().all(|(_, head)| retry_after(head) == Some(1)),
        "{busy:?}"
    );
    assert!(
        answers
            .iter()
            .all(|(status, _)| matches!(status, 200 | 503)),
        "{answers:?}"
    );
    assert!(
        answers.iter().any(|(status, _)| *status == 200),
        "{answers:?}"
    );
    server.stop().await;
}

on_both_engines!(multi_thread: logins_are_throttled_and_a_flood_of_wrong_passwords_costs_bounded_memory);
