//! Data cluster I/O on a ring ([`AsyncIo::local`](crate::AsyncIo::local)),
//! for images whose file can make a reader wait (not on a memory
//! filesystem, or `,direct`): a server worker or a ublk queue owns a
//! [`Driver`] with a [`FileRing`] of its thread's.
//!
//! - A read is mapped under the metadata read lock: runs of data clusters
//!   become segments of the request's buffer on the ring (the `O_DIRECT`
//!   descriptor where aligned); zero and unallocated clusters are filled
//!   there and then; clusters of a backing file or compressed ones are
//!   read inline, as before.
//! - An overwrite of clusters the image owns ([`Image::overwrite_runs`])
//!   of an image open `O_DIRECT` is mapped the same way and written on the
//!   ring (a buffered overwrite is a `pwrite`: it waits for no device).
//! - An allocating write of such an image whose clusters all need new ones
//!   reserves them under the write lock (completing partial clusters in a
//!   copy, from what the guest read there), writes on the ring, and commits
//!   its L2 entries when the data is written ([`Image::commit`]: a cluster
//!   whose entry changed meanwhile keeps the change, and the write's own
//!   bytes are written again over it, so two writes racing for one new
//!   cluster both land).
//! - Other writes (a range mixing owned and new clusters, buffered
//!   allocating writes), zeroing, discards, flushes and block status stay
//!   calls on the caller's thread.
//! - The ring's completions signal the caller's completion eventfd
//!   ([`FileRing::notify`]); the caller then drives the driver.
//!
//! Mapped operations outlive the lock, so a cluster they target may be
//! freed (a discard, a copy-on-write) while they run. [`Epochs`] keeps such
//! a cluster from being reused until they are done: a flush defers its
//! frees with the current generation, and applies them only once no
//! operation mapped in that generation or before is in flight. Nothing
//! waits: a later flush applies what an earlier one had to leave.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use ringbd_io::buf::IoBuf;
use ringbd_io::file_ring::{FileDone, FileRing, Segment};

use super::image::{Image, Meta, Run};
use super::write::Reserved;
use super::Export;
use crate::aio::{AioDone, CompletionQueue, LocalIo};
use crate::{Backend, BlockOp, ErrorKind, ZeroFlags};

/// Submissions one driver's ring holds (more are submitted in batches).
const RING_ENTRIES: u32 = 256;

/// Generations of mapped operations (see the module documentation).
///
/// Operations are counted in the slot of the generation they were mapped
/// in. The generation only moves on (under the metadata write lock) when
/// the slot it moves into is empty, so the two slots hold the current
/// generation and the one before it, and every older generation is done.
#[derive(Debug, Default)]
pub struct Epochs {
    current: AtomicU64,
    count: [AtomicUsize; 2],
}

/// An operation mapped in one generation; dropping it ends it.
pub struct Mapped {
    epochs: Arc<Epochs>,
    slot: usize,
}

impl Drop for Mapped {
    fn drop(&mut self) {
        self.epochs.count[self.slot].fetch_sub(1, Ordering::AcqRel);
    }
}

impl Epochs {
    /// Counts an operation mapped now. `_m` is the proof that the metadata
    /// read lock is held: the generation cannot move meanwhile.
    pub(super) fn enter(self: &Arc<Self>, _m: &Meta) -> Mapped {
        let slot = (self.current.load(Ordering::Acquire) & 1) as usize;
        self.count[slot].fetch_add(1, Ordering::AcqRel);
        Mapped { epochs: self.clone(), slot }
    }

    /// With the write lock held: moves to the next generation if the one
    /// before the current is done. Returns the generation current before
    /// the call (frees deferred now are tagged with it) and the newest
    /// generation whose operations, and all before it, are done, if any.
    pub(super) fn advance(&self) -> (u64, Option<u64>) {
        let now = self.current.load(Ordering::Acquire);
        let idle = |g: u64| self.count[(g & 1) as usize].load(Ordering::Acquire) == 0;
        let mut cur = now;
        if now == 0 || idle(now - 1) {
            cur = now + 1;
            self.current.store(cur, Ordering::Release);
        }
        // Generations up to cur - 2 are done by construction.
        let done = if idle(cur) && idle(cur - 1) {
            Some(cur)
        } else if idle(cur - 1) {
            Some(cur - 1)
        } else {
            cur.checked_sub(2)
        };
        (now, done)
    }

