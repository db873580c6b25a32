//! qcow2 images (`qcow2:PATH[,direct]`), read-write (tracker issue 20).
//!
//! - [`header`]: the header and its extensions, parsed from bytes, every
//!   field checked; images ringbd cannot serve safely are refused here.
//! - [`table`]: L1 and L2 entries (standard entries; extended L2 is refused).
//! - `image`: one qcow2 image: the L1 table (read and checked at open), L2
//!   tables (read on demand, 32 MiB cached per image), clusters (data,
//!   zero, compressed with raw deflate, unallocated: the backing file's).
//! - `layer`: what a qcow2 image and a raw backing file share, so a chain
//!   (`top -> qcow2 -> ... -> raw`) reads through one trait.
//! - `write`: writing the top image (allocation, copy-on-write, zeroes,
//!   discards, the ordered flush); `refcount`: refcounts and allocation;
//!   `repair`: rebuilding the refcounts of an image left dirty.
//!
//! Why not the `qcow2-rs` crate (0.1.6, rublk's): its API is `async` over
//! its own I/O trait, and its device is neither `Send` nor `Sync` (its tables
//! sit in `RefCell`s, its recursion is `async_recursion(?Send)`), while a
//! `Backend` is called from many engine threads at once; it resolves a
//! relative backing name against the working directory, not the image's
//! directory as qemu does, and opens only qcow2 backing files; and it
//! indexes the header buffer and unwraps on paths a bad image reaches
//! (`Qcow2IoSync::new` panics when the file cannot be opened). Writing the
//! format here lets every error name the file and the field, and the flush
//! order is ours to state and test (`write.rs`).
//!
//! Data cluster I/O: where the image's file can make a reader wait (not on
//! a memory filesystem, or with `,direct`), the export is asynchronous
//! ([`Backend::aio`]): the io_uring engine's workers and ublk queues each
//! get a driver (`ring`) that maps a request under the metadata read lock
//! and runs its data cluster reads and overwrites on a ring of the
//! caller's thread. Everything else, and the threaded engine, call the
//! [`Backend`] methods: `pread`/`pwrite` on the image file (`,direct`: an
//! `O_DIRECT` descriptor for aligned data), as a file export on a memory
//! filesystem is read inline.
//!
//! ringbd takes qemu's image locks on every file of the chain
//! (`lock_image`).

pub mod header;
mod image;
mod layer;
mod refcount;
mod repair;
mod ring;
pub mod table;
#[cfg(test)]
mod tests;
mod write;
#[cfg(test)]
mod write_tests;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use self::header::{Header, HeaderError};
use self::image::Image;
use self::layer::{ExtentList, Layer, MemFile, RawLayer, Storage};
use self::write::Clear;
use crate::aio::{CompletionQueue, LocalIo, Sink};
use crate::{
    AsyncIo, Backend, BlockOp, Caps, Error, ErrorKind, Extent, Holes, Op, Piece, Result, ZeroFlags,
    MAX_EXTENTS,
};

/// Longest backing chain ringbd opens below the top image (its own bound,
/// against loops through symlinks and absurd chains).
pub const MAX_CHAIN_DEPTH: usize = 40;

/// A qcow2 image and its backing chain (the backing files read-only).
pub struct Qcow2Backend {
    export: Arc<Export>,
}

/// What [`Qcow2Backend`] serves, shared with the ring drivers (`ring`):
/// the last of them to go closes the image.
pub(super) struct Export {
    top: Image,
    read_only: bool,
    description: String,
    /// Data cluster I/O runs on the callers' rings ([`Backend::aio`]).
    ring: bool,
    /// Tests: closed as a killed process closes it (no final flush).
    #[cfg(test)]
    abandoned: std::sync::atomic::AtomicBool,
}

fn open_error(kind: ErrorKind, path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::other(kind, Op::Open, 0, 0, &format!("{}: {msg}", path.display()))
}

