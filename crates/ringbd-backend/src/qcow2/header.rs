//! The qcow2 header and its extensions (qemu's docs/interop/qcow2.txt):
//! parsed from the image's first bytes, checked field by field, and the
//! features ringbd cannot serve safely refused. Nothing here does I/O, so
//! the fuzz target (fuzz/fuzz_targets/qcow2_header.rs) drives it directly.

use std::fmt;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest and largest cluster sizes qemu accepts (512 B and 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's bound on the active L1 table (32 MiB of entries).
pub const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// qemu's bound on internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Bytes of a version 2 header, and the least of a version 3 one.
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_MIN_LEN: u32 = 104;
/// Longest backing file name (qemu's limit).
pub const MAX_BACKING_NAME: u32 = 1023;
/// Longest backing format name + 1 (qemu's `backing_format[16]`).
const MAX_BACKING_FORMAT: u32 = 16;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Header extension types.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (the default, and the only kind in version 2).
    Deflate,
    Zstd,
}

/// A parsed and checked header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// The virtual disk's size in bytes.
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    /// The backing file's name as stored (relative names are relative to
    /// the image's directory).
    pub backing_file: Option<String>,
    /// The backing-format extension (`raw`, `qcow2`, ...).
    pub backing_format: Option<String>,
    /// The feature-name table: (type, bit, name); type 0 is incompatible.
    pub feature_names: Vec<(u8, u8, String)>,
    /// Types of every extension present, in order (without the end marker).
    pub extensions: Vec<u32>,
}

/// A header field that is wrong or asks for something ringbd will not do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderError {
    /// The field (as qcow2.txt names it) or feature at fault.
    pub field: &'static str,
    pub reason: String,
    /// A refusal of a valid image ringbd does not support (as opposed to a
    /// malformed one).
    pub unsupported: bool,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "qcow2 header field {}: {}", self.field, self.reason)
    }
}

impl std::error::Error for HeaderError {}

fn bad(field: &'static str, reason: impl Into<String>) -> HeaderError {
    HeaderError { field, reason: reason.into(), unsupported: false }
}

fn unsupported(field: &'static str, reason: impl Into<String>) -> HeaderError {
    HeaderError { field, reason: reason.into(), unsupported: true }
}

