//! Sparse memory backend.
//!
//! The export is cut into [`PAGE`]-byte pages, allocated on the first write
//! of nonzero data. Unwritten, trimmed and zeroed pages hold no memory and
//! read as holes.
//!
//! Pages are found through a radix table (4096 entries per node, as many
//! levels as the export size needs: two for up to 512 GiB), so a lookup is
//! a few loads from dense arrays instead of a search. Each page slot has its
//! own lock, so requests from many connections do not contend. Every node
//! counts the pages allocated below it, so block status and trims skip
//! untouched regions: a 2^63-byte export costs nothing until written.
//!
//! A page is reference counted (zero-copy reads hand it to the kernel;
//! writers copy on write). The count lives in a small separate allocation,
//! not in the page, so a read touches one cache line of page metadata
//! rather than a cold line at the start of a 32 KiB page.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::{Backend, Caps, Error, ErrorKind, Extent, Holes, Op, Piece, Result, ZeroFlags, MAX_EXTENTS};

/// Allocation granularity (bytes).
pub const PAGE: u64 = 32 * 1024;
/// Most pages one block-status call inspects before answering.
const MAX_SCAN_PAGES: u64 = 1 << 16;
/// Entries per table node.
const FANOUT_BITS: u32 = 12;
const FANOUT: u64 = 1 << FANOUT_BITS;

/// A page; shared (reference counted) so zero-copy reads can hand it to the
/// kernel while writers copy on write.
pub type Page = Arc<PageBuf>;

/// A page's bytes. Dropped pages go to a small process-wide pool that new
/// pages and copy-on-write copies take from first: under a read/write mix
/// a write to a page that a reply still holds frees a page a moment later,
/// and recycling it keeps the allocator from fragmenting the heap with
/// 32 KiB holes (measured: RSS crept up round after round without it).
pub struct PageBuf(Box<[u8]>);

/// Most free pages kept for reuse (32 MiB).
const POOL_PAGES: usize = 1024;
static POOL: std::sync::Mutex<Vec<Box<[u8]>>> = std::sync::Mutex::new(Vec::new());

impl PageBuf {
    /// A page of [`PAGE`] bytes with unspecified contents (from the pool),
    /// or `None` when the pool is empty.
    fn recycled() -> Option<Box<[u8]>> {
        POOL.lock().ok()?.pop()
    }

    /// A zeroed page.
    fn zeroed() -> PageBuf {
        match PageBuf::recycled() {
            Some(mut b) => {
                b.fill(0);
                PageBuf(b)
            }
            None => PageBuf(vec![0u8; PAGE as usize].into_boxed_slice()),
        }
    }

    /// Pages currently pooled (for tests).
    pub fn pooled() -> usize {
        POOL.lock().map(|p| p.len()).unwrap_or(0)
    }
}

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageBuf({} bytes)", self.0.len())
    }
}

impl From<Vec<u8>> for PageBuf {
    fn from(v: Vec<u8>) -> Self {
        PageBuf(v.into_boxed_slice())
    }
}

impl Clone for PageBuf {
    fn clone(&self) -> Self {
        match PageBuf::recycled().filter(|b| b.len() == self.0.len()) {
            Some(mut b) => {
                b.copy_from_slice(&self.0);
                PageBuf(b)
            }
            None => PageBuf(self.0.clone()),
        }
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        if self.0.len() != PAGE as usize {
            return;
        }
        if let Ok(mut pool) = POOL.lock() {
            if pool.len() < POOL_PAGES {
                pool.push(std::mem::take(&mut self.0));
            }
        }
    }
}
type Slot = RwLock<Option<Page>>;

struct Node {
    /// Pages allocated below this node. Raised before a page is installed
    /// and lowered after one is removed, so it is never below the truth: a
    /// zero means the whole subtree reads as a hole.
    count: AtomicU64,
    kind: Kind,
}

enum Kind {
    Inner(Box<[OnceLock<Box<Node>>]>),
    Leaf(Box<[Slot]>),
}

