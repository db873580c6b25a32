//! File and block-device syscalls the backends need beyond `std::fs`.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use crate::{cvt, cvt64};

/// `fallocate(2)` modes used by the file backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallocate {
    /// Deallocate the range; it reads back as zeroes. Size unchanged.
    PunchHole,
    /// Zero the range, keeping (or making) it allocated. Size unchanged.
    ZeroRange,
}

impl Fallocate {
    /// The `fallocate(2)` mode bits.
    pub fn bits(self) -> libc::c_int {
        match self {
            Fallocate::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            Fallocate::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        }
    }
}

/// Whether an fallocate failure means "this filesystem cannot do that".
pub fn fallocate_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV))
}

/// Calls `fallocate(2)` on `[offset, offset+len)`.
pub fn fallocate(fd: impl AsFd, mode: Fallocate, offset: u64, len: u64) -> io::Result<()> {
    let mode = mode.bits();
    let (off, len) = (to_off(offset)?, to_off(len)?);
    // SAFETY: fallocate takes an fd and integers; the borrowed fd is open for
    // the duration of the call.
    cvt(unsafe { libc::fallocate(fd.as_fd().as_raw_fd(), mode, off, len) })?;
    Ok(())
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// `lseek(fd, offset, SEEK_DATA)`: the next offset at or after `offset` that
/// holds data, or `None` when only a hole remains up to end of file.
pub fn seek_data(fd: impl AsFd, offset: u64) -> io::Result<Option<u64>> {
    let off = to_off(offset)?;
    // SAFETY: lseek takes an fd and integers and has no memory effects.
    match cvt64(unsafe { libc::lseek(fd.as_fd().as_raw_fd(), off, libc::SEEK_DATA) }) {
        Ok(pos) => Ok(Some(pos as u64)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `lseek(fd, offset, SEEK_HOLE)`: the next hole at or after `offset` (end of
/// file counts as a hole).
pub fn seek_hole(fd: impl AsFd, offset: u64) -> io::Result<u64> {
    let off = to_off(offset)?;
    // SAFETY: lseek takes an fd and integers and has no memory effects.
    let pos = cvt64(unsafe { libc::lseek(fd.as_fd().as_raw_fd(), off, libc::SEEK_HOLE) })?;
    Ok(pos as u64)
}

/// Size in bytes of a block device (`BLKGETSIZE64`).
pub fn block_device_size(fd: impl AsFd) -> io::Result<u64> {
    // _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live, aligned u64 owned by this frame.
    cvt(unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) })?;
    Ok(size)
}

/// What `O_DIRECT` I/O on a file requires: buffer addresses aligned to
/// `mem`, file offsets and lengths aligned to `offset` (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectAlign {
    pub mem: u32,
    pub offset: u32,
}

/// The `O_DIRECT` alignment of an open file (`statx(STATX_DIOALIGN)`,
/// Linux 6.1+), or `None` when the kernel or filesystem does not say.
/// Both zero means the file does not support `O_DIRECT`.
pub fn direct_alignment(fd: impl AsFd) -> io::Result<Option<DirectAlign>> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH names the fd itself; the path
    // is a NUL-terminated static string and st is live and writable.
    cvt(unsafe {
        libc::statx(fd.as_fd().as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut st)
    })?;
    if st.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(None);
    }
    Ok(Some(DirectAlign { mem: st.stx_dio_mem_align, offset: st.stx_dio_offset_align }))
}

/// Opens `path` again with `O_DIRECT` (same access mode as `read_only`
/// says), for I/O that bypasses the page cache.
pub fn open_direct(path: &std::path::Path, read_only: bool) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).write(!read_only).custom_flags(libc::O_DIRECT).open(path)
}

/// Whether the file lives on a memory filesystem (tmpfs, ramfs), where
/// reads and writes never wait for a device.
pub fn is_memory_fs(fd: impl AsFd) -> io::Result<bool> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: st is a live, writable statfs for the call.
    cvt(unsafe { libc::fstatfs(fd.as_fd().as_raw_fd(), &mut st) })?;
    let t = st.f_type as i64;
    Ok(t == TMPFS_MAGIC || t == RAMFS_MAGIC)
}

