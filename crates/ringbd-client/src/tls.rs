//! The client's TLS layer: credentials from an `nbds://` URI, and a small
//! sans-IO session that sits between the socket I/O (a blocking socket
//! during the handshake, the ring afterwards) and the sans-IO NBD client.
//!
//! [`TlsSetup::new`] turns the URI's parameters into a rustls client
//! configuration (the `ring` provider, as the server uses), the way libnbd
//! reads them: `ca-cert.pem` from `tls-certificates=DIR` checks the server,
//! `client-cert.pem` with `client-key.pem` from the same directory, if
//! present, authenticate the client; without a directory, libnbd's default
//! directories, then the system's CA bundle. [`ClientTls`] is one
//! connection's session: ciphertext in ([`ClientTls::receive`]), plaintext
//! in and ciphertext out in one call ([`ClientTls::send`], which packs all
//! of a loop turn's requests into as few records as their bytes allow).
//!
//! With `tls-psk-file=FILE` (libnbd's TLS-PSK, which rustls cannot do) the
//! session is OpenSSL's instead, through `ringbd-psk` as on the server: the
//! username is `tls-username=` or the URI's user part, else the login name
//! (as libnbd), and its key is looked up in FILE. [`ClientTls`] has one
//! variant per kind with the same methods.

use std::io::{self, IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore};

use ringbd_psk::{PskClientConfig, PskKeys, PskSession};

use crate::error::{Error, Result};
use crate::uri::{Address, NbdUri, TlsParams};

/// The CA that signed the server's certificate.
pub const CA_CERT: &str = "ca-cert.pem";
/// The client's certificate (optional, for servers that verify clients).
pub const CLIENT_CERT: &str = "client-cert.pem";
/// Its private key.
pub const CLIENT_KEY: &str = "client-key.pem";
/// System CA bundles, tried in order when no certificate directory has a CA.
const SYSTEM_CA: [&str; 2] = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"];

/// What a URI's TLS parameters resolve to, shared by its connections.
#[derive(Clone)]
pub struct TlsSetup {
    creds: Creds,
    /// Where the credentials came from, for messages.
    what: String,
}

#[derive(Clone)]
enum Creds {
    X509 { config: Arc<ClientConfig>, name: ServerName<'static> },
    Psk { config: Arc<PskClientConfig>, username: String },
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup").field("what", &self.what).finish_non_exhaustive()
    }
}