fn io_open_error(path: &Path, e: io::Error) -> Error {
    let kind = if e.kind() == io::ErrorKind::InvalidData { ErrorKind::Invalid } else { ErrorKind::of(&e) };
    // Messages from the image code already start with the path.
    let msg = e.to_string();
    let prefix = format!("{}: ", path.display());
    let msg = if msg.starts_with(&prefix) { msg } else { format!("{prefix}{msg}") };
    Error { kind, op: Op::Open, offset: 0, len: 0, source: io::Error::new(e.kind(), msg) }
}

fn header_error(path: &Path, e: HeaderError) -> Error {
    let kind = if e.unsupported { ErrorKind::Unsupported } else { ErrorKind::Invalid };
    open_error(kind, path, e)
}

/// qemu's image locks (`block/file-posix.c`): byte 100 + i is locked
/// (shared) by every open that holds permission bit i, byte 200 + i by every
/// open that does not let others hold it. Bits: 0 consistent read, 1 write,
/// 2 write-unchanged, 3 resize.
const LOCK_PERM_BASE: u64 = 100;
const LOCK_SHARED_BASE: u64 = 200;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// Takes qemu's locks on an image file ringbd opens, as qemu would for the
/// same use: reading it needs consistent reads and lets no one else write;
/// writing (the top image of a read-write export) also holds write,
/// write-unchanged and resize. Refuses (naming the permission) a file whose
/// locks say another process (qemu, or another ringbd) uses it in a way
/// that conflicts: a qemu writing an image ringbd reads, or reading one
/// ringbd writes, without `-U`/`force-share`.
fn lock_image(file: &File, path: &Path, write: bool) -> Result<()> {
    let held: &[u64] = if write { &[0, 1, 2, 3] } else { &[0] };
    let unshared: &[u64] = if write { &[1, 3] } else { &[1] };
    let e = |err: io::Error| io_open_error(path, err);
    for &bit in held {
        ringbd_io::fs::ofd_share_lock(file, LOCK_PERM_BASE + bit).map_err(e)?;
    }
    for &bit in unshared {
        ringbd_io::fs::ofd_share_lock(file, LOCK_SHARED_BASE + bit).map_err(e)?;
    }
    let conflict = |what: String| {
        let msg = format!(
            "the image is locked: {what} (qemu's image locks; is another process using it? \
             ringbd and qemu must not write an image another one opened)"
        );
        Err(open_error(ErrorKind::Permission, path, msg))
    };
    for &bit in held {
        if ringbd_io::fs::ofd_locked_by_other(file, LOCK_SHARED_BASE + bit).map_err(e)? {
            return conflict(format!(
                "another process does not share the \"{}\" permission",
                PERM_NAMES[bit as usize]
            ));
        }
    }
    for &bit in unshared {
        if ringbd_io::fs::ofd_locked_by_other(file, LOCK_PERM_BASE + bit).map_err(e)? {
            return conflict(format!(
                "another process holds the \"{}\" permission",
                PERM_NAMES[bit as usize]
            ));
        }
    }
    Ok(())
}

/// The image opened again with `O_DIRECT`, with the alignment the kernel
/// reports for it (`statx`), or a clear refusal where it has none.
fn open_direct(path: &Path, file: &File, write: bool) -> Result<image::Direct> {
    let align = ringbd_io::fs::direct_alignment(file).map_err(|e| io_open_error(path, e))?;
    let (mem, offset) = match align {
        Some(a) if a.mem == 0 || a.offset == 0 => {
            let msg = "direct: this filesystem does not support O_DIRECT (statx reports no alignment)";
            return Err(open_error(ErrorKind::Unsupported, path, msg));
        }
        Some(a) => (u64::from(a.mem), u64::from(a.offset)),
        // Older kernels do not say: the logical block size of most disks.
        None => (4096, 4096),
    };
    let file = ringbd_io::fs::open_direct(path, !write).map_err(|e| io_open_error(path, e))?;
    Ok(image::Direct { file: Arc::new(file), align: offset, mem, ops: std::sync::atomic::AtomicU64::new(0) })
}

