//! One qcow2 image of the chain: its header, its L1 table (read and checked
//! at open), its L2 tables (read on demand, cached) and its clusters.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::header::Header;
use super::layer::{map_clamped, read_clamped, ExtentList, Layer, Storage};
use super::refcount::Refcounts;
use super::table::{self, Cluster, OFFSET_MASK};
use crate::Holes;

/// Bytes of clean L2 tables kept in memory per image (at least one table):
/// 32 MiB maps 256 GiB of a 64 KiB-cluster image. Eviction drops the
/// oldest clean table; changed tables stay until a flush writes them.
const L2_CACHE_BYTES: u64 = 32 << 20;
/// Most clusters one block-status call walks, so that one request over a
/// huge image of 512-byte clusters stays short; the client asks again.
const MAX_SCAN_CLUSTERS: u64 = 1 << 18;

pub struct Image {
    pub path: PathBuf,
    pub header: Header,
    pub(super) src: Box<dyn Storage>,
    /// The tables: read under a read lock (with the data reads and the
    /// writes that change no metadata), changed under the write lock.
    pub(super) meta: RwLock<Meta>,
    /// The last decompressed cluster (descriptor, bytes): sequential reads
    /// of a compressed image decompress each cluster once.
    last_compressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    pub backing: Option<Box<dyn Layer>>,
    /// `qcow2:PATH,direct`: the image opened again with `O_DIRECT`, for
    /// data cluster reads and writes whose offset, length and buffer are
    /// aligned (the rest, and all metadata, use `src`).
    pub direct: Option<Direct>,
    /// The image's file (the one `src` reads), for data operations on a
    /// ring (`ring.rs`); `None` for images held in memory.
    pub ring_file: Option<Arc<std::fs::File>>,
    /// Data operations mapped on rings and still in flight.
    pub(super) epochs: Arc<super::ring::Epochs>,
}

pub struct Direct {
    pub file: Arc<std::fs::File>,
    /// Offsets and lengths must be multiples of this, buffer addresses of `mem`.
    pub align: u64,
    pub mem: u64,
    /// Data operations that went through it (tests, `describe`).
    pub ops: std::sync::atomic::AtomicU64,
}

impl Direct {
    pub(super) fn fits(&self, host: u64, buf: &[u8]) -> bool {
        let len = buf.len() as u64;
        len > 0
            && host.is_multiple_of(self.align)
            && len.is_multiple_of(self.align)
            && (buf.as_ptr() as u64).is_multiple_of(self.mem)
    }
}

/// What an image's metadata is now, in memory.
pub(super) struct Meta {
    /// The file's length, or past it where clusters were allocated.
    pub file_len: u64,
    /// The L1 entries the virtual size uses, as stored (checked at open).
    pub l1: Vec<u64>,
    pub l1_dirty: bool,
    pub l2: Mutex<L2Cache>,
    /// A writable image's refcounts.
    pub rc: Option<Refcounts>,
    /// Clusters whose reference is gone from the tables in memory: their
    /// refcounts drop once those tables are durable (the next flush).
    pub pending_free: Vec<u64>,
    /// Frees a flush could not apply yet, with the generation of ring
    /// operations that may still target them (`ring.rs`).
    pub deferred: Vec<(u64, Vec<u64>)>,
}

pub(super) struct L2Cache {
    pub tables: HashMap<u64, Arc<Vec<u64>>>,
    order: VecDeque<u64>,
    pub capacity: usize,
    /// Tables changed since the last flush (never evicted).
    pub dirty: BTreeSet<u64>,
}

impl L2Cache {
    pub fn insert(&mut self, offset: u64, t: Arc<Vec<u64>>) {
        if self.tables.insert(offset, t).is_none() {
            self.order.push_back(offset);
        }
        let mut tries = self.order.len();
        while self.order.len() > self.capacity && tries > 0 {
            tries -= 1;
            let Some(old) = self.order.pop_front() else { break };
            if self.dirty.contains(&old) {
                self.order.push_back(old);
            } else {
                self.tables.remove(&old);
            }
        }
    }
}

/// A contiguous piece of a read that one operation serves.
pub(super) enum Run {
    /// Image file bytes from this host offset.
    Data(u64),
    /// One compressed cluster (descriptor), from this offset inside it.
    Compressed {
        host: u64,
        len: u64,
        at: u64,
    },
    /// The backing file (or zeroes without one).
    Backing,
    Zero,
}