/// Big-endian fields at fixed offsets of a byte slice (absent bytes: `None`).
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&self, at: usize) -> Option<u8> {
        self.0.get(at).copied()
    }
    fn u32(&self, at: usize) -> Option<u32> {
        let b = self.0.get(at..at.checked_add(4)?)?;
        Some(u32::from_be_bytes(b.try_into().ok()?))
    }
    fn u64(&self, at: usize) -> Option<u64> {
        let b = self.0.get(at..at.checked_add(8)?)?;
        Some(u64::from_be_bytes(b.try_into().ok()?))
    }
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries of one L2 table (standard 8-byte entries).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// L1 entries the virtual size needs (qemu's `size_to_l1`); the rest
    /// of a longer table belongs to snapshots' VM state.
    pub fn l1_entries_needed(&self) -> u64 {
        let per_l1 = 1u128 << (2 * self.cluster_bits - 3);
        (u128::from(self.size).div_ceil(per_l1)) as u64
    }

    /// Parses and checks the header from the image's first bytes (at least
    /// the first cluster, or the whole file if shorter), and refuses what
    /// ringbd cannot serve safely. Offsets are checked against the file's
    /// size by [`Header::check_layout`].
    pub fn parse(buf: &[u8]) -> Result<Header, HeaderError> {
        let b = Bytes(buf);
        let short =
            |field| bad(field, format!("the file is too short ({} bytes) for a qcow2 header", buf.len()));
        let magic = b.u32(0).ok_or_else(|| short("magic"))?;
        if magic != MAGIC {
            return Err(bad("magic", format!("0x{magic:08x} is not qcow2's 0x{MAGIC:08x} (QFI\\xfb)")));
        }
        let version = b.u32(4).ok_or_else(|| short("version"))?;
        if version != 2 && version != 3 {
            return Err(unsupported("version", format!("{version} (ringbd reads versions 2 and 3)")));
        }
        let v2 = b.u64(64).ok_or_else(|| short("snapshots_offset"))?;
        let mut h = Header {
            version,
            cluster_bits: b.u32(20).unwrap_or(0),
            size: b.u64(24).unwrap_or(0),
            crypt_method: b.u32(32).unwrap_or(0),
            l1_size: b.u32(36).unwrap_or(0),
            l1_table_offset: b.u64(40).unwrap_or(0),
            refcount_table_offset: b.u64(48).unwrap_or(0),
            refcount_table_clusters: b.u32(56).unwrap_or(0),
            nb_snapshots: b.u32(60).unwrap_or(0),
            snapshots_offset: v2,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression: Compression::Deflate,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            extensions: Vec::new(),
        };
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            let (lo, hi) = (MIN_CLUSTER_BITS, MAX_CLUSTER_BITS);
            return Err(bad("cluster_bits", format!("{} is outside {lo}..={hi}", h.cluster_bits)));
        }
        let cluster = h.cluster_size();
        if version == 3 {
            h.incompatible_features = b.u64(72).ok_or_else(|| short("incompatible_features"))?;
            h.compatible_features = b.u64(80).ok_or_else(|| short("compatible_features"))?;
            h.autoclear_features = b.u64(88).ok_or_else(|| short("autoclear_features"))?;
            h.refcount_order = b.u32(96).ok_or_else(|| short("refcount_order"))?;
            h.header_length = b.u32(100).ok_or_else(|| short("header_length"))?;
            if h.header_length < V3_HEADER_MIN_LEN {
                return Err(bad("header_length", format!("{} is below version 3's 104", h.header_length)));
            }
            if u64::from(h.header_length) > cluster {
                return Err(bad(
                    "header_length",
                    format!("{} exceeds the cluster size {cluster}", h.header_length),
                ));
            }
            if h.refcount_order > 6 {
                return Err(bad(
                    "refcount_order",
                    format!("{} is above 6 (64-bit refcounts)", h.refcount_order),
                ));
            }
        }
        let compression_type = if h.header_length > V3_HEADER_MIN_LEN {
            b.u8(104).ok_or_else(|| short("compression_type"))?
        } else {
            0
        };
        h.compression = match (compression_type, h.incompatible_features & INCOMPAT_COMPRESSION != 0) {
            (0, false) => Compression::Deflate,
            (0, true) => return Err(bad("compression_type", "deflate, yet incompatible bit 3 is set")),
            (_, false) => {
                return Err(bad(
                    "compression_type",
                    format!("{compression_type}, yet incompatible bit 3 is clear"),
                ))
            }
            (1, true) => Compression::Zstd,
            (t, true) => {
                return Err(unsupported("compression_type", format!("{t} is unknown (0 deflate, 1 zstd)")))
            }
        };
        if h.size > i64::MAX as u64 {
            return Err(bad("size", format!("{} exceeds the largest disk ({})", h.size, i64::MAX)));
        }
        let needed = h.l1_entries_needed();
        if needed > MAX_L1_ENTRIES {
            return Err(bad(
                "size",
                format!("{} needs {needed} L1 entries, above qemu's {MAX_L1_ENTRIES}", h.size),
            ));
        }
        if u64::from(h.l1_size) < needed {
            let s = h.size;
            return Err(bad(
                "l1_size",
                format!("{} entries cannot map a virtual size of {s} ({needed} needed)", h.l1_size),
            ));
        }
        if u64::from(h.l1_size) > MAX_L1_ENTRIES {
            return Err(bad(
                "l1_size",
                format!("{} entries exceed qemu's limit of {MAX_L1_ENTRIES}", h.l1_size),
            ));
        }
        if h.refcount_table_clusters == 0 {
            return Err(bad("refcount_table_clusters", "0: the image has no refcount table"));
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(bad("nb_snapshots", format!("{} exceeds qemu's {MAX_SNAPSHOTS}", h.nb_snapshots)));
        }
        h.parse_backing_name(&b, cluster)?;
        h.parse_extensions(buf, cluster)?;
        h.refuse_unsupported()?;
        Ok(h)
    }

    fn parse_backing_name(&mut self, b: &Bytes<'_>, cluster: u64) -> Result<(), HeaderError> {
        let offset = b.u64(8).unwrap_or(0);
        let len = b.u32(16).unwrap_or(0);
        if offset == 0 {
            return Ok(());
        }
        if offset > cluster {
            return Err(bad(
                "backing_file_offset",
                format!("{offset} is past the first cluster ({cluster} bytes)"),
            ));
        }
        if u64::from(len) > u64::from(MAX_BACKING_NAME).min(cluster - offset) {
            return Err(bad(
                "backing_file_size",
                format!("{len} bytes is too long a name (at most 1023, in cluster 0)"),
            ));
        }
        let name = b.0.get(offset as usize..(offset + u64::from(len)) as usize).ok_or_else(|| {
            bad(
                "backing_file_offset",
                format!("the name ({len} bytes at {offset}) is past the end of the file"),
            )
        })?;
        let name = std::str::from_utf8(name)
            .map_err(|_| unsupported("backing_file_offset", "the backing file name is not UTF-8"))?;
        if name.is_empty() {
            return Err(bad("backing_file_size", "0: an empty backing file name"));
        }
        if name.contains('\0') {
            return Err(bad("backing_file_offset", "the backing file name contains a NUL byte"));
        }
        self.backing_file = Some(name.to_owned());
        Ok(())
    }

    /// Header extensions: from the end of the header to the backing file
    /// name (or the end of the first cluster), each padded to 8 bytes.
    fn parse_extensions(&mut self, buf: &[u8], cluster: u64) -> Result<(), HeaderError> {
        let b = Bytes(buf);
        let end = match b.u64(8).unwrap_or(0) {
            0 => cluster,
            o => o,
        };
        let mut at = u64::from(self.header_length);
        while at < end {
            let field = "header extension";
            let (Some(kind), Some(len)) = (b.u32(at as usize), b.u32(at as usize + 4)) else {
                return Err(bad(field, format!("the extension at {at} is past the end of the file")));
            };
            at += 8;
            if at > end || u64::from(len) > end - at {
                return Err(bad(
                    field,
                    format!("0x{kind:08x} at {}: {len} bytes run past byte {end}", at - 8),
                ));
            }
            if kind == EXT_END {
                return Ok(());
            }
            let data = buf.get(at as usize..(at + u64::from(len)) as usize).ok_or_else(|| {
                bad(field, format!("0x{kind:08x} at {}: {len} bytes run past the end of the file", at - 8))
            })?;
            self.extensions.push(kind);
            match kind {
                EXT_BACKING_FORMAT => {
                    if len >= MAX_BACKING_FORMAT {
                        return Err(bad(
                            "backing format extension",
                            format!("{len} bytes is too long a format name"),
                        ));
                    }
                    let f = std::str::from_utf8(data)
                        .map_err(|_| bad("backing format extension", "the format name is not UTF-8"))?;
                    self.backing_format = Some(f.trim_end_matches('\0').to_owned());
                }
                EXT_FEATURE_NAMES => {
                    for e in data.chunks_exact(48) {
                        let name = String::from_utf8_lossy(&e[2..]).trim_end_matches('\0').to_owned();
                        self.feature_names.push((e[0], e[1], name));
                    }
                }
                _ => {}
            }
            at += u64::from(len).div_ceil(8) * 8;
        }
        Ok(())
    }

    /// The name the image's feature table gives an incompatible bit.
    fn incompatible_name(&self, bit: u32) -> String {
        let named = self.feature_names.iter().find(|(t, b, _)| *t == 0 && u32::from(*b) == bit);
        named.map(|(_, _, n)| format!(" ({n:?})")).unwrap_or_default()
    }

    /// Refuses, with the reason, every image this slice cannot read safely.
    fn refuse_unsupported(&self) -> Result<(), HeaderError> {
        if self.crypt_method != 0 {
            let kind = match self.crypt_method {
                1 => "AES",
                2 => "LUKS",
                _ => "unknown",
            };
            return Err(unsupported(
                "crypt_method",
                format!("{} ({kind} encryption): ringbd does not decrypt images", self.crypt_method),
            ));
        }
        if self.extensions.contains(&EXT_CRYPTO) {
            return Err(unsupported("full disk encryption extension", "ringbd does not decrypt images"));
        }
        let inc = self.incompatible_features;
        if inc & INCOMPAT_CORRUPT != 0 {
            return Err(unsupported(
                "incompatible_features",
                "bit 1 (corrupt): qemu marked this image corrupt; check it with `qemu-img check`",
            ));
        }
        // Bit 0 (dirty: refcounts may lag behind the tables) does not
        // matter for reading; an image opened for writing is repaired first
        // (repair.rs).
        if inc & INCOMPAT_DATA_FILE != 0 || self.extensions.contains(&EXT_DATA_FILE) {
            return Err(unsupported(
                "incompatible_features",
                "bit 2 (external data file): ringbd reads only images whose data is in the image file",
            ));
        }
        if self.compression == Compression::Zstd {
            return Err(unsupported(
                "compression_type",
                "1 (zstd): ringbd decompresses only deflate clusters (convert with `qemu-img convert \
                 -O qcow2 -o compression_type=zlib`)",
            ));
        }
        if inc & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported(
                "incompatible_features",
                "bit 4 (extended L2 entries, subclusters): not supported by ringbd yet",
            ));
        }
        let known =
            INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
        if let Some(bit) = (0..64).find(|b| inc & !known & (1 << b) != 0) {
            return Err(unsupported(
                "incompatible_features",
                format!(
                    "unknown bit {bit}{}: the image needs a feature ringbd does not know",
                    self.incompatible_name(bit)
                ),
            ));
        }
        if let Some(f) = &self.backing_format {
            if f != "raw" && f != "qcow2" {
                return Err(unsupported(
                    "backing format extension",
                    format!("{f:?}: ringbd opens raw and qcow2 backing files only"),
                ));
            }
        }
        Ok(())
    }

    /// Checks that the tables the header points at are cluster-aligned and
    /// lie inside a file of `file_len` bytes.
    pub fn check_layout(&self, file_len: u64) -> Result<(), HeaderError> {
        let cluster = self.cluster_size();
        let table = |field: &'static str, offset: u64, bytes: u64| -> Result<(), HeaderError> {
            if !offset.is_multiple_of(cluster) {
                return Err(bad(field, format!("0x{offset:x} is not aligned to the cluster size {cluster}")));
            }
            match offset.checked_add(bytes) {
                Some(end) if end <= file_len || bytes == 0 => Ok(()),
                _ => Err(bad(
                    field,
                    format!("the table at 0x{offset:x} ({bytes} bytes) runs past the end of the file ({file_len} bytes)"),
                )),
            }
        };
        table("l1_table_offset", self.l1_table_offset, u64::from(self.l1_size) * 8)?;
        let rt = u64::from(self.refcount_table_clusters) << self.cluster_bits;
        table("refcount_table_offset", self.refcount_table_offset, rt)?;
        if self.nb_snapshots > 0 {
            // Entries are at least 40 bytes each.
            table("snapshots_offset", self.snapshots_offset, u64::from(self.nb_snapshots) * 40)?;
        }
        Ok(())
    }
}
