//! Writes to the top image of a chain (the backing files stay read-only).
//!
//! - An overwrite of clusters the image owns (data clusters with
//!   `QCOW_OFLAG_COPIED`: refcount 1) changes no metadata: it is a `pwrite`
//!   under the metadata read lock, beside reads and other overwrites.
//! - Anything else takes the write lock: new clusters (contiguous for a run
//!   of clusters, one `pwrite` for the run, partial clusters completed from
//!   what the guest read there before: the backing file, a compressed or
//!   shared cluster, zeroes), new L2 tables, zero clusters, discards.
//!   On a ring (`ring.rs`, `,direct`) a write whose clusters all need new
//!   ones reserves them under the lock, writes outside it, and commits its
//!   L2 entries after ([`Image::reserve`], [`Image::commit`]).
//!
//! Metadata changes stay in memory until a flush, which orders them so that
//! the file is consistent at every point a process can die:
//!
//! 1. changed refcount blocks (and a grown refcount table) are written, and
//!    the file is synced: the data written since the last flush and the
//!    refcounts of every cluster that a table will reference are durable;
//! 2. a grown refcount table is named in the header, synced;
//! 3. changed L2 tables, then the L1 table, are written, synced;
//! 4. the clusters those tables no longer reference lose their references
//!    (a crash before these reach the file leaks them, never more), once
//!    no data operation mapped on a ring before the free is in flight
//!    (`ring.rs`; until then a later flush does it).
//!
//! A cluster freed in memory is not reused before step 4, so a table on
//! disk never points at a cluster that holds another offset's data.
//! Changed tables are never evicted from the cache; when too many wait, a
//! write flushes (the cache stays bounded without a client's flush).

use std::io;
use std::sync::Arc;

use super::image::{corrupt, Image, Meta};
use super::refcount::Refcounts;
use super::table::{self, Cluster, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::Holes;
use ringbd_io::buf::IoBuf;

/// New clusters an allocating write holds while its data is written
/// ([`Image::reserve`]): `entries.len()` clusters from `host`, for the
/// guest clusters from `base`, whose entries were `entries`.
pub(super) struct Reserved {
    pub base: u64,
    pub host: u64,
    pub entries: Vec<u64>,
}

/// Pending frees after which a write flushes by itself.
const MAX_PENDING_FREE: usize = 1 << 16;

/// What zeroing or discarding leaves in the whole clusters of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clear {
    /// A discard: the clusters are freed (reads are unspecified after it;
    /// they read zeroes, or the backing file's data on a version 2 image).
    Trim,
    /// Write zeroes; `keep`: clusters the image owns stay allocated.
    Zero { keep: bool },
}

impl Image {
    /// Loads the refcounts, so that this image can be written, and clears
    /// the autoclear features (bitmaps ringbd does not update).
    pub fn enable_writes(&mut self) -> io::Result<()> {
        let l1_entries = self.full_l1()?;
        let m = self.meta.get_mut().unwrap_or_else(|p| p.into_inner());
        let mut rc = Refcounts::load(&self.path, &self.header, &*self.src, m.file_len)?;
        // The L1 table and the L2 tables it names (all of its entries).
        let cb = self.header.cluster_bits;
        let l1 = self.header.l1_table_offset;
        rc.metadata.extend((l1 >> cb)..(l1 + u64::from(self.header.l1_size) * 8).div_ceil(1 << cb));
        rc.metadata.extend(l1_entries.iter().map(|e| (e & OFFSET_MASK) >> cb).filter(|&c| c != 0));
        m.rc = Some(rc);
        if self.header.version >= 3 && self.header.autoclear_features != 0 {
            self.src.write_at(88, &0u64.to_be_bytes())?;
            self.src.sync()?;
        }
        Ok(())
    }

