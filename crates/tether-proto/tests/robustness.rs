//! Robustness properties: whatever bytes arrive, in whatever pieces, the connection and the
//! handshake parsers never panic, fail with the right close code or HTTP status, and carry
//! valid traffic through unchanged.

use std::ops::ControlFlow;

use bytes::{Buf, Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use tether_proto::handshake::client::ClientRequest;
use tether_proto::handshake::server::{Accept, Request};
use tether_proto::mask::apply_mask_bytes;
use tether_proto::{
    CloseCode, CloseFrame, Connection, Event, FrameHeader, Lent, Limits, OpCode, ProtocolError,
    Role, State, Utf8Bytes,
};

/// The close codes a peer's violation may be answered with.
const VIOLATION_CODES: [u16; 3] = [1002, 1007, 1009];

/// The HTTP statuses a handshake request may be refused with.
const REFUSAL_STATUSES: [u16; 5] = [400, 403, 405, 426, 431];

/// The request of RFC 6455 §1.2, with a query.
const REQUEST: &str = concat!(
    "GET /chat?room=a HTTP/1.1\r\n",
    "Host: server.example.com\r\n",
    "Upgrade: websocket\r\n",
    "Connection: keep-alive, Upgrade\r\n",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    "Origin: http://example.com\r\n",
    "Sec-WebSocket-Protocol: chat, superchat\r\n",
    "Sec-WebSocket-Version: 13\r\n\r\n",
);

/// The answer to [`REQUEST`] (and to [`client_request`]).
const RESPONSE: &str = concat!(
    "HTTP/1.1 101 Switching Protocols\r\n",
    "Upgrade: websocket\r\n",
    "Connection: Upgrade\r\n",
    "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n",
    "Sec-WebSocket-Protocol: chat\r\n\r\n",
);

/// A client with a fixed sequence of masking keys, so every case replays exactly.
fn client() -> Connection {
    let mut conn = Connection::new(Role::Client);
    let mut next = 0u32;
    conn.set_mask_source(Box::new(move || {
        next = next.wrapping_add(0x9e37_79b9);
        next.to_be_bytes()
    }));
    conn
}

/// Splits `data` into pieces whose lengths cycle through `sizes` (each at least 1).
fn chunks<'a>(mut data: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    for &size in sizes.iter().cycle() {
        if data.is_empty() {
            break;
        }
        let (head, rest) = data.split_at(size.clamp(1, data.len()));
        out.push(head);
        data = rest;
    }
    out
}

/// Every event a connection produced from a stream, and the error that ended it, if any.
#[derive(Debug, Default)]
struct Outcome {
    events: Vec<Event>,
    error: Option<ProtocolError>,
}

/// How [`feed_as`] receives.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// `receive` and `poll_event` only.
    Plain,
    /// As `Plain`, echoing every data message with `send_text`/`send_binary`.
    Echo,
    /// `receive_lent` first, echoing what it lends with `send_lent`, then `receive` and
    /// `poll_event` for the rest, echoed as in `Echo`.
    Lending,
}

/// Feeds `data` in pieces, parsing after each one as a driver does, and checks the invariants
/// that hold for any input: a failure queues a Close with its code and is sticky, text is
/// UTF-8, control payloads fit 125 bytes, and nothing follows the peer's Close.
fn feed(conn: &mut Connection, data: &[u8], sizes: &[usize]) -> Outcome {
    feed_as(conn, data, sizes, Mode::Plain).0
}

/// Feeds `data` twice, to fresh connections from `make`: once received with events and
/// echoed, once lent (`receive_lent`) and echoed from the loan. Both must see the same
/// messages, fail the same way and write the same bytes; returns the first outcome.
fn feed_lent_alike(make: impl Fn() -> Connection, data: &[u8], sizes: &[usize]) -> Outcome {
    let (plain, plain_wire) = feed_as(&mut make(), data, sizes, Mode::Echo);
    let (lent, lent_wire) = feed_as(&mut make(), data, sizes, Mode::Lending);
    assert_eq!(plain.events, lent.events, "lent messages differ");
    assert_eq!(plain.error, lent.error, "lending fails differently");
    assert_eq!(plain_wire, lent_wire, "echoes of lent messages differ");
    plain
}

