//! Storage backends behind one small trait.
//!
//! - [`memory`]: sparse RAM, allocated in pages on first write.
//! - [`file`](mod@file): a regular file or block device.
//! - [`null`]: discards writes, reads zeroes.
//! - [`fault`]: a wrapper that injects errors and delays into another backend.
//! - [`rbd`]: Ceph RBD images through librbd (feature `rbd`; spec parsing always).
//! - [`nbd`]: another server's NBD export (a proxy), through ringbd's client.
//! - [`qcow2`]: qcow2 images (read-write) and their backing chains.
//! - [`spec`]: parses export specs (`memory:1G`, `file:PATH[,direct]`, `null:1G`,
//!   `qcow2:PATH`, `rbd:POOL/IMAGE[@SNAP]`, `fault:RULES:SPEC`, NBD URIs).
//!
//! A backend declares what it can do in [`Caps`]; the server advertises
//! exactly that and never calls what is not declared.
//!
//! No `unsafe` here but in `rbd/librbd.rs`, librbd's C API made safe
//! (`#[allow(unsafe_code)]`, feature `rbd`); system calls are `ringbd_io`'s.
#![deny(unsafe_code)]

pub mod aio;
pub mod blocking;
pub mod error;
pub mod fault;
pub mod file;
pub mod memory;
pub mod nbd;
pub mod null;
pub mod qcow2;
pub mod rbd;
pub mod spec;

use std::ops::Range;

pub use error::{Error, ErrorKind, Op, Result};
pub use file::DirectIo;
pub use rbd::CephConfig;
pub use spec::{open, open_with, parse_size, Spec, SpecError};

/// What a backend supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    pub read_only: bool,
    pub flush: bool,
    pub fua: bool,
    pub trim: bool,
    pub write_zeroes: bool,
    /// `write_zeroes` with `fast` either succeeds quickly or fails with
    /// [`ErrorKind::Unsupported`] without touching data.
    pub fast_zero: bool,
    pub cache: bool,
    /// One backend instance is safely shared by many connections, and a
    /// flush on any of them covers writes completed on all of them.
    pub multi_conn: bool,
    /// `extents` reports real allocation (holes and zeroes).
    pub extents: bool,
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// Make the range durable before returning.
    pub fua: bool,
    /// The range must stay allocated (no hole may be punched).
    pub no_hole: bool,
    /// Fail with [`ErrorKind::Unsupported`] unless zeroing is fast.
    pub fast: bool,
}

/// One extent of allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Not allocated in the backing store.
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

/// Ranges of a read buffer that the backend knows to be zero because
/// nothing is stored there (sparse regions). The buffer is zero-filled there
/// too; a server may send these as holes instead of data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holes(pub Vec<Range<usize>>);

impl Holes {
    /// Records `range`, merging with the previous one when adjacent.
    pub fn push(&mut self, range: Range<usize>) {
        if let Some(last) = self.0.last_mut() {
            if last.end == range.start {
                last.end = range.end;
                return;
            }
        }
        self.0.push(range);
    }
}

/// A piece of a zero-copy read: the backend's own memory (kept alive by the
/// reference count, never written in place while shared) or a known-zero run.
#[derive(Debug, Clone)]
pub enum Piece {
    /// `len` bytes reading as zero (nothing stored: a hole).
    Zero(usize),
    Shared {
        page: memory::Page,
        start: usize,
        len: usize,
    },
}

impl Piece {
    pub fn len(&self) -> usize {
        match self {
            Piece::Zero(n) => *n,
            Piece::Shared { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, or `None` for a zero run.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Piece::Zero(_) => None,
            Piece::Shared { page, start, len } => page.get(*start..*start + *len),
        }
    }
}

/// A storage backend. Offsets and lengths are already validated against
/// [`Backend::size`] by the caller; implementations still never panic on them.
pub trait Backend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// What this backend supports.
    fn caps(&self) -> Caps;
    /// A short human description (shown to clients as the export description).
    fn describe(&self) -> String;
    /// Fills `buf` from `offset`; reports the sparse ranges it zero-filled.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Holes>;
    /// Zero-copy read for backends whose data already sits in memory:
    /// appends pieces covering `[offset, offset+len)` in order and returns
    /// true; returns false (appending nothing) when the backend cannot.
    fn read_shared(&self, offset: u64, len: usize, out: &mut Vec<Piece>) -> Result<bool> {
        let _ = (offset, len, out);
        Ok(false)
    }

