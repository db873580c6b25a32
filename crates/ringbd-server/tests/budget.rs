//! The server-wide reply budget seen from one connection: its queue limit,
//! its pieces and its receive share shrink as connections join, and grow
//! back as they leave; a large DF read goes in pieces as one data chunk.

use std::sync::Arc;

use ringbd_io::uring::FileOp;
use ringbd_server::budget::Share;
use ringbd_server::conn::{Connection, IoOp};
use ringbd_server::exports::{Export, Exports};

mod wire;
use wire::{option, request, request_with_flags};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// A file export on a disk filesystem (its reads go to the engine) served
/// with `reply_memory` of reply budget.
fn file_exports(tag: &str, size: usize, reply_memory: usize) -> Arc<Exports> {
    let path = std::path::Path::new("/var/tmp").join(format!("ringbd-budget-{tag}-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; size]).unwrap();
    let spec = ringbd_backend::Spec::File { path: path.clone(), direct: false };
    let backend = ringbd_backend::open(&spec, false).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(backend.file_fd().is_some(), "/var/tmp should not be a memory filesystem");
    let mut e = Exports::default();
    e.add(Export::new("", backend, false)).unwrap();
    e.set_reply_memory(reply_memory);
    Arc::new(e)
}

/// A connection in transmission with structured replies.
fn structured(exports: &Arc<Exports>) -> Connection {
    let mut c = Connection::new(exports.clone(), "test".into());
    c.enable_async_file_io(None);
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(8, &[]));
    s.extend(option(7, &[0, 0, 0, 0, 0, 0]));
    assert_eq!(c.receive(&s), s.len());
    c.sent();
    c
}

/// Runs the connection's file operations (each read fills its buffer with
/// `fill(offset)`, newest first) until none is left; returns the sizes of
/// the operations and the most that were in flight at once.
fn run_io(c: &mut Connection, fill: impl Fn(u64) -> u8) -> (Vec<usize>, usize) {
    let (mut io, mut sizes, mut most) = (Vec::new(), Vec::new(), 0);
    loop {
        c.take_io(&mut io);
        most = most.max(c.io_pending());
        let Some(op) = io.pop() else { return (sizes, most) };
        let IoOp::File(FileOp::Read { offset, .. }) = op.op else { panic!("{:?}", op.op) };
        sizes.push(op.buf.len());
        let mut b = op.buf;
        b.fill(fill(offset));
        let n = b.len();
        c.io_complete(op.token, Ok(n), b);
    }
}

fn queued(c: &Connection) -> Vec<u8> {
    let mut iov = Vec::new();
    c.out().iovecs(0, &mut iov);
    iov.iter().flat_map(|s| s.iter().copied()).collect()
}

#[test]
fn shares_shrink_as_connections_join_and_grow_back_as_they_leave() {
    let exports = file_exports("share", (8 * MIB) as usize, (16 * MIB) as usize);
    let mut c = structured(&exports);
    assert_eq!(c.queue_limit(), (8 * MIB) as usize, "alone: the per-connection maximum");
    assert_eq!(c.receive_share(MIB as u32), MIB as u32);
    // 15 more connections: 16 MiB / 16 = 1 MiB each, pieces of 256 KiB.
    let others: Vec<Share> = (0..15).map(|_| exports.budget().join()).collect();
    assert_eq!(c.queue_limit(), MIB as usize);
    assert_eq!(c.receive_share(4 * MIB as u32), MIB as u32, "a receive takes at most the share");
    // Nothing is sent: the read stops once its share is queued.
    assert_eq!(c.receive(&request(0, 7, 0, (4 * MIB) as u32, &[])), 28);
    let (sizes, most) = run_io(&mut c, |_| 0x5a);
    assert!(sizes.iter().all(|&n| n as u64 == 256 * KIB), "pieces of a quarter share: {sizes:?}");
    assert!(most <= 2, "{most} pieces in flight");
    let held = queued(&c).len();
    assert!(held >= MIB as usize && held < (MIB + 256 * KIB + 4096) as usize, "{held} bytes queued");
    assert!(!c.wants_input(), "at its share the connection takes nothing more");
    // The others leave: the rest of the read goes on once the queue is sent.
    drop(others);
    assert_eq!(c.queue_limit(), (8 * MIB) as usize);
    c.sent();
    let (rest, _) = run_io(&mut c, |_| 0x5a);
    assert_eq!(sizes.len() * 256 * KIB as usize + rest.iter().sum::<usize>(), (4 * MIB) as usize);
    assert!(c.wants_input());
}

#[test]
fn a_large_read_with_df_goes_in_pieces_as_one_data_chunk_in_order() {
    let exports = file_exports("df", (8 * MIB) as usize, (256 * MIB) as usize);
    let mut c = structured(&exports);
    let len = 3 * MIB + 512;
    // NBD_CMD_FLAG_DF (1 << 2).
    assert_eq!(c.receive(&request_with_flags(4, 0, 9, MIB, len as u32, &[])), 28);
    let (mut sizes, most) = run_io(&mut c, |off| (off / MIB) as u8 + 1);
    sizes.sort();
    assert_eq!(sizes, [512, MIB as usize, MIB as usize, MIB as usize], "pieces, not one 3 MiB buffer");
    assert!(most <= 2, "{most} pieces in flight");
    let out = queued(&c);
    // One OFFSET_DATA chunk (type 1) with DONE, its data in file order.
    assert_eq!(&out[..4], &0x668e_33efu32.to_be_bytes());
    assert_eq!(u16::from_be_bytes([out[4], out[5]]), 1, "DONE");
    assert_eq!(u16::from_be_bytes([out[6], out[7]]), 1, "OFFSET_DATA");
    assert_eq!(u32::from_be_bytes(out[16..20].try_into().unwrap()) as u64, 8 + len);
    assert_eq!(u64::from_be_bytes(out[20..28].try_into().unwrap()), MIB);
    let data = &out[28..];
    assert_eq!(data.len() as u64, len, "nothing else queued");
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        assert!(chunk.iter().all(|&x| x == i as u8 + 2), "piece {i} out of order");
    }
}
