//! TLS for STARTTLS: credentials (a certificate directory with the
//! qemu/nbdkit file names, or a PSK file), and the per-connection TLS layer.
//!
//! Both kinds of session are sans-IO like the rest of the connection:
//! [`crate::conn`] feeds them the ciphertext the engine received and writes
//! the plaintext replies through them, so both engines get TLS without
//! knowing about it. X.509 runs on rustls; PSK, which rustls lacks, on
//! OpenSSL over memory buffers ([`ringbd_psk`]). `ServerSession` hides
//! which. Replies queued in one loop turn are written in one go and packed
//! into as few 16 KiB records as the bytes allow (the equivalent of
//! `gnutls_record_cork`); the records then leave in one send.

pub mod authz;
pub mod ktls;
// The kernel interface of kTLS: setsockopt and cmsg calls on the socket.
#[allow(unsafe_code)]
pub mod ktls_sys;

use std::io::{IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd_proto::TlsMode;
use ringbd_psk::{PskKeys, PskServerConfig, PskSession};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use crate::out::OutBuf;
use ktls::{Ktls, KtlsStats, RecordFramer};

/// The CA certificate (for `--tls-verify-peer`).
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate chain.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key.
pub const SERVER_KEY: &str = "server-key.pem";

/// Plaintext encrypted per step of [`ServerSession::write_plain`]: 16 full
/// records.
const SEAL_STEP: usize = 16 * 16 * 1024;

/// TLS settings from the command line.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub mode: TlsMode,
    /// Directory with [`CA_CERT`], [`SERVER_CERT`] and [`SERVER_KEY`].
    pub certificates: Option<PathBuf>,
    /// Require a client certificate signed by [`CA_CERT`].
    pub verify_peer: bool,
    /// Allowed client certificate subjects (RFC 4514); empty: any.
    pub authz: Vec<String>,
    /// A file of more allowed subjects, one per line.
    pub authz_file: Option<PathBuf>,
    /// A psktool file (`username:hexkey` lines): TLS-PSK instead of
    /// certificates.
    pub psk: Option<PathBuf>,
    /// Keep TLS in userspace even where the kernel has kTLS (`--no-ktls`).
    pub no_ktls: bool,
}

/// The server's TLS policy and credentials, shared by its connections.
pub struct TlsServer {
    pub mode: TlsMode,
    credentials: Credentials,
    /// kTLS, unless `--no-ktls` or with PSK: what the kernel offers.
    pub ktls: Option<Ktls>,
    /// TLS sessions, in the kernel and in userspace.
    pub stats: KtlsStats,
}

