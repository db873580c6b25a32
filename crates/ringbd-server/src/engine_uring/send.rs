//! The send path: a connection's queued replies leave in one `sendmsg`
//! (zero-copy for large read payloads over TCP), one send in flight per
//! connection; short sends continue where they stopped.

use std::io::{self, IoSlice};

use ringbd_io::uring::{is_unsupported, Ring, SendSource};

use super::{Conn, State};
use crate::out::OutBuf;

// SAFETY: an OutBuf's iovecs point into heap memory that moving it does
// not move: its byte Vec's buffer, its payload IoBufs' buffers, pages of a
// memory export it holds an Arc to (written only through Arc::make_mut,
// which copies a page another reference shares), and the static zero
// page. Nothing writes them while the ring owns the queue: the connection
// swaps in a new queue when it hands one to a send (`take_out`).
unsafe impl SendSource for OutBuf {
    fn len(&self) -> usize {
        OutBuf::len(self)
    }

    fn iovecs<'a>(&'a self, skip: usize, out: &mut Vec<IoSlice<'a>>) {
        OutBuf::iovecs(self, skip, out)
    }
}

/// Zero-copy sends the kernel copied in a row before a connection stops
/// asking for zero-copy (it only costs a notification and a pinned buffer).
const ZC_COPIED_LIMIT: u8 = 4;

impl State {
    pub(super) fn sent(
        &mut self,
        ring: &mut Ring<OutBuf>,
        id: u32,
        result: io::Result<usize>,
        source: OutBuf,
        skip: usize,
    ) {
        let Some(Some(c)) = self.conns.get_mut(id as usize) else { return };
        c.send_inflight = false;
        c.dirty = true;
        if matches!(result, Ok(n) if n > 0) {
            // The socket took bytes: the client is reading.
            c.stalled_since = None;
        }
        match result {
            Ok(n) if skip + n < source.len() && n > 0 => {
                // Short send (a full socket, or more than IOV_MAX pieces):
                // the rest goes first, before anything newer.
                let zc = c.zc_ok && self.zerocopy.is_some_and(|t| source.largest_payload() >= t);
                c.sending = source.len() - skip - n;
                match ring.send(c.sock, id, source, skip + n, false, zc) {
                    Ok(()) => c.send_inflight = true,
                    Err(e) => c.end(format_args!("send: {e}")),
                }
            }
            Ok(0) if !source.is_empty() => c.end(format_args!("send: the socket took no bytes")),
            Ok(_) => {
                self.local.replies += u64::from(source.replies());
                c.conn.recycle(source);
            }
            Err(e) if is_unsupported(&e) && c.zc_ok => {
                // This socket cannot do zero-copy: send normally from now on.
                c.zc_ok = false;
                c.sending = source.len() - skip;
                match ring.send(c.sock, id, source, skip, false, false) {
                    Ok(()) => c.send_inflight = true,
                    Err(e) => c.end(format_args!("send: {e}")),
                }
            }
            Err(e) => c.end(format_args!("send of {} bytes: {e}", source.len() - skip)),
        }
    }
}

impl Conn {
    /// Learns from a zero-copy notification whether zero-copy pays here.
    pub(super) fn note_zerocopy(&mut self, copied: Option<bool>) {
        match copied {
            Some(true) => {
                self.zc_copied_streak += 1;
                if self.zc_copied_streak >= ZC_COPIED_LIMIT && self.zc_ok {
                    self.zc_ok = false;
                    tracing::debug!(
                        "the kernel copied {ZC_COPIED_LIMIT} zero-copy sends in a row (a local peer?); \
                         plain sends from now on for this connection"
                    );
                }
            }
            Some(false) => self.zc_copied_streak = 0,
            None => {}
        }
    }
}
