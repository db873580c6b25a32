//! Writing qcow2 images: random mixes of writes, discards and zeroes on
//! images qemu-img makes, checked against a model of the disk, against
//! what qemu reads from the file afterwards, and with `qemu-img check`
//! (no errors, no leaks); crashes (the backend dropped without closing)
//! leave everything flushed intact and nothing worse than leaks.

use std::path::Path;
use std::process::Command;

use super::header::INCOMPAT_DIRTY;
use super::tests::{open as open_ro, output, qemu_reads, read, run, serial, temp_dir};
use super::*;

pub(super) fn open_rw(path: &Path) -> Qcow2Backend {
    Qcow2Backend::open(path, false).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// `qemu-img check`: the output, and whether it found no errors (exit 0:
/// nothing; 3: leaked clusters only; 2: errors).
fn check(path: &Path) -> (i32, String) {
    let out = output(Command::new("qemu-img").args(["check", path.to_str().unwrap()])).expect("qemu-img");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

pub(super) fn assert_clean(path: &Path, what: &str) {
    let (code, text) = check(path);
    assert_eq!(code, 0, "{what}: qemu-img check: {text}");
}

/// A small deterministic generator (xorshift64*).
pub(super) struct Rng(pub u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The disk as the guest should read it, and how a discard changes it.
struct Model {
    disk: Vec<u8>,
    cluster: u64,
    /// A discard leaves the backing file's data (version 2 with a backing file).
    trim_keeps: bool,
}

impl Model {
    fn trim(&mut self, off: u64, len: u64) {
        if self.trim_keeps {
            return;
        }
        let (cs, size, end) = (self.cluster, self.disk.len() as u64, off + len);
        let a = off.next_multiple_of(cs);
        let b = if end >= size { size } else { end & !(cs - 1) };
        if a < b {
            self.disk[a as usize..b as usize].fill(0);
        }
    }
}

/// Runs `ops` random operations on `b`, checking reads against the model
/// as it goes; flushes every so often.
fn random_ops(b: &Qcow2Backend, m: &mut Model, rng: &mut Rng, ops: usize) {
    let size = m.disk.len() as u64;
    for i in 0..ops {
        let max_len = if rng.below(4) == 0 { 600 << 10 } else { 12 << 10 };
        let len = 1 + rng.below(max_len.min(size));
        let off = rng.below(size - len + 1);
        let off = if rng.below(2) == 0 { off & !511 } else { off };
        match rng.below(10) {
            0..=5 => {
                let seed = rng.next() as u8;
                let data: Vec<u8> = (0..len).map(|k| (k as u8).wrapping_mul(7) ^ seed | 1).collect();
                b.write(off, &data, rng.below(8) == 0).unwrap();
                m.disk[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            6 | 7 => {
                let flags = ZeroFlags { no_hole: rng.below(2) == 0, ..ZeroFlags::default() };
                b.write_zeroes(off, len, flags).unwrap();
                m.disk[off as usize..(off + len) as usize].fill(0);
            }
            8 => {
                b.trim(off, len, false).unwrap();
                m.trim(off, len);
            }
            _ => b.flush().unwrap(),
        }
        if i % 16 == 15 {
            let at = rng.below(size - 4096);
            let (got, _) = read(b, at, 4096);
            assert!(got == m.disk[at as usize..at as usize + 4096], "op {i}: read at {at} differs");
        }
    }
}

fn create(path: &Path, opts: &str, size: &str) {
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path.to_str().unwrap(), size]);
}

#[test]
fn random_writes_discards_and_zeroes_read_back_and_check_clean() {
    let _serial = serial();
    let dir = temp_dir("write-mix");
    // Sizes not a multiple of the cluster: the last cluster is partial.
    let configs = [
        ("cluster_size=512", 8 << 20),
        ("cluster_size=4k,compat=0.10", (8 << 20) + 3584),
        ("cluster_size=64k,refcount_bits=1", (8 << 20) + 512),
        ("cluster_size=64k,refcount_bits=64", 8 << 20),
        ("cluster_size=2M,refcount_bits=4", (9 << 20) + 1024),
    ];
    for (n, (opts, size)) in configs.into_iter().enumerate() {
        let p = dir.join(format!("mix-{n}.qcow2"));
        create(&p, opts, &size.to_string());
        let cluster = Qcow2Backend::open(&p, true).unwrap().header().cluster_size();
        let mut m = Model { disk: vec![0; size as usize], cluster, trim_keeps: false };
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 + n as u64);
        let table_before = open_ro(&p).header().refcount_table_clusters;
        {
            let b = open_rw(&p);
            // The whole disk once, then the mix.
            for at in (0..size).step_by(1 << 20) {
                let len = (1u64 << 20).min(size - at);
                let data = vec![(at >> 20) as u8 | 0x80; len as usize];
                b.write(at, &data, false).unwrap();
                m.disk[at as usize..(at + len) as usize].copy_from_slice(&data);
            }
            random_ops(&b, &mut m, &mut rng, 300);
            let (all, _) = read(&b, 0, size as usize);
            assert!(all == m.disk, "{opts}: the export reads what was written");
        }
        assert_clean(&p, opts);
        assert!(qemu_reads(&p, size) == m.disk, "{opts}: qemu reads what was written");
        let header = open_ro(&p).header().clone();
        if opts == "cluster_size=512" {
            // 512-byte clusters: 8 MiB needs 64 refcount blocks of 256; the table grew.
            assert!(header.refcount_table_clusters > table_before, "{header:?}");
        }
        // Reopened for writing, it goes on.
        {
            let b = open_rw(&p);
            random_ops(&b, &mut m, &mut rng, 100);
        }
        assert_clean(&p, opts);
        assert!(qemu_reads(&p, size) == m.disk, "{opts}: after a second session");
    }
}

#[test]
fn writes_over_backing_files_copy_what_they_do_not_cover() {
    let _serial = serial();
    let dir = temp_dir("write-backing");
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let base = dir.join("base.raw");
    run(&["qemu-img", "create", "-q", "-f", "raw", &s(&base), "6M"]);
    run(&["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 5M", &s(&base)]);
    for compat in ["1.1", "0.10"] {
        let top = dir.join(format!("top-{compat}.qcow2"));
        let opts = format!("cluster_size=4k,compat={compat}");
        run(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            "-b",
            "base.raw",
            "-F",
            "raw",
            &s(&top),
            "8M",
        ]);
        let mut disk = vec![0u8; 8 << 20];
        disk[..5 << 20].fill(0x11);
        let mut m = Model { disk, cluster: 4096, trim_keeps: compat == "0.10" };
        {
            let b = open_rw(&top);
            // A partial cluster keeps the backing file's bytes around it.
            b.write(4096 + 100, &[0x22; 50], false).unwrap();
            m.disk[4196..4246].fill(0x22);
            let (c, _) = read(&b, 4096, 4096);
            assert!(c == m.disk[4096..8192], "{compat}: copy-on-write from the backing file");
            // Zeroes hide the backing file.
            b.write_zeroes(64 << 10, 64 << 10, ZeroFlags::default()).unwrap();
            m.disk[64 << 10..128 << 10].fill(0);
            let mut rng = Rng(77);
            random_ops(&b, &mut m, &mut rng, 300);
            let (all, _) = read(&b, 0, 8 << 20);
            assert!(all == m.disk, "{compat}: the export reads the model");
        }
        assert_clean(&top, &opts);
        assert!(qemu_reads(&top, 8 << 20) == m.disk, "{compat}: qemu reads the model");
    }
}

#[test]
fn compressed_clusters_are_rewritten_and_freed() {
    let _serial = serial();
    let dir = temp_dir("write-compressed");
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let src = dir.join("src.qcow2");
    create(&src, "cluster_size=64k", "4M");
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 3M", &s(&src)]);
    let comp = dir.join("comp.qcow2");
    run(&["qemu-img", "convert", "-q", "-c", "-O", "qcow2", &s(&src), &s(&comp)]);
    let mut m = Model { disk: vec![0; 4 << 20], cluster: 64 << 10, trim_keeps: false };
    m.disk[..3 << 20].fill(0x5a);
    {
        let b = open_rw(&comp);
        b.write(100, &[1; 10], false).unwrap();
        m.disk[100..110].fill(1);
        b.trim(1 << 20, 1 << 20, false).unwrap();
        m.trim(1 << 20, 1 << 20);
        let mut rng = Rng(5);
        random_ops(&b, &mut m, &mut rng, 100);
    }
    assert_clean(&comp, "compressed");
    assert!(qemu_reads(&comp, 4 << 20) == m.disk, "qemu reads the model");
}

#[test]
fn a_crash_keeps_what_was_flushed_and_leaks_at_most() {
    let _serial = serial();
    let dir = temp_dir("write-crash");
    for (n, opts) in ["cluster_size=64k", "cluster_size=4k,compat=0.10"].into_iter().enumerate() {
        let p = dir.join(format!("crash-{n}.qcow2"));
        create(&p, opts, "16M");
        let mut m = Model { disk: vec![0; 16 << 20], cluster: 1, trim_keeps: false };
        let b = open_rw(&p);
        m.cluster = b.header().cluster_size();
        let mut rng = Rng(99 + n as u64);
        random_ops(&b, &mut m, &mut rng, 200);
        b.flush().unwrap();
        let flushed = m.disk.clone();
        // Unflushed changes to the second half only, then the process "dies":
        // nothing more reaches the file.
        let half = 8u64 << 20;
        for i in 0..40u64 {
            let off = half + rng.below(half - 70_000);
            match i % 3 {
                0 => b.write(off, &vec![0xee; 70_000], false).unwrap(),
                1 => b.trim(off, 70_000, false).unwrap(),
                _ => b.write_zeroes(off, 70_000, ZeroFlags::default()).unwrap(),
            }
        }
        b.abandon();
        let (code, text) = check(&p);
        assert!(code == 0 || code == 3, "{opts}: after a crash, leaks at most: {text}");
        let after = qemu_reads(&p, 16 << 20);
        assert!(after[..half as usize] == flushed[..half as usize], "{opts}: flushed data is intact");
        // Reopened, it is written on and closes without errors.
        {
            let b = open_rw(&p);
            b.write(0, &[3; 4096], true).unwrap();
        }
        let (code, text) = check(&p);
        assert!(code == 0 || code == 3, "{opts}: {text}");
    }
}

#[test]
fn concurrent_writers_and_readers_on_one_image() {
    let _serial = serial();
    let dir = temp_dir("write-threads");
    let p = dir.join("t.qcow2");
    create(&p, "cluster_size=4k", "16M");
    let b = std::sync::Arc::new(open_rw(&p));
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let b = b.clone();
            std::thread::spawn(move || {
                // Each thread owns every fourth 64 KiB stripe.
                for round in 0..3u8 {
                    for stripe in (u64::from(t)..256).step_by(4) {
                        let data = vec![t * 16 + round + 1; 64 << 10];
                        b.write(stripe << 16, &data, false).unwrap();
                        let (got, _) = read(&b, stripe << 16, 64 << 10);
                        assert!(got == data, "thread {t} stripe {stripe}");
                    }
                    b.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(b);
    assert_clean(&p, "threads");
    let disk = qemu_reads(&p, 16 << 20);
    for stripe in 0..256u64 {
        assert_eq!(disk[(stripe << 16) as usize], (stripe % 4) as u8 * 16 + 3, "stripe {stripe}");
    }
}

#[test]
fn fast_zero_and_read_only_exports_refuse_without_writing() {
    let _serial = serial();
    let dir = temp_dir("write-refuse");
    let p = dir.join("r.qcow2");
    create(&p, "cluster_size=64k", "1M");
    {
        let b = open_rw(&p);
        b.write(0, &[9; 1 << 20], false).unwrap();
        let fast = ZeroFlags { fast: true, ..ZeroFlags::default() };
        let e = b.write_zeroes(100, 1000, fast).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unsupported, "{e}");
        let (got, _) = read(&b, 0, 4096);
        assert!(got.iter().all(|&x| x == 9), "a refused fast zero wrote nothing");
        b.write_zeroes(64 << 10, 128 << 10, fast).unwrap();
        assert_eq!(
            b.extents(64 << 10, 128 << 10).unwrap()[0],
            Extent { len: 128 << 10, hole: true, zero: true }
        );
        let keep = ZeroFlags { no_hole: true, ..ZeroFlags::default() };
        b.write_zeroes(256 << 10, 64 << 10, keep).unwrap();
        assert_eq!(
            b.extents(256 << 10, 64 << 10).unwrap()[0],
            Extent { len: 64 << 10, hole: false, zero: true }
        );
    }
    assert_clean(&p, "fast zero");
    let ro = open_ro(&p);
    assert!(ro.caps().read_only);
    assert_eq!(ro.write(0, &[1], false).unwrap_err().kind, ErrorKind::Permission);
    drop(ro);
    // Internal snapshots share clusters: written never, read freely.
    run(&["qemu-img", "snapshot", "-c", "s1", p.to_str().unwrap()]);
    let e = Qcow2Backend::open(&p, false).err().unwrap();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    assert!(e.to_string().contains("1 internal snapshots"), "{e}");
    open_ro(&p);
}

#[test]
fn a_dirty_image_is_read_as_it_is_and_repaired_before_writing() {
    let _serial = serial();
    let dir = temp_dir("write-dirty");
    for (n, opts) in ["cluster_size=64k", "cluster_size=512,refcount_bits=8"].into_iter().enumerate() {
        let p = dir.join(format!("dirty-{n}.qcow2"));
        create(&p, &format!("{opts},lazy_refcounts=on"), "8M");
        // qemu with lazy refcounts dies after a flush: the tables are on
        // disk, the refcounts are not, the dirty bit is set.
        let ps = p.to_str().unwrap();
        let out = output(Command::new("qemu-io").args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 3M 100k",
            "-c",
            "flush",
            "-c",
            "abort",
            ps,
        ]))
        .expect("qemu-io");
        assert!(!out.status.success(), "qemu-io abort exits by a signal");
        assert_ne!(
            open_ro(&p).header().incompatible_features & INCOMPAT_DIRTY,
            0,
            "{opts}: the image is dirty"
        );
        let (code, text) = check(&p);
        assert_eq!(code, 2, "{opts}: qemu-img check sees the stale refcounts: {text}");
        let mut m = Model { disk: vec![0; 8 << 20], cluster: 1, trim_keeps: false };
        m.disk[..1 << 20].fill(0x11);
        m.disk[3 << 20..(3 << 20) + 102_400].fill(0x22);
        // Read-only: read as it is, nothing written.
        let before = std::fs::read(&p).unwrap();
        {
            let b = open_ro(&p);
            let (all, _) = read(&b, 0, 8 << 20);
            assert!(all == m.disk, "{opts}: a dirty image reads what qemu wrote");
        }
        assert!(std::fs::read(&p).unwrap() == before, "{opts}: a read-only open changed the file");
        // Read-write: repaired first.
        {
            let b = open_rw(&p);
            m.cluster = b.header().cluster_size();
            assert_eq!(b.header().incompatible_features & INCOMPAT_DIRTY, 0);
            let (all, _) = read(&b, 0, 8 << 20);
            assert!(all == m.disk, "{opts}: the repair kept the data");
        }
        assert_clean(&p, opts);
        {
            let b = open_rw(&p);
            random_ops(&b, &mut m, &mut Rng(11 + n as u64), 150);
        }
        assert_clean(&p, opts);
        assert!(
            qemu_reads(&p, 8 << 20) == m.disk,
            "{opts}: qemu reads the model after the repair and writes"
        );
    }
}

#[test]
fn qemu_image_locks_keep_writers_apart() {
    let _serial = serial();
    let dir = temp_dir("write-locks");
    let p = dir.join("l.qcow2");
    create(&p, "cluster_size=64k", "1M");
    let ps = p.to_str().unwrap();
    let qemu = |args: &[&str]| {
        let out = output(Command::new(args[0]).args(&args[1..])).expect("qemu tool");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    {
        let w = open_rw(&p);
        // A second writer, and a reader that needs consistent reads, are refused.
        let e = Qcow2Backend::open(&p, false).err().expect("a second writer opened");
        assert!(e.to_string().contains("the image is locked"), "{e}");
        let e = Qcow2Backend::open(&p, true).err().expect("a reader opened beside a writer");
        assert!(e.to_string().contains("\"write\" permission"), "{e}");
        let (ok, err) = qemu(&["qemu-img", "info", ps]);
        assert!(!ok && err.contains("lock"), "qemu-img info beside a writer: {err}");
        // qemu's force-share still reads.
        assert!(qemu(&["qemu-img", "info", "-U", ps]).0);
        w.write(0, &[1; 4096], false).unwrap();
    }
    {
        // Readers share; qemu cannot write under them.
        let _a = open_ro(&p);
        let _b = open_ro(&p);
        let (ok, err) = qemu(&["qemu-io", "-f", "qcow2", "-c", "write 0 4k", ps]);
        assert!(!ok && err.contains("lock"), "qemu-io wrote under a ringbd reader: {err}");
        assert!(qemu(&["qemu-img", "info", ps]).0, "a qemu reader beside ringbd readers");
    }
    // And ringbd cannot write under qemu: qemu-nbd holds the image
    // (`--fork` returns once it serves).
    let sock = dir.join("q.sock");
    let pid = dir.join("q.pid");
    let (ok, err) = qemu(&[
        "qemu-nbd",
        "--fork",
        "-f",
        "qcow2",
        "-k",
        sock.to_str().unwrap(),
        "--pid-file",
        pid.to_str().unwrap(),
        ps,
    ]);
    assert!(ok, "qemu-nbd: {err}");
    let refused = Qcow2Backend::open(&p, false).err().map(|e| e.to_string());
    let pid = std::fs::read_to_string(&pid).unwrap();
    let kill = |args: &[&str]| output(Command::new("kill").args(args)).is_ok_and(|o| o.status.success());
    assert!(kill(&[pid.trim()]), "kill qemu-nbd");
    // qemu-nbd releases the image when it exits: wait for that.
    while kill(&["-0", pid.trim()]) {
        std::thread::yield_now();
    }
    let refused = refused.expect("ringbd opened for writing an image qemu-nbd serves");
    assert!(refused.contains("the image is locked"), "{refused}");
    assert_clean(&p, "locks");
}

#[test]
fn direct_io_for_aligned_data_clusters() {
    let _serial = serial();
    let dir = temp_dir("write-direct");
    let p = dir.join("d.qcow2");
    create(&p, "cluster_size=64k", "8M");
    let mut m = Model { disk: vec![0; 8 << 20], cluster: 64 << 10, trim_keeps: false };
    {
        let b = Qcow2Backend::open_with(&p, false, true).unwrap_or_else(|e| panic!("{e}"));
        assert!(b.describe().contains("O_DIRECT"), "{}", b.describe());
        let d = b.top().direct.as_ref().expect("an O_DIRECT descriptor");
        // A page-aligned buffer: whole clusters go through O_DIRECT.
        let mut backing = vec![0u8; (1 << 20) + 4096];
        let skew = backing.as_ptr().align_offset(4096);
        let buf = &mut backing[skew..skew + (1 << 20)];
        buf.iter_mut().enumerate().for_each(|(i, x)| *x = (i / 4096) as u8 | 1);
        b.write(2 << 20, buf, false).unwrap();
        m.disk[2 << 20..3 << 20].copy_from_slice(buf);
        let before = d.ops.load(std::sync::atomic::Ordering::Relaxed);
        assert!(before > 0, "the allocating write of whole clusters went through O_DIRECT");
        buf.fill(0);
        b.read(2 << 20, buf).unwrap();
        assert!(buf == &m.disk[2 << 20..3 << 20]);
        assert!(
            d.ops.load(std::sync::atomic::Ordering::Relaxed) > before,
            "the aligned read went through O_DIRECT"
        );
        // Unaligned buffers and offsets take the page cache; everything agrees.
        random_ops(&b, &mut m, &mut Rng(21), 200);
        let (all, _) = read(&b, 0, 8 << 20);
        assert!(all == m.disk, "reads through both descriptors agree");
    }
    assert_clean(&p, "direct");
    assert!(qemu_reads(&p, 8 << 20) == m.disk, "qemu reads what was written through O_DIRECT");
}

#[test]
fn a_metadata_cluster_with_refcount_zero_is_never_allocated() {
    let _serial = serial();
    let dir = temp_dir("write-overlap");
    let p = dir.join("o.qcow2");
    create(&p, "cluster_size=64k", "8M");
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 64k", p.to_str().unwrap()]);
    // Zero the refcount of the L1 table's cluster by hand (16-bit refcounts).
    let mut bytes = std::fs::read(&p).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be(&bytes, 40);
    let block = be(&bytes, be(&bytes, 48) as usize) as usize;
    let at = block + 2 * (l1 >> 16) as usize;
    assert_eq!(&bytes[at..at + 2], &[0, 1], "the L1 table's refcount");
    bytes[at..at + 2].fill(0);
    std::fs::write(&p, &bytes).unwrap();
    let l1_before = bytes[l1 as usize..l1 as usize + 65536].to_vec();
    {
        let b = open_rw(&p);
        // An overwrite of an allocated cluster needs no allocation.
        b.write(0, &[7; 4096], false).unwrap();
        // An allocating write would take the "free" L1 cluster: refused.
        let e = b.write(1 << 20, &[8; 4096], false).unwrap_err();
        assert!(e.to_string().contains("the refcounts are inconsistent"), "{e}");
        let (got, _) = read(&b, 1 << 20, 4096);
        assert!(got.iter().all(|&x| x == 0), "the refused write left nothing");
    }
    let after = std::fs::read(&p).unwrap();
    assert!(after[l1 as usize..l1 as usize + 65536] == l1_before[..], "the L1 table was not overwritten");
    assert_eq!(qemu_reads(&p, 8 << 20)[..4096], [7; 4096]);
}
