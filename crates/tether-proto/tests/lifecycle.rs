//! The connection's life with a simulated clock: a client and a server `Connection` joined in
//! memory (a `Pair`), time moved by hand from one deadline to the next. Keepalive, the pong
//! deadline, the close handshake's timeout, a client's wait for the server to close the
//! transport, half-closed peers and the transport ending mid-message, each to the
//! millisecond, without a socket or a sleep.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tether_proto::{
    Abnormal, CloseCode, CloseFrame, Connection, Event, ProtocolError, Role, SendError, Settings,
    State, Timeouts,
};

const SECOND: Duration = Duration::from_secs(1);

/// One end: its connection, the bytes it has received and not yet parsed, what it saw.
struct End {
    conn: Connection,
    inbox: BytesMut,
    events: Vec<Event>,
    /// Whether it reads what arrives (a peer that stopped reading leaves it in the pipe).
    reading: bool,
    /// Whether the transport toward it is closed (it saw the end of the stream).
    eof: bool,
    /// The error `receive` returned, if any.
    error: Option<ProtocolError>,
}

impl End {
    fn new(role: Role, timeouts: Timeouts) -> End {
        let settings = Settings::default().timeouts(timeouts);
        End {
            conn: Connection::with_settings(role, Arc::new(settings)),
            inbox: BytesMut::new(),
            events: Vec::new(),
            reading: true,
            eof: false,
            error: None,
        }
    }

    /// Parses what it has received, as a driver does after a read.
    fn receive(&mut self) {
        if !self.reading || self.error.is_some() {
            return;
        }
        loop {
            if let Err(err) = self.conn.receive(&mut self.inbox) {
                self.error = Some(err);
            }
            self.events
                .extend(std::iter::from_fn(|| self.conn.poll_event()));
            if self.error.is_some() || !self.conn.wants_receive(&self.inbox) {
                return;
            }
        }
    }

    fn pings(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::Ping(_)))
            .count()
    }
}

/// A client and a server joined in memory, and the time.
struct Pair {
    client: End,
    server: End,
    now: Instant,
    start: Instant,
    /// Bytes in flight toward each end: written by the other, not yet taken in.
    to_client: BytesMut,
    to_server: BytesMut,
}

