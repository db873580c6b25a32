//! File operations on the ring (reads, writes, `fdatasync`, `fallocate`)
//! whose buffers the ring owns until the completion hands them back, and
//! the registered-buffer arena that makes reads and writes fixed-buffer
//! operations.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use io_uring::{opcode, types};

use super::{user_data, Completion, Ring, SendSource, KIND_FILE};
use crate::buf::{Arena, IoBuf};

pub(super) struct InflightFile {
    /// Kept alive (and not touched) until the kernel is done with it.
    buf: IoBuf,
    conn: u32,
    token: u32,
}

/// A file operation for [`Ring::file_op`].
#[derive(Debug, Clone, Copy)]
pub enum FileOp {
    /// Read into `buf[at..]` from `offset`.
    Read { offset: u64, at: usize },
    /// Write `buf[at..]` at `offset`; `dsync`: durable before completion
    /// (`RWF_DSYNC`, for FUA).
    Write { offset: u64, at: usize, dsync: bool },
    /// `fdatasync`.
    Fsync,
    /// `fallocate` (punch a hole or zero a range).
    Fallocate { mode: crate::fs::Fallocate, offset: u64, len: u64 },
}

impl<S: SendSource> Ring<S> {
    /// Registers `arena`'s chunks as fixed buffers: file reads and writes
    /// into them skip per-operation page pinning.
    pub fn register_arena(&mut self, arena: Arc<Arena>) -> io::Result<()> {
        let iov = arena.iovecs();
        // SAFETY: the kernel may use the registered memory until the ring is
        // closed. The arena's allocation lives as long as an Arc to it does,
        // and self.arena keeps one until after self.ring is dropped (field
        // order), or forever if operations were in flight (see Drop).
        unsafe { self.ring.submitter().register_buffers(&iov)? };
        self.arena = Some(arena);
        Ok(())
    }

    /// The registered arena, if any.
    pub fn arena(&self) -> Option<&Arc<Arena>> {
        self.arena.as_ref()
    }

    /// Starts a read, write or fsync on a file; `buf` (unused by fsync) is
    /// owned by the ring until [`Completion::File`] returns it. A read
    /// fills `buf[at..len]`. A chunk of the registered arena makes the read
    /// or write a fixed-buffer operation.
    pub fn file_op(
        &mut self,
        fd: BorrowedFd<'_>,
        conn: u32,
        token: u32,
        op: FileOp,
        mut buf: IoBuf,
    ) -> io::Result<()> {
        let slot = match self.free_files.pop() {
            Some(s) => s,
            None => {
                self.files.push(None);
                (self.files.len() - 1) as u32
            }
        };
        let fd = types::Fd(fd.as_raw_fd());
        let fixed = self.arena.as_ref().and_then(|a| buf.fixed_index(a));
        let e = match op {
            FileOp::Read { offset, at } => {
                // The kernel writes here: take the pointer from a unique
                // borrow of the buffer, which the ring owns until then.
                let rest = buf.get_mut(at..).unwrap_or_default();
                let len = rest.len().min(u32::MAX as usize) as u32;
                let ptr = rest.as_mut_ptr();
                match fixed {
                    Some(i) => opcode::ReadFixed::new(fd, ptr, len, i).offset(offset).build(),
                    None => opcode::Read::new(fd, ptr, len).offset(offset).build(),
                }
            }
            FileOp::Write { offset, at, dsync } => {
                let rest = buf.get(at..).unwrap_or_default();
                let len = rest.len().min(u32::MAX as usize) as u32;
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                match fixed {
                    Some(i) => opcode::WriteFixed::new(fd, rest.as_ptr(), len, i)
                        .offset(offset)
                        .rw_flags(flags)
                        .build(),
                    None => opcode::Write::new(fd, rest.as_ptr(), len).offset(offset).rw_flags(flags).build(),
                }
            }
            FileOp::Fsync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            FileOp::Fallocate { mode, offset, len } => {
                opcode::Fallocate::new(fd, len).offset(offset).mode(mode.bits()).build()
            }
        };
        let fixed = fixed.is_some() && matches!(op, FileOp::Read { .. } | FileOp::Write { .. });
        let e = e.user_data(user_data(KIND_FILE, conn, slot));
        // The pointer into `buf`'s heap memory stays valid: the Vec moves
        // into the slot, its heap buffer does not move, and nothing touches
        // it until the completion hands it back.
        self.files[slot as usize] = Some(InflightFile { buf, conn, token });
        if let Err(e) = self.push(e) {
            self.files[slot as usize] = None;
            self.free_files.push(slot);
            return Err(e);
        }
        self.stats.file_ops += 1;
        if fixed {
            self.stats.file_fixed += 1;
        }
        Ok(())
    }

    /// A file operation's completion: its buffer comes back.
    pub(super) fn file_done(&mut self, slot: u32, res: i32) -> Option<Completion<S>> {
        let err = |res: i32| io::Error::from_raw_os_error(-res);
        let f = self.files.get_mut(slot as usize)?.take()?;
        self.free_files.push(slot);
        let result = if res < 0 { Err(err(res)) } else { Ok(res as usize) };
        Some(Completion::File { conn: f.conn, token: f.token, result, buf: f.buf })
    }
}
