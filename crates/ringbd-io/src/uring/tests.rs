//! The ring against real sockets and files: receives across buffers (plain,
//! bundled, incremental), limited receives, sends and zero-copy sends,
//! file operations, registered sockets.

use super::*;
use crate::buf::IoBuf;
use std::io::{IoSlice, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

struct Bytes(Vec<u8>);
// SAFETY: the slices point into the Vec's heap buffer, which does not
// move with the value and is never written after construction.
unsafe impl SendSource for Bytes {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn iovecs<'a>(&'a self, skip: usize, out: &mut Vec<IoSlice<'a>>) {
        out.push(IoSlice::new(&self.0[skip..]));
    }
}

fn ring(bundle: bool) -> Ring<Bytes> {
    ring_with(bundle, false)
}

fn ring_with(bundle: bool, incremental: bool) -> Ring<Bytes> {
    let f = Features::probe();
    assert!(f.io_uring && f.recv_multishot && f.buf_ring, "kernel lacks what this test needs: {f:?}");
    let cfg = RingConfig {
        entries: 64,
        recv_buffers: 16,
        recv_buffer_size: 1024,
        bundle: bundle && f.bundle,
        incremental,
    };
    Ring::new(cfg, &f).unwrap()
}

#[test]
fn a_limited_multishot_receive_ends_after_its_bytes() {
    let f = Features::probe();
    assert!(f.recv_limit, "this kernel ignores a multishot receive's byte limit: {f:?}");
    for (bundle, inc) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut r = ring_with(bundle, inc);
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[7u8; 5000]).unwrap();
        r.recv_multi(Sock::raw(b.as_fd()), 3, Some(2000)).unwrap();
        let (mut got, mut ended) = (0, false);
        while !ended {
            r.submit_and_wait(1).unwrap();
            r.completions(|r, c| {
                if let Completion::Recv { result, more, .. } = c {
                    let bufs = result.unwrap();
                    got += bufs.len;
                    bufs.bufs.into_iter().for_each(|p| r.recycle(p));
                    ended |= !more;
                }
            });
        }
        // It ended although bytes wait: at the limit, rounded up to
        // the buffer it reached the limit in.
        assert!((2000..=2000 + 1024).contains(&got), "bundle={bundle} inc={inc}: {got} bytes");
    }
}

#[test]
fn multishot_recv_delivers_bytes_in_order_across_buffers() {
    for (bundle, inc) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut r = ring_with(bundle, inc);
        let (mut a, b) = UnixStream::pair().unwrap();
        r.recv_multi(Sock::raw(b.as_fd()), 7, None).unwrap();
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        a.write_all(&data).unwrap();
        drop(a);
        let mut got = Vec::new();
        let mut eof = false;
        while !eof {
            r.submit_and_wait(1).unwrap();
            r.completions(|r, c| match c {
                Completion::Recv { conn, result, .. } => {
                    assert_eq!(conn, 7);
                    let bufs = result.unwrap();
                    if bufs.len == 0 {
                        eof = true;
                    }
                    for piece in bufs.bufs {
                        got.extend_from_slice(r.buffer(&piece));
                        r.recycle(piece);
                    }
                }
                _ => panic!("unexpected completion"),
            });
        }
        assert_eq!(got, data, "bundle={bundle} inc={inc}");
        assert!(r.bufs.idle());
        if !inc {
            assert_eq!(r.free_recv_buffers(), 16);
        }
    }
}

