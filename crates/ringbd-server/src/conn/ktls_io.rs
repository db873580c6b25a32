//! Moving a connection's TLS session from rustls to the kernel (kTLS), and
//! what the kernel then reports that is not application data. A child
//! module of `conn`, so it works on the connection's own fields.
//!
//! **When.** The keys can leave rustls only at a record boundary on both
//! sides, with nothing buffered anywhere in userspace:
//!
//! - everything rustls wrote (handshake flight, NewSessionTickets, replies)
//!   is on the wire: no unsent records, and the engine has no send in
//!   flight, because once `TLS_TX` is set whatever is written to the socket
//!   gets encrypted again;
//! - everything the engine received was given to rustls, rustls was given
//!   whole records only (a [`RecordFramer`](crate::ktls) follows the
//!   record headers), and their plaintext was taken by the NBD state
//!   machine. Bytes still in the socket are fine: `TLS_RX` makes the
//!   kernel parse them from where userspace stopped.
//!
//! The client may send records right after its Finished (libnbd sends its
//! first option at once), and an io_uring multishot receive copies bytes
//! out of the socket as they arrive. So the io_uring engine stops its
//! receive first and switches only after the receive's last completion,
//! if the connection is still idle then; bytes that completion brought go
//! through rustls as before and the switch waits for the next pause (the
//! option phase is request/reply, so one comes at once). After
//! `MAX_TRIES` receives stopped in vain the session stays in userspace.
//! The threaded engine reads only on demand, so idle is enough there.

use std::io;
use std::os::fd::BorrowedFd;

use crate::tls::ktls_sys::{content_type, Version};

use super::{Connection, Phase};
use crate::tls::ktls::{crypto_info, kernel_suite, version_name, KtlsKeys, KtlsStats};
use crate::tls::{ServerSession, TlsLayer};

/// Receives stopped for the switch before giving up on kTLS.
pub const MAX_TRIES: u8 = 8;

/// Where a connection stands with kTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KtlsState {
    /// Not for this connection: no TLS, `--no-ktls`, or a Unix socket.
    Off,
    /// To be moved once the session is idle; `tries`: receives stopped.
    Want { tries: u8 },
    /// The kernel has both directions.
    On { close_notify_sent: bool },
    /// Stays in userspace (counted as a fallback).
    Userspace,
    /// The keys left rustls but the kernel refused them: closed.
    Failed,
}

impl Connection {
    /// The engine serves this connection over TCP: its TLS session, if any,
    /// may move to the kernel (unless `--no-ktls`).
    pub fn allow_ktls(&mut self) {
        if self.tls_server.as_ref().is_some_and(|s| s.ktls.is_some()) {
            self.ktls = KtlsState::Want { tries: 0 };
        }
    }

    /// Whether the kernel encrypts and decrypts this connection's records:
    /// `out` holds plaintext for the socket, and received bytes are
    /// plaintext.
    pub fn is_ktls(&self) -> bool {
        matches!(self.ktls, KtlsState::On { .. })
    }

    /// Whether the TLS session could leave rustls now, as far as the
    /// connection knows: established, every record rustls was given is
    /// complete and taken, nothing is left to encrypt or to send. The
    /// engine must also have no send in flight and no received bytes it
    /// did not hand over.
    pub fn ktls_idle(&self) -> bool {
        let Some(t) = &self.tls else { return false };
        t.established
            && !t.closing
            && !self.is_closed()
            && t.plain.is_empty()
            && t.held == 0
            && t.framer.at_boundary()
            && !t.session.wants_write()
            && t.wire.is_empty()
            && self.out.is_empty()
    }

    /// Whether the engine should switch this connection to kTLS now
    /// ([`Connection::enable_ktls`]), once it has nothing in flight.
    pub fn ktls_ready(&self) -> bool {
        matches!(self.ktls, KtlsState::Want { .. }) && self.ktls_idle()
    }

    /// The engine stops its receive to switch (see the module docs); false
    /// when it has done so `MAX_TRIES` (8) times already and should not
    /// again (the session stays in userspace).
    pub fn ktls_stop_receive(&mut self) -> bool {
        if let KtlsState::Want { tries } = &mut self.ktls {
            *tries += 1;
            if *tries <= MAX_TRIES {
                return true;
            }
            self.ktls_fallback("the client never paused between records");
        }
        false
    }

