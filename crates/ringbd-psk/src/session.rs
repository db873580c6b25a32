//! TLS-PSK sessions with OpenSSL, driven from memory buffers.
//!
//! OpenSSL reads and writes through `MemIo`, two byte queues: the caller
//! puts the ciphertext it received in with [`PskSession::read_tls`], runs
//! the protocol with [`PskSession::process`] (handshake messages, decrypted
//! plaintext), writes plaintext with [`PskSession::write`] and
//! [`PskSession::flush`], and takes the records to send with
//! [`PskSession::write_tls`]. Nothing here touches a socket, so the same
//! session serves any engine, and a client and a server session can be
//! driven against each other in a test.
//!
//! Plaintext is staged and sealed in full 16 KiB records (OpenSSL writes one
//! record per `SSL_write` call otherwise): the replies of a loop turn share
//! records, the effect of `gnutls_record_cork`.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::Arc;

use openssl::error::ErrorStack;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslSessionCacheMode, SslStream,
    SslVersion,
};

use crate::keys::{Key, PskKeys};

/// The most plaintext one TLS record carries.
pub const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;
/// Ciphertext taken per [`PskSession::read_tls`] call: a whole largest
/// record (header, 16 KiB, padding and tag), so that what one call yields
/// in plaintext stays bounded as with rustls.
pub const READ_CHUNK: usize = 5 + MAX_RECORD_PLAINTEXT + 256;

/// The TLS 1.2 suite: PSK with an ephemeral ECDH exchange (forward
/// secrecy) and an AEAD. Of what GnuTLS 3.7's `+ECDHE-PSK:+DHE-PSK:+PSK`
/// (libnbd, qemu, nbdkit) offers, the only such suite OpenSSL serves
/// without DH parameters: the ECDHE-PSK AES suites GnuTLS offers are CBC
/// with SHA-1, and DHE-PSK needs DH parameters (docs/tls.md).
const TLS12_CIPHERS: &str = "ECDHE-PSK-CHACHA20-POLY1305";
/// TLS 1.3 suites: a PSK from the compatibility callbacks has SHA-256 as
/// its hash, so only the SHA-256 suites can use it. The server's order
/// decides: AES-128-GCM (AES-NI) before ChaCha20 (GnuTLS lists
/// AES-256-GCM, then ChaCha20, then AES-128-GCM).
const TLS13_SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

/// Something went wrong in OpenSSL or in the TLS session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PskError(pub String);

impl fmt::Display for PskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PskError {}

impl From<ErrorStack> for PskError {
    fn from(e: ErrorStack) -> Self {
        PskError(format!("OpenSSL: {e}"))
    }
}

/// The identity a client offered (server side), and whether the server has
/// a key for it. OpenSSL's own `SSL_get_psk_identity` stays empty for TLS
/// 1.3 PSKs found through the compatibility callback.
struct Identity {
    name: Vec<u8>,
    known: bool,
}

/// The transport OpenSSL sees: the ciphertext received and not yet read,
/// and the records written and not yet taken.
#[derive(Default)]
struct MemIo {
    input: Vec<u8>,
    pos: usize,
    output: Vec<u8>,
}

impl Read for MemIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = &self.input[self.pos..];
        if avail.is_empty() {
            // Not EOF (0 would be): OpenSSL answers WANT_READ.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.pos += n;
        if self.pos == self.input.len() {
            self.input.clear();
            self.pos = 0;
        }
        Ok(n)
    }
}

impl Write for MemIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Settings both sides share: TLS 1.2 or 1.3, forward-secret PSK suites
/// for 1.2, SHA-256 suites for 1.3, no session tickets or cache (every connection does a full PSK
/// handshake; there is nothing to resume).
fn builder(method: SslMethod) -> Result<SslContextBuilder, PskError> {
    let mut b = SslContextBuilder::new(method)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    b.set_cipher_list(TLS12_CIPHERS)?;
    b.set_ciphersuites(TLS13_SUITES)?;
    b.set_options(SslOptions::NO_TICKET | SslOptions::CIPHER_SERVER_PREFERENCE);
    b.set_num_tickets(0)?;
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    Ok(b)
}

/// A server's PSK credentials, shared by its sessions.
pub struct PskServerConfig {
    ctx: SslContext,
    identity: openssl::ex_data::Index<Ssl, Identity>,
}

impl PskServerConfig {
    /// Accepts the clients whose username and key are in `keys`.
    ///
    /// OpenSSL asks the callback for the key of the identity the client
    /// sent: for TLS 1.2 PSK suites, and for TLS 1.3 external PSKs through
    /// its compatibility path (SHA-256 as the PSK hash, which is what
    /// GnuTLS uses for external PSKs). No identity hint is sent, as with
    /// nbdkit and qemu: their clients pick the username themselves.
    pub fn new(keys: Arc<PskKeys>) -> Result<Self, PskError> {
        let mut b = builder(SslMethod::tls_server())?;
        let identity = Ssl::new_ex_index::<Identity>()?;
        let ids = identity;
        b.set_psk_server_callback(move |ssl, identity, psk| {
            let name = identity.unwrap_or_default().to_vec();
            match keys.get(&name) {
                Some(key) if key.bytes().len() <= psk.len() => {
                    psk[..key.bytes().len()].copy_from_slice(key.bytes());
                    ssl.set_ex_data(ids, Identity { name, known: true });
                    Ok(key.bytes().len())
                }
                _ => {
                    // 0: no key; the handshake fails, and the session's
                    // error names the username.
                    ssl.set_ex_data(ids, Identity { name, known: false });
                    Ok(0)
                }
            }
        });
        Ok(PskServerConfig { ctx: b.build(), identity })
    }

