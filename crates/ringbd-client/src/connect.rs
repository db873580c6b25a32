//! Connecting and the handshake, on a blocking socket (a few round trips);
//! the transmission phase then moves to the ring.
//!
//! `nbds://`: the NBD handshake sends `NBD_OPT_STARTTLS` first; after the
//! ACK the TLS handshake runs on the same blocking socket through the
//! sans-IO [`ClientTls`], and the negotiation starts again inside TLS. The
//! session then travels with the socket ([`Connected::tls`]) to the ring.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use nbd_proto::client::{ClientConfig, ClientHandshake, ClientOutcome};
use nbd_proto::ExportListing;

use crate::error::{Error, Result};
use crate::tls::{ClientTls, TlsSetup};
use crate::uri::{Address, NbdUri};

/// A stream in either address family.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(uri: &NbdUri) -> Result<Stream> {
        match &uri.address {
            Address::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))
                    .map_err(|e| Error::io(format!("connect to {host}:{port}"), e))?;
                s.set_nodelay(true).map_err(|e| Error::io("TCP_NODELAY", e))?;
                Ok(Stream::Tcp(s))
            }
            Address::Unix(p) => UnixStream::connect(p)
                .map(Stream::Unix)
                .map_err(|e| Error::io(format!("connect to {}", p.display()), e)),
        }
    }

    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }

    fn into_fd(self) -> OwnedFd {
        match self {
            Stream::Tcp(s) => s.into(),
            Stream::Unix(s) => s.into(),
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The socket, with TLS once STARTTLS went through.
struct Link {
    stream: Stream,
    tls: Option<ClientTls>,
    /// Ciphertext to send (TLS) or scratch.
    wire: Vec<u8>,
}

impl Link {
    fn send(&mut self, plain: &[u8], ctx: &dyn Fn() -> String) -> Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return self.stream.io().write_all(plain).map_err(|e| Error::io(ctx(), e));
        };
        self.wire.clear();
        tls.send(&[std::io::IoSlice::new(plain)], &mut self.wire)
            .map_err(|what| Error::Tls { context: ctx(), what })?;
        match self.stream.io().write_all(&self.wire) {
            // The server hung up, maybe with an alert that says why (a TLS
            // 1.3 server refuses a client certificate after our side of the
            // handshake is done, so our next write can find the socket
            // closed): read what it left, which fails with that reason, or
            // with the hang-up's.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                let mut rest = Vec::new();
                loop {
                    self.receive(&mut rest, ctx)?;
                }
            }
            r => r.map_err(|e| Error::io(ctx(), e)),
        }
    }

    /// Reads what arrives and appends the plaintext to `buf`.
    fn receive(&mut self, buf: &mut Vec<u8>, ctx: &dyn Fn() -> String) -> Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = match self.stream.io().read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && self.tls.is_some() => 0,
            r => r.map_err(|e| Error::io(ctx(), e))?,
        };
        if n == 0 && self.tls.is_some() {
            // GnuTLS servers (nbdkit, qemu-nbd) hang up without an alert
            // when they refuse a client certificate after the handshake.
            return Err(Error::Tls {
                context: ctx(),
                what: "the server closed (or reset) the connection right after the TLS handshake (a server that \
                       checks client certificates does this when it refuses ours: client-cert.pem and \
                       client-key.pem in tls-certificates=DIR, signed by a CA it trusts)"
                    .into(),
            });
        }
        if n == 0 {
            return Err(Error::Protocol { context: ctx(), what: "server closed the connection".into() });
        }
        match self.tls.as_mut() {
            None => buf.extend_from_slice(&chunk[..n]),
            Some(tls) => {
                let r = tls.receive(&chunk[..n], buf).map_err(|what| Error::Tls { context: ctx(), what })?;
                if r.closed {
                    return Err(Error::Tls { context: ctx(), what: "server closed the TLS session".into() });
                }
                // Anything rustls answers on its own (alerts, key updates).
                self.wire.clear();
                tls.flush(&mut self.wire).map_err(|what| Error::Tls { context: ctx(), what })?;
                if !self.wire.is_empty() {
                    self.stream.io().write_all(&self.wire).map_err(|e| Error::io(ctx(), e))?;
                }
            }
        }
        Ok(())
    }

    /// Runs the TLS handshake on the blocking socket.
    fn start_tls(&mut self, setup: &TlsSetup, ctx: &dyn Fn() -> String) -> Result<()> {
        let mut tls = setup.session()?;
        let tls_err = |what: String| Error::Tls { context: format!("{} (TLS handshake)", ctx()), what };
        let mut plain = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        while tls.is_handshaking() {
            self.wire.clear();
            tls.flush(&mut self.wire).map_err(tls_err)?;
            if !self.wire.is_empty() {
                self.stream.io().write_all(&self.wire).map_err(|e| Error::io(ctx(), e))?;
            }
            if !tls.is_handshaking() {
                break;
            }
            let n = self.stream.io().read(&mut chunk).map_err(|e| Error::io(ctx(), e))?;
            if n == 0 {
                return Err(tls_err(format!(
                    "server closed the connection during the TLS handshake{}",
                    setup.hangup_hint()
                )));
            }
            tls.receive(&chunk[..n], &mut plain).map_err(tls_err)?;
        }
        // The client's Finished (and a certificate) may still be queued.
        self.wire.clear();
        tls.flush(&mut self.wire).map_err(tls_err)?;
        self.stream.io().write_all(&self.wire).map_err(|e| Error::io(ctx(), e))?;
        if !plain.is_empty() {
            return Err(tls_err(format!("{} bytes of data before the handshake ended", plain.len())));
        }
        self.tls = Some(tls);
        Ok(())
    }
}

