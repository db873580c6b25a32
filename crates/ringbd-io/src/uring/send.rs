//! Sends: one `sendmsg` (or `SENDMSG_ZC`) of a [`SendSource`]'s iovecs,
//! the ring's ownership of the source and the message until the kernel is
//! done with them, and the zero-copy bookkeeping (a send's result is held
//! until its notification, which says whether the kernel copied anyway).

use std::io::{self, IoSlice};

use io_uring::{cqueue, opcode, types};

use super::{user_data, Completion, Ring, Sock, KIND_SEND};

/// Most iovecs one `sendmsg` takes (`UIO_MAXIOV`; SEND_ZC has the same
/// limit).
pub const IOV_MAX: usize = 1024;

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

/// `IORING_SEND_ZC_REPORT_USAGE`: the notification says whether the
/// kernel copied the data anyway.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`, in a zero-copy notification's result.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

pub(super) struct InflightSend<S> {
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

impl<S: SendSource> Ring<S> {
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

    /// A send's completion or, for a zero-copy send, its notification;
    /// `None` while a zero-copy send's pages are still the kernel's.
    pub(super) fn send_done(
        &mut self,
        slot: u32,
        id: u32,
        res: i32,
        flags: u32,
        more: bool,
    ) -> Option<Completion<S>> {
        let err = |res: i32| io::Error::from_raw_os_error(-res);
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
        Some(Completion::Send { conn: s.conn, result, source: s.source, skip: s.skip, copied: s.copied })
    }
}
