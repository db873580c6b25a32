//! A safe io_uring ring for a network server loop: multishot accept,
//! multishot receive into a provided-buffer ring (with bundles), and
//! vectored sends whose buffers the ring owns until the kernel is done.
//!
//! One [`Ring`] belongs to one thread (the ring is created
//! `SINGLE_ISSUER | DEFER_TASKRUN` where the kernel allows). Operations are
//! queued with the `accept_multi`/`recv_multi`/`send`/`cancel_recv`
//! methods, submitted with [`Ring::submit_and_wait`], and their results
//! come back from [`Ring::completions`].

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use crate::buf::{Arena, IoBuf};

/// What the running kernel offers, probed once at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    pub io_uring: bool,
    pub single_issuer: bool,
    pub defer_taskrun: bool,
    pub accept_multishot: bool,
    pub recv_multishot: bool,
    pub buf_ring: bool,
    pub bundle: bool,
    pub send_zc: bool,
    /// Incremental buffer consumption (`IOU_PBUF_RING_INC`, 6.12+).
    pub buf_inc: bool,
    /// A multishot receive takes a total byte limit (`sqe->optlen`, Linux
    /// 6.16+): it ends by itself once it has delivered that much.
    pub recv_limit: bool,
}

impl Features {
    /// Probes the kernel (creates and drops a small ring).
    pub fn probe() -> Features {
        let mut f = Features::default();
        let ring = match IoUring::builder().setup_single_issuer().setup_defer_taskrun().build(8) {
            Ok(r) => {
                f.single_issuer = true;
                f.defer_taskrun = true;
                r
            }
            Err(_) => match IoUring::new(8) {
                Ok(r) => r,
                Err(_) => return f,
            },
        };
        f.io_uring = true;
        let mut probe = Probe::new();
        if ring.submitter().register_probe(&mut probe).is_ok() {
            // Multishot accept and recv came with 5.19/6.0, buffer rings with
            // 5.19; the opcodes are older, so check the feature bits too.
            f.accept_multishot = probe.is_supported(opcode::AcceptMulti::CODE);
            f.recv_multishot =
                probe.is_supported(opcode::RecvMulti::CODE) && ring.params().is_feature_linked_file();
            f.send_zc = probe.is_supported(opcode::SendZc::CODE);
        }
        f.bundle = ring.params().is_feature_recvsend_bundle();
        f.buf_ring = BufRing::new(&ring, 8, 4096, false).is_ok();
        // A second group: the probe ring already has group 0.
        f.buf_inc = f.buf_ring && BufRing::with_group(&ring, 8, 4096, true, 1).is_ok();
        // Multishot accept (5.19) and receive (6.0) arrived with buffer
        // rings (5.19); their opcodes are older than that, so the probe alone
        // cannot tell. A kernel with buffer rings and the 6.0-era linked-file
        // feature has both.
        f.accept_multishot &= f.buf_ring;
        f.recv_multishot &= f.buf_ring;
        f.recv_limit = f.recv_multishot && probe_recv_limit();
        f
    }
}

/// Sets a multishot receive's total byte limit: the SQE's `optlen`
/// (bytes 44..48, a union with `file_index`), which the io-uring crate's
/// builder does not expose.
fn with_recv_limit(e: squeue::Entry, limit: u32) -> squeue::Entry {
    // SAFETY: squeue::Entry is #[repr(C)] around the kernel's 64-byte
    // io_uring_sqe (a size the transmute checks at compile time), plain
    // data for which every bit pattern is valid.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute::<squeue::Entry, [u8; 64]>(e) };
    raw[44..48].copy_from_slice(&limit.to_ne_bytes());
    // SAFETY: as above; only the optlen bytes changed.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

/// Whether the kernel honours a multishot receive's byte limit: one byte
/// waits on a socket and a receive limited to one byte must end with it.
/// Older kernels refuse the field (`EINVAL`).
fn probe_recv_limit() -> bool {
    use std::io::Write;
    let Ok(mut ring) = IoUring::new(8) else { return false };
    let Ok((mut a, b)) = std::os::unix::net::UnixStream::pair() else { return false };
    let Ok(mut br) = BufRing::new(&ring, 8, 4096, false) else { return false };
    if a.write_all(b"x").is_err() {
        return false;
    }
    let e = with_recv_limit(opcode::RecvMulti::new(types::Fd(b.as_raw_fd()), BGID).build(), 1).user_data(1);
    // SAFETY: the receive selects from `br`, which stays allocated until
    // the receive's final completion below, or forever (leaked) if it never
    // comes.
    if unsafe { ring.submission().push(&e) }.is_err() {
        return false;
    }
    let mut verdict = None;
    for _ in 0..4 {
        if ring.submit_and_wait(1).is_err() {
            break;
        }
        let Some(cqe) = ring.completion().next() else { continue };
        let more = cqueue::more(cqe.flags());
        if !more {
            // Ended on its own after the byte: honoured; refused: EINVAL.
            verdict = Some(*verdict.get_or_insert(cqe.result() == 1));
            break;
        }
        // Still armed after the limit: ignored. End it with end of stream.
        verdict = Some(false);
        if b.shutdown(std::net::Shutdown::Both).is_err() {
            break;
        }
    }
    if verdict.is_none() {
        // The receive may still be armed: its buffers must outlive it.
        br.leak();
    }
    drop(ring);
    drop(br);
    verdict.unwrap_or(false)
}

/// Most iovecs one `sendmsg` takes (`UIO_MAXIOV`; SEND_ZC has the same
/// limit).
pub const IOV_MAX: usize = 1024;

/// Configuration of one ring.
#[derive(Debug, Clone, Copy)]
pub struct RingConfig {
    /// Submission queue entries.
    pub entries: u32,
    /// Provided receive buffers (a power of two, at most 32768).
    pub recv_buffers: u16,
    /// Size of each receive buffer.
    pub recv_buffer_size: u32,
    /// Receive bundles: one completion carries several buffers.
    pub bundle: bool,
    /// Incremental consumption: the kernel fills each buffer across
    /// receives instead of spending a whole buffer on each.
    pub incremental: bool,
}

/// Something a send can take from: the ring keeps it until the kernel has
/// finished with the memory, then gives it back in [`Completion::Send`].
///
/// # Safety
///
/// The kernel reads the memory behind the slices [`SendSource::iovecs`]
/// returns after the call, while the ring owns the value: until the send's
/// completion hands it back (for a zero-copy send, until the kernel's
/// notification). An implementor guarantees that this memory stays
/// allocated, at the same address, and that nothing writes it for that
/// long, although the value itself moves (into the ring's table): the
/// slices must point into heap allocations or other memory the value
/// keeps alive and does not hand out for writing, never into the value's
/// own inline fields. `iovecs` must also return the same bytes each time
/// it is called with the same `skip`.
pub unsafe trait SendSource {
    /// Total bytes.
    fn len(&self) -> usize;
    /// Whether there is nothing to send.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The bytes as slices, skipping the first `skip` (already sent).
    fn iovecs<'a>(&'a self, skip: usize, out: &mut Vec<IoSlice<'a>>);
}

/// A finished operation.
pub enum Completion<S> {
    /// A new connection on listener `listener` (index given to
    /// [`Ring::accept_multi`]). `more`: the accept is still armed.
    Accept { listener: u32, result: io::Result<OwnedFd>, more: bool },
    /// A file descriptor polled with [`Ring::poll_readable`] is readable.
    Readable { token: u32 },
    /// Data for connection `conn`: `bufs` hold `len` bytes in order; read
    /// each piece with [`Ring::buffer`] and give each piece back with
    /// [`Ring::recycle`]. `len == 0` means the peer closed its side.
    /// `more`: the receive is still armed.
    Recv { conn: u32, result: io::Result<RecvBufs>, more: bool },
    /// A send finished: `result` is the bytes sent; `source` is returned
    /// (for a zero-copy send, only once the kernel released its pages).
    /// `copied`: for a zero-copy send, whether the kernel copied the data
    /// anyway (it always does over loopback); `None` for a plain send.
    Send { conn: u32, result: io::Result<usize>, source: S, skip: usize, copied: Option<bool> },
    /// A file read, write or fsync finished: `result` is the bytes moved
    /// (0 for fsync); `buf` is returned.
    File { conn: u32, token: u32, result: io::Result<usize>, buf: IoBuf },
    /// The timer set with [`Ring::timer`] went off.
    Timer { token: u32 },
    /// A cancellation request finished.
    Cancelled,
}

/// A receive ended because the provided-buffer ring ran dry (re-arm it
/// once buffers are back).
pub fn is_out_of_buffers(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOBUFS)
}

