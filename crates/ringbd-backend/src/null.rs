//! Null backend: writes are discarded, reads return zeroes (as holes).

use crate::{Backend, Caps, Extent, Holes, Piece, Result, ZeroFlags};

pub struct NullBackend {
    size: u64,
}

impl NullBackend {
    pub fn new(size: u64) -> Self {
        NullBackend { size }
    }
}

impl Backend for NullBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: false,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            extents: true,
        }
    }

    fn describe(&self) -> String {
        format!("null, {} bytes", self.size)
    }

    fn read(&self, _offset: u64, buf: &mut [u8]) -> Result<Holes> {
        buf.fill(0);
        let mut h = Holes::default();
        h.push(0..buf.len());
        Ok(h)
    }

    fn read_shared(&self, _offset: u64, len: usize, out: &mut Vec<Piece>) -> Result<bool> {
        out.push(Piece::Zero(len));
        Ok(true)
    }

    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<()> {
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        Ok(())
    }

    fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let len = len.max(1).min(self.size.saturating_sub(offset).max(1));
        Ok(vec![Extent { len, hole: true, zero: true }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zero_after_writes() {
        let n = NullBackend::new(1 << 30);
        n.write(0, &[1, 2, 3], true).unwrap();
        let mut b = [9u8; 3];
        let h = n.read(0, &mut b).unwrap();
        assert_eq!(b, [0, 0, 0]);
        assert_eq!(h.0, vec![0..3]);
    }
}
