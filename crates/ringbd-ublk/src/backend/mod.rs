//! The device's backing: any export backend of `ringbd serve`
//! (crates/ringbd-backend: memory, file, null, rbd, fault, and NBD exports),
//! driven through the same `Backend` trait the NBD server drives, in the
//! same three ways the server's io_uring engine drives it:
//!
//! - [`ring`]: a backend with a file behind it ([`Backend::backing_fd`]:
//!   files and block devices, `O_DIRECT` with `,direct`): every read, write,
//!   fdatasync and fallocate is an operation on the queue's own ring, on
//!   the request's own pages where the device is zero-copy.
//! - [`aio`]: a backend that runs its I/O asynchronously itself
//!   ([`Backend::aio`]: Ceph RBD through librbd, NBD exports through the
//!   client): operations are submitted from the queue's thread and their
//!   completions come back through a completion queue whose eventfd the
//!   queue's ring polls. No thread waits per request.
//! - [`inline`]: the rest (memory, null, fault wrappers): called on the queue's thread, one request at a time,
//!   as the server's engines call them; they answer from memory. A fault
//!   delay therefore holds that queue (as it holds a server ring).
//!
//! A backend error completes the request with its errno: the system
//! error's own where it has one, else the errno of its kind (a fault rule's
//! `@ENOSPC` reaches the writer as ENOSPC).

pub mod aio;
pub mod inline;
pub mod ring;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use ringbd_backend::{Backend, ErrorKind, Spec};

use crate::error::{Error, Result};
use crate::target::{QueueSetup, Target, TargetInfo};

pub use inline::errno_of;

/// How a backend's requests run (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Ring,
    Aio,
    Inline,
}

impl Path {
    pub fn of(backend: &dyn Backend) -> Path {
        if backend.aio().is_some() {
            Path::Aio
        } else if backend.backing_fd().is_some() {
            Path::Ring
        } else {
            Path::Inline
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Path::Ring => "file operations on the queue's ring",
            Path::Aio => "the backend's asynchronous I/O, completions polled on the queue's ring",
            Path::Inline => "backend calls on the queue's thread",
        }
    }
}

pub struct BackendTarget {
    backend: Arc<dyn Backend>,
    /// Served read-only (`--read-only`; the backend may allow writes: the
    /// server, too, refuses them above the backend).
    read_only: bool,
    path: Path,
}

impl BackendTarget {
    pub fn new(backend: Arc<dyn Backend>, read_only: bool) -> BackendTarget {
        let path = Path::of(&*backend);
        BackendTarget { backend, read_only, path }
    }

    /// Opens what `spec` names (`ceph`: how to reach an RBD image's cluster).
    pub fn open(spec: &Spec, read_only: bool, ceph: &ringbd_backend::CephConfig) -> Result<BackendTarget> {
        let backend = ringbd_backend::open_with(spec, read_only, ceph).map_err(|e| {
            let errno = match &e {
                ringbd_backend::SpecError::Open(b) => errno_of(b),
                ringbd_backend::SpecError::Syntax(_) => libc::EINVAL,
            };
            Error::msg(e.to_string(), errno)
        })?;
        Ok(BackendTarget::new(backend, read_only))
    }

    pub fn path(&self) -> Path {
        self.path
    }
}

/// Whether the data of `spec` lives only in this process (a memory
/// export, also under a fault wrapper): a restarted process starts empty,
/// so such a device must not be recovered.
pub fn is_volatile(spec: &Spec) -> bool {
    match spec {
        Spec::Memory(_) => true,
        Spec::Fault { inner, .. } => is_volatile(inner),
        _ => false,
    }
}

impl Target for BackendTarget {
    fn describe(&self) -> String {
        self.backend.describe()
    }

    fn info(&self) -> TargetInfo {
        let caps = self.backend.caps();
        // O_DIRECT: every request must be aligned as the file needs.
        let min_block_size = self.backend.direct_io().map_or(512, |d| d.align.max(512));
        TargetInfo {
            size: self.backend.size(),
            read_only: self.read_only || caps.read_only,
            flush: caps.flush,
            no_fua: !caps.fua,
            discard: caps.trim,
            write_zeroes: caps.write_zeroes,
            min_block_size,
            opt_io: self.backend.preferred_block_size().unwrap_or(0),
            // Only the ring path moves data with read_data/write_data; the
            // others hand the backend slices of the tag's buffer.
            zero_copy: self.path == Path::Ring,
        }
    }

