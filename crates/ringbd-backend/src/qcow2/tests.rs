//! The qcow2 backend on images written here byte by byte ([`Img`]) and on
//! images qemu-img and qemu-io make (qemu-utils, which
//! scripts/install-deps.sh installs; a missing tool fails the test).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::header::*;
use super::table::{COMPRESSED, COPIED, ZERO};
use super::*;

/// One guest cluster of a hand-made image.
#[derive(Clone)]
enum Entry {
    Data(Vec<u8>),
    /// A zero cluster; `alloc` keeps a host cluster (filled with garbage).
    Zero {
        alloc: bool,
    },
    Compressed(Vec<u8>),
    /// This exact L2 entry.
    Raw(u64),
}

/// A qcow2 image written by hand: header at cluster 0, refcount table at
/// 1 (left empty: reading never looks at it), L1 from cluster 2, then L2
/// tables and data in the order clusters are added.
#[derive(Clone)]
pub(super) struct Img {
    version: u32,
    cb: u32,
    size: u64,
    l1_size: Option<u32>,
    incompat: u64,
    crypt: u32,
    compression_type: u8,
    header_length: u32,
    backing: Option<String>,
    backing_format: Option<String>,
    extensions: Vec<(u32, Vec<u8>)>,
    clusters: BTreeMap<u64, Entry>,
    /// Raw L1 entries to write instead of the computed ones.
    l1_override: BTreeMap<usize, u64>,
}

impl Img {
    fn new(version: u32, cb: u32, size: u64) -> Img {
        Img {
            version,
            cb,
            size,
            l1_size: None,
            incompat: 0,
            crypt: 0,
            compression_type: 0,
            header_length: if version == 3 { 112 } else { 72 },
            backing: None,
            backing_format: None,
            extensions: Vec::new(),
            clusters: BTreeMap::new(),
            l1_override: BTreeMap::new(),
        }
    }

    fn cs(&self) -> u64 {
        1 << self.cb
    }

    fn with(mut self, cluster: u64, e: Entry) -> Img {
        self.clusters.insert(cluster, e);
        self
    }

    fn build(&self) -> Vec<u8> {
        let cs = self.cs();
        let l2e = cs / 8;
        let needed = self.size.div_ceil(cs * l2e);
        let l1_size = self.l1_size.unwrap_or(needed as u32);
        let l1_clusters = (u64::from(l1_size) * 8).div_ceil(cs).max(1);
        let mut f = vec![0u8; ((2 + l1_clusters) * cs) as usize];
        let append = |f: &mut Vec<u8>, data: &[u8]| -> u64 {
            let off = f.len() as u64;
            f.extend_from_slice(data);
            f.resize((f.len() as u64).next_multiple_of(cs) as usize, 0);
            off
        };
        let put = |f: &mut Vec<u8>, at: u64, v: u64| {
            f[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes())
        };
        let mut l2_tables: BTreeMap<u64, u64> = BTreeMap::new();
        for (&v, e) in &self.clusters {
            let l1i = v / l2e;
            let l2 = match l2_tables.get(&l1i) {
                Some(&o) => o,
                None => {
                    let o = append(&mut f, &vec![0u8; cs as usize]);
                    l2_tables.insert(l1i, o);
                    put(&mut f, 2 * cs + l1i * 8, o | COPIED);
                    o
                }
            };
            let slot = l2 + (v % l2e) * 8;
            let entry = match e {
                Entry::Data(d) => append(&mut f, d) | COPIED,
                Entry::Zero { alloc: false } => ZERO,
                Entry::Zero { alloc: true } => append(&mut f, &vec![0xee; cs as usize]) | ZERO | COPIED,
                Entry::Raw(r) => *r,
                Entry::Compressed(d) => {
                    let mut z =
                        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
                    z.write_all(d).unwrap();
                    let z = z.finish().unwrap();
                    // Unaligned, as qemu packs them.
                    let host = f.len() as u64 + 100;
                    f.resize(host as usize, 0);
                    f.extend_from_slice(&z);
                    f.resize((f.len() as u64).next_multiple_of(cs) as usize, 0);
                    let sectors = ((host % 512) + z.len() as u64).div_ceil(512);
                    COMPRESSED | ((sectors - 1) << (62 - (self.cb - 8))) | host
                }
            };
            put(&mut f, slot, entry);
        }
        for (&i, &e) in &self.l1_override {
            put(&mut f, 2 * cs + i as u64 * 8, e);
        }
        // The header.
        let mut h = Vec::new();
        h.extend_from_slice(&MAGIC.to_be_bytes());
        h.extend_from_slice(&self.version.to_be_bytes());
        h.extend_from_slice(&[0; 12]); // backing offset and size, below
        h.extend_from_slice(&self.cb.to_be_bytes());
        h.extend_from_slice(&self.size.to_be_bytes());
        h.extend_from_slice(&self.crypt.to_be_bytes());
        h.extend_from_slice(&l1_size.to_be_bytes());
        h.extend_from_slice(&(2 * cs).to_be_bytes());
        h.extend_from_slice(&cs.to_be_bytes());
        h.extend_from_slice(&1u32.to_be_bytes());
        h.extend_from_slice(&[0; 12]); // no snapshots
        if self.version == 3 {
            h.extend_from_slice(&self.incompat.to_be_bytes());
            h.extend_from_slice(&[0; 16]);
            h.extend_from_slice(&4u32.to_be_bytes());
            h.extend_from_slice(&self.header_length.to_be_bytes());
            h.push(self.compression_type);
        }
        h.resize(self.header_length as usize, 0);
        let mut exts = self.extensions.clone();
        if let Some(fmt) = &self.backing_format {
            exts.insert(0, (EXT_BACKING_FORMAT, fmt.as_bytes().to_vec()));
        }
        for (kind, data) in exts {
            h.extend_from_slice(&kind.to_be_bytes());
            h.extend_from_slice(&(data.len() as u32).to_be_bytes());
            h.extend_from_slice(&data);
            h.resize(h.len().next_multiple_of(8), 0);
        }
        h.extend_from_slice(&[0; 8]);
        if let Some(name) = &self.backing {
            let at = h.len() as u64;
            h[8..16].copy_from_slice(&at.to_be_bytes());
            h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            h.extend_from_slice(name.as_bytes());
        }
        f[..h.len()].copy_from_slice(&h);
        f
    }
}