/// The kernel cannot do this operation on this file (e.g. zero-copy send
/// on a socket type without it).
pub fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// An operation ended because it was cancelled.
pub fn is_cancelled(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ECANCELED)
}

/// Buffers of one receive completion.
#[derive(Debug, Default)]
pub struct RecvBufs {
    /// The pieces, in stream order. With incremental consumption a
    /// buffer's bytes may arrive in several pieces, even for different
    /// connections.
    pub bufs: Vec<BufPiece>,
    pub len: usize,
}

/// Received bytes in one provided buffer (`start..end` of buffer `bid`),
/// handed out by the completion that filled them. Read them with
/// [`Ring::buffer`]; give the piece back with [`Ring::recycle`], which
/// consumes it: a piece can be given back once only, and only to the ring
/// that made it, so no caller can republish a buffer the kernel may still
/// fill. A piece that is dropped instead keeps its buffer out of the ring
/// for good (a leak, never a fault).
#[derive(Debug)]
pub struct BufPiece {
    ring: u32,
    bid: u16,
    start: u32,
    end: u32,
}

impl BufPiece {
    /// Bytes left in the piece.
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Drops the first `n` bytes (consumed); the piece still has to be
    /// recycled.
    pub fn advance(&mut self, n: usize) {
        self.start = self.start.saturating_add(n.min(self.len()) as u32);
    }
}

/// Counters of the ring's activity (monotonic).
#[derive(Debug, Default, Clone, Copy)]
pub struct RingStats {
    pub enters: u64,
    pub recv_completions: u64,
    pub recv_buffers: u64,
    pub send_calls: u64,
    pub sent_bytes: u64,
    /// Zero-copy sends issued, and how many of them the kernel copied anyway.
    pub zc_sends: u64,
    pub zc_copied: u64,
    /// File reads, writes and fsyncs started, and how many of the reads
    /// and writes used a registered (fixed) buffer.
    pub file_ops: u64,
    pub file_fixed: u64,
    /// Receive completions whose first buffer was not the one our view of
    /// the buffer ring expected (the ring was resynchronised on the id).
    pub buf_resyncs: u64,
}

/// `IORING_SEND_ZC_REPORT_USAGE`: the notification says whether the
/// kernel copied the data anyway.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`, in a zero-copy notification's result.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

const KIND_SHIFT: u32 = 56;
const KIND_ACCEPT: u64 = 1;
const KIND_RECV: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_CANCEL: u64 = 4;
const KIND_POLL: u64 = 5;
const KIND_FILE: u64 = 6;
const KIND_TIMER: u64 = 7;

fn user_data(kind: u64, id: u32, slot: u32) -> u64 {
    (kind << KIND_SHIFT) | (u64::from(slot) << 32) | u64::from(id)
}

struct InflightSend<S> {
    source: S,
    skip: usize,
    conn: u32,
    /// Zero-copy: the memory is the kernel's until the notification.
    zc: bool,
    /// Result of a zero-copy send, held until its notification arrives.
    result: Option<io::Result<usize>>,
    /// Whether the notification said the kernel copied.
    copied: Option<bool>,
    /// Kept alive until the kernel is done with the message.
    iov: Vec<libc::iovec>,
    msg: Box<libc::msghdr>,
}

struct InflightFile {
    /// Kept alive (and not touched) until the kernel is done with it.
    buf: IoBuf,
    conn: u32,
    token: u32,
}

/// A file operation for [`Ring::file_op`].
#[derive(Debug, Clone, Copy)]
pub enum FileOp {
    /// Read into `buf[at..]` from `offset`.
    Read { offset: u64, at: usize },
    /// Write `buf[at..]` at `offset`; `dsync`: durable before completion
    /// (`RWF_DSYNC`, for FUA).
    Write { offset: u64, at: usize, dsync: bool },
    /// `fdatasync`.
    Fsync,
    /// `fallocate` (punch a hole or zero a range).
    Fallocate { mode: crate::fs::Fallocate, offset: u64, len: u64 },
}

