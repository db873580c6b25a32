//! The client's transmission-phase reply decoder (`ClientSession::decode_reply`,
//! simple, structured and extended replies) under any negotiation and any
//! bytes from a hostile server. Checks what the client relies on: no panic, a
//! decoded message never claims more bytes than it was given, data chunks lie
//! inside the request they answer, and a partial buffer is "need more", not
//! an error that a longer buffer would turn into success.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nbd_proto::client::{ClientNegotiated, ClientRequest, ClientSession, ReplyChunk};
use nbd_proto::CmdType;

#[derive(Arbitrary, Debug)]
struct Input {
    structured: bool,
    extended: bool,
    base_allocation: bool,
    flags: u16,
    size: u64,
    typ: u8,
    req_flags: u16,
    offset: u64,
    len: u32,
    bytes: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let neg = ClientNegotiated {
        export: String::new(),
        size: input.size,
        flags: input.flags,
        structured: input.structured || input.extended,
        extended: input.extended,
        base_allocation: input.base_allocation.then_some(1),
        block_sizes: None,
        name: None,
        description: None,
        meta_contexts: Vec::new(),
        refused: Vec::new(),
    };
    let session = ClientSession::new(neg);
    let req = ClientRequest {
        typ: CmdType(u16::from(input.typ % 12)),
        flags: input.req_flags,
        cookie: 0,
        offset: input.offset,
        len: u64::from(input.len),
    };
    let mut buf: &[u8] = &input.bytes;
    // Decode message after message, as the client's receive loop does; the
    // request in flight answers every cookie.
    for _ in 0..64 {
        let lookup = |cookie: u64| Some(ClientRequest { cookie, ..req });
        match session.decode_reply(buf, lookup) {
            Ok(Some((reply, used))) => {
                assert!(used > 0 && used <= buf.len(), "used {used} of {}", buf.len());
                if let ReplyChunk::Data { offset, data } = reply.chunk {
                    let end = offset.checked_add(data.len() as u64).expect("data end overflows");
                    assert!(
                        offset >= req.offset && end <= req.offset.saturating_add(req.len),
                        "data outside its request"
                    );
                }
                buf = &buf[used..];
            }
            Ok(None) => {
                // Incomplete: every prefix must be incomplete too.
                for cut in 0..buf.len().min(64) {
                    let r = session.decode_reply(&buf[..cut], |c| Some(ClientRequest { cookie: c, ..req }));
                    assert!(matches!(r, Ok(None)), "a prefix of an incomplete message decoded: {r:?}");
                }
                break;
            }
            Err(_) => break,
        }
    }
});