#[test]
fn incremental_buffers_hold_many_small_receives_and_survive_interleaving() {
    let f = Features::probe();
    assert!(f.buf_inc, "kernel lacks IOU_PBUF_RING_INC: {f:?}");
    for bundle in [false, true] {
        let mut r = ring_with(bundle, true);
        assert!(r.incremental());
        let (mut a1, b1) = UnixStream::pair().unwrap();
        let (mut a2, b2) = UnixStream::pair().unwrap();
        r.recv_multi(Sock::raw(b1.as_fd()), 1, None).unwrap();
        r.recv_multi(Sock::raw(b2.as_fd()), 2, None).unwrap();
        // Small messages from two connections, alternating: they share
        // buffers, and conn 1's pieces are held back (a backlog) while
        // conn 2's are released at once.
        let (mut got1, mut got2, mut held) = (Vec::new(), Vec::new(), Vec::new());
        // One wait: conn 1's pieces are held, conn 2's consumed at once.
        let step = |r: &mut Ring<Bytes>, held: &mut Vec<BufPiece>, got2: &mut Vec<u8>| {
            r.submit_and_wait(1).unwrap();
            r.completions(|r, c| {
                if let Completion::Recv { conn, result: Ok(bufs), .. } = c {
                    for piece in bufs.bufs {
                        if conn == 1 {
                            held.push(piece);
                        } else {
                            got2.extend_from_slice(r.buffer(&piece));
                            r.recycle(piece);
                        }
                    }
                }
            });
        };
        let mut want = (Vec::new(), Vec::new());
        for i in 0..300u32 {
            let m1 = [(i % 251) as u8; 28];
            let m2 = [(i % 13) as u8 + 100; 100];
            a1.write_all(&m1).unwrap();
            a2.write_all(&m2).unwrap();
            want.0.extend_from_slice(&m1);
            want.1.extend_from_slice(&m2);
            step(&mut r, &mut held, &mut got2);
            if held.len() > 40 {
                for piece in held.drain(..) {
                    got1.extend_from_slice(r.buffer(&piece));
                    r.recycle(piece);
                }
            }
        }
        drop((a1, a2));
        while got1.len() + held.iter().map(|p| p.len()).sum::<usize>() < want.0.len()
            || got2.len() < want.1.len()
        {
            step(&mut r, &mut held, &mut got2);
        }
        for piece in held.drain(..) {
            got1.extend_from_slice(r.buffer(&piece));
            r.recycle(piece);
        }
        assert_eq!(got1, want.0, "bundle={bundle}");
        assert_eq!(got2, want.1, "bundle={bundle}");
        // Buffers are spent by bytes (1 KiB each here), not one per
        // completion.
        let bytes = want.0.len() + want.1.len();
        assert!(r.bufs.spent <= (bytes / 1024 + 2) as u64, "{} buffers for {bytes} bytes", r.bufs.spent);
        assert!(r.stats.recv_completions > r.bufs.spent, "{:?} spent {}", r.stats, r.bufs.spent);
    }
}

#[test]
fn send_returns_the_source_and_counts_bytes() {
    let mut r = ring(false);
    let (a, mut b) = UnixStream::pair().unwrap();
    r.send(Sock::raw(a.as_fd()), 3, Bytes(b"hello world".to_vec()), 6, false, false).unwrap();
    r.submit_and_wait(1).unwrap();
    let mut done = false;
    r.completions(|_, c| {
        if let Completion::Send { conn, result, source, skip, .. } = c {
            assert_eq!((conn, result.unwrap(), skip), (3, 5, 6));
            assert_eq!(source.0, b"hello world");
            done = true;
        }
    });
    assert!(done);
    let mut buf = [0u8; 5];
    std::io::Read::read_exact(&mut b, &mut buf).unwrap();
    assert_eq!(&buf, b"world");
}

#[test]
fn zero_copy_send_returns_the_source_after_its_notification() {
    let f = Features::probe();
    assert!(f.send_zc, "kernel lacks SEND_ZC");
    let mut r = ring(false);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut b, _) = l.accept().unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    r.send(Sock::raw(a.as_fd()), 9, Bytes(payload.clone()), 0, false, true).unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; 200_000];
        std::io::Read::read_exact(&mut b, &mut got).map(|_| got)
    });
    let mut sent = 0;
    let mut returned = false;
    while !returned {
        r.submit_and_wait(1).unwrap();
        r.completions(|_, c| {
            if let Completion::Send { conn, result, source, copied, .. } = c {
                assert_eq!(conn, 9);
                assert_eq!(copied, Some(true), "loopback always copies");
                sent = result.unwrap();
                assert_eq!(source.0.len(), 200_000);
                returned = true;
            }
        });
    }
    assert!(sent > 0);
    // A short send leaves the rest to us.
    std::io::Write::write_all(&mut &a, &payload[sent..]).unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), payload);
    assert_eq!(r.stats.zc_sends, 1);
    assert_eq!(r.stats.zc_copied, 1, "loopback always copies");
    assert_eq!(r.inflight(), 0);
}

