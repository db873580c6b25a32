//! One qcow2 image of the chain: its header, its L1 table (read and checked
//! at open), its L2 tables (read on demand, cached) and its clusters.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::header::Header;
use super::layer::{map_clamped, read_clamped, ExtentList, Layer, Storage};
use super::table::{self, Cluster};
use crate::Holes;

/// Bytes of L2 tables kept in memory per image (at least one table): 32
/// MiB maps 256 GiB of a 64 KiB-cluster image. Tables are read-only here,
/// so eviction is just dropping the oldest.
const L2_CACHE_BYTES: u64 = 32 << 20;
/// Most clusters one block-status call walks, so that one request over a
/// huge image of 512-byte clusters stays short; the client asks again.
const MAX_SCAN_CLUSTERS: u64 = 1 << 18;

pub struct Image {
    pub path: PathBuf,
    pub header: Header,
    src: Box<dyn Storage>,
    file_len: u64,
    /// The L2 table offset of each L1 entry the virtual size uses.
    l1: Vec<Option<u64>>,
    l2_cache: Mutex<L2Cache>,
    /// The last decompressed cluster (descriptor, bytes): sequential reads
    /// of a compressed image decompress each cluster once.
    last_compressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    pub backing: Option<Box<dyn Layer>>,
}

struct L2Cache {
    tables: HashMap<u64, Arc<Vec<u64>>>,
    order: VecDeque<u64>,
    capacity: usize,
}

/// A contiguous piece of a read that one operation serves.
enum Run {
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

fn corrupt(path: &Path, msg: impl std::fmt::Display) -> io::Error {
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
            l1.push(l2);
        }
        let capacity = (L2_CACHE_BYTES / cluster).max(1) as usize;
        Ok(Image {
            path: path.to_owned(),
            header,
            src,
            file_len,
            l1,
            l2_cache: Mutex::new(L2Cache { tables: HashMap::new(), order: VecDeque::new(), capacity }),
            last_compressed: Mutex::new(None),
            backing: None,
        })
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// The L2 table at `offset`, from the cache or the file.
    fn l2_table(&self, offset: u64) -> io::Result<Arc<Vec<u64>>> {
        if let Some(t) = self.l2_cache.lock().unwrap_or_else(|p| p.into_inner()).tables.get(&offset) {
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
        let mut c = self.l2_cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.tables.insert(offset, t.clone()).is_none() {
            c.order.push_back(offset);
        }
        while c.order.len() > c.capacity {
            if let Some(old) = c.order.pop_front() {
                c.tables.remove(&old);
            }
        }
        Ok(t)
    }

    /// What the L2 entry says of the guest cluster holding `voff`, and
    /// whether a whole L1 entry's range is unallocated (no L2 table).
    fn lookup(&self, voff: u64) -> io::Result<(Cluster, bool)> {
        let cb = self.header.cluster_bits;
        let l1_index = (voff >> (2 * cb - 3)) as usize;
        let l2_index = ((voff >> cb) & (self.header.l2_entries() - 1)) as usize;
        let Some(Some(l2)) = self.l1.get(l1_index).copied() else { return Ok((Cluster::Unallocated, true)) };
        let entry = self.l2_table(l2)?.get(l2_index).copied().unwrap_or(0);
        let at = |e: String| {
            corrupt(&self.path, format!("L2 table 0x{l2:x} index {l2_index} (guest 0x{voff:x}): {e}"))
        };
        let c = table::l2_entry(entry, cb).map_err(|e| at(e.0))?;
        match c {
            Cluster::Data { host } | Cluster::Compressed { host, .. } if host >= self.file_len => Err(at(
                format!("cluster at 0x{host:x} is past the end of the file ({} bytes)", self.file_len),
            )),
            c => Ok((c, false)),
        }
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
    fn run(&self, voff: u64, max: u64) -> io::Result<(Run, u64)> {
        let cs = self.cluster_size();
        let first = cs - (voff & (cs - 1));
        let (c, no_table) = self.lookup(voff)?;
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
            let (c, no_table) = self.lookup(next)?;
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
        let mut pos = 0usize;
        while pos < buf.len() {
            let voff = offset + pos as u64;
            let (run, n) = self.run(voff, (buf.len() - pos) as u64)?;
            let n = n as usize;
            let piece = &mut buf[pos..pos + n];
            match run {
                Run::Data(host) => {
                    let got = self.src.read_at(host, piece)?;
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

    fn map(&self, offset: u64, len: u64, out: &mut ExtentList) -> io::Result<u64> {
        let cs = self.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        let mut scanned = 0;
        while pos < end && !out.full() && scanned < MAX_SCAN_CLUSTERS {
            let (c, no_table) = self.lookup(pos)?;
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

    fn backing(&self) -> Option<&dyn Layer> {
        self.backing.as_deref()
    }

    fn describe(&self) -> String {
        let h = &self.header;
        format!("qcow2 v{} {} ({} KiB clusters)", h.version, self.path.display(), h.cluster_size() >> 10)
    }
}
