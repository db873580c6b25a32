//! A small io_uring ring for NBD clients: a few connected sockets, each with
//! at most one vectored send and one receive in flight, whose buffers the
//! ring owns until the kernel is done with them.
//!
//! The client queues a [`SendBatch`] (request headers plus owned write
//! payloads, sent as one `sendmsg`; short sends are continued inside the
//! ring) and a receive buffer per socket, calls [`ClientRing::submit_and_wait`],
//! and takes the finished operations from [`ClientRing::completions`], which
//! hands the buffers back.
//!
//! Another thread can end a wait early: [`ClientRing::set_wake`] gives the
//! ring an eventfd, [`ClientRing::arm_wake`] polls it, and a write to it
//! completes the poll as [`RingEvent::Woken`] (the ring clears the eventfd).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use io_uring::{opcode, squeue, types, IoUring};

const KIND_SEND: u64 = 1;
const KIND_RECV: u64 = 2;
const KIND_WAKE: u64 = 3;

/// One piece of a send: `len` bytes from `start` of buffer `buf`
/// ([`SendBatch::HEAD`] is the header buffer, others index `bufs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub buf: u32,
    pub start: usize,
    pub len: usize,
}

/// Bytes to send as one vectored message: a header buffer and owned
/// payload buffers, in the order `pieces` lists them.
#[derive(Debug, Default)]
pub struct SendBatch {
    pub head: Vec<u8>,
    pub bufs: Vec<Vec<u8>>,
    pub pieces: Vec<Piece>,
}

impl SendBatch {
    /// The `buf` value naming [`SendBatch::head`].
    pub const HEAD: u32 = u32::MAX;

    /// Appends header bytes, merging with the previous header piece.
    pub fn push_head(&mut self, bytes: &[u8]) {
        let start = self.head.len();
        self.head.extend_from_slice(bytes);
        if let Some(p) = self.pieces.last_mut() {
            if p.buf == Self::HEAD && p.start + p.len == start {
                p.len += bytes.len();
                return;
            }
        }
        self.pieces.push(Piece { buf: Self::HEAD, start, len: bytes.len() });
    }

    /// Appends an owned payload buffer (all of it); returns its index.
    pub fn push_buf(&mut self, buf: Vec<u8>) -> usize {
        let len = buf.len();
        self.bufs.push(buf);
        let idx = self.bufs.len() - 1;
        self.pieces.push(Piece { buf: idx as u32, start: 0, len });
        idx
    }

    pub fn len(&self) -> usize {
        self.pieces.iter().map(|p| p.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.iter().all(|p| p.len == 0)
    }

    pub fn clear(&mut self) {
        self.head.clear();
        self.bufs.clear();
        self.pieces.clear();
    }

    /// Iovecs for everything after the first `skip` bytes. Pieces that
    /// point outside their buffer are clamped, so the kernel only ever
    /// sees memory the batch owns.
    fn iovecs(&self, mut skip: usize, out: &mut Vec<libc::iovec>) {
        out.clear();
        for p in &self.pieces {
            let buf: &[u8] = if p.buf == Self::HEAD {
                &self.head
            } else {
                match self.bufs.get(p.buf as usize) {
                    Some(b) => b,
                    None => continue,
                }
            };
            let start = p.start.min(buf.len());
            let end = p.start.saturating_add(p.len).min(buf.len());
            let mut s = &buf[start..end];
            if skip >= s.len() {
                skip -= s.len();
                continue;
            }
            s = &s[skip..];
            skip = 0;
            out.push(libc::iovec { iov_base: s.as_ptr() as *mut libc::c_void, iov_len: s.len() });
        }
    }
}

struct InflightSend {
    batch: SendBatch,
    iov: Vec<libc::iovec>,
    msg: Box<libc::msghdr>,
    sent: usize,
    total: usize,
}

struct Socket {
    fd: OwnedFd,
    send: Option<InflightSend>,
    /// The receive buffer, and the slice of it being filled for `recv_into`
    /// (`None`: appending to its spare capacity).
    recv: Option<(Vec<u8>, Option<std::ops::Range<usize>>)>,
}

/// A finished operation, with its buffers.
#[derive(Debug)]
pub enum RingEvent {
    /// The whole batch was sent (or the send failed).
    Sent { sock: usize, batch: SendBatch, result: io::Result<usize> },
    /// Received bytes were appended to `buf` (`Ok(0)`: the peer closed).
    Received { sock: usize, buf: Vec<u8>, result: io::Result<usize> },
    /// Received bytes were written at the start of `range` in `buf`.
    ReceivedInto { sock: usize, buf: Vec<u8>, range: std::ops::Range<usize>, result: io::Result<usize> },
    /// The wake eventfd was written ([`ClientRing::set_wake`]).
    Woken,
}

/// The client ring; owns its sockets.
pub struct ClientRing {
    ring: IoUring,
    socks: Vec<Socket>,
    inflight: usize,
    /// Spare iovec vectors, reused across sends.
    spare_iov: Vec<Vec<libc::iovec>>,
    /// The eventfd another thread writes to end a wait, and whether its
    /// poll is in the ring (not counted in `inflight`: it holds no memory).
    wake: Option<crate::eventfd::EventFd>,
    wake_armed: bool,
}

impl ClientRing {
    /// A ring with room for `entries` submissions.
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = match IoUring::builder().setup_single_issuer().setup_coop_taskrun().build(entries) {
            Ok(r) => r,
            Err(_) => IoUring::new(entries)?,
        };
        Ok(ClientRing {
            ring,
            socks: Vec::new(),
            inflight: 0,
            spare_iov: Vec::new(),
            wake: None,
            wake_armed: false,
        })
    }

