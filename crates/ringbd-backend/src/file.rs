//! File and block-device backend (positional reads and writes).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use ringbd_io::buf::{IoBuf, ALIGN};
use ringbd_io::fs::{
    block_device_size, fadvise_willneed, fallocate, fallocate_unsupported, seek_data, seek_hole, Fallocate,
};

use crate::{Backend, Caps, Error, ErrorKind, Extent, Holes, Op, Result, ZeroFlags, MAX_EXTENTS};

/// Largest buffer of zeroes written when the filesystem cannot zero a
/// range by itself.
const ZERO_CHUNK: usize = 1 << 20;

pub struct FileBackend {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
    read_only: bool,
    /// On tmpfs/ramfs: nothing ever waits for a device.
    memory_fs: bool,
    /// `file:PATH,direct`: a second descriptor opened `O_DIRECT`, used for
    /// every read and write whose offset and length are aligned; the rest go
    /// through `file` and the page cache (the kernel keeps the two coherent).
    direct: Option<Direct>,
}

struct Direct {
    file: File,
    /// Offset, length and buffer alignment `O_DIRECT` needs here.
    align: u32,
}

/// Where a file export's aligned I/O can bypass the page cache.
#[derive(Debug, Clone, Copy)]
pub struct DirectIo<'a> {
    pub fd: std::os::fd::BorrowedFd<'a>,
    /// Offsets, lengths and buffer addresses must be multiples of this.
    pub align: u32,
}

impl DirectIo<'_> {
    /// Whether `[offset, offset+len)` may go through the `O_DIRECT` descriptor.
    pub fn fits(&self, offset: u64, len: u64) -> bool {
        let a = u64::from(self.align);
        len > 0 && offset.is_multiple_of(a) && len.is_multiple_of(a) && len <= usize::MAX as u64
    }
}

impl FileBackend {
    /// Opens a regular file or block device. `read_only` opens it O_RDONLY;
    /// `direct` also opens it `O_DIRECT` for aligned reads and writes.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self> {
        let ctx = |e: io::Error| {
            let msg = format!("{}: {e}", path.display());
            Error {
                kind: ErrorKind::of(&e),
                op: Op::Open,
                offset: 0,
                len: 0,
                source: io::Error::new(e.kind(), msg),
            }
        };
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(ctx)?;
        let ft = file.metadata().map_err(ctx)?.file_type();
        let (size, block_device) = if ft.is_block_device() {
            (block_device_size(&file).map_err(ctx)?, true)
        } else if ft.is_file() {
            (file.metadata().map_err(ctx)?.len(), false)
        } else {
            return Err(ctx(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            )));
        };
        let memory_fs = ringbd_io::fs::is_memory_fs(&file).unwrap_or(false);
        let direct = if direct { Some(Direct::open(path, read_only).map_err(ctx)?) } else { None };
        Ok(FileBackend { file, path: path.to_owned(), size, block_device, read_only, memory_fs, direct })
    }

    /// The `O_DIRECT` descriptor and its alignment, for `file:PATH,direct`.
    pub fn direct_io(&self) -> Option<DirectIo<'_>> {
        self.direct.as_ref().map(|d| DirectIo { fd: d.file.as_fd(), align: d.align })
    }

    /// Reads through the `O_DIRECT` descriptor via an aligned bounce
    /// buffer; `false` when the range is not aligned for it.
    fn read_direct(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        let Some(d) = self.direct.as_ref().filter(|d| d.fits(offset, buf.len())) else { return Ok(false) };
        let mut bounce = IoBuf::with_capacity(buf.len());
        bounce.set_len(buf.len());
        d.file.read_exact_at(&mut bounce, offset)?;
        buf.copy_from_slice(&bounce);
        Ok(true)
    }

    /// Writes through the `O_DIRECT` descriptor; `false` when not aligned.
    fn write_direct(&self, offset: u64, data: &[u8]) -> io::Result<bool> {
        let Some(d) = self.direct.as_ref().filter(|d| d.fits(offset, data.len())) else { return Ok(false) };
        d.file.write_all_at(&IoBuf::from_slice(data), offset)?;
        Ok(true)
    }

    fn sync(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::new(op, offset, len, e))
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file
                .write_all_at(&zeroes[..n], offset + done)
                .map_err(|e| Error::new(Op::WriteZeroes, offset, len, e))?;
            done += n as u64;
        }
        Ok(())
    }
}