pub(super) fn corrupt(path: &Path, msg: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: corrupt qcow2 image: {msg}", path.display()))
}

impl Image {
    /// Opens the image whose (parsed, checked) `header` heads `src` of
    /// `file_len` bytes: reads the L1 table and checks every entry. The
    /// backing file is the caller's to attach.
    pub fn open(path: &Path, header: Header, src: Box<dyn Storage>, file_len: u64) -> io::Result<Image> {
        let needed = header.l1_entries_needed() as usize;
        let mut raw = vec![0u8; needed * 8];
        let n = src.read_at(header.l1_table_offset, &mut raw)?;
        if n < raw.len() {
            return Err(corrupt(path, "the L1 table runs past the end of the file"));
        }
        let cluster = header.cluster_size();
        let mut l1 = Vec::with_capacity(needed);
        for (i, e) in table::entries(&raw).into_iter().enumerate() {
            let l2 = table::l1_entry(e, header.cluster_bits)
                .map_err(|e| corrupt(path, format!("L1 index {i}: {}", e.0)))?;
            if let Some(off) = l2 {
                if off.checked_add(cluster).is_none_or(|end| end > file_len) {
                    let msg = format!(
                        "L1 index {i}: L2 table at 0x{off:x} is past the end of the file ({file_len} bytes)"
                    );
                    return Err(corrupt(path, msg));
                }
            }
            l1.push(e);
        }
        let capacity = (L2_CACHE_BYTES / cluster).max(1) as usize;
        let l2 = L2Cache { tables: HashMap::new(), order: VecDeque::new(), capacity, dirty: BTreeSet::new() };
        let meta = Meta {
            file_len,
            l1,
            l1_dirty: false,
            l2: Mutex::new(l2),
            rc: None,
            pending_free: Vec::new(),
            deferred: Vec::new(),
        };
        Ok(Image {
            path: path.to_owned(),
            header,
            src,
            meta: RwLock::new(meta),
            last_compressed: Mutex::new(None),
            backing: None,
            direct: None,
            ring_file: None,
            epochs: Arc::default(),
        })
    }

    /// Reads data cluster bytes at `host` (with `O_DIRECT` where asked and aligned).
    pub(super) fn data_read(&self, host: u64, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(d) = self.direct.as_ref().filter(|d| d.fits(host, buf)) {
            d.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Storage::read_at(&d.file, host, buf);
        }
        self.src.read_at(host, buf)
    }

    /// Writes data cluster bytes at `host` (with `O_DIRECT` where asked and aligned).
    pub(super) fn data_write(&self, host: u64, buf: &[u8]) -> io::Result<()> {
        if let Some(d) = self.direct.as_ref().filter(|d| d.fits(host, buf)) {
            d.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Storage::write_at(&d.file, host, buf);
        }
        self.src.write_at(host, buf)
    }

    /// Every entry of the L1 table as stored (`l1_size` of them: also those
    /// past what the virtual size uses), for the whole-image walks.
    pub(super) fn full_l1(&self) -> io::Result<Vec<u64>> {
        let mut raw = vec![0u8; self.header.l1_size as usize * 8];
        if self.src.read_at(self.header.l1_table_offset, &mut raw)? < raw.len() {
            return Err(corrupt(&self.path, "the L1 table runs past the end of the file"));
        }
        Ok(table::entries(&raw))
    }

