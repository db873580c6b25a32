//! What a ublk device is backed by.
//!
//! A [`Target`] describes the device (size, what it supports) and makes one
//! [`QueueHandler`] per queue, on that queue's thread. The handler serves
//! requests: it either answers at once or queues operations on the queue's
//! own ring (a file's reads, writes, fsyncs and fallocates; a poll of an
//! asynchronous backend's completions) and answers when they complete.
//! Anything a handler needs registered with the ring it returns from
//! [`Target::queue`]; the `n`th becomes `FileSlot(n + 1)`.
//!
//! The one implementation is [`crate::backend::BackendTarget`]: every
//! export backend of `ringbd serve`, driven as the server drives it.

use std::os::fd::OwnedFd;

use crate::kernel::{sys, IoDesc, QueueRing};

use crate::error::{Error, Result};

/// What a target offers; becomes the device's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TargetInfo {
    /// Preferred I/O size (bytes, a power of two; 0: the block size).
    pub opt_io: u32,
    /// Bytes.
    pub size: u64,
    pub read_only: bool,
    /// Writes may sit in a volatile cache until a flush (the device gets a
    /// write-back cache and FUA).
    pub flush: bool,
    /// With `flush`: no forced-unit-access writes (the block layer then
    /// follows such writes with a flush).
    pub no_fua: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    /// The smallest block size the target accepts (e.g. O_DIRECT's).
    pub min_block_size: u32,
    /// The handler moves read and write data with [`QueueRing::read_data`]
    /// / [`QueueRing::write_data`] only (never through `ring.buf(tag)`), so
    /// the device may be created zero-copy (`UBLK_F_AUTO_BUF_REG`).
    pub zero_copy: bool,
}

/// The request operations a handler sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// Something this frontend does not handle (WRITE_SAME, zoned ops).
    Other(u8),
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write-zeroes",
            Op::Other(_) => "unsupported op",
        }
    }
}

/// One block-layer request, decoded from its descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// Bytes from the start of the device.
    pub offset: u64,
    /// Bytes.
    pub len: u32,
    /// Forced unit access: durable before completion.
    pub fua: bool,
    /// For write-zeroes: keep the range allocated.
    pub no_unmap: bool,
}

impl Request {
    pub fn from_desc(d: &IoDesc) -> Request {
        let op = match d.op() {
            sys::UBLK_IO_OP_READ => Op::Read,
            sys::UBLK_IO_OP_WRITE => Op::Write,
            sys::UBLK_IO_OP_FLUSH => Op::Flush,
            sys::UBLK_IO_OP_DISCARD => Op::Discard,
            sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
            o => Op::Other(o),
        };
        Request {
            op,
            offset: d.start_sector << 9,
            len: d.nr_sectors << 9,
            fua: d.flags() & sys::UBLK_IO_F_FUA != 0,
            no_unmap: d.flags() & sys::UBLK_IO_F_NOUNMAP != 0,
        }
    }

    /// "write 4096 bytes at 0x1000", for error messages.
    pub fn describe(&self) -> String {
        match self.op {
            Op::Flush => "flush".to_owned(),
            Op::Other(o) => format!("op {o} ({} bytes at {:#x})", self.len, self.offset),
            op => format!("{} {} bytes at {:#x}", op.name(), self.len, self.offset),
        }
    }
}

/// Where a request stands after a handler call.
#[derive(Debug)]
pub enum Step {
    /// Complete the request with this many bytes (reads and writes: the
    /// request's length; others: 0).
    Done(u32),
    /// Operations are queued; the handler hears of them in `op_done`.
    Pending,
    /// Complete the request with this error's errno (the error is logged).
    Failed(Error),
}

/// One queue's request handler; lives on the queue's thread.
pub trait QueueHandler {
    /// A request arrived in `tag`. For writes the data is in the tag's
    /// buffer (`ring.buf(tag)`); reads leave theirs there.
    fn start(&mut self, ring: &mut QueueRing, tag: u16, req: &Request) -> Step;

    /// A ring operation this handler queued for `tag` finished.
    fn op_done(&mut self, ring: &mut QueueRing, tag: u16, cookie: u32, result: std::io::Result<u32>) -> Step;

    /// A connection operation (not tied to one tag: a batched send, a
    /// reply header's receive) finished. Requests it completes are handed
    /// back from [`QueueHandler::end_turn`].
    fn conn_op_done(&mut self, _ring: &mut QueueRing, _cookie: u32, _result: std::io::Result<u32>) {}

    /// Every event of a loop turn has been handled: queue what was batched
    /// (an NBD target's sends) and append the requests completed outside
    /// `start`/`op_done`'s return values to `done`.
    fn end_turn(&mut self, _ring: &mut QueueRing, _done: &mut Vec<(u16, Step)>) {}

    /// The device is going away (every tag's command has ended) while
    /// operations of this handler are still in flight: make them finish
    /// (shut a connection down), so the queue can end.
    fn stop(&mut self, _ring: &mut QueueRing) {}
}

/// What [`Target::queue`] hands the queue thread.
pub struct QueueSetup {
    pub handler: Box<dyn QueueHandler>,
    /// Registered with the queue's ring as `FileSlot(1)`, `FileSlot(2)`...
    /// (the ring keeps its own reference; these may be dropped after).
    pub files: Vec<OwnedFd>,
}

/// A device's backing.
pub trait Target: Send + Sync {
    /// For messages and `ringbd list`, e.g. `file:/srv/disk.img`.
    fn describe(&self) -> String;
    fn info(&self) -> TargetInfo;
    /// Makes queue `q_id`'s handler (called on that queue's thread).
    fn queue(&self, q_id: u16, depth: u16) -> Result<QueueSetup>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_to_requests() {
        let d = IoDesc {
            op_flags: u32::from(sys::UBLK_IO_OP_WRITE) | sys::UBLK_IO_F_FUA,
            nr_sectors: 8,
            start_sector: 16,
            addr: 0,
        };
        let r = Request::from_desc(&d);
        assert_eq!(r, Request { op: Op::Write, offset: 8192, len: 4096, fua: true, no_unmap: false });
        assert_eq!(r.describe(), "write 4096 bytes at 0x2000");
        let d = IoDesc { op_flags: u32::from(sys::UBLK_IO_OP_WRITE_ZEROES) | sys::UBLK_IO_F_NOUNMAP, ..d };
        assert!(Request::from_desc(&d).no_unmap);
        assert_eq!(Request::from_desc(&IoDesc { op_flags: 4, ..d }).op, Op::Other(4));
    }
}
