//! `tether connect URL`: an interactive client when stdin is a terminal, a pipe otherwise.
//!
//! In a pipe each stdin line is a message and each received message a line on stdout; the
//! exit status tells whether the connection ended with a normal close. Interactively, lines
//! are edited with history, received messages print above the prompt with a timestamp, and
//! `/ping`, `/close`, `/binary`, `/quit` control the connection.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use tether::proto::extension::deflate::DeflateConfig;
use tether::{ClientBuilder, CloseCode, CloseFrame, Config, HttpVersion, Message};
use tokio::io::AsyncBufReadExt;

use crate::exit;

/// Options of `tether connect`. The spellings wscat and websocat users type from habit are
/// accepted too (`-c URL`, `-k`/`-n`/`--no-check`, `-s`/`--protocol`, `-o`, `-x`/`--execute`,
/// `-w`, `-P`, `-b`), beside the documented ones, and mean what they mean there.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    /// The server: ws://host:port/path or wss://… (http:// and https:// are taken as ws://
    /// and wss://, and host:port/path without a scheme as ws://).
    #[arg(required_unless_present = "connect", conflicts_with = "connect")]
    pub url: Option<String>,
    /// The server, as wscat takes it.
    #[arg(short = 'c', long = "connect", value_name = "URL", hide = true)]
    pub connect: Option<String>,
    /// Extra request header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// Subprotocol to offer, in order of preference (repeatable).
    #[arg(
        short = 's',
        long = "subprotocol",
        alias = "protocol",
        value_name = "NAME"
    )]
    pub subprotocols: Vec<String>,
    /// Origin header to send.
    #[arg(short = 'o', long)]
    pub origin: Option<String>,
    /// HTTP Basic credentials, `user:password`.
    #[arg(long, value_name = "USER:PASS")]
    pub auth: Option<String>,
    /// Bearer token (`Authorization: Bearer TOKEN`).
    #[arg(long)]
    pub token: Option<String>,
    /// Offer permessage-deflate.
    #[arg(long)]
    pub deflate: bool,
    /// Send a ping every SECS seconds.
    #[arg(long, value_name = "SECS")]
    pub ping_interval: Option<f64>,
    /// Close (1011) when a ping's pong takes longer than SECS.
    #[arg(long, value_name = "SECS", default_value_t = 20.0)]
    pub ping_timeout: f64,
    /// Give up on a server that takes nothing we write (it stopped reading) for SECS; 0
    /// waits forever.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub write_timeout: f64,
    /// Give up connecting (TCP, TLS and handshake) after SECS.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Largest message accepted, in bytes (larger: close with 1009).
    #[arg(long, value_name = "BYTES")]
    pub max_message_size: Option<usize>,
    /// Open the WebSocket over HTTP/2 (RFC 8441), or fail: ALPN `h2` for wss://, prior
    /// knowledge (h2c) for ws://. Without it, wss:// uses HTTP/2 when the server offers it.
    #[arg(long, conflicts_with = "http1")]
    pub http2: bool,
    /// Open the WebSocket with an HTTP/1.1 upgrade, even when the server offers HTTP/2.
    #[arg(long)]
    pub http1: bool,
    /// Accept any TLS certificate (testing only).
    #[arg(short = 'k', short_alias = 'n', long, alias = "no-check")]
    pub insecure: bool,
    /// Trust this CA certificate (PEM) for wss:// besides the public roots.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Send each input line as a binary message instead of text.
    #[arg(short = 'b', long)]
    pub binary: bool,
    /// Pretty-print received JSON text.
    #[arg(long)]
    pub json: bool,
    /// Print received messages without a newline after each.
    #[arg(long)]
    pub no_newline: bool,
    /// Send this message after connecting (repeatable); stdin is then not read.
    #[arg(short = 'x', long = "send", alias = "execute", value_name = "MESSAGE")]
    pub send: Vec<String>,
    /// Close this many seconds after the input is done (the --send messages sent, or the
    /// end of stdin), showing what arrives meanwhile. Without it, --send waits 2 s (as
    /// wscat does), and the end of stdin waits until the server is quiet for half a second.
    #[arg(short = 'w', long, value_name = "SECS")]
    pub wait: Option<f64>,
    /// Show pings and pongs from the server (on stderr in a pipe).
    #[arg(short = 'P', long)]
    pub show_ping_pong: bool,
    /// Close and exit after receiving N messages.
    #[arg(long, value_name = "N")]
    pub exit_after: Option<usize>,
    /// Log the handshake (request and response headers) and every frame to stderr.
    #[arg(short, long)]
    pub verbose: bool,
    /// Tunnel through this HTTP proxy, `http://[user:pass@]host:port`. Without it,
    /// HTTPS_PROXY (wss), HTTP_PROXY (ws) and ALL_PROXY are used unless NO_PROXY lists the host.
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
    /// When the connection is lost (or the server goes away), reconnect with exponential
    /// backoff and jitter and carry on with the input; a connection that closes within 10 s
    /// of opening counts as a failure; gives up after 10 failures in a row.
    #[arg(long)]
    pub reconnect: bool,
}