    /// A session for one connection; the client speaks first.
    pub fn session(&self) -> Result<PskSession, PskError> {
        let mut ssl = Ssl::new(&self.ctx)?;
        ssl.set_accept_state();
        PskSession::new(ssl, Side::Server(self.identity))
    }
}

/// A client's PSK credentials: one username and its key.
pub struct PskClientConfig {
    ctx: SslContext,
    username: String,
}

impl PskClientConfig {
    pub fn new(username: &str, key: &[u8]) -> Result<Self, PskError> {
        let mut b = builder(SslMethod::tls_client())?;
        let key = Key::new(key.to_vec());
        let identity = username.as_bytes().to_vec();
        let username = username.to_string();
        b.set_psk_client_callback(move |_ssl, _hint, id, psk| {
            // The identity is written as a C string.
            if identity.len() >= id.len() || key.bytes().len() > psk.len() {
                return Ok(0);
            }
            id[..identity.len()].copy_from_slice(&identity);
            id[identity.len()] = 0;
            psk[..key.bytes().len()].copy_from_slice(key.bytes());
            Ok(key.bytes().len())
        });
        Ok(PskClientConfig { ctx: b.build(), username })
    }

    /// A session for one connection. Its first [`PskSession::process`]
    /// queues the ClientHello.
    pub fn session(&self) -> Result<PskSession, PskError> {
        let mut ssl = Ssl::new(&self.ctx)?;
        ssl.set_connect_state();
        PskSession::new(ssl, Side::Client(self.username.clone()))
    }
}

/// Which end of the connection a session is, with what its messages name.
enum Side {
    /// Where the client's identity is kept (see [`Identity`]).
    Server(openssl::ex_data::Index<Ssl, Identity>),
    /// The username this client offers.
    Client(String),
}

/// One TLS-PSK connection, server or client side, over memory buffers.
pub struct PskSession {
    stream: SslStream<MemIo>,
    /// Plaintext written and not yet sealed into a record.
    staged: Vec<u8>,
    /// Where records are decrypted to, one at a time.
    scratch: Vec<u8>,
    side: Side,
    peer_closed: bool,
    failed: bool,
}

impl PskSession {
    fn new(ssl: Ssl, side: Side) -> Result<Self, PskError> {
        Ok(PskSession {
            stream: SslStream::new(ssl, MemIo::default())?,
            staged: Vec::new(),
            scratch: Vec::new(),
            side,
            peer_closed: false,
            failed: false,
        })
    }

    /// Takes ciphertext the peer sent (up to [`READ_CHUNK`] bytes of `data`);
    /// returns how much. Call [`PskSession::process`] next.
    pub fn read_tls(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(READ_CHUNK);
        self.stream.get_mut().input.extend_from_slice(&data[..n]);
        n
    }

    /// Runs the protocol on the ciphertext taken so far: handshake
    /// messages (answers go to the outgoing records), then application
    /// data, appended to `plain`. Plaintext written during the handshake
    /// is sealed once it completes. An error is final: the session queued
    /// an alert where it could, and the connection should be closed.
    pub fn process(&mut self, plain: &mut Vec<u8>) -> Result<(), PskError> {
        if self.failed {
            return Err(PskError("TLS session already failed".into()));
        }
        while !self.peer_closed {
            if self.scratch.is_empty() {
                self.scratch = vec![0; MAX_RECORD_PLAINTEXT];
            }
            match self.stream.ssl_read(&mut self.scratch) {
                Ok(n) => plain.extend_from_slice(&self.scratch[..n.min(self.scratch.len())]),
                Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => break,
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => self.peer_closed = true,
                Err(e) => return Err(self.fail(&e)),
            }
        }
        if !self.is_handshaking() {
            self.seal_staged()?;
        }
        Ok(())
    }

