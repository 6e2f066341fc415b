//! What the peer echo servers share: the command line, the runtime and the listening line.
//!
//! Every server takes `--port N` (0 picks a free port) and `--host H` (default 127.0.0.1),
//! runs on a tokio multi-thread runtime with exactly one worker (as `tether echo --threads 1`
//! does), and prints `listening on ws://ADDR/` on stdout once it accepts connections, so
//! `bench/compare.py` treats them all alike.

use std::future::Future;

use tokio::net::TcpListener;

/// Parses `--port` and `--host`, binds, prints the listening line and runs `serve` on a
/// one-worker multi-thread runtime until it returns.
///
/// # Panics
/// On a bad command line or when binding fails: these are throwaway benchmark servers.
pub fn run<F, Fut>(serve: F)
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: Future<Output = std::io::Result<()>>,
{
    let (host, port) = parse_args(std::env::args().skip(1));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind((host.as_str(), port))
            .await
            .unwrap_or_else(|e| panic!("binding {host}:{port}: {e}"));
        let local = listener.local_addr().expect("local address");
        println!("listening on ws://{local}/");
        serve(listener).await.expect("accepting connections");
    });
}

fn parse_args(mut args: impl Iterator<Item = String>) -> (String, u16) {
    let (mut host, mut port) = ("127.0.0.1".to_owned(), 9001);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage(&arg));
        match arg.as_str() {
            "--port" | "-p" => port = value().parse().unwrap_or_else(|_| usage("--port")),
            "--host" => host = value(),
            _ => usage(&arg),
        }
    }
    (host, port)
}

fn usage(arg: &str) -> ! {
    eprintln!("bad argument {arg:?}; usage: [--port N] [--host ADDR]");
    std::process::exit(2);
}
