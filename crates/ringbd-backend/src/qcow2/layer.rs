//! One image of a backing chain: the trait a qcow2 image and a raw backing
//! file share, the bytes they are read from, and the extent list both fill.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use ringbd_io::fs::{seek_data, seek_hole};

use crate::{Extent, Holes, MAX_EXTENTS};

/// Where an image's bytes come from: its file, or memory (tests, fuzzing).
pub trait Storage: Send + Sync {
    /// Reads from `offset` into `buf`; fewer bytes only at the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes all of `buf` at `offset` (a writable image's file only).
    fn write_at(&self, _offset: u64, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::ReadOnlyFilesystem))
    }
    /// Makes what was written durable.
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

impl Storage for File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}

impl Storage for Vec<u8> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

/// An image file held in memory that can be written (fuzzing the write
/// path); it grows on writes past its end, up to `limit` bytes.
pub struct MemFile {
    pub bytes: std::sync::Mutex<Vec<u8>>,
    pub limit: u64,
}

impl Storage for MemFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner()).read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.limit);
        let Some(end) = end else { return Err(io::Error::from_raw_os_error(libc::EFBIG)) };
        let mut b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        if (b.len() as u64) < end {
            b.resize(end as usize, 0);
        }
        b[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
}

/// A shared store (the fuzz target keeps its in-memory file to read it back).
impl<T: Storage + ?Sized> Storage for std::sync::Arc<T> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        (**self).write_at(offset, buf)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
}

/// One image of the chain, as the image above it sees it.
pub trait Layer: Send + Sync {
    /// The virtual size.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset` (inside [`Layer::size`]); the ranges it
    /// zero-filled because nothing is stored there go to `holes`, shifted
    /// by `at` (where `buf` starts in the caller's buffer).
    fn read(&self, offset: u64, buf: &mut [u8], at: usize, holes: &mut Holes) -> io::Result<()>;
    /// Appends the status of `[offset, offset+len)` (inside the size) to
    /// `out`; returns how many bytes it covered, less than `len` only when
    /// `out` is full or the scan reached its bound.
    fn map(&self, offset: u64, len: u64, out: &mut ExtentList) -> io::Result<u64>;
    /// The image and its format, for messages.
    fn describe(&self) -> String;
    /// The next image down the chain.
    fn backing(&self) -> Option<&dyn Layer> {
        None
    }
}

/// Reads `buf` at `offset` from `layer`, past its end as zeroes (a backing
/// file shorter than the image above it).
pub fn read_clamped(
    layer: &dyn Layer,
    offset: u64,
    buf: &mut [u8],
    at: usize,
    holes: &mut Holes,
) -> io::Result<()> {
    let inside = layer.size().saturating_sub(offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(inside);
    if !head.is_empty() {
        layer.read(offset, head, at, holes)?;
    }
    if !tail.is_empty() {
        tail.fill(0);
        holes.push(at + inside..at + buf.len());
    }
    Ok(())
}

/// [`Layer::map`] with the part past the layer's end reported as a hole.
pub fn map_clamped(layer: &dyn Layer, offset: u64, len: u64, out: &mut ExtentList) -> io::Result<u64> {
    let inside = layer.size().saturating_sub(offset).min(len);
    if inside > 0 {
        let done = layer.map(offset, inside, out)?;
        if done < inside {
            return Ok(done);
        }
    }
    if len > inside {
        out.push(len - inside, true, true);
    }
    Ok(len)
}

/// Extents in order, adjacent ones of the same kind merged, at most
/// [`MAX_EXTENTS`].
#[derive(Debug, Default)]
pub struct ExtentList(pub Vec<Extent>);

impl ExtentList {
    pub fn push(&mut self, len: u64, hole: bool, zero: bool) {
        if len == 0 {
            return;
        }
        match self.0.last_mut() {
            Some(l) if l.hole == hole && l.zero == zero => l.len += len,
            _ => self.0.push(Extent { len, hole, zero }),
        }
    }

    /// No room for another extent of a new kind.
    pub fn full(&self) -> bool {
        self.0.len() >= MAX_EXTENTS
    }
}

/// A raw backing file: its bytes are the disk; holes are where the
/// filesystem stores nothing (`SEEK_HOLE`), as qemu reports them.
pub struct RawLayer {
    pub file: File,
    pub path: PathBuf,
    pub len: u64,
}

impl Layer for RawLayer {
    fn size(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, buf: &mut [u8], at: usize, holes: &mut Holes) -> io::Result<()> {
        let n = Storage::read_at(&self.file, offset, buf)?;
        // The file shrank under us: what is gone reads as zeroes.
        buf[n..].fill(0);
        if n < buf.len() {
            holes.push(at + n..at + buf.len());
        }
        Ok(())
    }

    fn map(&self, offset: u64, len: u64, out: &mut ExtentList) -> io::Result<u64> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end && !out.full() {
            let data = seek_data(&self.file, pos)?.unwrap_or(end).min(end);
            if data > pos {
                out.push(data - pos, true, true);
                pos = data;
                continue;
            }
            let hole = seek_hole(&self.file, pos)?.min(end);
            if hole <= pos {
                // Changed under us: call the rest data.
                out.push(end - pos, false, false);
                return Ok(len);
            }
            out.push(hole - pos, false, false);
            pos = hole;
        }
        Ok(pos - offset)
    }

    fn describe(&self) -> String {
        format!("raw {}", self.path.display())
    }
}