/// A fresh directory for one test's files, removed when dropped.
pub(super) struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn temp_dir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("ringbd-qcow2-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

pub(super) fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

pub(super) fn open(path: &Path) -> Qcow2Backend {
    Qcow2Backend::open(path, true).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn open_err(path: &Path) -> Error {
    match Qcow2Backend::open(path, true) {
        Ok(_) => panic!("{} opened, expected a refusal", path.display()),
        Err(e) => e,
    }
}

pub(super) fn read(b: &Qcow2Backend, offset: u64, len: usize) -> (Vec<u8>, Holes) {
    let mut buf = vec![0xaa; len];
    let h = b.read(offset, &mut buf).unwrap();
    (buf, h)
}

pub(super) fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

#[test]
fn every_kind_of_cluster_reads_and_maps() {
    let _serial = serial();
    let cs = 1 << 16;
    let img = Img::new(3, 16, 8 * cs)
        .with(0, Entry::Data(pattern(1, cs as usize)))
        .with(1, Entry::Zero { alloc: false })
        .with(2, Entry::Zero { alloc: true })
        .with(3, Entry::Compressed(pattern(4, cs as usize)))
        .with(5, Entry::Data(pattern(6, cs as usize)));
    let dir = temp_dir("kinds");
    let b = open(&write_file(&dir, "a.qcow2", &img.build()));
    assert_eq!(b.size(), 8 * cs);
    assert!(b.describe().contains("qcow2 v3") && b.describe().contains("64 KiB"), "{}", b.describe());
    let caps = b.caps();
    assert!(caps.read_only && caps.extents && caps.multi_conn && !caps.flush && !caps.trim);
    let (buf, holes) = read(&b, 0, 8 * cs as usize);
    let c = cs as usize;
    assert_eq!(&buf[..c], &pattern(1, c)[..]);
    assert!(buf[c..3 * c].iter().all(|&x| x == 0), "zero clusters (with garbage behind one) read zero");
    assert_eq!(&buf[3 * c..4 * c], &pattern(4, c)[..], "compressed");
    assert!(buf[4 * c..5 * c].iter().all(|&x| x == 0));
    assert_eq!(&buf[5 * c..6 * c], &pattern(6, c)[..]);
    assert_eq!(holes.0, vec![c..3 * c, 4 * c..5 * c, 6 * c..8 * c]);
    // Unaligned reads across kinds, and inside a compressed cluster.
    let (part, _) = read(&b, cs - 10, 20);
    assert_eq!(&part[..10], &pattern(1, c)[c - 10..]);
    assert_eq!(&part[10..], &[0; 10]);
    let (part, _) = read(&b, 3 * cs + 1000, 3000);
    assert_eq!(&part[..], &pattern(4, c)[1000..4000]);
    let e = b.extents(0, 8 * cs).unwrap();
    let ext = |len, hole, zero| Extent { len, hole, zero };
    assert_eq!(
        e,
        vec![
            ext(cs, false, false),
            ext(cs, true, true),
            ext(cs, false, true),
            ext(cs, false, false),
            ext(cs, true, true),
            ext(cs, false, false),
            ext(2 * cs, true, true),
        ]
    );
    assert_eq!(b.extents(cs + 5, 10).unwrap(), vec![ext(10, true, true)]);
    assert_eq!(b.extents(8 * cs, 10).unwrap(), vec![ext(10, true, true)]);
    let e = b.write(0, &[1], false).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permission);
    assert!(e.to_string().contains("the export is read-only"), "{e}");
    assert!(b.trim(0, 1, false).is_err() && b.write_zeroes(0, 1, ZeroFlags::default()).is_err());
    b.flush().unwrap();
}

#[test]
fn contiguous_data_clusters_read_in_one_piece_and_sizes_need_not_be_cluster_multiples() {
    let _serial = serial();
    // Version 2, 512-byte clusters, a size that ends mid-cluster.
    let mut img = Img::new(2, 9, 10 * 512 + 100);
    for i in 0..11 {
        img = img.with(i, Entry::Data(pattern(i as u8, 512)));
    }
    let dir = temp_dir("v2");
    let b = open(&write_file(&dir, "v2.qcow2", &img.build()));
    let (buf, holes) = read(&b, 0, 10 * 512 + 100);
    for i in 0..10 {
        assert_eq!(&buf[i * 512..(i + 1) * 512], &pattern(i as u8, 512)[..], "cluster {i}");
    }
    assert_eq!(&buf[5120..], &pattern(10, 512)[..100]);
    assert!(holes.0.is_empty());
    assert_eq!(b.extents(0, 1 << 20).unwrap(), vec![Extent { len: 5220, hole: false, zero: false }]);
}

#[test]
fn two_megabyte_clusters_and_unallocated_l2_ranges() {
    let _serial = serial();
    let cs = 1u64 << 21;
    // One L1 entry maps 2^39 bytes: a second L2 table far away.
    let size = (1u64 << 40) + cs;
    let img = Img::new(3, 21, size)
        .with(3, Entry::Data(pattern(3, cs as usize)))
        .with(1 << 18, Entry::Zero { alloc: false });
    let dir = temp_dir("2m");
    let b = open(&write_file(&dir, "big.qcow2", &img.build()));
    let (buf, _) = read(&b, 3 * cs - 4, 8);
    assert_eq!(&buf[..4], &[0; 4]);
    assert_eq!(&buf[4..], &pattern(3, cs as usize)[..4]);
    let e = b.extents(0, size).unwrap();
    assert_eq!(e[0], Extent { len: 3 * cs, hole: true, zero: true });
    assert_eq!(e[1], Extent { len: cs, hole: false, zero: false });
    assert!(e.len() == 3 && e[2].hole && e[2].zero, "{e:?}");
    // From the second L1 entry: a zero cluster among unallocated ones, one
    // hole, as far as one call scans (one L2 table's 2^18 clusters).
    let e = b.extents(1 << 39, size - (1 << 39)).unwrap();
    assert_eq!(e, vec![Extent { len: 1 << 39, hole: true, zero: true }]);
    // The third L1 entry has no L2 table: skipped whole.
    assert_eq!(b.extents(1 << 40, cs).unwrap(), vec![Extent { len: cs, hole: true, zero: true }]);
}

#[test]
fn backing_chains_resolve_relative_names_and_read_through() {
    let _serial = serial();
    let cs = 1u64 << 16;
    let dir = temp_dir("chain");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    // raw (shorter than the images above) <- qcow2 (probed: no format) <- top.
    write_file(&dir, "sub/base.raw", &pattern(9, 3 * cs as usize));
    let mid = Img {
        backing: Some("base.raw".into()),
        backing_format: Some("raw".into()),
        ..Img::new(3, 16, 6 * cs).with(1, Entry::Data(pattern(2, cs as usize)))
    };
    write_file(&dir, "sub/mid.qcow2", &mid.build());
    let top = Img { backing: Some("sub/mid.qcow2".into()), ..Img::new(3, 16, 8 * cs) }
        .with(0, Entry::Data(pattern(1, cs as usize)))
        .with(2, Entry::Zero { alloc: false });
    let path = write_file(&dir, "top.qcow2", &top.build());
    let b = open(&path);
    assert!(
        b.describe().contains("backing qcow2 v3") && b.describe().contains("backing raw"),
        "{}",
        b.describe()
    );
    let (buf, holes) = read(&b, 0, 8 * cs as usize);
    let c = cs as usize;
    assert_eq!(&buf[..c], &pattern(1, c)[..], "top's own data");
    assert_eq!(&buf[c..2 * c], &pattern(2, c)[..], "mid's data");
    assert!(buf[2 * c..3 * c].iter().all(|&x| x == 0), "top's zero cluster hides the raw file");
    assert!(buf[3 * c..].iter().all(|&x| x == 0), "past the raw file's end, and past mid's");
    assert_eq!(holes.0, vec![2 * c..8 * c]);
    // Through the chain: cluster 0 of mid is unallocated: the raw file's bytes.
    let top2 = Img { backing: Some("sub/mid.qcow2".into()), ..Img::new(3, 16, 8 * cs) };
    let b2 = open(&write_file(&dir, "top2.qcow2", &top2.build()));
    let (buf, _) = read(&b2, 0, c);
    assert_eq!(&buf[..], &pattern(9, 3 * c)[..c]);
    let e = b2.extents(0, 8 * cs).unwrap();
    assert_eq!(e[0], Extent { len: 3 * cs, hole: false, zero: false }, "{e:?}");
    assert_eq!(e[1], Extent { len: 5 * cs, hole: true, zero: true }, "{e:?}");
    // Opened relative to the working directory too (as given).
    let back = std::env::current_dir().unwrap();
    let rel = pathdiff(&path, &back);
    assert!(Qcow2Backend::open(&rel, true).is_ok(), "{}", rel.display());
}

/// `path` relative to `base` (both absolute), through `..` as needed.
fn pathdiff(path: &Path, base: &Path) -> PathBuf {
    let ups = base.components().count() - 1;
    let mut p = PathBuf::new();
    for _ in 0..ups {
        p.push("..");
    }
    p.join(path.strip_prefix("/").unwrap())
}

#[test]
fn backing_loops_missing_files_protocols_and_deep_chains_are_refused() {
    let _serial = serial();
    let dir = temp_dir("loops");
    let img = |b: &str| Img { backing: Some(b.into()), ..Img::new(3, 16, 1 << 16) }.build();
    write_file(&dir, "self.qcow2", &img("self.qcow2"));
    let e = open_err(&dir.join("self.qcow2")).to_string();
    assert!(e.contains("already in the chain"), "{e}");
    write_file(&dir, "orphan.qcow2", &img("gone.raw"));
    let e = open_err(&dir.join("orphan.qcow2")).to_string();
    assert!(e.contains("orphan.qcow2") && e.contains("\"gone.raw\"") && e.contains("No such file"), "{e}");
    write_file(&dir, "proto.qcow2", &img("nbd://host/x"));
    let e = open_err(&dir.join("proto.qcow2")).to_string();
    assert!(e.contains("names a protocol"), "{e}");
    let fmt =
        Img { backing: Some("b".into()), backing_format: Some("vmdk".into()), ..Img::new(3, 16, 1 << 16) };
    let e = open_err(&write_file(&dir, "vmdk.qcow2", &fmt.build())).to_string();
    assert!(e.contains("backing format") && e.contains("vmdk"), "{e}");
    for i in 0..=MAX_CHAIN_DEPTH + 1 {
        write_file(&dir, &format!("c{i}.qcow2"), &img(&format!("c{}.qcow2", i + 1)));
    }
    write_file(&dir, &format!("c{}.qcow2", MAX_CHAIN_DEPTH + 2), &Img::new(3, 16, 1 << 16).build());
    let e = open_err(&dir.join("c0.qcow2")).to_string();
    assert!(e.contains("deeper than 40"), "{e}");
    assert!(Qcow2Backend::open(&dir.join("c2.qcow2"), true).is_ok(), "40 below the top is allowed");
}

/// The refusal of an image, as (kind, message).
fn refusal(bytes: &[u8]) -> (ErrorKind, String) {
    let dir = temp_dir("refuse");
    let e = open_err(&write_file(&dir, "bad.qcow2", bytes));
    (e.kind, e.to_string())
}

#[test]
fn unsupported_images_are_refused_with_the_field_and_reason() {
    let _serial = serial();
    let base = || Img::new(3, 16, 1 << 20);
    let feature_table = |bit: u8, name: &str| {
        let mut e = vec![0u8, bit];
        e.extend_from_slice(name.as_bytes());
        e.resize(48, 0);
        e
    };
    let cases: Vec<(Img, &str)> = vec![
        (Img { crypt: 2, ..base() }, "crypt_method: 2 (LUKS encryption)"),
        (Img { crypt: 1, ..base() }, "crypt_method: 1 (AES encryption)"),
        (Img { extensions: vec![(EXT_CRYPTO, vec![0; 16])], ..base() }, "full disk encryption"),
        (Img { incompat: INCOMPAT_CORRUPT, ..base() }, "bit 1 (corrupt)"),
        (Img { incompat: INCOMPAT_DATA_FILE, ..base() }, "bit 2 (external data file)"),
        (Img { incompat: INCOMPAT_COMPRESSION, compression_type: 1, ..base() }, "1 (zstd)"),
        (Img { incompat: INCOMPAT_COMPRESSION, compression_type: 7, ..base() }, "7 is unknown"),
        (Img { incompat: INCOMPAT_EXTL2, ..base() }, "bit 4 (extended L2"),
        (
            Img {
                incompat: 1 << 9,
                extensions: vec![(EXT_FEATURE_NAMES, feature_table(9, "warp drive"))],
                ..base()
            },
            "unknown bit 9 (\"warp drive\")",
        ),
        (Img { version: 4, ..base() }, "version: 4"),
    ];
    for (img, want) in cases {
        let (kind, msg) = refusal(&img.build());
        assert_eq!(kind, ErrorKind::Unsupported, "{msg}");
        assert!(msg.contains(want) && msg.contains("bad.qcow2"), "want {want:?} in {msg:?}");
    }
}

#[test]
fn malformed_images_are_refused_never_read() {
    let _serial = serial();
    let base = || Img::new(3, 16, 1 << 20);
    let set = |mut b: Vec<u8>, at: usize, v: &[u8]| {
        b[at..at + v.len()].copy_from_slice(v);
        b
    };
    let good = base().with(0, Entry::Data(vec![1; 1 << 16])).build();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (set(good.clone(), 0, b"QFI\0"), "field magic"),
        (good[..50].to_vec(), "too short"),
        (set(good.clone(), 20, &8u32.to_be_bytes()), "cluster_bits: 8 is outside 9..=21"),
        (set(good.clone(), 20, &22u32.to_be_bytes()), "cluster_bits: 22"),
        (set(good.clone(), 36, &0u32.to_be_bytes()), "l1_size: 0 entries cannot map"),
        (set(good.clone(), 24, &(1u64 << 63).to_be_bytes()), "field size"),
        (set(good.clone(), 40, &0x2_0200u64.to_be_bytes()), "l1_table_offset: 0x20200 is not aligned"),
        (set(good.clone(), 40, &(1u64 << 40).to_be_bytes()), "l1_table_offset: the table at 0x10000000000"),
        (set(good.clone(), 48, &(1u64 << 40).to_be_bytes()), "refcount_table_offset"),
        (set(good.clone(), 56, &0u32.to_be_bytes()), "no refcount table"),
        (set(good.clone(), 100, &100u32.to_be_bytes()), "header_length: 100"),
        (set(good.clone(), 96, &7u32.to_be_bytes()), "refcount_order: 7"),
        (set(good.clone(), 104, &[1]), "yet incompatible bit 3 is clear"),
        (set(good.clone(), 112, &[0, 0, 0, 9, 0, 1, 0, 0]), "header extension"),
        (Img { incompat: INCOMPAT_COMPRESSION, ..base() }.build(), "deflate, yet incompatible bit 3 is set"),
        (Img { backing: Some("x".repeat(1024)), ..base() }.build(), "backing_file_size: 1024"),
        (set(good.clone(), 8, &(1u64 << 17).to_be_bytes()), "backing_file_offset"),
        (
            Img { l1_override: [(0, 1u64 << 40)].into(), ..base() }.build(),
            "L1 index 0: L2 table at 0x10000000000",
        ),
        (Img { l1_override: [(0, 0x3_0000 | 4)].into(), ..base() }.build(), "reserved bits"),
    ];
    for (bytes, want) in cases {
        let (kind, msg) = refusal(&bytes);
        assert_eq!(kind, ErrorKind::Invalid, "{msg}");
        assert!(msg.contains(want) && msg.contains("bad.qcow2"), "want {want:?} in {msg:?}");
    }
}