    /// Operations in flight (tests).
    #[cfg(test)]
    pub(super) fn inflight(&self) -> usize {
        self.count.iter().map(|c| c.load(Ordering::Acquire)).sum()
    }
}

/// How one piece of a read is served.
enum ReadPiece {
    Ring(Segment),
    Zero { at: usize, len: usize },
    Inline { voff: u64, at: usize, len: usize },
}

impl Image {
    /// The segment of `len` bytes at `host` to or from `buf[at..]`: the
    /// `O_DIRECT` descriptor where offset, length and memory are aligned.
    fn segment(&self, host: u64, buf: &IoBuf, at: usize, len: usize) -> Option<Segment> {
        let piece = buf.get(at..at + len)?;
        let file = match &self.direct {
            Some(d) if d.fits(host, piece) => {
                d.ops.fetch_add(1, Ordering::Relaxed);
                d.file.clone()
            }
            _ => self.ring_file.clone()?,
        };
        Some(Segment { file, offset: host, at, len })
    }

    /// How to read `buf[at..]` from guest `offset`, the metadata locked.
    fn map_read(&self, m: &Meta, offset: u64, buf: &IoBuf, at: usize) -> io::Result<Vec<ReadPiece>> {
        let len = buf.len().saturating_sub(at);
        // Past the virtual size (a chain's backing file shorter than the
        // image, or a caller's bad range): zeroes, as `read_clamped` reads.
        let inside = self.header.size.saturating_sub(offset).min(len as u64) as usize;
        let mut pieces = Vec::new();
        let mut pos = 0usize;
        while pos < inside {
            let voff = offset + pos as u64;
            let (run, n) = self.run(m, voff, (inside - pos) as u64)?;
            let n = n as usize;
            let p = match run {
                Run::Data(host) => match self.segment(host, buf, at + pos, n) {
                    Some(s) => ReadPiece::Ring(s),
                    None => ReadPiece::Inline { voff, at: at + pos, len: n },
                },
                Run::Zero => ReadPiece::Zero { at: at + pos, len: n },
                Run::Backing if self.backing.is_none() => ReadPiece::Zero { at: at + pos, len: n },
                Run::Backing | Run::Compressed { .. } => ReadPiece::Inline { voff, at: at + pos, len: n },
            };
            pieces.push(p);
            pos += n;
        }
        if inside < len {
            pieces.push(ReadPiece::Zero { at: at + inside, len: len - inside });
        }
        Ok(pieces)
    }

    /// Whether `[offset, offset + len)` stores nothing at all (zero
    /// clusters, unallocated without a backing file): it reads as one hole.
    pub(super) fn all_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let m = self.meta();
        let end = offset.saturating_add(len).min(self.header.size);
        let mut pos = offset;
        while pos < end {
            let (run, n) = self.run(&m, pos, end - pos)?;
            match run {
                Run::Zero => {}
                Run::Backing if self.backing.is_none() => {}
                _ => return Ok(false),
            }
            pos += n;
        }
        Ok(true)
    }
}

/// One operation on the ring.
struct Pending {
    tag: u64,
    /// Ends the operation's generation count when dropped (operations on
    /// clusters the tables reference).
    mapped: Option<Mapped>,
    /// A FUA write: flushed once the data is written.
    fua: bool,
    /// Bytes of `buf[at..]` the caller asked for (the result on success).
    len: usize,
    /// An allocating write: committed when its data is written.
    alloc: Option<Alloc>,
}

/// An allocating write on the ring ([`Image::reserve`]).
struct Alloc {
    reserved: Reserved,
    offset: u64,
    at: usize,
    /// The caller's buffer, when the ring writes a completed copy of it.
    request: Option<IoBuf>,
}

