//! The Autobahn TestSuite over HTTP/2 (RFC 8441). The suite speaks HTTP/1.1 only, so a relay in
//! this process carries each of its WebSockets over one stream of an HTTP/2 connection: the
//! opening handshake is translated (an upgrade on one side, an extended CONNECT on the other,
//! the permessage-deflate and subprotocol headers passed through both ways), and after it every
//! byte goes through unchanged, so the suite's frames, and its checks of what comes back,
//! reach tether's WebSocket over an HTTP/2 stream.
//!
//! ```text
//! autobahn_h2 server PORT         the fuzzing client connects to PORT; each WebSocket goes on
//!                                 as a stream of one shared h2c connection to an echo server
//!                                 here (tether::upgrade behind hyper's HTTP/2 server)
//! autobahn_h2 client URL AGENT    runs the fuzzing server's cases with tether's client over
//!                                 HTTP/2 (HttpVersion::Http2, one Pool: every case a stream of
//!                                 one connection) to a relay here that carries each stream to
//!                                 the fuzzing server at URL over HTTP/1.1
//! ```
//!
//! `python3 conformance/run.py server-h2|client-h2` starts the suite and runs this.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tether::proto::extension::deflate::DeflateConfig;
use tether::{ClientBuilder, Config, HttpVersion, Message, Pool};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The headers a WebSocket handshake carries that the relay passes on, both ways.
const PASSED: [&str; 3] = [
    "sec-websocket-extensions",
    "sec-websocket-protocol",
    "origin",
];

/// Flow-control windows of the relay's HTTP/2 connections: the suite sends messages of up to
/// 16 MiB.
const WINDOW: u32 = 16 << 20;

/// The limits `tether echo` runs the suite with.
fn config() -> Config {
    Config::default()
        .max_message_size(64 << 20)
        .max_frame_size(16 << 20)
        .deflate(Some(DeflateConfig::default()))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["server", port] => server(port.parse()?).await,
        ["client", url, agent] => client(url, agent).await,
        _ => Err("usage: autobahn_h2 server PORT | autobahn_h2 client URL AGENT".into()),
    }
}

// --- server role: the suite's HTTP/1.1 WebSockets, relayed onto h2 streams -------------------

async fn server(port: u16) -> Result<(), Error> {
    let echo = h2_echo_server().await?;
    let tcp = TcpStream::connect(echo).await?;
    // Every socket here without Nagle's delay: the suite waits for each echo in turn.
    tcp.set_nodelay(true)?;
    let mut h2 = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    h2.initial_stream_window_size(WINDOW)
        .initial_connection_window_size(WINDOW);
    let (sender, connection) = h2.handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("relaying ws://127.0.0.1:{port}/ to an HTTP/2 echo server at {echo}");
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let sender = sender.clone();
        tokio::spawn(async move {
            if let Err(e) = relay_to_h2(tcp, sender, echo).await {
                eprintln!("relay: {e}");
            }
        });
    }
}

/// An HTTP/2 server (prior knowledge) that echoes every WebSocket opened on it.
async fn h2_echo_server() -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = Arc::new(config());
    serve_h2(listener, move |mut req| {
        let config = config.clone();
        async move {
            match tether::upgrade::upgrade(&mut req, config) {
                Ok((response, pending)) => {
                    tokio::spawn(async move {
                        let Ok(mut ws) = pending.await else { return };
                        while let Some(Ok(msg)) = ws.recv().await {
                            if msg.is_data() && ws.send(msg).await.is_err() {
                                break;
                            }
                        }
                    });
                    response
                }
                Err(refused) => status(refused.status()),
            }
        }
    });
    Ok(addr)
}

/// Serves every connection to `listener` as HTTP/2 (prior knowledge) with extended CONNECT
/// allowed, each request answered by `answer`.
fn serve_h2<F, Fut>(listener: TcpListener, answer: F)
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<Empty<Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let answer = answer.clone();
            let service = hyper::service::service_fn(move |req| {
                let answer = answer.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(req).await) }
            });
            tokio::spawn(async move {
                let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                h2.enable_connect_protocol()
                    .max_concurrent_streams(1000)
                    .initial_stream_window_size(WINDOW)
                    .initial_connection_window_size(WINDOW);
                let _ = h2.serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
}

fn status(code: u16) -> hyper::Response<Empty<Bytes>> {
    let mut response = hyper::Response::new(Empty::new());
    *response.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or_default();
    response
}

/// Answers one HTTP/1.1 upgrade from the suite after opening its stream, then relays bytes.
async fn relay_to_h2(
    mut tcp: TcpStream,
    mut sender: SendRequest<Empty<Bytes>>,
    echo: SocketAddr,
) -> Result<(), Error> {
    let (head, rest) = read_head(&mut tcp).await?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    request.parse(&head)?;
    let path = request.path.ok_or("no request target")?.to_owned();
    let find = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    let key = find("sec-websocket-key").ok_or("no Sec-WebSocket-Key")?;
    let mut connect = hyper::Request::connect(format!("http://{echo}{path}"))
        .header("sec-websocket-version", "13");
    for name in PASSED {
        if let Some(value) = find(name) {
            connect = connect.header(name, value);
        }
    }
    let mut connect = connect.body(Empty::new())?;
    connect
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let response = sender.send_request(connect).await?;
    if response.status() != 200 {
        let refused = format!(
            "HTTP/1.1 {} Refused\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            response.status().as_u16()
        );
        tcp.write_all(refused.as_bytes()).await?;
        return Ok(());
    }
    let mut answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        tether::proto::handshake::accept_key(key.as_bytes())
    );
    for name in PASSED {
        if let Some(value) = response.headers().get(name) {
            answer.push_str(&format!("{name}: {}\r\n", value.to_str()?));
        }
    }
    answer.push_str("\r\n");
    let stream = hyper::upgrade::on(response).await?;
    tcp.write_all(answer.as_bytes()).await?;
    pipe(tcp, TokioIo::new(stream), rest).await
}