    /// Hands a connected socket to the ring; returns its index.
    pub fn add_socket(&mut self, fd: OwnedFd) -> usize {
        self.socks.push(Socket { fd, send: None, recv: None });
        self.socks.len() - 1
    }

    pub fn sending(&self, sock: usize) -> bool {
        self.socks.get(sock).is_some_and(|s| s.send.is_some())
    }

    pub fn receiving(&self, sock: usize) -> bool {
        self.socks.get(sock).is_some_and(|s| s.recv.is_some())
    }

    /// Operations the kernel still owns.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    fn push(&mut self, e: &squeue::Entry) -> io::Result<()> {
        // SAFETY: every entry pushed here points only at memory owned by
        // `self.socks` (a send's batch, iovecs and msghdr; a receive's
        // buffer), which stays in place until its completion is reaped in
        // `completions` or `Drop` waits for it.
        if unsafe { self.ring.submission().push(e) }.is_err() {
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(e) }
                .map_err(|_| io::Error::other("io_uring submission queue full after submit"))?;
        }
        self.inflight += 1;
        Ok(())
    }

    /// Queues `batch` on `sock`. One send per socket at a time.
    pub fn send(&mut self, sock: usize, batch: SendBatch) -> io::Result<()> {
        let total = batch.len();
        let s = self.socks.get_mut(sock).ok_or_else(|| io::Error::other(format!("no socket {sock}")))?;
        if s.send.is_some() {
            return Err(io::Error::other(format!("socket {sock} already has a send in flight")));
        }
        let iov = self.spare_iov.pop().unwrap_or_default();
        // SAFETY: msghdr is plain old data; all-zero is a valid empty message.
        let msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        s.send = Some(InflightSend { batch, iov, msg, sent: 0, total });
        self.submit_send(sock)
    }

    fn submit_send(&mut self, sock: usize) -> io::Result<()> {
        let Some(s) = self.socks.get_mut(sock) else { return Ok(()) };
        let fd = types::Fd(s.fd.as_raw_fd());
        let Some(st) = s.send.as_mut() else { return Ok(()) };
        st.batch.iovecs(st.sent, &mut st.iov);
        st.msg.msg_iov = st.iov.as_mut_ptr();
        st.msg.msg_iovlen = st.iov.len() as _;
        let e = opcode::SendMsg::new(fd, &*st.msg as *const libc::msghdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(KIND_SEND << 32 | sock as u64);
        self.push(&e)
    }

    /// Queues a receive on `sock` into the spare capacity of `buf` (which
    /// must have some).
    pub fn recv(&mut self, sock: usize, mut buf: Vec<u8>) -> io::Result<()> {
        let s = self.socks.get_mut(sock).ok_or_else(|| io::Error::other(format!("no socket {sock}")))?;
        if s.recv.is_some() {
            return Err(io::Error::other(format!("socket {sock} already has a receive in flight")));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(64 * 1024);
        }
        let spare = buf.spare_capacity_mut();
        let (ptr, len) = (spare.as_mut_ptr() as *mut u8, spare.len().min(u32::MAX as usize) as u32);
        let fd = types::Fd(s.fd.as_raw_fd());
        s.recv = Some((buf, None));
        let e = opcode::Recv::new(fd, ptr, len).build().user_data(KIND_RECV << 32 | sock as u64);
        self.push(&e).inspect_err(|_| {
            if let Some(s) = self.socks.get_mut(sock) {
                s.recv = None;
            }
        })
    }

    /// Queues a receive on `sock` straight into `buf[range]` (clamped to
    /// the buffer), e.g. the rest of a large read payload into the caller's
    /// buffer.
    pub fn recv_into(
        &mut self,
        sock: usize,
        mut buf: Vec<u8>,
        range: std::ops::Range<usize>,
    ) -> io::Result<()> {
        let s = self.socks.get_mut(sock).ok_or_else(|| io::Error::other(format!("no socket {sock}")))?;
        if s.recv.is_some() {
            return Err(io::Error::other(format!("socket {sock} already has a receive in flight")));
        }
        let end = range.end.min(buf.len());
        let start = range.start.min(end);
        if start == end {
            return Err(io::Error::other(format!(
                "empty receive range {range:?} in a buffer of {}",
                buf.len()
            )));
        }
        let target = &mut buf[start..end];
        let (ptr, len) = (target.as_mut_ptr(), target.len().min(u32::MAX as usize) as u32);
        let fd = types::Fd(s.fd.as_raw_fd());
        s.recv = Some((buf, Some(start..end)));
        // MSG_WAITALL: the range is exactly the rest of one payload, so the
        // kernel may retry until it is full: a large payload completes once
        // instead of once per segment the socket had (a caller that drives
        // this ring from another ring's loop wakes once per completion). A
        // short result (a signal, the peer gone) is still possible: the
        // caller receives the rest.
        let e = opcode::Recv::new(fd, ptr, len)
            .flags(libc::MSG_WAITALL)
            .build()
            .user_data(KIND_RECV << 32 | sock as u64);
        self.push(&e).inspect_err(|_| {
            if let Some(s) = self.socks.get_mut(sock) {
                s.recv = None;
            }
        })
    }

    /// Gives the ring an eventfd that other threads signal to end a wait:
    /// once armed ([`ClientRing::arm_wake`]), a signal completes as
    /// [`RingEvent::Woken`].
    pub fn set_wake(&mut self, fd: crate::eventfd::EventFd) {
        self.wake = Some(fd);
        self.wake_armed = false;
    }

    /// Polls the wake eventfd for readability, unless that poll is already
    /// in the ring (or there is no eventfd).
    pub fn arm_wake(&mut self) -> io::Result<()> {
        let Some(fd) = &self.wake else { return Ok(()) };
        if self.wake_armed {
            return Ok(());
        }
        let e = opcode::PollAdd::new(types::Fd(fd.as_fd().as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(KIND_WAKE << 32);
        // SAFETY: a poll refers to no memory, only to the eventfd, which
        // `self.wake` keeps open while the ring exists.
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&e) }
                .map_err(|_| io::Error::other("io_uring submission queue full after submit"))?;
        }
        self.wake_armed = true;
        Ok(())
    }

    /// Has the kernel signal `fd` (an eventfd) whenever this ring posts a
    /// completion (`IORING_REGISTER_EVENTFD`), so a thread that waits on
    /// another ring, polling `fd` there, learns that this one has work
    /// without a thread of its own waiting here.
    pub fn notify(&self, fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        self.ring.submitter().register_eventfd(fd.as_raw_fd())
    }

    /// Submits queued operations without waiting; no system call when
    /// nothing is queued.
    pub fn submit_queued(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.submit_and_wait(0)
    }

    /// Submits queued operations and waits for at least `want` completions.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves every finished operation to `out`.
    pub fn completions(&mut self, out: &mut Vec<RingEvent>) -> io::Result<()> {
        let mut resubmit = Vec::new();
        loop {
            let Some(cqe) = self.ring.completion().next() else { break };
            let ud = cqe.user_data();
            let (kind, sock) = (ud >> 32, (ud & 0xffff_ffff) as usize);
            let res = cqe.result();
            if kind == KIND_WAKE {
                self.wake_armed = false;
                out.push(RingEvent::Woken);
                if let Some(fd) = &self.wake {
                    fd.clear()?;
                }
                continue;
            }
            self.inflight = self.inflight.saturating_sub(1);
            let Some(s) = self.socks.get_mut(sock) else { continue };
            match kind {
                KIND_SEND => {
                    let Some(mut st) = s.send.take() else { continue };
                    if res > 0 && st.sent + (res as usize) < st.total {
                        st.sent += res as usize;
                        s.send = Some(st);
                        resubmit.push(sock);
                        continue;
                    }
                    let result = if res < 0 {
                        Err(io::Error::from_raw_os_error(-res))
                    } else if res == 0 && st.total > 0 {
                        Err(io::Error::new(io::ErrorKind::WriteZero, "send made no progress"))
                    } else {
                        Ok(st.total)
                    };
                    let InflightSend { batch, mut iov, .. } = st;
                    iov.clear();
                    self.spare_iov.push(iov);
                    out.push(RingEvent::Sent { sock, batch, result });
                }
                KIND_RECV => {
                    let Some((mut buf, range)) = s.recv.take() else { continue };
                    if let Some(range) = range {
                        let result = if res < 0 {
                            Err(io::Error::from_raw_os_error(-res))
                        } else {
                            Ok((res as usize).min(range.len()))
                        };
                        out.push(RingEvent::ReceivedInto { sock, buf, range, result });
                        continue;
                    }
                    let result = if res < 0 {
                        Err(io::Error::from_raw_os_error(-res))
                    } else {
                        let n = (res as usize).min(buf.capacity() - buf.len());
                        // SAFETY: the kernel wrote `n` bytes into the spare
                        // capacity that `recv` handed it, right after the
                        // initialized part.
                        unsafe { buf.set_len(buf.len() + n) };
                        Ok(n)
                    };
                    out.push(RingEvent::Received { sock, buf, result });
                }
                _ => {}
            }
        }
        for sock in resubmit {
            self.submit_send(sock)?;
        }
        Ok(())
    }

    /// Shuts both directions of `sock` down (pending operations complete).
    pub fn shutdown(&self, sock: usize) -> io::Result<()> {
        let s = self.socks.get(sock).ok_or_else(|| io::Error::other(format!("no socket {sock}")))?;
        // SAFETY: shutdown on a descriptor the ring owns; no memory involved.
        crate::cvt(unsafe { libc::shutdown(s.fd.as_raw_fd(), libc::SHUT_RDWR) }).map(drop)
    }
}

