//! Page-aligned I/O buffers, and arenas of them registered with a ring.
//!
//! [`IoBuf`] is a growable byte buffer like `Vec<u8>`, but its memory is
//! always aligned to [`ALIGN`] (so `O_DIRECT` can use it) and always
//! initialised (allocations are zeroed, so any length up to the capacity may
//! be exposed without reading uninitialised memory).
//!
//! An [`Arena`] is one allocation cut into equal chunks. A ring registers
//! the arena once (`IORING_REGISTER_BUFFERS`): its pages are pinned a single
//! time, and reads and writes into its chunks become `READ_FIXED` /
//! `WRITE_FIXED`, which skip the per-operation page pinning. A chunk taken
//! from the arena is an [`IoBuf`] that goes back to the arena when dropped.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Alignment of every [`IoBuf`]: enough for `O_DIRECT` on any device whose
/// logical block size is at most a page.
pub const ALIGN: usize = 4096;

/// A page-aligned, always-initialised byte buffer.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    /// `Some` for a chunk of an arena, returned to it on drop.
    chunk: Option<(Arc<Arena>, u16)>,
}

// SAFETY: an IoBuf owns its memory exclusively (a heap allocation, or an
// arena chunk that the arena hands to one IoBuf at a time), like a Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only read the bytes, as with Vec<u8>.
unsafe impl Sync for IoBuf {}

impl Default for IoBuf {
    fn default() -> Self {
        IoBuf::new()
    }
}

impl IoBuf {
    /// An empty buffer that has not allocated.
    pub const fn new() -> Self {
        IoBuf { ptr: NonNull::dangling(), len: 0, cap: 0, chunk: None }
    }

    /// An empty buffer with room for `cap` bytes.
    pub fn with_capacity(cap: usize) -> Self {
        let mut b = IoBuf::new();
        b.reserve(cap);
        b
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = IoBuf::with_capacity(data.len());
        b.extend_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The registered-buffer index of this buffer in `arena`, if it is one
    /// of that arena's chunks.
    pub fn fixed_index(&self, arena: &Arc<Arena>) -> Option<u16> {
        match &self.chunk {
            Some((a, i)) if Arc::ptr_eq(a, arena) => Some(*i),
            _ => None,
        }
    }

    /// Whether this buffer is an arena chunk.
    pub fn is_chunk(&self) -> bool {
        self.chunk.is_some()
    }

    /// Makes room for `additional` more bytes (moving to a larger heap
    /// allocation if needed).
    pub fn reserve(&mut self, additional: usize) {
        let want = self.len.saturating_add(additional);
        if want <= self.cap {
            return;
        }
        let cap = want.max(self.cap.saturating_mul(2)).next_multiple_of(ALIGN);
        let Ok(layout) = Layout::from_size_align(cap, ALIGN) else {
            std::alloc::handle_alloc_error(Layout::new::<u8>())
        };
        // SAFETY: cap >= want > 0, so the layout is not zero-sized.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        // SAFETY: both ranges are valid for self.len bytes (self.len <= old
        // cap, <= new cap) and belong to different allocations.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), ptr.as_ptr(), self.len) };
        let old = std::mem::replace(self, IoBuf { ptr, len: self.len, cap, chunk: None });
        drop(old);
    }

    /// Sets the length to `len`, growing if needed. Bytes beyond the old
    /// length keep whatever the buffer held before (zero when fresh): fill
    /// them before sending them anywhere.
    pub fn set_len(&mut self, len: usize) {
        if len > self.cap {
            self.reserve(len - self.len);
        }
        self.len = len;
    }

    /// Sets the length to `len`, zero-filling any bytes added.
    pub fn resize_zeroed(&mut self, len: usize) {
        let old = self.len;
        self.set_len(len);
        if len > old {
            self[old..].fill(0);
        }
    }

    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.reserve(data.len());
        let at = self.len;
        self.len += data.len();
        self[at..].copy_from_slice(data);
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes (or dangling
        // with len 0), owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).field("cap", &self.cap).finish()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match self.chunk.take() {
            Some((arena, index)) => arena.put(index),
            None if self.cap > 0 => {
                // SAFETY: a heap IoBuf with cap > 0 was allocated by
                // reserve() with exactly this layout.
                unsafe { dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.cap, ALIGN)) }
            }
            None => {}
        }
    }
}

/// Page-aligned chunks in one allocation, in a few size classes, for
/// registration with a ring as fixed buffers (one per chunk).
pub struct Arena {
    mem: NonNull<u8>,
    layout: Layout,
    /// Ascending chunk sizes.
    classes: Vec<Class>,
    /// Free chunk indexes, per class.
    free: Mutex<Vec<Vec<u16>>>,
}

struct Class {
    chunk: usize,
    /// Index of the class's first chunk, and its byte offset in `mem`.
    first: u16,
    count: u16,
    at: usize,
}

// SAFETY: the arena's memory is only reached through IoBufs, each owning
// one chunk exclusively; the free lists are behind a mutex.
unsafe impl Send for Arena {}
// SAFETY: as above.
unsafe impl Sync for Arena {}

impl Arena {
    /// `count` chunks of `chunk` bytes (rounded up to [`ALIGN`]).
    pub fn new(chunk: usize, count: u16) -> std::io::Result<Arc<Arena>> {
        Arena::with_classes(&[(chunk, count)])
    }