/// Why `tether connect` could not run.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A malformed option value.
    #[error("{0}")]
    Usage(String),
    /// Connecting or talking to the server failed.
    #[error("{}", describe(.0))]
    WebSocket(#[from] tether::Error),
    /// Reading the CA file or the terminal failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ConnectError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ConnectError::Usage(_) => exit::USAGE,
            _ => exit::FAILURE,
        }
    }
}

/// A one-line description, with the HTTP status and the start of the body of a refused
/// handshake: a web page is named as such rather than printed, with the endpoints to try when
/// it is one of `tether serve`'s pages.
fn describe(e: &tether::Error) -> String {
    use tether::handshake::ClientHandshakeError;
    match e {
        tether::Error::ClientHandshake(ClientHandshakeError::Status {
            status,
            reason,
            headers,
            body,
        }) => {
            let reason = printable(reason);
            let text = String::from_utf8_lossy(body);
            let html = headers
                .get_str("content-type")
                .is_some_and(|t| t.trim_start().starts_with("text/html"))
                || text.trim_start().starts_with('<');
            let said = if html {
                let size = headers
                    .get_str("content-length")
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .unwrap_or(body.len());
                format!(": a web page ({size} bytes), not a WebSocket endpoint")
            } else {
                let shown = shorten(&text, BODY_SHOWN);
                if shown.is_empty() {
                    String::new()
                } else {
                    format!(": {shown}")
                }
            };
            let ours = headers
                .get_str("server")
                .is_some_and(|s| s.starts_with("tether"));
            let hint = if ours && html {
                " (this is tether serve: its WebSocket endpoints are /ws, /ws/echo and /ws/rooms/NAME)"
            } else {
                ""
            };
            format!("handshake rejected: HTTP {status} {reason}{said}{hint}")
        }
        other => other.to_string(),
    }
}

/// Characters of a refusal's body shown at most.
const BODY_SHOWN: usize = 200;

/// `text` on one line, its whitespace runs as one space and control characters escaped, cut
/// after `most` characters with `…`.
fn shorten(text: &str, most: usize) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let line = printable(&words.join(" "));
    match line.char_indices().nth(most) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

fn secs(s: f64) -> Result<Duration, ConnectError> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| ConnectError::Usage(format!("{s} is not a number of seconds")))
}

impl ConnectArgs {
    /// The server's URL as given (positionally or with `-c`), with `http(s)://` taken as
    /// `ws(s)://` and a URL without a scheme as `ws://`.
    pub fn server_url(&self) -> String {
        ws_url(
            self.url
                .as_deref()
                .or(self.connect.as_deref())
                .unwrap_or_default(),
        )
    }
}

/// A server URL as people type it: `http(s)://` taken as `ws(s)://`, a URL without a scheme
/// as `ws://`, a scheme missing its colon or a slash (`ws//host`, `wss:/host`) as meant, any
/// other as given.
///
/// ```
/// use tether_cli::connect::ws_url;
/// assert_eq!(ws_url("https://example.com/ws"), "wss://example.com/ws");
/// assert_eq!(ws_url("localhost:8080/chat"), "ws://localhost:8080/chat");
/// assert_eq!(ws_url("ws://a/"), "ws://a/");
/// assert_eq!(ws_url("ws//a/"), "ws://a/");
/// assert_eq!(ws_url("wss:/a/"), "wss://a/");
/// ```
pub fn ws_url(given: &str) -> String {
    let lower = given.to_ascii_lowercase();
    // A slip of the scheme, which would otherwise name a host `ws`.
    for scheme in ["wss", "ws", "https", "http"] {
        for slip in [format!("{scheme}//"), format!("{scheme}:/")] {
            if lower.starts_with(&slip) && !lower.starts_with(&format!("{scheme}://")) {
                return ws_url(&format!("{scheme}://{}", &given[slip.len()..]));
            }
        }
    }
    if let Some(rest) = lower.starts_with("http://").then(|| &given[7..]) {
        format!("ws://{rest}")
    } else if let Some(rest) = lower.starts_with("https://").then(|| &given[8..]) {
        format!("wss://{rest}")
    } else if given.contains("://") {
        given.to_owned()
    } else {
        format!("ws://{given}")
    }
}