impl Node {
    fn new(level: u32, entries: u64) -> Node {
        let kind = if level == 0 {
            Kind::Leaf((0..entries).map(|_| RwLock::new(None)).collect())
        } else {
            Kind::Inner((0..entries).map(|_| OnceLock::new()).collect())
        };
        Node { count: AtomicU64::new(0), kind }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }
}

fn read_slot(s: &Slot) -> RwLockReadGuard<'_, Option<Page>> {
    // A poisoned lock means a panic mid-copy into plain bytes; the slot
    // itself is still consistent, so keep serving.
    s.read().unwrap_or_else(|p| p.into_inner())
}

fn write_slot(s: &Slot) -> RwLockWriteGuard<'_, Option<Page>> {
    s.write().unwrap_or_else(|p| p.into_inner())
}

pub struct MemoryBackend {
    size: u64,
    root: Node,
    /// Levels below the root (0: the root is a leaf).
    height: u32,
}

/// Index of `page`'s entry in its node at `level`.
fn digit(page: u64, level: u32) -> usize {
    ((page >> (level * FANOUT_BITS)) & (FANOUT - 1)) as usize
}

impl MemoryBackend {
    pub fn new(size: u64) -> Self {
        let pages = size.div_ceil(PAGE).max(1);
        let mut height = 0;
        while pages > 1u64 << (FANOUT_BITS * (height + 1)).min(63) && height < 5 {
            height += 1;
        }
        let root_entries = (pages - 1) >> (FANOUT_BITS * height).min(63);
        MemoryBackend { size, root: Node::new(height, root_entries + 1), height }
    }

    /// Bytes of page memory currently allocated.
    pub fn allocated_bytes(&self) -> u64 {
        self.root.count() * PAGE
    }

    /// The root's entry index for `page` (the root may be partial).
    fn root_index(&self, page: u64) -> usize {
        (page >> (self.height * FANOUT_BITS).min(63)) as usize
    }

    /// The slot of `page`, if its leaf exists.
    fn slot(&self, page: u64) -> Option<&Slot> {
        let mut node = &self.root;
        let mut level = self.height;
        let mut index = self.root_index(page);
        loop {
            match &node.kind {
                Kind::Leaf(slots) => return slots.get(index),
                Kind::Inner(children) => {
                    node = children.get(index)?.get()?;
                    level -= 1;
                    index = digit(page, level);
                }
            }
        }
    }

    /// The slot of `page`, creating its leaf; the nodes on the way (root
    /// first) go to `path` so the caller can adjust their counts.
    fn slot_or_create<'a>(&'a self, page: u64, path: &mut Vec<&'a Node>) -> Option<&'a Slot> {
        path.clear();
        let mut node = &self.root;
        let mut level = self.height;
        let mut index = self.root_index(page);
        loop {
            path.push(node);
            match &node.kind {
                Kind::Leaf(slots) => return slots.get(index),
                Kind::Inner(children) => {
                    let child = children.get(index)?;
                    level -= 1;
                    node = child.get_or_init(|| Box::new(Node::new(level, FANOUT)));
                    index = digit(page, level);
                }
            }
        }
    }

    fn is_allocated(&self, page: u64) -> bool {
        self.slot(page).is_some_and(|s| read_slot(s).is_some())
    }

    /// First allocated page in `[from, to)`.
    fn next_allocated(&self, from: u64, to: u64) -> Option<u64> {
        let span = 1u64 << (self.height * FANOUT_BITS).min(63);
        Self::search(&self.root, 0, span, from, to)
    }

    /// [`Self::next_allocated`] within `node`, whose entries each cover
    /// `span` pages starting at `base`.
    fn search(node: &Node, base: u64, span: u64, from: u64, to: u64) -> Option<u64> {
        if node.count() == 0 {
            return None;
        }
        let first = from.saturating_sub(base) / span;
        match &node.kind {
            Kind::Leaf(slots) => (first..slots.len() as u64)
                .map(|i| base + i)
                .take_while(|&p| p < to)
                .find(|&p| slots.get((p - base) as usize).is_some_and(|s| read_slot(s).is_some())),
            Kind::Inner(children) => {
                for i in first..children.len() as u64 {
                    let child_base = base + i * span;
                    if child_base >= to {
                        break;
                    }
                    let Some(child) = children.get(i as usize).and_then(OnceLock::get) else { continue };
                    let child_span = span >> FANOUT_BITS;
                    if let Some(p) = Self::search(child, child_base, child_span, from, to) {
                        return Some(p);
                    }
                }
                None
            }
        }
    }

