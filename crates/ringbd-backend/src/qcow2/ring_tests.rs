//! The ring driver: many reads and writes in flight at once on images
//! qemu-img makes, checked against a model, `qemu-img check` and qemu's
//! reads; and the generation rule (a cluster freed while an operation
//! mapped to it is in flight is not reused until that operation is done).

use std::path::Path;
use std::sync::Arc;

use super::super::table::Cluster;
use super::super::tests::{qemu_reads, run, serial, temp_dir};
use super::super::write_tests::{assert_clean, open_rw, Rng};
use super::*;
use crate::aio::CompletionQueue;
use crate::qcow2::Qcow2Backend;

fn driver(b: &Qcow2Backend) -> (Driver, Arc<CompletionQueue>) {
    let q = Arc::new(CompletionQueue::new().unwrap());
    (Driver::new(b.export.clone(), &q).expect("a ring (io_uring)"), q)
}

/// Drives until every operation came back.
fn finish(d: &mut Driver) -> Vec<AioDone> {
    let mut out = Vec::new();
    for _ in 0..100_000 {
        d.drive(&mut out);
        if d.inflight() == 0 {
            return out;
        }
        d.ring.wait().unwrap();
    }
    panic!("operations on the ring did not finish");
}

#[test]
fn many_reads_and_writes_in_flight_match_a_model() {
    let _serial = serial();
    let dir = temp_dir("ring-mix");
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let base = dir.join("base.raw");
    run(&["qemu-img", "create", "-q", "-f", "raw", &s(&base), "4M"]);
    run(&["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 3M", &s(&base)]);
    let size: u64 = 8 << 20;
    // (options, a raw backing file, `,direct`: overwrites on the ring too)
    for (n, (opts, backing, direct)) in
        [("cluster_size=4k", false, false), ("cluster_size=64k", true, true)].into_iter().enumerate()
    {
        let p = dir.join(format!("ring-{n}.qcow2"));
        let mut args = vec!["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts];
        if backing {
            args.extend(["-b", "base.raw", "-F", "raw"]);
        }
        let ps = s(&p);
        args.extend([ps.as_str(), "8M"]);
        run(&args);
        let mut disk = vec![0u8; size as usize];
        if backing {
            disk[..3 << 20].fill(0x33);
        }
        let (mut ring_reads, mut ring_writes) = (0, 0);
        {
            let b = Qcow2Backend::open_with(&p, false, direct).unwrap();
            let (mut d, _q) = driver(&b);
            let mut rng = Rng(0x9e37_79b9 + n as u64);
            // Batches of operations on 16 disjoint slots of the disk, all
            // in flight together; between batches, a zeroing, a discard or
            // a flush.
            let slot = size / 16;
            for round in 0..40u64 {
                let mut expect = Vec::new();
                for k in 0..16u64 {
                    let max = if rng.below(4) == 0 { 300 << 10 } else { 16 << 10 };
                    let len = 1 + rng.below(max);
                    let off = k * slot + rng.below(slot - len);
                    let off = if rng.below(2) == 0 { off & !4095 } else { off };
                    let tag = round << 8 | k;
                    let before = d.ring.operations();
                    if rng.below(2) == 0 {
                        let seed = (round * 16 + k) as u8;
                        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(13) ^ seed | 1).collect();
                        // At 0 in the buffer: aligned for O_DIRECT when the offset is.
                        let at = if rng.below(2) == 0 { 0 } else { 64 };
                        let mut buf = IoBuf::with_capacity(at + len as usize);
                        buf.resize_zeroed(at);
                        buf.extend_from_slice(&data);
                        let fua = rng.below(8) == 0;
                        d.submit(BlockOp::Write { offset: off, at, fua }, buf, tag);
                        disk[off as usize..(off + len) as usize].copy_from_slice(&data);
                        ring_writes += d.ring.operations() - before;
                        expect.push((tag, None));
                    } else {
                        let mut buf = IoBuf::new();
                        buf.resize_zeroed(len as usize + 8);
                        buf[..8].fill(0xee);
                        d.submit(BlockOp::Read { offset: off, at: 8 }, buf, tag);
                        ring_reads += d.ring.operations() - before;
                        expect.push((tag, Some(disk[off as usize..(off + len) as usize].to_vec())));
                    }
                }
                let done = finish(&mut d);
                assert_eq!(done.len(), expect.len(), "round {round}");
                for dn in done {
                    let (_, want) = expect.iter().find(|(t, _)| *t == dn.tag).expect("a known tag");
                    let n = dn.result.unwrap_or_else(|e| panic!("round {round} tag {:#x}: {e}", dn.tag));
                    if let Some(want) = want {
                        assert_eq!(n, want.len());
                        assert_eq!(&dn.buf[..8], &[0xee; 8], "the read stayed inside buf[at..]");
                        assert!(dn.buf[8..] == want[..], "round {round}: read {:#x} differs", dn.tag);
                    }
                }
                let len = 1 + rng.below(200 << 10);
                let off = rng.below(size - len);
                let op = match round % 3 {
                    0 => {
                        disk[off as usize..(off + len) as usize].fill(0);
                        BlockOp::WriteZeroes { offset: off, len, no_hole: round % 2 == 0, fast: false }
                    }
                    // (Version 3: a discard reads as zeroes where whole clusters go.)
                    1 => {
                        let cs = if n == 0 { 4096 } else { 65536 };
                        let (a, e) = (off.next_multiple_of(cs), (off + len) & !(cs - 1));
                        if a < e {
                            disk[a as usize..e as usize].fill(0);
                        }
                        BlockOp::Trim { offset: off, len }
                    }
                    _ => BlockOp::Flush,
                };
                d.submit(op, IoBuf::new(), 1);
                let done = finish(&mut d);
                assert!(done[0].result.is_ok(), "round {round}: {op:?}: {:?}", done[0].result);
            }
        }
        assert!(ring_reads > 100, "{opts}: {ring_reads} reads on the ring");
        // Buffered overwrites are calls; with O_DIRECT they go on the ring.
        if direct {
            assert!(ring_writes > 50, "{opts}: {ring_writes} writes on the ring");
        } else {
            assert_eq!(ring_writes, 0, "{opts}: buffered writes are calls");
        }
        assert_clean(&p, opts);
        assert!(qemu_reads(&p, size) == disk, "{opts}: qemu reads the model");
    }
}

