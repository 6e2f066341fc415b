//! The `tether` command: `serve`, `user`, `connect`, `echo`, `bench`.

use std::process::ExitCode;

/// jemalloc rather than glibc's malloc: an idle `tether serve` connection costs about 13% less
/// RSS (tokio's 128-byte-aligned allocations leave no fragments) at equal throughput
/// (docs/decisions.md, 14).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use tether::proto::extension::deflate::DeflateConfig;
use tether_cli::exit;

/// Tether: a WebSocket toolkit.
#[derive(Parser, Debug)]
#[command(name = "tether", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the real-time server: pages, chat rooms, polls, publish API (default 127.0.0.1:8080).
    Serve(Box<tether_cli::serve::ServeArgs>),
    /// Manage the server's users.
    #[command(subcommand)]
    User(tether_cli::user::UserCommand),
    /// Copy a single node's store (users, sessions, tokens, history, polls) into an empty
    /// Redis, once, before starting several nodes on it (docs/scaling.md).
    Import(tether_cli::import::ImportArgs),
    /// Run a WebSocket echo server (text and binary).
    Echo(EchoArgs),
    /// Load-test a WebSocket server.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Connect to a WebSocket server: interactive on a terminal, a pipe otherwise.
    Connect(Box<tether_cli::connect::ConnectArgs>),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Connections keep messages in flight against an echo server; reports rate and latency.
    Echo(tether_cli::bench::EchoArgs),
    /// Opens and holds idle connections; reports how many held.
    Idle(tether_cli::bench::IdleArgs),
    /// Many subscribers of one channel, one publisher; reports deliveries/s and latency.
    Fanout(tether_cli::fanout::FanoutArgs),
}

#[derive(clap::Args, Debug)]
struct EchoArgs {
    /// Port to listen on (0 picks a free one; the address is printed on stdout).
    #[arg(long, short, default_value_t = 9001)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Address to listen on, spelled as for `serve --listen` (`PORT`, `:PORT`, `HOST:PORT`,
    /// `[IPv6]:PORT`); instead of --host and --port.
    #[arg(long, value_parser = tether_server::config::parse_listen, conflicts_with_all = ["port", "host"])]
    listen: Option<std::net::SocketAddr>,
    /// Largest message accepted, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_message_size: usize,
    /// Largest frame accepted, in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_frame_size: usize,
    /// Refuse permessage-deflate (by default it is accepted when the client offers it).
    #[arg(long)]
    no_deflate: bool,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Set a connection aside once it has been quiet this long (looked at every second, or as
    /// often as this when it is shorter): it then keeps no task and no registration with the
    /// runtime, only its WebSocket's state in an epoll set, until its peer sends something or
    /// its keepalive comes due (Linux). 0: never.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    park_after: std::time::Duration,
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // TETHER_LOG_FORMAT=json: one JSON object per line, for log collectors.
    if std::env::var("TETHER_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let result = match cli.command {
        Command::Serve(args) => {
            let matches = matches
                .subcommand_matches("serve")
                .expect("the serve subcommand");
            run_serve(*args, matches).map(|()| exit::OK)
        }
        Command::User(cmd) => run_user(cmd).map(|()| exit::OK),
        Command::Import(args) => run_import(args).map(|()| exit::OK),
        Command::Echo(args) => run_echo(args).map(|()| exit::OK),
        Command::Connect(args) => run_connect(*args),
        Command::Bench(kind) => run_bench(kind).map(|()| exit::OK),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("tether: {}", tether_cli::report::one_line(&*e));
            ExitCode::from(exit::FAILURE as u8)
        }
    }
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n.max(1));
    }
    builder.enable_all().build().context("starting the runtime")
}

/// Runs a server's `future` to its end as a task of `rt`, not on the calling thread: its
/// accept loop then runs on a worker, which starts each connection's task itself instead of
/// waking another thread for it (and being woken by the I/O driver for every accept).
fn on_a_worker<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    future: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    rt.block_on(async move {
        match tokio::spawn(future).await {
            Ok(done) => done,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("the server's task ended: {e}"),
            },
        }
    })
}

