//! A ring for a backend's own file I/O: one operation fills or writes one
//! buffer through several reads or writes (segments), possibly on several
//! files, and completes once all of them have. A qcow2 image maps a guest
//! read to clusters scattered over its file; each cluster run is a
//! segment of the same request buffer.
//!
//! The ring owns an operation's buffer, and holds each segment's file
//! open, until the operation's last segment completes: the kernel never
//! sees memory or a descriptor that was freed or reused meanwhile.
//! Short transfers are continued inside the ring; a read that reaches the
//! end of its file fills the rest of its segment with zeroes (as qemu reads
//! a cluster that the file was never extended over).
//!
//! The owner submits ([`FileRing::read`], [`FileRing::write`]), then calls
//! [`FileRing::drive`] (which submits and reaps without waiting). With
//! [`FileRing::notify`], the kernel signals an eventfd whenever an
//! operation's completion is posted, so a thread that polls that eventfd
//! on its own ring knows when to drive this one.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use crate::buf::IoBuf;

/// One read or write of an operation: `len` bytes at `offset` of `file`,
/// to or from `buf[at..at + len]`.
#[derive(Debug, Clone)]
pub struct Segment {
    pub file: Arc<File>,
    pub offset: u64,
    pub at: usize,
    pub len: usize,
}

/// A finished operation: its tag, `Ok(bytes)` (the sum of its segments) or
/// the first error, and its buffer.
#[derive(Debug)]
pub struct FileDone {
    pub tag: u64,
    pub result: io::Result<usize>,
    pub buf: IoBuf,
}

struct Op {
    tag: u64,
    write: bool,
    buf: IoBuf,
    /// Segments not yet finished (each advanced past what was moved).
    segs: Vec<Option<Segment>>,
    left: usize,
    total: usize,
    error: Option<io::Error>,
}

/// The ring and the operations the kernel may still be using.
pub struct FileRing {
    ring: IoUring,
    ops: Vec<Option<Op>>,
    free: Vec<u32>,
    /// Segments submitted and not completed.
    inflight: usize,
    /// Operations that finished (or failed to start) since the last drive.
    done: Vec<FileDone>,
    /// Segments to submit again (short transfers, EAGAIN).
    again: Vec<(u32, u32)>,
}

impl FileRing {
    /// A ring with room for `entries` submissions (more segments than that
    /// are submitted in batches).
    pub fn new(entries: u32) -> io::Result<FileRing> {
        let ring = match IoUring::builder().setup_single_issuer().build(entries) {
            Ok(r) => r,
            Err(_) => IoUring::new(entries)?,
        };
        Ok(FileRing {
            ring,
            ops: Vec::new(),
            free: Vec::new(),
            inflight: 0,
            done: Vec::new(),
            again: Vec::new(),
        })
    }

    /// Has the kernel signal `fd` (an eventfd) whenever a completion is
    /// posted (`IORING_REGISTER_EVENTFD`). Not the `_ASYNC` variant: that
    /// one signals only completions posted by io-wq workers, and a read or
    /// write on a device completes through task work on the submitting
    /// thread, which would then never learn of it.
    pub fn notify(&self, fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        self.ring.submitter().register_eventfd(fd.as_raw_fd())
    }

    /// Operations started and not yet handed back by [`FileRing::drive`].
    pub fn operations(&self) -> usize {
        // Every slot is either in use or on the free list.
        self.ops.len() - self.free.len() + self.done.len()
    }

    /// Starts filling `buf` from `segs` (each `buf[at..at + len]` from its
    /// file). Segments outside the buffer fail the operation (EINVAL)
    /// before anything starts.
    pub fn read(&mut self, tag: u64, buf: IoBuf, segs: Vec<Segment>) {
        self.start(tag, false, buf, segs)
    }

    /// Starts writing `buf`'s bytes as `segs` say.
    pub fn write(&mut self, tag: u64, buf: IoBuf, segs: Vec<Segment>) {
        self.start(tag, true, buf, segs)
    }

