use super::*;
use crate::connection::{Connection, Event};
use crate::extension::parse;
use crate::frame::RSV1;
use crate::Limits;
use bytes::{Buf, BytesMut};
use proptest::prelude::*;

fn server_answer(offer: &str, config: &DeflateConfig) -> Option<String> {
    negotiate_server(&parse([offer]).unwrap(), config).map(|p| p.to_string())
}

#[test]
fn server_negotiation_table() {
    let default = DeflateConfig::default();
    let table: &[(&str, &DeflateConfig, Option<&str>)] = &[
        ("permessage-deflate", &default, Some("permessage-deflate")),
        (
            "permessage-deflate; client_max_window_bits",
            &default,
            Some("permessage-deflate"),
        ),
        (
            "permessage-deflate; client_max_window_bits=10",
            &default,
            Some("permessage-deflate; client_max_window_bits=10"),
        ),
        (
            "permessage-deflate; server_max_window_bits=9; server_no_context_takeover",
            &default,
            Some("permessage-deflate; server_no_context_takeover; server_max_window_bits=9"),
        ),
        (
            "permessage-deflate; client_no_context_takeover",
            &default,
            Some("permessage-deflate; client_no_context_takeover"),
        ),
        (
            "permessage-deflate; server_max_window_bits=\"12\"",
            &default,
            Some("permessage-deflate; server_max_window_bits=12"),
        ),
        // Invalid offers are declined; a later valid one is taken.
        (
            "permessage-deflate; server_max_window_bits=16, permessage-deflate",
            &default,
            Some("permessage-deflate"),
        ),
        ("permessage-deflate; server_max_window_bits", &default, None),
        (
            "permessage-deflate; server_max_window_bits=08",
            &default,
            None,
        ),
        (
            "permessage-deflate; client_max_window_bits=7",
            &default,
            None,
        ),
        (
            "permessage-deflate; server_no_context_takeover=1",
            &default,
            None,
        ),
        ("permessage-deflate; unknown_param", &default, None),
        (
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            &default,
            None,
        ),
        ("x-webkit-deflate-frame", &default, None),
        (
            "x-unknown, permessage-deflate",
            &default,
            Some("permessage-deflate"),
        ),
    ];
    for (offer, config, expect) in table {
        assert_eq!(
            server_answer(offer, config).as_deref(),
            *expect,
            "offer {offer:?}"
        );
    }
}

#[test]
fn server_preferences_shape_the_answer() {
    let config = DeflateConfig::default()
        .server_no_context_takeover(true)
        .server_max_window_bits(10)
        .client_max_window_bits(11);
    assert_eq!(
        server_answer("permessage-deflate; client_max_window_bits", &config).as_deref(),
        Some("permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_max_window_bits=11")
    );
    // A client that did not offer client_max_window_bits cannot be limited.
    assert_eq!(
        server_answer("permessage-deflate", &config).as_deref(),
        Some("permessage-deflate; server_no_context_takeover; server_max_window_bits=10")
    );
    // The client's own lower limit wins.
    assert_eq!(
        server_answer("permessage-deflate; server_max_window_bits=9", &config).as_deref(),
        Some("permessage-deflate; server_no_context_takeover; server_max_window_bits=9")
    );
}

#[test]
fn client_offer_is_the_fixed_default() {
    assert_eq!(
        DeflateConfig::default().offer(),
        "permessage-deflate; client_max_window_bits"
    );
    let config = DeflateConfig::default()
        .client_max_window_bits(12)
        .server_max_window_bits(10)
        .client_no_context_takeover(true);
    assert_eq!(
        config.offer(),
        "permessage-deflate; client_max_window_bits=12; client_no_context_takeover; server_max_window_bits=10"
    );
}

