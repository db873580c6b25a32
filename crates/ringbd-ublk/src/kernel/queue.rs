//! The data plane of one ublk queue: its ring (128-byte SQEs, so ublk I/O
//! commands and the target's own file operations share it), the request
//! descriptors mmapped from /dev/ublkcN, and one I/O buffer per tag.
//!
//! Ownership of a tag moves between the kernel and us: FETCH_REQ and
//! COMMIT_AND_FETCH_REQ give it to the kernel (which may copy write data
//! into the tag's buffer when it hands over a request); the command's
//! completion gives it back. The buffer of a tag is readable and writable
//! here only while we own the tag and no ring operation of ours uses it,
//! which the methods check, so none of this needs `unsafe` from callers.
//!
//! Zero-copy (`QueueConfig::auto_buf_reg`, a device created with
//! `UBLK_F_AUTO_BUF_REG`, Linux 6.16+): the ring gets a sparse fixed-buffer
//! table of `depth` entries, and every FETCH_REQ / COMMIT_AND_FETCH_REQ asks
//! the driver to register the request's own pages as fixed buffer `tag`
//! before handing the request over (and to unregister them at the commit).
//! [`QueueRing::read_data`] and [`QueueRing::write_data`] then move the
//! request's data with READ_FIXED / WRITE_FIXED on that buffer, addressed by
//! byte offset; nothing is copied through the tag's buffer, which stays for
//! the other uses (a target's write of zeroes, the copy path).

use super::cvt;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::ctrl::io_cmd_bytes;
use super::sys::{self, IoCmd, IoDesc};

/// user_data bit that marks a target operation (clear: a ublk command).
const OP_BIT: u64 = 1 << 63;
/// The tag field of an operation tied to no tag (a poll); real tags are
/// below `UBLK_MAX_QUEUE_DEPTH`.
const NO_TAG: u64 = 0xffff;
/// Fixed-file slot of /dev/ublkcN; target files follow from 1.
const CDEV_SLOT: u32 = 0;

/// A file registered with the queue ring (see [`QueueRing::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSlot(pub u32);

/// `fallocate` modes a target uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocMode {
    PunchHole,
    ZeroRange,
}