// --- client role: tether's client over h2, relayed to the suite's HTTP/1.1 server -----------

async fn client(url: &str, agent: &str) -> Result<(), Error> {
    let suite: SocketAddr = url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .parse()?;
    let relay = h2_relay_server(suite).await?;
    let base = format!("ws://{relay}");
    let pool = Pool::new();
    let open = |path: String| {
        ClientBuilder::new(&format!("{base}{path}")).map(|b| {
            b.config(config())
                .http_version(HttpVersion::Http2)
                .pool(pool.clone())
        })
    };
    let count: u32 = {
        let (mut ws, _) = open("/getCaseCount".into())?.connect().await?;
        let mut count = None;
        while let Some(msg) = ws.recv().await {
            if let Message::Text(text) = msg? {
                count = Some(text.parse()?);
            }
        }
        count.ok_or("the fuzzing server sent no case count")?
    };
    println!("running {count} cases as agent {agent:?}, over HTTP/2");
    for case in 1..=count {
        let builder = open(format!("/runCase?case={case}&agent={agent}"))?;
        if let Err(e) = run_case(builder).await {
            println!("case {case}: {e}");
        }
    }
    let (mut ws, _) = open(format!("/updateReports?agent={agent}"))?
        .connect()
        .await?;
    while let Some(msg) = ws.recv().await {
        msg?;
    }
    println!("reports updated");
    Ok(())
}

/// Echoes every message of one case until the server closes.
async fn run_case(builder: ClientBuilder) -> tether::Result<()> {
    let (mut ws, _) = builder.connect().await?;
    assert!(
        matches!(ws.get_ref(), tether::tls::MaybeTlsStream::Http2(_)),
        "every case runs over HTTP/2"
    );
    while let Some(msg) = ws.recv().await {
        let msg = msg?;
        if msg.is_data() {
            ws.feed(msg).await?;
        }
    }
    Ok(())
}

/// An HTTP/2 server (prior knowledge) that carries each extended CONNECT to the suite's server
/// as an HTTP/1.1 upgrade.
async fn h2_relay_server(suite: SocketAddr) -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    serve_h2(listener, move |req| async move {
        relay_to_http1(req, suite).await.unwrap_or_else(|e| {
            eprintln!("relay: {e}");
            status(502)
        })
    });
    Ok(addr)
}

/// Upgrades one extended CONNECT's target at the suite's server, answers the stream, and
/// relays bytes once both sides are WebSockets.
async fn relay_to_http1(
    mut req: hyper::Request<hyper::body::Incoming>,
    suite: SocketAddr,
) -> Result<hyper::Response<Empty<Bytes>>, Error> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let mut upgrade = format!(
        "GET {path} HTTP/1.1\r\nHost: {suite}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for name in PASSED {
        if let Some(value) = req.headers().get(name) {
            upgrade.push_str(&format!("{name}: {}\r\n", value.to_str()?));
        }
    }
    upgrade.push_str("\r\n");
    let mut tcp = TcpStream::connect(suite).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(upgrade.as_bytes()).await?;
    let (head, rest) = read_head(&mut tcp).await?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    response.parse(&head)?;
    if response.code != Some(101) {
        return Ok(status(response.code.unwrap_or(502)));
    }
    let mut answer = status(200);
    for header in response.headers.iter() {
        let name = header.name.to_ascii_lowercase();
        if PASSED.contains(&name.as_str()) {
            answer.headers_mut().insert(
                hyper::header::HeaderName::from_bytes(name.as_bytes())?,
                hyper::header::HeaderValue::from_bytes(header.value)?,
            );
        }
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(stream) = on_upgrade.await else { return };
        if let Err(e) = pipe(tcp, TokioIo::new(stream), rest).await {
            eprintln!("relay: {e}");
        }
    });
    Ok(answer)
}

// --- both ------------------------------------------------------------------------------------

/// Reads an HTTP head (at most 16 KiB) from `tcp`: the head and the bytes read past it.
async fn read_head(tcp: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > 16 << 10 {
            return Err("head too large".into());
        }
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err("closed before the head ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Relays bytes between the suite's TCP connection and an HTTP/2 stream until both ends are
/// done (`early`: bytes that came with the handshake). The end of one side's input ends the
/// other's output (a FIN, or the stream's END_STREAM), as each peer expects of a transport; a
/// direction that fails (a reset stream or connection) does not cut the other short, which
/// may still carry the peer's last frames.
async fn pipe<S>(tcp: TcpStream, stream: S, early: Vec<u8>) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut tcp_in, mut tcp_out) = tcp.into_split();
    let (mut h2_in, mut h2_out) = tokio::io::split(stream);
    // Each direction ends its output however its input ended: a reset input (the suite
    // resets some connections) must still end the stream, or the other side waits for it.
    let up = async {
        let copied = async {
            h2_out.write_all(&early).await?;
            tokio::io::copy(&mut tcp_in, &mut h2_out).await
        }
        .await;
        let _ = h2_out.shutdown().await;
        copied
    };
    let down = async {
        let copied = tokio::io::copy(&mut h2_in, &mut tcp_out).await;
        let _ = tcp_out.shutdown().await;
        copied
    };
    let (up, down) = tokio::join!(up, down);
    up.and(down).map(|_| ()).map_err(Into::into)
}