pub struct Ring<S> {
    // Declared first so it drops first: the kernel stops touching the
    // buffer memory before `bufs` frees it.
    ring: IoUring,
    bufs: BufRing,
    bundle: bool,
    /// Multishot receives take a byte limit (Features::recv_limit).
    recv_limit: bool,
    sends: Vec<Option<InflightSend<S>>>,
    free_sends: Vec<u32>,
    files: Vec<Option<InflightFile>>,
    free_files: Vec<u32>,
    /// Registered buffers (dropped after `ring`, which unregisters them).
    arena: Option<Arc<Arena>>,
    /// Registered sockets: `fixed[slot]` is in use.
    fixed: Vec<bool>,
    free_fixed: Vec<u32>,
    /// The armed timer's timespec, kept until its completion.
    timer: Option<Box<types::Timespec>>,
    /// Operations queued or in flight (for a safe drop).
    inflight: usize,
    pub stats: RingStats,
}

/// A socket as ring operations name it: its descriptor, or its slot in
/// the ring's registered-file table (no descriptor lookup per operation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sock {
    Raw(RawFd),
    Fixed(u32),
}

impl Sock {
    pub fn raw(fd: BorrowedFd<'_>) -> Sock {
        Sock::Raw(fd.as_raw_fd())
    }
}

macro_rules! with_sock {
    ($sock:expr, |$fd:ident| $body:expr) => {
        match $sock {
            Sock::Raw(raw) => {
                let $fd = types::Fd(raw);
                $body
            }
            Sock::Fixed(slot) => {
                let $fd = types::Fixed(slot);
                $body
            }
        }
    };
}

/// Provided-buffer group id used for receives.
const BGID: u16 = 0;

impl<S: SendSource> Ring<S> {
    pub fn new(cfg: RingConfig, features: &Features) -> io::Result<Self> {
        let mut b = IoUring::builder();
        b.setup_cqsize(cfg.entries * 4);
        if features.single_issuer && features.defer_taskrun {
            b.setup_single_issuer().setup_defer_taskrun();
        } else {
            b.setup_coop_taskrun();
        }
        let ring = b.build(cfg.entries)?;
        let inc = cfg.incremental && features.buf_inc;
        let bufs = BufRing::new(&ring, cfg.recv_buffers, cfg.recv_buffer_size, inc)?;
        Ok(Ring {
            ring,
            bufs,
            bundle: cfg.bundle,
            recv_limit: features.recv_limit,
            sends: Vec::new(),
            free_sends: Vec::new(),
            files: Vec::new(),
            free_files: Vec::new(),
            arena: None,
            fixed: Vec::new(),
            free_fixed: Vec::new(),
            timer: None,
            inflight: 0,
            stats: RingStats::default(),
        })
    }