#[test]
fn client_negotiation_table() {
    let offer = DeflateConfig::default();
    let ok = |resp: &str| negotiate_client(&parse([resp]).unwrap(), &offer);
    assert_eq!(
        ok("permessage-deflate").unwrap(),
        Some(DeflateParams::default())
    );
    assert_eq!(
        ok("permessage-deflate; client_max_window_bits=9; server_no_context_takeover").unwrap(),
        Some(DeflateParams {
            server_no_context_takeover: true,
            client_max_window_bits: Some(9),
            ..DeflateParams::default()
        })
    );
    assert_eq!(negotiate_client(&[], &offer).unwrap(), None);
    for bad in [
        "x-other",
        "permessage-deflate, permessage-deflate",
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; mystery",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
    ] {
        assert!(ok(bad).is_err(), "{bad}");
    }
    let limited = DeflateConfig::default()
        .server_max_window_bits(10)
        .client_max_window_bits(10);
    let resp = parse(["permessage-deflate; server_max_window_bits=12"]).unwrap();
    assert!(negotiate_client(&resp, &limited).is_err());
    let resp = parse(["permessage-deflate; client_max_window_bits=11"]).unwrap();
    assert!(negotiate_client(&resp, &limited).is_err());
}

/// A client and a server agreed on `params`.
fn pair(params: DeflateParams, config: &DeflateConfig) -> (Connection, Connection) {
    let mut client = Connection::new(Role::Client);
    let mut server = Connection::new(Role::Server);
    client.set_deflate(Deflate::new(Role::Client, params, config));
    server.set_deflate(Deflate::new(Role::Server, params, config));
    (client, server)
}

/// Carries everything `from` queued into `to`, returning the events and the wire size.
fn carry(from: &mut Connection, to: &mut Connection) -> (Vec<Event>, usize) {
    let out = from.transmit();
    let wire = out.copy_to_bytes(out.remaining());
    (receive_all(to, &wire), wire.len())
}

/// Parses all of `wire`, as a driver does between reads; returns the events.
fn receive_all(to: &mut Connection, wire: &[u8]) -> Vec<Event> {
    let mut buf = BytesMut::from(wire);
    let mut events = Vec::new();
    loop {
        to.receive(&mut buf).unwrap();
        events.extend(std::iter::from_fn(|| to.poll_event()));
        if !to.wants_receive(&buf) {
            return events;
        }
    }
}

fn json_like(i: usize) -> String {
    format!(
        r#"{{"type":"message","id":{i},"room":"lobby","user":"ann","text":"hello number {i} from the lobby"}}"#
    )
}

#[test]
fn round_trips_across_every_window_size_and_takeover_mode() {
    for bits in 8..=15u8 {
        for takeover in [false, true] {
            let params = DeflateParams {
                server_no_context_takeover: takeover,
                client_no_context_takeover: takeover,
                server_max_window_bits: Some(bits),
                client_max_window_bits: Some(bits),
            };
            let config = DeflateConfig::default();
            let (mut client, mut server) = pair(params, &config);
            let messages: Vec<String> = (0..50).map(json_like).collect();
            for m in &messages {
                client.send_text(m.clone().into()).unwrap();
                server.send_text(m.clone().into()).unwrap();
            }
            let (at_server, sent) = carry(&mut client, &mut server);
            let (at_client, _) = carry(&mut server, &mut client);
            let expect: Vec<Event> = messages
                .iter()
                .map(|m| Event::Text(m.clone().into()))
                .collect();
            assert_eq!(at_server, expect, "bits {bits} takeover {takeover}");
            assert_eq!(at_client, expect, "bits {bits} takeover {takeover}");
            let raw: usize = messages.iter().map(|m| m.len() + 6).sum();
            if bits > 8 {
                assert!(
                    sent < raw,
                    "bits {bits}: {sent} bytes on the wire for {raw} raw"
                );
            } else {
                assert_eq!(sent, raw, "an 8-bit window sends uncompressed");
            }
        }
    }
}

#[test]
fn context_takeover_compresses_repeats_better() {
    let config = DeflateConfig::default();
    let size = |takeover: bool| {
        let params = DeflateParams {
            client_no_context_takeover: takeover,
            ..DeflateParams::default()
        };
        let (mut client, mut server) = pair(params, &config);
        for _ in 0..20 {
            client.send_text(json_like(7).into()).unwrap();
        }
        carry(&mut client, &mut server).1
    };
    assert!(size(false) < size(true));
}