impl Direct {
    fn fits(&self, offset: u64, len: usize) -> bool {
        DirectIo { fd: self.file.as_fd(), align: self.align }.fits(offset, len as u64)
    }

    fn open(path: &Path, read_only: bool) -> io::Result<Direct> {
        let no_direct = || {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "the filesystem does not support O_DIRECT (drop \",direct\" to use the page cache)",
            )
        };
        let file = ringbd_io::fs::open_direct(path, read_only).map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) {
                no_direct()
            } else {
                e
            }
        })?;
        let align = match ringbd_io::fs::direct_alignment(&file) {
            Ok(Some(a)) if a.mem == 0 && a.offset == 0 => return Err(no_direct()),
            Ok(Some(a)) => a.mem.max(a.offset).max(1),
            // The kernel does not say: a page satisfies any device whose
            // logical block size is at most a page.
            Ok(None) | Err(_) => ALIGN as u32,
        };
        if align as usize > ALIGN || !align.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("O_DIRECT here needs {align}-byte alignment; ringbd supports at most {ALIGN}"),
            ));
        }
        Ok(Direct { file, align })
    }
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: self.read_only,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            extents: !self.block_device,
        }
    }

    fn describe(&self) -> String {
        let kind = if self.block_device { "block device" } else { "file" };
        format!("{kind} {}", self.path.display())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Holes> {
        let r = match self.read_direct(offset, buf) {
            Ok(true) => Ok(()),
            Ok(false) => self.file.read_exact_at(buf, offset),
            Err(e) => Err(e),
        };
        r.map_err(|e| {
            let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(io::ErrorKind::UnexpectedEof, "file is shorter than the export (truncated?)")
            } else {
                e
            };
            Error::new(Op::Read, offset, buf.len() as u64, e)
        })?;
        Ok(Holes::default())
    }

    fn file_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        // On a memory filesystem a plain pread/pwrite never blocks, and the
        // ring would only punt it to a worker thread: run it inline.
        (!self.memory_fs || self.direct.is_some()).then(|| self.file.as_fd())
    }

    fn backing_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    fn direct_io(&self) -> Option<DirectIo<'_>> {
        FileBackend::direct_io(self)
    }

    fn zero_mode(&self, no_hole: bool) -> Option<Fallocate> {
        // The first mode write_zeroes tries (see there).
        Some(if !no_hole && !self.block_device { Fallocate::PunchHole } else { Fallocate::ZeroRange })
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let len = data.len() as u64;
        let r = match self.write_direct(offset, data) {
            Ok(true) => Ok(()),
            Ok(false) => self.file.write_all_at(data, offset),
            Err(e) => Err(e),
        };
        r.map_err(|e| Error::new(Op::Write, offset, len, e))?;
        if fua {
            self.sync(Op::Write, offset, len)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.sync(Op::Flush, 0, 0)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        match fallocate(&self.file, Fallocate::PunchHole, offset, len) {
            Ok(()) => {}
            // Trim is a hint: where holes cannot be punched, nothing is lost.
            Err(e) if fallocate_unsupported(&e) => return Ok(()),
            Err(e) => return Err(Error::new(Op::Trim, offset, len, e)),
        }
        if fua {
            self.sync(Op::Trim, offset, len)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let mut tries = Vec::with_capacity(2);
        if !flags.no_hole && !self.block_device {
            tries.push(Fallocate::PunchHole);
        }
        tries.push(Fallocate::ZeroRange);
        let mut done = false;
        for mode in tries {
            match fallocate(&self.file, mode, offset, len) {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(e) if fallocate_unsupported(&e) => continue,
                Err(e) => return Err(Error::new(Op::WriteZeroes, offset, len, e)),
            }
        }
        if !done {
            if flags.fast {
                return Err(Error::other(
                    ErrorKind::Unsupported,
                    Op::WriteZeroes,
                    offset,
                    len,
                    "the filesystem cannot zero ranges quickly",
                ));
            }
            self.write_zero_buffers(offset, len)?;
        }
        if flags.fua {
            self.sync(Op::WriteZeroes, offset, len)?;
        }
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        fadvise_willneed(&self.file, offset, len).map_err(|e| Error::new(Op::Cache, offset, len, e))
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len.max(1)).min(self.size);
        if self.block_device || offset >= end {
            return Ok(vec![Extent { len: len.max(1), hole: false, zero: false }]);
        }
        let err = |e| Error::new(Op::Extents, offset, len, e);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_EXTENTS {
            let data = seek_data(&self.file, pos).map_err(err)?.unwrap_or(end).min(end);
            if data > pos {
                out.push(Extent { len: data - pos, hole: true, zero: true });
                pos = data;
                continue;
            }
            let hole = seek_hole(&self.file, pos).map_err(err)?.min(end);
            if hole <= pos {
                // The file changed under us; report the rest as data.
                out.push(Extent { len: end - pos, hole: false, zero: false });
                break;
            }
            out.push(Extent { len: hole - pos, hole: false, zero: false });
            pos = hole;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(size: u64) -> (PathBuf, FileBackend) {
        let dir = std::env::temp_dir().join(format!("ringbd-file-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{:?}", std::thread::current().id()).replace(['(', ')'], ""));
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let b = FileBackend::open(&path, false, false).unwrap();
        (path, b)
    }

    #[test]
    fn round_trip_with_fua_and_flush() {
        let (path, b) = temp_file(1 << 20);
        b.write(4096, b"hello", true).unwrap();
        b.flush().unwrap();
        let mut buf = [0u8; 5];
        b.read(4096, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn zeroes_and_trim_read_back_zero() {
        let (path, b) = temp_file(1 << 20);
        b.write(0, &vec![7u8; 1 << 20], false).unwrap();
        b.write_zeroes(4096, 8192, ZeroFlags { no_hole: true, ..Default::default() }).unwrap();
        b.write_zeroes(65536, 65536, ZeroFlags::default()).unwrap();
        b.trim(1 << 19, 1 << 18, false).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        b.read(0, &mut buf).unwrap();
        assert!(buf[4096..12288].iter().all(|&x| x == 0));
        assert!(buf[65536..131072].iter().all(|&x| x == 0));
        assert!(buf[..4096].iter().all(|&x| x == 7));
        assert!(buf[12288..65536].iter().all(|&x| x == 7));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn extents_cover_the_request_and_find_written_data() {
        let (path, b) = temp_file(4 << 20);
        b.write(1 << 20, &vec![1u8; 1 << 20], false).unwrap();
        let e = b.extents(0, 4 << 20).unwrap();
        let total: u64 = e.iter().map(|x| x.len).sum();
        assert_eq!(total, 4 << 20);
        let mut pos = 0;
        for x in &e {
            if (pos..pos + x.len).contains(&(1 << 20)) {
                assert!(!x.hole, "written byte reported as hole: {e:?}");
            }
            pos += x.len;
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn direct_mode_round_trips_aligned_and_unaligned_io() {
        let (path, _) = temp_file(1 << 20);
        let b = FileBackend::open(&path, false, true).unwrap();
        let d = b.direct_io().expect("O_DIRECT on the temp dir's filesystem");
        assert!(d.align.is_power_of_two() && d.align as usize <= ALIGN);
        assert!(d.fits(8192, 4096) && !d.fits(8193, 4096) && !d.fits(0, 100));
        b.write(8192, &[5u8; 4096], true).unwrap(); // aligned: O_DIRECT
        b.write(8192 + 10, b"abc", false).unwrap(); // unaligned: page cache
        let mut buf = vec![0u8; 4096];
        b.read(8192, &mut buf).unwrap(); // aligned read sees the buffered write
        assert_eq!(&buf[10..13], b"abc");
        assert!(buf[..10].iter().chain(&buf[13..]).all(|&x| x == 5));
        let mut small = [0u8; 3];
        b.read(8192 + 10, &mut small).unwrap();
        assert_eq!(&small, b"abc");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn opening_a_directory_or_missing_file_is_a_clear_error() {
        let e = FileBackend::open(Path::new("/"), true, false).err().expect("directory must fail");
        assert!(e.to_string().contains("not a regular file or block device"), "{e}");
        let e = FileBackend::open(Path::new("/nonexistent/x"), true, false).err().expect("missing must fail");
        assert!(e.to_string().contains("/nonexistent/x"), "{e}");
    }

    #[test]
    fn read_past_a_truncated_file_is_an_error_not_garbage() {
        let (path, b) = temp_file(1 << 16);
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(100).unwrap();
        let mut buf = [0u8; 512];
        let e = b.read(0, &mut buf).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Io);
        std::fs::remove_file(path).unwrap();
    }
}