/// The client configuration the options describe.
pub fn builder(args: &ConnectArgs) -> Result<ClientBuilder, ConnectError> {
    let mut config = Config::default()
        .handshake_timeout(secs(args.connect_timeout)?)
        .write_timeout(Some(secs(args.write_timeout)?).filter(|t| !t.is_zero()));
    if let Some(interval) = args.ping_interval {
        config = config
            .ping_interval(Some(secs(interval)?))
            .ping_timeout(secs(args.ping_timeout)?);
    }
    if let Some(max) = args.max_message_size {
        config = config.max_message_size(max).max_frame_size(max);
    }
    if args.deflate {
        config = config.deflate(Some(DeflateConfig::default()));
    }
    let version = if args.http2 {
        HttpVersion::Http2
    } else if args.http1 {
        HttpVersion::Http1
    } else {
        HttpVersion::Auto
    };
    let mut b = ClientBuilder::new(&args.server_url())
        .map_err(|e| ConnectError::Usage(e.to_string()))?
        .config(config)
        .http_version(version);
    for p in &args.subprotocols {
        b = b.protocol(p.clone());
    }
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| ConnectError::Usage(format!("header {h:?} is not `Name: value`")))?;
        b = b.header(name.trim(), value.trim());
    }
    if let Some(origin) = &args.origin {
        b = b.header("Origin", origin.clone());
    }
    if let Some(auth) = &args.auth {
        if !auth.contains(':') {
            return Err(ConnectError::Usage("--auth takes user:password".into()));
        }
        let encoded = base64::engine::general_purpose::STANDARD.encode(auth);
        b = b.header("Authorization", format!("Basic {encoded}"));
    }
    if let Some(token) = &args.token {
        b = b.header("Authorization", format!("Bearer {token}"));
    }
    b = match &args.proxy {
        Some(url) => {
            b.proxy(tether::Proxy::parse(url).map_err(|e| ConnectError::Usage(e.to_string()))?)
        }
        None => b.proxy_from_env()?,
    };
    if args.insecure {
        b = b.tls_config(tether::tls::insecure_client_config().map_err(tether::Error::from)?);
    } else if let Some(path) = &args.ca {
        let pem = std::fs::read(path)
            .map_err(|e| ConnectError::Usage(format!("reading {}: {e}", path.display())))?;
        b = b.tls_config(tether::tls::client_config(&pem).map_err(tether::Error::from)?);
    }
    Ok(b)
}

/// Connects and runs until the connection ends; returns the exit code.
///
/// # Errors
/// A [`ConnectError`] when the options are malformed or the connection cannot be opened.
pub async fn run(args: ConnectArgs) -> Result<i32, ConnectError> {
    let builder = builder(&args)?;
    let request = builder.request();
    if args.verbose {
        let head = request.encode().map_err(tether::Error::from)?;
        for line in String::from_utf8_lossy(&head)
            .lines()
            .filter(|l| !l.is_empty())
        {
            eprintln!("> {line}");
        }
    }
    let (ws, response) = match builder.connect_with(request).await {
        Ok(pair) => pair,
        Err(e) if args.reconnect => {
            let mut retry = Retry { failures: 1 };
            let wait = backoff(1);
            eprintln!(
                "tether: {}; retrying in {:.1} s",
                describe(&e),
                wait.as_secs_f64()
            );
            tokio::time::sleep(wait).await;
            let ws = retry.connect(&args).await?;
            let response = tether::handshake::Response {
                headers: Default::default(),
                protocol: ws.protocol().map(str::to_owned),
                extensions: None,
            };
            (ws, response)
        }
        Err(e) => return Err(e.into()),
    };
    if args.verbose {
        if matches!(ws.get_ref(), tether::tls::MaybeTlsStream::Http2(_)) {
            eprintln!("< HTTP/2 200 (the request went as an extended CONNECT, RFC 8441)");
        } else {
            eprintln!("< HTTP/1.1 101 Switching Protocols");
        }
        for h in &response.headers.0 {
            eprintln!(
                "< {}: {}",
                printable(&h.name),
                printable(&String::from_utf8_lossy(&h.value))
            );
        }
    }
    let interactive = args.send.is_empty() && std::io::stdin().is_terminal();
    if interactive {
        interactive::run(ws, &args).await
    } else {
        pipe(ws, &args).await
    }
}

/// How the conversation ended, as an exit code: 0 for a normal close (1000/1001, or a Close
/// without status), 1 for anything else.
fn exit_code_for(close: Option<&CloseFrame>) -> i32 {
    match close.map(|f| f.code) {
        None | Some(CloseCode::NORMAL | CloseCode::GOING_AWAY) => exit::OK,
        Some(_) => exit::FAILURE,
    }
}

fn log_frame(args: &ConnectArgs, dir: &str, msg: &Message) {
    if !args.verbose {
        return;
    }
    let kind = match msg {
        Message::Text(_) => "text",
        Message::Binary(_) => "binary",
        Message::Ping(_) => "ping",
        Message::Pong(_) => "pong",
        Message::Close(frame) => {
            eprintln!("{dir} close frame, {}", close_status(frame.as_ref()));
            return;
        }
    };
    eprintln!("{dir} {kind} frame, {} bytes", msg.as_payload().len());
}

/// A close frame's status as shown: `1000 reason`, or `no status`.
fn close_status(frame: Option<&CloseFrame>) -> String {
    frame.map_or_else(
        || "no status".to_owned(),
        |f| {
            format!("{} {}", f.code, printable(&f.reason))
                .trim_end()
                .to_owned()
        },
    )
}

/// Logs (with `-v`) the close frame the library sends by itself in answer to the server's:
/// its status code without the reason (RFC 6455, section 5.5.1).
fn log_close_answer(args: &ConnectArgs, received: Option<&CloseFrame>) {
    let answer = received.map(|f| CloseFrame::new(f.code, ""));
    log_frame(args, ">", &Message::Close(answer));
}

