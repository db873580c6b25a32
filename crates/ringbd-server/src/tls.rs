//! TLS for STARTTLS: credentials from a certificate directory with the
//! qemu/nbdkit file names, and the per-connection TLS layer.
//!
//! rustls is sans-IO like the rest of the connection: [`crate::conn`] feeds
//! it the ciphertext the engine received and writes the plaintext replies
//! through it, so both engines get TLS without knowing about it. Replies
//! queued in one loop turn are written with one vectored write, which rustls
//! packs into as few 16 KiB records as the bytes allow (the equivalent of
//! `gnutls_record_cork`); the records then leave in one send.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd_proto::TlsMode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use crate::ktls::{Ktls, KtlsStats, RecordFramer};
use crate::log;
use crate::out::OutBuf;

/// The CA certificate (for `--tls-verify-peer`).
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate chain.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key.
pub const SERVER_KEY: &str = "server-key.pem";

/// TLS settings from the command line.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub mode: TlsMode,
    /// Directory with [`CA_CERT`], [`SERVER_CERT`] and [`SERVER_KEY`].
    pub certificates: Option<PathBuf>,
    /// Require a client certificate signed by [`CA_CERT`].
    pub verify_peer: bool,
    /// Keep TLS in userspace even where the kernel has kTLS (`--no-ktls`).
    pub no_ktls: bool,
}

/// The server's TLS policy and credentials, shared by its connections.
pub struct TlsServer {
    pub mode: TlsMode,
    config: Arc<ServerConfig>,
    /// kTLS, unless `--no-ktls`: what the kernel offers.
    pub ktls: Option<Ktls>,
    /// TLS sessions, in the kernel and in userspace.
    pub stats: KtlsStats,
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
        let dir = opts
            .certificates
            .as_deref()
            .ok_or("--tls on/require needs --tls-certificates DIR (PSK is not supported yet)")?;
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
            builder.with_client_cert_verifier(verifier)
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
            log::debug(format_args!("kTLS off (--no-ktls): TLS stays in userspace (rustls)"));
            None
        } else {
            // The keys leave rustls only for connections that move to kTLS.
            config.enable_secret_extraction = true;
            let (k, line) = Ktls::probe();
            log::debug(format_args!("{line}"));
            Some(k)
        };
        Ok(Some(TlsServer { mode: opts.mode, config: Arc::new(config), ktls, stats: KtlsStats::default() }))
    }

    /// A fresh TLS session for one connection that sent STARTTLS.
    pub(crate) fn session(&self) -> Result<ServerConnection, rustls::Error> {
        let mut conn = ServerConnection::new(self.config.clone())?;
        // The connection's own high-water mark bounds what is queued.
        conn.set_buffer_limit(None);
        Ok(conn)
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
    pub(crate) session: ServerConnection,
    /// Ciphertext (and the plaintext STARTTLS ACK before it) for the engine.
    pub(crate) wire: OutBuf,
    /// Decrypted bytes the NBD state machine has not taken yet.
    pub(crate) plain: Vec<u8>,
    /// Bytes at the front of the engine's next input that rustls already
    /// has: reported unconsumed while `plain` is not empty, so the engine
    /// keeps calling back once there is room (see `Connection::receive`).
    pub(crate) held: usize,
    /// close_notify was queued.
    pub(crate) closing: bool,
    /// The TLS handshake finished (logged once).
    pub(crate) established: bool,
    /// Record boundaries of what rustls was given (for the move to kTLS).
    pub(crate) framer: RecordFramer,
}

impl TlsLayer {
    pub(crate) fn new(session: ServerConnection, wire: OutBuf) -> Self {
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

    /// A line for the log once the TLS handshake is done.
    pub(crate) fn describe(&self) -> String {
        let version = self.session.protocol_version().map_or_else(|| "?".into(), |v| format!("{v:?}"));
        let suite =
            self.session.negotiated_cipher_suite().map_or_else(|| "?".into(), |s| format!("{:?}", s.suite()));
        let peer = if self.session.peer_certificates().is_some_and(|c| !c.is_empty()) {
            "with a client certificate"
        } else {
            "without a client certificate"
        };
        format!("{version} {suite} {peer}")
    }
}
