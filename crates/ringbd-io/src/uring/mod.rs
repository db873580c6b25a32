//! A safe io_uring ring for a network server loop: multishot accept,
//! multishot receive into a provided-buffer ring (with bundles), and
//! vectored sends whose buffers the ring owns until the kernel is done.
//!
//! One [`Ring`] belongs to one thread (the ring is created
//! `SINGLE_ISSUER | DEFER_TASKRUN` where the kernel allows). Operations are
//! queued with the `accept_multi`/`recv_multi`/`send`/`cancel_recv`
//! methods, submitted with [`Ring::submit_and_wait`], and their results
//! come back from [`Ring::completions`].
//!
//! This file holds the ring itself: creating it, building and pushing
//! submission entries, and decoding completions. The other files:
//! `probe.rs` (what the kernel offers),
//! `buf_ring.rs` (the provided-buffer ring receives select from),
//! `send.rs` (vectored and zero-copy sends, and the ownership of their
//! buffers until the kernel is done), `file.rs` (file reads, writes, syncs
//! and registered buffers).

/// Names socket `$sock` as the `types::Fd` or `types::Fixed` target
/// `$fd` that `$body` builds an entry for. Defined before the `mod` lines
/// so that `send.rs` sees it too.
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

mod buf_ring;
mod file;
mod probe;
mod send;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use buf_ring::BufRing;
use file::InflightFile;
use probe::with_recv_limit;
use send::InflightSend;

use crate::buf::{Arena, IoBuf};

pub use buf_ring::{BufPiece, RecvBufs};
pub use file::FileOp;
pub use probe::Features;
pub use send::{SendSource, IOV_MAX};

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
            KIND_SEND => self.send_done(slot, id, res, flags, more),
            KIND_FILE => self.file_done(slot, res),
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
