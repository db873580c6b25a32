//! Client errors, each with the context that produced it.

use std::fmt;
use std::io;

use nbd_proto::wire::CmdType;

/// Why a client operation failed.
#[derive(Debug)]
pub enum Error {
    /// The URI is malformed or names something unsupported.
    Uri(crate::uri::UriError),
    /// A system call failed; `context` says what was being done.
    Io { context: String, source: io::Error },
    /// The handshake failed.
    Handshake { context: String, source: nbd_proto::client::ClientHandshakeError },
    /// The server broke the protocol; the connection is unusable.
    Protocol { context: String, what: String },
    /// TLS failed: credentials, the TLS handshake, a certificate, a record.
    Tls { context: String, what: String },
    /// The server answered a request with an error.
    Request { cmd: CmdType, offset: u64, len: u64, errno: u32, message: String },
    /// A request the client refuses to send (bad range, missing feature).
    Invalid(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

/// The name of an NBD errno value.
pub fn errno_name(e: u32) -> String {
    match nbd_proto::wire::Errno(e).name() {
        Some(n) => n.to_owned(),
        None => format!("errno {e}"),
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Uri(e) => e.fmt(f),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Handshake { context, source } => write!(f, "{context}: {source}"),
            Error::Protocol { context, what } => write!(f, "{context}: {what}"),
            Error::Tls { context, what } => write!(f, "{context}: TLS: {what}"),
            Error::Request { cmd, offset, len, errno, message } => {
                write!(f, "{cmd} of {len} bytes at {offset:#x}: {}", errno_name(*errno))?;
                if !message.is_empty() {
                    write!(f, " ({message})")?;
                }
                Ok(())
            }
            Error::Invalid(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Handshake { source, .. } => Some(source),
            Error::Uri(e) => Some(e),
            _ => None,
        }
    }
}

impl From<crate::uri::UriError> for Error {
    fn from(e: crate::uri::UriError) -> Self {
        Error::Uri(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
