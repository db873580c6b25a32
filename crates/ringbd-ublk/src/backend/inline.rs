//! Backends that answer from memory (memory, null, fault wrappers, files
//! on memory filesystems): each request is one call on the queue's thread,
//! on the tag's buffer.

use std::io;
use std::sync::Arc;

use crate::kernel::QueueRing;
use ringbd_backend::{Backend, ZeroFlags};

use super::{backend_failure, kind_errno};
use crate::error::Error;
use crate::target::{Op, QueueHandler, Request, Step};

pub struct InlineQueue {
    backend: Arc<dyn Backend>,
}

impl InlineQueue {
    pub fn new(backend: Arc<dyn Backend>) -> InlineQueue {
        InlineQueue { backend }
    }
}

/// The errno a backend error completes a request with.
pub fn errno_of(e: &ringbd_backend::Error) -> i32 {
    match e.source.raw_os_error().filter(|&n| n > 0) {
        Some(n) => n,
        None => kind_errno(e.kind),
    }
}

impl InlineQueue {
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
        r.map_err(|e| Step::Failed(backend_failure(tag, &e)))
    }
}

impl QueueHandler for InlineQueue {
    fn start(&mut self, ring: &mut QueueRing, tag: u16, req: &Request) -> Step {
        match self.call(ring, tag, req) {
            Ok(n) => Step::Done(n),
            Err(step) => step,
        }
    }

    fn op_done(&mut self, _ring: &mut QueueRing, tag: u16, cookie: u32, _r: io::Result<u32>) -> Step {
        Step::Failed(Error::msg(
            format!("tag {tag}: an inline backend got a completion it never asked for ({cookie})"),
            libc::EIO,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringbd_backend::ErrorKind;

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
}
