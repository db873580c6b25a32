//! Connecting and the handshake, on a blocking socket (a few round trips);
//! the transmission phase then moves to the ring.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use nbd_proto::client::{ClientConfig, ClientHandshake, ClientOutcome};
use nbd_proto::ExportListing;

use crate::error::{Error, Result};
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

fn handshake(uri: &NbdUri, cfg: ClientConfig) -> Result<(Stream, ClientOutcome)> {
    let mut stream = Stream::connect(uri)?;
    let mut hs = ClientHandshake::new(cfg);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let ctx = || format!("handshake with {uri}");
    loop {
        let used = hs.handle(&buf).map_err(|source| Error::Handshake { context: ctx(), source })?;
        buf.drain(..used);
        let out = hs.take_output();
        if !out.is_empty() {
            stream.io().write_all(&out).map_err(|e| Error::io(ctx(), e))?;
        }
        if hs.outcome().is_some() {
            break;
        }
        let n = stream.io().read(&mut chunk).map_err(|e| Error::io(ctx(), e))?;
        if n == 0 {
            return Err(Error::Protocol { context: ctx(), what: "server closed the connection".into() });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if !buf.is_empty() {
        return Err(Error::Protocol {
            context: ctx(),
            what: format!("{} unexpected bytes after the handshake", buf.len()),
        });
    }
    match hs.into_outcome() {
        Some(o) => Ok((stream, o)),
        None => Err(Error::Protocol { context: ctx(), what: "handshake ended without an outcome".into() }),
    }
}

/// A connection past the handshake, ready for the ring.
pub struct Connected {
    pub fd: OwnedFd,
    pub negotiated: nbd_proto::ClientNegotiated,
}

/// Connects and negotiates `cfg` (its export name comes from the URI).
pub fn connect(uri: &NbdUri, mut cfg: ClientConfig) -> Result<Connected> {
    cfg.export = uri.export.clone();
    cfg.list_exports = false;
    match handshake(uri, cfg)? {
        (stream, ClientOutcome::Connected(negotiated)) => Ok(Connected { fd: stream.into_fd(), negotiated }),
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