/// `posix_fadvise(POSIX_FADV_WILLNEED)`: start reading a range into cache.
pub fn fadvise_willneed(fd: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = (to_off(offset)?, to_off(len)?);
    // SAFETY: posix_fadvise takes an fd and integers and has no memory effects.
    let ret = unsafe { libc::posix_fadvise(fd.as_fd().as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED) };
    // posix_fadvise returns the error number instead of setting errno.
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// A one-byte open-file-description lock request at `at`.
fn ofd_flock(kind: libc::c_int, at: u64) -> io::Result<libc::flock> {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = to_off(at)?;
    l.l_len = 1;
    Ok(l)
}

/// Takes a shared (read) open-file-description lock on byte `at`
/// (`F_OFD_SETLK`), held until the file description is closed. This is
/// qemu's image-lock protocol (one byte per permission held or not shared);
/// fails with `EAGAIN` if another description holds a write lock there.
pub fn ofd_share_lock(fd: impl AsFd, at: u64) -> io::Result<()> {
    let l = ofd_flock(libc::F_RDLCK, at)?;
    // SAFETY: F_OFD_SETLK reads the flock struct, which lives across the call.
    cvt(unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_OFD_SETLK, &l as *const libc::flock) })?;
    Ok(())
}

/// Whether another open file description holds any lock on byte `at`
/// (`F_OFD_GETLK` with a write lock: the description's own locks never
/// conflict).
pub fn ofd_locked_by_other(fd: impl AsFd, at: u64) -> io::Result<bool> {
    let mut l = ofd_flock(libc::F_WRLCK, at)?;
    // SAFETY: F_OFD_GETLK reads and writes the flock struct, which is live
    // and writable across the call.
    cvt(unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_OFD_GETLK, &mut l as *mut libc::flock) })?;
    Ok(l.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    #[test]
    fn ofd_locks_are_seen_by_other_descriptions_only() {
        let dir = std::env::temp_dir().join(format!("ringbd-io-ofd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, b"x").unwrap();
        let a = std::fs::File::open(&p).unwrap();
        let b = std::fs::File::open(&p).unwrap();
        ofd_share_lock(&a, 101).unwrap();
        assert!(!ofd_locked_by_other(&a, 101).unwrap(), "a description's own lock");
        assert!(ofd_locked_by_other(&b, 101).unwrap(), "another description's lock");
        assert!(!ofd_locked_by_other(&b, 102).unwrap());
        ofd_share_lock(&b, 101).unwrap();
        drop(a);
        let c = std::fs::File::open(&p).unwrap();
        assert!(ofd_locked_by_other(&c, 101).unwrap(), "b's lock stays");
        drop(b);
        assert!(!ofd_locked_by_other(&c, 101).unwrap(), "closing releases");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn sparse_file() -> std::fs::File {
        let dir = std::env::temp_dir().join(format!("ringbd-io-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("f{:?}", std::thread::current().id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.set_len(4 << 20).unwrap();
        f
    }

    #[test]
    fn seek_data_and_hole_find_written_ranges() {
        let f = sparse_file();
        f.write_all_at(&[1u8; 65536], 1 << 20).unwrap();
        let data = seek_data(&f, 0).unwrap();
        // Some filesystems report everything as data; both answers are valid
        // but a written byte must be inside data.
        let d = data.unwrap();
        assert!(d <= 1 << 20);
        let h = seek_hole(&f, d).unwrap();
        assert!(h >= (1 << 20) + 65536);
        assert_eq!(seek_data(&f, 4 << 20).unwrap(), None);
    }

    #[test]
    fn punch_hole_reads_back_zeroes_or_reports_unsupported() {
        let mut f = sparse_file();
        f.write_all(&[7u8; 8192]).unwrap();
        match fallocate(&f, Fallocate::PunchHole, 0, 4096) {
            Ok(()) => {
                let mut b = [1u8; 4096];
                f.read_exact_at(&mut b, 0).unwrap();
                assert!(b.iter().all(|&x| x == 0));
                let mut b = [0u8; 1];
                f.read_exact_at(&mut b, 4096).unwrap();
                assert_eq!(b[0], 7);
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP)),
        }
    }

    #[test]
    fn block_device_size_fails_cleanly_on_a_regular_file() {
        let f = sparse_file();
        assert!(block_device_size(&f).is_err());
    }

    #[test]
    fn shm_is_a_memory_fs_and_the_root_is_not() {
        if let Ok(f) = std::fs::File::open("/dev/shm") {
            assert!(is_memory_fs(&f).unwrap());
        }
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        // The test binary lives on a disk filesystem in any sane build tree.
        assert!(!is_memory_fs(&f).unwrap());
    }

    #[test]
    fn offsets_beyond_off_t_are_eoverflow() {
        let f = sparse_file();
        let e = fallocate(&f, Fallocate::PunchHole, u64::MAX, 1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EOVERFLOW));
    }
}
