//! Fan-out in one room: N subscribers, one publisher sending at a fixed rate; reports the
//! deliveries per second and the delivery latency (publisher send → subscriber receive, which
//! includes the journal's commit).
//!
//! The server runs in this process on 127.0.0.1:0 with a temporary data directory, so the
//! figure is for server and clients sharing this machine's cores.
//!
//! ```sh
//! cargo run --release -p tether-server --example fanout -- 1000 200 10
//! #                                             subscribers ─┘    │   └─ seconds
//! #                                             messages per second
//! # Across two nodes joined by Redis: the publisher on node a, the subscribers on node b.
//! cargo run --release -p tether-server --example fanout -- 100 1000 10 redis://127.0.0.1:6379/
//! # Against a running `tether serve` (e.g. pinned to another core than this load), started
//! # with `message_rate` and `identity_message_rate` above the rate in its config file:
//! cargo run --release -p tether-server --example fanout -- 1000 200 10 ws://127.0.0.1:8080/
//! ```

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tether::Message;
use tether_server::{Server, ServerConfig};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize, default: u64| {
        args.get(i)
            .map_or(default, |a| a.parse().expect("a number"))
    };
    let subscribers = number(0, 1000);
    let rate = number(1, 200);
    let seconds = number(2, 10);
    let external = args.get(3).filter(|a| a.starts_with("ws://")).cloned();
    let redis = args.get(3).filter(|a| a.starts_with("redis://")).cloned();

    let data = std::env::temp_dir().join(format!("tether-fanout-{}", std::process::id()));
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        if external.is_some() {
            break;
        }
        let mut config = ServerConfig::default();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.data = data.join(name);
        config.max_connections_per_ip = usize::MAX;
        config.message_rate = 1e9;
        config.identity_message_rate = u32::MAX / 2;
        config.deflate = false;
        config.redis = redis.clone();
        config.node = Some(name.to_owned());
        let server = Server::bind(config).await.expect("bind");
        let addr = server.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        nodes.push((addr, stop, running));
        if redis.is_none() {
            break;
        }
    }
    // Subscribers on the last node, the publisher on the first: across Redis when there are two.
    let (publish_base, base) = match &external {
        Some(url) => (
            url.trim_end_matches('/').to_owned(),
            url.trim_end_matches('/').to_owned(),
        ),
        None => (
            format!("ws://{}", nodes[0].0),
            format!("ws://{}", nodes[nodes.len() - 1].0),
        ),
    };
    if redis.is_some() {
        // Let both nodes subscribe to Redis.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let epoch = Instant::now();
    let expected = rate * seconds;
    let received = Arc::new(AtomicU64::new(0));
    let url = format!("{base}/ws/rooms/bench?name=");
    let mut subs = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(subscribers as usize);
    for i in 0..subscribers {
        let (url, received, ready) = (format!("{url}s{i}"), received.clone(), ready_tx.clone());
        subs.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).unwrap();
            let (mut ws, _) = tether::connect(&url).await.expect("connect");
            let mut got = 0;
            while let Some(Ok(msg)) = ws.recv().await {
                let Message::Text(t) = msg else { continue };
                if t.contains("\"type\":\"ready\"") {
                    let _ = ready.send(()).await;
                    continue;
                }
                let Some(sent) = t
                    .split("\"text\":\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                else {
                    continue;
                };
                let Ok(sent) = sent.parse::<u64>() else {
                    continue;
                };
                let now = epoch.elapsed().as_micros() as u64;
                hist.record(now.saturating_sub(sent)).unwrap();
                received.fetch_add(1, Relaxed);
                got += 1;
                if got == expected {
                    break;
                }
            }
            hist
        }));
    }
    drop(ready_tx);
    for _ in 0..subscribers {
        ready_rx.recv().await.expect("every subscriber ready");
    }
    eprintln!(
        "{subscribers} subscribers joined in {:.1} s",
        epoch.elapsed().as_secs_f64()
    );

    let publish_url = format!("{publish_base}/ws/rooms/bench?name=publisher");
    let (publisher, _) = tether::connect(&publish_url).await.unwrap();
    let (mut ptx, mut prx) = publisher.split();
    tokio::spawn(async move { while let Some(Ok(_)) = prx.recv().await {} });
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate as u32);
    for _ in 0..expected {
        tick.tick().await;
        let sent = epoch.elapsed().as_micros();
        ptx.send(Message::text(format!("{{\"text\":\"{sent}\"}}")))
            .await
            .unwrap();
    }
    let mut all = Histogram::<u64>::new(3).unwrap();
    for s in subs {
        match tokio::time::timeout(Duration::from_secs(30), s).await {
            Ok(Ok(h)) => all.add(h).unwrap(),
            _ => eprintln!("a subscriber did not finish"),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let delivered = received.load(Relaxed);
    let across = if redis.is_some() {
        " (across two nodes through Redis)"
    } else {
        ""
    };
    println!(
        "{subscribers} subscribers{across}, {rate} msg/s for {seconds} s: {delivered} of {} deliveries, {:.0} deliveries/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        expected * subscribers,
        delivered as f64 / elapsed,
        all.value_at_quantile(0.5) as f64 / 1000.0,
        all.value_at_quantile(0.99) as f64 / 1000.0,
        all.max() as f64 / 1000.0,
    );
    for (_, stop, running) in nodes {
        let _ = stop.send(());
        let _ = running.await;
    }
    let _ = std::fs::remove_dir_all(data);
}
