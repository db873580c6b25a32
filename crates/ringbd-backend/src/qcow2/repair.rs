//! Repairing the refcounts of an image left dirty (`incompatible_features`
//! bit 0): qemu with `lazy_refcounts=on` sets the bit while its refcounts
//! may lag behind the tables, and a crash leaves it set. Before writing such
//! an image, ringbd rebuilds its refcounts from what references clusters,
//! as `qemu-img check -r all` does:
//!
//! 1. count every cluster the header, the L1 table, the L2 tables and their
//!    entries (data clusters, zero clusters that kept theirs, every cluster
//!    a compressed cluster's bytes touch) use;
//! 2. write a new refcount table and blocks at the end of the file, sized to
//!    cover everything including themselves, and sync;
//! 3. name the new table in the header, sync; clear the dirty bit, sync.
//!
//! The old table and blocks are then unreferenced and free. A crash before
//! step 3 leaves the image as it was (still dirty); one between the header
//! write and the dirty bit leaves a correct image still marked dirty, which
//! is repaired again. Images with internal snapshots (their own tables) are
//! not repaired.

use std::io;

use super::header::{Header, INCOMPAT_DIRTY};
use super::image::{corrupt, Image};
use super::refcount::set_entry;
use super::table::{self, Cluster};

impl Image {
    /// Rebuilds the refcounts if the header's dirty bit is set; returns
    /// whether it did.
    pub fn repair_if_dirty(&mut self) -> io::Result<bool> {
        if self.header.incompatible_features & INCOMPAT_DIRTY == 0 {
            return Ok(false);
        }
        if self.header.nb_snapshots > 0 {
            return Err(corrupt(
                &self.path,
                "the dirty bit is set on an image with internal snapshots; ringbd repairs only images \
                 without them: run `qemu-img check -r all` first",
            ));
        }
        let counts = self.count_references()?;
        let (offset, clusters, end) = self.write_refcounts(counts)?;
        self.set_refcount_table(offset, clusters)?;
        let features = self.header.incompatible_features & !INCOMPAT_DIRTY;
        self.src.write_at(72, &features.to_be_bytes())?;
        self.src.sync()?;
        self.header.refcount_table_offset = offset;
        self.header.refcount_table_clusters = clusters as u32;
        self.header.incompatible_features = features;
        let m = self.meta.get_mut().unwrap_or_else(|p| p.into_inner());
        m.file_len = m.file_len.max(end);
        Ok(true)
    }

    /// References to each cluster from everything but the refcount
    /// structures themselves.
    fn count_references(&self) -> io::Result<Vec<u32>> {
        let h = &self.header;
        let cb = h.cluster_bits;
        let m = self.meta();
        let file_clusters = m.file_len.div_ceil(1 << cb);
        let mut counts = vec![0u32; file_clusters as usize];
        let mut add = |c: u64, what: &str| -> io::Result<()> {
            if c >= file_clusters {
                let msg = format!("{what} at cluster 0x{:x} is past the end of the file", c << cb);
                return Err(corrupt(&self.path, msg));
            }
            counts[c as usize] += 1;
            Ok(())
        };
        add(0, "the header")?;
        let l1_bytes = u64::from(h.l1_size) * 8;
        for c in (h.l1_table_offset >> cb)..(h.l1_table_offset + l1_bytes).div_ceil(1 << cb) {
            add(c, "the L1 table")?;
        }
        for (i, e) in self.full_l1()?.into_iter().enumerate() {
            let l2 =
                table::l1_entry(e, cb).map_err(|e| corrupt(&self.path, format!("L1 index {i}: {}", e.0)))?;
            let Some(l2) = l2 else { continue };
            add(l2 >> cb, "an L2 table")?;
            for (j, entry) in self.l2_table(&m, l2)?.iter().enumerate() {
                let at = |e: String| corrupt(&self.path, format!("L2 table 0x{l2:x} index {j}: {e}"));
                match table::l2_entry(*entry, cb).map_err(|e| at(e.0))? {
                    Cluster::Data { host } | Cluster::Zero { host: Some(host) } => {
                        add(host >> cb, "a data cluster")?
                    }
                    Cluster::Compressed { host, len } => {
                        for c in ((host & !511) >> cb)..=((host + len - 1) >> cb) {
                            // The last compressed cluster may end in the file's final, partial sector.
                            if c < file_clusters {
                                add(c, "a compressed cluster")?;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(counts)
    }

    /// Writes a refcount table and blocks for `counts` at the end of the
    /// file (counting themselves) and syncs; returns the table's offset and
    /// clusters, and the file's new end.
    fn write_refcounts(&self, mut counts: Vec<u32>) -> io::Result<(u64, u64, u64)> {
        let h: &Header = &self.header;
        let cb = h.cluster_bits;
        let cs = 1u64 << cb;
        let per_block = (8 * cs) >> h.refcount_order;
        let max =
            if h.refcount_order >= 5 { u64::from(u32::MAX) } else { (1u64 << (1 << h.refcount_order)) - 1 };
        let start = counts.len() as u64;
        // Table clusters and blocks that cover everything, themselves included.
        let (mut tables, mut blocks) = (1u64, 1u64);
        loop {
            let total = start + tables + blocks;
            let b = total.div_ceil(per_block);
            let t = (b * 8).div_ceil(cs);
            if (t, b) == (tables, blocks) {
                break;
            }
            (tables, blocks) = (t.max(tables), b.max(blocks));
        }
        counts.resize((start + tables + blocks) as usize, 1);
        let mut table = vec![0u8; (tables * cs) as usize];
        for b in 0..blocks {
            let block_at = (start + tables + b) << cb;
            table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&block_at.to_be_bytes());
            let mut block = vec![0u8; cs as usize];
            let first = b * per_block;
            for i in 0..per_block {
                let Some(&n) = counts.get((first + i) as usize) else { break };
                if u64::from(n) > max {
                    let msg = format!(
                        "cluster 0x{:x} has {n} references, more than its refcount can hold",
                        (first + i) << cb
                    );
                    return Err(corrupt(&self.path, msg));
                }
                set_entry(&mut block, i as usize, h.refcount_order, u64::from(n));
            }
            self.src.write_at(block_at, &block)?;
        }
        self.src.write_at(start << cb, &table)?;
        self.src.sync()?;
        Ok((start << cb, tables, (start + tables + blocks) << cb))
    }
}
