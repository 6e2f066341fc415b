//! Fuzzes the opening handshake parsers: the input is parsed as a client's request (server
//! side) and as a server's answer (client side), each under a roomy and a tight head limit.
//! Nothing panics, a refused request answers with 400, 403, 405, 426 or 431, and an accepted
//! head never claims more bytes than it was given or than the limit.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::handshake::client::ClientRequest;
use tether_proto::handshake::server::{Accept, Request};

fuzz_target!(|data: &[u8]| {
    let mut client = ClientRequest::new("server.example.com", "/chat");
    client.key = "dGhlIHNhbXBsZSBub25jZQ==".into();
    client.protocols = vec!["chat".into()];
    client.extensions = Some("permessage-deflate".into());
    for max_len in [8192, data.len() / 2] {
        match Request::parse(data, max_len) {
            Ok(Some((request, n))) => {
                assert!(n <= data.len() && n <= max_len);
                let protocol = request.protocols().next().map(str::to_owned);
                let answer = request.accept(&Accept {
                    protocol,
                    ..Accept::default()
                });
                assert!(answer.starts_with(b"HTTP/1.1 101 "));
                let _ = (request.path(), request.query(), request.origin());
            }
            Ok(None) => assert!(data.len() <= max_len),
            Err(err) => {
                let status = err.status();
                assert!(
                    matches!(status, 400 | 403 | 405 | 426 | 431),
                    "{err}: {status}"
                );
                assert!(err
                    .response()
                    .starts_with(format!("HTTP/1.1 {status} ").as_bytes()));
            }
        }
        match client.parse_response(data, max_len) {
            Ok(Some((_, n))) => assert!(n <= data.len() && n <= max_len),
            Ok(None) => assert!(data.len() <= max_len),
            Err(err) => assert!(!err.to_string().is_empty()),
        }
    }
});