/// Parses and checks a qcow2 header from an image's first bytes (the
/// fuzz target's entry point; [`Header::parse`]).
pub fn parse_header(bytes: &[u8]) -> std::result::Result<Header, HeaderError> {
    Header::parse(bytes)
}

/// The first bytes of a file, enough for any header (the first cluster).
fn read_head(src: &dyn Storage) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 1 << header::MAX_CLUSTER_BITS];
    let n = src.read_at(0, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Opens one qcow2 image (`depth` below the top) and, recursively, its backing chain.
fn open_image(
    path: &Path,
    depth: usize,
    chain: &mut Vec<PathBuf>,
    write: bool,
    direct: bool,
) -> Result<Image> {
    let file = OpenOptions::new().read(true).write(write).open(path).map_err(|e| io_open_error(path, e))?;
    let meta = file.metadata().map_err(|e| io_open_error(path, e))?;
    if !meta.is_file() {
        return Err(open_error(ErrorKind::Invalid, path, "not a regular file"));
    }
    let file_len = meta.len();
    lock_image(&file, path, write)?;
    let head = read_head(&file).map_err(|e| io_open_error(path, e))?;
    let header = Header::parse(&head).map_err(|e| header_error(path, e))?;
    header.check_layout(file_len).map_err(|e| header_error(path, e))?;
    if write && header.nb_snapshots > 0 {
        let msg = format!(
            "the image has {} internal snapshots, whose clusters it shares; ringbd writes only images \
             without snapshots (serve it with --read-only, or `qemu-img snapshot -d` them)",
            header.nb_snapshots
        );
        return Err(open_error(ErrorKind::Unsupported, path, msg));
    }
    let direct_file = if direct { Some(open_direct(path, &file, write)?) } else { None };
    let file = Arc::new(file);
    let mut image =
        Image::open(path, header, Box::new(file.clone()), file_len).map_err(|e| io_open_error(path, e))?;
    image.direct = direct_file;
    image.ring_file = Some(file);
    if let Some(name) = image.header.backing_file.clone() {
        let format = image.header.backing_format.clone();
        image.backing = Some(open_backing(path, &name, format.as_deref(), depth + 1, chain)?);
    }
    if write {
        if image.repair_if_dirty().map_err(|e| io_open_error(path, e))? {
            tracing::warn!(
                image = %path.display(),
                "qcow2: the image was not closed cleanly (dirty bit); its refcounts were rebuilt"
            );
        }
        image.enable_writes().map_err(|e| io_open_error(path, e))?;
    }
    Ok(image)
}

/// Where qemu looks for backing file `name` of the image at `image`: an
/// absolute name as it is, a relative one in the image's directory.
pub fn resolve_backing(image: &Path, name: &str) -> std::result::Result<PathBuf, String> {
    let slash = name.find('/').unwrap_or(name.len());
    if name[..slash].contains(':') {
        return Err(format!(
            "backing file {name:?} names a protocol (qemu's `PROTOCOL:...` or json: syntax); \
             ringbd opens local files only (for a file of that name, write ./{name})"
        ));
    }
    let name = Path::new(name);
    if name.is_absolute() {
        return Ok(name.to_owned());
    }
    Ok(match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => name.to_owned(),
    })
}

