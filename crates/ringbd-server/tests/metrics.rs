//! The export metrics a connection keeps, fed without sockets: requests,
//! bytes, errors by errno, latency counts and the connections gauge, for
//! requests answered inline (memory) and by the engine's file operations.

use std::sync::Arc;

use ringbd_backend::memory::MemoryBackend;
use ringbd_server::conn::Connection;
use ringbd_server::exports::{Export, Exports};
use ringbd_server::metrics::{Snapshot, ERRNOS, OPS};

mod wire;
use wire::{feed, option, request};

fn op(s: &Snapshot, name: &str) -> ringbd_server::metrics::OpTotals {
    s.ops[OPS.iter().position(|o| *o == name).unwrap()]
}

fn errno(name: &str) -> usize {
    ERRNOS.iter().position(|e| *e == name).unwrap()
}

/// The handshake: fixed newstyle, NBD_OPT_GO on the default export.
fn handshake() -> Vec<u8> {
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(7, &[0, 0, 0, 0, 0, 0]));
    s
}

#[test]
fn inline_requests_count_by_operation_and_errno() {
    let mut e = Exports::default();
    e.add(Export::new("disk", Arc::new(MemoryBackend::new(1 << 20)), false)).unwrap();
    let exports = Arc::new(e);
    let m = exports.get("disk").unwrap().metrics.clone();
    let mut c = Connection::new(exports, "test".into());
    assert_eq!(m.snapshot().connections, 0, "not before the handshake ends");

    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(7, &[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 0]));
    for i in 0..3 {
        s.extend(request(1, i, i * 4096, 4096, &[0x5a; 4096]));
    }
    s.extend(request(0, 10, 0, 8192, &[]));
    // Past the end: EINVAL for a read, ENOSPC for a write (whose payload is read and dropped).
    s.extend(request(0, 11, 1 << 20, 512, &[]));
    s.extend(request(1, 12, 1 << 20, 512, &[0; 512]));
    s.extend(request(77, 13, 0, 0, &[]));
    s.extend(request(3, 14, 0, 0, &[]));
    feed(&mut c, &s, 1000);

    let snap = m.snapshot();
    assert_eq!((snap.connections, snap.connections_total), (1, 1));
    let w = op(&snap, "write");
    assert_eq!((w.requests, w.bytes), (4, 3 * 4096), "the failed write moved nothing");
    assert_eq!(w.errors[errno("ENOSPC")], 1);
    assert_eq!(w.buckets.iter().sum::<u64>(), 4, "one latency sample per request");
    let r = op(&snap, "read");
    assert_eq!((r.requests, r.bytes, r.errors[errno("EINVAL")]), (2, 8192, 1));
    let other = op(&snap, "other");
    assert_eq!((other.requests, other.errors[errno("EINVAL")]), (1, 1));
    assert_eq!(op(&snap, "flush").requests, 1);

    // NBD_CMD_DISC: the transmission phase ends, the counts stay.
    feed(&mut c, &request(2, 15, 0, 0, &[]), 1000);
    assert!(c.is_closed());
    let after = m.snapshot();
    assert_eq!((after.connections, after.connections_total), (0, 1));
    assert_eq!(after.ops, snap.ops);
}

#[test]
fn file_operations_count_when_the_engine_completes_them() {
    let path = std::path::Path::new("/var/tmp").join(format!("ringbd-metrics-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let spec = ringbd_backend::Spec::File { path: path.clone(), direct: false };
    let backend = ringbd_backend::open(&spec, false).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(backend.file_fd().is_some(), "/var/tmp should not be a memory filesystem");
    let mut e = Exports::default();
    e.add(Export::new("", backend, false)).unwrap();
    let exports = Arc::new(e);
    let m = exports.get("").unwrap().metrics.clone();
    let mut c = Connection::new(exports, "test".into());
    c.enable_async_file_io(None);

    let mut s = handshake();
    s.extend(request(1, 1, 0, 4096, &[1; 4096]));
    s.extend(request(1, 2, 4096, 4096, &[2; 4096]));
    assert_eq!(c.receive(&s), s.len());
    let mut io = Vec::new();
    c.take_io(&mut io);
    assert_eq!(io.len(), 2);
    assert_eq!(op(&m.snapshot(), "write").requests, 0, "counted when answered");
    let second = io.pop().unwrap();
    let first = io.pop().unwrap();
    c.io_complete(first.token, Ok(4096), first.buf);
    c.io_complete(second.token, Err(std::io::Error::from_raw_os_error(5)), second.buf);
    let w = op(&m.snapshot(), "write");
    assert_eq!((w.requests, w.bytes, w.errors[errno("EIO")]), (2, 4096, 1));
    assert_eq!(w.buckets.iter().sum::<u64>(), 2);
}