/// Echoes a data event as `Mode::Echo` does.
fn echo(conn: &mut Connection, event: &Event) {
    let _ = match event {
        Event::Text(text) => conn.send_text(text.clone()),
        Event::Binary(data) => conn.send_binary(data.clone()),
        _ => Ok(()),
    };
}

/// [`feed`] in the given mode; also returns everything the connection wrote (for `Plain`,
/// only when it failed).
fn feed_as(conn: &mut Connection, data: &[u8], sizes: &[usize], mode: Mode) -> (Outcome, Vec<u8>) {
    let mut buf = BytesMut::new();
    let mut outcome = Outcome::default();
    'read: for chunk in chunks(data, sizes) {
        buf.extend_from_slice(chunk);
        loop {
            let before = (buf.len(), outcome.events.len());
            if mode == Mode::Lending {
                let events = &mut outcome.events;
                let lent = conn.receive_lent(&mut buf, |conn, message| {
                    events.push(match message {
                        Lent::Text(text) => Event::Text(Utf8Bytes::from(text.to_owned())),
                        Lent::Binary(data) => Event::Binary(Bytes::copy_from_slice(data)),
                    });
                    let _ = conn.send_lent(message);
                    ControlFlow::Continue(())
                });
                if let Err(err) = lent {
                    outcome.error = Some(err);
                    break 'read;
                }
            }
            let result = conn.receive(&mut buf);
            while let Some(event) = conn.poll_event() {
                if mode != Mode::Plain {
                    echo(conn, &event);
                }
                outcome.events.push(event);
            }
            if let Err(err) = result {
                outcome.error = Some(err);
                break 'read;
            }
            if !conn.wants_receive(&buf) {
                break;
            }
            // It promised progress: a call that changed nothing would spin a driver forever.
            assert_ne!(
                before,
                (buf.len(), outcome.events.len()),
                "wants_receive is true but receive made no progress"
            );
        }
    }
    check_events(&outcome.events);
    let wire = match &outcome.error {
        Some(err) => check_failure(conn, err),
        None => {
            assert!(conn.error().is_none());
            // `Plain` leaves the output to its caller.
            if mode == Mode::Plain {
                Vec::new()
            } else {
                drain(conn)
            }
        }
    };
    (outcome, wire)
}

fn check_events(events: &[Event]) {
    for (i, event) in events.iter().enumerate() {
        match event {
            Event::Text(text) => assert!(std::str::from_utf8(text.as_bytes()).is_ok()),
            Event::Ping(payload) | Event::Pong(payload) => assert!(payload.len() <= 125),
            Event::Close(_) => assert_eq!(i, events.len() - 1, "events after Close"),
            _ => {}
        }
    }
}

/// Checks a failed connection; returns everything it wrote.
fn check_failure(conn: &mut Connection, err: &ProtocolError) -> Vec<u8> {
    let code = err.close_code();
    assert!(VIOLATION_CODES.contains(&code.0), "{err} maps to {code}");
    assert_eq!(conn.state(), State::Closed);
    assert_eq!(conn.error(), Some(err));
    let wire = drain(conn);
    let (last, payload) = frames(&wire).pop().expect("a Close is queued");
    assert_eq!(last.opcode, OpCode::Close);
    assert_eq!(payload, code.0.to_be_bytes());
    // Sticky: later calls fail the same way and queue nothing more.
    let mut more = BytesMut::from(&b"\x89\x80abcd"[..]);
    assert_eq!(conn.receive(&mut more).as_ref(), Err(err));
    assert!(!conn.wants_receive(&more));
    assert_eq!(conn.poll_event(), None);
    assert!(conn.transmit().is_empty());
    wire
}

