//! The client handshake state machine (`ClientHandshake`) fed arbitrary
//! server bytes in arbitrary pieces: no panic, never consumes more than it
//! was given, and once it reports an outcome or an error it stays there.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nbd_proto::client::{ClientConfig, ClientHandshake};

#[derive(Arbitrary, Debug)]
struct Input {
    structured: bool,
    extended: bool,
    base_allocation: bool,
    list_meta: bool,
    list_exports: bool,
    cuts: Vec<u8>,
    bytes: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let mut cfg = ClientConfig::new("disk");
    cfg.structured = input.structured;
    cfg.extended = input.extended;
    cfg.base_allocation = input.base_allocation;
    cfg.list_meta = input.list_meta;
    cfg.list_exports = input.list_exports;
    let mut hs = ClientHandshake::new(cfg);
    let _ = hs.take_output();
    let mut staged: Vec<u8> = Vec::new();
    let mut cuts = input.cuts.iter().map(|&c| usize::from(c) + 1).cycle();
    let mut rest: &[u8] = &input.bytes;
    while !rest.is_empty() && hs.outcome().is_none() {
        let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
        staged.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        match hs.handle(&staged) {
            Ok(used) => {
                assert!(used <= staged.len(), "consumed {used} of {}", staged.len());
                staged.drain(..used);
                let _ = hs.take_output();
            }
            Err(_) => return,
        }
    }
});