#[test]
fn corrupt_clusters_fail_the_read_not_the_server() {
    let _serial = serial();
    let cs = 1u64 << 16;
    let img = Img::new(3, 16, 8 * cs)
        .with(0, Entry::Raw(COPIED | (1 << 40)))
        .with(1, Entry::Raw(COPIED | 0x3_1000))
        .with(2, Entry::Raw(COMPRESSED | (1 << 54) | 0x1_0000))
        .with(3, Entry::Data(pattern(3, cs as usize)));
    let dir = temp_dir("corrupt");
    let b = open(&write_file(&dir, "c.qcow2", &img.build()));
    let fail = |off: u64, want: &str| {
        let mut buf = vec![0u8; 512];
        let e = b.read(off, &mut buf).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Io, "{e}");
        assert!(e.to_string().contains(want) && e.to_string().contains("c.qcow2"), "want {want:?} in {e}");
    };
    fail(0, "past the end of the file");
    fail(cs, "not cluster-aligned");
    fail(2 * cs, "compressed cluster at 0x10000");
    assert!(b.extents(0, cs).is_err());
    let (buf, _) = read(&b, 3 * cs, 16);
    assert_eq!(&buf[..], &pattern(3, cs as usize)[..16], "the good cluster still reads");
}

#[test]
fn fuzz_entry_point_reads_hand_made_images() {
    let _serial = serial();
    let cs = 1u64 << 12;
    let img = Img::new(3, 12, 16 * cs)
        .with(0, Entry::Data(pattern(1, cs as usize)))
        .with(2, Entry::Compressed(vec![7; cs as usize]))
        .with(3, Entry::Zero { alloc: true });
    assert_eq!(fuzz_image(&img.build()), Ok(5 * cs as usize), "five extents, 4 KiB of each");
    assert!(fuzz_write(&img.build()).is_ok_and(|n| n > img.build().len()), "writing grew the file");
    assert!(fuzz_image(b"QFI\xfb").is_err());
    assert!(fuzz_image(&[]).is_err());
    // A seed for fuzz/seeds/qcow2_header (regenerate with RINGBD_WRITE_SEED=DIR).
    // Seeds are at most 8 KiB (scripts/fuzz.sh's -max_len): 512-byte clusters.
    let small = Img::new(3, 9, 64 * 512)
        .with(0, Entry::Data(pattern(1, 512)))
        .with(1, Entry::Zero { alloc: false })
        .with(2, Entry::Zero { alloc: true })
        .with(3, Entry::Compressed(vec![7; 512]))
        .with(40, Entry::Data(pattern(2, 512)));
    assert_eq!(fuzz_image(&small.build()), Ok(5 * 512 + 2 * 4096), "seven extents, up to 4 KiB of each");
    if let Some(d) = std::env::var_os("RINGBD_WRITE_SEED") {
        std::fs::write(Path::new(&d).join("hand-made-v3-512-every-kind"), small.build()).unwrap();
        let v2 = Img { backing: Some("base.raw".into()), ..Img::new(2, 9, 4096) };
        std::fs::write(
            Path::new(&d).join("hand-made-v2-512-backing"),
            v2.with(1, Entry::Data(vec![5; 512])).build(),
        )
        .unwrap();
    }
}

