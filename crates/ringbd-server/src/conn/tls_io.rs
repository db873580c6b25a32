//! The TLS half of [`Connection`]: starting TLS after the STARTTLS ACK,
//! ciphertext in (with the `held` rule for backpressure), and sealing a loop
//! turn's plaintext replies into records. A child module of `conn`, so it
//! works on the connection's own fields.

use super::{Connection, Phase};
use crate::tls::TlsLayer;

impl Connection {
    /// Switches to TLS after the plaintext STARTTLS ACK (queued in `out`,
    /// which becomes the start of the wire queue). False if it cannot.
    pub(super) fn begin_tls(&mut self) -> bool {
        let session = match self.tls_server.as_ref().map(|s| s.session()) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                tracing::warn!("{}: cannot start TLS: {e}", self.peer);
                self.phase = Phase::Closed;
                return false;
            }
            None => {
                self.phase = Phase::Closed;
                return false;
            }
        };
        let wire = std::mem::take(&mut self.out);
        self.tls = Some(Box::new(TlsLayer::new(session, wire)));
        tracing::debug!("{}: STARTTLS", self.peer);
        true
    }

    /// Ciphertext in: decrypt and feed the NBD state machine. Bytes whose
    /// plaintext the state machine could not take yet (backpressure) are
    /// reported unconsumed and remembered in `held`, so the engine offers
    /// them again once there is room and only what follows is new.
    pub(super) fn receive_tls(&mut self, t: &mut TlsLayer, data: &[u8]) -> usize {
        let mut used = 0;
        if !t.plain.is_empty() {
            self.feed_plain(t);
            if !t.plain.is_empty() && !self.is_closed() {
                return 0;
            }
            used = t.held.min(data.len());
        }
        t.held = 0;
        let limit = self.queue_limit();
        while used < data.len() && !self.is_closed() && self.wants_input() && room(t, self.reply_limit, limit)
        {
            let n = match t.session.read_tls(&data[used..], &mut t.plain) {
                Ok(n) => n,
                Err(e) => {
                    // An alert may be queued; seal sends it.
                    self.tls_failed(&e);
                    return data.len();
                }
            };
            t.framer.advance(&data[used..used + n]);
            if !t.established && !t.session.is_handshaking() {
                t.established = true;
                tracing::debug!("{}: TLS established: {}", self.peer, t.session.describe());
                self.tls_established(t);
            }
            self.feed_plain(t);
            if !t.plain.is_empty() && !self.is_closed() {
                t.held = n;
                break;
            }
            used += n;
        }
        used
    }

    /// Hands decrypted bytes to the NBD state machine, then encrypts what it
    /// queued.
    fn feed_plain(&mut self, t: &mut TlsLayer) {
        let n = self.receive_plain(&t.plain);
        t.plain.drain(..n);
        if self.start_tls {
            // Only possible before TLS; the handshake refuses a second one.
            self.start_tls = false;
            self.phase = Phase::Closed;
        }
        self.seal_into(t);
    }

    fn tls_failed(&mut self, why: &str) {
        tracing::warn!("{}: TLS: {why}", self.peer);
        self.phase = Phase::Closed;
    }

    /// Encrypts the queued replies, if TLS runs.
    pub(super) fn seal(&mut self) {
        if let Some(mut t) = self.tls.take() {
            self.seal_into(&mut t);
            self.tls = Some(t);
        }
    }

    /// Writes every queued plaintext reply through the TLS session at once
    /// (full records, not one or two per reply), then moves the records and
    /// any handshake messages or alert to the wire.
    pub(super) fn seal_into(&mut self, t: &mut TlsLayer) {
        if !self.out.is_empty() {
            if let Err(e) = t.session.write_plain(&self.out, t.wire.bytes()) {
                tracing::warn!("{}: TLS: {e}", self.peer);
                self.phase = Phase::Closed;
            }
            t.wire.add_replies(self.out.replies());
            self.out.clear(&mut self.pool);
        }
        if self.is_closed() && !t.closing {
            t.closing = true;
            t.session.send_close_notify();
        }
        t.session.write_tls(t.wire.bytes());
    }
}

/// Whether the wire queue has room for more records.
fn room(t: &TlsLayer, reply_limit: u32, limit: usize) -> bool {
    t.wire.len() < limit && t.wire.replies() < reply_limit
}