/// Starts the close handshake, logging our close frame with `-v`.
async fn send_close(
    tx: &mut tether::WsSender<tether::tls::MaybeTlsStream<tokio::net::TcpStream>>,
    args: &ConnectArgs,
    frame: Option<CloseFrame>,
) {
    // The library sends 1000 for `None`.
    let sent = frame
        .clone()
        .unwrap_or_else(|| CloseFrame::new(CloseCode::NORMAL, ""));
    log_frame(args, ">", &Message::Close(Some(sent)));
    let _ = tx.close(frame).await;
}

/// How one connection of a pipe session ended.
enum SessionEnd {
    /// Stop with this exit code.
    Exit(i32),
    /// The connection was lost (or closed with a code worth retrying): reconnect if asked.
    Lost(String),
}

/// Close codes after which `--reconnect` tries again: the server went away or is overloaded.
fn worth_retrying(code: CloseCode) -> bool {
    matches!(code.0, 1001 | 1006 | 1011 | 1012 | 1013 | 1014)
}

/// Attempts before `--reconnect` gives up.
const RECONNECT_ATTEMPTS: u32 = 10;

/// The wait before reconnect attempt `n` (1-based): 250 ms doubling to at most 10 s, with
/// jitter of up to half the delay so that many clients do not return in step.
fn backoff(n: u32) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1 << n.saturating_sub(1).min(6));
    let base = base.min(Duration::from_secs(10));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    base / 2 + base.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

/// A connection that lasts this long is not a failure: the next loss starts the backoff over.
const STABLE: Duration = Duration::from_secs(10);

/// `--reconnect`'s state: failures in a row, counting connections that could not be opened
/// and connections that ended within [`STABLE`] of opening (a server that accepts and then
/// closes at once must not be hammered), so every retry waits [`backoff`] and the attempts
/// stop after [`RECONNECT_ATTEMPTS`].
#[derive(Default)]
struct Retry {
    failures: u32,
}

impl Retry {
    /// After a connection that opened at `opened` was lost: how long to wait before
    /// reconnecting, or `None` when the failures in a row are used up.
    fn after_loss(&mut self, opened: std::time::Instant) -> Option<Duration> {
        if opened.elapsed() >= STABLE {
            self.failures = 0;
        }
        self.failures += 1;
        (self.failures < RECONNECT_ATTEMPTS).then(|| backoff(self.failures))
    }

