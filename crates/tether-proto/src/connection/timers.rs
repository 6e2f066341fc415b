//! Time and the end of the transport: keepalive, the close handshake's deadline, and EOF.
//!
//! The connection reads no clock. A driver tells it the time with
//! [`Connection::handle_timeout`] before each wait and whenever the deadline of
//! [`Connection::poll_timeout`] passes; one deadline serves every timer, since at most one
//! runs at a time: the next keepalive ping, then its pong's deadline, and once a Close is
//! queued, the close handshake's.

use std::time::Instant;

use bytes::Bytes;

use super::{Connection, Rx, State};
use crate::close::{CloseCode, CloseFrame};
use crate::frame::OpCode;

/// Keepalive ping payloads: the ping's number, one byte, without an allocation.
static PAYLOADS: [u8; 256] = {
    let mut all = [0; 256];
    let mut i = 0;
    while i < 256 {
        all[i] = i as u8;
        i += 1;
    }
    all
};

/// Which timer the connection's deadline belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// None runs.
    Off,
    /// The next keepalive ping is due at the deadline.
    Ping,
    /// A keepalive ping awaits a pong until the deadline.
    Pong,
    /// The close handshake must end by the deadline.
    Close,
    /// The close handshake's deadline passed: nothing is left to wait for.
    Expired,
}

/// How a connection ended other than by a completed close handshake or a protocol violation
/// of the peer (those are [`Connection::error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Abnormal {
    /// No pong came within the pong timeout of a keepalive ping: a Close with 1011 is queued.
    KeepaliveTimeout,
    /// The close handshake did not end within the close timeout (for a client, this includes
    /// the wait for the server to close the transport).
    CloseTimeout,
    /// The transport ended before the close handshake completed (close code 1006).
    Eof,
}

impl Connection {
    /// When [`Connection::handle_timeout`] must next be called, if a timer runs.
    #[inline]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// Tells the connection the time: runs the timer that is due, and starts the timers
    /// that began since the last call: keepalive on the first call (with
    /// [`Timeouts::ping_interval`](crate::Timeouts::ping_interval) set), and the close
    /// handshake's once a Close is queued (sent, echoed, or after a failure). Call it when
    /// the connection opens, before each wait for the transport, and when the deadline of
    /// [`Connection::poll_timeout`] passes; then write what [`Connection::transmit`] holds.
    ///
    /// - A keepalive ping that is due is queued (its payload numbers it); its pong is awaited
    ///   until the pong timeout.
    /// - A pong overdue fails the connection: a Close with 1011 is queued and
    ///   [`Connection::abnormal`] says [`Abnormal::KeepaliveTimeout`].
    /// - A close handshake overdue ends it: [`Abnormal::CloseTimeout`] (unless the connection
    ///   had already failed), and [`Connection::is_finished`] turns true: close the transport
    ///   without writing more.
    pub fn handle_timeout(&mut self, now: Instant) {
        let timeouts = &self.settings.timeouts;
        if self.state != State::Open {
            if matches!(self.timer, Timer::Off | Timer::Ping | Timer::Pong) {
                // The close handshake started since the last call: its deadline counts from now.
                self.timer = Timer::Close;
                self.deadline = now.checked_add(timeouts.close_timeout);
            }
        } else if self.timer == Timer::Off {
            if let Some(interval) = timeouts.ping_interval {
                // Keepalive starts.
                self.timer = Timer::Ping;
                self.deadline = now.checked_add(interval);
            }
        }
        let Some(deadline) = self.deadline else {
            return;
        };
        if now < deadline {
            return;
        }
        match self.timer {
            Timer::Ping => {
                self.pings = self.pings.wrapping_add(1);
                let n = usize::from(self.pings);
                self.queue_frame(OpCode::Ping, true, Bytes::from_static(&PAYLOADS[n..=n]));
                self.timer = Timer::Pong;
                self.deadline = now.checked_add(self.settings.timeouts.pong_timeout);
            }
            Timer::Pong => {
                self.abnormal = Some(Abnormal::KeepaliveTimeout);
                self.stop_receiving();
                let close = CloseFrame::new(CloseCode::INTERNAL_ERROR, "keepalive timeout");
                self.queue_close(Some(&close));
                self.state = State::Closed;
                self.timer = Timer::Close;
                self.deadline = now.checked_add(self.settings.timeouts.close_timeout);
            }
            Timer::Close => {
                if self.abnormal.is_none() && self.error().is_none() {
                    self.abnormal = Some(Abnormal::CloseTimeout);
                }
                self.stop_receiving();
                self.state = State::Closed;
                self.timer = Timer::Expired;
                self.deadline = None;
            }
            Timer::Off | Timer::Expired => self.deadline = None,
        }
    }

    /// A pong: when it answers the keepalive ping that awaits one, the peer is alive, and the
    /// next ping is due an interval after that ping was sent. Other pongs (unsolicited, or
    /// answering the application's pings) prove nothing about this ping.
    pub(super) fn on_pong(&mut self, payload: &[u8]) {
        if self.timer != Timer::Pong || payload != [self.pings] {
            return;
        }
        let timeouts = &self.settings.timeouts;
        let (pong, interval) = (timeouts.pong_timeout, timeouts.ping_interval);
        self.timer = Timer::Ping;
        self.deadline = self
            .deadline
            .and_then(|d| d.checked_sub(pong))
            .and_then(|sent| sent.checked_add(interval?));
    }

    /// The transport ended (a read returned no bytes, or failed after the close handshake).
    /// Unless the close handshake had completed (both Close frames exchanged), the
    /// connection ends abnormally ([`Abnormal::Eof`], close code 1006): a message being
    /// received is dropped and nothing more can be sent.
    pub fn receive_eof(&mut self) {
        if self.eof {
            return;
        }
        self.eof = true;
        let clean = self.close_received && self.state == State::Closed;
        if !clean {
            if self.abnormal.is_none() && self.error().is_none() {
                self.abnormal = Some(Abnormal::Eof);
            }
            self.stop_receiving();
            self.state = State::Closed;
        }
        if matches!(self.timer, Timer::Ping | Timer::Pong) {
            self.timer = Timer::Off;
            self.deadline = None;
        }
    }

    /// Whether the transport has ended ([`Connection::receive_eof`]).
    pub fn eof_received(&self) -> bool {
        self.eof
    }

    /// How the connection ended, when it ended abnormally: a keepalive or close timeout, or
    /// the transport ending before the close handshake.
    pub fn abnormal(&self) -> Option<Abnormal> {
        self.abnormal
    }

    /// Whether the transport should be closed once [`Connection::transmit`] is written out:
    /// after the close handshake a server closes it (RFC 6455 §7.1.1), and so does either end
    /// of a failed connection or once the transport ended; a client that closed cleanly waits
    /// for the server to close it, up to the close timeout.
    pub fn should_close_transport(&self) -> bool {
        self.state == State::Closed
            && (self.role == super::Role::Server
                || self.eof
                || self.abnormal.is_some()
                || self.error().is_some())
    }

    /// Whether nothing is left to wait for: the close handshake's deadline passed. Close the
    /// transport now, whatever is still queued.
    pub fn is_finished(&self) -> bool {
        self.timer == Timer::Expired
    }

    /// Drops a frame or message being received.
    pub(super) fn stop_receiving(&mut self) {
        if matches!(self.rx, Rx::Frame(_)) {
            self.rx = Rx::Idle;
        }
        self.drop_message();
    }
}