/// The host cluster of guest offset `voff`, and its refcount.
fn host_of(b: &Qcow2Backend, voff: u64) -> (u64, u64) {
    let image = b.top();
    let mut m = image.meta_mut();
    let (c, _) = image.lookup(&m, voff).unwrap();
    let Cluster::Data { host } = c else { panic!("{voff}: not a data cluster: {c:?}") };
    let cb = image.header.cluster_bits;
    let rc = m.rc.as_mut().unwrap().get(&*image.src, host >> cb).unwrap();
    (host, rc)
}

#[test]
fn clusters_freed_under_a_mapped_operation_wait_for_it() {
    let _serial = serial();
    let dir = temp_dir("ring-epochs");
    let p = dir.join("e.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", p.to_str().unwrap(), "4M"]);
    {
        let b = Qcow2Backend::open_with(&p, false, true).unwrap();
        b.write(0, &[0x44; 65536], false).unwrap();
        b.flush().unwrap();
        let (host, rc) = host_of(&b, 0);
        assert_eq!(rc, 1);
        let (mut d, _q) = driver(&b);
        // An overwrite mapped to that cluster, not yet submitted to the
        // kernel (it goes at the next drive).
        d.submit(BlockOp::Write { offset: 0, at: 0, fua: false }, IoBuf::from_slice(&[0x55; 4096]), 7);
        assert_eq!(d.ring.operations(), 1, "the overwrite went to the ring");
        assert_eq!(b.top().epochs.inflight(), 1);
        // The guest discards the cluster and flushes, twice: the free waits.
        b.trim(0, 65536, false).unwrap();
        b.flush().unwrap();
        b.flush().unwrap();
        assert_eq!(b.top().meta().deferred.len(), 1, "the free is deferred");
        // A new allocation does not get the cluster the write targets.
        b.write(1 << 20, &[0x66; 65536], false).unwrap();
        let (other, _) = host_of(&b, 1 << 20);
        assert_ne!(other, host, "a cluster in use by a mapped write was reused");
        let done = finish(&mut d);
        assert_eq!(done[0].result.as_ref().unwrap(), &4096);
        assert_eq!(b.top().epochs.inflight(), 0);
        // The next flush (or the one after) applies the free.
        b.flush().unwrap();
        b.flush().unwrap();
        assert!(b.top().meta().deferred.is_empty(), "the free was applied");
        let image = b.top();
        let mut m = image.meta_mut();
        let cb = image.header.cluster_bits;
        assert_eq!(m.rc.as_mut().unwrap().get(&*image.src, host >> cb).unwrap(), 0);
    }
    assert_clean(&p, "after the deferred free");
}