    fn start(&mut self, tag: u64, write: bool, buf: IoBuf, segs: Vec<Segment>) {
        let inside = |s: &Segment| s.at.checked_add(s.len).is_some_and(|end| end <= buf.len());
        if !segs.iter().all(inside) {
            let e = io::Error::new(io::ErrorKind::InvalidInput, "a segment lies outside its buffer");
            self.done.push(FileDone { tag, result: Err(e), buf });
            return;
        }
        let segs: Vec<Option<Segment>> = segs.into_iter().filter(|s| s.len > 0).map(Some).collect();
        let left = segs.len();
        if left == 0 {
            self.done.push(FileDone { tag, result: Ok(0), buf });
            return;
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.ops.push(None);
                (self.ops.len() - 1) as u32
            }
        };
        self.ops[slot as usize] = Some(Op { tag, write, buf, segs, left, total: 0, error: None });
        for i in 0..left {
            if let Err(e) = self.submit_segment(slot, i as u32) {
                self.segment_done(slot, i as u32, Err(e));
            }
        }
    }

    /// Queues the segment's (remaining) transfer.
    fn submit_segment(&mut self, slot: u32, index: u32) -> io::Result<()> {
        let Some(op) = self.ops.get_mut(slot as usize).and_then(Option::as_mut) else {
            return Err(io::Error::other("no such operation"));
        };
        let Some(seg) = op.segs.get(index as usize).and_then(Option::as_ref) else {
            return Err(io::Error::other("no such segment"));
        };
        let fd = types::Fd(seg.file.as_raw_fd());
        let len = seg.len.min(u32::MAX as usize) as u32;
        let entry = if op.write {
            let bytes = op.buf.get(seg.at..seg.at + seg.len).unwrap_or_default();
            opcode::Write::new(fd, bytes.as_ptr(), len).offset(seg.offset).build()
        } else {
            // The kernel writes here: the pointer comes from a unique
            // borrow of the buffer, which the ring owns until then.
            let bytes = op.buf.get_mut(seg.at..seg.at + seg.len).unwrap_or_default();
            opcode::Read::new(fd, bytes.as_mut_ptr(), len).offset(seg.offset).build()
        };
        self.push(&entry.user_data(u64::from(slot) << 32 | u64::from(index)))
    }

    fn push(&mut self, e: &squeue::Entry) -> io::Result<()> {
        // SAFETY: every entry points only into the buffer of an operation in
        // `self.ops`, inside its length (checked in `start`, and segments
        // only shrink), and at a file that the segment's Arc keeps open.
        // Both stay in `self.ops`, unmoved and untouched, until the entry's
        // completion is reaped in `reap` (or `Drop` waits for it).
        if unsafe { self.ring.submission().push(e) }.is_err() {
            self.submit(0)?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(e) }
                .map_err(|_| io::Error::other("io_uring submission queue full after submit"))?;
        }
        self.inflight += 1;
        Ok(())
    }

    fn submit(&mut self, want: usize) -> io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One segment finished with `res` (bytes moved, or the error).
    fn segment_done(&mut self, slot: u32, index: u32, res: io::Result<usize>) {
        let Some(op) = self.ops.get_mut(slot as usize).and_then(Option::as_mut) else { return };
        let Some(seg) = op.segs.get_mut(index as usize).and_then(Option::as_mut) else { return };
        let finished = match res {
            Ok(n) if n > 0 && n < seg.len => {
                op.total += n;
                seg.offset += n as u64;
                seg.at += n;
                seg.len -= n;
                self.again.push((slot, index));
                false
            }
            Ok(0) if !op.write && seg.len > 0 => {
                // The end of the file: the rest reads as zeroes.
                if let Some(rest) = op.buf.get_mut(seg.at..seg.at + seg.len) {
                    rest.fill(0);
                }
                op.total += seg.len;
                true
            }
            Ok(0) if seg.len > 0 => {
                op.error.get_or_insert(io::Error::new(io::ErrorKind::WriteZero, "a write made no progress"));
                true
            }
            Ok(n) => {
                op.total += n;
                true
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) => {
                self.again.push((slot, index));
                false
            }
            Err(e) => {
                op.error.get_or_insert(e);
                true
            }
        };
        if !finished {
            return;
        }
        op.segs[index as usize] = None;
        op.left -= 1;
        if op.left > 0 {
            return;
        }
        let Some(op) = self.ops[slot as usize].take() else { return };
        self.free.push(slot);
        let result = match op.error {
            Some(e) => Err(e),
            None => Ok(op.total),
        };
        self.done.push(FileDone { tag: op.tag, result, buf: op.buf });
    }

    /// Moves every completion from the ring to the operations.
    fn reap(&mut self) {
        loop {
            let Some(cqe) = self.ring.completion().next() else { break };
            self.inflight = self.inflight.saturating_sub(1);
            let (slot, index) = ((cqe.user_data() >> 32) as u32, cqe.user_data() as u32);
            let res = cqe.result();
            let res = if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) };
            self.segment_done(slot, index, res);
        }
    }

    /// Submits what was queued, reaps what finished (without waiting) and
    /// moves the finished operations to `out`. An error is the ring's
    /// refusal to take submissions: what it did not take stays queued and
    /// goes at the next drive (finished operations are moved regardless).
    pub fn drive(&mut self, out: &mut Vec<FileDone>) -> io::Result<()> {
        let mut result = Ok(());
        for _ in 0..64 {
            if let Err(e) = self.submit(0) {
                result = Err(e);
            }
            self.reap();
            if self.again.is_empty() {
                break;
            }
            for (slot, index) in std::mem::take(&mut self.again) {
                if let Err(e) = self.submit_segment(slot, index) {
                    self.segment_done(slot, index, Err(e));
                }
            }
        }
        // Still going after that many rounds: what was queued last goes to
        // the kernel now, and its completion signals as any other.
        if !self.ring.submission().is_empty() {
            if let Err(e) = self.submit(0) {
                result = Err(e);
            }
        }
        out.append(&mut self.done);
        result
    }

    /// Waits until at least one segment completes (tests, and `Drop`).
    pub fn wait(&mut self) -> io::Result<()> {
        if self.inflight == 0 {
            return Ok(());
        }
        self.submit(1)
    }
}