/// A worker's or queue's ring for one qcow2 export.
pub struct Driver {
    /// First: dropping it waits for the kernel to finish with every buffer
    /// and file, before the generation counts below are released.
    ring: FileRing,
    pending: Vec<Option<Pending>>,
    free: Vec<u32>,
    /// Operations that ended at submission (calls, refusals).
    ready: Vec<AioDone>,
    scratch: Vec<FileDone>,
    export: Arc<Export>,
}

impl Driver {
    pub(super) fn new(export: Arc<Export>, queue: &Arc<CompletionQueue>) -> io::Result<Driver> {
        let ring = FileRing::new(RING_ENTRIES)?;
        ring.notify(std::os::fd::AsFd::as_fd(&**queue))?;
        Ok(Driver {
            ring,
            pending: Vec::new(),
            free: Vec::new(),
            ready: Vec::new(),
            scratch: Vec::new(),
            export,
        })
    }

    fn slot(&mut self, p: Pending) -> u64 {
        match self.free.pop() {
            Some(i) => {
                self.pending[i as usize] = Some(p);
                u64::from(i)
            }
            None => {
                self.pending.push(Some(p));
                (self.pending.len() - 1) as u64
            }
        }
    }

    /// A read: data runs on the ring, the rest here.
    fn read(&mut self, offset: u64, mut buf: IoBuf, at: usize, tag: u64) {
        let image = &self.export.top;
        let len = buf.len().saturating_sub(at);
        let m = image.meta();
        let pieces = match image.map_read(&m, offset, &buf, at) {
            Ok(p) => p,
            Err(e) => {
                drop(m);
                return self.fail(tag, crate::Error::new(crate::Op::Read, offset, len as u64, e), buf);
            }
        };
        let mut segs = Vec::new();
        for p in pieces {
            match p {
                ReadPiece::Ring(s) => segs.push(s),
                ReadPiece::Zero { at, len } => buf[at..at + len].fill(0),
                ReadPiece::Inline { voff, at: a, len: n } => {
                    let mut holes = crate::Holes::default();
                    if let Err(e) = image.read_in(&m, voff, &mut buf[a..a + n], 0, &mut holes) {
                        drop(m);
                        let e = crate::Error::new(crate::Op::Read, offset, len as u64, e);
                        return self.fail(tag, e, buf);
                    }
                }
            }
        }
        if segs.is_empty() {
            drop(m);
            return self.ready.push(AioDone { tag, result: Ok(len), buf });
        }
        let mapped = image.epochs.enter(&m);
        drop(m);
        let slot = self.slot(Pending { tag, mapped: Some(mapped), fua: false, len, alloc: None });
        self.ring.read(slot, buf, segs);
    }

    /// A write of an image open `O_DIRECT`: on the ring when it overwrites
    /// clusters the image owns or allocates new ones for all of its range;
    /// other writes are calls (a range of both kinds; any buffered write,
    /// which goes to the page cache). A buffered write waits for no device, and
    /// on filesystems without asynchronous buffered writes (ext4) io_uring
    /// hands it to a worker thread: half the IOPS of the `pwrite`
    /// (docs/benchmarks.md, "qcow2 images on a disk").
    fn write(&mut self, offset: u64, mut buf: IoBuf, at: usize, fua: bool, tag: u64) {
        let image = &self.export.top;
        let len = buf.len().saturating_sub(at);
        if !self.export.read_only && image.direct.is_some() {
            let m = image.meta();
            let segs = match image.overwrite_runs(&m, offset, len as u64) {
                Ok(Some(runs)) => runs
                    .into_iter()
                    .map(|(host, from, n)| image.segment(host, &buf, at + from, n))
                    .collect::<Option<Vec<Segment>>>(),
                Ok(None) => None,
                Err(e) => {
                    drop(m);
                    return self.fail(tag, crate::Error::new(crate::Op::Write, offset, len as u64, e), buf);
                }
            };
            if let Some(segs) = segs {
                let mapped = image.epochs.enter(&m);
                drop(m);
                let slot = self.slot(Pending { tag, mapped: Some(mapped), fua, len, alloc: None });
                return self.ring.write(slot, buf, segs);
            }
            drop(m);
            match self.allocate(offset, buf, at, fua, tag) {
                None => return,
                Some(b) => buf = b,
            }
        }
        let r = self.export.write(offset, buf.get(at..).unwrap_or_default(), fua);
        self.call_done(tag, r.map(|()| len), buf);
    }

