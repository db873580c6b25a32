//! The connection state machine fed without sockets: however the client's
//! bytes are split, the replies and the export contents are the same.

use std::sync::Arc;

use ringbd_backend::memory::MemoryBackend;
use ringbd_backend::Backend;
use ringbd_server::conn::{Connection, IoOp};
use ringbd_server::exports::{Export, Exports};

mod wire;
use wire::{option, request, request_with_flags};

fn exports() -> (Arc<Exports>, Arc<MemoryBackend>) {
    let mem = Arc::new(MemoryBackend::new(1 << 20));
    let mut e = Exports::default();
    e.add(Export::new("", mem.clone(), false)).unwrap();
    (Arc::new(e), mem)
}

/// A whole client session: handshake with structured replies, writes,
/// reads, a bad command, flush, disconnect.
fn session_bytes() -> Vec<u8> {
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(8, &[]));
    s.extend(option(7, &[0, 0, 0, 0, 0, 0]));
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    s.extend(request(1, 1, 12_345, payload.len() as u32, &payload));
    s.extend(request(0, 2, 12_345, 100_000, &[]));
    s.extend(request(0, 3, 0, 512, &[]));
    s.extend(request(77, 4, 0, 0, &[]));
    s.extend(request(3, 5, 0, 0, &[]));
    s.extend(request(2, 6, 0, 0, &[]));
    s
}

fn run(chunks: &[&[u8]]) -> (Vec<u8>, Vec<u8>, bool) {
    let (exports, mem) = exports();
    let mut c = Connection::new(exports, "test".into());
    let mut out = Vec::new();
    let mut drain = |c: &mut Connection| {
        let mut iov = Vec::new();
        c.out().iovecs(0, &mut iov);
        for s in &iov {
            out.extend_from_slice(s);
        }
        c.sent();
    };
    for chunk in chunks {
        let mut used = 0;
        while used < chunk.len() && !c.is_closed() {
            used += c.receive(&chunk[used..]);
            drain(&mut c);
        }
    }
    drain(&mut c);
    let mut contents = vec![0u8; 1 << 20];
    mem.read(0, &mut contents).unwrap();
    (out, contents, c.is_closed())
}

#[test]
fn byte_at_a_time_equals_all_at_once() {
    let s = session_bytes();
    let (whole, mem_whole, closed) = run(&[&s]);
    assert!(closed, "DISC closes the connection");
    let bytes: Vec<&[u8]> = s.chunks(1).collect();
    let (single, mem_single, _) = run(&bytes);
    assert_eq!(whole, single);
    assert_eq!(mem_whole, mem_single);
    let odd: Vec<&[u8]> = s.chunks(4093).collect();
    let (odd_out, mem_odd, _) = run(&odd);
    assert_eq!(whole, odd_out);
    assert_eq!(mem_whole, mem_odd);
    // The write landed, and the read reply carries it back.
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(&mem_whole[12_345..112_345], &payload[..]);
    assert!(whole.windows(payload.len()).any(|w| w == &payload[..]));
}

#[test]
fn a_client_that_never_reads_hits_the_high_water_mark() {
    let (exports, _) = exports();
    let mut c = Connection::new(exports, "test".into());
    // Simple replies: every read carries its full 1 MiB (no hole chunks).
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(7, &[0, 0, 0, 0, 0, 0]));
    for i in 0..64 {
        s.extend(request(0, i, 0, 1 << 20, &[]));
    }
    let used = c.receive(&s);
    assert!(used < s.len(), "stopped taking requests");
    assert!(!c.wants_input());
    assert!(c.out().len() >= ringbd_server::conn::OUT_HIGH_WATER);
    assert!(c.out().len() < ringbd_server::conn::OUT_HIGH_WATER + (2 << 20));
    c.sent();
    assert!(c.wants_input());
    assert!(c.receive(&s[used..]) > 0);
}