    /// Names the refcount table in the header (offset and clusters, one
    /// write of bytes 48..60), then syncs.
    pub(super) fn set_refcount_table(&self, offset: u64, clusters: u64) -> io::Result<()> {
        let mut h = [0u8; 12];
        h[..8].copy_from_slice(&offset.to_be_bytes());
        h[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        self.src.write_at(48, &h)?;
        self.src.sync()
    }

    pub(super) fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    pub(super) fn meta(&self) -> RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn meta_mut(&self) -> RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The L2 table at `offset`, from the cache or the file.
    pub(super) fn l2_table(&self, m: &Meta, offset: u64) -> io::Result<Arc<Vec<u64>>> {
        if let Some(t) = m.l2.lock().unwrap_or_else(|p| p.into_inner()).tables.get(&offset) {
            return Ok(t.clone());
        }
        let mut raw = vec![0u8; self.cluster_size() as usize];
        if self.src.read_at(offset, &mut raw)? < raw.len() {
            return Err(corrupt(
                &self.path,
                format!("L2 table at 0x{offset:x} runs past the end of the file"),
            ));
        }
        let t = Arc::new(table::entries(&raw));
        m.l2.lock().unwrap_or_else(|p| p.into_inner()).insert(offset, t.clone());
        Ok(t)
    }

    /// What the L2 entry says of the guest cluster holding `voff`, and
    /// whether a whole L1 entry's range is unallocated (no L2 table).
    pub(super) fn lookup(&self, m: &Meta, voff: u64) -> io::Result<(Cluster, bool)> {
        let cb = self.header.cluster_bits;
        let Some((l2, l2_index, entry)) = self.entry(m, voff)? else {
            return Ok((Cluster::Unallocated, true));
        };
        let at = |e: String| {
            corrupt(&self.path, format!("L2 table 0x{l2:x} index {l2_index} (guest 0x{voff:x}): {e}"))
        };
        let c = table::l2_entry(entry, cb).map_err(|e| at(e.0))?;
        match c {
            Cluster::Data { host } | Cluster::Compressed { host, .. } if host >= m.file_len => {
                Err(at(format!("cluster at 0x{host:x} is past the end of the file ({} bytes)", m.file_len)))
            }
            c => Ok((c, false)),
        }
    }

    /// The L2 table, index and raw entry of the guest cluster holding
    /// `voff`; `None` when its L1 entry has no table.
    pub(super) fn entry(&self, m: &Meta, voff: u64) -> io::Result<Option<(u64, usize, u64)>> {
        let cb = self.header.cluster_bits;
        let l1_index = (voff >> (2 * cb - 3)) as usize;
        let l2_index = ((voff >> cb) & (self.header.l2_entries() - 1)) as usize;
        let l2 = m.l1.get(l1_index).map_or(0, |e| e & OFFSET_MASK);
        if l2 == 0 {
            return Ok(None);
        }
        let entry = self.l2_table(m, l2)?.get(l2_index).copied().unwrap_or(0);
        Ok(Some((l2, l2_index, entry)))
    }

    /// The decompressed cluster of descriptor (`host`, `len`).
    fn decompress(&self, host: u64, len: u64) -> io::Result<Arc<Vec<u8>>> {
        if let Some((h, data)) = &*self.last_compressed.lock().unwrap_or_else(|p| p.into_inner()) {
            if *h == host {
                return Ok(data.clone());
            }
        }
        let mut input = vec![0u8; len as usize];
        // The last compressed cluster may end inside the final sector,
        // short of what the descriptor rounds up to: qemu reads zeroes there.
        let _ = self.src.read_at(host, &mut input)?;
        let mut out = vec![0u8; self.cluster_size() as usize];
        let mut z = flate2::Decompress::new(false);
        let r = z.decompress(&input, &mut out, flate2::FlushDecompress::Finish);
        if r.is_err() || z.total_out() != out.len() as u64 {
            let why = match r {
                Err(e) => e.to_string(),
                Ok(_) => format!("{} bytes inflated, not the cluster's {}", z.total_out(), out.len()),
            };
            return Err(corrupt(
                &self.path,
                format!("compressed cluster at 0x{host:x} ({len} bytes): {why}"),
            ));
        }
        let out = Arc::new(out);
        *self.last_compressed.lock().unwrap_or_else(|p| p.into_inner()) = Some((host, out.clone()));
        Ok(out)
    }

    /// The run starting at `voff` (at most `max` bytes): what serves it and
    /// how long it is, merging clusters that one operation can serve.
    pub(super) fn run(&self, m: &Meta, voff: u64, max: u64) -> io::Result<(Run, u64)> {
        let cs = self.cluster_size();
        let first = cs - (voff & (cs - 1));
        let (c, no_table) = self.lookup(m, voff)?;
        if no_table {
            // The whole L1 entry's range is unallocated.
            let span = 1u64 << (2 * self.header.cluster_bits - 3);
            return Ok((Run::Backing, (span - (voff & (span - 1))).min(max)));
        }
        let mut len = first.min(max);
        let run = match c {
            Cluster::Compressed { host, len: clen } => {
                return Ok((Run::Compressed { host, len: clen, at: voff & (cs - 1) }, len))
            }
            Cluster::Data { host } => Run::Data(host + (voff & (cs - 1))),
            Cluster::Unallocated => Run::Backing,
            Cluster::Zero { .. } => Run::Zero,
        };
        // Extend over following clusters of the same kind (contiguous on disk for data).
        while len < max {
            let next = voff + len;
            let (c, no_table) = self.lookup(m, next)?;
            let same = match (&run, c) {
                (Run::Data(h), Cluster::Data { host }) => !no_table && host == h + len,
                (Run::Backing, Cluster::Unallocated) => true,
                (Run::Zero, Cluster::Zero { .. }) => !no_table,
                _ => false,
            };
            if !same {
                break;
            }
            let step = if no_table {
                let span = 1u64 << (2 * self.header.cluster_bits - 3);
                span - (next & (span - 1))
            } else {
                cs
            };
            len = (len + step).min(max);
        }
        Ok((run, len))
    }
}

impl Layer for Image {
    fn size(&self) -> u64 {
        self.header.size
    }