    fn push(&mut self, e: squeue::Entry) -> io::Result<()> {
        // SAFETY: every entry pushed here references only memory the ring
        // keeps alive, unmoved, until the operation's final completion
        // (for a zero-copy send, its notification); file descriptors are
        // the kernel's to check:
        // - receives select from the buffer ring (self.bufs), whose memory
        //   lives as long as the ring or is leaked (Drop);
        // - sends: the msghdr and iovec array (self.sends[slot], boxed and
        //   a Vec: heap memory that does not move) and the bytes behind
        //   them, which the `SendSource` contract keeps in place;
        // - file reads and writes: the IoBuf in self.files[slot] (heap
        //   memory; a registered arena chunk is also kept by self.arena),
        //   which nothing else touches until the completion returns it;
        // - a timer: the boxed timespec in self.timer;
        // - accept, poll, fsync, fallocate, cancel: no memory.
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            self.ring.submit()?;
            self.stats.enters += 1;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&e) }
                .map_err(|_| io::Error::other("submission queue full after submit"))?;
        }
        self.inflight += 1;
        Ok(())
    }

    /// Arms a multishot accept on a listening socket.
    pub fn accept_multi(&mut self, listener: BorrowedFd<'_>, index: u32) -> io::Result<()> {
        let e = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(KIND_ACCEPT, index, 0));
        self.push(e)
    }

    /// Arms a multishot receive for connection `conn` on socket `sock`.
    /// With `limit` (and a kernel that has [`Features::recv_limit`]) it
    /// delivers at most that many bytes, then ends (`more` false).
    pub fn recv_multi(&mut self, sock: Sock, conn: u32, limit: Option<u32>) -> io::Result<()> {
        let bundle = self.bundle;
        let e = with_sock!(sock, |fd| if bundle {
            opcode::RecvMultiBundle::new(fd, BGID).build()
        } else {
            opcode::RecvMulti::new(fd, BGID).build()
        });
        let e = match limit {
            Some(n) if self.recv_limit => with_recv_limit(e, n),
            _ => e,
        };
        self.push(e.user_data(user_data(KIND_RECV, conn, 0)))
    }

    /// Whether [`Ring::recv_multi`]'s limit is honoured here.
    pub fn has_recv_limit(&self) -> bool {
        self.recv_limit
    }

    /// Creates a registered-file table with room for `slots` sockets.
    pub fn enable_fixed_files(&mut self, slots: u32) -> io::Result<()> {
        self.ring.submitter().register_files_sparse(slots)?;
        self.fixed = vec![false; slots as usize];
        self.free_fixed = (0..slots).rev().collect();
        Ok(())
    }

    /// Puts `fd` in the registered-file table; `None` when the table is
    /// full or was never created. The table holds its own reference to the
    /// socket: call [`Ring::unregister_socket`] before closing it.
    pub fn register_socket(&mut self, fd: BorrowedFd<'_>) -> io::Result<Option<Sock>> {
        let Some(slot) = self.free_fixed.pop() else { return Ok(None) };
        match self.ring.submitter().register_files_update(slot, &[fd.as_raw_fd()]) {
            Ok(_) => {
                self.fixed[slot as usize] = true;
                Ok(Some(Sock::Fixed(slot)))
            }
            Err(e) => {
                self.free_fixed.push(slot);
                Err(e)
            }
        }
    }

    /// Takes a socket out of the registered-file table (a no-op for a raw
    /// descriptor). Operations already started keep their own reference.
    pub fn unregister_socket(&mut self, sock: Sock) -> io::Result<()> {
        let Sock::Fixed(slot) = sock else { return Ok(()) };
        if !self.fixed.get(slot as usize).copied().unwrap_or(false) {
            return Ok(());
        }
        self.ring.submitter().register_files_update(slot, &[-1])?;
        self.fixed[slot as usize] = false;
        self.free_fixed.push(slot);
        Ok(())
    }

    /// Registers `arena`'s chunks as fixed buffers: file reads and writes
    /// into them skip per-operation page pinning.
    pub fn register_arena(&mut self, arena: Arc<Arena>) -> io::Result<()> {
        let iov = arena.iovecs();
        // SAFETY: the kernel may use the registered memory until the ring is
        // closed. The arena's allocation lives as long as an Arc to it does,
        // and self.arena keeps one until after self.ring is dropped (field
        // order), or forever if operations were in flight (see Drop).
        unsafe { self.ring.submitter().register_buffers(&iov)? };
        self.arena = Some(arena);
        Ok(())
    }

    /// The registered arena, if any.
    pub fn arena(&self) -> Option<&Arc<Arena>> {
        self.arena.as_ref()
    }

    /// Reports (once) when `fd` becomes readable, as [`Completion::Readable`].
    pub fn poll_readable(&mut self, fd: BorrowedFd<'_>, token: u32) -> io::Result<()> {
        let e = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(user_data(KIND_POLL, token, 0));
        self.push(e)
    }

    /// Reports [`Completion::Timer`] once, `after` from now (an
    /// `IORING_OP_TIMEOUT` with no completion count: only time ends it).
    /// One timer at a time: `false` (and nothing armed) while one is set.
    pub fn timer(&mut self, after: std::time::Duration, token: u32) -> io::Result<bool> {
        if self.timer.is_some() {
            return Ok(false);
        }
        let ts = Box::new(types::Timespec::from(after));
        let e = opcode::Timeout::new(&*ts as *const types::Timespec)
            .build()
            .user_data(user_data(KIND_TIMER, token, 0));
        // The box's heap address does not change when it moves into self.
        self.timer = Some(ts);
        if let Err(e) = self.push(e) {
            self.timer = None;
            return Err(e);
        }
        Ok(true)
    }

    /// Asks the kernel to stop connection `conn`'s receive; its final
    /// completion follows.
    pub fn cancel_recv(&mut self, conn: u32) -> io::Result<()> {
        let target = user_data(KIND_RECV, conn, 0);
        let e = opcode::AsyncCancel::new(target).build().user_data(user_data(KIND_CANCEL, conn, 0));
        self.push(e)
    }

    /// Sends `source` (from byte `skip`) on `sock` in one `sendmsg` of at
    /// most [`IOV_MAX`] iovecs, so it may send less than all of it (see
    /// [`Completion::Send`]). `more` sets `MSG_MORE` (more replies are
    /// coming: let the kernel cork).
    pub fn send(
        &mut self,
        sock: Sock,
        conn: u32,
        source: S,
        skip: usize,
        more: bool,
        zerocopy: bool,
    ) -> io::Result<()> {
        let mut slices = Vec::with_capacity(8);
        source.iovecs(skip, &mut slices);
        // The kernel refuses a message of more than IOV_MAX iovecs (EMSGSIZE
        // for sendmsg): send the first IOV_MAX; the completion reports a
        // short send and the caller sends the rest from there.
        slices.truncate(IOV_MAX);
        let iov: Vec<libc::iovec> = slices
            .iter()
            .map(|s| libc::iovec { iov_base: s.as_ptr() as *mut libc::c_void, iov_len: s.len() })
            .collect();
        drop(slices);
        // SAFETY: msghdr is plain old data; all-zero is a valid empty message.
        let mut msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        let slot = match self.free_sends.pop() {
            Some(s) => s,
            None => {
                self.sends.push(None);
                (self.sends.len() - 1) as u32
            }
        };
        let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
        let m = &*msg as *const libc::msghdr;
        let e = with_sock!(sock, |fd| if zerocopy {
            opcode::SendMsgZc::new(fd, m).flags(flags as u32).ioprio(SEND_ZC_REPORT_USAGE).build()
        } else {
            opcode::SendMsg::new(fd, m).flags(flags as u32).build()
        });
        let e = e.user_data(user_data(KIND_SEND, conn, slot));
        // The iovecs point into `source`'s heap buffers, which do not move
        // when `source` moves into the slot.
        self.sends[slot as usize] =
            Some(InflightSend { source, skip, conn, zc: zerocopy, result: None, copied: None, iov, msg });
        if let Err(e) = self.push(e) {
            self.sends[slot as usize] = None;
            self.free_sends.push(slot);
            return Err(e);
        }
        self.stats.send_calls += 1;
        if zerocopy {
            self.stats.zc_sends += 1;
        }
        Ok(())
    }

    /// Starts a read, write or fsync on a file; `buf` (unused by fsync) is
    /// owned by the ring until [`Completion::File`] returns it. A read
    /// fills `buf[at..len]`. A chunk of the registered arena makes the read
    /// or write a fixed-buffer operation.
    pub fn file_op(
        &mut self,
        fd: BorrowedFd<'_>,
        conn: u32,
        token: u32,
        op: FileOp,
        mut buf: IoBuf,
    ) -> io::Result<()> {
        let slot = match self.free_files.pop() {
            Some(s) => s,
            None => {
                self.files.push(None);
                (self.files.len() - 1) as u32
            }
        };
        let fd = types::Fd(fd.as_raw_fd());
        let fixed = self.arena.as_ref().and_then(|a| buf.fixed_index(a));
        let e = match op {
            FileOp::Read { offset, at } => {
                // The kernel writes here: take the pointer from a unique
                // borrow of the buffer, which the ring owns until then.
                let rest = buf.get_mut(at..).unwrap_or_default();
                let len = rest.len().min(u32::MAX as usize) as u32;
                let ptr = rest.as_mut_ptr();
                match fixed {
                    Some(i) => opcode::ReadFixed::new(fd, ptr, len, i).offset(offset).build(),
                    None => opcode::Read::new(fd, ptr, len).offset(offset).build(),
                }
            }
            FileOp::Write { offset, at, dsync } => {
                let rest = buf.get(at..).unwrap_or_default();
                let len = rest.len().min(u32::MAX as usize) as u32;
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                match fixed {
                    Some(i) => opcode::WriteFixed::new(fd, rest.as_ptr(), len, i)
                        .offset(offset)
                        .rw_flags(flags)
                        .build(),
                    None => opcode::Write::new(fd, rest.as_ptr(), len).offset(offset).rw_flags(flags).build(),
                }
            }
            FileOp::Fsync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            FileOp::Fallocate { mode, offset, len } => {
                opcode::Fallocate::new(fd, len).offset(offset).mode(mode.bits()).build()
            }
        };
        let fixed = fixed.is_some() && matches!(op, FileOp::Read { .. } | FileOp::Write { .. });
        let e = e.user_data(user_data(KIND_FILE, conn, slot));
        // The pointer into `buf`'s heap memory stays valid: the Vec moves
        // into the slot, its heap buffer does not move, and nothing touches
        // it until the completion hands it back.
        self.files[slot as usize] = Some(InflightFile { buf, conn, token });
        if let Err(e) = self.push(e) {
            self.files[slot as usize] = None;
            self.free_files.push(slot);
            return Err(e);
        }
        self.stats.file_ops += 1;
        if fixed {
            self.stats.file_fixed += 1;
        }
        Ok(())
    }

    /// Submits queued operations and waits for at least `want` completions.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        self.stats.enters += 1;
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Hands every available completion to `f`.
    pub fn completions(&mut self, mut f: impl FnMut(&mut Self, Completion<S>)) {
        loop {
            let Some(cqe) = self.ring.completion().next() else { break };
            if let Some(c) = self.decode(cqe) {
                f(self, c);
            }
        }
    }

    fn decode(&mut self, cqe: cqueue::Entry) -> Option<Completion<S>> {
        let ud = cqe.user_data();
        let (kind, slot, id) = (ud >> KIND_SHIFT, ((ud >> 32) & 0xff_ffff) as u32, ud as u32);
        let res = cqe.result();
        let flags = cqe.flags();
        let more = cqueue::more(flags);
        if !more {
            self.inflight = self.inflight.saturating_sub(1);
        }
        let err = |res: i32| io::Error::from_raw_os_error(-res);
        match kind {
            KIND_ACCEPT => {
                let result = if res < 0 {
                    Err(err(res))
                } else {
                    // SAFETY: a successful accept completion carries a new
                    // file descriptor that nothing else owns.
                    Ok(unsafe { OwnedFd::from_raw_fd(res as RawFd) })
                };
                Some(Completion::Accept { listener: id, result, more })
            }
            KIND_RECV => {
                let result = if res < 0 {
                    Err(err(res))
                } else {
                    let len = res as usize;
                    let mut bufs = RecvBufs { bufs: Vec::new(), len };
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        if !self.bufs.take(bid, len, &mut bufs.bufs) {
                            self.stats.buf_resyncs += 1;
                        }
                        self.stats.recv_buffers += bufs.bufs.len() as u64;
                    }
                    self.stats.recv_completions += 1;
                    Ok(bufs)
                };
                Some(Completion::Recv { conn: id, result, more })
            }
            KIND_SEND => {
                let entry = self.sends.get_mut(slot as usize)?.as_mut()?;
                let result = if entry.zc && cqueue::notif(flags) {
                    // The kernel is done with the pages; `res` says whether
                    // it had to copy them after all (loopback always does).
                    let copied = res as u32 & NOTIF_USAGE_ZC_COPIED != 0;
                    if copied {
                        self.stats.zc_copied += 1;
                    }
                    entry.copied = Some(copied);
                    entry.result.take().unwrap_or(Ok(0))
                } else {
                    let r = if res < 0 { Err(err(res)) } else { Ok(res as usize) };
                    if let Ok(n) = r {
                        self.stats.sent_bytes += n as u64;
                    }
                    if entry.zc && more {
                        // The buffers stay pinned until the notification.
                        entry.result = Some(r);
                        return None;
                    }
                    r
                };
                let s = self.sends.get_mut(slot as usize)?.take()?;
                self.free_sends.push(slot);
                drop((s.iov, s.msg));
                debug_assert_eq!(s.conn, id);
                Some(Completion::Send {
                    conn: s.conn,
                    result,
                    source: s.source,
                    skip: s.skip,
                    copied: s.copied,
                })
            }
            KIND_FILE => {
                let f = self.files.get_mut(slot as usize)?.take()?;
                self.free_files.push(slot);
                let result = if res < 0 { Err(err(res)) } else { Ok(res as usize) };
                Some(Completion::File { conn: f.conn, token: f.token, result, buf: f.buf })
            }
            KIND_CANCEL => Some(Completion::Cancelled),
            KIND_TIMER => {
                // -ETIME is the timer expiring; any other result (e.g.
                // -ECANCELED at teardown) is reported the same way.
                self.timer = None;
                Some(Completion::Timer { token: id })
            }
            KIND_POLL => Some(Completion::Readable { token: id }),
            _ => None,
        }
    }

    /// The received bytes of a piece (empty for a piece of another ring).
    pub fn buffer(&self, piece: &BufPiece) -> &[u8] {
        if piece.ring != self.bufs.id {
            return &[];
        }
        self.bufs.get(piece.bid, piece.start, piece.end)
    }

    /// Gives back a piece of a receive buffer once its bytes are consumed;
    /// the buffer returns to the kernel when all its pieces are back and
    /// the kernel has finished filling it. A piece of another ring is
    /// dropped (that ring keeps the buffer).
    pub fn recycle(&mut self, piece: BufPiece) {
        if piece.ring == self.bufs.id {
            self.bufs.release(piece.bid);
        }
    }

    /// Whether receive buffers are consumed incrementally.
    pub fn incremental(&self) -> bool {
        self.bufs.inc
    }

    /// Receive buffers currently available to the kernel.
    pub fn free_recv_buffers(&self) -> usize {
        self.bufs.available()
    }

    /// Operations submitted whose final completion has not arrived.
    pub fn inflight(&self) -> usize {
        self.inflight
    }
}