    /// An allocating write on the ring: new clusters reserved under the
    /// write lock, the data written outside it, the entries committed when
    /// it is done. Gives `buf` back when the write is not one (a cluster
    /// the image owns is in the range: a call writes it).
    fn allocate(&mut self, offset: u64, buf: IoBuf, at: usize, fua: bool, tag: u64) -> Option<IoBuf> {
        let image = &self.export.top;
        let len = buf.len().saturating_sub(at);
        let mut m = image.meta_mut();
        let (reserved, bounce) = match image.reserve(&mut m, offset, buf.get(at..).unwrap_or_default()) {
            Ok(Some(r)) => r,
            Ok(None) => return Some(buf),
            Err(e) => {
                drop(m);
                self.fail(tag, crate::Error::new(crate::Op::Write, offset, len as u64, e), buf);
                return None;
            }
        };
        drop(m);
        let (ring_buf, request, from, n) = match bounce {
            Some(b) => {
                let n = b.len();
                (b, Some(buf), 0, n)
            }
            None => (buf, None, at, len),
        };
        let Some(seg) = image.segment(reserved.host, &ring_buf, from, n) else {
            // No file to put on a ring (not for an image on disk).
            image.unreserve(&mut image.meta_mut(), &reserved);
            let buf = request.unwrap_or(ring_buf);
            return Some(buf);
        };
        let alloc = Alloc { reserved, offset, at, request };
        let slot = self.slot(Pending { tag, mapped: None, fua, len, alloc: Some(alloc) });
        self.ring.write(slot, ring_buf, vec![seg]);
        None
    }

    /// An allocating write's data is written (`written`), or it failed
    /// and its clusters go: its entries.
    fn commit(&self, a: &Alloc, written: bool, ring_buf: &IoBuf) -> io::Result<()> {
        let image = &self.export.top;
        let mut m = image.meta_mut();
        if !written {
            image.unreserve(&mut m, &a.reserved);
            return Ok(());
        }
        let data = a.request.as_ref().unwrap_or(ring_buf).get(a.at..).unwrap_or_default();
        image.commit(&mut m, &a.reserved, a.offset, data)
    }

    fn call_done(&mut self, tag: u64, r: crate::Result<usize>, buf: IoBuf) {
        match r {
            Ok(n) => self.ready.push(AioDone { tag, result: Ok(n), buf }),
            Err(e) => self.fail(tag, e, buf),
        }
    }

    fn fail(&mut self, tag: u64, e: crate::Error, buf: IoBuf) {
        self.ready.push(AioDone { tag, result: Err(to_errno(&self.export, e)), buf });
    }
}

/// The errno a caller of the asynchronous interface gets for `e` (its
/// result is an `io::Error`, which carries either an errno or a message):
/// the system call's own, or the kind's. What only the message said (a
/// corrupt table) is logged here, where it is known.
pub(super) fn to_errno(export: &Export, e: crate::Error) -> io::Error {
    if let Some(n) = e.source.raw_os_error() {
        return io::Error::from_raw_os_error(n);
    }
    let errno = match e.kind {
        ErrorKind::Io => libc::EIO,
        ErrorKind::NoSpace => libc::ENOSPC,
        ErrorKind::Permission => libc::EPERM,
        ErrorKind::Unsupported => libc::EOPNOTSUPP,
        ErrorKind::Invalid => libc::EINVAL,
    };
    if e.kind != ErrorKind::Unsupported {
        tracing::warn!(image = %export.top.path.display(), "qcow2: {e}");
    }
    io::Error::from_raw_os_error(errno)
}