    fn rc<'a>(&self, m: &'a mut Meta) -> io::Result<&'a mut Refcounts> {
        m.rc.as_mut().ok_or_else(|| io::Error::from(io::ErrorKind::ReadOnlyFilesystem))
    }

    /// Allocates `n` contiguous clusters.
    fn alloc(&self, m: &mut Meta, n: u64) -> io::Result<u64> {
        let cb = self.header.cluster_bits;
        let rc = self.rc(m)?;
        let host = rc.alloc(&*self.src, n)?;
        let end = rc.end << cb;
        m.file_len = m.file_len.max(end);
        Ok(host)
    }

    /// The host cluster of a raw L2 entry the image owns alone (data or a
    /// zero cluster that kept its cluster, with refcount 1).
    fn owned(&self, m: &Meta, raw: u64) -> Option<u64> {
        if raw & COPIED == 0 || raw & COMPRESSED != 0 {
            return None;
        }
        match table::l2_entry(raw, self.header.cluster_bits) {
            Ok(Cluster::Data { host } | Cluster::Zero { host: Some(host) }) if host < m.file_len => {
                Some(host)
            }
            _ => None,
        }
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        {
            let m = self.meta();
            if let Some(runs) = self.overwrite_runs(&m, offset, data.len() as u64)? {
                for (host, at, len) in runs {
                    self.data_write(host, &data[at..at + len])?;
                }
                return Ok(());
            }
        }
        let mut m = self.meta_mut();
        self.write_in(&mut m, offset, data)?;
        self.settle(&mut m)
    }

    /// Where to write `[offset, offset+len)` when every cluster of it is
    /// owned data: (host offset, offset in the data, length), contiguous
    /// pieces merged. `None` when a cluster needs a metadata change.
    pub(super) fn overwrite_runs(
        &self,
        m: &Meta,
        offset: u64,
        len: u64,
    ) -> io::Result<Option<Vec<(u64, usize, usize)>>> {
        let cs = self.cluster_size();
        let mut runs: Vec<(u64, usize, usize)> = Vec::new();
        let mut pos = 0u64;
        while pos < len {
            let voff = offset + pos;
            let n = (cs - (voff & (cs - 1))).min(len - pos);
            let Some((_, _, raw)) = self.entry(m, voff)? else { return Ok(None) };
            let Some(host) = self.owned(m, raw).filter(|_| raw & ZERO == 0) else { return Ok(None) };
            let h = host + (voff & (cs - 1));
            match runs.last_mut() {
                Some(r) if r.0 + r.2 as u64 == h => r.2 += n as usize,
                _ => runs.push((h, pos as usize, n as usize)),
            }
            pos += n;
        }
        Ok(Some(runs))
    }

    /// The L2 table, index and raw entry of `voff`'s cluster, adding an
    /// (empty) L2 table if its L1 entry has none.
    fn slot(&self, m: &mut Meta, voff: u64) -> io::Result<(u64, usize, u64)> {
        let cb = self.header.cluster_bits;
        let l1_index = (voff >> (2 * cb - 3)) as usize;
        if let Some(e) = self.entry(m, voff)? {
            if m.l1[l1_index] & COPIED == 0 {
                return Err(corrupt(
                    &self.path,
                    format!("L1 index {l1_index}: the L2 table is shared (an internal snapshot?); ringbd does not write it"),
                ));
            }
            return Ok(e);
        }
        let off = self.alloc(m, 1)?;
        self.rc(m)?.metadata.insert(off >> cb);
        let t = Arc::new(vec![0u64; self.header.l2_entries() as usize]);
        let mut c = m.l2.lock().unwrap_or_else(|p| p.into_inner());
        c.dirty.insert(off);
        c.insert(off, t);
        drop(c);
        m.l1[l1_index] = off | COPIED;
        m.l1_dirty = true;
        let l2_index = ((voff >> cb) & (self.header.l2_entries() - 1)) as usize;
        Ok((off, l2_index, 0))
    }

    /// Sets an L2 entry (in memory; written at the next flush).
    fn set_entry(&self, m: &Meta, l2: u64, index: usize, value: u64) -> io::Result<()> {
        let t = self.l2_table(m, l2)?;
        let mut c = m.l2.lock().unwrap_or_else(|p| p.into_inner());
        c.dirty.insert(l2);
        if !c.tables.contains_key(&l2) {
            c.insert(l2, t);
        }
        if let Some(t) = c.tables.get_mut(&l2) {
            Arc::make_mut(t)[index] = value;
        }
        Ok(())
    }

    /// Queues the host clusters an L2 entry held for freeing at the next flush.
    fn release(&self, m: &mut Meta, raw: u64) {
        let cb = self.header.cluster_bits;
        match table::l2_entry(raw, cb) {
            Ok(Cluster::Data { host } | Cluster::Zero { host: Some(host) }) => {
                m.pending_free.push(host >> cb)
            }
            Ok(Cluster::Compressed { host, len }) => {
                // Every cluster the compressed bytes touch counts it once.
                let first = (host & !511) >> cb;
                let last = (host + len - 1) >> cb;
                m.pending_free.extend(first..=last);
            }
            _ => {}
        }
    }

    /// What the guest reads now in the cluster at `base` (clamped to the
    /// virtual size), for the part of a new cluster a write does not cover.
    fn read_old(&self, m: &Meta, base: u64, buf: &mut [u8]) -> io::Result<()> {
        let inside = self.header.size.saturating_sub(base).min(buf.len() as u64) as usize;
        self.read_in(m, base, &mut buf[..inside], 0, &mut Holes::default())?;
        buf[inside..].fill(0);
        Ok(())
    }

    /// Writes `data` at `offset` with the write lock held.
    pub(super) fn write_in(&self, m: &mut Meta, offset: u64, data: &[u8]) -> io::Result<()> {
        let cs = self.cluster_size();
        let end = offset + data.len() as u64;
        let mut voff = offset;
        while voff < end {
            let base = voff & !(cs - 1);
            let at = (voff - offset) as usize;
            // Refuses a corrupt entry before anything changes.
            self.lookup(m, voff)?;
            let (l2, index, raw) = self.slot(m, voff)?;
            if let Some(host) = self.owned(m, raw) {
                let n = ((base + cs).min(end) - voff) as usize;
                if raw & ZERO == 0 {
                    self.data_write(host + (voff - base), &data[at..at + n])?;
                } else {
                    // A zero cluster that kept its host cluster: the rest reads zeroes.
                    let mut buf = vec![0u8; cs as usize];
                    buf[(voff - base) as usize..][..n].copy_from_slice(&data[at..at + n]);
                    self.data_write(host, &buf)?;
                    self.set_entry(m, l2, index, host | COPIED)?;
                }
                voff += n as u64;
                continue;
            }
            // New clusters for this one and the following ones that need them.
            let mut k = 1u64;
            while base + k * cs < end {
                let next = base + k * cs;
                self.lookup(m, next)?;
                let raw = self.entry(m, next)?.map_or(0, |e| e.2);
                if self.owned(m, raw).is_some() {
                    break;
                }
                k += 1;
            }
            let run_end = base + k * cs;
            let upto = end.min(run_end);
            // Whole clusters go straight from the request; partial ones
            // are completed from what the guest read there.
            let whole = voff == base && upto == run_end;
            let mut buf = Vec::new();
            if !whole {
                buf = vec![0u8; (k * cs) as usize];
                let head = voff > base;
                if head {
                    self.read_old(m, base, &mut buf[..cs as usize])?;
                }
                if upto < run_end && !(k == 1 && head) {
                    self.read_old(m, run_end - cs, &mut buf[((k - 1) * cs) as usize..])?;
                }
                buf[(voff - base) as usize..(upto - base) as usize]
                    .copy_from_slice(&data[at..at + (upto - voff) as usize]);
            }
            let host = self.alloc(m, k)?;
            let written = if whole {
                self.data_write(host, &data[at..at + (upto - voff) as usize])
            } else {
                self.data_write(host, &buf)
            };
            if let Err(e) = written {
                // Nothing references them: free them with the next flush.
                let first = host >> self.header.cluster_bits;
                m.pending_free.extend(first..first + k);
                return Err(e);
            }
            for i in 0..k {
                let (l2, index, old) = self.slot(m, base + i * cs)?;
                self.set_entry(m, l2, index, (host + i * cs) | COPIED)?;
                self.release(m, old);
            }
            voff = upto;
        }
        Ok(())
    }

    /// Starts an allocating write of `data` at `offset` whose data is to be
    /// written outside the lock (on a ring): when every cluster of the range
    /// needs a new one, allocates them (contiguous) and returns them with
    /// the entries they replace, and the bytes to write there when the
    /// range does not cover them whole (completed from what the guest read
    /// there, as [`Image::write_in`] does). `None`: the range has a cluster
    /// the image owns (write it with `write_in`). Nothing references the
    /// new clusters until [`Image::commit`].
    pub(super) fn reserve(
        &self,
        m: &mut Meta,
        offset: u64,
        data: &[u8],
    ) -> io::Result<Option<(Reserved, Option<IoBuf>)>> {
        let cs = self.cluster_size();
        let end = offset + data.len() as u64;
        let base = offset & !(cs - 1);
        let k = (end - base).div_ceil(cs);
        for i in 0..k {
            let v = base + i * cs;
            self.lookup(m, v)?;
            let raw = self.entry(m, v)?.map_or(0, |e| e.2);
            if self.owned(m, raw).is_some() {
                return Ok(None);
            }
        }
        let run_end = base + k * cs;
        let bounce = if offset == base && end == run_end {
            None
        } else {
            let mut buf = IoBuf::new();
            buf.resize_zeroed((k * cs) as usize);
            if offset > base {
                self.read_old(m, base, &mut buf[..cs as usize])?;
            }
            if end < run_end && !(k == 1 && offset > base) {
                self.read_old(m, run_end - cs, &mut buf[((k - 1) * cs) as usize..])?;
            }
            buf[(offset - base) as usize..(end - base) as usize].copy_from_slice(data);
            Some(buf)
        };
        let mut entries = Vec::with_capacity(k as usize);
        for i in 0..k {
            entries.push(self.slot(m, base + i * cs)?.2);
        }
        let host = self.alloc(m, k)?;
        Ok(Some((Reserved { base, host, entries }, bounce)))
    }

    /// Ends a reserved write whose data is in its new clusters: each guest
    /// cluster whose entry is still what it replaced now points there. A
    /// cluster whose entry changed meanwhile (another write allocated it,
    /// or a discard or zeroing changed it) keeps the change: its new
    /// cluster is freed and this write's own bytes there (`data`, at
    /// `offset`) are written again over the entry as it is now.
    pub(super) fn commit(&self, m: &mut Meta, r: &Reserved, offset: u64, data: &[u8]) -> io::Result<()> {
        let cs = self.cluster_size();
        let cb = self.header.cluster_bits;
        let end = offset + data.len() as u64;
        let mut again = Vec::new();
        for (i, &was) in r.entries.iter().enumerate() {
            let v = r.base + i as u64 * cs;
            let host = r.host + i as u64 * cs;
            let (l2, index, now) = self.slot(m, v)?;
            if now == was {
                self.set_entry(m, l2, index, host | COPIED)?;
                self.release(m, now);
            } else {
                m.pending_free.push(host >> cb);
                again.push(v);
            }
        }
        for v in again {
            let (a, b) = (v.max(offset), (v + cs).min(end));
            self.write_in(m, a, &data[(a - offset) as usize..(b - offset) as usize])?;
        }
        self.settle(m)
    }

    /// A reserved write failed: its clusters go with the next flush.
    pub(super) fn unreserve(&self, m: &mut Meta, r: &Reserved) {
        let first = r.host >> self.header.cluster_bits;
        m.pending_free.extend(first..first + r.entries.len() as u64);
    }

    /// The whole clusters of `[offset, offset+len)` (a range that reaches
    /// the end of the image covers its last, partial cluster whole) and the
    /// partial pieces around them.
    fn split(&self, offset: u64, len: u64) -> ((u64, u64), Vec<(u64, u64)>) {
        let cs = self.cluster_size();
        let end = offset + len;
        let a = offset.next_multiple_of(cs);
        let b = if end >= self.header.size { end.next_multiple_of(cs) } else { end & !(cs - 1) };
        if a >= b {
            return ((a, a), vec![(offset, end)]);
        }
        let mut partial = Vec::new();
        if offset < a {
            partial.push((offset, a));
        }
        if b < end {
            partial.push((b, end));
        }
        ((a, b), partial)
    }

    /// Whether zeroing `[offset, offset+len)` changes metadata only (no
    /// data written): the test of a write-zeroes request with FAST_ZERO.
    pub fn zero_is_fast(&self, offset: u64, len: u64) -> bool {
        let (_, partial) = self.split(offset, len);
        partial.is_empty() && (self.header.version >= 3 || self.backing.is_none())
    }

    /// Zeroes or discards `[offset, offset+len)`: whole clusters in the L2
    /// tables; partial clusters are written with zeroes (or left, for a
    /// discard).
    pub fn clear(&self, offset: u64, len: u64, how: Clear) -> io::Result<()> {
        let cs = self.cluster_size();
        let cb = self.header.cluster_bits;
        let span = 1u64 << (2 * cb - 3);
        let v3 = self.header.version >= 3;
        let backing = self.backing.is_some();
        let ((a, b), partial) = self.split(offset, len);
        let mut m = self.meta_mut();
        if how != Clear::Trim {
            for (s, e) in partial {
                self.write_in(&mut m, s, &vec![0u8; (e - s) as usize])?;
            }
        }
        let mut v = a;
        while v < b {
            self.lookup(&m, v)?;
            let raw = match self.entry(&m, v)? {
                Some((_, _, raw)) => raw,
                // No L2 table: everything in this L1 entry's range is unallocated.
                None if !backing || (how == Clear::Trim && !v3) => {
                    v = (v + span) & !(span - 1);
                    continue;
                }
                None => 0,
            };
            let owned = self.owned(&m, raw);
            let new = match (how, v3) {
                (Clear::Trim, _) if !backing => 0,
                (Clear::Trim, true) => ZERO,
                // Version 2 with a backing file has no way to hide it.
                (Clear::Trim, false) => raw,
                (Clear::Zero { keep: true }, true) => owned.map_or(ZERO, |h| h | COPIED | ZERO),
                (Clear::Zero { keep: false }, true) if backing => ZERO,
                (Clear::Zero { keep: false }, true) => 0,
                (Clear::Zero { keep }, false) => {
                    let must_write = backing || (keep && owned.is_some());
                    if !must_write {
                        0
                    } else {
                        // No zero flag before version 3: write zeroes.
                        let n = cs.min(self.header.size - v) as usize;
                        self.write_in(&mut m, v, &vec![0u8; n])?;
                        v += cs;
                        continue;
                    }
                }
            };
            if new != raw {
                let (l2, index, raw) = self.slot(&mut m, v)?;
                self.set_entry(&m, l2, index, new)?;
                if owned.is_none() || new & OFFSET_MASK == 0 {
                    self.release(&mut m, raw);
                }
            }
            v += cs;
        }
        self.settle(&mut m)
    }

    /// Flushes when changed tables or pending frees pass their bounds.
    fn settle(&self, m: &mut Meta) -> io::Result<()> {
        let tables = {
            let c = m.l2.lock().unwrap_or_else(|p| p.into_inner());
            c.dirty.len() > c.capacity / 2
        };
        if tables || m.pending_free.len() > MAX_PENDING_FREE {
            self.flush_in(m)?;
        }
        Ok(())
    }

    /// Makes every completed write durable (see the module's order).
    pub fn flush(&self) -> io::Result<()> {
        let mut m = self.meta_mut();
        self.flush_in(&mut m)
    }

    pub(super) fn flush_in(&self, m: &mut Meta) -> io::Result<()> {
        let src = &*self.src;
        let cb = self.header.cluster_bits;
        let Some(rc) = m.rc.as_mut() else { return Ok(()) };
        rc.write_dirty(src)?;
        src.sync()?;
        if let Some((old, n)) = rc.moved_from {
            self.set_refcount_table(rc.table_offset, rc.table_clusters)?;
            rc.moved_from = None;
            m.pending_free.extend((old >> cb)..(old >> cb) + n);
            for c in (old >> cb)..(old >> cb) + n {
                rc.metadata.remove(&c);
            }
        }
        let dirty: Vec<(u64, Arc<Vec<u64>>)> = {
            let c = m.l2.lock().unwrap_or_else(|p| p.into_inner());
            c.dirty.iter().filter_map(|off| c.tables.get(off).map(|t| (*off, t.clone()))).collect()
        };
        for (off, t) in &dirty {
            let bytes: Vec<u8> = t.iter().flat_map(|e| e.to_be_bytes()).collect();
            src.write_at(*off, &bytes)?;
        }
        if m.l1_dirty {
            let bytes: Vec<u8> = m.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            src.write_at(self.header.l1_table_offset, &bytes)?;
        }
        if !dirty.is_empty() || m.l1_dirty {
            src.sync()?;
            m.l1_dirty = false;
            let mut c = m.l2.lock().unwrap_or_else(|p| p.into_inner());
            for (off, _) in &dirty {
                c.dirty.remove(off);
            }
        }
        // Operations mapped on a ring before these frees may still target
        // the clusters: they wait for their generation (ring.rs).
        let (generation, done) = self.epochs.advance();
        let free = std::mem::take(&mut m.pending_free);
        if !free.is_empty() {
            m.deferred.push((generation, free));
        }
        let Some(rc) = m.rc.as_mut() else { return Ok(()) };
        let mut result = Ok(());
        let mut kept = Vec::new();
        for (g, clusters) in std::mem::take(&mut m.deferred) {
            if done.is_none_or(|d| g > d) {
                kept.push((g, clusters));
                continue;
            }
            for c in clusters {
                if let Err(e) = rc.decr(src, c) {
                    result = Err(corrupt(&self.path, e));
                }
            }
        }
        m.deferred = kept;
        rc.write_dirty(src)?;
        result
    }

    /// Flushes and syncs the last refcount decrements: the image is then
    /// clean for `qemu-img check` (the export's close).
    pub fn close(&self) -> io::Result<()> {
        let mut m = self.meta_mut();
        if m.rc.is_none() {
            return Ok(());
        }
        self.flush_in(&mut m)?;
        self.src.sync()
    }
}