impl<S> Drop for Ring<S> {
    fn drop(&mut self) {
        if self.inflight > 0 {
            // The kernel may still be writing into receive buffers or
            // reading send buffers after the ring fd closes: keep that
            // memory forever rather than free it under the kernel.
            self.bufs.leak();
            for s in self.sends.drain(..).flatten() {
                std::mem::forget(s);
            }
            for f in self.files.drain(..).flatten() {
                std::mem::forget(f);
            }
            if let Some(t) = self.timer.take() {
                std::mem::forget(t);
            }
            if let Some(a) = self.arena.take() {
                std::mem::forget(a);
            }
        }
    }
}

/// A provided-buffer ring (`IORING_REGISTER_PBUF_RING`) and its buffers.
struct BufRing {
    ring: *mut types::BufRingEntry,
    ring_layout: Layout,
    mem: *mut u8,
    mem_layout: Layout,
    entries: u16,
    buf_size: u32,
    /// Our copy of which buffer id sits in each ring slot, to follow bundles.
    slots: Vec<u16>,
    /// Next slot the kernel will consume (our view).
    head: u16,
    /// Next slot we fill.
    tail: u16,
    leaked: bool,
    /// `IOU_PBUF_RING_INC`: the kernel takes each buffer bit by bit.
    inc: bool,
    /// Per buffer: bytes the kernel has filled (incremental mode), pieces
    /// handed out and not yet released, and whether the kernel is done
    /// with it (it may still be filling it in incremental mode).
    filled: Vec<u32>,
    pieces: Vec<u16>,
    kernel_done: Vec<bool>,
    /// Buffers the kernel has finished with (monotonic).
    spent: u64,
    /// Tells this ring's pieces from another's ([`BufPiece`]).
    id: u32,
}