    /// Connects, retrying with [`backoff`] while failures in a row are left.
    async fn connect(&mut self, args: &ConnectArgs) -> Result<tether::ClientStream, ConnectError> {
        loop {
            match builder(args)?.connect().await {
                Ok((ws, _)) => return Ok(ws),
                Err(e) if self.failures + 1 < RECONNECT_ATTEMPTS => {
                    self.failures += 1;
                    let wait = backoff(self.failures);
                    eprintln!(
                        "tether: {}; retrying in {:.1} s",
                        describe(&e),
                        wait.as_secs_f64()
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Pipe mode: stdin lines out, received messages to stdout; with `--reconnect`, lost
/// connections are reopened and the input carries on where it was (nothing is sent twice).
async fn pipe(ws: tether::ClientStream, args: &ConnectArgs) -> Result<i32, ConnectError> {
    let mut input = if args.send.is_empty() {
        Some(tokio::io::BufReader::new(tokio::io::stdin()).lines())
    } else {
        None
    };
    let mut to_send: std::collections::VecDeque<Message> = args
        .send
        .iter()
        .map(|m| outgoing(args, m.clone()))
        .collect();
    let mut received = 0usize;
    let mut retry = Retry::default();
    let mut current = ws;
    loop {
        let opened = std::time::Instant::now();
        let why = match pipe_session(current, args, &mut input, &mut to_send, &mut received).await?
        {
            SessionEnd::Exit(code) => return Ok(code),
            SessionEnd::Lost(why) => why,
        };
        let wait = if args.reconnect {
            retry.after_loss(opened)
        } else {
            None
        };
        let Some(wait) = wait else {
            if args.reconnect {
                eprintln!("tether: {why}; gave up after {RECONNECT_ATTEMPTS} failures in a row");
            } else {
                eprintln!("tether: {why}");
            }
            return Ok(exit::FAILURE);
        };
        eprintln!(
            "tether: connection lost ({why}); reconnecting in {:.1} s",
            wait.as_secs_f64()
        );
        let lost_at = std::time::Instant::now();
        tokio::time::sleep(wait).await;
        current = retry.connect(args).await?;
        eprintln!(
            "tether: reconnected after {:.1} s; messages sent to this client meanwhile are missing",
            lost_at.elapsed().as_secs_f64()
        );
    }
}

/// One connection of a pipe session.
async fn pipe_session(
    ws: tether::ClientStream,
    args: &ConnectArgs,
    input: &mut Option<tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>>,
    to_send: &mut std::collections::VecDeque<Message>,
    received: &mut usize,
) -> Result<SessionEnd, ConnectError> {
    let (mut tx, mut rx) = ws.split();
    let mut out = std::io::stdout();
    let mut closing = false;
    let done = |received: usize| args.exit_after.is_some_and(|n| received >= n);
    // `--wait`: when to close once the input is done.
    let wait = args.wait.map(secs).transpose()?;
    let mut close_at: Option<tokio::time::Instant> = None;
    // After the end of stdin without `--wait`: closing once the server is quiet.
    let mut until_quiet = false;
    // Input already ended in an earlier session: only the close is left to do.
    let input_ended = args.send.is_empty() && input.is_none() && to_send.is_empty();
    if done(*received) {
        // `--exit-after 0` (or the count reached before a reconnect): nothing more to send.
        to_send.clear();
    }
    if done(*received) || (input_ended && args.exit_after.is_none()) {
        closing = true;
        send_close(&mut tx, args, None).await;
    }
    loop {
        // Messages given on the command line (or left over) go first, each exactly once.
        if let Some(msg) = to_send.pop_front() {
            log_frame(args, ">", &msg);
            if let Err(e) = tx.send(msg).await {
                return Ok(SessionEnd::Lost(format!(
                    "sending failed: {}",
                    describe(&e)
                )));
            }
            continue;
        }
        if close_at.is_none() && !args.send.is_empty() {
            // Counting messages (`--exit-after`) waits for them, not for a time.
            let default = args.exit_after.is_none().then_some(SEND_WAIT);
            if let Some(wait) = wait.or(default) {
                close_at = Some(tokio::time::Instant::now() + wait);
            }
        }
        tokio::select! {
            () = async { tokio::time::sleep_until(close_at.expect("guarded")).await }, if close_at.is_some() && !closing => {
                closing = true;
                send_close(&mut tx, args, None).await;
            }
            line = async { input.as_mut().expect("guarded").next_line().await }, if input.is_some() && !closing => {
                match line? {
                    Some(line) => to_send.push_back(outgoing(args, line)),
                    None => {
                        // End of input: answers to the last lines may be on their way, so
                        // close after `--wait`, or once the server is quiet.
                        *input = None;
                        if args.exit_after.is_none() {
                            until_quiet = wait.is_none();
                            close_at = Some(tokio::time::Instant::now() + wait.unwrap_or(QUIET));
                        }
                    }
                }
            }
            msg = rx.recv() => {
                let msg = match msg {
                    None if closing => return Ok(SessionEnd::Exit(exit::OK)),
                    None => return Ok(SessionEnd::Lost("the connection ended without a close frame".into())),
                    Some(Err(e)) if closing => {
                        eprintln!("tether: {}", describe(&e));
                        return Ok(SessionEnd::Exit(exit::FAILURE));
                    }
                    Some(Err(e)) => return Ok(SessionEnd::Lost(describe(&e))),
                    Some(Ok(msg)) => msg,
                };
                log_frame(args, "<", &msg);
                match &msg {
                    Message::Close(frame) => {
                        if !closing {
                            log_close_answer(args, frame.as_ref());
                        }
                        // Let the close handshake finish.
                        while let Some(Ok(_)) = rx.recv().await {}
                        if let Some(f) = frame.as_ref().filter(|f| !closing && worth_retrying(f.code)) {
                            return Ok(SessionEnd::Lost(format!("closed by the server: {} {}", f.code, printable(&f.reason))));
                        }
                        // Our own Close is always 1000, so any other code is the server's verdict,
                        // even when it crossed our Close on the wire.
                        if let Some(f) = frame.as_ref().filter(|f| f.code != CloseCode::NORMAL) {
                            eprintln!("tether: closed by the server: {} {}", f.code, printable(&f.reason));
                        }
                        return Ok(SessionEnd::Exit(exit_code_for(frame.as_ref())));
                    }
                    Message::Text(_) | Message::Binary(_) => {
                        if let Err(e) = write_message(&mut out, args, &msg) {
                            if e.kind() == std::io::ErrorKind::BrokenPipe {
                                return Ok(SessionEnd::Exit(exit::OK));
                            }
                            return Err(e.into());
                        }
                        *received += 1;
                        if until_quiet {
                            close_at = Some(tokio::time::Instant::now() + QUIET);
                        }
                        if done(*received) && !closing {
                            closing = true;
                            send_close(&mut tx, args, None).await;
                        }
                    }
                    Message::Ping(payload) | Message::Pong(payload) if args.show_ping_pong => {
                        let kind = if matches!(msg, Message::Ping(_)) { "ping" } else { "pong" };
                        eprintln!("< {kind} ({} bytes)", payload.len());
                    }
                    _ => {}
                }
            }
        }
    }
}

/// How long `--send` stays for answers without `--wait` (as wscat does).
const SEND_WAIT: Duration = Duration::from_secs(2);
/// After the end of stdin without `--wait`: the server's silence that ends the connection.
const QUIET: Duration = Duration::from_millis(500);

/// The message a line of input (or `--send`) becomes.
fn outgoing(args: &ConnectArgs, text: String) -> Message {
    if args.binary {
        Message::binary(text.into_bytes())
    } else {
        Message::text(text)
    }
}

/// Writes a received data message to a pipe: text (pretty JSON with `--json`) or raw bytes.
fn write_message(out: &mut impl Write, args: &ConnectArgs, msg: &Message) -> std::io::Result<()> {
    match msg {
        Message::Text(text) => out.write_all(render_text(args, text).as_bytes())?,
        other => out.write_all(other.as_payload())?,
    }
    if !args.no_newline {
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Text from the server made safe for a terminal: control characters (escape sequences,
/// carriage returns, bells…) and bidirectional overrides are shown escaped, `\u{1b}`, so a
/// server cannot retitle the window, clear the screen or forge a line.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// Text as shown: pretty-printed when `--json` is set and it parses as JSON.
fn render_text(args: &ConnectArgs, text: &str) -> String {
    if args.json && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
        return pretty_json(text);
    }
    text.to_owned()
}

/// Valid JSON `text` indented two spaces a level, its keys in the order the server sent them
/// (a message's `type` first, as written, rather than sorted last).
fn pretty_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    };
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
                    chars.next();
                }
                if matches!(chars.peek(), Some('}' | ']')) {
                    out.extend(chars.next());
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

/// `HH:MM:SS` (UTC) for message timestamps.
fn clock() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

/// Bytes as space-separated hex, cut after 64 bytes.
fn hex(bytes: &[u8]) -> String {
    let mut s: Vec<String> = bytes.iter().take(64).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > 64 {
        s.push("…".into());
    }
    s.join(" ")
}

/// A received message as the interactive mode shows it.
fn show(args: &ConnectArgs, msg: &Message) -> String {
    let t = clock();
    match msg {
        Message::Text(text) => {
            let shown = render_text(args, text);
            // Pretty JSON's line breaks are ours (its strings escape their own).
            let lines: Vec<String> = if args.json && shown != **text {
                shown.split('\n').map(printable).collect()
            } else {
                vec![printable(&shown)]
            };
            format!("< [{t}] {}", lines.join("\n"))
        }
        Message::Binary(b) => format!("< [{t}] binary ({} bytes): {}", b.len(), hex(b)),
        Message::Ping(b) => format!(
            "< [{t}] ping ({} bytes) {}",
            b.len(),
            printable(&String::from_utf8_lossy(b))
        ),
        Message::Pong(b) => format!(
            "< [{t}] pong ({} bytes) {}",
            b.len(),
            printable(&String::from_utf8_lossy(b))
        ),
        Message::Close(Some(f)) => format!("< [{t}] close {} {}", f.code, printable(&f.reason)),
        Message::Close(None) => format!("< [{t}] close (no status)"),
    }
}

/// What a line typed in interactive mode asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    /// Send this message.
    Send(Message),
    /// Close with this frame and exit once the server answers.
    Close(Option<CloseFrame>),
    /// Close normally and exit.
    Quit,
    /// Show the commands.
    Help,
    /// The line was not understood; print this.
    Invalid(String),
}

/// What `/help` prints.
const HELP: &str = "commands: /ping [data] sends a ping; /close [code] [reason] closes and exits \
once the server answers; /binary HEX sends bytes (e.g. /binary 68 69); /quit closes normally; \
//text sends /text; any other line is sent as a message";

/// Parses a line of interactive input: `/ping [data]`, `/close [code] [reason]`,
/// `/binary HEX`, `/quit`, or a message (`--binary` sends lines as binary). `//x` sends `/x`.
pub fn parse_command(line: &str, binary: bool) -> Command {
    let data = |s: &str| bytes::Bytes::copy_from_slice(s.as_bytes());
    let Some(rest) = line.strip_prefix('/') else {
        return Command::Send(if binary {
            Message::binary(line.as_bytes().to_vec())
        } else {
            Message::text(line.to_owned())
        });
    };
    if rest.starts_with('/') {
        return Command::Send(Message::text(rest.to_owned()));
    }
    let (cmd, arg) = rest
        .split_once(' ')
        .map_or((rest, ""), |(c, a)| (c, a.trim()));
    match cmd {
        "quit" | "exit" => Command::Quit,
        "help" | "?" => Command::Help,
        "ping" if arg.len() <= 125 => Command::Send(Message::Ping(data(arg))),
        "ping" => Command::Invalid("a ping carries at most 125 bytes".into()),
        "close" if arg.is_empty() => Command::Close(Some(CloseFrame::new(CloseCode::NORMAL, ""))),
        "close" => {
            let (code, reason) = arg
                .split_once(' ')
                .map_or((arg, ""), |(c, r)| (c, r.trim()));
            match code.parse::<u16>().map(CloseCode) {
                Ok(code) if code.is_sendable() => {
                    Command::Close(Some(CloseFrame::new(code, reason)))
                }
                _ => Command::Invalid(format!(
                    "{code} is not a close code that may be sent (1000-1003, 1007-1014, 3000-4999)"
                )),
            }
        }
        "binary" => {
            let digits: String = arg.chars().filter(|c| !c.is_whitespace()).collect();
            let decoded: Option<Vec<u8>> = (digits.len() % 2 == 0)
                .then(|| {
                    (0..digits.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).ok())
                        .collect()
                })
                .flatten();
            match decoded {
                Some(bytes) => Command::Send(Message::binary(bytes)),
                None => {
                    Command::Invalid(format!("{arg:?} is not hex (e.g. /binary 68 65 6c 6c 6f)"))
                }
            }
        }
        other => Command::Invalid(format!("unknown command /{other}: try /help")),
    }
}

mod interactive {
    //! The terminal mode: rustyline for input, an external printer for what arrives.

    use super::*;
    use rustyline::ExternalPrinter as _;

    /// The terminal's settings at start, put back before exiting: the line editor may be in
    /// the middle of a read (raw mode) when the connection ends.
    struct Terminal(Option<nix::sys::termios::Termios>);

    impl Terminal {
        fn save() -> Self {
            Terminal(nix::sys::termios::tcgetattr(std::io::stdin()).ok())
        }

        /// Restores the terminal and prints the last line of the session.
        fn finish(&self, last: &str) {
            if let Some(saved) = &self.0 {
                let _ = nix::sys::termios::tcsetattr(
                    std::io::stdin(),
                    nix::sys::termios::SetArg::TCSANOW,
                    saved,
                );
            }
            eprintln!("\r\n{last}");
        }
    }

    /// Reconnects after `why` ended the connection opened at `opened`, saying so above the
    /// prompt; `Err` with the last line to show when it gives up.
    async fn reconnect(
        args: &ConnectArgs,
        retry: &mut Retry,
        opened: std::time::Instant,
        why: &str,
        printer: &mut impl rustyline::ExternalPrinter,
    ) -> Result<tether::ClientStream, String> {
        let Some(wait) = retry.after_loss(opened) else {
            return Err(format!(
                "{why}; gave up after {RECONNECT_ATTEMPTS} failures in a row"
            ));
        };
        let _ = printer.print(format!(
            "connection lost ({why}); reconnecting in {:.1} s",
            wait.as_secs_f64()
        ));
        let lost_at = std::time::Instant::now();
        tokio::time::sleep(wait).await;
        match retry.connect(args).await {
            Ok(ws) => {
                let _ = printer.print(format!(
                    "reconnected after {:.1} s; messages sent meanwhile are missing",
                    lost_at.elapsed().as_secs_f64()
                ));
                Ok(ws)
            }
            Err(e) => Err(format!("gave up reconnecting: {e}")),
        }
    }

    /// Runs the interactive session; returns the exit code.
    pub(super) async fn run(
        ws: tether::ClientStream,
        args: &ConnectArgs,
    ) -> Result<i32, ConnectError> {
        let mut agreed = Vec::new();
        if let Some(protocol) = ws.protocol() {
            agreed.push(format!("subprotocol {protocol}"));
        }
        if ws.is_compressed() {
            agreed.push("permessage-deflate".to_owned());
        }
        let agreed = if agreed.is_empty() {
            String::new()
        } else {
            format!(" ({})", agreed.join(", "))
        };
        eprintln!(
            "connected to {}{agreed}; /help for commands",
            args.server_url()
        );
        let terminal = Terminal::save();
        let mut editor =
            rustyline::DefaultEditor::new().map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut printer = editor
            .create_external_printer()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<Option<String>>(16);
        std::thread::spawn(move || loop {
            match editor.readline("> ") {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        let _ = editor.add_history_entry(line.as_str());
                    }
                    if lines_tx.blocking_send(Some(line)).is_err() {
                        return;
                    }
                }
                Err(_) => {
                    // Ctrl-C, Ctrl-D, or a terminal error: leave.
                    let _ = lines_tx.blocking_send(None);
                    return;
                }
            }
        });
        let (mut tx, mut rx) = ws.split();
        let mut received = 0usize;
        // Set once we asked to close: the server's echo then ends the session normally.
        let mut we_closed = false;
        let mut retry = Retry::default();
        let mut opened = std::time::Instant::now();
        loop {
            // Why the connection ended, when `--reconnect` is to open another.
            let mut reopen = None;
            tokio::select! {
                line = lines.recv() => {
                    let command = match line.flatten() {
                        Some(line) => parse_command(&line, args.binary),
                        None => Command::Quit,
                    };
                    match command {
                        Command::Send(msg) => {
                            log_frame(args, ">", &msg);
                            if let Err(e) = tx.send(msg).await {
                                let _ = printer.print(format!("error: {e}"));
                            }
                        }
                        Command::Close(frame) => {
                            we_closed = true;
                            send_close(&mut tx, args, frame).await;
                        }
                        Command::Quit => {
                            we_closed = true;
                            send_close(&mut tx, args, None).await;
                        }
                        Command::Help => {
                            let _ = printer.print(HELP.to_owned());
                        }
                        Command::Invalid(why) => {
                            let _ = printer.print(why);
                        }
                    }
                }
                msg = rx.recv() => match msg {
                    None if we_closed => {
                        terminal.finish("connection closed");
                        return Ok(exit::OK);
                    }
                    Some(Err(e)) if we_closed => {
                        terminal.finish(&format!("connection failed: {}", describe(&e)));
                        return Ok(exit::FAILURE);
                    }
                    lost @ (None | Some(Err(_))) => {
                        let why = match lost {
                            Some(Err(e)) => describe(&e),
                            _ => "the connection ended without a close frame".to_owned(),
                        };
                        if !args.reconnect {
                            terminal.finish(&format!("connection lost: {why}"));
                            return Ok(exit::FAILURE);
                        }
                        reopen = Some(why);
                    }
                    Some(Ok(Message::Close(frame))) => {
                        log_frame(args, "<", &Message::Close(frame.clone()));
                        if !we_closed {
                            log_close_answer(args, frame.as_ref());
                        }
                        while let Some(Ok(_)) = rx.recv().await {}
                        let status = frame
                            .as_ref()
                            .map_or_else(|| "no status".to_owned(), |f| format!("{} {}", f.code, printable(&f.reason)));
                        if we_closed {
                            terminal.finish(&format!("closed ({})", status.trim_end()));
                            return Ok(exit::OK);
                        }
                        // A server restarting or overloaded (1001, 1012, 1013…): as when the
                        // connection is lost.
                        if args.reconnect && frame.as_ref().is_some_and(|f| worth_retrying(f.code)) {
                            reopen = Some(format!("closed by the server: {}", status.trim_end()));
                        } else {
                            terminal.finish(&format!("closed by the server ({})", status.trim_end()));
                            return Ok(exit_code_for(frame.as_ref()));
                        }
                    }
                    Some(Ok(msg)) => {
                        log_frame(args, "<", &msg);
                        let _ = printer.print(show(args, &msg));
                        if msg.is_data() {
                            received += 1;
                            if args.exit_after == Some(received) {
                                we_closed = true;
                                send_close(&mut tx, args, None).await;
                            }
                        }
                    }
                }
            }
            if let Some(why) = reopen {
                match reconnect(args, &mut retry, opened, &why, &mut printer).await {
                    Ok(ws) => (tx, rx) = ws.split(),
                    Err(gave_up) => {
                        terminal.finish(&gave_up);
                        return Ok(exit::FAILURE);
                    }
                }
                opened = std::time::Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_indented_in_the_order_it_came() {
        let text = r#"{"type":"message","id":2,"text":"a, \"b\": {c}","tags":[],"m":{"x":[1, 2]},"e":{ }}"#;
        let pretty = pretty_json(text);
        assert_eq!(
            pretty,
            "{\n  \"type\": \"message\",\n  \"id\": 2,\n  \"text\": \"a, \\\"b\\\": {c}\",\n  \"tags\": [],\n  \"m\": {\n    \"x\": [\n      1,\n      2\n    ]\n  },\n  \"e\": {}\n}"
        );
        // The same value as serde's own indentation, keys aside.
        let ours: serde_json::Value = serde_json::from_str(&pretty).unwrap();
        let theirs: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn commands_parse() {
        assert_eq!(
            parse_command("hello", false),
            Command::Send(Message::text("hello"))
        );
        assert_eq!(
            parse_command("hello", true),
            Command::Send(Message::binary(b"hello".to_vec()))
        );
        assert_eq!(
            parse_command("//x", false),
            Command::Send(Message::text("/x"))
        );
        assert_eq!(parse_command("/help", false), Command::Help);
        assert_eq!(
            parse_command("/ping hi", false),
            Command::Send(Message::Ping("hi".into()))
        );
        assert_eq!(
            parse_command("/binary 68 65 6c", false),
            Command::Send(Message::binary(b"hel".to_vec()))
        );
        assert!(matches!(
            parse_command("/binary 6", false),
            Command::Invalid(_)
        ));
        assert!(matches!(
            parse_command("/binary zz", false),
            Command::Invalid(_)
        ));
        assert_eq!(
            parse_command("/close 4000 done here", false),
            Command::Close(Some(CloseFrame::new(CloseCode(4000), "done here")))
        );
        assert!(matches!(
            parse_command("/close 1005", false),
            Command::Invalid(_)
        ));
        assert_eq!(parse_command("/quit", false), Command::Quit);
        assert!(matches!(parse_command("/nope", false), Command::Invalid(_)));
    }

    #[test]
    fn close_codes_map_to_exit_codes() {
        assert_eq!(exit_code_for(None), exit::OK);
        assert_eq!(
            exit_code_for(Some(&CloseFrame::new(CloseCode::NORMAL, ""))),
            exit::OK
        );
        assert_eq!(
            exit_code_for(Some(&CloseFrame::new(CloseCode::POLICY_VIOLATION, ""))),
            exit::FAILURE
        );
    }

    #[test]
    fn hex_is_cut_after_64_bytes() {
        assert_eq!(hex(&[0xde, 0xad]), "de ad");
        assert!(hex(&[0u8; 100]).ends_with('…'));
    }
}