fn run_bench(kind: BenchCommand) -> anyhow::Result<()> {
    use tether_cli::bench;
    let rt = runtime(None)?;
    match kind {
        BenchCommand::Echo(mut args) => {
            // `--json` reports the URL however it was given.
            args.url = Some(args.server_url());
            args.url_flag = None;
            let summary = rt.block_on(bench::echo(args.clone()))?;
            report(args.json, &args, &summary, || {
                bench::render_echo(&summary, &args)
            })?;
            if summary.errors > 0 {
                anyhow::bail!(
                    "{} errors; the first: {}",
                    summary.errors,
                    summary.first_error.as_deref().unwrap_or("unknown")
                );
            }
        }
        BenchCommand::Idle(mut args) => {
            args.url = Some(args.server_url());
            args.url_flag = None;
            let summary = rt.block_on(bench::idle(args.clone()))?;
            report(args.json, &args, &summary, || {
                format!(
                    "{} of {} connections held ({} failed); opened in {:.1} s",
                    summary.held, summary.requested, summary.failed, summary.open_seconds
                )
            })?;
            if summary.held < summary.requested {
                anyhow::bail!(
                    "{} of {} connections failed to open or did not stay open",
                    summary.requested - summary.held,
                    summary.requested
                );
            }
        }
        BenchCommand::Fanout(args) => {
            let summary = rt.block_on(tether_cli::fanout::fanout(args.clone()))?;
            report(args.json, &args, &summary, || {
                tether_cli::fanout::render(&summary, &args)
            })?;
            if summary.errors > 0 || summary.missing > 0 {
                anyhow::bail!(
                    "{} errors, {} deliveries missing; the first error: {}",
                    summary.errors,
                    summary.missing,
                    summary.first_error.as_deref().unwrap_or("none")
                );
            }
        }
    }
    Ok(())
}

/// Prints a run's summary: with `--json` as one object with the options it ran with, else
/// in `words`.
fn report<A: serde::Serialize, S: serde::Serialize>(
    json: bool,
    params: &A,
    summary: &S,
    words: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    #[derive(serde::Serialize)]
    struct Report<'a, A, S> {
        params: &'a A,
        #[serde(flatten)]
        summary: &'a S,
    }
    if json {
        say(&serde_json::to_string(&Report { params, summary })?);
    } else {
        say(&words());
    }
    Ok(())
}

fn run_connect(args: tether_cli::connect::ConnectArgs) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(tether_cli::connect::run(args));
    // A read of stdin may still be pending on a blocking thread (it cannot be cancelled), and
    // dropping the runtime would wait for it: the connection has ended, so leave it behind.
    rt.shutdown_background();
    match result {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("tether: {}", tether_cli::report::one_line(&e));
            Ok(e.exit_code())
        }
    }
}

fn run_echo(args: EchoArgs) -> anyhow::Result<()> {
    tether_cli::raise_fd_limit(1 << 20);
    let rt = runtime(args.threads)?;
    on_a_worker(&rt, async move {
        let addr = args
            .listen
            .map_or_else(|| format!("{}:{}", args.host, args.port), |a| a.to_string());
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(addr = %local, "echo server listening");
        // One plain line on stdout, so scripts (and `--port 0`) learn the address.
        say(&format!("listening on ws://{local}/"));
        let config = tether::Config::default()
            .max_message_size(args.max_message_size)
            .max_frame_size(args.max_frame_size)
            .deflate((!args.no_deflate).then(DeflateConfig::default));
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        };
        let park_after = Some(args.park_after).filter(|d| !d.is_zero());
        tether_cli::echo::serve(listener, config, park_after, shutdown)
            .await
            .context("accepting connections")
    })
}

fn run_serve(args: tether_cli::serve::ServeArgs, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let config = args.server_config(matches)?;
    if args.print_config {
        say(&tether_cli::serve::config_file(&config)?);
        return Ok(());
    }
    tether_cli::raise_fd_limit(1 << 20);
    let rt = runtime(config.threads)?;
    on_a_worker(&rt, async move {
        let server = tether_server::Server::bind(config).await?;
        let url = server.url();
        tracing::info!(%url, "serving");
        // One plain line on stdout, so scripts (and `--listen 127.0.0.1:0`) learn the address.
        say(&format!("listening on {url}"));
        server.run(shutdown_signal()).await;
        anyhow::Ok(())
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}

/// The runtime of a command that edits the server's state (`user`, `import`): one thread.
fn admin_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn run_import(args: tether_cli::import::ImportArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    Ok(admin_runtime()?.block_on(tether_cli::import::run(args, &mut out))?)
}

fn run_user(cmd: tether_cli::user::UserCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    Ok(admin_runtime()?.block_on(tether_cli::user::run(cmd, &mut out))?)
}

/// Prints a line on stdout. A reader that went away (`| head -1`) is not an error: exit 0,
/// as a Unix tool does on a broken pipe.
fn say(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(exit::OK);
        }
    }
}