/// Something that happened on the queue ring.
#[derive(Debug)]
pub enum Event {
    /// The kernel handed over a request in `tag`.
    Request { tag: u16, desc: IoDesc },
    /// The device is going away (`UBLK_IO_RES_ABORT`): `tag`'s command is
    /// over and will not be fetched again.
    Aborted { tag: u16 },
    /// A FETCH_REQ or COMMIT_AND_FETCH_REQ failed otherwise.
    CommandFailed { tag: u16, error: io::Error },
    /// A target operation for `tag` finished: bytes moved, or the error.
    Op { tag: u16, cookie: u32, result: io::Result<u32> },
    /// An operation tied to no tag ([`QueueRing::poll_readable`]) finished:
    /// the ready events, or the error.
    ConnOp { cookie: u32, result: io::Result<u32> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagState {
    /// No command queued yet (before [`QueueRing::fetch_all`]).
    Idle,
    /// A FETCH/COMMIT_AND_FETCH command is with the kernel.
    Kernel,
    /// We hold the request; `ops` target operations use the buffer.
    Ours { ops: u32 },
    /// The command ended for good (aborted or failed).
    Done,
}

/// A read or write between a registered file and part of a tag's buffer.
#[derive(Debug, Clone, Copy)]
pub struct FileIo {
    pub tag: u16,
    pub file: FileSlot,
    /// Byte offset in the file.
    pub offset: u64,
    /// Byte offset in the tag's buffer.
    pub buf_off: usize,
    pub len: u32,
    /// Comes back in [`Event::Op`].
    pub cookie: u32,
}

/// Geometry of a queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    pub dev_id: u32,
    pub q_id: u16,
    pub depth: u16,
    /// Bytes of each tag's buffer (the device's `max_io_buf_bytes`).
    pub buf_size: usize,
    /// The device was created with `UBLK_F_AUTO_BUF_REG`: register a
    /// sparse buffer table and have the driver put each request's pages at
    /// index `tag` (see the module docs).
    pub auto_buf_reg: bool,
}

/// The descriptor area mapped read-only from /dev/ublkcN.
struct DescMap {
    ptr: NonNull<IoDesc>,
    len: usize,
}

/// `depth` buffers of `buf_size` bytes, page-aligned (O_DIRECT-safe).
struct Buffers {
    ptr: NonNull<u8>,
    layout: Layout,
    buf_size: usize,
}

/// One queue's ring, descriptors and buffers. Owned by the queue's thread:
/// the driver accepts a queue's commands only from the task that fetched.
pub struct QueueRing {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    cfg: QueueConfig,
    descs: DescMap,
    bufs: Buffers,
    tags: Vec<TagState>,
    /// Ring operations submitted and not yet completed (commands + ops).
    inflight: usize,
    /// READ_FIXED / WRITE_FIXED operations on request buffers (zero-copy).
    fixed_ops: u64,
}

// SAFETY: the raw pointers are to memory owned by this value (the mapping
// and the allocation); moving the value to another thread moves that
// ownership along. (The driver then requires that thread to do all fetches.)
unsafe impl Send for QueueRing {}

/// Pins the calling thread to `cpus` (`sched_setaffinity`).
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bitmap; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    let mut any = false;
    for &c in cpus.iter().filter(|&&c| c < max) {
        // SAFETY: c is below the set's capacity; CPU_SET only writes into set.
        unsafe { libc::CPU_SET(c, &mut set) };
        any = true;
    }
    if !any {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: pid 0 is the calling thread; set is a live, initialised cpu_set_t
    // of the size passed.
    cvt(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) })?;
    Ok(())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

