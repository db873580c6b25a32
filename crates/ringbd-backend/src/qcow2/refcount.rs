//! The refcounts of a writable qcow2 image: the refcount table, its blocks
//! (read on demand, kept in memory: one block per `cluster_size *
//! cluster_size * 8 / refcount_bits` bytes of file, 1/32768 of the file for
//! 64 KiB clusters and 16-bit refcounts), and cluster allocation.
//!
//! Changes stay in memory until [`Refcounts::write_dirty`]; the image's
//! flush orders them against the L1/L2 tables (`write.rs`): refcount
//! increments reach the file before any table that references the
//! clusters, and decrements only after the tables that stopped
//! referencing them are durable. A crash in between leaks clusters
//! (`qemu-img check` reports leaks, never errors).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::path::Path;

use super::header::Header;
use super::image::corrupt;
use super::layer::Storage;
use super::table::{self, OFFSET_MASK};

/// Bits 0-8 of a refcount table entry are reserved.
const RT_RESERVED: u64 = 0x1ff | !OFFSET_MASK;

pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// Where the table is now (moved by growth; the header follows at flush).
    pub table_offset: u64,
    pub table_clusters: u64,
    /// Block offsets by table index (0: no block: every refcount there is 0).
    table: Vec<u64>,
    table_dirty: bool,
    /// The table the header names on disk, when growth moved it: freed once
    /// the header naming the new one is durable.
    pub moved_from: Option<(u64, u64)>,
    blocks: HashMap<usize, Vec<u8>>,
    dirty: BTreeSet<usize>,
    /// The first cluster index an allocation scan looks at.
    pub hint: u64,
    /// The cluster index past the last allocated cluster and the file's end.
    pub end: u64,
    /// The clusters metadata lives in (header, L1 and refcount tables, L2
    /// tables, refcount blocks): an allocation that finds one of them free
    /// says the refcounts are wrong, and fails instead of overwriting it
    /// (qemu's metadata overlap check, for the same reason).
    pub metadata: HashSet<u64>,
}

impl Refcounts {
    /// Reads the refcount table of the image whose `header` heads `src` (a
    /// file of `file_len` bytes) and checks every entry.
    pub fn load(path: &Path, header: &Header, src: &dyn Storage, file_len: u64) -> io::Result<Refcounts> {
        let cb = header.cluster_bits;
        let clusters = u64::from(header.refcount_table_clusters);
        let mut raw = vec![0u8; (clusters << cb) as usize];
        if src.read_at(header.refcount_table_offset, &mut raw)? < raw.len() {
            return Err(corrupt(path, "the refcount table runs past the end of the file"));
        }
        let table = table::entries(&raw);
        for (i, &e) in table.iter().enumerate() {
            let bad = if e & RT_RESERVED != 0 {
                Some("has reserved bits set".to_owned())
            } else if e & ((1 << cb) - 1) != 0 {
                Some("is not cluster-aligned".to_owned())
            } else if e != 0 && e.checked_add(1 << cb).is_none_or(|end| end > file_len) {
                Some(format!("is past the end of the file ({file_len} bytes)"))
            } else {
                None
            };
            if let Some(why) = bad {
                return Err(corrupt(path, format!("refcount table index {i}: block 0x{e:x} {why}")));
            }
        }
        let rt = header.refcount_table_offset >> cb;
        let mut metadata: HashSet<u64> = (rt..rt + clusters).collect();
        metadata.insert(0);
        metadata.extend(table.iter().filter(|&&o| o != 0).map(|o| o >> cb));
        Ok(Refcounts {
            cluster_bits: cb,
            order: header.refcount_order,
            table_offset: header.refcount_table_offset,
            table_clusters: clusters,
            table,
            table_dirty: false,
            moved_from: None,
            blocks: HashMap::new(),
            dirty: BTreeSet::new(),
            hint: 0,
            end: file_len.div_ceil(1 << cb),
            metadata,
        })
    }

    /// Refcounts per block.
    fn per_block(&self) -> u64 {
        (8u64 << self.cluster_bits) >> self.order
    }