    fn read(&self, offset: u64, buf: &mut [u8], at: usize, holes: &mut Holes) -> io::Result<()> {
        self.read_in(&self.meta(), offset, buf, at, holes)
    }

    fn map(&self, offset: u64, len: u64, out: &mut ExtentList) -> io::Result<u64> {
        self.map_in(&self.meta(), offset, len, out)
    }

    fn backing(&self) -> Option<&dyn Layer> {
        self.backing.as_deref()
    }

    fn describe(&self) -> String {
        let h = &self.header;
        let direct = if self.direct.is_some() { ", O_DIRECT" } else { "" };
        format!(
            "qcow2 v{} {} ({} KiB clusters{direct})",
            h.version,
            self.path.display(),
            h.cluster_size() >> 10
        )
    }
}

impl Image {
    /// [`Layer::read`] with the metadata already locked.
    pub(super) fn read_in(
        &self,
        m: &Meta,
        offset: u64,
        buf: &mut [u8],
        at: usize,
        holes: &mut Holes,
    ) -> io::Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let voff = offset + pos as u64;
            let (run, n) = self.run(m, voff, (buf.len() - pos) as u64)?;
            let n = n as usize;
            let piece = &mut buf[pos..pos + n];
            match run {
                Run::Data(host) => {
                    let got = self.data_read(host, piece)?;
                    // A data cluster that ends past the end of the file (the
                    // file was never extended over its unwritten tail) reads
                    // as zeroes there, as in qemu.
                    piece[got..].fill(0);
                }
                Run::Compressed { host, len, at: inside } => {
                    let data = self.decompress(host, len)?;
                    piece.copy_from_slice(&data[inside as usize..inside as usize + n]);
                }
                Run::Backing => match &self.backing {
                    Some(b) => read_clamped(b.as_ref(), voff, piece, at + pos, holes)?,
                    None => {
                        piece.fill(0);
                        holes.push(at + pos..at + pos + n);
                    }
                },
                Run::Zero => {
                    piece.fill(0);
                    holes.push(at + pos..at + pos + n);
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn map_in(&self, m: &Meta, offset: u64, len: u64, out: &mut ExtentList) -> io::Result<u64> {
        let cs = self.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        let mut scanned = 0;
        while pos < end && !out.full() && scanned < MAX_SCAN_CLUSTERS {
            let (c, no_table) = self.lookup(m, pos)?;
            let n = if no_table {
                let span = 1u64 << (2 * self.header.cluster_bits - 3);
                span - (pos & (span - 1))
            } else {
                cs - (pos & (cs - 1))
            }
            .min(end - pos);
            scanned += 1;
            match c {
                Cluster::Data { .. } | Cluster::Compressed { .. } => out.push(n, false, false),
                Cluster::Zero { host: None } => out.push(n, true, true),
                Cluster::Zero { host: Some(_) } => out.push(n, false, true),
                Cluster::Unallocated => {
                    if let Some(b) = &self.backing {
                        let done = map_clamped(b.as_ref(), pos, n, out)?;
                        if done < n {
                            return Ok(pos + done - offset);
                        }
                    } else {
                        out.push(n, true, true);
                    }
                }
            }
            pos += n;
        }
        Ok(pos - offset)
    }
}
