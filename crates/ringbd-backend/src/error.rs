//! Backend errors: a stable kind, the operation and range, and the source.

use std::fmt;
use std::io;

/// The operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Open,
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    Extents,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write zeroes",
            Op::Cache => "cache",
            Op::Extents => "block status",
        })
    }
}

/// Stable classification, which the server maps to an NBD error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// EIO and anything unclassified.
    Io,
    /// Out of space (ENOSPC, EDQUOT, EFBIG, or memory for a memory export).
    NoSpace,
    /// EPERM, EACCES, EROFS.
    Permission,
    /// The operation cannot be done (fast) here (ENOTSUP/EOPNOTSUPP).
    Unsupported,
    /// EINVAL, EOVERFLOW from the backend.
    Invalid,
}

impl ErrorKind {
    /// Classifies an `io::Error` by its errno.
    pub fn of(e: &io::Error) -> ErrorKind {
        match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG | libc::ENOMEM) => ErrorKind::NoSpace,
            Some(libc::EPERM | libc::EACCES | libc::EROFS) => ErrorKind::Permission,
            Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
            Some(libc::EINVAL | libc::EOVERFLOW) => ErrorKind::Invalid,
            _ => ErrorKind::Io,
        }
    }
}

/// A failed backend operation with its context.
#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub op: Op,
    pub offset: u64,
    pub len: u64,
    pub source: io::Error,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(op: Op, offset: u64, len: u64, source: io::Error) -> Self {
        Error { kind: ErrorKind::of(&source), op, offset, len, source }
    }

    /// An error of a chosen kind without an OS error behind it.
    pub fn other(kind: ErrorKind, op: Op, offset: u64, len: u64, msg: &str) -> Self {
        Error { kind, op, offset, len, source: io::Error::other(msg.to_owned()) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            Op::Open | Op::Flush => write!(f, "{}: {}", self.op, self.source),
            _ => write!(f, "{} of {} bytes at 0x{:x}: {}", self.op, self.len, self.offset, self.source),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_errno() {
        let k = |n| ErrorKind::of(&io::Error::from_raw_os_error(n));
        assert_eq!(k(libc::ENOSPC), ErrorKind::NoSpace);
        assert_eq!(k(libc::EDQUOT), ErrorKind::NoSpace);
        assert_eq!(k(libc::EROFS), ErrorKind::Permission);
        assert_eq!(k(libc::EOPNOTSUPP), ErrorKind::Unsupported);
        assert_eq!(k(libc::EIO), ErrorKind::Io);
        assert_eq!(k(libc::EBADF), ErrorKind::Io);
    }

    #[test]
    fn message_names_op_range_and_cause() {
        let e = Error::new(Op::Read, 0x1000, 4096, io::Error::from_raw_os_error(libc::EIO));
        let s = e.to_string();
        assert!(s.starts_with("read of 4096 bytes at 0x1000: "), "{s}");
        assert!(s.contains("os error 5"), "{s}");
    }
}