    fn queue(&self, _q_id: u16, depth: u16) -> Result<QueueSetup> {
        let b = self.backend.clone();
        let dup = |fd: std::os::fd::BorrowedFd<'_>, what: &str| -> Result<OwnedFd> {
            fd.try_clone_to_owned().map_err(|e| Error::new(format!("{}: dup of its {what}", b.describe()), e))
        };
        Ok(match self.path {
            Path::Inline => {
                QueueSetup { handler: Box::new(inline::InlineQueue::new(b.clone())), files: Vec::new() }
            }
            Path::Ring => {
                // With `,direct` every request is aligned (min_block_size),
                // so all of them use the O_DIRECT descriptor.
                let fd = match (b.direct_io(), b.backing_fd()) {
                    (Some(d), _) => dup(d.fd, "O_DIRECT descriptor")?,
                    (None, Some(fd)) => dup(fd, "file")?,
                    (None, None) => return Err(Error::msg("backend has no file any more", libc::EIO)),
                };
                QueueSetup { handler: Box::new(ring::RingQueue::new(b.clone(), depth)), files: vec![fd] }
            }
            Path::Aio => {
                let q = aio::AioQueue::new(b.clone(), depth)?;
                let fd = dup(q.completions().as_fd(), "completion queue")?;
                QueueSetup { handler: Box::new(q), files: vec![fd] }
            }
        })
    }
}

/// Whether an `fallocate` error means the mode is unsupported (the
/// backend then knows the other ways).
fn fallocate_unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS))
}

/// A backend error as the error a request completes with.
fn backend_failure(tag: u16, e: &ringbd_backend::Error) -> Error {
    // The backend's error names the operation, the range and the cause.
    Error::msg(format!("tag {tag}: {e}"), errno_of(e))
}

/// The errno of a backend error's kind, where the error has no system
/// errno of its own.
fn kind_errno(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::Io => libc::EIO,
        ErrorKind::NoSpace => libc::ENOSPC,
        ErrorKind::Permission => libc::EPERM,
        ErrorKind::Unsupported => libc::EOPNOTSUPP,
        ErrorKind::Invalid => libc::EINVAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(spec: &str, read_only: bool) -> BackendTarget {
        let spec: Spec = spec.parse().unwrap();
        BackendTarget::open(&spec, read_only, &Default::default()).unwrap()
    }

    #[test]
    fn info_follows_the_backends_capabilities() {
        let t = target("memory:1M", false);
        let i = t.info();
        assert_eq!(i.size, 1 << 20);
        assert!(!i.read_only && i.discard && i.write_zeroes && !i.zero_copy);
        assert_eq!(t.path(), Path::Inline);
        assert!(target("memory:1M", true).info().read_only);
        let n = target("null:1G", false);
        assert_eq!((n.path(), n.info().size, n.info().zero_copy), (Path::Inline, 1 << 30, false));
    }

    #[test]
    fn files_run_on_the_ring_with_their_alignment() {
        let dir = std::env::temp_dir().join(format!("ringbd-ublk-backend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("disk.img");
        std::fs::File::create(&f).unwrap().set_len(1 << 20).unwrap();
        let t = target(&format!("file:{}", f.display()), false);
        let i = t.info();
        // Also on a memory filesystem (ublk's zero-copy needs ring operations).
        assert_eq!(t.path(), Path::Ring);
        assert!(i.zero_copy && i.flush && i.min_block_size == 512);
        assert_eq!(i.size, 1 << 20);
        assert_eq!(t.queue(0, 4).unwrap().files.len(), 1);
        // A fault wrapper must see every call: inline.
        let f = target(&format!("fault:write=1@ENOSPC:file:{}", f.display()), false);
        assert_eq!(f.path(), Path::Inline);
        assert!(f.queue(0, 4).unwrap().files.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_memory_is_volatile() {
        let v = |s: &str| is_volatile(&s.parse().unwrap());
        assert!(v("memory:1M") && v("mem:1M") && v("fault:write=1@ENOSPC:memory:1M"));
        assert!(!v("file:/x") && !v("fault:read=1:file:/x") && !v("null:1M") && !v("rbd:pool/img"));
        assert!(!v("nbd+unix:///x?socket=/s"));
    }

    #[test]
    fn open_errors_name_what_failed() {
        let spec: Spec = "file:/nonexistent/ringbd/disk.img".parse().unwrap();
        let e = BackendTarget::open(&spec, false, &Default::default()).err().unwrap();
        assert!(e.to_string().contains("/nonexistent/ringbd/disk.img"), "{e}");
    }
}