/// A connection to a file export on a disk filesystem (not tmpfs), so the
/// export hands its reads, writes and flushes to the engine.
fn async_file_connection(tag: &str, size: usize) -> Connection {
    async_file_connection_with(tag, size, false, None)
}

fn async_file_connection_with(
    tag: &str,
    size: usize,
    direct: bool,
    arena: Option<Arc<ringbd_io::buf::Arena>>,
) -> Connection {
    let path = std::path::Path::new("/var/tmp").join(format!("ringbd-conn-{tag}-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; size]).unwrap();
    let spec = ringbd_backend::Spec::File { path: path.clone(), direct };
    let backend = ringbd_backend::open(&spec, false).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(backend.file_fd().is_some(), "/var/tmp should not be a memory filesystem");
    let mut e = Exports::default();
    e.add(Export::new("", backend, false)).unwrap();
    let mut c = Connection::new(Arc::new(e), "test".into());
    c.enable_async_file_io(arena);
    c
}

/// The reply bytes queued on `c`.
fn queued(c: &Connection) -> Vec<u8> {
    let mut iov = Vec::new();
    c.out().iovecs(0, &mut iov);
    iov.iter().flat_map(|s| s.iter().copied()).collect()
}

#[test]
fn async_file_reads_continue_after_a_short_transfer() {
    use ringbd_io::uring::FileOp;
    let mut c = async_file_connection("async", 1 << 20);
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(7, &[0, 0, 0, 0, 0, 0]));
    s.extend(request(0, 9, 8192, 4096, &[]));
    assert_eq!(c.receive(&s), s.len());
    c.sent(); // drop the handshake replies

    let mut io = Vec::new();
    c.take_io(&mut io);
    assert_eq!(io.len(), 1);
    let first = io.pop().unwrap();
    assert!(matches!(first.op, IoOp::File(FileOp::Read { offset: 8192, at: 0 })), "{:?}", first.op);
    // The kernel moved only 1000 bytes: the rest must be asked for.
    let mut buf = first.buf;
    buf[..1000].fill(7);
    c.io_complete(first.token, Ok(1000), buf);
    assert!(c.out().is_empty(), "no reply before the read is whole");
    c.take_io(&mut io);
    let second = io.pop().unwrap();
    assert!(matches!(second.op, IoOp::File(FileOp::Read { offset: 9192, at: 1000 })), "{:?}", second.op);
    let mut buf = second.buf;
    buf[1000..].fill(8);
    c.io_complete(second.token, Ok(3096), buf);
    assert_eq!(c.io_pending(), 0);
    let reply = queued(&c);
    assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes(), "simple reply");
    assert_eq!(&reply[8..16], &9u64.to_be_bytes());
    assert_eq!(reply.len(), 16 + 4096);
    assert!(reply[16..1016].iter().all(|&b| b == 7) && reply[1016..].iter().all(|&b| b == 8));
}

#[test]
fn in_flight_limits_hold_for_requests_that_arrive_together() {
    // 100 reads of 1 MiB in one receive: only as many start as the reply
    // queue's limit (8 MiB, counting the bytes in flight) allows; the rest
    // wait unconsumed.
    let mut c = async_file_connection("inflight", 1 << 20);
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(7, &[0, 0, 0, 0, 0, 0]));
    let handshake = s.len();
    for cookie in 0..100 {
        s.extend(request(0, cookie, 0, 1 << 20, &[]));
    }
    let used = c.receive(&s);
    c.sent();
    assert_eq!(used, handshake + 8 * 28, "8 reads taken, the rest left for later");
    assert!(!c.wants_input());
    let mut io = Vec::new();
    c.take_io(&mut io);
    assert_eq!(io.len(), 8);
    assert_eq!(c.io_pending(), 8);
    // One finishes (its reply queued): the next may start.
    let first = io.remove(0);
    let n = first.buf.len();
    c.io_complete(first.token, Ok(n), first.buf);
    c.sent();
    assert_eq!(c.receive(&s[used..]), 28, "one more read once one finished and was sent");
    c.take_io(&mut io);
    assert_eq!(io.len(), 8);
}