    fn fail(&mut self, e: &openssl::ssl::Error) -> PskError {
        self.failed = true;
        if let Side::Client(name) = &self.side {
            // An alert does not say which it was: OpenSSL servers send
            // illegal_parameter for a binder that does not verify (a
            // wrong key) and handshake_failure for a username they have
            // no key for.
            let what = match (self.is_handshaking(), alert_received(e)) {
                (true, true) => format!(
                    "the server refused the TLS-PSK handshake as username {name:?} \
                     (a wrong key, or a username it has no key for?)"
                ),
                (true, false) => format!("TLS-PSK handshake as username {name:?} failed"),
                (false, _) => "TLS-PSK session failed".to_string(),
            };
            return PskError(format!("{what}: {e}"));
        }
        let id = self.identity().map(|id| (String::from_utf8_lossy(&id.name).into_owned(), id.known));
        let what = match (id, self.is_handshaking()) {
            (Some((name, false)), _) => format!("unknown PSK username {name:?}"),
            // The server had a key: the client's binder (TLS 1.3) or
            // Finished (1.2) did not match it.
            (Some((name, true)), true) => {
                format!("TLS-PSK handshake with username {name:?} failed (wrong key?)")
            }
            (None, true) => "TLS-PSK handshake failed before a PSK username came".to_string(),
            (_, false) => "TLS-PSK session failed".to_string(),
        };
        PskError(format!("{what}: {e}"))
    }

    /// The handshake has not finished yet.
    pub fn is_handshaking(&self) -> bool {
        !self.stream.ssl().is_init_finished()
    }

    /// The peer sent close_notify.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Writes plaintext. It is sealed in full records as it accumulates; the
    /// rest waits for more writes or [`PskSession::flush`]. Large writes
    /// are sealed straight from `data`, without staging.
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), PskError> {
        if self.is_handshaking() || self.staged.len() + data.len() < MAX_RECORD_PLAINTEXT {
            self.staged.extend_from_slice(data);
            return Ok(());
        }
        if !self.staged.is_empty() {
            let fill = MAX_RECORD_PLAINTEXT - self.staged.len();
            self.staged.extend_from_slice(&data[..fill]);
            data = &data[fill..];
            self.seal_staged()?;
        }
        let whole = data.len() - data.len() % MAX_RECORD_PLAINTEXT;
        self.seal(&data[..whole])?;
        self.staged.extend_from_slice(&data[whole..]);
        Ok(())
    }

    /// Seals the staged plaintext (a last, shorter record).
    pub fn flush(&mut self) -> Result<(), PskError> {
        if self.is_handshaking() {
            return Ok(());
        }
        self.seal_staged()
    }

    fn seal_staged(&mut self) -> Result<(), PskError> {
        let staged = std::mem::take(&mut self.staged);
        let r = self.seal(&staged);
        self.staged = staged;
        self.staged.clear();
        r
    }

    fn seal(&mut self, mut data: &[u8]) -> Result<(), PskError> {
        while !data.is_empty() {
            // OpenSSL splits a write into records of 16 KiB.
            match self.stream.ssl_write(data) {
                Ok(n) => data = &data[n.min(data.len())..],
                Err(e) => return Err(self.fail(&e)),
            }
        }
        Ok(())
    }

    /// Seals what is staged and queues close_notify.
    pub fn send_close_notify(&mut self) {
        if !self.failed {
            let _ = self.flush();
            // With memory buffers this queues the alert and returns; the
            // peer's close_notify is not waited for.
            let _ = self.stream.shutdown();
        }
    }

    /// Records waiting to be sent.
    pub fn wants_write(&self) -> bool {
        !self.stream.get_ref().output.is_empty()
    }

    /// Moves the records waiting to be sent to the end of `out`.
    pub fn write_tls(&mut self, out: &mut Vec<u8>) {
        let queued = &mut self.stream.get_mut().output;
        if out.is_empty() {
            std::mem::swap(out, queued);
        } else {
            out.append(queued);
        }
    }

    fn identity(&self) -> Option<&Identity> {
        match self.side {
            Side::Server(idx) => self.stream.ssl().ex_data(idx),
            Side::Client(_) => None,
        }
    }

    /// The username the client sent (server side), once its key was found.
    pub fn username(&self) -> Option<String> {
        self.identity().filter(|id| id.known).map(|id| String::from_utf8_lossy(&id.name).into_owned())
    }

    /// A line for the log once the handshake is done, e.g. `TLSv1.3
    /// TLS_AES_128_GCM_SHA256 PSK username "alice"`.
    pub fn describe(&self) -> String {
        let ssl = self.stream.ssl();
        let suite = ssl.current_cipher().map_or("?", |c| c.name());
        match self.username() {
            Some(u) => format!("{} {suite} PSK username {u:?}", ssl.version_str()),
            None => format!("{} {suite} PSK", ssl.version_str()),
        }
    }
}

/// Whether what ended the session is an alert from the peer: OpenSSL
/// reports a received alert as an error of the SSL library whose reason is
/// `SSL_AD_REASON_OFFSET` (1000) plus the alert's number (the error's text
/// names the alert).
fn alert_received(e: &openssl::ssl::Error) -> bool {
    const ERR_LIB_SSL: i32 = 20;
    const SSL_AD_REASON_OFFSET: i32 = 1000;
    e.ssl_error().is_some_and(|stack| {
        stack.errors().iter().any(|err| {
            err.library_code() == ERR_LIB_SSL
                && (SSL_AD_REASON_OFFSET..SSL_AD_REASON_OFFSET + 256).contains(&err.reason_code())
        })
    })
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