    /// Chunks of several sizes: `(chunk bytes, count)` per class.
    pub fn with_classes(spec: &[(usize, u16)]) -> std::io::Result<Arc<Arena>> {
        let overflow = || std::io::Error::from_raw_os_error(libc::EOVERFLOW);
        let mut spec: Vec<(usize, u16)> =
            spec.iter().filter(|c| c.1 > 0).map(|&(c, n)| (c.max(1).next_multiple_of(ALIGN), n)).collect();
        spec.sort_unstable();
        let (mut classes, mut at, mut first) = (Vec::new(), 0usize, 0u16);
        for (chunk, count) in spec {
            classes.push(Class { chunk, first, count, at });
            at =
                chunk.checked_mul(usize::from(count)).and_then(|n| n.checked_add(at)).ok_or_else(overflow)?;
            first = first.checked_add(count).ok_or_else(overflow)?;
        }
        if at == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "an arena needs chunks"));
        }
        let layout = Layout::from_size_align(at, ALIGN).map_err(std::io::Error::other)?;
        // SAFETY: at > 0 (checked above).
        let mem = NonNull::new(unsafe { alloc_zeroed(layout) })
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        let free = classes.iter().map(|c| (c.first..c.first + c.count).rev().collect()).collect();
        Ok(Arc::new(Arena { mem, layout, classes, free: Mutex::new(free) }))
    }

    /// Bytes in all chunks.
    pub fn size(&self) -> usize {
        self.layout.size()
    }

    /// Number of chunks.
    pub fn count(&self) -> usize {
        self.classes.iter().map(|c| usize::from(c.count)).sum()
    }

    /// The largest chunk size.
    pub fn max_chunk(&self) -> usize {
        self.classes.last().map_or(0, |c| c.chunk)
    }

    /// Chunks not handed out.
    pub fn available(&self) -> usize {
        self.free.lock().map(|f| f.iter().map(Vec::len).sum()).unwrap_or(0)
    }

    /// An empty chunk with room for `len` bytes (the smallest free one that
    /// fits), or `None` when no free chunk is large enough.
    pub fn take(self: &Arc<Self>, len: usize) -> Option<IoBuf> {
        let mut free = self.free.lock().ok()?;
        for (class, list) in self.classes.iter().zip(free.iter_mut()) {
            if len > class.chunk {
                continue;
            }
            let Some(index) = list.pop() else { continue };
            let off = class.at + usize::from(index - class.first) * class.chunk;
            // SAFETY: index is one of the class's chunks, so the chunk lies
            // inside the allocation.
            let ptr = unsafe { self.mem.add(off) };
            return Some(IoBuf { ptr, len: 0, cap: class.chunk, chunk: Some((Arc::clone(self), index)) });
        }
        None
    }

    fn put(&self, index: u16) {
        let Ok(mut free) = self.free.lock() else { return };
        if let Some(ci) = self.classes.iter().position(|c| (c.first..c.first + c.count).contains(&index)) {
            free[ci].push(index);
        }
    }

    /// One iovec per chunk, in index order (for `IORING_REGISTER_BUFFERS`).
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        let mut v = Vec::with_capacity(self.count());
        for c in &self.classes {
            for i in 0..usize::from(c.count) {
                v.push(libc::iovec {
                    // SAFETY: the chunk lies inside the allocation.
                    iov_base: unsafe { self.mem.as_ptr().add(c.at + i * c.chunk) }.cast(),
                    iov_len: c.chunk,
                });
            }
        }
        v
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in with_classes() with this layout; every
        // chunk's IoBuf holds an Arc, so none is alive, and a ring that
        // registered the arena holds an Arc until after the ring is gone.
        unsafe { dealloc(self.mem.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_buf_grows_aligned_and_keeps_contents() {
        let mut b = IoBuf::new();
        assert!(b.is_empty());
        b.extend_from_slice(b"hello");
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        b.resize_zeroed(10_000);
        assert_eq!(&b[..5], b"hello");
        assert!(b[5..].iter().all(|&x| x == 0));
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        b.clear();
        b.set_len(3);
        assert_eq!(&b[..], b"hel", "set_len keeps earlier bytes");
    }

    #[test]
    fn arena_chunks_come_back_on_drop_and_overflow_to_the_heap() {
        let a = Arena::new(8192, 2).unwrap();
        let x = a.take(8192).unwrap();
        let mut y = a.take(100).unwrap();
        assert!(a.take(1).is_none(), "both chunks in use");
        assert!(a.take(8193).is_none() || a.available() == 0);
        assert_eq!(x.fixed_index(&a).map(|i| i < 2), Some(true));
        assert_ne!(x.fixed_index(&a), y.fixed_index(&a));
        y.extend_from_slice(&[7u8; 8192]);
        y.extend_from_slice(b"more");
        assert!(!y.is_chunk(), "growing past the chunk moves to the heap");
        assert_eq!(a.available(), 1, "and returns the chunk");
        assert_eq!(y.len(), 8196);
        assert!(y[..8192].iter().all(|&b| b == 7));
        drop(x);
        assert_eq!(a.available(), 2);
        let c = Arena::with_classes(&[(1 << 20, 1), (8192, 2)]).unwrap();
        assert_eq!((c.count(), c.max_chunk(), c.size()), (3, 1 << 20, (1 << 20) + 16384));
        let s1 = c.take(100).unwrap();
        let s2 = c.take(8192).unwrap();
        assert_eq!((s1.capacity(), s2.capacity()), (8192, 8192), "small requests take small chunks");
        let big = c.take(100).unwrap();
        assert_eq!(big.capacity(), 1 << 20, "then overflow to the larger class");
        assert!(c.take(1).is_none());
        let idx: Vec<u16> = [&s1, &s2, &big].iter().filter_map(|b| b.fixed_index(&c)).collect();
        assert_eq!(idx.len(), 3);
        assert_eq!(c.iovecs().len(), 3);
        drop((s1, s2, big));
        assert_eq!(c.available(), 3);
        let other = Arena::new(4096, 1).unwrap();
        let z = other.take(1).unwrap();
        assert_eq!(z.fixed_index(&a), None, "a chunk of another arena is not fixed here");
    }
}