#[test]
fn async_file_read_that_makes_no_progress_fails_with_eio() {
    let mut c = async_file_connection("eio", 1 << 16);
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(7, &[0, 0, 0, 0, 0, 0]));
    s.extend(request(0, 5, 0, 512, &[]));
    c.receive(&s);
    c.sent();
    let mut io = Vec::new();
    c.take_io(&mut io);
    let r = io.pop().unwrap();
    c.io_complete(r.token, Ok(0), r.buf);
    let reply = queued(&c);
    assert_eq!(reply, [&0x6744_6698u32.to_be_bytes()[..], &5u32.to_be_bytes(), &5u64.to_be_bytes()].concat());
}

#[test]
fn direct_exports_use_o_direct_only_for_aligned_ranges_and_arena_buffers_first() {
    let arena = ringbd_io::buf::Arena::new(64 << 10, 1).unwrap();
    let mut c = async_file_connection_with("direct", 1 << 20, true, Some(arena.clone()));
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(7, &[0, 0, 0, 0, 0, 0]));
    s.extend(request(0, 1, 8192, 4096, &[])); // aligned
    s.extend(request(0, 2, 100, 4096, &[])); // unaligned offset
    s.extend(request(0, 3, 0, 1000, &[])); // unaligned length
    assert_eq!(c.receive(&s), s.len());
    c.sent();
    let mut io = Vec::new();
    c.take_io(&mut io);
    assert_eq!(io.iter().map(|r| r.direct).collect::<Vec<_>>(), [true, false, false]);
    assert!(io[0].buf.fixed_index(&arena).is_some(), "the first buffer comes from the arena");
    assert!(!io[1].buf.is_chunk() && !io[2].buf.is_chunk(), "the arena has one chunk");
    assert!(c.file_fd(true).is_some() && c.file_fd(false).is_some());
    let first = io.remove(0);
    assert_eq!(first.buf.as_ptr() as usize % 4096, 0);
    // A short transfer that stops off alignment continues through the page cache.
    c.io_complete(first.token, Ok(1000), first.buf);
    c.take_io(&mut io);
    let cont = io.pop().unwrap();
    assert!(!cont.direct, "continuation at an unaligned position");
    c.io_complete(cont.token, Ok(3096), cont.buf);
    drop(io);
    c.sent();
    assert_eq!(arena.available(), 1, "the arena chunk came back once the reply was sent");
}

/// A simple reply's errno for `cookie` in `bytes`, if there is one.
fn simple_reply_errno(bytes: &[u8], cookie: u64) -> Option<u32> {
    bytes.windows(16).find_map(|w| {
        (w[..4] == 0x6744_6698u32.to_be_bytes() && w[8..16] == cookie.to_be_bytes())
            .then(|| u32::from_be_bytes([w[4], w[5], w[6], w[7]]))
    })
}

