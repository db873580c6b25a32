//! `file:PATH[,direct]`: a regular file or block device, with every read,
//! write, fdatasync and fallocate an operation on the queue's own ring.
//! `direct` opens it O_DIRECT (the buffers are page-aligned; the device's
//! block size must then be a multiple of the file's).
//!
//! Discard punches a hole; write-zeroes zeroes the range in place
//! (`FALLOC_FL_ZERO_RANGE`), or punches a hole when the block layer allows
//! unmapping, and falls back to writing zeroes where the filesystem has
//! neither (the device caps write-zeroes at one buffer for that).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ringbd_io::ublk::{AllocMode, FileIo, FileSlot, QueueRing};

use crate::error::{Context, Error, Result};
use crate::target::{Op, QueueHandler, QueueSetup, Request, Step, Target, TargetInfo};

/// The one registered file.
const SLOT: FileSlot = FileSlot(1);

// Cookies: which operation of a request completed.
const C_READ: u32 = 1;
const C_WRITE: u32 = 2;
const C_SYNC: u32 = 3;
const C_PUNCH: u32 = 4;
const C_ZERO_RANGE: u32 = 5;
const C_WRITE_ZEROES: u32 = 6;

pub struct FileTarget {
    path: PathBuf,
    file: File,
    size: u64,
    direct: bool,
    read_only: bool,
}

impl FileTarget {
    pub fn open(path: &Path, direct: bool, read_only: bool) -> Result<FileTarget> {
        let mut o = OpenOptions::new();
        o.read(true).write(!read_only);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o
            .open(path)
            .context(|| format!("open {}{}", path.display(), if direct { " with O_DIRECT" } else { "" }))?;
        let meta = file.metadata().context(|| format!("stat {}", path.display()))?;
        let size = if meta.file_type().is_block_device() {
            ringbd_io::fs::block_device_size(&file)
                .context(|| format!("size of block device {}", path.display()))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(Error::msg(
                format!("{} is neither a regular file nor a block device", path.display()),
                libc::EINVAL,
            ));
        };
        Ok(FileTarget { path: path.to_owned(), file, size, direct, read_only })
    }
}

impl Target for FileTarget {
    fn describe(&self) -> String {
        format!("file:{}{}", self.path.display(), if self.direct { ",direct" } else { "" })
    }

    fn info(&self) -> TargetInfo {
        TargetInfo {
            size: self.size,
            read_only: self.read_only,
            flush: true,
            discard: !self.read_only,
            write_zeroes: !self.read_only,
            min_block_size: if self.direct { 4096 } else { 512 },
            any_size: false,
            // Reads and writes go through read_data/write_data only.
            zero_copy: true,
            ..Default::default()
        }
    }

    fn queue(&self, _q_id: u16, depth: u16) -> Result<QueueSetup> {
        let fd: OwnedFd = self.file.try_clone().context(|| format!("dup of {}", self.path.display()))?.into();
        let handler = FileQueue { path: self.path.clone(), reqs: vec![None; usize::from(depth)] };
        Ok(QueueSetup { handler: Box::new(handler), files: vec![fd] })
    }
}

/// A request in progress: `done` bytes moved so far.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    req: Request,
    done: u32,
}

struct FileQueue {
    path: PathBuf,
    reqs: Vec<Option<InFlight>>,
}

impl FileQueue {
    fn fail(&self, tag: u16, req: &Request, e: io::Error) -> Step {
        Step::Failed(Error::new(format!("tag {tag}: {} of {}", req.describe(), self.path.display()), e))
    }

    /// Queues the rest of a read or write.
    fn continue_rw(&mut self, ring: &mut QueueRing, tag: u16, f: InFlight) -> Step {
        let io = FileIo {
            tag,
            file: SLOT,
            offset: f.req.offset + u64::from(f.done),
            buf_off: f.done as usize,
            len: f.req.len - f.done,
            cookie: if f.req.op == Op::Read { C_READ } else { C_WRITE },
        };
        let r = if f.req.op == Op::Read { ring.read_data(&io) } else { ring.write_data(&io, f.req.fua) };
        match r {
            Ok(()) => {
                self.reqs[usize::from(tag)] = Some(f);
                Step::Pending
            }
            Err(e) => self.fail(tag, &f.req, e),
        }
    }