    /// The open file behind the export, for engines that run reads, writes
    /// and flushes themselves (io_uring), when those can wait for a device;
    /// `None` for memory, null, and files on memory filesystems.
    fn file_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    /// The open file behind the export, on whatever filesystem (unlike
    /// [`Backend::file_fd`], also on memory filesystems): for a frontend that
    /// runs reads and writes as ring operations even where they never wait
    /// (ublk's zero-copy moves a request's own pages only that way). `None`
    /// for backends without one, and for wrappers that must see every call.
    fn backing_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.file_fd()
    }

    /// For `file:PATH,direct`: the `O_DIRECT` descriptor that aligned reads
    /// and writes should use instead of [`Backend::file_fd`].
    fn direct_io(&self) -> Option<file::DirectIo<'_>> {
        None
    }

    /// For engines that run trims and zeroing on [`Backend::file_fd`] as
    /// `fallocate` operations: the mode [`Backend::write_zeroes`] tries first
    /// (a trim is always a punched hole). Where that mode is refused as
    /// unsupported, the engine falls back to calling the backend, which
    /// knows the other ways. `None`: never run them outside the backend.
    /// (Asynchronous backends take zeroing as a [`BlockOp`], flags and all.)
    fn zero_mode(&self, no_hole: bool) -> Option<ringbd_io::fs::Fallocate> {
        let _ = no_hole;
        None
    }

    /// For backends whose I/O runs asynchronously in a library of their own
    /// (RBD, the NBD client): engines start reads, writes, flushes, trims
    /// and zeroing there ([`AsyncIo::submit`]) instead of calling the
    /// blocking methods.
    fn aio(&self) -> Option<&dyn AsyncIo> {
        None
    }

    /// The `NBD_INFO_BLOCK_SIZE` preferred size, when the backend has a
    /// natural one (an RBD object); `None`: 4096.
    fn preferred_block_size(&self) -> Option<u32> {
        None
    }

    /// Writes `data` at `offset`; with `fua`, durable before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Discards a range (a hint; contents afterwards are unspecified).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()>;
    /// Makes a range read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()>;
    /// Prefetch hint.
    fn cache(&self, offset: u64, len: u64) -> Result<()>;
    /// Allocation status from `offset`, covering at least one byte and at
    /// most about `len` bytes (the last extent may run past `offset + len`).
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
}

/// One operation of a backend's asynchronous I/O ([`AsyncIo::submit`]), in
/// the block layer's words: what the client asked for, flags and all, not
/// how a file would run it (that is [`ringbd_io::uring::FileOp`], for
/// engines that run a file's operations on their own ring).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    /// Fill `buf[at..]` from `offset`.
    Read { offset: u64, at: usize },
    /// Write `buf[at..]` at `offset`; with `fua`, durable before completion.
    Write { offset: u64, at: usize, fua: bool },
    /// Make every completed write durable.
    Flush,
    /// Discard a range (a hint).
    Trim { offset: u64, len: u64 },
    /// Make a range read as zeroes. `no_hole`: keep it allocated; `fast`:
    /// fail with `EOPNOTSUPP`, touching nothing, unless that is quick.
    /// (FUA is a following [`BlockOp::Flush`], as for trims.)
    WriteZeroes { offset: u64, len: u64, no_hole: bool, fast: bool },
}

/// Asynchronous operations of a backend ([`Backend::aio`]).
pub trait AsyncIo: Send + Sync {
    /// Starts `op` on `buf`. The result (bytes of `buf[at..]` moved for
    /// reads and writes, else 0, or the errno) and `buf` go to `sink`, from
    /// any thread, or at once from this one if the operation cannot start.
    fn submit(&self, op: BlockOp, buf: ringbd_io::buf::IoBuf, sink: crate::aio::Sink);

    /// Starts [`Backend::extents`]`(offset, len)`, which may have to wait for
    /// the storage (RBD without its object map lists objects on the OSDs).
    /// The count of extents and a buffer holding them ([`extents_to_buf`])
    /// go to `sink`, from any thread; an error goes there as the result.
    fn submit_extents(&self, offset: u64, len: u64, sink: crate::aio::Sink);

    /// A driver for the calling thread ([`aio::LocalIo`]), for a caller that
    /// polls `queue` on its own ring; `None` (the default): the caller
    /// submits through [`AsyncIo::submit`]. Call it from the thread that
    /// will drive it.
    fn local(&self, queue: &std::sync::Arc<aio::CompletionQueue>) -> Option<Box<dyn aio::LocalIo>> {
        let _ = queue;
        None
    }
}

/// Bytes of one extent in [`extents_to_buf`]'s layout: the length, then
/// the flags (bit 0 hole, bit 1 zero), both little-endian `u64`.
const EXTENT_RECORD: usize = 16;

/// Lays extents out in a buffer, to travel through a completion
/// ([`AsyncIo::submit_extents`]); [`extents_from_buf`] reads them back.
pub fn extents_to_buf(extents: &[Extent]) -> ringbd_io::buf::IoBuf {
    let mut b = Vec::with_capacity(extents.len() * EXTENT_RECORD);
    for e in extents {
        b.extend_from_slice(&e.len.to_le_bytes());
        b.extend_from_slice(&(u64::from(e.hole) | u64::from(e.zero) << 1).to_le_bytes());
    }
    ringbd_io::buf::IoBuf::from_slice(&b)
}

/// The extents in `buf` ([`extents_to_buf`]); a trailing partial record is
/// ignored.
pub fn extents_from_buf(buf: &[u8]) -> Vec<Extent> {
    buf.chunks_exact(EXTENT_RECORD)
        .map(|r| {
            let (len, flags) = r.split_at(8);
            let word = |b: &[u8]| b.try_into().map(u64::from_le_bytes).unwrap_or(0);
            let flags = word(flags);
            Extent { len: word(len), hole: flags & 1 != 0, zero: flags & 2 != 0 }
        })
        .collect()
}

/// Most extents any backend returns from one `extents` call.
pub const MAX_EXTENTS: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_survive_a_buffer() {
        let e = [
            Extent { len: 4096, hole: true, zero: true },
            Extent { len: u64::MAX, hole: false, zero: false },
            Extent { len: 1, hole: false, zero: true },
        ];
        let buf = extents_to_buf(&e);
        assert_eq!(buf.len(), 3 * EXTENT_RECORD);
        assert_eq!(&buf[..16], [0, 0x10, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(extents_from_buf(&buf), e);
        // A torn record is dropped, never misread.
        assert_eq!(extents_from_buf(&buf[..40]), e[..2]);
        assert!(extents_from_buf(&[]).is_empty());
    }
}