    /// Called once when the TLS handshake completes: a session the kernel
    /// cannot take stays in userspace from the start.
    pub(super) fn tls_established(&mut self, t: &TlsLayer) {
        let Some(server) = self.tls_server.clone() else { return };
        KtlsStats::bump(&server.stats.sessions);
        let Some(k) = &server.ktls else { return };
        if !matches!(self.ktls, KtlsState::Want { .. }) {
            return;
        }
        if let Some(why) = &k.probe.unavailable {
            return self.ktls_fallback(&format!("kTLS unavailable: {why}"));
        }
        let ServerSession::X509(session) = &t.session else {
            // OpenSSL's PSK sessions stay in userspace.
            return self.ktls_fallback("a PSK session (OpenSSL) stays in userspace");
        };
        match kernel_suite(session) {
            Some((v, c)) if k.probe.supports(v, c) => {}
            Some((v, c)) => self.ktls_fallback(&format!("the kernel lacks {} {}", version_name(v), c.name())),
            None => self.ktls_fallback("a cipher suite the kernel does not have"),
        }
    }

    fn ktls_fallback(&mut self, why: &str) {
        tracing::debug!("{}: TLS stays in userspace: {why}", self.peer);
        self.ktls = KtlsState::Userspace;
        if let Some(s) = &self.tls_server {
            KtlsStats::bump(&s.stats.fallbacks);
        }
    }

    fn ktls_failed(&mut self, why: &str) {
        tracing::warn!("{}: kTLS: {why}; closing the connection", self.peer);
        self.ktls = KtlsState::Failed;
        self.phase = Phase::Closed;
        if let Some(s) = &self.tls_server {
            KtlsStats::bump(&s.stats.failed);
        }
    }

    /// Takes the session's keys out of rustls, which is dropped: from here
    /// on the socket must be kTLS or closed. For [`Connection::enable_ktls`]
    /// (and tests, which check the keys against rustls' records).
    pub fn extract_ktls_keys(&mut self) -> Result<KtlsKeys, String> {
        let t = self.tls.take().ok_or("no TLS session")?;
        let ServerSession::X509(session) = t.session else {
            return Err("a PSK session has no keys for the kernel".into());
        };
        let (version, cipher) = kernel_suite(&session).ok_or("a cipher suite the kernel does not have")?;
        let secrets = session.dangerous_extract_secrets().map_err(|e| format!("extracting the keys: {e}"))?;
        let (tx_seq, rx_seq) = (secrets.tx.0, secrets.rx.0);
        let tx = crypto_info(version, secrets.tx).map_err(|e| e.to_string())?;
        let rx = crypto_info(version, secrets.rx).map_err(|e| e.to_string())?;
        Ok(KtlsKeys { version, cipher, tx, rx, tx_seq, rx_seq })
    }

    /// Moves the TLS session to the kernel on `fd` (call when
    /// [`Connection::ktls_ready`] and nothing is in flight). True when the
    /// kernel has it; false when it stays in userspace (no `tls` module:
    /// nothing changed) or the connection closed (the kernel refused keys
    /// that had already left rustls).
    pub fn enable_ktls(&mut self, fd: BorrowedFd<'_>) -> bool {
        if !self.ktls_ready() {
            return false;
        }
        // Attaching the ULP alone leaves the data path as it was, so a
        // failure here keeps userspace TLS.
        if let Err(e) = crate::tls::ktls_sys::attach_ulp(fd) {
            self.ktls_fallback(&format!("setsockopt(TCP_ULP, \"tls\"): {e}"));
            return false;
        }
        let keys = match self.extract_ktls_keys() {
            Ok(k) => k,
            Err(e) => {
                self.ktls_failed(&e);
                return false;
            }
        };
        if let Err(e) = crate::tls::ktls_sys::set_tx(fd, &keys.tx) {
            self.ktls_failed(&format!("setsockopt(TLS_TX): {e}"));
            return false;
        }
        if let Err(e) = crate::tls::ktls_sys::set_rx(fd, &keys.rx) {
            self.ktls_failed(&format!("setsockopt(TLS_RX): {e}"));
            return false;
        }
        if keys.version == Version::Tls13 {
            if let Err(e) = crate::tls::ktls_sys::set_rx_expect_no_pad(fd) {
                tracing::debug!("{}: TLS_RX_EXPECT_NO_PAD: {e} (an optimization only)", self.peer);
            }
        }
        self.ktls = KtlsState::On { close_notify_sent: false };
        if let Some(s) = &self.tls_server {
            KtlsStats::bump(&s.stats.ktls);
        }
        tracing::debug!(
            "{}: kTLS on: {} {}, next records tx {} rx {}",
            self.peer,
            version_name(keys.version),
            keys.cipher.name(),
            keys.tx_seq,
            keys.rx_seq
        );
        true
    }

