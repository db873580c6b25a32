//! Any export backend of `ringbd serve` (crates/ringbd-backend: memory,
//! fault, and what they wrap) as a ublk target: the same `Backend` trait
//! the NBD server drives, called the same way.
//!
//! The calls run on the queue's thread, one request at a time, as the
//! server's engines run these backends inline: memory and its fault
//! wrapper answer from memory, without waiting for a device. A fault
//! delay therefore holds that queue (as it holds a server ring). Files
//! keep their own target (`file.rs`), whose reads and writes are ring
//! operations; NBD exports theirs (`nbd.rs`).
//!
//! A backend error completes the request with its errno: the system
//! error's own where it has one, else the errno of its kind (a fault
//! rule's `@ENOSPC` reaches the writer as ENOSPC).

use std::io;
use std::sync::Arc;

use ringbd_backend::{Backend, ErrorKind, ZeroFlags};
use ringbd_io::ublk::QueueRing;

use crate::error::{Error, Result};
use crate::target::{Op, QueueHandler, QueueSetup, Request, Step, Target, TargetInfo};

pub struct BackendTarget {
    backend: Arc<dyn Backend>,
    /// Served read-only (`--read-only`; the backend may allow writes: the
    /// server, too, refuses them above the backend).
    read_only: bool,
}

impl BackendTarget {
    pub fn new(backend: Arc<dyn Backend>, read_only: bool) -> BackendTarget {
        BackendTarget { backend, read_only }
    }
}

impl Target for BackendTarget {
    fn describe(&self) -> String {
        self.backend.describe()
    }

    fn info(&self) -> TargetInfo {
        let caps = self.backend.caps();
        TargetInfo {
            size: self.backend.size(),
            read_only: self.read_only || caps.read_only,
            flush: caps.flush,
            no_fua: !caps.fua,
            discard: caps.trim,
            write_zeroes: caps.write_zeroes,
            min_block_size: 512,
            // Data goes through the tag's buffer: the backend's calls take
            // slices.
            zero_copy: false,
            ..Default::default()
        }
    }

    fn queue(&self, _q_id: u16, _depth: u16) -> Result<QueueSetup> {
        Ok(QueueSetup {
            handler: Box::new(BackendQueue { backend: self.backend.clone() }),
            files: Vec::new(),
        })
    }
}

struct BackendQueue {
    backend: Arc<dyn Backend>,
}

/// The errno a backend error completes a request with.
pub fn errno_of(e: &ringbd_backend::Error) -> i32 {
    match e.source.raw_os_error().filter(|&n| n > 0) {
        Some(n) => n,
        None => match e.kind {
            ErrorKind::Io => libc::EIO,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Permission => libc::EPERM,
            ErrorKind::Unsupported => libc::EOPNOTSUPP,
            ErrorKind::Invalid => libc::EINVAL,
        },
    }
}

impl BackendQueue {
    fn call(&self, ring: &mut QueueRing, tag: u16, req: &Request) -> std::result::Result<u32, Step> {
        let b = &*self.backend;
        let len = req.len as usize;
        let no_buffer =
            || Step::Failed(Error::msg(format!("tag {tag}: {}: no buffer", req.describe()), libc::EIO));
        let r = match req.op {
            Op::Read => {
                let buf = ring.buf_mut(tag).and_then(|b| b.get_mut(..len)).ok_or_else(no_buffer)?;
                b.read(req.offset, buf).map(|_holes| req.len)
            }
            Op::Write => {
                let buf = ring.buf(tag).and_then(|b| b.get(..len)).ok_or_else(no_buffer)?;
                b.write(req.offset, buf, req.fua).map(|()| req.len)
            }
            Op::Flush => b.flush().map(|()| 0),
            Op::Discard => b.trim(req.offset, u64::from(req.len), req.fua).map(|()| 0),
            Op::WriteZeroes => {
                let flags = ZeroFlags { fua: req.fua, no_hole: req.no_unmap, fast: false };
                b.write_zeroes(req.offset, u64::from(req.len), flags).map(|()| 0)
            }
            Op::Other(_) => return Err(Step::Failed(Error::msg(req.describe(), libc::EOPNOTSUPP))),
        };
        // The backend's error names the operation, the range and the cause.
        r.map_err(|e| Step::Failed(Error::msg(format!("tag {tag}: {e}"), errno_of(&e))))
    }
}

impl QueueHandler for BackendQueue {
    fn start(&mut self, ring: &mut QueueRing, tag: u16, req: &Request) -> Step {
        match self.call(ring, tag, req) {
            Ok(n) => Step::Done(n),
            Err(step) => step,
        }
    }

    fn op_done(&mut self, _ring: &mut QueueRing, tag: u16, cookie: u32, _r: io::Result<u32>) -> Step {
        Step::Failed(Error::msg(
            format!("tag {tag}: a backend target got a completion it never asked for ({cookie})"),
            libc::EIO,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_complete_with_their_own_errno_or_their_kinds() {
        use ringbd_backend::{Error as BError, Op as BOp};
        let own = BError::new(BOp::Write, 0, 512, io::Error::from_raw_os_error(libc::EDQUOT));
        assert_eq!(errno_of(&own), libc::EDQUOT);
        let kinds = [
            (ErrorKind::Io, libc::EIO),
            (ErrorKind::NoSpace, libc::ENOSPC),
            (ErrorKind::Permission, libc::EPERM),
            (ErrorKind::Unsupported, libc::EOPNOTSUPP),
            (ErrorKind::Invalid, libc::EINVAL),
        ];
        for (kind, errno) in kinds {
            assert_eq!(errno_of(&BError::other(kind, BOp::Write, 0, 512, "injected")), errno, "{kind:?}");
        }
    }

    #[test]
    fn info_follows_the_backends_capabilities() {
        let spec: ringbd_backend::Spec = "memory:1M".parse().unwrap();
        let t = BackendTarget::new(ringbd_backend::open(&spec, false).unwrap(), false);
        let i = t.info();
        assert_eq!(i.size, 1 << 20);
        assert!(!i.read_only && i.discard && i.write_zeroes && !i.zero_copy);
        let ro = BackendTarget::new(ringbd_backend::open(&spec, true).unwrap(), true);
        assert!(ro.info().read_only);
    }
}