/// The operations that are calls on the caller's thread (for the driver,
/// and for [`AsyncIo::submit`](crate::AsyncIo::submit) without one): the
/// result for `buf`, as an [`AioDone`] would carry it.
pub(super) fn call(export: &Export, op: BlockOp, buf: &mut IoBuf) -> crate::Result<usize> {
    match op {
        BlockOp::Read { offset, at } => {
            let piece = buf.get_mut(at..).unwrap_or_default();
            let n = piece.len();
            export.read(offset, piece).map(|_| n)
        }
        BlockOp::Write { offset, at, fua } => {
            let piece = buf.get(at..).unwrap_or_default();
            export.write(offset, piece, fua).map(|()| piece.len())
        }
        BlockOp::Flush => export.flush().map(|()| 0),
        BlockOp::Trim { offset, len } => export.trim(offset, len, false).map(|()| 0),
        BlockOp::WriteZeroes { offset, len, no_hole, fast } => {
            export.write_zeroes(offset, len, ZeroFlags { fua: false, no_hole, fast }).map(|()| 0)
        }
    }
}

/// Block status as the asynchronous interface returns it.
pub(super) fn extents(export: &Export, offset: u64, len: u64) -> (io::Result<usize>, IoBuf) {
    match export.extents(offset, len) {
        Ok(e) => (Ok(e.len()), crate::extents_to_buf(&e)),
        Err(e) => (Err(to_errno(export, e)), IoBuf::new()),
    }
}

impl Drop for Driver {
    /// Operations still on the ring finish first, and the allocating
    /// writes among them commit: a worker that stops with writes in flight
    /// leaves no reserved cluster unreferenced (a leak).
    fn drop(&mut self) {
        let mut out = Vec::new();
        for _ in 0..100_000 {
            self.drive(&mut out);
            out.clear();
            if self.ring.operations() == 0 {
                return;
            }
            if let Err(e) = self.ring.wait() {
                tracing::warn!(image = %self.export.top.path.display(), "qcow2: waiting for the ring: {e}");
                return;
            }
        }
    }
}

impl LocalIo for Driver {
    fn submit(&mut self, op: BlockOp, mut buf: IoBuf, tag: u64) {
        match op {
            BlockOp::Read { offset, at } => self.read(offset, buf, at, tag),
            BlockOp::Write { offset, at, fua } => self.write(offset, buf, at, fua, tag),
            op => {
                let r = call(&self.export, op, &mut buf);
                self.call_done(tag, r, buf);
            }
        }
    }

    fn submit_extents(&mut self, offset: u64, len: u64, tag: u64) {
        let (result, buf) = extents(&self.export, offset, len);
        self.ready.push(AioDone { tag, result, buf });
    }

    fn drive(&mut self, out: &mut Vec<AioDone>) {
        out.append(&mut self.ready);
        if let Err(e) = self.ring.drive(&mut self.scratch) {
            tracing::warn!(image = %self.export.top.path.display(), "qcow2: submitting to the ring: {e}");
        }
        for d in std::mem::take(&mut self.scratch) {
            let Some(mut p) = self.pending.get_mut(d.tag as usize).and_then(Option::take) else { continue };
            self.free.push(d.tag as u32);
            let mut result = d.result.map(|_| p.len);
            let mut buf = d.buf;
            if let Some(a) = p.alloc.take() {
                if let Err(e) = self.commit(&a, result.is_ok(), &buf) {
                    let e = crate::Error::new(crate::Op::Write, a.offset, p.len as u64, e);
                    result = Err(to_errno(&self.export, e));
                }
                if let Some(request) = a.request {
                    buf = request;
                }
            }
            if result.is_ok() && p.fua {
                if let Err(e) = self.export.top.flush() {
                    let e = crate::Error::new(crate::Op::Write, 0, p.len as u64, e);
                    result = Err(to_errno(&self.export, e));
                }
            }
            // The generation count ends here, before the reply can lead to
            // a flush that would wait for it.
            drop(p.mapped);
            out.push(AioDone { tag: p.tag, result, buf });
        }
    }

    fn inflight(&self) -> usize {
        self.ring.operations() + self.ready.len()
    }
}

#[cfg(test)]
#[path = "ring_tests.rs"]
mod tests;
