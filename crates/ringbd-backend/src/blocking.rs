//! The blocking [`Backend`](crate::Backend) methods of a backend whose I/O
//! is asynchronous ([`AsyncIo`]: RBD, an upstream NBD export), for callers
//! that wait (the threaded engine, start-up, the final flush): each submits
//! the operation as an engine would and waits for its sink.

use std::io;
use std::sync::Arc;

use ringbd_io::aio::{Sink, Waiter};
use ringbd_io::buf::IoBuf;
use ringbd_io::fs::Fallocate;
use ringbd_io::uring::FileOp;

use crate::{AsyncIo, Error, ErrorKind, Holes, Op, Result, ZeroFlags};

/// Runs one operation and waits for it.
pub fn run(aio: &dyn AsyncIo, op: FileOp, buf: IoBuf) -> (io::Result<usize>, IoBuf) {
    let w = Arc::new(Waiter::default());
    aio.submit(op, buf, Sink::Wait(w.clone()));
    w.wait()
}

fn simple(aio: &dyn AsyncIo, what: Op, op: FileOp, offset: u64, len: u64) -> Result<()> {
    run(aio, op, IoBuf::new()).0.map(drop).map_err(|e| Error::new(what, offset, len, e))
}

pub fn read(aio: &dyn AsyncIo, offset: u64, buf: &mut [u8]) -> Result<Holes> {
    let mut b = IoBuf::with_capacity(buf.len());
    b.set_len(buf.len());
    let (r, b) = run(aio, FileOp::Read { offset, at: 0 }, b);
    r.map_err(|e| Error::new(Op::Read, offset, buf.len() as u64, e))?;
    buf.copy_from_slice(&b);
    Ok(Holes::default())
}

pub fn write(aio: &dyn AsyncIo, offset: u64, data: &[u8], fua: bool) -> Result<()> {
    let (r, _) = run(aio, FileOp::Write { offset, at: 0, dsync: fua }, IoBuf::from_slice(data));
    r.map(drop).map_err(|e| Error::new(Op::Write, offset, data.len() as u64, e))
}

pub fn flush(aio: &dyn AsyncIo) -> Result<()> {
    simple(aio, Op::Flush, FileOp::Fsync, 0, 0)
}

/// A trim (`PunchHole`, which the backend maps to its discard), then a
/// flush with `fua`.
pub fn trim(aio: &dyn AsyncIo, offset: u64, len: u64, fua: bool) -> Result<()> {
    simple(aio, Op::Trim, FileOp::Fallocate { mode: Fallocate::PunchHole, offset, len }, offset, len)?;
    if fua {
        simple(aio, Op::Trim, FileOp::Fsync, offset, len)?;
    }
    Ok(())
}

/// Write-zeroes (`ZeroRange`, which the backend maps to its zeroing), then
/// a flush with FUA; a fast zero is refused with `why` (the backend cannot
/// promise one).
pub fn write_zeroes(aio: &dyn AsyncIo, offset: u64, len: u64, flags: ZeroFlags, why: &str) -> Result<()> {
    if flags.fast {
        return Err(Error::other(ErrorKind::Unsupported, Op::WriteZeroes, offset, len, why));
    }
    let op = FileOp::Fallocate { mode: Fallocate::ZeroRange, offset, len };
    simple(aio, Op::WriteZeroes, op, offset, len)?;
    if flags.fua {
        simple(aio, Op::WriteZeroes, FileOp::Fsync, offset, len)?;
    }
    Ok(())
}