impl Pair {
    fn new(client: Timeouts, server: Timeouts) -> Pair {
        let now = Instant::now();
        let mut pair = Pair {
            client: End::new(Role::Client, client),
            server: End::new(Role::Server, server),
            now,
            start: now,
            to_client: BytesMut::new(),
            to_server: BytesMut::new(),
        };
        // The connections open: their timers start.
        pair.client.conn.handle_timeout(now);
        pair.server.conn.handle_timeout(now);
        pair
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Carries bytes both ways and parses them until nothing moves: what each end queued is
    /// written (a transport that is closed, or whose reader stopped, keeps it), and each
    /// reading end parses what reached it. Each end is told the time before it would wait.
    fn drive(&mut self) {
        loop {
            let mut moved = false;
            moved |= carry(&mut self.client, &mut self.to_server);
            moved |= carry(&mut self.server, &mut self.to_client);
            for (end, pipe) in [
                (&mut self.client, &mut self.to_client),
                (&mut self.server, &mut self.to_server),
            ] {
                if end.reading && !pipe.is_empty() {
                    end.inbox.extend_from_slice(&pipe.split());
                    end.receive();
                    moved = true;
                }
            }
            self.client.conn.handle_timeout(self.now);
            self.server.conn.handle_timeout(self.now);
            if !moved {
                return;
            }
        }
    }

    /// Moves the clock from deadline to deadline (driving the pair at each) up to `until`
    /// after the start.
    fn run_until(&mut self, until: Duration) {
        let until = self.start + until;
        self.drive();
        loop {
            let next = [
                self.client.conn.poll_timeout(),
                self.server.conn.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(next) if next <= until => {
                    self.now = self.now.max(next);
                    self.client.conn.handle_timeout(self.now);
                    self.server.conn.handle_timeout(self.now);
                    self.drive();
                }
                _ => break,
            }
        }
        self.now = until;
        self.drive();
    }

    /// The end of the transport toward `end` (its peer closed it, or a read failed).
    fn eof(end: &mut End) {
        end.eof = true;
        end.receive();
        end.conn.receive_eof();
    }
}

/// Writes what `end` queued into `pipe`, unless its connection is finished. True when bytes
/// moved.
fn carry(end: &mut End, pipe: &mut BytesMut) -> bool {
    let out = end.conn.transmit();
    if out.remaining() == 0 {
        return false;
    }
    let bytes = out.copy_to_bytes(out.remaining());
    pipe.extend_from_slice(&bytes);
    true
}

fn keepalive(interval: u64, pong: u64) -> Timeouts {
    Timeouts::default()
        .ping_interval(Some(Duration::from_secs(interval)))
        .pong_timeout(Duration::from_secs(pong))
}

fn close_code(event: &Event) -> Option<CloseCode> {
    match event {
        Event::Close(Some(frame)) => Some(frame.code),
        _ => None,
    }
}

#[test]
fn a_peer_that_answers_is_pinged_every_interval_and_kept() {
    let mut pair = Pair::new(Timeouts::default(), keepalive(30, 20));
    pair.run_until(615 * SECOND);
    // Pings at 30 s, 60 s, … 600 s, each answered at once.
    assert_eq!(pair.client.pings(), 20);
    let pongs = pair
        .server
        .events
        .iter()
        .filter(|e| matches!(e, Event::Pong(_)));
    assert_eq!(pongs.count(), 20);
    assert_eq!(pair.server.conn.state(), State::Open);
    assert_eq!(pair.server.conn.abnormal(), None);
    // The next ping is due at 630 s.
    assert_eq!(
        pair.server.conn.poll_timeout(),
        Some(pair.start + 630 * SECOND)
    );
}

#[test]
fn a_peer_that_never_answers_fails_with_1011_at_the_pong_deadline() {
    let mut pair = Pair::new(Timeouts::default(), keepalive(30, 20));
    pair.client.reading = false;
    pair.run_until(49 * SECOND);
    assert_eq!(
        pair.server.conn.state(),
        State::Open,
        "still waiting at 49 s"
    );
    pair.run_until(50 * SECOND);
    assert_eq!(
        pair.server.conn.abnormal(),
        Some(Abnormal::KeepaliveTimeout)
    );
    assert_eq!(pair.server.conn.state(), State::Closed);
    assert!(pair.server.conn.should_close_transport());
    // On the wire toward the client: the ping, then a Close with 1011.
    pair.client.reading = true;
    pair.drive();
    assert_eq!(pair.client.pings(), 1);
    let close = pair.client.events.last().and_then(close_code);
    assert_eq!(close, Some(CloseCode::INTERNAL_ERROR));
    assert!(matches!(
        pair.server.conn.send_text("late".into()),
        Err(SendError::Closed)
    ));
}

#[test]
fn only_the_answer_to_the_keepalive_ping_counts() {
    let mut pair = Pair::new(Timeouts::default(), keepalive(10, 5));
    // The client stops answering by itself, but sends unsolicited pongs and answers the
    // server application's own ping.
    pair.client.conn.set_auto_pong(false);
    pair.run_until(10 * SECOND);
    assert_eq!(pair.client.pings(), 1);
    pair.client.conn.send_pong(bytes::Bytes::new()).unwrap();
    pair.server
        .conn
        .send_ping(bytes::Bytes::from_static(b"app"))
        .unwrap();
    pair.drive();
    pair.client
        .conn
        .send_pong(bytes::Bytes::from_static(b"app"))
        .unwrap();
    pair.run_until(15 * SECOND);
    assert_eq!(
        pair.server.conn.abnormal(),
        Some(Abnormal::KeepaliveTimeout)
    );
}

#[test]
fn a_late_pong_keeps_the_peer_and_the_next_ping_counts_from_the_last() {
    let mut pair = Pair::new(Timeouts::default(), keepalive(10, 20));
    pair.client.conn.set_auto_pong(false);
    pair.run_until(15 * SECOND);
    // The ping of 10 s is answered 5 s late.
    let Some(Event::Ping(payload)) = pair.client.events.last().cloned() else {
        panic!("a ping: {:?}", pair.client.events);
    };
    pair.client.conn.send_pong(payload).unwrap();
    pair.drive();
    assert_eq!(pair.server.conn.abnormal(), None);
    assert_eq!(
        pair.server.conn.poll_timeout(),
        Some(pair.start + 20 * SECOND),
        "an interval after the answered ping"
    );
}

#[test]
fn without_keepalive_an_open_connection_has_no_deadline() {
    let mut pair = Pair::new(Timeouts::default(), Timeouts::default());
    pair.run_until(3600 * SECOND);
    assert_eq!(pair.server.conn.poll_timeout(), None);
    assert_eq!(pair.client.conn.poll_timeout(), None);
    assert!(pair.client.events.is_empty() && pair.server.events.is_empty());
}

#[test]
fn a_clean_close_takes_no_time_and_the_server_closes_the_transport() {
    let mut pair = Pair::new(keepalive(30, 20), keepalive(30, 20));
    pair.run_until(5 * SECOND);
    let bye = CloseFrame::new(CloseCode::NORMAL, "bye");
    pair.client.conn.send_close(Some(bye)).unwrap();
    pair.drive();
    assert_eq!(
        pair.server.events.last().and_then(close_code),
        Some(CloseCode::NORMAL)
    );
    assert_eq!(
        pair.client.events.last().and_then(close_code),
        Some(CloseCode::NORMAL),
        "the echo"
    );
    // Both Closes are exchanged: the server closes TCP; the client waits for it.
    assert!(pair.server.conn.should_close_transport());
    assert!(!pair.client.conn.should_close_transport());
    // Keepalive stopped: the only deadlines left are the close handshake's.
    assert_eq!(
        pair.client.conn.poll_timeout(),
        Some(pair.start + 10 * SECOND)
    );
    Pair::eof(&mut pair.client);
    assert!(pair.client.conn.should_close_transport());
    assert_eq!(pair.client.conn.abnormal(), None);
    assert_eq!(pair.server.conn.abnormal(), None);
    assert_eq!(pair.elapsed(), 5 * SECOND);
}

#[test]
fn a_client_waits_for_the_server_to_close_the_transport_at_most_the_close_timeout() {
    let mut pair = Pair::new(Timeouts::default(), Timeouts::default());
    pair.client.conn.send_close(None).unwrap();
    pair.drive();
    assert_eq!(pair.client.conn.state(), State::Closed);
    // The server never closes TCP.
    pair.run_until(4999 * Duration::from_millis(1));
    assert!(!pair.client.conn.is_finished());
    pair.run_until(5 * SECOND);
    assert!(pair.client.conn.is_finished());
    assert!(pair.client.conn.should_close_transport());
    assert_eq!(pair.client.conn.abnormal(), Some(Abnormal::CloseTimeout));
    assert_eq!(
        pair.client.conn.poll_timeout(),
        None,
        "nothing left to wait for"
    );
}

#[test]
fn a_close_the_peer_never_answers_ends_at_the_close_timeout() {
    let timeouts = Timeouts::default().close_timeout(3 * SECOND);
    let mut pair = Pair::new(Timeouts::default(), timeouts);
    pair.client.reading = false;
    pair.run_until(SECOND);
    pair.server.conn.send_close(None).unwrap();
    pair.run_until(3999 * Duration::from_millis(1));
    assert_eq!(pair.server.conn.state(), State::Closing);
    assert!(!pair.server.conn.is_finished());
    pair.run_until(4 * SECOND);
    assert!(pair.server.conn.is_finished());
    assert_eq!(pair.server.conn.abnormal(), Some(Abnormal::CloseTimeout));
    assert_eq!(pair.server.conn.state(), State::Closed);
}

#[test]
fn a_failed_connection_has_the_close_timeout_to_write_its_close() {
    let mut pair = Pair::new(Timeouts::default(), Timeouts::default());
    // An unmasked frame from the "client": the server fails with 1002.
    pair.server.inbox.extend_from_slice(&[0x81, 0x00]);
    pair.server.receive();
    assert!(matches!(
        pair.server.error,
        Some(ProtocolError::UnmaskedFrame)
    ));
    assert!(pair.server.conn.should_close_transport());
    pair.server.conn.handle_timeout(pair.now);
    assert_eq!(
        pair.server.conn.poll_timeout(),
        Some(pair.start + 5 * SECOND)
    );
    pair.client.reading = false;
    pair.run_until(5 * SECOND);
    assert!(pair.server.conn.is_finished());
    // The protocol error, not the timeout, is why it ended.
    assert_eq!(pair.server.conn.abnormal(), None);
}

#[test]
fn a_peer_that_closes_the_transport_without_a_close_is_an_abnormal_end() {
    let mut pair = Pair::new(Timeouts::default(), keepalive(30, 20));
    pair.run_until(10 * SECOND);
    // The client's side of TCP is gone (half-closed toward the server).
    Pair::eof(&mut pair.server);
    assert_eq!(pair.server.conn.abnormal(), Some(Abnormal::Eof));
    assert_eq!(pair.server.conn.state(), State::Closed);
    assert!(pair.server.conn.should_close_transport());
    assert!(matches!(
        pair.server.conn.send_text("anyone?".into()),
        Err(SendError::Closed)
    ));
    // No keepalive toward a transport that ended.
    pair.run_until(100 * SECOND);
    assert_eq!(pair.client.pings(), 0);
}

#[test]
fn a_peer_that_closes_after_our_close_but_before_its_own_is_an_abnormal_end() {
    let mut pair = Pair::new(Timeouts::default(), Timeouts::default());
    pair.client.reading = false;
    pair.server.conn.send_close(None).unwrap();
    pair.drive();
    assert_eq!(pair.server.conn.state(), State::Closing);
    Pair::eof(&mut pair.server);
    assert_eq!(pair.server.conn.abnormal(), Some(Abnormal::Eof));
}

#[test]
fn the_transport_ending_mid_message_drops_the_message() {
    let mut pair = Pair::new(Timeouts::default(), Timeouts::default());
    // Half a fragmented message, then the first bytes of its next frame.
    let mut client = Connection::new(Role::Client);
    client
        .send_fragment(tether_proto::OpCode::Text, "first ".into(), false)
        .unwrap();
    client
        .send_fragment(
            tether_proto::OpCode::Continuation,
            "and second".into(),
            true,
        )
        .unwrap();
    let out = client.transmit();
    let wire = out.copy_to_bytes(out.remaining());
    pair.server.inbox.extend_from_slice(&wire[..wire.len() - 4]);
    pair.server.receive();
    assert!(pair.server.events.is_empty());
    Pair::eof(&mut pair.server);
    assert_eq!(pair.server.conn.abnormal(), Some(Abnormal::Eof));
    assert!(pair.server.events.is_empty(), "{:?}", pair.server.events);
    assert!(pair.server.error.is_none(), "{:?}", pair.server.error);
    // What was left of the frame is passed over, not parsed as a new one.
    assert!(!pair.server.conn.wants_receive(&pair.server.inbox));
}

#[test]
fn after_a_clean_close_the_end_of_the_transport_is_not_abnormal() {
    let mut pair = Pair::new(Timeouts::default(), Timeouts::default());
    pair.server.conn.send_close(None).unwrap();
    pair.drive();
    assert_eq!(pair.server.conn.state(), State::Closed);
    Pair::eof(&mut pair.server);
    assert_eq!(pair.server.conn.abnormal(), None);
    assert!(pair.server.conn.eof_received());
}