enum Credentials {
    X509(Arc<ServerConfig>),
    Psk(PskServerConfig),
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer").field("mode", &self.mode).finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Loads the credentials; `None` when TLS is off.
    pub fn load(opts: &TlsOptions) -> Result<Option<Self>, String> {
        if opts.mode == TlsMode::Off {
            return Ok(None);
        }
        if let Some(path) = &opts.psk {
            if opts.certificates.is_some() || opts.verify_peer {
                return Err("--tls-psk excludes --tls-certificates and --tls-verify-peer".into());
            }
            if !opts.authz.is_empty() || opts.authz_file.is_some() {
                // The key file is the allow list: every user in it may connect.
                return Err("--tls-authz applies to client certificates, not to --tls-psk (list only the allowed users in the key file)".into());
            }
            let keys = PskKeys::load(path).map_err(|e| e.to_string())?;
            let config = PskServerConfig::new(Arc::new(keys)).map_err(|e| e.to_string())?;
            // PSK sessions stay in OpenSSL, in userspace: no kTLS.
            return Ok(Some(TlsServer {
                mode: opts.mode,
                credentials: Credentials::Psk(config),
                ktls: None,
                stats: KtlsStats::default(),
            }));
        }
        let dir = opts
            .certificates
            .as_deref()
            .ok_or("--tls on/require needs --tls-certificates DIR or --tls-psk FILE")?;
        let mut authz = opts.authz.clone();
        if let Some(f) = &opts.authz_file {
            let text =
                std::fs::read_to_string(f).map_err(|e| format!("--tls-authz-file {}: {e}", f.display()))?;
            authz.extend(crate::tls::authz::parse_list(&text));
            if authz.is_empty() {
                return Err(format!("--tls-authz-file {}: no distinguished name in it", f.display()));
            }
        }
        if !authz.is_empty() && !opts.verify_peer {
            return Err(
                "--tls-authz needs --tls-verify-peer (the subject comes from the client certificate)".into(),
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS protocol versions: {e}"))?;
        let builder = if opts.verify_peer {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(&dir.join(CA_CERT))? {
                roots.add(cert).map_err(|e| format!("{}: {e}", dir.join(CA_CERT).display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client certificate verifier: {e}"))?;
            if authz.is_empty() {
                builder.with_client_cert_verifier(verifier)
            } else {
                builder
                    .with_client_cert_verifier(Arc::new(crate::tls::authz::AllowList::new(verifier, authz)))
            }
        } else {
            builder.with_no_client_auth()
        };
        let certs = read_certs(&dir.join(SERVER_CERT))?;
        let key_path = dir.join(SERVER_KEY);
        let key =
            PrivateKeyDer::from_pem_file(&key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("{} with {}: {e}", dir.join(SERVER_CERT).display(), key_path.display()))?;
        let ktls = if opts.no_ktls {
            tracing::debug!("kTLS off (--no-ktls): TLS stays in userspace (rustls)");
            None
        } else {
            // The keys leave rustls only for connections that move to kTLS.
            config.enable_secret_extraction = true;
            let (k, line) = Ktls::probe();
            tracing::debug!("{line}");
            Some(k)
        };
        Ok(Some(TlsServer {
            mode: opts.mode,
            credentials: Credentials::X509(Arc::new(config)),
            ktls,
            stats: KtlsStats::default(),
        }))
    }

    /// What authenticates: "certificates" or "PSK".
    pub fn kind(&self) -> &'static str {
        match self.credentials {
            Credentials::X509(_) => "certificates",
            Credentials::Psk(_) => "PSK",
        }
    }

    /// A fresh TLS session for one connection that sent STARTTLS.
    pub(crate) fn session(&self) -> Result<ServerSession, String> {
        match &self.credentials {
            Credentials::X509(config) => {
                let mut conn = ServerConnection::new(config.clone()).map_err(|e| e.to_string())?;
                // The connection's own high-water mark bounds what is queued.
                conn.set_buffer_limit(None);
                Ok(ServerSession::X509(Box::new(conn)))
            }
            Credentials::Psk(config) => config.session().map(ServerSession::Psk).map_err(|e| e.to_string()),
        }
    }
}

/// One connection's TLS session: rustls with X.509 certificates, or
/// OpenSSL with a pre-shared key. Both run on memory buffers.
pub(crate) enum ServerSession {
    X509(Box<ServerConnection>),
    Psk(PskSession),
}

impl ServerSession {
    /// Takes ciphertext from the front of `data` (maybe not all of it),
    /// runs the protocol on it and appends what it decrypted to `plain`.
    /// Returns how many bytes it took. An error is final; an alert may be
    /// queued for [`ServerSession::write_tls`].
    pub(crate) fn read_tls(&mut self, data: &[u8], plain: &mut Vec<u8>) -> Result<usize, String> {
        match self {
            ServerSession::X509(s) => {
                let mut rd = data;
                let n = s.read_tls(&mut rd).map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("rustls took no bytes".into());
                }
                s.process_new_packets().map_err(|e| e.to_string())?;
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    match s.reader().read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => plain.extend_from_slice(&chunk[..k]),
                    }
                }
                Ok(n)
            }
            ServerSession::Psk(s) => {
                let n = s.read_tls(data);
                s.process(plain).map_err(|e| e.to_string())?;
                Ok(n)
            }
        }
    }

    pub(crate) fn is_handshaking(&self) -> bool {
        match self {
            ServerSession::X509(s) => s.is_handshaking(),
            ServerSession::Psk(s) => s.is_handshaking(),
        }
    }

    /// Encrypts every byte of `out` into full records across reply
    /// boundaries (not one or two records per reply) and appends them to
    /// `wire`, [`SEAL_STEP`] bytes of plaintext at a time: each step's
    /// records are copied out while they are still in the CPU's cache, and
    /// the session's record buffers are reused instead of piling up.
    pub(crate) fn write_plain(&mut self, out: &OutBuf, wire: &mut Vec<u8>) -> Result<(), String> {
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(8);
        let (total, mut done) = (out.len(), 0);
        while done < total {
            iov.clear();
            out.iovecs_upto(done, SEAL_STEP, &mut iov);
            match self {
                ServerSession::X509(s) => match s.writer().write_vectored(&iov) {
                    Ok(n) if n > 0 => done += n,
                    // Unreachable with no buffer limit; fail rather than spin.
                    _ => return Err("rustls refused plaintext".into()),
                },
                ServerSession::Psk(s) => {
                    for piece in &iov {
                        s.write(piece).map_err(|e| e.to_string())?;
                        done += piece.len();
                    }
                }
            }
            self.write_tls(wire);
        }
        if let ServerSession::Psk(s) = self {
            // The last, partial record.
            s.flush().map_err(|e| e.to_string())?;
            s.write_tls(wire);
        }
        Ok(())
    }

    pub(crate) fn send_close_notify(&mut self) {
        match self {
            ServerSession::X509(s) => s.send_close_notify(),
            ServerSession::Psk(s) => s.send_close_notify(),
        }
    }

    /// Moves the records (and handshake messages, alerts) ready to send to
    /// the end of `wire`.
    pub(crate) fn write_tls(&mut self, wire: &mut Vec<u8>) {
        match self {
            ServerSession::X509(s) => {
                while s.wants_write() {
                    match s.write_tls(wire) {
                        Ok(n) if n > 0 => {}
                        _ => break,
                    }
                }
            }
            ServerSession::Psk(s) => s.write_tls(wire),
        }
    }

    /// Whether records (or an alert) wait to be moved to the wire.
    pub(crate) fn wants_write(&self) -> bool {
        match self {
            ServerSession::X509(s) => s.wants_write(),
            ServerSession::Psk(s) => s.wants_write(),
        }
    }

    /// A line for the log once the TLS handshake is done.
    pub(crate) fn describe(&self) -> String {
        match self {
            ServerSession::X509(s) => {
                let version = s.protocol_version().map_or_else(|| "?".into(), |v| format!("{v:?}"));
                let suite =
                    s.negotiated_cipher_suite().map_or_else(|| "?".into(), |c| format!("{:?}", c.suite()));
                let peer = if s.peer_certificates().is_some_and(|c| !c.is_empty()) {
                    "with a client certificate"
                } else {
                    "without a client certificate"
                };
                format!("{version} {suite} {peer}")
            }
            ServerSession::Psk(s) => s.describe(),
        }
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// One connection's TLS state, once STARTTLS was acknowledged.
pub(crate) struct TlsLayer {
    pub(crate) session: ServerSession,
    /// Ciphertext (and the plaintext STARTTLS ACK before it) for the engine.
    pub(crate) wire: OutBuf,
    /// Decrypted bytes the NBD state machine has not taken yet.
    pub(crate) plain: Vec<u8>,
    /// Bytes at the front of the engine's next input that the session
    /// already has: reported unconsumed while `plain` is not empty, so the
    /// engine keeps calling back once there is room (see `Connection::receive`).
    pub(crate) held: usize,
    /// close_notify was queued.
    pub(crate) closing: bool,
    /// The TLS handshake finished (logged once).
    pub(crate) established: bool,
    /// Record boundaries of what rustls was given (for the move to kTLS).
    pub(crate) framer: RecordFramer,
}

impl TlsLayer {
    pub(crate) fn new(session: ServerSession, wire: OutBuf) -> Self {
        TlsLayer {
            session,
            wire,
            plain: Vec::new(),
            held: 0,
            closing: false,
            established: false,
            framer: RecordFramer::default(),
        }
    }
}