fn open_backing(
    image: &Path,
    name: &str,
    format: Option<&str>,
    depth: usize,
    chain: &mut Vec<PathBuf>,
) -> Result<Box<dyn Layer>> {
    let within = |e: Error| {
        let msg = format!("{}: backing file {name:?}: {}", image.display(), e.source);
        Error { kind: e.kind, op: Op::Open, offset: 0, len: 0, source: io::Error::new(e.source.kind(), msg) }
    };
    let path = resolve_backing(image, name).map_err(|m| open_error(ErrorKind::Unsupported, image, m))?;
    if depth > MAX_CHAIN_DEPTH {
        let msg = format!("the backing chain is deeper than {MAX_CHAIN_DEPTH} images (at {name:?})");
        return Err(open_error(ErrorKind::Invalid, image, msg));
    }
    let canonical = std::fs::canonicalize(&path).map_err(|e| within(io_open_error(&path, e)))?;
    if chain.contains(&canonical) {
        let msg = format!("backing file {name:?} ({}) is already in the chain: a loop", canonical.display());
        return Err(open_error(ErrorKind::Invalid, image, msg));
    }
    chain.push(canonical);
    let format = match format {
        Some(f) => f.to_owned(),
        None => probe_format(&path).map_err(within)?,
    };
    Ok(match format.as_str() {
        "qcow2" => Box::new(open_image(&path, depth, chain, false, false).map_err(within)?),
        _ => {
            let file =
                OpenOptions::new().read(true).open(&path).map_err(|e| within(io_open_error(&path, e)))?;
            let len = file.metadata().map_err(|e| within(io_open_error(&path, e)))?.len();
            lock_image(&file, &path, false).map_err(within)?;
            Box::new(RawLayer { file, path, len })
        }
    })
}

/// A backing file without a format extension: qcow2 by its magic, else raw (as qemu probes).
fn probe_format(path: &Path) -> Result<String> {
    let file = File::open(path).map_err(|e| io_open_error(path, e))?;
    let mut magic = [0u8; 4];
    let n = Storage::read_at(&file, 0, &mut magic).map_err(|e| io_open_error(path, e))?;
    Ok(if n == 4 && u32::from_be_bytes(magic) == header::MAGIC { "qcow2" } else { "raw" }.to_owned())
}