    /// The block holding `cluster`'s refcount, loaded; `None` if it has none.
    fn block(&mut self, src: &dyn Storage, cluster: u64) -> io::Result<Option<(&mut Vec<u8>, usize)>> {
        let per = self.per_block();
        let idx = (cluster / per) as usize;
        let at = (cluster % per) as usize;
        let Some(&off) = self.table.get(idx) else { return Ok(None) };
        if off == 0 {
            return Ok(None);
        }
        if !self.blocks.contains_key(&idx) {
            let mut b = vec![0u8; 1 << self.cluster_bits];
            if src.read_at(off, &mut b)? < b.len() {
                let msg = format!("refcount block 0x{off:x} runs past the end of the file");
                return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
            }
            self.blocks.insert(idx, b);
        }
        Ok(self.blocks.get_mut(&idx).map(|b| (b, at)))
    }

    /// The refcount of `cluster` (0 where no block covers it).
    pub fn get(&mut self, src: &dyn Storage, cluster: u64) -> io::Result<u64> {
        let order = self.order;
        Ok(self.block(src, cluster)?.map_or(0, |(b, at)| get_entry(b, at, order)))
    }

    fn set(&mut self, src: &dyn Storage, cluster: u64, value: u64) -> io::Result<()> {
        let order = self.order;
        let idx = (cluster / self.per_block()) as usize;
        let Some((b, at)) = self.block(src, cluster)? else {
            let msg = format!("no refcount block covers cluster 0x{:x}", cluster << self.cluster_bits);
            return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
        };
        set_entry(b, at, order, value);
        self.dirty.insert(idx);
        Ok(())
    }

    /// Drops one reference to `cluster`; a cluster at 0 becomes free.
    pub fn decr(&mut self, src: &dyn Storage, cluster: u64) -> io::Result<()> {
        let v = self.get(src, cluster)?;
        if v == 0 {
            let msg = format!("refcount of cluster 0x{:x} is already 0", cluster << self.cluster_bits);
            return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
        }
        self.set(src, cluster, v - 1)?;
        if v == 1 {
            self.hint = self.hint.min(cluster);
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters (refcount 1 each) and returns the
    /// host offset of the first: the first free run from the hint inside
    /// the file, else at its end.
    pub fn alloc(&mut self, src: &dyn Storage, n: u64) -> io::Result<u64> {
        let mut start = self.hint;
        let mut c = start;
        let mut first_free = None;
        while start + n <= self.end {
            if c - start == n {
                for k in start..c {
                    self.set(src, k, 1)?;
                }
                self.hint = if first_free == Some(start) { c } else { first_free.unwrap_or(c) };
                return Ok(start << self.cluster_bits);
            }
            let free = self.block(src, c)?.is_some() && self.get(src, c)? == 0;
            if free && self.metadata.contains(&c) {
                let msg = format!(
                    "cluster 0x{:x} holds metadata but its refcount is 0: the refcounts are inconsistent \
                     (run `qemu-img check -r all`); ringbd does not allocate it",
                    c << self.cluster_bits
                );
                return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
            }
            c += 1;
            if free {
                first_free.get_or_insert(c - 1);
            } else {
                start = c;
            }
        }
        // No run fits: the next scan starts at the first free cluster seen.
        self.hint = first_free.unwrap_or(self.end);
        self.alloc_end(src, n)
    }

    /// Allocates `n` clusters past everything allocated. The refcount
    /// blocks the new clusters need go first, in front of them (each
    /// covered by itself or a block beside it), so that the `n` clusters
    /// stay contiguous; the table grows first if it is too short.
    fn alloc_end(&mut self, src: &dyn Storage, n: u64) -> io::Result<u64> {
        let per = self.per_block();
        loop {
            let start = self.end;
            // The blocks needed to cover [start, start + blocks + n).
            let mut blocks = 0;
            loop {
                let last = (start + blocks + n - 1) / per;
                let first = start / per;
                let need = (first..=last)
                    .filter(|&i| self.table.get(i as usize).is_none_or(|&o| o == 0))
                    .count() as u64;
                if need == blocks {
                    break;
                }
                blocks = need;
            }
            let last = ((start + blocks + n - 1) / per) as usize;
            if last >= self.table.len() {
                self.grow_table(src, last)?;
                continue;
            }
            let mut at = start;
            for i in (start / per) as usize..=last {
                if self.table[i] == 0 {
                    self.blocks.insert(i, vec![0u8; 1 << self.cluster_bits]);
                    self.dirty.insert(i);
                    self.table[i] = at << self.cluster_bits;
                    self.table_dirty = true;
                    self.metadata.insert(at);
                    at += 1;
                }
            }
            for c in start..start + blocks + n {
                self.set(src, c, 1)?;
            }
            self.end = start + blocks + n;
            return Ok((start + blocks) << self.cluster_bits);
        }
    }

    /// Grows the table to cover block index `idx` with room to spare: the
    /// new table goes at the end of the file; the header names it at the
    /// next flush, and the old one is freed after that.
    fn grow_table(&mut self, src: &dyn Storage, idx: usize) -> io::Result<()> {
        let per_cluster = (1usize << self.cluster_bits) / 8;
        let entries = ((idx + 1).max(self.table.len()) * 2).div_ceil(per_cluster) * per_cluster;
        let clusters = (entries / per_cluster) as u64;
        let old = (self.table_offset, self.table_clusters);
        self.table.resize(entries, 0);
        let offset = self.alloc_end(src, clusters)?;
        match self.moved_from {
            // A table grown since the last flush was never named on disk: free it now.
            Some(_) => {
                for c in 0..old.1 {
                    self.decr(src, (old.0 >> self.cluster_bits) + c)?;
                    self.metadata.remove(&((old.0 >> self.cluster_bits) + c));
                }
            }
            None => self.moved_from = Some(old),
        }
        self.table_offset = offset;
        self.table_clusters = clusters;
        self.table_dirty = true;
        self.metadata.extend((offset >> self.cluster_bits)..(offset >> self.cluster_bits) + clusters);
        Ok(())
    }

    /// Writes the changed blocks, then the table if it changed (new blocks
    /// before the entries naming them). Does not sync.
    pub fn write_dirty(&mut self, src: &dyn Storage) -> io::Result<()> {
        for &idx in &self.dirty {
            if let Some(b) = self.blocks.get(&idx) {
                src.write_at(self.table[idx], b)?;
            }
        }
        self.dirty.clear();
        if self.table_dirty {
            let bytes: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
            src.write_at(self.table_offset, &bytes)?;
            self.table_dirty = false;
        }
        Ok(())
    }
}

/// Refcount `i` of a block with `1 << order`-bit entries (sub-byte entries
/// from the least significant bits up, wider ones big-endian, as qemu).
pub fn get_entry(b: &[u8], i: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            u64::from(b[i / per_byte] >> (bits * (i % per_byte))) & ((1 << bits) - 1)
        }
        _ => {
            let w = 1usize << (order - 3);
            b[i * w..(i + 1) * w].iter().fold(0u64, |v, &x| (v << 8) | u64::from(x))
        }
    }
}

