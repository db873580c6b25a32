//! The provided-buffer ring (`IORING_REGISTER_PBUF_RING`) that multishot
//! receives select their buffers from: its memory, our view of which
//! buffer sits in each slot (to follow bundles and incremental
//! consumption), and the [`BufPiece`] tokens that hand received bytes out
//! and take buffers back exactly once.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{types, IoUring};

use super::{Ring, SendSource, BGID};

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

impl<S: SendSource> Ring<S> {
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
}

/// A provided-buffer ring (`IORING_REGISTER_PBUF_RING`) and its buffers.
pub(super) struct BufRing {
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
    pub(super) spent: u64,
    /// Tells this ring's pieces from another's ([`BufPiece`]).
    id: u32,
}

/// Source of [`BufRing::id`]s.
static NEXT_BUF_RING: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// `IOU_PBUF_RING_INC`.
const PBUF_RING_INC: u16 = 2;

impl BufRing {
    pub(super) fn new(ring: &IoUring, entries: u16, buf_size: u32, inc: bool) -> io::Result<Self> {
        BufRing::with_group(ring, entries, buf_size, inc, BGID)
    }

    pub(super) fn with_group(
        ring: &IoUring,
        entries: u16,
        buf_size: u32,
        inc: bool,
        bgid: u16,
    ) -> io::Result<Self> {
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
    pub(super) fn take(&mut self, bid: u16, len: usize, out: &mut Vec<BufPiece>) -> bool {
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
    pub(super) fn idle(&self) -> bool {
        self.pieces.iter().all(|&p| p == 0)
    }

    pub(super) fn leak(&mut self) {
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
