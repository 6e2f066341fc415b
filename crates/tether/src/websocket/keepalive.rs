//! Keepalive: a ping after an interval of silence, and a deadline for its pong.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;

use tether_proto::Connection;
use tokio::time::{Instant, Sleep};

use crate::config::Config;

/// Keepalive: a ping `ping_interval` after the last pong (or the start), and a deadline for
/// its pong. One timer serves both: it runs to the next ping, or, while a pong is awaited, to
/// the pong's deadline. Two words, kept in the connection itself: a server with keepalive on
/// holds no allocation for it besides the timer.
pub(super) struct Keepalive {
    pub(super) timer: Pin<Box<Sleep>>,
    /// Pings sent; the latest one's number is its payload.
    pub(super) sent: u32,
    /// Whether the latest ping awaits its pong.
    pub(super) awaiting: bool,
}

impl Keepalive {
    pub(super) fn new(interval: std::time::Duration) -> Self {
        Keepalive {
            timer: Box::pin(tokio::time::sleep(interval)),
            sent: 0,
            awaiting: false,
        }
    }

    /// Sends a ping when one is due. `Err(())` when a pong is overdue.
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut Connection,
        config: &Config,
    ) -> Result<(), ()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            if self.awaiting {
                return Err(());
            }
            let now = Instant::now();
            self.sent = self.sent.wrapping_add(1);
            let payload = u64::from(self.sent).to_be_bytes();
            if conn
                .send_ping(bytes::Bytes::copy_from_slice(&payload))
                .is_ok()
            {
                self.awaiting = true;
                self.timer.as_mut().reset(now + config.ping_timeout);
            } else {
                // Closing: nothing more to prove.
                let interval = config.ping_interval.unwrap_or_default();
                self.timer.as_mut().reset(now + interval);
            }
        }
        Ok(())
    }

    /// A pong: when it answers the latest ping, the peer is alive and the next ping is due
    /// an interval from now.
    pub(super) fn pong(&mut self, payload: &[u8], config: &Config) {
        if self.awaiting && payload == u64::from(self.sent).to_be_bytes() {
            self.awaiting = false;
            let interval = config.ping_interval.unwrap_or_default();
            self.timer.as_mut().reset(Instant::now() + interval);
        }
    }
}