// ---- images made by qemu ----

/// The qcow2 tests that touch files run one at a time ([`serial`]): a
/// child process holds copies of its parent's open file descriptions from
/// fork until its exec has closed them (which the parent does not wait
/// for: it resumes when the child's exec replaced its memory), and with
/// them the image locks of a file another test just closed; a test that
/// reopened that file then would see another process's lock.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(super) fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// `cmd`'s output (stdin closed).
pub(super) fn output(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    cmd.stdin(std::process::Stdio::null()).output()
}

pub(super) fn run(argv: &[&str]) -> String {
    let out = output(Command::new(argv[0]).args(&argv[1..]))
        .unwrap_or_else(|e| panic!("{} (qemu-utils; scripts/install-deps.sh): {e}", argv[0]));
    assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The bytes qemu-io reads from `path` (as a qcow2 image).
pub(super) fn qemu_reads(path: &Path, len: u64) -> Vec<u8> {
    let dir = path.parent().unwrap();
    let raw = dir.join("qemu-view.raw");
    run(&["qemu-img", "convert", "-O", "raw", path.to_str().unwrap(), raw.to_str().unwrap()]);
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(bytes.len() as u64, len);
    bytes
}

#[test]
fn qemu_made_images_read_as_qemu_reads_them() {
    let _serial = serial();
    let dir = temp_dir("qemu");
    for (cluster, version) in [("512", "1.1"), ("4k", "1.1"), ("64k", "0.10"), ("2M", "1.1")] {
        let p = dir.join(format!("img-{cluster}.qcow2"));
        let ps = p.to_str().unwrap();
        let opts = format!("cluster_size={cluster},compat={version}");
        run(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", &opts, ps, "8M"]);
        for cmd in
            ["write -P 0x5a 0 64k", "write -P 0x33 1M 4k", "write -P 0x44 3M 2M", "write -z 3584k 512k"]
        {
            run(&["qemu-io", "-f", "qcow2", "-c", cmd, ps]);
        }
        let b = open(&p);
        let (buf, _) = read(&b, 0, 8 << 20);
        assert!(buf == qemu_reads(&p, 8 << 20), "{cluster} clusters: bytes differ from qemu's");
        assert!(buf[..65536].iter().all(|&x| x == 0x5a));
        let e = b.extents(0, 8 << 20).unwrap();
        assert_eq!(e.iter().map(|x| x.len).sum::<u64>(), 8 << 20, "{e:?}");
        assert!(
            e[0] == Extent { len: 64 << 10, hole: false, zero: false } || cluster == "2M",
            "{cluster}: {e:?}"
        );
    }
}

#[test]
fn qemu_compressed_images_and_backing_chains() {
    let _serial = serial();
    let dir = temp_dir("qemu-chain");
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let raw = dir.join("base.raw");
    run(&["qemu-img", "create", "-q", "-f", "raw", &s(&raw), "4M"]);
    run(&["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", &s(&raw)]);
    let mid = dir.join("mid.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &s(&mid), "6M"]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 512k 1M", &s(&mid)]);
    let top = dir.join("top.qcow2");
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &s(&top),
        "8M",
    ]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 1020k 8k", "-c", "write -z 0 4k", &s(&top)]);
    let b = open(&top);
    let (buf, _) = read(&b, 0, 8 << 20);
    assert!(buf == qemu_reads(&top, 8 << 20), "the chain reads as qemu reads it");
    assert_eq!(buf[4096], 0x11);
    assert_eq!(buf[600 << 10], 0x22);
    assert_eq!(buf[1021 << 10], 0x33);
    // A compressed copy of the flattened chain.
    let comp = dir.join("comp.qcow2");
    run(&["qemu-img", "convert", "-q", "-c", "-O", "qcow2", &s(&top), &s(&comp)]);
    let info = run(&["qemu-img", "info", &s(&comp)]);
    assert!(!info.contains("backing file"), "{info}");
    let c = open(&comp);
    let (cbuf, _) = read(&c, 0, 8 << 20);
    assert!(cbuf == buf, "the compressed copy reads the same");
    // Encrypted images are refused.
    let enc = dir.join("enc.qcow2");
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=x",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        &s(&enc),
        "1M",
    ]);
    let e = open_err(&enc).to_string();
    assert!(e.contains("crypt_method: 2 (LUKS encryption)"), "{e}");
}
