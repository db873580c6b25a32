//! L1 and L2 table entries (standard 8-byte entries; extended L2 entries
//! are refused by the header check) and what each means for a read.

/// Bits 9-55 of an L1 or standard L2 entry: the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the refcount is exactly one (a hint for writers).
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Bits 1-8 and 56-62 of an L1 entry must be zero.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01fe;

/// Where one guest cluster's data is, from its L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Nothing here: read the backing file, or zeroes without one.
    Unallocated,
    /// Reads as zeroes; `host` is the cluster still allocated to it, if any
    /// (qemu's ZERO_ALLOC; without one, ZERO_PLAIN).
    Zero { host: Option<u64> },
    /// The data is at `host` in the image file.
    Data { host: u64 },
    /// Deflated data at `host` (not aligned), at most `len` bytes.
    Compressed { host: u64, len: u64 },
}

/// Why an entry cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryError(pub String);

/// The L2 table offset of an L1 entry (`None`: no table, all unallocated).
pub fn l1_entry(entry: u64, cluster_bits: u32) -> Result<Option<u64>, EntryError> {
    if entry & L1_RESERVED != 0 {
        return Err(EntryError(format!("L1 entry 0x{entry:016x} has reserved bits set")));
    }
    let offset = entry & OFFSET_MASK;
    if offset == 0 {
        return Ok(None);
    }
    if !offset.is_multiple_of(1 << cluster_bits) {
        return Err(EntryError(format!("L2 table offset 0x{offset:x} is not cluster-aligned")));
    }
    Ok(Some(offset))
}

/// Decodes a standard L2 entry.
pub fn l2_entry(entry: u64, cluster_bits: u32) -> Result<Cluster, EntryError> {
    if entry & COMPRESSED != 0 {
        // x = 62 - (cluster_bits - 8): the offset below x, the count of
        // further 512-byte sectors from x to 61.
        let shift = 62 - (cluster_bits - 8);
        let host = entry & ((1 << shift) - 1);
        let sectors = ((entry & !(COPIED | COMPRESSED)) >> shift) + 1;
        return Ok(Cluster::Compressed { host, len: sectors * 512 - (host & 511) });
    }
    let host = entry & OFFSET_MASK;
    if host != 0 && !host.is_multiple_of(1 << cluster_bits) {
        return Err(EntryError(format!("data cluster offset 0x{host:x} is not cluster-aligned")));
    }
    let host = (host != 0).then_some(host);
    Ok(match (entry & ZERO != 0, host) {
        (true, host) => Cluster::Zero { host },
        (false, None) => Cluster::Unallocated,
        (false, Some(host)) => Cluster::Data { host },
    })
}

/// Big-endian table entries from a table's bytes.
pub fn entries(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks_exact(8).map(|c| c.try_into().map(u64::from_be_bytes).unwrap_or(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_entries() {
        assert_eq!(l1_entry(0, 16), Ok(None));
        assert_eq!(l1_entry(COPIED, 16), Ok(None));
        assert_eq!(l1_entry(COPIED | 0x3_0000, 16), Ok(Some(0x3_0000)));
        assert!(l1_entry(0x3_0200, 16).unwrap_err().0.contains("not cluster-aligned"));
        assert!(l1_entry(0x3_0000 | 2, 16).unwrap_err().0.contains("reserved"));
        assert!(l1_entry(0x3_0000 | 1 << 60, 16).unwrap_err().0.contains("reserved"));
    }

    #[test]
    fn l2_standard_entries() {
        assert_eq!(l2_entry(0, 16), Ok(Cluster::Unallocated));
        assert_eq!(l2_entry(COPIED | 0x5_0000, 16), Ok(Cluster::Data { host: 0x5_0000 }));
        assert_eq!(l2_entry(ZERO, 16), Ok(Cluster::Zero { host: None }));
        assert_eq!(l2_entry(COPIED | 0x5_0000 | ZERO, 16), Ok(Cluster::Zero { host: Some(0x5_0000) }));
        assert!(l2_entry(0x5_1000, 16).is_err());
        // 512-byte clusters: any sector offset is aligned.
        assert_eq!(l2_entry(0x5_1200, 9), Ok(Cluster::Data { host: 0x5_1200 }));
    }

    #[test]
    fn l2_compressed_entries() {
        // 64 KiB clusters: x = 54; 3 more sectors after the one at 0x12345.
        let e = COMPRESSED | (3 << 54) | 0x12345;
        assert_eq!(l2_entry(e, 16), Ok(Cluster::Compressed { host: 0x12345, len: 4 * 512 - 0x145 }));
        // 2 MiB clusters: x = 49.
        let e = COMPRESSED | (1 << 49) | 0x200;
        assert_eq!(l2_entry(e, 21), Ok(Cluster::Compressed { host: 0x200, len: 1024 }));
        // 512-byte clusters: x = 61, one bit of count.
        let e = COMPRESSED | (1 << 61) | 0x10;
        assert_eq!(l2_entry(e, 9), Ok(Cluster::Compressed { host: 0x10, len: 1024 - 0x10 }));
        // qemu ignores COPIED on a compressed entry when reading; so does ringbd.
        assert_eq!(
            l2_entry(COMPRESSED | COPIED | 0x10, 16),
            Ok(Cluster::Compressed { host: 0x10, len: 496 })
        );
    }

    #[test]
    fn entries_are_big_endian() {
        assert_eq!(entries(&[0, 0, 0, 0, 0, 1, 0, 0, 0xff]), vec![0x1_0000]);
    }
}