impl QueueRing {
    /// Sets up queue `cfg.q_id` of the device whose char device is `cdev`:
    /// maps its descriptors, allocates its buffers and makes a ring with
    /// `cdev` and `files` registered (`files[i]` is [`FileSlot`]`(i + 1)`).
    pub fn new(cdev: BorrowedFd<'_>, cfg: QueueConfig, files: &[BorrowedFd<'_>]) -> io::Result<QueueRing> {
        let ctx = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("ublk device {} queue {}: {what}: {e}", cfg.dev_id, cfg.q_id))
        };
        if cfg.depth == 0 || cfg.depth > sys::UBLK_MAX_QUEUE_DEPTH || cfg.buf_size == 0 {
            return Err(ctx("queue geometry", io::Error::from_raw_os_error(libc::EINVAL)));
        }
        let page = page_size();
        let len = sys::cmd_buf_size(cfg.depth, page);
        let off = sys::cmd_buf_offset(cfg.q_id, page);
        let off = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: a fresh shared read-only mapping at an address of the
        // kernel's choosing; nothing else refers to that range.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                cdev.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(ctx("mmap of the descriptor area", io::Error::last_os_error()));
        }
        let descs = DescMap {
            ptr: NonNull::new(p as *mut IoDesc).ok_or_else(|| io::Error::other("mmap gave null"))?,
            len,
        };

        let total = usize::from(cfg.depth)
            .checked_mul(cfg.buf_size)
            .ok_or_else(|| ctx("buffers", io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
        let layout = Layout::from_size_align(total, page.max(4096))
            .map_err(|_| ctx("buffers", io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: layout has a non-zero size (depth > 0, buf_size > 0).
        let bp = unsafe { alloc_zeroed(layout) };
        let bufs = Buffers {
            ptr: NonNull::new(bp).ok_or_else(|| {
                ctx(&format!("allocating {total} bytes of buffers"), io::ErrorKind::OutOfMemory.into())
            })?,
            layout,
            buf_size: cfg.buf_size,
        };

        // ublk commands (one per tag) plus target operations (a few per tag).
        let entries = (u32::from(cfg.depth) * 4).next_power_of_two().min(32768);
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_cqsize(entries * 2)
            .build(entries)
            .map_err(|e| ctx("io_uring setup", e))?;
        let mut fds = vec![cdev.as_raw_fd()];
        fds.extend(files.iter().map(|f| f.as_raw_fd()));
        ring.submitter().register_files(&fds).map_err(|e| ctx("registering files", e))?;
        if cfg.auto_buf_reg {
            // One empty slot per tag: the driver fills slot `tag` with the
            // request's pages when it hands the request over.
            ring.submitter()
                .register_buffers_sparse(u32::from(cfg.depth))
                .map_err(|e| ctx("registering a sparse buffer table (zero-copy)", e))?;
        }
        Ok(QueueRing {
            ring,
            cfg,
            descs,
            bufs,
            tags: vec![TagState::Idle; usize::from(cfg.depth)],
            inflight: 0,
            fixed_ops: 0,
        })
    }

    fn buf_ptr(&self, tag: u16) -> *mut u8 {
        // In bounds: tag < depth (checked by callers), buffers are depth * buf_size.
        self.bufs.ptr.as_ptr().wrapping_add(usize::from(tag) * self.bufs.buf_size)
    }

    fn push(&mut self, e: squeue::Entry128) -> io::Result<()> {
        // SAFETY: every SQE made by this type points only at memory owned
        // by self (tag buffers, which stay allocated while any operation on
        // them is in flight, see Drop), at a request buffer the driver registered in the ring's buffer table
        // (READ_FIXED/WRITE_FIXED: `addr` is then a byte offset into that
        // kernel buffer, which the kernel bounds-checks, not a pointer into
        // our memory), or at nothing.
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            self.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&e) }
                .map_err(|_| io::Error::other("ublk queue ring: submission queue full after submit"))?;
        }
        self.inflight += 1;
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn tag_state(&mut self, tag: u16) -> io::Result<&mut TagState> {
        let (dev, q) = (self.cfg.dev_id, self.cfg.q_id);
        self.tags.get_mut(usize::from(tag)).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("ublk device {dev} queue {q}: no tag {tag}"))
        })
    }

    /// Hands `tag` to the driver (FETCH_REQ, COMMIT_AND_FETCH_REQ); the
    /// caller set its state to `Kernel`, and it goes back to `before` if
    /// the command could not be queued.
    fn io_cmd(&mut self, op: u32, tag: u16, result: i32, before: TagState) -> io::Result<()> {
        let e = if self.cfg.auto_buf_reg {
            // No buffer address: the driver registers the request's pages
            // as fixed buffer `tag` instead (index in the SQE's addr).
            let cmd = IoCmd { q_id: self.cfg.q_id, tag, result, addr: 0 };
            opcode::UringCmd80::new(types::Fixed(CDEV_SLOT), op)
                .cmd(io_cmd_bytes(&cmd))
                .addr(Some(sys::auto_buf_reg_sqe_addr(tag, 0)))
        } else {
            let cmd = IoCmd { q_id: self.cfg.q_id, tag, result, addr: self.buf_ptr(tag) as u64 };
            opcode::UringCmd80::new(types::Fixed(CDEV_SLOT), op).cmd(io_cmd_bytes(&cmd))
        };
        let pushed = self.push(e.build().user_data(u64::from(tag)));
        if pushed.is_err() {
            if let Some(st) = self.tags.get_mut(usize::from(tag)) {
                *st = before;
            }
        }
        pushed
    }

    /// READ_FIXED / WRITE_FIXED operations queued on request buffers so far.
    pub fn fixed_ops(&self) -> u64 {
        self.fixed_ops
    }

    /// Reads `io.len` bytes at `io.offset` of `io.file` into the request's
    /// data at byte `io.buf_off`: straight into the request's pages
    /// (READ_FIXED on buffer `tag`) with zero-copy, else into the tag's
    /// buffer (which the driver copies to the request at the commit).
    pub fn read_data(&mut self, io: &FileIo) -> io::Result<()> {
        if !self.cfg.auto_buf_reg {
            return self.read(io);
        }
        self.start_op(io.tag, Some((io.buf_off, io.len as usize)))?;
        self.fixed_ops += 1;
        let e = opcode::ReadFixed::new(types::Fixed(io.file.0), io.buf_off as *mut u8, io.len, io.tag)
            .offset(io.offset)
            .build();
        self.push_op(io.tag, e.user_data(Self::op_data(io.tag, io.cookie)).into())
    }

    /// Writes `io.len` bytes of the request's data from byte `io.buf_off`
    /// to `io.offset` of `io.file` (WRITE_FIXED from the request's pages
    /// with zero-copy, else from the tag's buffer); `dsync`: RWF_DSYNC
    /// (durable on return, for FUA).
    pub fn write_data(&mut self, io: &FileIo, dsync: bool) -> io::Result<()> {
        if !self.cfg.auto_buf_reg {
            return self.write(io, dsync);
        }
        self.start_op(io.tag, Some((io.buf_off, io.len as usize)))?;
        self.fixed_ops += 1;
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let e = opcode::WriteFixed::new(types::Fixed(io.file.0), io.buf_off as *const u8, io.len, io.tag)
            .offset(io.offset)
            .rw_flags(flags)
            .build();
        self.push_op(io.tag, e.user_data(Self::op_data(io.tag, io.cookie)).into())
    }

    /// Queues FETCH_REQ for every tag (once, when the queue starts).
    pub fn fetch_all(&mut self) -> io::Result<()> {
        for tag in 0..self.cfg.depth {
            let st = self.tag_state(tag)?;
            if *st != TagState::Idle {
                continue;
            }
            *st = TagState::Kernel;
            self.io_cmd(sys::UBLK_U_IO_FETCH_REQ, tag, 0, TagState::Idle)?;
        }
        Ok(())
    }

    /// Completes `tag`'s request with `result` (bytes done, or `-errno`)
    /// and fetches the next one into the same tag (COMMIT_AND_FETCH_REQ).
    pub fn commit(&mut self, tag: u16, result: i32) -> io::Result<()> {
        let (dev, q) = (self.cfg.dev_id, self.cfg.q_id);
        let st = self.tag_state(tag)?;
        match *st {
            TagState::Ours { ops: 0 } => *st = TagState::Kernel,
            other => {
                return Err(io::Error::other(format!(
                    "ublk device {dev} queue {q} tag {tag}: commit in state {other:?}"
                )))
            }
        }
        self.io_cmd(sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result, TagState::Ours { ops: 0 })
    }

    /// The buffer of a request we hold with no operation using it.
    pub fn buf(&self, tag: u16) -> Option<&[u8]> {
        match self.tags.get(usize::from(tag)) {
            Some(TagState::Ours { ops: 0 }) => {
                // SAFETY: we own the tag and no ring operation uses its
                // buffer, so the kernel does not write it while this shared
                // borrow of self lives; the range is inside the allocation.
                Some(unsafe { std::slice::from_raw_parts(self.buf_ptr(tag), self.bufs.buf_size) })
            }
            _ => None,
        }
    }

    /// Like [`QueueRing::buf`], writable.
    pub fn buf_mut(&mut self, tag: u16) -> Option<&mut [u8]> {
        match self.tags.get(usize::from(tag)) {
            Some(TagState::Ours { ops: 0 }) => {
                // SAFETY: as in buf(); the exclusive borrow of self makes
                // this the only reference to the tag's bytes.
                Some(unsafe { std::slice::from_raw_parts_mut(self.buf_ptr(tag), self.bufs.buf_size) })
            }
            _ => None,
        }
    }

    fn start_op(&mut self, tag: u16, buf_range: Option<(usize, usize)>) -> io::Result<()> {
        let (dev, q, size) = (self.cfg.dev_id, self.cfg.q_id, self.bufs.buf_size);
        if let Some((off, len)) = buf_range {
            if off.checked_add(len).is_none_or(|end| end > size) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("ublk device {dev} queue {q} tag {tag}: {len} bytes at buffer offset {off} exceed the {size}-byte buffer"),
                ));
            }
        }
        let st = self.tag_state(tag)?;
        match st {
            TagState::Ours { ops } => {
                *ops += 1;
                Ok(())
            }
            other => Err(io::Error::other(format!(
                "ublk device {dev} queue {q} tag {tag}: operation in state {other:?}"
            ))),
        }
    }

    /// Queues an operation on `tag`'s data, which [`Self::start_op`]
    /// counted; if the push fails nothing is in flight and the count goes
    /// back (a tag whose count never returned to 0 could never commit).
    fn push_op(&mut self, tag: u16, e: squeue::Entry128) -> io::Result<()> {
        let pushed = self.push(e);
        if pushed.is_err() {
            if let Some(TagState::Ours { ops }) = self.tags.get_mut(usize::from(tag)) {
                *ops = ops.saturating_sub(1);
            }
        }
        pushed
    }

    fn op_data(tag: u16, cookie: u32) -> u64 {
        OP_BIT | (u64::from(cookie) << 16) | u64::from(tag)
    }

    /// Reads `io.len` bytes at `io.offset` of `io.file` into the tag's
    /// buffer at `io.buf_off`.
    fn read(&mut self, io: &FileIo) -> io::Result<()> {
        self.start_op(io.tag, Some((io.buf_off, io.len as usize)))?;
        let p = self.buf_ptr(io.tag).wrapping_add(io.buf_off);
        let e = opcode::Read::new(types::Fixed(io.file.0), p, io.len).offset(io.offset).build();
        self.push_op(io.tag, e.user_data(Self::op_data(io.tag, io.cookie)).into())
    }

    /// Writes `io.len` bytes of the tag's buffer at `io.buf_off` to
    /// `io.offset` of `io.file`; `dsync`: RWF_DSYNC (durable on return, for FUA).
    fn write(&mut self, io: &FileIo, dsync: bool) -> io::Result<()> {
        self.start_op(io.tag, Some((io.buf_off, io.len as usize)))?;
        let p = self.buf_ptr(io.tag).wrapping_add(io.buf_off) as *const u8;
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let e =
            opcode::Write::new(types::Fixed(io.file.0), p, io.len).offset(io.offset).rw_flags(flags).build();
        self.push_op(io.tag, e.user_data(Self::op_data(io.tag, io.cookie)).into())
    }

    /// `fdatasync` of `file`, on behalf of `tag`'s request.
    pub fn fdatasync(&mut self, tag: u16, file: FileSlot, cookie: u32) -> io::Result<()> {
        self.start_op(tag, None)?;
        let e = opcode::Fsync::new(types::Fixed(file.0)).flags(types::FsyncFlags::DATASYNC).build();
        self.push_op(tag, e.user_data(Self::op_data(tag, cookie)).into())
    }

    /// `fallocate(mode | KEEP_SIZE)` of a range of `file`, for `tag`'s request.
    pub fn fallocate(
        &mut self,
        tag: u16,
        file: FileSlot,
        mode: AllocMode,
        offset: u64,
        len: u64,
        cookie: u32,
    ) -> io::Result<()> {
        self.start_op(tag, None)?;
        let m = match mode {
            AllocMode::PunchHole => libc::FALLOC_FL_PUNCH_HOLE,
            AllocMode::ZeroRange => libc::FALLOC_FL_ZERO_RANGE,
        } | libc::FALLOC_FL_KEEP_SIZE;
        let e = opcode::Fallocate::new(types::Fixed(file.0), len).offset(offset).mode(m).build();
        self.push_op(tag, e.user_data(Self::op_data(tag, cookie)).into())
    }

    /// Waits (one shot) until the registered file in `slot` is readable:
    /// an eventfd that another thread signals when operations it runs for
    /// this queue finish (an asynchronous backend's completion queue).
    /// Completes as [`Event::ConnOp`] with `cookie`. Nothing of the ring's
    /// memory is involved, so any number may be in flight.
    pub fn poll_readable(&mut self, slot: FileSlot, cookie: u32) -> io::Result<()> {
        let e = opcode::PollAdd::new(types::Fixed(slot.0), libc::POLLIN as u32)
            .build()
            .user_data(OP_BIT | (u64::from(cookie) << 16) | NO_TAG);
        self.push(e.into())
    }

    /// Submits what was queued and waits for at least `want` completions.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        let want = want.min(self.inflight);
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {
                    if want == 0 || !self.ring.completion().is_empty() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves every completion into `out`.
    pub fn reap(&mut self, out: &mut Vec<Event>) {
        let descs = self.descs.ptr;
        for cqe in self.ring.completion() {
            let (ud, res) = (cqe.user_data(), cqe.result());
            self.inflight = self.inflight.saturating_sub(1);
            let tag = (ud & 0xffff) as u16;
            let result = || if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as u32) };
            if ud & OP_BIT != 0 && ud & 0xffff == NO_TAG {
                let cookie = ((ud >> 16) & 0xffff_ffff) as u32;
                out.push(Event::ConnOp { cookie, result: result() });
                continue;
            }
            let Some(st) = self.tags.get_mut(usize::from(tag)) else { continue };
            if ud & OP_BIT != 0 {
                if let TagState::Ours { ops } = st {
                    *ops = ops.saturating_sub(1);
                }
                let cookie = ((ud >> 16) & 0xffff_ffff) as u32;
                out.push(Event::Op { tag, cookie, result: result() });
            } else if res == 0 {
                *st = TagState::Ours { ops: 0 };
                let i = usize::from(tag);
                // SAFETY: i < depth, so the descriptor lies inside the
                // mapping; the driver wrote it before completing the command
                // and does not touch it again until we commit the tag.
                let desc = unsafe { std::ptr::read_volatile(descs.as_ptr().add(i)) };
                out.push(Event::Request { tag, desc });
            } else if res == sys::UBLK_IO_RES_ABORT {
                *st = TagState::Done;
                out.push(Event::Aborted { tag });
            } else {
                *st = TagState::Done;
                let error = if res < 0 {
                    io::Error::from_raw_os_error(-res)
                } else {
                    io::Error::other(format!("unexpected result {res} (NEED_GET_DATA is not used)"))
                };
                out.push(Event::CommandFailed { tag, error });
            }
        }
    }

    /// Whether every tag's command has ended (the device is going away),
    /// whatever untagged operations (polls) are still in flight.
    pub fn tags_finished(&self) -> bool {
        self.tags.iter().all(|t| matches!(t, TagState::Done | TagState::Idle))
    }

    /// Whether every tag's command has ended (aborted or failed) and no
    /// operation is in flight: the queue is finished.
    pub fn finished(&self) -> bool {
        self.inflight == 0 && self.tags.iter().all(|t| matches!(t, TagState::Done | TagState::Idle))
    }
}

impl Drop for QueueRing {
    fn drop(&mut self) {
        if self.inflight != 0 {
            // The kernel may still copy request data into the buffers (or
            // complete operations into them) after the ring is closed: keep
            // the memory and the mapping for the life of the process.
            return;
        }
        // SAFETY: nothing is in flight, so the kernel holds no pointer into
        // the buffers; they were allocated with this layout.
        unsafe { dealloc(self.bufs.ptr.as_ptr(), self.bufs.layout) };
        // SAFETY: the mapping was made by new() with this length and is not
        // referenced by anything else once self is dropped.
        let r = unsafe { libc::munmap(self.descs.ptr.as_ptr() as *mut libc::c_void, self.descs.len) };
        if r != 0 {
            tracing::warn!(
                "ublk device {} queue {}: munmap of the descriptor area: {}",
                self.cfg.dev_id,
                self.cfg.q_id,
                io::Error::last_os_error()
            );
        }
    }
}
