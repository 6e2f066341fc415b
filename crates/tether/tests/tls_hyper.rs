//! `wss://` through a real rustls handshake with a private CA, and upgrading a hyper request.

mod common;

use std::sync::Arc;

use common::*;
use http_body_util::Empty;
use hyper::body::Bytes;
use tether::{Config, Error, Message, TlsError};

/// A TLS echo server; returns its port.
async fn tls_echo_server(server: Arc<rustls::ServerConfig>) -> u16 {
    let (listener, addr) = listener().await;
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
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
    addr.port()
}

/// A hyper HTTP/1.1 server on plain TCP (`TokioIo<TcpStream>`) that upgrades every request:
/// the WebSocket says whether it holds the TCP stream itself, then echoes. Returns its
/// address.
async fn hyper_server() -> std::net::SocketAddr {
    let (listener, addr) = listener().await;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|mut req| async move {
                let (response, pending) =
                    tether::upgrade::upgrade::<_, Empty<Bytes>>(&mut req, Config::default())
                        .expect("an upgrade");
                tokio::spawn(async move {
                    let Ok(mut ws) = pending.await else { return };
                    let own = ws.get_ref().tcp().is_some();
                    if ws.send(Message::text(format!("tcp: {own}"))).await.is_err() {
                        return;
                    }
                    while let Some(Ok(msg)) = ws.recv().await {
                        if msg.is_data() && ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                });
                Ok::<_, std::convert::Infallible>(response)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .with_upgrades(),
            );
        }
    });
    addr
}

/// Reads one unmasked, unfragmented text frame of under 126 bytes.
async fn read_text(tcp: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 2];
    within(tcp.read_exact(&mut head)).await.unwrap();
    assert_eq!(head[0], 0x81, "a final text frame");
    let mut payload = vec![0u8; usize::from(head[1])];
    within(tcp.read_exact(&mut payload)).await.unwrap();
    String::from_utf8(payload).unwrap()
}

#[tokio::test]
async fn a_hyper_upgrade_takes_the_tcp_stream_and_the_bytes_sent_with_the_request() {
    let addr = hyper_server().await;
    // The request and a first frame (masked with zeros) in one write: hyper reads both, and
    // the frame must reach the WebSocket all the same.
    let mut bytes = request(addr, "").into_bytes();
    bytes.extend_from_slice(&[0x81, 0x85, 0, 0, 0, 0]);
    bytes.extend_from_slice(b"early");
    let (mut tcp, head) = within(raw_exchange_bytes(addr, &bytes)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_text(&mut tcp).await, "tcp: true");
    assert_eq!(read_text(&mut tcp).await, "early");
}

#[tokio::test]
async fn wss_connects_with_a_custom_ca_and_echoes() {
    let (ca_pem, server) = pki();
    let port = tls_echo_server(server).await;
    let tls = tether::tls::client_config(ca_pem.as_bytes()).unwrap();
    let (mut ws, _) = within(
        tether::ClientBuilder::new(&format!("wss://localhost:{port}/"))
            .unwrap()
            .tls_config(tls)
            .connect(),
    )
    .await
    .unwrap();
    for len in [5usize, 100_000] {
        let data = vec![7u8; len];
        ws.send(Message::binary(data.clone())).await.unwrap();
        assert_eq!(
            within(ws.recv()).await.unwrap().unwrap(),
            Message::binary(data)
        );
    }
    within(ws.close(None)).await.unwrap();
}

#[tokio::test]
async fn wss_refuses_a_server_signed_by_an_unknown_ca() {
    let (_ca_pem, server) = pki();
    let port = tls_echo_server(server).await;
    let err = within(tether::connect(&format!("wss://localhost:{port}/")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Tls(TlsError::Handshake {
                source: rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
                ..
            })
        ),
        "{err:?}"
    );
    // The cause is a value, not only text.
    let cause = std::error::Error::source(&err).and_then(std::error::Error::source);
    assert!(
        cause.is_some_and(|c| c.is::<rustls::Error>()),
        "{err}: the rustls error is its source's source"
    );
}

#[test]
fn a_ca_file_without_certificates_is_a_clear_error() {
    let err = tether::tls::client_config(b"not a certificate").unwrap_err();
    assert!(matches!(err, TlsError::NoCaCertificate), "{err}");
}

#[tokio::test]
async fn hyper_request_upgrades_to_a_websocket() {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let (listener, addr) = listener().await;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = service_fn(
                    |mut req: hyper::Request<hyper::body::Incoming>| async move {
                        let config = Config::default().protocols(vec!["echo".into()]);
                        let response =
                            match tether::upgrade::upgrade::<_, Empty<Bytes>>(&mut req, config) {
                                Ok((response, pending)) => {
                                    tokio::spawn(async move {
                                        let mut ws = pending.await.unwrap();
                                        while let Some(Ok(msg)) = ws.recv().await {
                                            if msg.is_data() && ws.send(msg).await.is_err() {
                                                break;
                                            }
                                        }
                                    });
                                    response
                                }
                                Err(refused) => {
                                    let mut response = hyper::Response::new(Empty::new());
                                    *response.status_mut() =
                                        hyper::StatusCode::from_u16(refused.status()).unwrap();
                                    response
                                }
                            };
                        Ok::<_, std::convert::Infallible>(response)
                    },
                );
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    let (mut ws, response) = within(
        tether::ClientBuilder::new(&format!("ws://{addr}/"))
            .unwrap()
            .protocol("echo")
            .connect(),
    )
    .await
    .unwrap();
    assert_eq!(response.protocol.as_deref(), Some("echo"));
    ws.send(Message::text("through hyper")).await.unwrap();
    assert_eq!(
        within(ws.recv()).await.unwrap().unwrap(),
        Message::text("through hyper")
    );
    within(ws.close(None)).await.unwrap();

    // A plain GET is not an upgrade: hyper answers with the refusal's status.
    let (_tcp, head) = within(raw_exchange(
        addr,
        &format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
    ))
    .await;
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
}
