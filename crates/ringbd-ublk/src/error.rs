//! Errors of the ublk frontend: what was being done (device, queue, tag,
//! op, offset, length) plus the system error underneath, and the errno
//! that completes a failed request.

use std::fmt;
use std::io;

/// An error with its context.
#[derive(Debug)]
pub struct Error {
    context: String,
    source: io::Error,
    /// False for [`Error::msg`]: the errno only says how a request fails.
    show_source: bool,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(context: impl Into<String>, source: io::Error) -> Error {
        Error { context: context.into(), source, show_source: true }
    }

    /// An error with no system error under it (bad input, a state problem).
    pub fn msg(context: impl Into<String>, errno: i32) -> Error {
        let context = context.into();
        Error { source: io::Error::from_raw_os_error(errno), context, show_source: false }
    }

    /// The errno a request failing with this error completes with (EIO if
    /// the source carries none).
    pub fn errno(&self) -> i32 {
        self.source.raw_os_error().filter(|&e| e > 0).unwrap_or(libc::EIO)
    }

    pub fn source_error(&self) -> &io::Error {
        &self.source
    }

    pub fn context(&self) -> &str {
        &self.context
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.show_source {
            write!(f, "{}: {}", self.context, self.source)
        } else {
            f.write_str(&self.context)
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        if self.show_source {
            Some(&self.source)
        } else {
            None
        }
    }
}

/// Adds context to an `io::Result`.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::new(what(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_comes_from_the_source_or_is_eio() {
        let e = Error::new("read 4096 bytes at 0x1000", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(Error::new("x", io::Error::other("no errno")).errno(), libc::EIO);
        assert!(e.to_string().starts_with("read 4096 bytes at 0x1000: "));
        let m = Error::msg("--depth 0: must be 1..=4096", libc::EINVAL);
        assert_eq!(m.to_string(), "--depth 0: must be 1..=4096");
        assert_eq!(m.errno(), libc::EINVAL);
    }
}