/// Source of [`BufRing::id`]s.
static NEXT_BUF_RING: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// `IOU_PBUF_RING_INC`.
const PBUF_RING_INC: u16 = 2;

impl BufRing {
    fn new(ring: &IoUring, entries: u16, buf_size: u32, inc: bool) -> io::Result<Self> {
        BufRing::with_group(ring, entries, buf_size, inc, BGID)
    }

    fn with_group(ring: &IoUring, entries: u16, buf_size: u32, inc: bool, bgid: u16) -> io::Result<Self> {
        if !entries.is_power_of_two() || entries > 32768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer count must be a power of two <= 32768",
            ));
        }
        let page = 4096;
        let ring_layout =
            Layout::from_size_align(entries as usize * std::mem::size_of::<types::BufRingEntry>(), page)
                .map_err(io::Error::other)?;
        let mem_layout =
            Layout::from_size_align(entries as usize * buf_size as usize, page).map_err(io::Error::other)?;
        if mem_layout.size() == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "receive buffers must not be empty"));
        }
        // SAFETY: nonzero-size layouts (checked above); zeroed memory is a
        // valid BufRingEntry array and a valid byte buffer.
        let (ring_ptr, mem) =
            unsafe { (alloc_zeroed(ring_layout) as *mut types::BufRingEntry, alloc_zeroed(mem_layout)) };
        if ring_ptr.is_null() || mem.is_null() {
            // SAFETY: freeing exactly what was allocated with these layouts.
            unsafe {
                if !ring_ptr.is_null() {
                    dealloc(ring_ptr as *mut u8, ring_layout);
                }
                if !mem.is_null() {
                    dealloc(mem, mem_layout);
                }
            }
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let mut br = BufRing {
            ring: ring_ptr,
            ring_layout,
            mem,
            mem_layout,
            entries,
            buf_size,
            slots: vec![0; entries as usize],
            head: 0,
            tail: 0,
            leaked: false,
            inc,
            filled: vec![0; entries as usize],
            pieces: vec![0; entries as usize],
            kernel_done: vec![false; entries as usize],
            spent: 0,
            id: NEXT_BUF_RING.fetch_add(1, Ordering::Relaxed),
        };
        let flags = if inc { PBUF_RING_INC } else { 0 };
        // SAFETY: the ring memory is page aligned, sized for `entries`, and
        // lives in `br` until drop, which happens after the IoUring that
        // uses it is dropped (field order in Ring) or, if operations were
        // still in flight, never (leak()).
        unsafe { ring.submitter().register_buf_ring_with_flags(ring_ptr as u64, entries, bgid, flags)? };
        for bid in 0..entries {
            br.put(bid);
        }
        Ok(br)
    }

    fn mask(&self) -> u16 {
        self.entries - 1
    }

    /// Publishes buffer `bid` at the tail.
    fn put(&mut self, bid: u16) {
        let idx = self.tail & self.mask();
        self.slots[idx as usize] = bid;
        // SAFETY: idx < entries, so the entry is inside the ring allocation;
        // the kernel reads entries only between head and the published tail,
        // and this slot is past the published tail until the store below.
        let e = unsafe { &mut *self.ring.add(idx as usize) };
        e.set_addr(self.mem as u64 + u64::from(bid) * u64::from(self.buf_size));
        e.set_len(self.buf_size);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field overlays entry 0's `resv`, which the kernel
        // reads and we alone write; an AtomicU16 view of it with a Release
        // store publishes the entry written above.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Records that the kernel filled `len` bytes, starting in buffer `bid`,
    /// and lists the pieces. False when `bid` was not at the head of our
    /// view (the caller counts it): the view is resynchronised on the id.
    fn take(&mut self, bid: u16, len: usize, out: &mut Vec<BufPiece>) -> bool {
        if len == 0 && self.inc {
            // End of stream: an incremental buffer is not consumed.
            return true;
        }
        let mask = self.mask();
        let mut in_step = true;
        if self.slots[(self.head & mask) as usize] != bid {
            // Completions arrive in consumption order on a single-issuer
            // ring, so this should not happen; resynchronise on the id.
            in_step = false;
            if let Some(pos) = (0..self.entries)
                .map(|i| self.head.wrapping_add(i))
                .find(|p| self.slots[(p & mask) as usize] == bid)
            {
                self.head = pos;
            }
        }
        // Without incremental mode every buffer is spent whole (an end of
        // stream spends one too); with it, only filled bytes are.
        let mut left = len.max(1);
        while left > 0 {
            let b = self.slots[(self.head & mask) as usize];
            let bi = b as usize;
            let start = if self.inc { self.filled[bi] } else { 0 };
            let n = left.min((self.buf_size - start) as usize);
            out.push(BufPiece {
                ring: self.id,
                bid: b,
                start,
                end: if len == 0 { start } else { start + n as u32 },
            });
            self.pieces[bi] = self.pieces[bi].saturating_add(1);
            if self.inc {
                self.filled[bi] += n as u32;
            }
            if !self.inc || self.filled[bi] >= self.buf_size {
                self.kernel_done[bi] = true;
                self.spent += 1;
                self.head = self.head.wrapping_add(1);
            }
            left -= n;
        }
        in_step
    }

    /// One piece of buffer `bid` is consumed; republishes the buffer once
    /// the kernel is done with it and no piece is outstanding.
    fn release(&mut self, bid: u16) {
        let bi = bid as usize;
        let Some(p) = self.pieces.get_mut(bi) else { return };
        *p = p.saturating_sub(1);
        if *p == 0 && self.kernel_done[bi] {
            self.kernel_done[bi] = false;
            self.filled[bi] = 0;
            self.put(bid);
        }
    }

    fn get(&self, bid: u16, start: u32, end: u32) -> &[u8] {
        let end = end.min(self.buf_size) as usize;
        let start = (start as usize).min(end);
        let bid = bid.min(self.entries - 1);
        // SAFETY: bid < entries and start <= end <= buf_size, so the range
        // is inside the allocation. The kernel filled these bytes before
        // the completion that listed them, and does not write them again
        // until the buffer is republished by release(), which needs
        // &mut self and so cannot run while this shared borrow lives; in
        // incremental mode the kernel only writes past what it has filled.
        unsafe {
            std::slice::from_raw_parts(
                self.mem.add(bid as usize * self.buf_size as usize + start),
                end - start,
            )
        }
    }

    fn available(&self) -> usize {
        self.tail.wrapping_sub(self.head) as usize
    }

    #[cfg(test)]
    fn idle(&self) -> bool {
        self.pieces.iter().all(|&p| p == 0)
    }

    fn leak(&mut self) {
        self.leaked = true;
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.leaked {
            return;
        }
        // SAFETY: freeing exactly what new() allocated with these layouts;
        // the ring that used them is gone (see Ring's field order).
        unsafe {
            dealloc(self.ring as *mut u8, self.ring_layout);
            dealloc(self.mem, self.mem_layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    struct Bytes(Vec<u8>);
    // SAFETY: the slices point into the Vec's heap buffer, which does not
    // move with the value and is never written after construction.
    unsafe impl SendSource for Bytes {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn iovecs<'a>(&'a self, skip: usize, out: &mut Vec<IoSlice<'a>>) {
            out.push(IoSlice::new(&self.0[skip..]));
        }
    }

    fn ring(bundle: bool) -> Ring<Bytes> {
        ring_with(bundle, false)
    }

    fn ring_with(bundle: bool, incremental: bool) -> Ring<Bytes> {
        let f = Features::probe();
        assert!(f.io_uring && f.recv_multishot && f.buf_ring, "kernel lacks what this test needs: {f:?}");
        let cfg = RingConfig {
            entries: 64,
            recv_buffers: 16,
            recv_buffer_size: 1024,
            bundle: bundle && f.bundle,
            incremental,
        };
        Ring::new(cfg, &f).unwrap()
    }

    #[test]
    fn a_limited_multishot_receive_ends_after_its_bytes() {
        let f = Features::probe();
        assert!(f.recv_limit, "this kernel ignores a multishot receive's byte limit: {f:?}");
        for (bundle, inc) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut r = ring_with(bundle, inc);
            let (mut a, b) = UnixStream::pair().unwrap();
            a.write_all(&[7u8; 5000]).unwrap();
            r.recv_multi(Sock::raw(b.as_fd()), 3, Some(2000)).unwrap();
            let (mut got, mut ended) = (0, false);
            while !ended {
                r.submit_and_wait(1).unwrap();
                r.completions(|r, c| {
                    if let Completion::Recv { result, more, .. } = c {
                        let bufs = result.unwrap();
                        got += bufs.len;
                        bufs.bufs.into_iter().for_each(|p| r.recycle(p));
                        ended |= !more;
                    }
                });
            }
            // It ended although bytes wait: at the limit, rounded up to
            // the buffer it reached the limit in.
            assert!((2000..=2000 + 1024).contains(&got), "bundle={bundle} inc={inc}: {got} bytes");
        }
    }

    #[test]
    fn multishot_recv_delivers_bytes_in_order_across_buffers() {
        for (bundle, inc) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut r = ring_with(bundle, inc);
            let (mut a, b) = UnixStream::pair().unwrap();
            r.recv_multi(Sock::raw(b.as_fd()), 7, None).unwrap();
            let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
            a.write_all(&data).unwrap();
            drop(a);
            let mut got = Vec::new();
            let mut eof = false;
            while !eof {
                r.submit_and_wait(1).unwrap();
                r.completions(|r, c| match c {
                    Completion::Recv { conn, result, .. } => {
                        assert_eq!(conn, 7);
                        let bufs = result.unwrap();
                        if bufs.len == 0 {
                            eof = true;
                        }
                        for piece in bufs.bufs {
                            got.extend_from_slice(r.buffer(&piece));
                            r.recycle(piece);
                        }
                    }
                    _ => panic!("unexpected completion"),
                });
            }
            assert_eq!(got, data, "bundle={bundle} inc={inc}");
            assert!(r.bufs.idle());
            if !inc {
                assert_eq!(r.free_recv_buffers(), 16);
            }
        }
    }

    #[test]
    fn incremental_buffers_hold_many_small_receives_and_survive_interleaving() {
        let f = Features::probe();
        assert!(f.buf_inc, "kernel lacks IOU_PBUF_RING_INC: {f:?}");
        for bundle in [false, true] {
            let mut r = ring_with(bundle, true);
            assert!(r.incremental());
            let (mut a1, b1) = UnixStream::pair().unwrap();
            let (mut a2, b2) = UnixStream::pair().unwrap();
            r.recv_multi(Sock::raw(b1.as_fd()), 1, None).unwrap();
            r.recv_multi(Sock::raw(b2.as_fd()), 2, None).unwrap();
            // Small messages from two connections, alternating: they share
            // buffers, and conn 1's pieces are held back (a backlog) while
            // conn 2's are released at once.
            let (mut got1, mut got2, mut held) = (Vec::new(), Vec::new(), Vec::new());
            // One wait: conn 1's pieces are held, conn 2's consumed at once.
            let step = |r: &mut Ring<Bytes>, held: &mut Vec<BufPiece>, got2: &mut Vec<u8>| {
                r.submit_and_wait(1).unwrap();
                r.completions(|r, c| {
                    if let Completion::Recv { conn, result: Ok(bufs), .. } = c {
                        for piece in bufs.bufs {
                            if conn == 1 {
                                held.push(piece);
                            } else {
                                got2.extend_from_slice(r.buffer(&piece));
                                r.recycle(piece);
                            }
                        }
                    }
                });
            };
            let mut want = (Vec::new(), Vec::new());
            for i in 0..300u32 {
                let m1 = [(i % 251) as u8; 28];
                let m2 = [(i % 13) as u8 + 100; 100];
                a1.write_all(&m1).unwrap();
                a2.write_all(&m2).unwrap();
                want.0.extend_from_slice(&m1);
                want.1.extend_from_slice(&m2);
                step(&mut r, &mut held, &mut got2);
                if held.len() > 40 {
                    for piece in held.drain(..) {
                        got1.extend_from_slice(r.buffer(&piece));
                        r.recycle(piece);
                    }
                }
            }
            drop((a1, a2));
            while got1.len() + held.iter().map(|p| p.len()).sum::<usize>() < want.0.len()
                || got2.len() < want.1.len()
            {
                step(&mut r, &mut held, &mut got2);
            }
            for piece in held.drain(..) {
                got1.extend_from_slice(r.buffer(&piece));
                r.recycle(piece);
            }
            assert_eq!(got1, want.0, "bundle={bundle}");
            assert_eq!(got2, want.1, "bundle={bundle}");
            // Buffers are spent by bytes (1 KiB each here), not one per
            // completion.
            let bytes = want.0.len() + want.1.len();
            assert!(r.bufs.spent <= (bytes / 1024 + 2) as u64, "{} buffers for {bytes} bytes", r.bufs.spent);
            assert!(r.stats.recv_completions > r.bufs.spent, "{:?} spent {}", r.stats, r.bufs.spent);
        }
    }

    #[test]
    fn send_returns_the_source_and_counts_bytes() {
        let mut r = ring(false);
        let (a, mut b) = UnixStream::pair().unwrap();
        r.send(Sock::raw(a.as_fd()), 3, Bytes(b"hello world".to_vec()), 6, false, false).unwrap();
        r.submit_and_wait(1).unwrap();
        let mut done = false;
        r.completions(|_, c| {
            if let Completion::Send { conn, result, source, skip, .. } = c {
                assert_eq!((conn, result.unwrap(), skip), (3, 5, 6));
                assert_eq!(source.0, b"hello world");
                done = true;
            }
        });
        assert!(done);
        let mut buf = [0u8; 5];
        std::io::Read::read_exact(&mut b, &mut buf).unwrap();
        assert_eq!(&buf, b"world");
    }

    #[test]
    fn zero_copy_send_returns_the_source_after_its_notification() {
        let f = Features::probe();
        assert!(f.send_zc, "kernel lacks SEND_ZC");
        let mut r = ring(false);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        r.send(Sock::raw(a.as_fd()), 9, Bytes(payload.clone()), 0, false, true).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 200_000];
            std::io::Read::read_exact(&mut b, &mut got).map(|_| got)
        });
        let mut sent = 0;
        let mut returned = false;
        while !returned {
            r.submit_and_wait(1).unwrap();
            r.completions(|_, c| {
                if let Completion::Send { conn, result, source, copied, .. } = c {
                    assert_eq!(conn, 9);
                    assert_eq!(copied, Some(true), "loopback always copies");
                    sent = result.unwrap();
                    assert_eq!(source.0.len(), 200_000);
                    returned = true;
                }
            });
        }
        assert!(sent > 0);
        // A short send leaves the rest to us.
        std::io::Write::write_all(&mut &a, &payload[sent..]).unwrap();
        assert_eq!(reader.join().unwrap().unwrap(), payload);
        assert_eq!(r.stats.zc_sends, 1);
        assert_eq!(r.stats.zc_copied, 1, "loopback always copies");
        assert_eq!(r.inflight(), 0);
    }

    #[test]
    fn file_write_read_and_fsync_round_trip() {
        let mut r = ring(false);
        let path = std::env::temp_dir().join(format!("ringbd-uring-file-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let run = |r: &mut Ring<Bytes>, op: FileOp, buf: IoBuf| {
            r.file_op(f.as_fd(), 1, 42, op, buf).unwrap();
            r.submit_and_wait(1).unwrap();
            let mut out = None;
            r.completions(|_, c| {
                if let Completion::File { conn, token, result, buf } = c {
                    assert_eq!((conn, token), (1, 42));
                    out = Some((result.unwrap(), buf));
                }
            });
            out.expect("a file completion")
        };
        let (n, _) =
            run(&mut r, FileOp::Write { offset: 4096, at: 2, dsync: true }, IoBuf::from_slice(b"xxhello"));
        assert_eq!(n, 5);
        let (n, buf) = run(&mut r, FileOp::Read { offset: 4096, at: 1 }, IoBuf::from_slice(&[0u8; 6]));
        assert_eq!(n, 5);
        assert_eq!(&buf[..], b"\0hello");
        assert_eq!(run(&mut r, FileOp::Fsync, IoBuf::new()).0, 0);
        assert_eq!(r.stats.file_fixed, 0);
        let punch = FileOp::Fallocate { mode: crate::fs::Fallocate::PunchHole, offset: 4096, len: 4096 };
        assert_eq!(run(&mut r, punch, IoBuf::new()).0, 0);
        let (_, buf) = run(&mut r, FileOp::Read { offset: 4096, at: 0 }, IoBuf::from_slice(&[9u8; 5]));
        assert_eq!(&buf[..], &[0u8; 5], "the punched range reads as zeroes");

        // The same through registered buffers.
        let arena = Arena::new(4096, 2).unwrap();
        r.register_arena(Arc::clone(&arena)).unwrap();
        let mut w = arena.take(4096).unwrap();
        w.extend_from_slice(b"fixed!");
        let (n, w) = run(&mut r, FileOp::Write { offset: 8192, at: 0, dsync: false }, w);
        assert_eq!(n, 6);
        drop(w);
        let mut rd = arena.take(6).unwrap();
        rd.set_len(6);
        let (n, rd) = run(&mut r, FileOp::Read { offset: 8192, at: 0 }, rd);
        assert_eq!((n, &rd[..]), (6, &b"fixed!"[..]));
        assert_eq!(r.stats.file_fixed, 2);
    }

    #[test]
    fn registered_sockets_carry_receives_and_sends() {
        let mut r = ring(false);
        r.enable_fixed_files(4).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let s = r.register_socket(a.as_fd()).unwrap().expect("a free slot");
        assert!(matches!(s, Sock::Fixed(_)));
        r.send(s, 1, Bytes(b"ping".to_vec()), 0, false, false).unwrap();
        r.recv_multi(s, 1, None).unwrap();
        r.submit_and_wait(1).unwrap();
        let mut buf = [0u8; 4];
        std::io::Read::read_exact(&mut b, &mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        b.write_all(b"pong").unwrap();
        let mut got = Vec::new();
        while got.len() < 4 {
            r.submit_and_wait(1).unwrap();
            r.completions(|r, c| {
                if let Completion::Recv { result: Ok(bufs), .. } = c {
                    for piece in bufs.bufs {
                        got.extend_from_slice(r.buffer(&piece));
                        r.recycle(piece);
                    }
                }
            });
        }
        assert_eq!(got, b"pong");
        // Unregistering drops the table's reference: closing our descriptor
        // then closes the socket, which the peer sees as end of stream.
        r.cancel_recv(1).unwrap();
        while r.inflight() > 0 {
            r.submit_and_wait(1).unwrap();
            r.completions(|_, _| {});
        }
        r.unregister_socket(s).unwrap();
        drop(a);
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut b, &mut rest).unwrap();
        assert!(rest.is_empty());
    }
}