#[test]
fn large_and_fragmented_compressed_messages_round_trip() {
    let (mut client, mut server) = pair(DeflateParams::default(), &DeflateConfig::default());
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    client.send_binary(Bytes::from(big.clone())).unwrap();
    let (events, _) = carry(&mut client, &mut server);
    assert_eq!(events, vec![Event::Binary(Bytes::from(big))]);

    // A compressed message split over three frames, RSV1 on the first only, with a ping
    // between them.
    let mut sender = Deflate::new(
        Role::Client,
        DeflateParams::default(),
        &DeflateConfig::default(),
    );
    let text = "fragmented and compressed ✓ ".repeat(40);
    let compressed = sender.compress(text.as_bytes());
    let (a, rest) = compressed.split_at(compressed.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut wire = Vec::new();
    wire.extend(masked(0x01, false, RSV1, a));
    wire.extend(masked(0x09, true, 0, b"hi"));
    wire.extend(masked(0x00, false, 0, b));
    wire.extend(masked(0x00, true, 0, c));
    let mut server = Connection::new(Role::Server);
    server.set_deflate(Deflate::new(
        Role::Server,
        DeflateParams::default(),
        &DeflateConfig::default(),
    ));
    let events = receive_all(&mut server, &wire);
    assert_eq!(
        events,
        vec![
            Event::Ping(Bytes::from_static(b"hi")),
            Event::Text(text.into())
        ]
    );
}

/// A masked client frame with the given first-byte bits.
fn masked(opcode: u8, fin: bool, rsv: u8, payload: &[u8]) -> Vec<u8> {
    let mut header = BytesMut::new();
    crate::FrameHeader {
        fin,
        rsv,
        opcode: crate::OpCode::from_bits(opcode).unwrap(),
        mask: Some([1, 2, 3, 4]),
        payload_len: payload.len() as u64,
    }
    .encode(&mut header);
    let mut body = payload.to_vec();
    crate::mask::apply_mask(&mut body, [1, 2, 3, 4], 0);
    header.extend_from_slice(&body);
    header.to_vec()
}

fn deflate_server(limit: usize) -> Connection {
    let mut server =
        Connection::with_limits(Role::Server, Limits::default().max_message_size(limit));
    server.set_deflate(Deflate::new(
        Role::Server,
        DeflateParams::default(),
        &DeflateConfig::default(),
    ));
    server
}

#[test]
fn decompression_bomb_fails_with_1009_and_bounded_memory() {
    // 64 MiB of zeros compresses to about 64 KiB.
    let mut sender = Deflate::new(
        Role::Client,
        DeflateParams::default(),
        &DeflateConfig::default().level(9),
    );
    let bomb = sender.compress(&vec![0u8; 64 << 20]);
    assert!(bomb.len() < 100_000, "{}", bomb.len());
    let mut server = deflate_server(1 << 20);
    let mut buf = BytesMut::from(&masked(0x02, true, RSV1, &bomb)[..]);
    let err = server.receive(&mut buf).unwrap_err();
    assert_eq!(err, ProtocolError::MessageTooLarge { limit: 1 << 20 });
    assert_eq!(err.close_code(), crate::CloseCode::MESSAGE_TOO_BIG);
}

#[test]
fn rsv1_is_refused_without_deflate_on_continuations_and_on_control_frames() {
    let mut plain = Connection::new(Role::Server);
    let mut buf = BytesMut::from(&masked(0x01, true, RSV1, b"x")[..]);
    assert_eq!(plain.receive(&mut buf).unwrap_err().close_code().0, 1002);

    let mut wire = masked(0x01, false, 0, b"a");
    wire.extend(masked(0x00, true, RSV1, b"b"));
    let mut server = deflate_server(1 << 20);
    let mut buf = BytesMut::from(&wire[..]);
    let result = server
        .receive(&mut buf)
        .and_then(|()| server.receive(&mut buf));
    assert_eq!(result.unwrap_err().close_code().0, 1002);

    let mut server = deflate_server(1 << 20);
    let mut buf = BytesMut::from(&masked(0x09, true, RSV1, b"")[..]);
    assert_eq!(server.receive(&mut buf).unwrap_err().close_code().0, 1002);
}

#[test]
fn compressed_invalid_utf8_fails_with_1007() {
    let mut sender = Deflate::new(
        Role::Client,
        DeflateParams::default(),
        &DeflateConfig::default(),
    );
    let bad = sender.compress(&[b'o', b'k', 0xff, 0xfe]);
    let mut server = deflate_server(1 << 20);
    let mut buf = BytesMut::from(&masked(0x01, true, RSV1, &bad)[..]);
    assert_eq!(server.receive(&mut buf).unwrap_err().close_code().0, 1007);
}

#[test]
fn small_messages_stay_uncompressed_below_the_threshold() {
    let config = DeflateConfig::default().threshold(100);
    let (mut client, mut server) = pair(DeflateParams::default(), &config);
    client.send_text("short".into()).unwrap();
    let out = client.transmit();
    assert_eq!(out.chunk()[0] & 0x40, 0, "RSV1 clear");
    let (events, _) = carry(&mut client, &mut server);
    assert_eq!(events, vec![Event::Text("short".into())]);
}

proptest! {
    #[test]
    fn inflater_survives_garbage(data in proptest::collection::vec(any::<u8>(), 0..2048), fin: bool) {
        let mut d = Deflate::new(Role::Server, DeflateParams::default(), &DeflateConfig::default());
        let mut out = Vec::new();
        // Any result is fine; no panic, and never more than the limit.
        let _ = d.inflate(&data, fin, &mut out, 4096);
        prop_assert!(out.len() <= 4097);
    }

    #[test]
    fn compress_inflate_round_trip(data in proptest::collection::vec(any::<u8>(), 0..5000), bits in 9u8..=15, reset: bool) {
        let params = DeflateParams {
            client_max_window_bits: Some(bits),
            client_no_context_takeover: reset,
            ..DeflateParams::default()
        };
        let config = DeflateConfig::default().threshold(0);
        let mut tx = Deflate::new(Role::Client, params, &config);
        let mut rx = Deflate::new(Role::Server, params, &config);
        for _ in 0..2 {
            let compressed = tx.compress(&data);
            let mut out = Vec::new();
            rx.inflate(&compressed, true, &mut out, 1 << 20).unwrap();
            prop_assert_eq!(&out, &data);
        }
    }
}

#[test]
fn prepared_messages_compress_once_for_connections_without_server_takeover() {
    let params = DeflateParams {
        server_no_context_takeover: true,
        ..DeflateParams::default()
    };
    let config = DeflateConfig::default();
    let message = crate::Prepared::text(json_like(7).repeat(4));
    let mut wires = Vec::new();
    for _ in 0..3 {
        let (mut client, mut server) = pair(params, &config);
        server.send_prepared(&message).unwrap();
        server.send_prepared(&message).unwrap();
        let out = server.transmit();
        let wire = out.copy_to_bytes(out.remaining());
        let mut buf = BytesMut::from(&wire[..]);
        let mut events = Vec::new();
        loop {
            client.receive(&mut buf).unwrap();
            events.extend(std::iter::from_fn(|| client.poll_event()));
            if !client.wants_receive(&buf) {
                break;
            }
        }
        let text = json_like(7).repeat(4);
        assert_eq!(events.len(), 2);
        assert!(events
            .iter()
            .all(|e| matches!(e, Event::Text(t) if t.as_str() == text)));
        assert!(
            wire.len() < 2 * text.len() / 2,
            "compressed: {} bytes",
            wire.len()
        );
        wires.push(wire);
    }
    assert!(
        wires.windows(2).all(|w| w[0] == w[1]),
        "every connection sends the same bytes"
    );
    assert_eq!(message.cached(), 1, "compressed once");

    // With context takeover each connection compresses for itself; the second message refers
    // back to the first and comes out smaller.
    let (mut client, mut server) = pair(DeflateParams::default(), &config);
    server.send_prepared(&message).unwrap();
    let (_, first) = carry(&mut server, &mut client);
    server.send_prepared(&message).unwrap();
    let (events, second) = carry(&mut server, &mut client);
    assert!(second < first, "{second} < {first}");
    assert!(matches!(&events[..], [Event::Text(_)]));
    assert_eq!(message.cached(), 1);
}

/// A server with permessage-deflate, streaming on, and `max_frame_size` at `cap`.
fn streaming_server(cap: usize) -> Connection {
    let limits = crate::config::Limits::default().max_frame_size(cap);
    let mut server = Connection::with_limits(Role::Server, limits);
    server.set_deflate(Deflate::new(
        Role::Server,
        DeflateParams::default(),
        &DeflateConfig::default(),
    ));
    server.set_streaming(true);
    server
}

/// Receives `wire` with [`streaming_server`]; returns the events.
fn stream_in(wire: &[u8], cap: usize) -> Vec<Event> {
    receive_all(&mut streaming_server(cap), wire)
}

/// The pieces of one streamed message: their data joined, and checks on their flags.
fn joined(events: &[Event], cap: usize) -> (Vec<u8>, usize) {
    let mut data = Vec::new();
    for (i, event) in events.iter().enumerate() {
        let Event::Fragment {
            data: piece,
            first,
            fin,
            ..
        } = event
        else {
            panic!("a piece: {event:?}");
        };
        assert_eq!(*first, i == 0, "first only on the first piece");
        assert_eq!(*fin, i == events.len() - 1, "fin only on the last piece");
        assert!(piece.len() <= cap, "a piece of {} bytes", piece.len());
        data.extend_from_slice(piece);
    }
    (data, events.len())
}

#[test]
fn a_streamed_compressed_frame_is_inflated_a_piece_at_a_time() {
    // 6.5 MB of text that compresses to under 128 KiB: one frame, delivered in pieces of at
    // most 128 KiB however far it inflates.
    let text = "all work and no play ✓ ".repeat(262_000);
    let mut sender = Deflate::new(
        Role::Client,
        DeflateParams::default(),
        &DeflateConfig::default(),
    );
    let compressed = sender.compress(text.as_bytes());
    let cap = 128 << 10;
    assert!(compressed.len() < cap, "{}", compressed.len());
    let events = stream_in(&masked(0x01, true, RSV1, &compressed), cap);
    let (data, pieces) = joined(&events, cap);
    assert_eq!(pieces, text.len().div_ceil(cap));
    assert_eq!(data, text.as_bytes());
    assert!(matches!(events[0], Event::Fragment { text: true, .. }));

    // The same over three frames, each inflated in pieces too.
    let (a, rest) = compressed.split_at(compressed.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut wire = masked(0x01, false, RSV1, a);
    wire.extend(masked(0x00, false, 0, b));
    wire.extend(masked(0x00, true, 0, c));
    let events = stream_in(&wire, cap);
    let (data, pieces) = joined(&events, cap);
    assert!(pieces >= text.len() / cap, "{pieces}");
    assert_eq!(data, text.as_bytes());
}

#[test]
fn a_streamed_compressed_text_is_still_checked_for_utf8() {
    let mut sender = Deflate::new(
        Role::Client,
        DeflateParams::default(),
        &DeflateConfig::default(),
    );
    let mut bad = "fine ".repeat(100_000).into_bytes();
    bad.extend_from_slice(&[0xff, 0xfe]);
    let compressed = sender.compress(&bad);
    assert!(compressed.len() < 8192, "{}", compressed.len());
    let mut server = streaming_server(8192);
    let mut buf = BytesMut::from(&masked(0x01, true, RSV1, &compressed)[..]);
    let err = loop {
        match server.receive(&mut buf) {
            Err(err) => break err,
            Ok(()) => {
                while server.poll_event().is_some() {}
                assert!(server.wants_receive(&buf), "ended without an error");
            }
        }
    };
    assert_eq!(err, ProtocolError::InvalidUtf8);
}
