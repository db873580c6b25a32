//! Replies queued for one connection, sent as one vectored write.
//!
//! Headers and small payloads are appended to one byte vector; large read
//! payloads are kept as their own buffers and spliced in as separate iovecs,
//! so a batch of replies becomes a handful of iovecs and one send call.

use std::io::IoSlice;

use ringbd_backend::Piece;
use ringbd_io::buf::IoBuf;

/// Source of iovecs for zero runs of zero-copy reads.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// A payload kept outside the inline queue.
enum Seg {
    Owned(IoBuf),
    /// A piece of the export's own memory (zero-copy read).
    Shared(Piece),
}

/// Queued reply bytes.
#[derive(Default)]
pub struct OutBuf {
    bytes: Vec<u8>,
    /// Payloads, each to be sent right after `bytes[..at]`.
    large: Vec<(usize, Seg)>,
    large_len: usize,
    /// Out-of-line payload bytes of the reply being built, and the most of
    /// any reply queued (what decides a zero-copy send).
    current_payload: usize,
    largest_payload: usize,
    /// Replies (complete answers to requests) queued.
    replies: u32,
}

impl OutBuf {
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.large.is_empty()
    }

    /// Total bytes queued.
    pub fn len(&self) -> usize {
        self.bytes.len() + self.large_len
    }

    /// Bytes queued as separate large payloads.
    pub fn large_bytes(&self) -> usize {
        self.large_len
    }

    /// The largest out-of-line payload of any one queued reply.
    pub fn largest_payload(&self) -> usize {
        self.largest_payload.max(self.current_payload)
    }

    /// Replies queued.
    pub fn replies(&self) -> u32 {
        self.replies
    }

    /// Counts replies that were encrypted into this queue.
    pub(crate) fn add_replies(&mut self, n: u32) {
        self.replies = self.replies.saturating_add(n);
    }

    pub(crate) fn reply_done(&mut self) {
        self.replies += 1;
        self.largest_payload = self.largest_payload.max(self.current_payload);
        self.current_payload = 0;
    }

    /// The inline byte queue, for headers and small payloads.
    pub(crate) fn bytes(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Queues a large payload after everything queued so far.
    pub(crate) fn push_large(&mut self, payload: IoBuf) {
        self.large_len += payload.len();
        self.current_payload += payload.len();
        self.large.push((self.bytes.len(), Seg::Owned(payload)));
    }

    /// Queues a zero-copy piece after everything queued so far.
    pub(crate) fn push_piece(&mut self, piece: Piece) {
        self.large_len += piece.len();
        self.current_payload += piece.len();
        self.large.push((self.bytes.len(), Seg::Shared(piece)));
    }

    /// The queued bytes as iovecs, skipping the first `skip` bytes (already
    /// sent). Appends to `out`.
    pub fn iovecs<'a>(&'a self, skip: usize, out: &mut Vec<IoSlice<'a>>) {
        self.iovecs_upto(skip, usize::MAX, out)
    }

    /// Like [`OutBuf::iovecs`], but at most `limit` bytes.
    pub fn iovecs_upto<'a>(&'a self, mut skip: usize, mut limit: usize, out: &mut Vec<IoSlice<'a>>) {
        let mut push = |s: &'a [u8], out: &mut Vec<IoSlice<'a>>| {
            if skip >= s.len() {
                skip -= s.len();
            } else if limit > 0 {
                let s = &s[skip..];
                let s = &s[..s.len().min(limit)];
                limit -= s.len();
                out.push(IoSlice::new(s));
                skip = 0;
            }
        };
        let mut at = 0;
        for (pos, seg) in &self.large {
            push(&self.bytes[at..*pos], out);
            match seg {
                Seg::Owned(v) => push(v, out),
                Seg::Shared(p) => match p.bytes() {
                    Some(b) => push(b, out),
                    None => {
                        let mut left = p.len();
                        while left > 0 {
                            let n = left.min(ZEROES.len());
                            push(&ZEROES[..n], out);
                            left -= n;
                        }
                    }
                },
            }
            at = *pos;
        }
        push(&self.bytes[at..], out);
    }

    /// Empties the queue, handing large buffers back to `pool` for reuse.
    pub fn clear(&mut self, pool: &mut Vec<IoBuf>) {
        self.bytes.clear();
        for (_, seg) in self.large.drain(..) {
            if let Seg::Owned(v) = seg {
                crate::conn::recycle(pool, v);
            }
        }
        self.large_len = 0;
        self.current_payload = 0;
        self.largest_payload = 0;
        self.replies = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(o: &OutBuf, skip: usize) -> Vec<u8> {
        let mut v = Vec::new();
        o.iovecs(skip, &mut v);
        v.iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn large_payloads_are_spliced_in_order_and_skip_works() {
        let mut o = OutBuf::default();
        o.bytes().extend_from_slice(b"ab");
        o.push_large(IoBuf::from_slice(b"CDE"));
        o.bytes().extend_from_slice(b"f");
        o.push_large(IoBuf::from_slice(b"GH"));
        assert_eq!(o.len(), 8);
        assert_eq!(flat(&o, 0), b"abCDEfGH");
        assert_eq!(flat(&o, 3), b"DEfGH");
        assert_eq!(flat(&o, 5), b"fGH");
        assert_eq!(flat(&o, 8), b"");
        let mut v = Vec::new();
        o.iovecs_upto(1, 5, &mut v);
        assert_eq!(v.iter().flat_map(|s| s.iter().copied()).collect::<Vec<u8>>(), b"bCDEf");
        let mut pool = Vec::new();
        o.clear(&mut pool);
        assert!(o.is_empty());
        assert_eq!(pool.len(), 2);
    }

    #[test]
    fn shared_pieces_and_zero_runs_become_iovecs() {
        let mut o = OutBuf::default();
        o.bytes().extend_from_slice(b"h");
        let page = std::sync::Arc::new(ringbd_backend::memory::PageBuf::from(b"0123456789".to_vec()));
        o.push_piece(Piece::Shared { page, start: 2, len: 3 });
        o.push_piece(Piece::Zero(70_000));
        o.bytes().extend_from_slice(b"t");
        let all = flat(&o, 0);
        assert_eq!(all.len(), 1 + 3 + 70_000 + 1);
        assert_eq!(&all[..4], b"h234");
        assert!(all[4..70_004].iter().all(|&b| b == 0));
        assert_eq!(all[70_004], b't');
    }
}