#[test]
fn trims_and_zeroing_on_file_exports_run_as_ring_fallocates_with_fua_and_fallbacks() {
    use ringbd_io::fs::Fallocate;
    use ringbd_io::uring::FileOp;
    let mut c = async_file_connection("falloc", 1 << 20);
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(7, &[0, 0, 0, 0, 0, 0]));
    s.extend(request(4, 1, 0, 8192, &[])); // trim
    s.extend(request_with_flags(1, 4, 2, 65536, 4096, &[])); // NBD_CMD_FLAG_FUA
    s.extend(request(6, 3, 8192, 4096, &[])); // write zeroes
    assert_eq!(c.receive(&s), s.len());
    c.sent();
    let mut io = Vec::new();
    c.take_io(&mut io);
    let ops: Vec<String> = io.iter().map(|r| format!("{:?}", r.op)).collect();
    assert!(
        matches!(
            io[0].op,
            IoOp::File(FileOp::Fallocate { mode: Fallocate::PunchHole, offset: 0, len: 8192 })
        ),
        "{ops:?}"
    );
    assert!(
        matches!(io[1].op, IoOp::File(FileOp::Fallocate { mode: Fallocate::PunchHole, offset: 65536, .. })),
        "{ops:?}"
    );
    assert!(matches!(io[2].op, IoOp::File(FileOp::Fallocate { offset: 8192, len: 4096, .. })), "{ops:?}");
    let (a, b, z) = (io.remove(0), io.remove(0), io.remove(0));
    c.io_complete(a.token, Ok(0), a.buf);
    assert_eq!(simple_reply_errno(&queued(&c), 1), Some(0), "plain trim answered");
    // FUA: the fallocate is followed by an fsync before the reply.
    c.io_complete(b.token, Ok(0), b.buf);
    assert_eq!(simple_reply_errno(&queued(&c), 2), None, "no reply before the fsync");
    c.take_io(&mut io);
    assert!(matches!(io[0].op, IoOp::File(FileOp::Fsync)), "{:?}", io[0].op);
    let f = io.remove(0);
    c.io_complete(f.token, Ok(0), f.buf);
    assert_eq!(simple_reply_errno(&queued(&c), 2), Some(0));
    // A filesystem that cannot fallocate: the backend zeroes by its other ways.
    c.io_complete(z.token, Err(std::io::Error::from_raw_os_error(EOPNOTSUPP)), z.buf);
    assert_eq!(simple_reply_errno(&queued(&c), 3), Some(0), "zeroing fell back and succeeded");
    // A real failure is an error reply with the errno's NBD code.
    let mut s2 = request(4, 4, 0, 4096, &[]);
    s2.extend(request(6, 5, 0, 4096, &[]));
    c.sent();
    assert_eq!(c.receive(&s2), s2.len());
    c.take_io(&mut io);
    let (t, z) = (io.remove(0), io.remove(0));
    c.io_complete(t.token, Err(std::io::Error::from_raw_os_error(EOPNOTSUPP)), t.buf);
    c.io_complete(z.token, Err(std::io::Error::from_raw_os_error(EIO)), z.buf);
    let q = queued(&c);
    assert_eq!(simple_reply_errno(&q, 4), Some(0), "an unsupported trim is still a successful hint");
    assert_eq!(simple_reply_errno(&q, 5), Some(5), "EIO");
    assert_eq!(c.io_pending(), 0);
}

/// Linux errno values (the test does not link libc).
const EOPNOTSUPP: i32 = 95;
const EIO: i32 = 5;

/// A memory export that says its I/O is asynchronous (as RBD's is), so
/// that block status goes to the engine as [`IoOp::Extents`].
struct AsyncStatus(MemoryBackend);

