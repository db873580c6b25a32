//! The blocking [`Backend`](crate::Backend) methods of a backend whose I/O
//! is asynchronous ([`AsyncIo`]: RBD, an upstream NBD export), for callers
//! that wait (the threaded engine, start-up, the final flush): each submits
//! the operation as an engine would and waits for its sink.

use std::io;
use std::sync::Arc;

use crate::aio::{Sink, Waiter};
use ringbd_io::buf::IoBuf;

use crate::{AsyncIo, BlockOp, Error, Holes, Op, Result, ZeroFlags};

/// Runs one operation and waits for it.
pub fn run(aio: &dyn AsyncIo, op: BlockOp, buf: IoBuf) -> (io::Result<usize>, IoBuf) {
    let w = Arc::new(Waiter::default());
    aio.submit(op, buf, Sink::Wait(w.clone()));
    w.wait()
}

fn simple(aio: &dyn AsyncIo, what: Op, op: BlockOp, offset: u64, len: u64) -> Result<()> {
    run(aio, op, IoBuf::new()).0.map(drop).map_err(|e| Error::new(what, offset, len, e))
}

pub fn read(aio: &dyn AsyncIo, offset: u64, buf: &mut [u8]) -> Result<Holes> {
    let mut b = IoBuf::with_capacity(buf.len());
    b.set_len(buf.len());
    let (r, b) = run(aio, BlockOp::Read { offset, at: 0 }, b);
    r.map_err(|e| Error::new(Op::Read, offset, buf.len() as u64, e))?;
    buf.copy_from_slice(&b);
    Ok(Holes::default())
}

pub fn write(aio: &dyn AsyncIo, offset: u64, data: &[u8], fua: bool) -> Result<()> {
    let (r, _) = run(aio, BlockOp::Write { offset, at: 0, fua }, IoBuf::from_slice(data));
    r.map(drop).map_err(|e| Error::new(Op::Write, offset, data.len() as u64, e))
}

pub fn flush(aio: &dyn AsyncIo) -> Result<()> {
    simple(aio, Op::Flush, BlockOp::Flush, 0, 0)
}

/// A trim (`PunchHole`, which the backend maps to its discard), then a
/// flush with `fua`.
pub fn trim(aio: &dyn AsyncIo, offset: u64, len: u64, fua: bool) -> Result<()> {
    simple(aio, Op::Trim, BlockOp::Trim { offset, len }, offset, len)?;
    if fua {
        simple(aio, Op::Trim, BlockOp::Flush, offset, len)?;
    }
    Ok(())
}

/// Write-zeroes with its `no_hole` and `fast` flags (the backend refuses a
/// fast zero it cannot promise), then a flush with FUA.
pub fn write_zeroes(aio: &dyn AsyncIo, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
    let op = BlockOp::WriteZeroes { offset, len, no_hole: flags.no_hole, fast: flags.fast };
    simple(aio, Op::WriteZeroes, op, offset, len)?;
    if flags.fua {
        simple(aio, Op::WriteZeroes, BlockOp::Flush, offset, len)?;
    }
    Ok(())
}