fn handshake(uri: &NbdUri, mut cfg: ClientConfig) -> Result<(Link, ClientOutcome)> {
    let setup = TlsSetup::new(uri)?;
    cfg.starttls = setup.is_some();
    let mut link = Link { stream: Stream::connect(uri)?, tls: None, wire: Vec::new() };
    let mut hs = ClientHandshake::new(cfg);
    let mut buf = Vec::with_capacity(4096);
    let ctx = || format!("handshake with {uri}");
    loop {
        let used = hs.handle(&buf).map_err(|source| Error::Handshake { context: ctx(), source })?;
        buf.drain(..used);
        let out = hs.take_output();
        if !out.is_empty() {
            link.send(&out, &ctx)?;
        }
        if hs.outcome().is_some() {
            break;
        }
        if hs.tls_pending() {
            let Some(setup) = setup.as_ref() else {
                return Err(Error::Protocol { context: ctx(), what: "STARTTLS without TLS settings".into() });
            };
            if !buf.is_empty() {
                return Err(Error::Protocol {
                    context: ctx(),
                    what: format!("{} bytes after the STARTTLS ACK, before the TLS handshake", buf.len()),
                });
            }
            link.start_tls(setup, &ctx)?;
            hs.tls_started().map_err(|source| Error::Handshake { context: ctx(), source })?;
            continue;
        }
        link.receive(&mut buf, &ctx)?;
    }
    if !buf.is_empty() {
        return Err(Error::Protocol {
            context: ctx(),
            what: format!("{} unexpected bytes after the handshake", buf.len()),
        });
    }
    match hs.into_outcome() {
        Some(o) => Ok((link, o)),
        None => Err(Error::Protocol { context: ctx(), what: "handshake ended without an outcome".into() }),
    }
}

/// A connection past the handshake, ready for the ring.
pub struct Connected {
    pub fd: OwnedFd,
    pub negotiated: nbd_proto::ClientNegotiated,
    /// The TLS session (`nbds://`): everything on `fd` goes through it.
    pub tls: Option<ClientTls>,
}

/// Connects and negotiates `cfg` (its export name comes from the URI).
pub fn connect(uri: &NbdUri, mut cfg: ClientConfig) -> Result<Connected> {
    cfg.export = uri.export.clone();
    cfg.list_exports = false;
    match handshake(uri, cfg)? {
        (link, ClientOutcome::Connected(negotiated)) => {
            Ok(Connected { fd: link.stream.into_fd(), negotiated, tls: link.tls })
        }
        (_, ClientOutcome::Listed(_)) => Err(Error::Invalid("unexpected export list".into())),
    }
}

/// Lists the server's exports (`NBD_OPT_LIST`).
pub fn list_exports(uri: &NbdUri) -> Result<Vec<ExportListing>> {
    let mut cfg = ClientConfig::new("");
    cfg.list_exports = true;
    match handshake(uri, cfg)? {
        (_, ClientOutcome::Listed(l)) => Ok(l),
        (_, ClientOutcome::Connected(_)) => Err(Error::Invalid("server connected instead of listing".into())),
    }
}