#[test]
fn holes_are_answered_without_reading_and_errors_keep_their_errno() {
    let _serial = serial();
    let dir = temp_dir("ring-holes");
    let p = dir.join("h.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", p.to_str().unwrap(), "1M"]);
    let b = open_rw(&p);
    b.write(8192, &[1; 100], false).unwrap();
    let mut pieces = Vec::new();
    assert!(b.read_shared(0, 8192, &mut pieces).unwrap(), "an unallocated range is one hole");
    assert!(matches!(pieces[..], [crate::Piece::Zero(8192)]));
    pieces.clear();
    assert!(!b.read_shared(4096, 8192, &mut pieces).unwrap(), "data is read");
    assert!(pieces.is_empty());
    // A refused fast zero is EOPNOTSUPP on the asynchronous path too.
    let (mut d, _q) = driver(&b);
    d.submit(BlockOp::WriteZeroes { offset: 100, len: 10, no_hole: false, fast: true }, IoBuf::new(), 3);
    let done = finish(&mut d);
    assert_eq!(done[0].result.as_ref().unwrap_err().raw_os_error(), Some(libc::EOPNOTSUPP));
}

#[test]
fn allocating_writes_in_flight_together_keep_each_others_bytes() {
    let _serial = serial();
    let dir = temp_dir("ring-alloc");
    let p = dir.join("a.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", p.to_str().unwrap(), "1M"]);
    let (a, bb, c, e) = ([0xaau8; 4096], [0xbbu8; 4096], [0xccu8; 65536], [0xeeu8; 65536]);
    {
        let b = Qcow2Backend::open_with(&p, false, true).unwrap();
        let (mut d, _q) = driver(&b);
        // Two partial writes to the same new cluster, both reserved before
        // either is written: each gets its own new cluster; the second to
        // finish finds the entry taken and writes its bytes over the first.
        d.submit(BlockOp::Write { offset: 0, at: 0, fua: false }, IoBuf::from_slice(&a), 1);
        d.submit(BlockOp::Write { offset: 8192, at: 0, fua: true }, IoBuf::from_slice(&bb), 2);
        // A whole-cluster write from the request's own buffer, zeroed
        // (through the calls) while it is on the ring: it is written again
        // over the zero cluster.
        d.submit(BlockOp::Write { offset: 65536, at: 0, fua: false }, IoBuf::from_slice(&c), 3);
        assert_eq!(d.ring.operations(), 3, "the allocating writes went to the ring");
        b.write_zeroes(65536, 65536, ZeroFlags::default()).unwrap();
        let done = finish(&mut d);
        assert_eq!(done.len(), 3);
        for x in &done {
            assert!(x.result.is_ok(), "tag {}: {:?}", x.tag, x.result);
        }
        // One more, left on the ring when the driver goes: it is committed.
        d.submit(BlockOp::Write { offset: 5 << 16, at: 0, fua: false }, IoBuf::from_slice(&e), 4);
        drop(d);
        let mut want = vec![0u8; 1 << 20];
        want[..4096].copy_from_slice(&a);
        want[8192..12288].copy_from_slice(&bb);
        want[65536..131072].copy_from_slice(&c);
        want[5 << 16..6 << 16].copy_from_slice(&e);
        let mut got = vec![0u8; 1 << 20];
        b.read(0, &mut got).unwrap();
        assert!(got == want, "the export reads every write");
        b.flush().unwrap();
    }
    assert_clean(&p, "after writes that raced for their clusters");
    let mut want = vec![0u8; 1 << 20];
    want[..4096].copy_from_slice(&a);
    want[8192..12288].copy_from_slice(&bb);
    want[65536..131072].copy_from_slice(&c);
    want[5 << 16..6 << 16].copy_from_slice(&e);
    assert!(qemu_reads(&p, 1 << 20) == want, "qemu reads every write");
}