impl Backend for AsyncStatus {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn caps(&self) -> ringbd_backend::Caps {
        self.0.caps()
    }
    fn describe(&self) -> String {
        "asynchronous block status".into()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> ringbd_backend::Result<ringbd_backend::Holes> {
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ringbd_backend::Result<()> {
        self.0.write(offset, data, fua)
    }
    fn flush(&self) -> ringbd_backend::Result<()> {
        self.0.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> ringbd_backend::Result<()> {
        self.0.trim(offset, len, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ringbd_backend::ZeroFlags,
    ) -> ringbd_backend::Result<()> {
        self.0.write_zeroes(offset, len, flags)
    }
    fn cache(&self, offset: u64, len: u64) -> ringbd_backend::Result<()> {
        self.0.cache(offset, len)
    }
    fn extents(&self, _offset: u64, _len: u64) -> ringbd_backend::Result<Vec<ringbd_backend::Extent>> {
        panic!("block status must not run inline on the ring worker");
    }
    fn aio(&self) -> Option<&dyn ringbd_backend::AsyncIo> {
        Some(self)
    }
}

impl ringbd_backend::AsyncIo for AsyncStatus {
    // The test plays the engine: nothing is submitted here.
    fn submit(
        &self,
        _: ringbd_backend::BlockOp,
        buf: ringbd_io::buf::IoBuf,
        sink: ringbd_backend::aio::Sink,
    ) {
        sink.deliver(Err(std::io::Error::from_raw_os_error(EIO)), buf).unwrap();
    }
    fn submit_extents(&self, _: u64, _: u64, sink: ringbd_backend::aio::Sink) {
        sink.deliver(Err(std::io::Error::from_raw_os_error(EIO)), Default::default()).unwrap();
    }
}

/// Structured replies (type, payload) for `cookie` in `bytes`.
fn structured_replies(bytes: &[u8], cookie: u64) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 20 <= bytes.len() {
        let h = &bytes[i..i + 20];
        if h[..4] == 0x668e_33efu32.to_be_bytes() && h[8..16] == cookie.to_be_bytes() {
            let typ = u16::from_be_bytes([h[6], h[7]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            out.push((typ, bytes[i + 20..(i + 20 + len).min(bytes.len())].to_vec()));
            i += 20 + len;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn block_status_of_an_asynchronous_backend_waits_for_its_completion_not_the_ring() {
    use ringbd_backend::{extents_to_buf, BlockOp, Extent};
    let mut e = Exports::default();
    e.add(Export::new("", Arc::new(AsyncStatus(MemoryBackend::new(1 << 20))), false)).unwrap();
    let mut c = Connection::new(Arc::new(e), "test".into());
    c.enable_async_file_io(None);
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(8, &[])); // structured replies
    let mut q = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15];
    q.extend_from_slice(b"base:allocation");
    s.extend(option(10, &q)); // SET_META_CONTEXT
    s.extend(option(7, &[0, 0, 0, 0, 0, 0]));
    s.extend(request(7, 5, 0, 65536, &[])); // block status
    s.extend(request(7, 6, 4096, 4096, &[])); // another, to fail
    s.extend(request(3, 7, 0, 0, &[])); // a flush behind them
    assert_eq!(c.receive(&s), s.len());
    c.sent();
    let mut io = Vec::new();
    c.take_io(&mut io);
    assert_eq!(io.len(), 3, "both queries and the flush went to the engine");
    assert!(matches!(io[0].op, IoOp::Extents { offset: 0, len: 65536 }), "{:?}", io[0].op);
    assert!(matches!(io[1].op, IoOp::Extents { offset: 4096, len: 4096 }), "{:?}", io[1].op);
    assert!(matches!(io[2].op, IoOp::Block(BlockOp::Flush)), "{:?}", io[2].op);
    // The flush finishes first: its reply does not wait behind block status.
    let f = io.pop().unwrap();
    c.io_complete(f.token, Ok(0), f.buf);
    let out = queued(&c);
    assert!(structured_replies(&out, 5).is_empty(), "no status reply before its completion");
    assert_eq!(simple_reply_errno(&out, 7), Some(0), "the flush answered");
    assert_eq!(c.io_pending(), 2);

    let (a, b) = (io.remove(0), io.remove(0));
    let ext = [Extent { len: 4096, hole: false, zero: false }, Extent { len: 61440, hole: true, zero: true }];
    c.io_complete(a.token, Ok(ext.len()), extents_to_buf(&ext));
    c.io_complete(b.token, Err(std::io::Error::from_raw_os_error(EIO)), Default::default());
    assert_eq!(c.io_pending(), 0);
    let out = queued(&c);
    let r = structured_replies(&out, 5);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].0, 5, "NBD_REPLY_TYPE_BLOCK_STATUS");
    // Context id, then (length, flags) pairs: data, then hole|zero.
    assert_eq!(
        r[0].1[4..],
        [&4096u32.to_be_bytes()[..], &[0; 4], &61440u32.to_be_bytes(), &3u32.to_be_bytes()].concat()
    );
    let r = structured_replies(&out, 6);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].0, 0x8001, "NBD_REPLY_TYPE_ERROR");
    assert_eq!(r[0].1[..4], 5u32.to_be_bytes(), "EIO");
}

/// Structured reply chunks in `bytes`, in order: (flags, type, cookie,
/// offset of an OFFSET_DATA chunk, payload bytes).
fn chunk_list(bytes: &[u8]) -> Vec<(u16, u16, u64, u64, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 20 <= bytes.len() {
        let h = &bytes[i..i + 20];
        assert_eq!(h[..4], 0x668e_33efu32.to_be_bytes(), "structured reply magic at {i}");
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let typ = u16::from_be_bytes([h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        let offset = if typ == 1 { u64::from_be_bytes(bytes[i + 20..i + 28].try_into().unwrap()) } else { 0 };
        out.push((flags, typ, cookie, offset, len));
        i += 20 + len;
    }
    out
}

/// A structured-reply connection to a file export of `size` bytes, with
/// its handshake replies gone.
fn structured_file_connection(tag: &str, size: usize) -> Connection {
    let mut c = async_file_connection(tag, size);
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(8, &[])); // structured replies
    s.extend(option(7, &[0, 0, 0, 0, 0, 0]));
    assert_eq!(c.receive(&s), s.len());
    c.sent();
    c
}

#[test]
fn large_reads_of_file_exports_go_in_pieces_at_most_two_in_flight() {
    use ringbd_io::uring::FileOp;
    const MIB: u64 = 1 << 20;
    let mut c = structured_file_connection("chunks", 8 << 20);
    let len = 5 * MIB + 100;
    assert_eq!(c.receive(&request(0, 5, 0, len as u32, &[])), 28);
    let mut io = Vec::new();
    let mut seen = Vec::new();
    let mut replies = Vec::new();
    loop {
        c.take_io(&mut io);
        assert!(io.len() <= 2 && c.io_pending() <= 2, "{} pieces in flight", c.io_pending());
        // Finish the newest first: pieces may complete in any order.
        let Some(op) = io.pop() else { break };
        let IoOp::File(FileOp::Read { offset, at: 0 }) = op.op else { panic!("{:?}", op.op) };
        assert!(op.buf.len() as u64 <= MIB);
        seen.push((offset, op.buf.len()));
        let n = op.buf.len();
        c.io_complete(op.token, Ok(n), op.buf);
        replies.extend(queued(&c));
        c.sent();
    }
    seen.sort();
    let want: Vec<(u64, usize)> = (0..6).map(|i| (i * MIB, if i < 5 { MIB as usize } else { 100 })).collect();
    assert_eq!(seen, want, "every piece read once");
    let chunks = chunk_list(&replies);
    assert_eq!(chunks.len(), 6);
    assert!(chunks.iter().all(|&(_, typ, cookie, _, _)| typ == 1 && cookie == 5), "{chunks:?}");
    let dones: Vec<bool> = chunks.iter().map(|&(flags, ..)| flags & 1 != 0).collect();
    assert_eq!(dones, [false, false, false, false, false, true], "DONE on the last chunk only");
    let mut got: Vec<(u64, usize)> = chunks.iter().map(|&(_, _, _, off, l)| (off, l - 8)).collect();
    got.sort();
    assert_eq!(got, want, "each piece answered once, at its offset");
}

#[test]
fn a_chunked_read_waits_for_the_reply_queue_and_ends_with_the_error_of_a_piece() {
    const MIB: u64 = 1 << 20;
    let mut c = structured_file_connection("chunkq", 24 << 20);
    assert_eq!(c.receive(&request(0, 9, 0, 20 * MIB as u32, &[])), 28);
    let mut io = Vec::new();
    // Nothing is sent: pieces stop once the queue holds 8 MiB.
    loop {
        c.take_io(&mut io);
        let Some(op) = io.pop() else { break };
        let n = op.buf.len();
        c.io_complete(op.token, Ok(n), op.buf);
    }
    assert_eq!(c.io_pending(), 0);
    let queued_now = chunk_list(&queued(&c)).len();
    // Pieces start while under 8 MiB is queued; the one in flight when the
    // queue reached it lands too.
    assert!((8..=9).contains(&queued_now), "{queued_now} MiB of the reply queued, then it waits");
    c.sent();
    c.take_io(&mut io);
    assert_eq!(io.len(), 2, "the queue drained: two more pieces");
    // One piece fails, the other succeeds: the reply ends with the error.
    let (a, b) = (io.remove(0), io.remove(0));
    c.io_complete(a.token, Err(std::io::Error::from_raw_os_error(EIO)), a.buf);
    let n = b.buf.len();
    c.io_complete(b.token, Ok(n), b.buf);
    c.take_io(&mut io);
    assert!(io.is_empty(), "no piece after a failure");
    let chunks = chunk_list(&queued(&c));
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert_eq!((chunks[0].0 & 1, chunks[0].1), (1, 0x8001), "an error chunk with DONE ends it");
    // The connection goes on.
    assert!(c.wants_input());
}

#[test]
fn a_large_read_with_a_simple_reply_goes_in_order_after_the_others_and_alone() {
    use ringbd_io::uring::FileOp;
    const MIB: u64 = 1 << 20;
    let mut c = async_file_connection("chunksimple", 8 << 20);
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(7, &[0, 0, 0, 0, 0, 0])); // no structured replies
    assert_eq!(c.receive(&s), s.len());
    c.sent();
    // A small read in flight, then a 3 MiB read, then a flush.
    let reqs =
        [request(0, 1, 0, 4096, &[]), request(0, 2, MIB, 3 * MIB as u32, &[]), request(3, 3, 0, 0, &[])]
            .concat();
    assert_eq!(c.receive(&reqs), 56, "the flush waits behind the large read");
    let mut io = Vec::new();
    c.take_io(&mut io);
    assert_eq!(io.len(), 1, "the large read waits for the small one");
    let small = io.pop().unwrap();
    let n = small.buf.len();
    c.io_complete(small.token, Ok(n), small.buf);
    c.take_io(&mut io);
    assert_eq!(io.len(), 2, "then two pieces of it");
    // Out of order: the second piece first; nothing of its reply goes yet.
    let (a, b) = (io.remove(0), io.remove(0));
    let IoOp::File(FileOp::Read { offset: off_b, .. }) = b.op else { panic!() };
    assert_eq!(off_b, 2 * MIB);
    let before = queued(&c).len();
    let n = b.buf.len();
    let mut bb = b.buf;
    bb.fill(0xbb);
    c.io_complete(b.token, Ok(n), bb);
    assert_eq!(queued(&c).len(), before, "the second piece waits for the first");
    let mut ab = a.buf;
    ab.fill(0xaa);
    c.io_complete(a.token, Ok(n), ab);
    c.take_io(&mut io);
    let last = io.pop().unwrap();
    let mut lb = last.buf;
    lb.fill(0xcc);
    c.io_complete(last.token, Ok(n), lb);
    let out = queued(&c);
    // The small read's reply, then one simple header and 3 MiB in order.
    let big = &out[16 + 4096..];
    assert_eq!(&big[..4], &0x6744_6698u32.to_be_bytes());
    assert_eq!(&big[8..16], &2u64.to_be_bytes());
    assert_eq!(big.len(), 16 + 3 * MIB as usize);
    let data = &big[16..];
    assert!(data[..MIB as usize].iter().all(|&x| x == 0xaa));
    assert!(data[MIB as usize..2 * MIB as usize].iter().all(|&x| x == 0xbb));
    assert!(data[2 * MIB as usize..].iter().all(|&x| x == 0xcc));
    // Now the flush is taken.
    c.sent();
    assert_eq!(c.receive(&reqs[56..]), 28);
}

#[test]
fn a_large_write_to_a_file_export_goes_in_pieces_as_its_payload_arrives() {
    use ringbd_io::uring::FileOp;
    const MIB: usize = 1 << 20;
    let mut c = async_file_connection("chunkw", 8 << 20);
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(7, &[0, 0, 0, 0, 0, 0]));
    assert_eq!(c.receive(&s), s.len());
    c.sent();
    let payload: Vec<u8> = (0..5 * MIB + 100).map(|i| (i / MIB) as u8 + 1).collect();
    let mut wire = request(1, 4, 4096, payload.len() as u32, &payload);
    wire.extend(request(3, 5, 0, 0, &[])); // a flush behind it
    let mut used = c.receive(&wire);
    assert_eq!(used, 28 + 2 * MIB, "two pieces taken, the rest of the payload waits");
    assert!(!c.wants_input());
    let mut io = Vec::new();
    let mut written = Vec::new();
    loop {
        c.take_io(&mut io);
        let writes = io.iter().filter(|o| matches!(o.op, IoOp::File(FileOp::Write { .. }))).count();
        assert!(writes <= 2, "{writes} pieces in flight");
        let Some(op) = io.pop() else {
            if used == wire.len() {
                break;
            }
            used += c.receive(&wire[used..]);
            continue;
        };
        if matches!(op.op, IoOp::File(FileOp::Fsync)) {
            c.io_complete(op.token, Ok(0), op.buf);
            continue;
        }
        let IoOp::File(FileOp::Write { offset, at: 0, dsync: false }) = op.op else { panic!("{:?}", op.op) };
        assert!(op.buf.len() <= MIB);
        written.push((offset, op.buf.to_vec()));
        assert!(simple_reply_errno(&queued(&c), 4).is_none(), "no reply before the last piece");
        let n = op.buf.len();
        c.io_complete(op.token, Ok(n), op.buf);
        used += c.receive(&wire[used..]);
    }
    written.sort();
    let mut all = Vec::new();
    for (i, (offset, data)) in written.iter().enumerate() {
        assert_eq!(*offset, 4096 + (i * MIB) as u64);
        all.extend_from_slice(data);
    }
    assert_eq!(all, payload, "every byte written once, in place");
    assert_eq!(simple_reply_errno(&queued(&c), 4), Some(0), "one reply, after the last piece");
    assert_eq!(simple_reply_errno(&queued(&c), 5), Some(0), "and the flush behind it");
}

#[test]
fn write_zeroes_keep_their_flags_on_the_way_to_an_asynchronous_backend() {
    use ringbd_backend::BlockOp;
    let mut e = Exports::default();
    e.add(Export::new("", Arc::new(AsyncStatus(MemoryBackend::new(1 << 20))), false)).unwrap();
    let mut c = Connection::new(Arc::new(e), "test".into());
    c.enable_async_file_io(None);
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend(option(7, &[0, 0, 0, 0, 0, 0]));
    // WRITE_ZEROES (6): NO_HOLE (bit 1), FAST_ZERO (bit 4), both, neither.
    s.extend(request_with_flags(1 << 1, 6, 1, 0, 4096, &[]));
    s.extend(request_with_flags(1 << 4, 6, 2, 4096, 4096, &[]));
    s.extend(request_with_flags(1 << 1 | 1 << 4, 6, 3, 8192, 4096, &[]));
    s.extend(request_with_flags(0, 6, 4, 12288, 4096, &[]));
    assert_eq!(c.receive(&s), s.len());
    c.sent();
    let mut io = Vec::new();
    c.take_io(&mut io);
    let ops: Vec<_> = io.iter().map(|r| r.op).collect();
    let want = [(0, true, false), (4096, false, true), (8192, true, true), (12288, false, false)];
    assert_eq!(ops.len(), want.len(), "{ops:?}");
    for (op, (offset, no_hole, fast)) in ops.iter().zip(want) {
        assert!(
            matches!(op, IoOp::Block(BlockOp::WriteZeroes { offset: o, len: 4096, no_hole: n, fast: f })
                if *o == offset && *n == no_hole && *f == fast),
            "{op:?}, want offset {offset} no_hole {no_hole} fast {fast}"
        );
    }
}