impl Drop for ClientRing {
    fn drop(&mut self) {
        if self.inflight == 0 {
            return;
        }
        // Make every pending operation finish, then reap them, so the kernel
        // never touches buffers after they are freed.
        for i in 0..self.socks.len() {
            // ENOTCONN on a socket the peer already closed is fine: its
            // operations are finishing anyway.
            let _ignored_enotconn = self.shutdown(i);
        }
        let mut out = Vec::new();
        for _ in 0..1000 {
            if self.inflight == 0 {
                return;
            }
            if self.submit_and_wait(1).is_err() || self.completions(&mut out).is_err() {
                break;
            }
            out.clear();
        }
        // The kernel may still own some buffers: leak them rather than free
        // memory it could write to.
        for s in self.socks.drain(..) {
            std::mem::forget(s);
        }
    }
}

/// User and system CPU time this process has used (`getrusage`), for
/// CPU-per-I/O figures.
pub fn process_cpu_time() -> io::Result<std::time::Duration> {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the duration of the call.
    crate::cvt(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) })?;
    let tv = |t: libc::timeval| std::time::Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    Ok(tv(ru.ru_utime) + tv(ru.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn sends_a_vectored_batch_and_receives() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut ring = ClientRing::new(8).unwrap();
        let s = ring.add_socket(a.into());
        let mut batch = SendBatch::default();
        batch.push_head(b"hel");
        batch.push_head(b"lo ");
        batch.push_buf(b"world".to_vec());
        batch.push_head(b"!");
        assert_eq!(batch.pieces.len(), 3);
        ring.send(s, batch).unwrap();
        ring.recv(s, Vec::with_capacity(16)).unwrap();
        let mut got = [0u8; 12];
        ring.submit_and_wait(1).unwrap();
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello world!");
        b.write_all(b"reply").unwrap();
        let mut events = Vec::new();
        while events.len() < 2 {
            ring.submit_and_wait(1).unwrap();
            ring.completions(&mut events).unwrap();
        }
        for e in events {
            match e {
                RingEvent::Sent { result, batch, .. } => {
                    assert_eq!(result.unwrap(), 12);
                    assert_eq!(batch.bufs[0], b"world");
                }
                RingEvent::Received { buf, result, .. } => {
                    assert_eq!(result.unwrap(), 5);
                    assert_eq!(buf, b"reply");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn receives_into_a_slice_of_an_owned_buffer() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut ring = ClientRing::new(8).unwrap();
        let s = ring.add_socket(a.into());
        ring.recv_into(s, vec![b'.'; 8], 2..6).unwrap();
        b.write_all(b"abcdef").unwrap();
        let mut events = Vec::new();
        while events.is_empty() {
            ring.submit_and_wait(1).unwrap();
            ring.completions(&mut events).unwrap();
        }
        match events.pop() {
            Some(RingEvent::ReceivedInto { buf, range, result, .. }) => {
                assert_eq!((result.unwrap(), range), (4, 2..6));
                assert_eq!(buf, b"..abcd..");
            }
            other => panic!("{other:?}"),
        }
        assert!(ring.recv_into(s, vec![0; 4], 4..9).is_err(), "empty after clamping");
    }

    #[test]
    fn a_receive_into_a_range_waits_for_all_of_it() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut ring = ClientRing::new(8).unwrap();
        let s = ring.add_socket(a.into());
        ring.recv_into(s, vec![0; 8], 0..8).unwrap();
        ring.submit_and_wait(0).unwrap();
        b.write_all(b"abcd").unwrap();
        let mut events = Vec::new();
        ring.completions(&mut events).unwrap();
        assert!(events.is_empty(), "completed with half the range: {events:?}");
        b.write_all(b"efgh").unwrap();
        while events.is_empty() {
            ring.submit_and_wait(1).unwrap();
            ring.completions(&mut events).unwrap();
        }
        match events.pop() {
            Some(RingEvent::ReceivedInto { buf, result, .. }) => {
                assert_eq!(result.unwrap(), 8);
                assert_eq!(buf, b"abcdefgh");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_completion_signals_the_registered_eventfd() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut ring = ClientRing::new(8).unwrap();
        let efd = crate::eventfd::EventFd::new().unwrap();
        ring.notify(efd.as_fd()).unwrap();
        let s = ring.add_socket(a.into());
        ring.recv(s, Vec::with_capacity(16)).unwrap();
        ring.submit_and_wait(0).unwrap();
        let quiet = crate::net::poll_readable(&[efd.as_fd()], Some(std::time::Duration::ZERO)).unwrap();
        assert_eq!(quiet, [false], "signalled before anything completed");
        b.write_all(b"ping").unwrap();
        // This thread waits on the eventfd only, never entering the ring:
        // the completion must be posted, and signalled, all the same.
        let ready =
            crate::net::poll_readable(&[efd.as_fd()], Some(std::time::Duration::from_secs(5))).unwrap();
        assert_eq!(ready, [true], "no signal within 5 s of the data arriving");
        let mut events = Vec::new();
        ring.completions(&mut events).unwrap();
        assert!(matches!(events.as_slice(), [RingEvent::Received { .. }]), "{events:?}");
    }

    #[test]
    fn dropping_with_a_pending_receive_reaps_it_and_closes_the_socket() {
        use std::os::unix::fs::MetadataExt;
        let (a, mut b) = UnixStream::pair().unwrap();
        // The socket's inode, through its fd (whose number a parallel test
        // may reuse once it is closed).
        let fd_path = format!("/proc/self/fd/{}", a.as_raw_fd());
        let ino = std::fs::metadata(&fd_path).unwrap().ino();
        let mut ring = ClientRing::new(8).unwrap();
        let s = ring.add_socket(a.into());
        ring.recv(s, Vec::with_capacity(16)).unwrap();
        ring.submit_and_wait(0).unwrap();
        drop(ring);
        // Drop shut the socket down (the peer sees the end of stream),
        // reaped the receive and closed the fd. Had it given up on the
        // receive, it would have leaked the socket, whose buffer the kernel
        // might still write, and the fd would still name the same socket.
        let mut one = [0u8; 1];
        assert_eq!(b.read(&mut one).unwrap(), 0, "the peer sees the end of stream");
        assert!(
            std::fs::metadata(&fd_path).map_or(true, |m| m.ino() != ino),
            "the socket was leaked, not closed"
        );
    }
}