#[test]
fn file_write_read_and_fsync_round_trip() {
    let mut r = ring(false);
    let path = std::env::temp_dir().join(format!("ringbd-uring-file-{}", std::process::id()));
    let f =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let run = |r: &mut Ring<Bytes>, op: FileOp, buf: IoBuf| {
        r.file_op(f.as_fd(), 1, 42, op, buf).unwrap();
        r.submit_and_wait(1).unwrap();
        let mut out = None;
        r.completions(|_, c| {
            if let Completion::File { conn, token, result, buf } = c {
                assert_eq!((conn, token), (1, 42));
                out = Some((result.unwrap(), buf));
            }
        });
        out.expect("a file completion")
    };
    let (n, _) =
        run(&mut r, FileOp::Write { offset: 4096, at: 2, dsync: true }, IoBuf::from_slice(b"xxhello"));
    assert_eq!(n, 5);
    let (n, buf) = run(&mut r, FileOp::Read { offset: 4096, at: 1 }, IoBuf::from_slice(&[0u8; 6]));
    assert_eq!(n, 5);
    assert_eq!(&buf[..], b"\0hello");
    assert_eq!(run(&mut r, FileOp::Fsync, IoBuf::new()).0, 0);
    assert_eq!(r.stats.file_fixed, 0);
    let punch = FileOp::Fallocate { mode: crate::fs::Fallocate::PunchHole, offset: 4096, len: 4096 };
    assert_eq!(run(&mut r, punch, IoBuf::new()).0, 0);
    let (_, buf) = run(&mut r, FileOp::Read { offset: 4096, at: 0 }, IoBuf::from_slice(&[9u8; 5]));
    assert_eq!(&buf[..], &[0u8; 5], "the punched range reads as zeroes");

    // The same through registered buffers.
    let arena = Arena::new(4096, 2).unwrap();
    r.register_arena(Arc::clone(&arena)).unwrap();
    let mut w = arena.take(4096).unwrap();
    w.extend_from_slice(b"fixed!");
    let (n, w) = run(&mut r, FileOp::Write { offset: 8192, at: 0, dsync: false }, w);
    assert_eq!(n, 6);
    drop(w);
    let mut rd = arena.take(6).unwrap();
    rd.set_len(6);
    let (n, rd) = run(&mut r, FileOp::Read { offset: 8192, at: 0 }, rd);
    assert_eq!((n, &rd[..]), (6, &b"fixed!"[..]));
    assert_eq!(r.stats.file_fixed, 2);
}

#[test]
fn registered_sockets_carry_receives_and_sends() {
    let mut r = ring(false);
    r.enable_fixed_files(4).unwrap();
    let (a, mut b) = UnixStream::pair().unwrap();
    let s = r.register_socket(a.as_fd()).unwrap().expect("a free slot");
    assert!(matches!(s, Sock::Fixed(_)));
    r.send(s, 1, Bytes(b"ping".to_vec()), 0, false, false).unwrap();
    r.recv_multi(s, 1, None).unwrap();
    r.submit_and_wait(1).unwrap();
    let mut buf = [0u8; 4];
    std::io::Read::read_exact(&mut b, &mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    b.write_all(b"pong").unwrap();
    let mut got = Vec::new();
    while got.len() < 4 {
        r.submit_and_wait(1).unwrap();
        r.completions(|r, c| {
            if let Completion::Recv { result: Ok(bufs), .. } = c {
                for piece in bufs.bufs {
                    got.extend_from_slice(r.buffer(&piece));
                    r.recycle(piece);
                }
            }
        });
    }
    assert_eq!(got, b"pong");
    // Unregistering drops the table's reference: closing our descriptor
    // then closes the socket, which the peer sees as end of stream.
    r.cancel_recv(1).unwrap();
    while r.inflight() > 0 {
        r.submit_and_wait(1).unwrap();
        r.completions(|_, _| {});
    }
    r.unregister_socket(s).unwrap();
    drop(a);
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut b, &mut rest).unwrap();
    assert!(rest.is_empty());
}