impl Drop for FileRing {
    fn drop(&mut self) {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            if self.inflight == 0 && self.again.is_empty() {
                return;
            }
            if self.wait().is_err() || self.drive(&mut out).is_err() {
                break;
            }
            out.clear();
        }
        // The kernel may still use some buffers: leak them rather than free
        // memory it could write to.
        for op in self.ops.drain(..) {
            std::mem::forget(op);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// An unlinked file holding `bytes`, opened read-write (or read-only).
    fn file_with(bytes: &[u8], write: bool) -> Arc<File> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ringbd-file-ring-{}-{n}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(write).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        Arc::new(f)
    }

    fn run(ring: &mut FileRing) -> Vec<FileDone> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            ring.drive(&mut out).unwrap();
            if ring.operations() == 0 {
                return out;
            }
            ring.wait().unwrap();
        }
        panic!("operations did not finish");
    }

    #[test]
    fn scattered_reads_fill_one_buffer_and_zeroes_past_the_end() {
        let a = file_with(b"0123456789", false);
        let b = file_with(b"abcdef", false);
        let mut ring = FileRing::new(4).unwrap();
        let mut buf = IoBuf::new();
        buf.resize_zeroed(12);
        buf.fill(b'x');
        let seg = |file: &Arc<File>, offset, at, len| Segment { file: file.clone(), offset, at, len };
        // 6 segments on a 4-entry ring: submitted in batches. The last one
        // runs past the end of `b`: its tail reads as zeroes.
        let segs = vec![
            seg(&a, 8, 0, 2),
            seg(&b, 0, 2, 3),
            seg(&a, 0, 5, 1),
            seg(&b, 5, 6, 1),
            seg(&a, 3, 7, 2),
            seg(&b, 4, 9, 3),
        ];
        ring.read(7, buf, segs);
        let done = run(&mut ring);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].tag, 7);
        assert_eq!(done[0].result.as_ref().unwrap(), &12);
        assert_eq!(&done[0].buf[..], b"89abc0f34ef\0");
    }

    #[test]
    fn writes_land_where_the_segments_say() {
        let a = file_with(&[0u8; 16], true);
        let mut ring = FileRing::new(8).unwrap();
        let buf = IoBuf::from_slice(b"hello world!");
        let segs = vec![
            Segment { file: a.clone(), offset: 10, at: 0, len: 6 },
            Segment { file: a.clone(), offset: 0, at: 6, len: 6 },
        ];
        ring.write(1, buf, segs);
        let done = run(&mut ring);
        assert_eq!(done[0].result.as_ref().unwrap(), &12);
        let mut back = [0u8; 16];
        a.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back, b"world!\0\0\0\0hello ");
    }

    #[test]
    fn a_segment_outside_the_buffer_fails_before_starting() {
        let a = file_with(&[1u8; 16], false);
        let mut ring = FileRing::new(4).unwrap();
        let mut buf = IoBuf::new();
        buf.resize_zeroed(8);
        ring.read(3, buf, vec![Segment { file: a, offset: 0, at: 4, len: 8 }]);
        let done = run(&mut ring);
        assert_eq!(done[0].result.as_ref().unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert!(done[0].buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn errors_come_back_with_the_buffer() {
        // A file opened read-only cannot be written: EBADF.
        let ro = file_with(b"read only", false);
        let mut ring = FileRing::new(4).unwrap();
        ring.write(9, IoBuf::from_slice(b"abcd"), vec![Segment { file: ro, offset: 0, at: 0, len: 4 }]);
        let done = run(&mut ring);
        assert_eq!(done[0].result.as_ref().unwrap_err().raw_os_error(), Some(libc::EBADF));
        assert_eq!(&done[0].buf[..], b"abcd");
    }

    #[test]
    fn a_device_completion_signals_the_eventfd() {
        use std::os::fd::AsFd;
        // O_DIRECT on a disk filesystem (as the server's tests assume
        // /var/tmp is): the read completes on the device after the
        // submission returned, through task work on this thread. Only the
        // eventfd can say so to a thread that waits elsewhere.
        let path =
            std::path::Path::new("/var/tmp").join(format!("ringbd-file-ring-direct-{}", std::process::id()));
        std::fs::write(&path, [0x5au8; 8192]).unwrap();
        let file = crate::fs::open_direct(&path, true);
        std::fs::remove_file(&path).unwrap();
        let file = Arc::new(file.expect("O_DIRECT on /var/tmp"));
        let mut ring = FileRing::new(4).unwrap();
        let fd = crate::eventfd::EventFd::new().unwrap();
        ring.notify(fd.as_fd()).unwrap();
        let mut buf = IoBuf::new();
        buf.resize_zeroed(8192);
        ring.read(5, buf, vec![Segment { file, offset: 4096, at: 0, len: 4096 }]);
        let mut out = Vec::new();
        ring.drive(&mut out).unwrap();
        while out.is_empty() {
            let ready =
                crate::net::poll_readable(&[fd.as_fd()], Some(std::time::Duration::from_secs(10))).unwrap();
            assert_eq!(ready, [true], "no eventfd signal within 10 s for a finished read");
            fd.clear().unwrap();
            ring.drive(&mut out).unwrap();
        }
        assert_eq!(out[0].result.as_ref().unwrap(), &4096);
        assert!(out[0].buf[..4096].iter().all(|&b| b == 0x5a));
    }
}