impl TlsSetup {
    /// The TLS configuration for `uri`; `None` for a plaintext URI.
    pub fn new(uri: &NbdUri) -> Result<Option<TlsSetup>> {
        let Some(t) = &uri.tls else { return Ok(None) };
        let fail = |what: String| Error::Tls { context: format!("TLS setup for {uri}"), what };
        if let Some(file) = &t.psk_file {
            let username = match &t.username {
                Some(u) => u.clone(),
                // libnbd's default: the login name.
                None => std::env::var("LOGNAME").or_else(|_| std::env::var("USER")).map_err(|_| {
                    fail("tls-psk-file needs a username: nbds://USER@host/... or tls-username=USER".into())
                })?,
            };
            let keys = PskKeys::load(file).map_err(|e| fail(e.to_string()))?;
            let key = keys
                .get(username.as_bytes())
                .ok_or_else(|| fail(format!("{}: no key for username {username:?}", file.display())))?;
            let config = PskClientConfig::new(&username, key.bytes()).map_err(|e| fail(e.to_string()))?;
            let what = format!("PSK username {username:?} from {}", file.display());
            return Ok(Some(TlsSetup { creds: Creds::Psk { config: Arc::new(config), username }, what }));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let dir = match &t.certificates {
            Some(d) => Some(d.clone()),
            None => default_dir(),
        };
        let (verifier, mut what): (Arc<dyn ServerCertVerifier>, String) = if t.verify_peer {
            let (roots, from) = roots(dir.as_deref()).map_err(fail)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| fail(format!("server certificate verifier: {e}")))?;
            let check_name = t.hostname.is_some() || matches!(uri.address, Address::Tcp { .. });
            (Arc::new(Verifier { webpki, check_name }), format!("server checked against {from}"))
        } else {
            (
                Arc::new(NoVerifier(provider.clone())),
                "server certificate not checked (tls-verify-peer=false)".into(),
            )
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(format!("TLS protocol versions: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match dir.as_deref().map(client_identity).transpose().map_err(fail)?.flatten() {
            Some((certs, key, from)) => {
                what.push_str(&format!(", client certificate {from}"));
                builder.with_client_auth_cert(certs, key).map_err(|e| fail(format!("{from}: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        let name = server_name(uri, t).map_err(fail)?;
        // Unix sockets without tls-hostname send no name, as libnbd does.
        config.enable_sni = t.hostname.is_some() || matches!(uri.address, Address::Tcp { .. });
        Ok(Some(TlsSetup { creds: Creds::X509 { config: Arc::new(config), name }, what }))
    }

    /// A fresh session for one connection (after the STARTTLS ACK); its
    /// ClientHello is ready to send ([`ClientTls::flush`]).
    pub fn session(&self) -> Result<ClientTls> {
        let fail = |what: String| Error::Tls { context: "TLS session".into(), what };
        match &self.creds {
            Creds::X509 { config, name } => {
                let mut conn =
                    ClientConnection::new(config.clone(), name.clone()).map_err(|e| fail(e.to_string()))?;
                // The engine bounds what it queues; rustls takes a whole batch.
                conn.set_buffer_limit(None);
                Ok(ClientTls::X509(Box::new(conn)))
            }
            Creds::Psk { config, .. } => {
                let mut s = config.session().map_err(|e| fail(e.to_string()))?;
                // Queues the ClientHello.
                s.process(&mut Vec::new()).map_err(|e| fail(e.to_string()))?;
                Ok(ClientTls::Psk(Box::new(s)))
            }
        }
    }

    /// Where the credentials came from, for messages (`-v`, errors).
    pub fn describe(&self) -> &str {
        &self.what
    }

    /// Why a server may hang up in the middle of the TLS handshake, for the
    /// error: GnuTLS servers (nbdkit, qemu) close a TLS-PSK connection
    /// without an alert when the key or the username is wrong.
    pub fn hangup_hint(&self) -> String {
        match &self.creds {
            Creds::Psk { username, .. } => format!(
                " (TLS-PSK as username {username:?}: the server refused it? a wrong key, \
                 or a username it has no key for)"
            ),
            Creds::X509 { .. } => String::new(),
        }
    }
}

/// The name the server's certificate must carry: `tls-hostname`, else the
/// URI's host (an IP address is checked as one), else for Unix sockets
/// "localhost" (not checked: see [`Verifier`]).
fn server_name(uri: &NbdUri, t: &TlsParams) -> std::result::Result<ServerName<'static>, String> {
    let host = match (&t.hostname, &uri.address) {
        (Some(h), _) => h.clone(),
        (None, Address::Tcp { host, .. }) => host.clone(),
        (None, Address::Unix(_)) => "localhost".into(),
    };
    ServerName::try_from(host.clone()).map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))
}

/// libnbd's default certificate directories (when no `tls-certificates`
/// is given): the first that has a CA certificate.
fn default_dir() -> Option<PathBuf> {
    let mut dirs = Vec::new();
    // /proc/self belongs to the effective user: root uses the system
    // directory, everyone else their home's.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    match std::env::var_os("HOME") {
        Some(home) if !root => {
            let home = PathBuf::from(home);
            dirs.push(home.join(".pki/libnbd"));
            dirs.push(home.join(".config/pki/libnbd"));
        }
        _ => dirs.push(PathBuf::from("/etc/pki/libnbd")),
    }
    dirs.into_iter().find(|d| d.join(CA_CERT).is_file())
}

fn read_certs(path: &Path) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// The CAs to check the server against: `DIR/ca-cert.pem`, else the
/// system's bundle.
fn roots(dir: Option<&Path>) -> std::result::Result<(RootCertStore, String), String> {
    let mut roots = RootCertStore::empty();
    let ca = match dir {
        Some(d) => {
            let ca = d.join(CA_CERT);
            if !ca.is_file() {
                return Err(format!(
                    "{} does not exist: it is needed to check the server's certificate \
                     (or give tls-verify-peer=false)",
                    ca.display()
                ));
            }
            ca
        }
        None => match SYSTEM_CA.iter().map(PathBuf::from).find(|p| p.is_file()) {
            Some(p) => p,
            None => {
                return Err("no tls-certificates=DIR, no libnbd certificate directory and no system CA \
                            bundle to check the server's certificate against"
                    .into())
            }
        },
    };
    let certs = read_certs(&ca)?;
    let (_added, _unusable) = roots.add_parsable_certificates(certs);
    if roots.is_empty() {
        return Err(format!("{}: no usable CA certificate in it", ca.display()));
    }
    Ok((roots, ca.display().to_string()))
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, String);

/// `client-cert.pem` and `client-key.pem` from `dir`, if both are there.
fn client_identity(dir: &Path) -> std::result::Result<Option<Identity>, String> {
    let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
    match (cert.is_file(), key.is_file()) {
        (false, false) => Ok(None),
        (true, true) => {
            let certs = read_certs(&cert)?;
            let k = PrivateKeyDer::from_pem_file(&key).map_err(|e| format!("{}: {e}", key.display()))?;
            Ok(Some((certs, k, cert.display().to_string())))
        }
        (true, false) => Err(format!("{} without {}", cert.display(), key.display())),
        (false, true) => Err(format!("{} without {}", key.display(), cert.display())),
    }
}

/// webpki's verification; without a name to check (a Unix socket and no
/// `tls-hostname`), only the chain to the CA. libnbd checks no name there
/// either (and, unlike this, no chain).
#[derive(Debug)]
struct Verifier {
    webpki: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            // webpki checks the chain before the name: a name error means
            // the chain was good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `tls-verify-peer=false`: any certificate is accepted (the handshake's
/// signatures are still checked, so the session is encrypted to whoever
/// holds the certificate's key).
#[derive(Debug)]
struct NoVerifier(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What [`ClientTls::receive`] found besides plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The server sent close_notify: no more plaintext will come.
    pub closed: bool,
}

/// One connection's TLS session, sans-IO: rustls with X.509, or OpenSSL
/// with a pre-shared key.
pub enum ClientTls {
    X509(Box<ClientConnection>),
    Psk(Box<PskSession>),
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// A rustls error as a message, with a hint for the usual causes.
pub fn explain(e: &rustls::Error) -> String {
    use rustls::AlertDescription as A;
    let hint = match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            " (the server's certificate is not signed by the CA in tls-certificates=DIR/ca-cert.pem)"
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => " (the server's certificate does not name the host connected to; tls-hostname=NAME sets the name to check)",
        rustls::Error::AlertReceived(A::CertificateRequired | A::BadCertificate | A::UnknownCA | A::HandshakeFailure) => {
            " (the server refused the handshake: it may want a client certificate, client-cert.pem and client-key.pem in tls-certificates=DIR, signed by a CA it trusts)"
        }
        _ => "",
    };
    format!("{e}{hint}")
}

impl ClientTls {
    /// Feeds received ciphertext; decrypted bytes are appended to `plain`.
    /// Handshake messages and session tickets produce no plaintext; what
    /// rustls wants to send back is then in [`ClientTls::wants_write`].
    pub fn receive(
        &mut self,
        mut ciphertext: &[u8],
        plain: &mut Vec<u8>,
    ) -> std::result::Result<Received, String> {
        let c = match self {
            ClientTls::X509(c) => c,
            ClientTls::Psk(s) => {
                while !ciphertext.is_empty() {
                    let n = s.read_tls(ciphertext);
                    ciphertext = &ciphertext[n..];
                    s.process(plain).map_err(|e| e.to_string())?;
                }
                return Ok(Received { closed: s.peer_closed() });
            }
        };
        let mut closed = false;
        while !ciphertext.is_empty() {
            let n = c.read_tls(&mut ciphertext).map_err(|e| format!("TLS input: {e}"))?;
            let state = c.process_new_packets().map_err(|e| explain(&e))?;
            closed |= state.peer_has_closed();
            if state.plaintext_bytes_to_read() > 0 {
                let want = state.plaintext_bytes_to_read();
                let at = plain.len();
                plain.resize(at + want, 0);
                let got = io::Read::read(&mut c.reader(), &mut plain[at..])
                    .map_err(|e| format!("TLS plaintext: {e}"))?;
                plain.truncate(at + got);
            }
            if n == 0 && !ciphertext.is_empty() {
                return Err("rustls took no TLS input".into());
            }
        }
        Ok(Received { closed })
    }

    /// Encrypts all of `plain` (one loop turn's requests: few records for
    /// many small requests) and appends the records to `wire`, with
    /// anything else the session has to send.
    pub fn send(&mut self, plain: &[IoSlice<'_>], wire: &mut Vec<u8>) -> std::result::Result<(), String> {
        let c = match self {
            ClientTls::X509(c) => c,
            ClientTls::Psk(s) => {
                for piece in plain {
                    s.write(piece).map_err(|e| e.to_string())?;
                }
                s.flush().map_err(|e| e.to_string())?;
                s.write_tls(wire);
                return Ok(());
            }
        };
        let total: usize = plain.iter().map(|s| s.len()).sum();
        let mut done = 0;
        let mut slices: Vec<IoSlice<'_>> = plain.to_vec();
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        while done < total {
            let n = c.writer().write_vectored(rest).map_err(|e| format!("TLS encryption: {e}"))?;
            if n == 0 {
                return Err(format!("TLS took {done} of {total} bytes"));
            }
            done += n;
            IoSlice::advance_slices(&mut rest, n);
        }
        self.flush(wire)
    }

    /// Appends what the session has to send (records, alerts) to `wire`.
    pub fn flush(&mut self, wire: &mut Vec<u8>) -> std::result::Result<(), String> {
        let c = match self {
            ClientTls::X509(c) => c,
            ClientTls::Psk(s) => {
                s.write_tls(wire);
                return Ok(());
            }
        };
        while c.wants_write() {
            c.write_tls(wire).map_err(|e| format!("TLS output: {e}"))?;
        }
        Ok(())
    }

    /// Whether the session has records to send.
    pub fn wants_write(&self) -> bool {
        match self {
            ClientTls::X509(c) => c.wants_write(),
            ClientTls::Psk(s) => s.wants_write(),
        }
    }

    pub fn is_handshaking(&self) -> bool {
        match self {
            ClientTls::X509(c) => c.is_handshaking(),
            ClientTls::Psk(s) => s.is_handshaking(),
        }
    }

    /// Queues close_notify (sent with the next [`ClientTls::flush`]).
    pub fn close(&mut self) {
        match self {
            ClientTls::X509(c) => c.send_close_notify(),
            ClientTls::Psk(s) => s.send_close_notify(),
        }
    }

    /// "TLSv1_3 TLS13_AES_256_GCM_SHA384", for `-v` and `ringbd info`.
    pub fn describe(&self) -> String {
        let c = match self {
            ClientTls::X509(c) => c,
            ClientTls::Psk(s) => return s.describe(),
        };
        let version = c.protocol_version().map_or_else(|| "?".into(), |v| format!("{v:?}"));
        let suite = c.negotiated_cipher_suite().map_or_else(|| "?".into(), |s| format!("{:?}", s.suite()));
        format!("{version} {suite}")
    }
}