impl Qcow2Backend {
    /// Opens the image at `path` (for writing unless `read_only`) and its
    /// backing chain (read-only).
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_with(path, read_only, false)
    }

    /// [`Qcow2Backend::open`]; `direct` (`qcow2:PATH,direct`) also opens
    /// the image with `O_DIRECT` for its aligned data cluster I/O.
    pub fn open_with(path: &Path, read_only: bool, direct: bool) -> Result<Self> {
        let mut chain = Vec::new();
        if let Ok(c) = std::fs::canonicalize(path) {
            chain.push(c);
        }
        let top = open_image(path, 0, &mut chain, !read_only, direct)?;
        // As for file exports: a file on a memory filesystem never makes a
        // reader wait, and a call costs less than a ring operation there.
        let ring = match &top.ring_file {
            Some(f) => direct || !ringbd_io::fs::is_memory_fs(&**f).map_err(|e| io_open_error(path, e))?,
            None => false,
        };
        let mut description = top.describe();
        let mut below = top.backing.as_deref();
        while let Some(layer) = below {
            description.push_str(", backing ");
            description.push_str(&layer.describe());
            below = layer.backing();
        }
        let export = Export {
            top,
            read_only,
            description,
            ring,
            #[cfg(test)]
            abandoned: Default::default(),
        };
        Ok(Qcow2Backend { export: Arc::new(export) })
    }

    /// The image's header.
    pub fn header(&self) -> &Header {
        &self.export.top.header
    }

    /// The top image (tests).
    #[cfg(test)]
    fn top(&self) -> &Image {
        &self.export.top
    }

    /// Closes the files without the final flush, as a killed process does.
    #[cfg(test)]
    fn abandon(self) {
        self.export.abandoned.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The export's calls; [`Qcow2Backend`] adds the asynchronous interface.
impl Backend for Qcow2Backend {
    fn size(&self) -> u64 {
        self.export.size()
    }
    fn caps(&self) -> Caps {
        self.export.caps()
    }
    fn describe(&self) -> String {
        self.export.describe()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Holes> {
        self.export.read(offset, buf)
    }
    /// A range that stores nothing is answered as one hole, without a
    /// buffer (and, on the asynchronous path, as a hole reply).
    fn read_shared(&self, offset: u64, len: usize, out: &mut Vec<Piece>) -> Result<bool> {
        let hole = self.export.top.all_hole(offset, len as u64);
        if hole.map_err(|e| Error::new(Op::Read, offset, len as u64, e))? {
            out.push(Piece::Zero(len));
            return Ok(true);
        }
        Ok(false)
    }
    fn aio(&self) -> Option<&dyn AsyncIo> {
        self.export.ring.then_some(self as &dyn AsyncIo)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.export.write(offset, data, fua)
    }
    fn flush(&self) -> Result<()> {
        self.export.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.export.trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.export.write_zeroes(offset, len, flags)
    }
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.export.cache(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.export.extents(offset, len)
    }
}

/// Without a driver (a caller that has no ring of its own): the calls, on
/// the submitting thread.
impl AsyncIo for Qcow2Backend {
    fn submit(&self, op: BlockOp, mut buf: ringbd_io::buf::IoBuf, sink: Sink) {
        let r = ring::call(&self.export, op, &mut buf).map_err(|e| ring::to_errno(&self.export, e));
        if let Err(e) = sink.deliver(r, buf) {
            tracing::warn!(image = %self.export.top.path.display(), "qcow2: waking the caller: {e}");
        }
    }

    fn submit_extents(&self, offset: u64, len: u64, sink: Sink) {
        let (r, buf) = ring::extents(&self.export, offset, len);
        if let Err(e) = sink.deliver(r, buf) {
            tracing::warn!(image = %self.export.top.path.display(), "qcow2: waking the caller: {e}");
        }
    }

    fn local(&self, queue: &Arc<CompletionQueue>) -> Option<Box<dyn LocalIo>> {
        match ring::Driver::new(self.export.clone(), queue) {
            Ok(d) => Some(Box::new(d)),
            Err(e) => {
                tracing::warn!(
                    image = %self.export.top.path.display(),
                    "qcow2: no ring for data I/O on this thread ({e}); its requests are calls"
                );
                None
            }
        }
    }
}

impl Backend for Export {
    fn size(&self) -> u64 {
        self.top.header.size
    }

    fn caps(&self) -> Caps {
        let rw = !self.read_only;
        Caps {
            read_only: self.read_only,
            flush: rw,
            fua: rw,
            trim: rw,
            write_zeroes: rw,
            fast_zero: rw,
            cache: false,
            multi_conn: true,
            extents: true,
        }
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Holes> {
        let mut holes = Holes::default();
        let len = buf.len() as u64;
        layer::read_clamped(&self.top, offset, buf, 0, &mut holes)
            .map_err(|e| Error::new(Op::Read, offset, len, e))?;
        Ok(holes)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let len = data.len() as u64;
        self.writable(Op::Write, offset, len)?;
        let e = |e| Error::new(Op::Write, offset, len, e);
        self.top.write(offset, data).map_err(e)?;
        if fua {
            self.top.flush().map_err(e)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.top.flush().map_err(|e| Error::new(Op::Flush, 0, 0, e))
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.writable(Op::Trim, offset, len)?;
        let e = |e| Error::new(Op::Trim, offset, len, e);
        self.top.clear(offset, len, Clear::Trim).map_err(e)?;
        if fua {
            self.top.flush().map_err(e)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.writable(Op::WriteZeroes, offset, len)?;
        if flags.fast && !self.top.zero_is_fast(offset, len) {
            let msg = "zeroing partial clusters (or on a version 2 image with a backing file) writes data";
            return Err(Error::other(ErrorKind::Unsupported, Op::WriteZeroes, offset, len, msg));
        }
        let e = |e| Error::new(Op::WriteZeroes, offset, len, e);
        self.top.clear(offset, len, Clear::Zero { keep: flags.no_hole }).map_err(e)?;
        if flags.fua {
            self.top.flush().map_err(e)?;
        }
        Ok(())
    }

    fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let size = self.size();
        if offset >= size {
            return Ok(vec![Extent { len: len.max(1), hole: true, zero: true }]);
        }
        let mut out = ExtentList::default();
        let len = len.max(1).min(size - offset);
        layer::map_clamped(&self.top, offset, len, &mut out)
            .map_err(|e| Error::new(Op::Extents, offset, len, e))?;
        out.0.truncate(MAX_EXTENTS);
        Ok(out.0)
    }
}

impl Export {
    fn writable(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::other(ErrorKind::Permission, op, offset, len, "the export is read-only"));
        }
        Ok(())
    }
}

impl Drop for Export {
    /// Writes what a flush would, and the last refcount changes, so that
    /// an image closed cleanly has no leaks.
    fn drop(&mut self) {
        #[cfg(test)]
        if self.abandoned.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.top.close() {
            tracing::error!(image = %self.top.path.display(), error = %e, "qcow2: closing the image failed");
        }
    }
}

/// Fuzzing: opens `bytes` as an image held in memory (a backing file it
/// names is not opened: unallocated clusters read as zeroes), maps it, and
/// reads the first 4 KiB of each of the first 64 extents, checking that
/// extents reported zero read as zeroes. Returns the bytes read, or why the
/// image was refused; any panic is a bug.
#[doc(hidden)]
pub fn fuzz_image(bytes: &[u8]) -> std::result::Result<usize, String> {
    let header = Header::parse(bytes).map_err(|e| e.to_string())?;
    header.check_layout(bytes.len() as u64).map_err(|e| e.to_string())?;
    let len = bytes.len() as u64;
    let image =
        Image::open(Path::new("fuzz"), header, Box::new(bytes.to_vec()), len).map_err(|e| e.to_string())?;
    let mut out = ExtentList::default();
    layer::map_clamped(&image, 0, image.size(), &mut out).map_err(|e| e.to_string())?;
    let mut read = 0;
    let mut buf = vec![0u8; 4096];
    let mut pos = 0u64;
    for e in out.0.iter().take(64) {
        let n = e.len.min(4096) as usize;
        let mut holes = Holes::default();
        layer::read_clamped(&image, pos, &mut buf[..n], 0, &mut holes).map_err(|e| e.to_string())?;
        assert!(!e.zero || buf[..n].iter().all(|&b| b == 0), "a zero extent at {pos} reads non-zero bytes");
        read += n;
        pos += e.len;
    }
    Ok(read)
}

/// Fuzzing the write path: opens `bytes` as a writable image in memory
/// (growing to at most 16 MiB), then writes, zeroes, discards and flushes
/// at offsets taken from the image's own size; then opens what that left
/// and reads it. Errors are expected on bad images; any panic is a bug.
/// Returns the size of the file afterwards.
#[doc(hidden)]
pub fn fuzz_write(bytes: &[u8]) -> std::result::Result<usize, String> {
    let header = Header::parse(bytes).map_err(|e| e.to_string())?;
    header.check_layout(bytes.len() as u64).map_err(|e| e.to_string())?;
    let len = bytes.len() as u64;
    let file = std::sync::Arc::new(MemFile { bytes: std::sync::Mutex::new(bytes.to_vec()), limit: 16 << 20 });
    let mut image =
        Image::open(Path::new("fuzz"), header, Box::new(file.clone()), len).map_err(|e| e.to_string())?;
    image.enable_writes().map_err(|e| e.to_string())?;
    let size = image.size();
    let cs = image.header.cluster_size();
    let data = vec![0x5au8; (3 * cs).min(1 << 20) as usize];
    for (i, at) in [0, size / 3, size / 2 + 7, size.saturating_sub(cs + 3)].into_iter().enumerate() {
        let n = (data.len() as u64).min(size.saturating_sub(at)) as usize;
        if n == 0 {
            continue;
        }
        let _ = image.write(at, &data[..n]);
        let how = match i {
            0 => Clear::Trim,
            1 => Clear::Zero { keep: true },
            _ => Clear::Zero { keep: false },
        };
        let clear = (n as u64 / 2).min(size - at - 1);
        if clear > 0 {
            let _ = image.clear(at + 1, clear, how);
        }
        let _ = image.flush();
    }
    let _ = image.close();
    drop(image);
    let after = file.bytes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let _ = fuzz_image(&after);
    Ok(after.len())
}