/// Everything `conn` queued for the wire.
fn drain(conn: &mut Connection) -> Vec<u8> {
    let out = conn.transmit();
    out.copy_to_bytes(out.remaining()).to_vec()
}

/// Splits a connection's own output into frames, with payloads unmasked.
fn frames(mut wire: &[u8]) -> Vec<(FrameHeader, Vec<u8>)> {
    let mut out = Vec::new();
    while !wire.is_empty() {
        let (header, n) = FrameHeader::parse(wire).unwrap().expect("a whole header");
        let end = n + header.payload_len as usize;
        let mut payload = wire[n..end].to_vec();
        if let Some(key) = header.mask {
            apply_mask_bytes(&mut payload, key);
        }
        out.push((header, payload));
        wire = &wire[end..];
    }
    out
}

/// Something a client sends.
#[derive(Debug, Clone)]
enum Msg {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// One message in fragments cut at the given points (a text cut may split a character),
    /// with a ping after each fragment whose flag is set.
    Fragmented {
        text: bool,
        data: Vec<u8>,
        cuts: Vec<(Index, bool)>,
    },
    Close(u16, String),
}

fn text() -> impl Strategy<Value = String> {
    // Arbitrary characters: 1- to 4-byte UTF-8, sometimes past the 125-byte short length.
    prop_oneof!["(?s).{0,40}", "[a-zé€😀]{100,200}"]
}

fn binary() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        20 => vec(any::<u8>(), 0..300),
        // Past 65535 bytes, for the 64-bit length form.
        1 => (65_530usize..65_560).prop_map(|n| (0..n).map(|i| i as u8).collect()),
    ]
}

fn msg() -> impl Strategy<Value = Msg> {
    let control = vec(any::<u8>(), 0..=125);
    let cuts = vec((any::<Index>(), any::<bool>()), 1..5);
    let text_or_binary = prop_oneof![
        text().prop_map(|t| (true, t.into_bytes())),
        binary().prop_map(|b| (false, b)),
    ];
    let fragmented = (text_or_binary, cuts).prop_map(|((text, data), cuts)| Msg::Fragmented {
        text,
        data,
        cuts,
    });
    prop_oneof![
        3 => text().prop_map(Msg::Text),
        3 => binary().prop_map(Msg::Binary),
        1 => control.clone().prop_map(Msg::Ping),
        1 => control.prop_map(Msg::Pong),
        4 => fragmented,
    ]
}

/// A valid client stream: messages, maybe ending with a Close.
fn msgs() -> impl Strategy<Value = Vec<Msg>> {
    let close = (
        prop::sample::select(vec![1000u16, 1001, 1003, 1011, 3000, 4999]),
        "(?s).{0,20}",
    );
    (vec(msg(), 0..8), prop::option::of(close)).prop_map(|(mut msgs, close)| {
        msgs.extend(close.map(|(code, reason)| Msg::Close(code, reason)));
        msgs
    })
}

/// One frame of a script: the data length it adds (and whether it starts a message), and the
/// event the server delivers once it has the frame.
#[derive(Debug)]
struct Step {
    data: Option<(usize, bool)>,
    event: Option<Event>,
}