    /// A read on a kTLS socket failed with `e`: reads the record that is not
    /// application data when that is the reason, and closes the
    /// connection. Returns true for a clean close (the client's
    /// close_notify, like end of stream: queued replies still go out),
    /// false for anything else (drop what is queued).
    pub fn ktls_recv_error(&mut self, fd: BorrowedFd<'_>, e: &io::Error) -> bool {
        let clean = if crate::tls::ktls_sys::is_control_record(e) {
            self.ktls_control_record(fd)
        } else {
            let what = if crate::tls::ktls_sys::is_bad_record(e) {
                Some("a record failed authentication or is malformed")
            } else if crate::tls::ktls_sys::is_key_expired(e) {
                Some("the client updated its keys")
            } else {
                None
            };
            match what {
                Some(what) => {
                    tracing::warn!("{}: kTLS: {what} ({e}); closing the connection", self.peer)
                }
                // A reset or the like: as quiet as without kTLS.
                None => tracing::debug!("{}: receive: {e}", self.peer),
            }
            false
        };
        if clean {
            self.peer_closed();
        } else {
            self.phase = Phase::Closed;
        }
        clean
    }

    /// Reads the pending non-data record; true if it is close_notify.
    fn ktls_control_record(&mut self, fd: BorrowedFd<'_>) -> bool {
        let mut buf = vec![0u8; 16 * 1024 + 256];
        let (kind, n) = match crate::tls::ktls_sys::recv_record(fd, &mut buf) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("{}: kTLS: reading a non-data record: {e}", self.peer);
                return false;
            }
        };
        let body = buf.get(..n).unwrap_or_default();
        match (kind, body) {
            (content_type::ALERT, [_, 0, ..]) => {
                tracing::debug!("{}: the client sent close_notify", self.peer);
                return true;
            }
            (content_type::ALERT, [level, desc, ..]) => tracing::warn!(
                "{}: TLS alert from the client (level {level}, description {desc}); closing the connection",
                self.peer
            ),
            // RFC 8446 4.6.3; rekeying needs the traffic secret, which
            // rustls' buffered API does not hand out.
            (content_type::HANDSHAKE, [24, ..]) => tracing::warn!(
                "{}: TLS 1.3 KeyUpdate from the client: key updates are not supported with kTLS; \
                 closing the connection (use --no-ktls for clients that update keys)",
                self.peer
            ),
            (content_type::HANDSHAKE, [t, ..]) => tracing::warn!(
                "{}: TLS handshake message type {t} after the handshake (kTLS); closing the connection",
                self.peer
            ),
            (t, _) => tracing::warn!(
                "{}: kTLS: unexpected record (type {t}, {n} bytes); closing the connection",
                self.peer
            ),
        }
        false
    }

    /// Before the engine shuts a kTLS socket down: sends close_notify once
    /// (non-blocking; a full send buffer only loses the alert).
    pub fn ktls_close_notify(&mut self, fd: BorrowedFd<'_>) {
        if let KtlsState::On { close_notify_sent: sent @ false } = &mut self.ktls {
            *sent = true;
            if let Err(e) = crate::tls::ktls_sys::send_close_notify(fd) {
                tracing::debug!("{}: close_notify: {e}", self.peer);
            }
        }
    }
}