/// Sets refcount `i` (see [`get_entry`]); `v` fits the width.
pub fn set_entry(b: &mut [u8], i: usize, order: u32, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = bits * (i % per_byte);
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let byte = &mut b[i / per_byte];
            *byte = (*byte & !mask) | (((v as u8) << shift) & mask);
        }
        _ => {
            let w = 1usize << (order - 3);
            let bytes = v.to_be_bytes();
            b[i * w..(i + 1) * w].copy_from_slice(&bytes[8 - w..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width() {
        // 1-bit: least significant bit first.
        let mut b = [0u8; 8];
        set_entry(&mut b, 1, 0, 1);
        assert_eq!(b[0], 0b10);
        assert_eq!(get_entry(&b, 1, 0), 1);
        assert_eq!(get_entry(&b, 0, 0), 0);
        // 4-bit: the second entry is the high nibble.
        let mut b = [0u8; 8];
        set_entry(&mut b, 1, 2, 0xa);
        set_entry(&mut b, 0, 2, 0x3);
        assert_eq!(b[0], 0xa3);
        // 16-bit big-endian.
        let mut b = [0u8; 8];
        set_entry(&mut b, 1, 4, 0x1234);
        assert_eq!(&b[..4], &[0, 0, 0x12, 0x34]);
        assert_eq!(get_entry(&b, 1, 4), 0x1234);
        // 64-bit.
        let mut b = [0u8; 8];
        set_entry(&mut b, 0, 6, u64::MAX - 1);
        assert_eq!(get_entry(&b, 0, 6), u64::MAX - 1);
    }
}