    /// Calls `f(page, offset_in_page, range_in_buffer)` for each page piece
    /// of `[offset, offset+len)`.
    fn for_each_piece(offset: u64, len: usize, mut f: impl FnMut(u64, usize, std::ops::Range<usize>)) {
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(len - done);
            f(page, in_page, done..done + n);
            done += n;
        }
    }

    /// Zeroes `[offset, offset+len)`: whole pages are freed, partial pages
    /// that exist are zeroed in place.
    fn zero_range(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = offset + len;
        let first_full = offset.div_ceil(PAGE);
        let end_full = end / PAGE;
        let zero_partial = |from: u64, to: u64| {
            if from >= to {
                return;
            }
            let page = from / PAGE;
            if let Some(slot) = self.slot(page) {
                if let Some(p) = write_slot(slot).as_mut() {
                    let a = (from % PAGE) as usize;
                    Arc::make_mut(p)[a..a + (to - from) as usize].fill(0);
                }
            }
        };
        if first_full >= end_full {
            // Within one page, or straddling one boundary without a whole page.
            let boundary = (offset / PAGE + 1) * PAGE;
            zero_partial(offset, end.min(boundary));
            zero_partial(boundary.max(offset), end);
            return;
        }
        zero_partial(offset, first_full * PAGE);
        zero_partial(end_full * PAGE, end);
        let span = 1u64 << (self.height * FANOUT_BITS).min(63);
        Self::free(&self.root, 0, span, first_full, end_full);
    }

    /// Frees the pages of `[from, to)` below `node`; returns how many.
    fn free(node: &Node, base: u64, span: u64, from: u64, to: u64) -> u64 {
        if node.count() == 0 {
            return 0;
        }
        let first = from.saturating_sub(base) / span;
        let mut freed = 0;
        match &node.kind {
            Kind::Leaf(slots) => {
                for (i, slot) in slots.iter().enumerate().skip(first as usize) {
                    let p = base + i as u64;
                    if p >= to {
                        break;
                    }
                    if write_slot(slot).take().is_some() {
                        freed += 1;
                    }
                }
            }
            Kind::Inner(children) => {
                for i in first..children.len() as u64 {
                    let child_base = base + i * span;
                    if child_base >= to {
                        break;
                    }
                    if let Some(child) = children.get(i as usize).and_then(OnceLock::get) {
                        freed += Self::free(child, child_base, span >> FANOUT_BITS, from, to);
                    }
                }
            }
        }
        node.count.fetch_sub(freed, Ordering::AcqRel);
        freed
    }
}

fn new_page(offset: u64, len: u64) -> Result<Page> {
    // Probe for the memory first so an exhausted machine gives the client
    // ENOSPC instead of aborting the server.
    let mut probe: Vec<u8> = Vec::new();
    probe.try_reserve_exact(PAGE as usize).map_err(|_| {
        Error::other(ErrorKind::NoSpace, Op::Write, offset, len, "out of memory for export pages")
    })?;
    drop(probe);
    Ok(Arc::new(PageBuf::zeroed()))
}

impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: false,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            extents: true,
        }
    }

    fn describe(&self) -> String {
        format!("memory, {} bytes", self.size)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Holes> {
        let mut holes = Holes::default();
        let len = buf.len();
        Self::for_each_piece(offset, len, |page, in_page, range| {
            let slot = self.slot(page).map(read_slot);
            match slot.as_deref() {
                Some(Some(p)) => buf[range.clone()].copy_from_slice(&p[in_page..in_page + range.len()]),
                _ => {
                    buf[range.clone()].fill(0);
                    holes.push(range);
                }
            }
        });
        Ok(holes)
    }

    fn read_shared(&self, offset: u64, len: usize, out: &mut Vec<Piece>) -> Result<bool> {
        Self::for_each_piece(offset, len, |page, in_page, range| {
            let slot = self.slot(page).map(read_slot);
            match slot.as_deref() {
                Some(Some(p)) => {
                    out.push(Piece::Shared { page: p.clone(), start: in_page, len: range.len() })
                }
                _ => match out.last_mut() {
                    Some(Piece::Zero(n)) => *n += range.len(),
                    _ => out.push(Piece::Zero(range.len())),
                },
            }
        });
        Ok(true)
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<()> {
        let mut result = Ok(());
        let mut path = Vec::with_capacity(6);
        Self::for_each_piece(offset, data.len(), |page, in_page, range| {
            if result.is_err() {
                return;
            }
            let src = &data[range];
            let Some(slot) = self.slot_or_create(page, &mut path) else {
                let msg = "write beyond the export's page table";
                result = Err(Error::other(ErrorKind::Invalid, Op::Write, offset, data.len() as u64, msg));
                return;
            };
            let mut slot = write_slot(slot);
            match slot.as_mut() {
                // Copy on write when a zero-copy read still holds the page.
                Some(p) => Arc::make_mut(p)[in_page..in_page + src.len()].copy_from_slice(src),
                // Zeroes into an unallocated page change nothing.
                None if src.iter().all(|&b| b == 0) => {}
                None => match new_page(offset, data.len() as u64) {
                    Ok(mut p) => {
                        Arc::make_mut(&mut p)[in_page..in_page + src.len()].copy_from_slice(src);
                        path.iter().for_each(|n| _ = n.count.fetch_add(1, Ordering::AcqRel));
                        *slot = Some(p);
                    }
                    Err(e) => result = Err(e),
                },
            }
        });
        result
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<()> {
        self.zero_range(offset, len);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        // Freeing pages is how memory zeroes fast; NO_HOLE only promises that
        // later writes will not fail for lack of space, which RAM cannot
        // promise either way, so it is treated the same.
        let _ = flags;
        self.zero_range(offset, len);
        Ok(())
    }

    fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len.max(1)).min(self.size);
        if offset >= end {
            return Ok(vec![Extent { len: len.max(1), hole: true, zero: true }]);
        }
        let last_page = (end - 1) / PAGE + 1;
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, from: u64, to: u64, hole: bool| {
            let (from, to) = (from.max(offset), to.min(end));
            if from >= to {
                return;
            }
            match out.last_mut() {
                Some(l) if l.hole == hole => l.len += to - from,
                _ => out.push(Extent { len: to - from, hole, zero: hole }),
            }
        };
        let mut page = offset / PAGE;
        let mut scanned = 0u64;
        while page < last_page && scanned < MAX_SCAN_PAGES {
            if self.is_allocated(page) {
                let start = page;
                while page < last_page && scanned < MAX_SCAN_PAGES && self.is_allocated(page) {
                    page += 1;
                    scanned += 1;
                }
                push(&mut out, start * PAGE, page * PAGE, false);
            } else {
                let next = self.next_allocated(page, last_page).unwrap_or(last_page);
                push(&mut out, page * PAGE, next * PAGE, true);
                page = next;
                scanned += 1;
            }
            if out.len() >= MAX_EXTENTS {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(m: &MemoryBackend, offset: u64, len: usize) -> (Vec<u8>, Holes) {
        let mut b = vec![0xaa; len];
        let h = m.read(offset, &mut b).unwrap();
        (b, h)
    }

    #[test]
    fn unwritten_reads_zero_as_holes_and_allocates_nothing() {
        let m = MemoryBackend::new(1 << 40);
        let (b, h) = read(&m, 12345, 100_000);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(h.0, vec![0..100_000]);
        assert_eq!(m.allocated_bytes(), 0);
    }

    #[test]
    fn writes_round_trip_across_page_boundaries() {
        let m = MemoryBackend::new(1 << 20);
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8 + 1).collect();
        m.write(PAGE - 100, &data, false).unwrap();
        let (b, h) = read(&m, PAGE - 100, data.len());
        assert_eq!(b, data);
        assert!(h.0.is_empty());
        let (b, h) = read(&m, PAGE - 200, 200);
        assert_eq!(&b[..100], &[0u8; 100][..]);
        assert_eq!(&b[100..], &data[..100]);
        assert!(h.0.is_empty(), "page 0 is allocated: its zeroes are data");
        assert_eq!(m.allocated_bytes(), 4 * PAGE);
    }

    #[test]
    fn zero_writes_to_unallocated_pages_stay_sparse() {
        let m = MemoryBackend::new(1 << 20);
        m.write(0, &vec![0u8; 3 * PAGE as usize], false).unwrap();
        assert_eq!(m.allocated_bytes(), 0);
    }

    #[test]
    fn trim_frees_whole_pages_and_zeroes_partial_ones() {
        let m = MemoryBackend::new(1 << 20);
        m.write(0, &vec![9u8; 4 * PAGE as usize], false).unwrap();
        m.trim(PAGE / 2, 2 * PAGE, false).unwrap();
        assert_eq!(m.allocated_bytes(), 3 * PAGE, "page 1 freed; pages 0 and 2 partial");
        let (b, _) = read(&m, 0, 4 * PAGE as usize);
        let half = (PAGE / 2) as usize;
        assert!(b[..half].iter().all(|&x| x == 9));
        assert!(b[half..half + 2 * PAGE as usize].iter().all(|&x| x == 0));
        assert!(b[half + 2 * PAGE as usize..].iter().all(|&x| x == 9));
    }

    #[test]
    fn zeroing_inside_one_page_and_across_a_boundary() {
        let m = MemoryBackend::new(1 << 20);
        m.write(0, &vec![5u8; 2 * PAGE as usize], false).unwrap();
        m.write_zeroes(10, 20, ZeroFlags::default()).unwrap();
        m.write_zeroes(PAGE - 5, 10, ZeroFlags::default()).unwrap();
        let (b, _) = read(&m, 0, 2 * PAGE as usize);
        for (i, &x) in b.iter().enumerate() {
            let zero = (10..30).contains(&i) || (PAGE as usize - 5..PAGE as usize + 5).contains(&i);
            assert_eq!(x == 0, zero, "byte {i}");
        }
    }

    #[test]
    fn extents_report_data_and_holes_exactly() {
        let m = MemoryBackend::new(100 * PAGE);
        m.write(2 * PAGE, &vec![1u8; 3 * PAGE as usize], false).unwrap();
        m.write(50 * PAGE, &[1u8], false).unwrap();
        let e = m.extents(PAGE, 60 * PAGE).unwrap();
        assert_eq!(
            e,
            vec![
                Extent { len: PAGE, hole: true, zero: true },
                Extent { len: 3 * PAGE, hole: false, zero: false },
                Extent { len: 45 * PAGE, hole: true, zero: true },
                Extent { len: PAGE, hole: false, zero: false },
                Extent { len: 10 * PAGE, hole: true, zero: true },
            ]
        );
    }

    #[test]
    fn extents_of_a_huge_sparse_export_are_instant() {
        let m = MemoryBackend::new(i64::MAX as u64);
        m.write(1 << 50, &[1u8], false).unwrap();
        let e = m.extents(0, i64::MAX as u64).unwrap();
        assert_eq!(e[0], Extent { len: 1 << 50, hole: true, zero: true });
        assert_eq!(e[1], Extent { len: PAGE, hole: false, zero: false });
        m.trim(0, i64::MAX as u64 - 7, false).unwrap();
        assert_eq!(m.allocated_bytes(), 0);
    }

    #[test]
    fn freed_and_copied_pages_are_recycled_zeroed() {
        let m = MemoryBackend::new(8 * PAGE);
        m.write(0, &vec![7u8; 4 * PAGE as usize], false).unwrap();
        let mut pieces = Vec::new();
        m.read_shared(0, PAGE as usize, &mut pieces).unwrap();
        // Copy on write while a reply holds page 0, then free pages 1..4.
        m.write(0, &[1], false).unwrap();
        m.trim(PAGE, 3 * PAGE, false).unwrap();
        // Dropping the reply's piece sends the old page 0 to the pool too.
        drop(pieces);
        // New pages come from the pool and read as zeroes where unwritten.
        m.write(5 * PAGE + 10, &[9], false).unwrap();
        let (b, _) = read(&m, 5 * PAGE, PAGE as usize);
        assert!(b.iter().enumerate().all(|(i, &x)| x == if i == 10 { 9 } else { 0 }));
        let (b, _) = read(&m, 0, 2);
        assert_eq!(b, [1, 7]);
    }

    #[test]
    fn table_levels_and_leaf_boundaries() {
        // 4097 pages plus a byte: a root of 2 entries over full leaves.
        let size = (FANOUT + 1) * PAGE + 1;
        let m = MemoryBackend::new(size);
        assert_eq!(m.height, 1);
        let last = size - 1;
        m.write(last, &[3], false).unwrap();
        m.write(FANOUT * PAGE - 2, &[4, 4, 4, 4], false).unwrap(); // across two leaves
        assert_eq!(m.allocated_bytes(), 3 * PAGE);
        assert_eq!(read(&m, last, 1).0, [3]);
        assert_eq!(read(&m, FANOUT * PAGE - 2, 4).0, [4, 4, 4, 4]);
        assert_eq!(m.next_allocated(0, FANOUT + 2), Some(FANOUT - 1));
        assert_eq!(m.next_allocated(FANOUT + 1, FANOUT + 2), Some(FANOUT + 1));
        let e = m.extents(0, size).unwrap();
        let kinds: Vec<(u64, bool)> = e.iter().map(|x| (x.len, x.hole)).collect();
        assert_eq!(kinds, [((FANOUT - 1) * PAGE, true), (2 * PAGE + 1, false)]);
        m.trim(FANOUT * PAGE, PAGE, false).unwrap();
        assert_eq!(m.allocated_bytes(), 2 * PAGE);
        assert!(m.is_allocated(FANOUT - 1) && !m.is_allocated(FANOUT));
        // A write of zeroes over a trimmed page keeps it sparse.
        m.write(FANOUT * PAGE, &[0; 10], false).unwrap();
        assert_eq!(m.allocated_bytes(), 2 * PAGE);
        // Tiny and empty exports work too.
        let t = MemoryBackend::new(0);
        assert_eq!(t.extents(0, 1).unwrap().len(), 1);
        let t = MemoryBackend::new(512);
        t.write(0, &[1; 512], false).unwrap();
        assert_eq!(read(&t, 0, 512).0, vec![1; 512]);
    }

    #[test]
    fn shared_reads_see_the_data_of_their_moment_and_writers_copy_on_write() {
        let m = MemoryBackend::new(4 * PAGE);
        m.write(100, b"old", false).unwrap();
        let mut pieces = Vec::new();
        assert!(m.read_shared(100, 3 + PAGE as usize, &mut pieces).unwrap());
        // A write after the read must not change what the read handed out.
        m.write(100, b"new", false).unwrap();
        match &pieces[0] {
            Piece::Shared { page, start, len } => {
                assert_eq!(&page[*start..*start + 3], b"old");
                assert_eq!(*len, PAGE as usize - 100);
            }
            other => panic!("expected shared data, got {other:?}"),
        }
        assert!(matches!(pieces[1], Piece::Zero(n) if n == 103), "{pieces:?}");
        let (b, _) = read(&m, 100, 3);
        assert_eq!(&b, b"new");
    }

    #[test]
    fn parallel_writers_on_distinct_ranges_do_not_interfere() {
        let m = std::sync::Arc::new(MemoryBackend::new(64 * PAGE));
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..64u64 {
                        let off = (i * 8 + t as u64) * 4096;
                        m.write(off, &[t + 1; 4096], false).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for i in 0..512u64 {
            let (b, _) = read(&m, i * 4096, 4096);
            assert!(b.iter().all(|&x| x == (i % 8) as u8 + 1), "block {i}");
        }
    }
}