/// What a client put on the wire for `msgs`, frame by frame.
fn encode(msgs: &[Msg]) -> (Vec<u8>, Vec<Step>) {
    let mut c = client();
    let mut steps = Vec::new();
    let data = |len, first, event| Step {
        data: Some((len, first)),
        event,
    };
    let control = |event| Step {
        data: None,
        event: Some(event),
    };
    for msg in msgs {
        match msg.clone() {
            Msg::Text(t) => {
                steps.push(data(t.len(), true, Some(Event::Text(t.clone().into()))));
                c.send_text(t.into()).unwrap();
            }
            Msg::Binary(b) => {
                let b = Bytes::from(b);
                steps.push(data(b.len(), true, Some(Event::Binary(b.clone()))));
                c.send_binary(b).unwrap();
            }
            Msg::Ping(p) => {
                steps.push(control(Event::Ping(p.clone().into())));
                c.send_ping(p.into()).unwrap();
            }
            Msg::Pong(p) => {
                steps.push(control(Event::Pong(p.clone().into())));
                c.send_pong(p.into()).unwrap();
            }
            Msg::Fragmented {
                text,
                data: d,
                cuts,
            } => {
                let mut cuts: Vec<_> = cuts
                    .iter()
                    .map(|(i, p)| (i.index(d.len() + 1), *p))
                    .collect();
                cuts.sort();
                let whole = Bytes::from(d);
                let mut start = 0;
                let mut opcode = if text { OpCode::Text } else { OpCode::Binary };
                for (end, ping) in cuts {
                    steps.push(data(end - start, opcode != OpCode::Continuation, None));
                    c.send_fragment(opcode, whole.slice(start..end), false)
                        .unwrap();
                    if ping {
                        steps.push(control(Event::Ping(Bytes::from_static(b"mid"))));
                        c.send_ping(Bytes::from_static(b"mid")).unwrap();
                    }
                    (start, opcode) = (end, OpCode::Continuation);
                }
                let event = if text {
                    Event::Text(Utf8Bytes::try_from_bytes(whole.clone()).unwrap())
                } else {
                    Event::Binary(whole.clone())
                };
                steps.push(data(
                    whole.len() - start,
                    opcode != OpCode::Continuation,
                    Some(event),
                ));
                c.send_fragment(opcode, whole.slice(start..), true).unwrap();
            }
            Msg::Close(code, reason) => {
                let frame = CloseFrame::new(CloseCode(code), reason);
                steps.push(control(Event::Close(Some(frame.clone()))));
                c.send_close(Some(frame)).unwrap();
            }
        }
    }
    (drain(&mut c), steps)
}

/// The events a server with `limits` delivers for `steps`, and whether it then fails with 1009.
fn expected(steps: &[Step], limits: &Limits) -> (Vec<Event>, bool) {
    let mut events = Vec::new();
    let mut message_len = 0;
    for step in steps {
        if let Some((len, first)) = step.data {
            message_len = if first { len } else { message_len + len };
            if len > limits.max_frame_size || message_len > limits.max_message_size {
                return (events, true);
            }
        }
        events.extend(step.event.clone());
    }
    (events, false)
}

/// A byte-level change to a stream.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, bit)| Mutation::Flip(i, bit)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Delete),
    ]
}

fn mutate(data: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        let len = data.len();
        match m {
            Mutation::Insert(i, byte) => data.insert(i.index(len + 1), *byte),
            _ if len == 0 => {}
            Mutation::Flip(i, bit) => data[i.index(len)] ^= 1 << bit,
            Mutation::Delete(i) => {
                data.remove(i.index(len));
            }
        }
    }
}

/// Frames with arbitrary header fields and payloads, each field usually valid (masked as
/// `role`'s peer does), so that streams get past the first header to reach reserved opcodes
/// and bits, wrong masking, fragmented or long control frames, bad UTF-8 and close payloads.
fn loose_frames(role: Role) -> impl Strategy<Value = Vec<u8>> {
    let fin = prop::bool::weighted(0.8);
    let rsv = prop_oneof![19 => Just(0u8), 1 => 0u8..8];
    let opcode = prop_oneof![
        9 => prop::sample::select(vec![0x0u8, 0x1, 0x2, 0x8, 0x9, 0xa]),
        1 => 0u8..16,
    ];
    let masked = if role == Role::Server { 0.95 } else { 0.05 };
    let frame = (
        (fin, rsv, opcode),
        prop::option::weighted(masked, any::<[u8; 4]>()),
        prop_oneof![3 => vec(any::<u8>(), 0..8), 1 => vec(any::<u8>(), 0..200)],
    );
    vec(frame, 0..8).prop_map(|frames| {
        let mut wire = BytesMut::new();
        for ((fin, rsv, opcode), mask, payload) in frames {
            let header = FrameHeader {
                fin,
                rsv,
                opcode: OpCode::from_bits(opcode).unwrap_or(OpCode::Binary),
                mask,
                payload_len: payload.len() as u64,
            };
            let start = wire.len();
            header.encode(&mut wire);
            wire[start] = (wire[start] & 0xf0) | opcode;
            wire.extend_from_slice(&payload);
        }
        wire.to_vec()
    })
}