    fn queue_alloc(
        &mut self,
        ring: &mut QueueRing,
        tag: u16,
        req: Request,
        mode: AllocMode,
        cookie: u32,
    ) -> Step {
        match ring.fallocate(tag, SLOT, mode, req.offset, u64::from(req.len), cookie) {
            Ok(()) => {
                self.reqs[usize::from(tag)] = Some(InFlight { req, done: 0 });
                Step::Pending
            }
            Err(e) => self.fail(tag, &req, e),
        }
    }

    /// Write-zeroes without fallocate: zero the buffer and write it.
    fn write_zeroes(&mut self, ring: &mut QueueRing, tag: u16, req: Request) -> Step {
        match ring.buf_mut(tag).and_then(|b| b.get_mut(..req.len as usize)) {
            Some(b) => b.fill(0),
            None => {
                return self.fail(
                    tag,
                    &req,
                    io::Error::other("write-zeroes larger than the buffer (max_write_zeroes_sectors)"),
                )
            }
        }
        let io =
            FileIo { tag, file: SLOT, offset: req.offset, buf_off: 0, len: req.len, cookie: C_WRITE_ZEROES };
        match ring.write(&io, req.fua) {
            Ok(()) => {
                self.reqs[usize::from(tag)] = Some(InFlight { req, done: 0 });
                Step::Pending
            }
            Err(e) => self.fail(tag, &req, e),
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS))
}

impl QueueHandler for FileQueue {
    fn start(&mut self, ring: &mut QueueRing, tag: u16, req: &Request) -> Step {
        let req = *req;
        match req.op {
            Op::Read | Op::Write => {
                if req.len == 0 {
                    return Step::Done(0);
                }
                self.continue_rw(ring, tag, InFlight { req, done: 0 })
            }
            Op::Flush => match ring.fdatasync(tag, SLOT, C_SYNC) {
                Ok(()) => {
                    self.reqs[usize::from(tag)] = Some(InFlight { req, done: 0 });
                    Step::Pending
                }
                Err(e) => self.fail(tag, &req, e),
            },
            Op::Discard => self.queue_alloc(ring, tag, req, AllocMode::PunchHole, C_PUNCH),
            Op::WriteZeroes if req.no_unmap => {
                self.queue_alloc(ring, tag, req, AllocMode::ZeroRange, C_ZERO_RANGE)
            }
            Op::WriteZeroes => self.queue_alloc(ring, tag, req, AllocMode::PunchHole, C_PUNCH),
            Op::Other(_) => {
                Step::Failed(Error::msg(format!("tag {tag}: {}", req.describe()), libc::EOPNOTSUPP))
            }
        }
    }

    fn op_done(&mut self, ring: &mut QueueRing, tag: u16, cookie: u32, result: io::Result<u32>) -> Step {
        let Some(f) = self.reqs.get_mut(usize::from(tag)).and_then(Option::take) else {
            return Step::Failed(Error::msg(
                format!("tag {tag}: completion {cookie} for no request"),
                libc::EIO,
            ));
        };
        let req = f.req;
        match (cookie, result) {
            (C_READ | C_WRITE, Ok(0)) => {
                let what = if cookie == C_READ { "end of file" } else { "no progress" };
                self.fail(
                    tag,
                    &req,
                    io::Error::new(io::ErrorKind::UnexpectedEof, format!("{what} after {} bytes", f.done)),
                )
            }
            (C_READ | C_WRITE, Ok(n)) => {
                let done = f.done.saturating_add(n).min(req.len);
                if done == req.len {
                    Step::Done(req.len)
                } else {
                    self.continue_rw(ring, tag, InFlight { req, done })
                }
            }
            (C_SYNC, Ok(_)) => Step::Done(0),
            // Discard is a hint; where holes cannot be punched say so.
            (C_PUNCH, Ok(_)) => Step::Done(0),
            (C_PUNCH, Err(e)) if req.op == Op::WriteZeroes && unsupported(&e) => {
                self.write_zeroes(ring, tag, req)
            }
            (C_ZERO_RANGE, Ok(_)) => Step::Done(0),
            (C_ZERO_RANGE, Err(e)) if unsupported(&e) => self.write_zeroes(ring, tag, req),
            (C_WRITE_ZEROES, Ok(n)) if n == req.len => Step::Done(0),
            (C_WRITE_ZEROES, Ok(n)) => {
                self.fail(tag, &req, io::Error::other(format!("short write of zeroes: {n} bytes")))
            }
            (_, Err(e)) => self.fail(tag, &req, e),
            (c, Ok(_)) => Step::Failed(Error::msg(format!("tag {tag}: unknown completion {c}"), libc::EIO)),
        }
    }
}
