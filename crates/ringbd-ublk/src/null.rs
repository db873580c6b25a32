//! `null:SIZE`: reads return zeroes, writes are dropped. Answers every
//! request at once, without ring operations: the frontend's own overhead.

use ringbd_io::ublk::QueueRing;

use crate::error::{Error, Result};
use crate::target::{Op, QueueHandler, QueueSetup, Request, Step, Target, TargetInfo};

pub struct NullTarget {
    size: u64,
}

impl NullTarget {
    pub fn new(size: u64) -> NullTarget {
        NullTarget { size }
    }
}

impl Target for NullTarget {
    fn describe(&self) -> String {
        format!("null:{}", self.size)
    }

    fn info(&self) -> TargetInfo {
        TargetInfo {
            size: self.size,
            read_only: false,
            flush: false,
            discard: true,
            write_zeroes: true,
            min_block_size: 512,
            any_size: true,
            // Copy path: a read zeroes the tag's buffer in place; with the
            // request's pages only reachable as a fixed buffer that would
            // need a ring operation per read (READ_FIXED from /dev/zero).
            zero_copy: false,
            ..Default::default()
        }
    }

    fn queue(&self, _q_id: u16, _depth: u16) -> Result<QueueSetup> {
        Ok(QueueSetup { handler: Box::new(NullQueue), files: Vec::new() })
    }
}

struct NullQueue;

impl QueueHandler for NullQueue {
    fn start(&mut self, ring: &mut QueueRing, tag: u16, req: &Request) -> Step {
        match req.op {
            Op::Read => match ring.buf_mut(tag).and_then(|b| b.get_mut(..req.len as usize)) {
                Some(b) => {
                    b.fill(0);
                    Step::Done(req.len)
                }
                None => {
                    Step::Failed(Error::msg(format!("tag {tag}: {}: no buffer", req.describe()), libc::EIO))
                }
            },
            Op::Write => Step::Done(req.len),
            Op::Flush | Op::Discard | Op::WriteZeroes => Step::Done(0),
            Op::Other(_) => Step::Failed(Error::msg(req.describe(), libc::EOPNOTSUPP)),
        }
    }

    fn op_done(&mut self, _ring: &mut QueueRing, tag: u16, cookie: u32, _r: std::io::Result<u32>) -> Step {
        Step::Failed(Error::msg(
            format!("tag {tag}: null target got a completion it never asked for ({cookie})"),
            libc::EIO,
        ))
    }
}
