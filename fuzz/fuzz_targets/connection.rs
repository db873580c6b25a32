//! A whole server connection (ringbd-server `Connection`: handshake, then
//! requests run on real backends) fed a structured handshake and requests,
//! or raw bytes, in arbitrary pieces, as an engine would. Exports: a sparse
//! memory export, a null export, and a memory export behind the fault
//! wrapper. Checks: no panic, and no stall: whenever the connection takes
//! no more input, it is closed or has replies to send.
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ringbd_backend::fault::{FaultBackend, FaultPlan};
use ringbd_backend::memory::MemoryBackend;
use ringbd_backend::null::NullBackend;
use ringbd_fuzz::{Handshake, Req};
use ringbd_server::conn::Connection;
use ringbd_server::exports::{Export, Exports};

#[derive(Arbitrary, Debug)]
struct Input {
    hs: Handshake,
    extended_framing: bool,
    reqs: Vec<Req>,
    tail: Vec<u8>,
    chunks: Vec<u16>,
}

fn exports() -> Arc<Exports> {
    static EXPORTS: OnceLock<Arc<Exports>> = OnceLock::new();
    EXPORTS
        .get_or_init(|| {
            let mut x = Exports::default();
            let plan = FaultPlan::parse("all=0.3@EIO,seed=1").unwrap_or_default();
            let faulty = FaultBackend::new(Arc::new(MemoryBackend::new(1 << 20)), plan);
            for e in [
                Export::new("", Arc::new(MemoryBackend::new(64 << 20)), false),
                Export::new("a", Arc::new(NullBackend::new(1 << 40)), false),
                Export::new("ro", Arc::new(faulty), true),
                Export::new("f", Arc::new(NullBackend::new(4096)), false),
            ] {
                let _ = x.add(e);
            }
            Arc::new(x)
        })
        .clone()
}

fuzz_target!(|input: Input| {
    let mut bytes = input.hs.encode();
    for r in &input.reqs {
        r.encode(input.extended_framing, &mut bytes);
    }
    bytes.extend_from_slice(&input.tail);
    let mut conn = Connection::new(exports(), "fuzz".into());
    conn.sent();
    let mut pos = 0;
    let mut chunks = input.chunks.iter().map(|&c| usize::from(c) + 1).cycle();
    while pos < bytes.len() && !conn.is_closed() {
        let n = chunks.next().unwrap_or(bytes.len()).min(bytes.len() - pos);
        let mut piece = &bytes[pos..pos + n];
        pos += n;
        while !piece.is_empty() && !conn.is_closed() {
            let used = conn.receive(piece);
            assert!(used <= piece.len());
            piece = &piece[used..];
            if !piece.is_empty() && !conn.is_closed() {
                // Input refused: there must be replies to send (backpressure).
                assert!(!conn.out().is_empty(), "connection stalled with input and nothing to send");
            }
            conn.sent();
        }
    }
    conn.peer_closed();
});