fn any_stream(role: Role) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![1 => vec(any::<u8>(), 0..400), 2 => loose_frames(role)]
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    vec(prop_oneof![1usize..8, 1usize..4096], 1..8)
}

fn client_request() -> ClientRequest {
    let mut req = ClientRequest::new("server.example.com", "/chat");
    req.key = "dGhlIHNhbXBsZSBub25jZQ==".into();
    req.protocols = vec!["chat".into()];
    req
}

fn check_request_parse(bytes: &[u8], max_len: usize) {
    match Request::parse(bytes, max_len) {
        Ok(Some((_, n))) => assert!(n <= bytes.len() && n <= max_len),
        Ok(None) => assert!(bytes.len() <= max_len),
        Err(err) => {
            let status = err.status();
            assert!(REFUSAL_STATUSES.contains(&status), "{err} maps to {status}");
            let response = err.response();
            assert!(response.starts_with(format!("HTTP/1.1 {status} ").as_bytes()));
        }
    }
}

fn check_response_parse(bytes: &[u8], max_len: usize) {
    match client_request().parse_response(bytes, max_len) {
        Ok(Some((_, n))) => assert!(n <= bytes.len() && n <= max_len),
        Ok(None) => assert!(bytes.len() <= max_len),
        Err(_) => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn any_stream_to_a_server_fails_cleanly(
        data in any_stream(Role::Server),
        sizes in chunk_sizes(),
    ) {
        feed_lent_alike(|| Connection::new(Role::Server), &data, &sizes);
    }

    #[test]
    fn any_stream_to_a_client_fails_cleanly(
        data in any_stream(Role::Client),
        sizes in chunk_sizes(),
    ) {
        feed_lent_alike(client, &data, &sizes);
    }

    #[test]
    fn any_stream_respects_small_limits(
        data in any_stream(Role::Server),
        sizes in chunk_sizes(),
        max_frame in 0usize..64,
        max_message in 0usize..128,
    ) {
        let limits = Limits::default().max_frame_size(max_frame).max_message_size(max_message);
        let server = || Connection::with_limits(Role::Server, limits.clone());
        let outcome = feed_lent_alike(server, &data, &sizes);
        for event in &outcome.events {
            if let Event::Text(t) = event {
                prop_assert!(t.len() <= max_message);
            } else if let Event::Binary(b) = event {
                prop_assert!(b.len() <= max_message);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn valid_stream_round_trips_in_any_pieces(msgs in msgs(), sizes in chunk_sizes()) {
        let (wire, steps) = encode(&msgs);
        let (events, _) = expected(&steps, &Limits::default());
        let mut server = Connection::new(Role::Server);
        let outcome = feed(&mut server, &wire, &sizes);
        prop_assert_eq!(outcome.error, None);
        prop_assert_eq!(&outcome.events, &events);
        // The server answers each ping with a pong, and a Close with the echo of its code.
        let replies: Vec<(OpCode, Vec<u8>)> = events
            .iter()
            .filter_map(|event| match event {
                Event::Ping(p) => Some((OpCode::Pong, p.to_vec())),
                Event::Close(Some(f)) => {
                    Some((OpCode::Close, f.code.0.to_be_bytes().to_vec()))
                }
                _ => None,
            })
            .collect();
        let sent: Vec<_> = frames(&drain(&mut server))
            .into_iter()
            .map(|(h, p)| (h.opcode, p))
            .collect();
        prop_assert_eq!(sent, replies);
    }

    #[test]
    fn mutated_stream_fails_cleanly(
        msgs in msgs(),
        mutations in vec(mutation(), 1..4),
        sizes in chunk_sizes(),
    ) {
        let (mut wire, _) = encode(&msgs);
        mutate(&mut wire, &mutations);
        feed_lent_alike(|| Connection::new(Role::Server), &wire, &sizes);
    }

    #[test]
    fn oversized_message_fails_with_1009_after_the_ones_before(
        msgs in msgs(),
        sizes in chunk_sizes(),
        max_frame in 0usize..200,
        max_message in 0usize..300,
    ) {
        let limits = Limits::default().max_frame_size(max_frame).max_message_size(max_message);
        let (wire, steps) = encode(&msgs);
        let (events, too_big) = expected(&steps, &limits);
        let server = || Connection::with_limits(Role::Server, limits.clone());
        let outcome = feed_lent_alike(server, &wire, &sizes);
        prop_assert_eq!(outcome.events, events);
        let code = outcome.error.map(|e| e.close_code());
        prop_assert_eq!(code, too_big.then_some(CloseCode::MESSAGE_TOO_BIG));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn handshake_parsers_survive_any_bytes(
        bytes in vec(any::<u8>(), 0..600),
        max_len in 0usize..1024,
    ) {
        check_request_parse(&bytes, max_len);
        check_response_parse(&bytes, max_len);
    }

    #[test]
    fn handshake_parsers_survive_mutated_heads(
        mutations in vec(mutation(), 0..6),
        cut in any::<Index>(),
        max_len in prop_oneof![Just(8192usize), 0usize..400],
    ) {
        let mut request = REQUEST.as_bytes().to_vec();
        mutate(&mut request, &mutations);
        check_request_parse(&request[..cut.index(request.len() + 1)], max_len);
        check_request_parse(&request, max_len);
        let mut response = RESPONSE.as_bytes().to_vec();
        mutate(&mut response, &mutations);
        check_response_parse(&response[..cut.index(response.len() + 1)], max_len);
        check_response_parse(&response, max_len);
    }

    #[test]
    fn client_request_is_accepted_and_the_answer_checks_out(
        host in "[a-z0-9.-]{1,20}(:[0-9]{1,5})?",
        target in "/[a-zA-Z0-9/?=&%._~-]{0,40}",
        protocols in vec("[a-z][a-z0-9.-]{0,10}", 0..3),
    ) {
        let mut req = ClientRequest::new(host.clone(), target.clone());
        req.protocols = protocols.clone();
        let head = req.encode().unwrap();
        let (parsed, n) = Request::parse(&head, 8192).unwrap().expect("a whole head");
        prop_assert_eq!(n, head.len());
        prop_assert_eq!(&parsed.target, &target);
        prop_assert_eq!(parsed.host(), Some(host.as_str()));
        let protocol = parsed.select_protocol(&protocols).map(str::to_owned);
        prop_assert_eq!(&protocol, &protocols.first().cloned());
        let answer = parsed.accept(&Accept { protocol: protocol.clone(), ..Accept::default() });
        let (response, n) = req.parse_response(&answer, 8192).unwrap().expect("a whole head");
        prop_assert_eq!(n, answer.len());
        prop_assert_eq!(response.protocol, protocol);
    }
}

#[test]
fn unmutated_heads_are_accepted() {
    let (_, n) = Request::parse(REQUEST.as_bytes(), 8192).unwrap().unwrap();
    assert_eq!(n, REQUEST.len());
    let (_, n) = client_request()
        .parse_response(RESPONSE.as_bytes(), 8192)
        .unwrap()
        .unwrap();
    assert_eq!(n, RESPONSE.len());
}

/// With only part of a header buffered, `receive` cannot progress, so `wants_receive` must
/// say no: a driver that loops on it would otherwise spin forever.
#[test]
fn wants_receive_is_false_for_a_partial_header() {
    let mut server = Connection::new(Role::Server);
    let mut buf = BytesMut::from(&b"\x81"[..]);
    server.receive(&mut buf).unwrap();
    assert_eq!(server.poll_event(), None);
    assert!(!server.wants_receive(&buf));
}
