//! The server-wide reply budget (`--reply-memory`): how much of replies,
//! file operations in flight and received input the connections may hold
//! together, shared out equally among the connections in transmission.
//!
//! A connection's share is the limit of its reply queue (counting what a
//! send has taken and the buffers of its operations in flight), the size of
//! the pieces its large reads and writes go in, and the most one arming of
//! its receive takes from the socket. With few connections a share is the
//! per-connection maximum ([`OUT_HIGH_WATER`]), so a single fast client
//! loses nothing; as connections are added the shares shrink, down to
//! [`MIN_SHARE`], so the total stays near the budget (docs/engine.md,
//! "Resource model"). Equal shares, not first come first served: a set of
//! clients that stop reading cannot take the budget from the others.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::conn::OUT_HIGH_WATER;

/// The default budget. With it up to 32 connections get the full 8 MiB
/// share; 1,000 connections that each hold all they may (a share of
/// replies, two pieces and a share of received input) hold about 640 MiB.
pub const DEFAULT_REPLY_MEMORY: usize = 256 << 20;
/// The smallest share: below it, replies of the largest memory-export
/// pieces and the fixed overheads per request would dominate. Beyond
/// `budget / MIN_SHARE` connections the total grows with them
/// (`--max-connections` bounds it).
pub const MIN_SHARE: usize = 256 << 10;
/// Pieces of large file reads and writes: at most 1 MiB (the size that
/// keeps one connection's 1 MiB reads at full speed), at least 64 KiB
/// (aligned for any `O_DIRECT` file).
const MAX_PIECE: usize = 1 << 20;
const MIN_PIECE: usize = 64 << 10;

#[derive(Debug)]
pub struct ReplyBudget {
    total: usize,
    members: AtomicUsize,
}

impl ReplyBudget {
    pub fn new(total: usize) -> Arc<ReplyBudget> {
        Arc::new(ReplyBudget { total, members: AtomicUsize::new(0) })
    }

    /// A connection enters transmission: it gets a share until the
    /// returned handle is dropped.
    pub fn join(self: &Arc<Self>) -> Share {
        self.members.fetch_add(1, Ordering::Relaxed);
        Share(self.clone())
    }

    /// Connections holding a share now.
    pub fn members(&self) -> usize {
        self.members.load(Ordering::Relaxed)
    }

    /// The share of each of `n` connections.
    pub fn share_of(&self, n: usize) -> usize {
        (self.total / n.max(1)).clamp(MIN_SHARE, OUT_HIGH_WATER)
    }
}

impl Default for ReplyBudget {
    fn default() -> Self {
        ReplyBudget { total: DEFAULT_REPLY_MEMORY, members: AtomicUsize::new(0) }
    }
}

/// One connection's membership in the budget.
#[derive(Debug)]
pub struct Share(Arc<ReplyBudget>);

impl Share {
    /// The most this connection's reply queue holds (with its operations'
    /// buffers) before it stops taking requests. One relaxed load: it is
    /// asked before every request.
    pub fn limit(&self) -> usize {
        self.0.share_of(self.0.members())
    }

    /// The size of the pieces a large read or write goes in: a quarter of
    /// the share (two pieces in flight and the queue's own room), rounded
    /// down to a power of two.
    pub fn piece(&self) -> u64 {
        piece_of(self.limit()) as u64
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.0.members.fetch_sub(1, Ordering::Relaxed);
    }
}

fn piece_of(share: usize) -> usize {
    let quarter = (share / 4).max(1);
    let pow2 = 1usize << (usize::BITS - 1 - quarter.leading_zeros());
    pow2.clamp(MIN_PIECE, MAX_PIECE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_shrink_with_connections_between_the_bounds() {
        let b = ReplyBudget::new(256 << 20);
        assert_eq!(b.share_of(0), OUT_HIGH_WATER);
        assert_eq!(b.share_of(1), OUT_HIGH_WATER);
        assert_eq!(b.share_of(32), OUT_HIGH_WATER);
        assert_eq!(b.share_of(64), 4 << 20);
        assert_eq!(b.share_of(1000), (256 << 20) / 1000);
        assert_eq!(b.share_of(100_000), MIN_SHARE);
    }

    #[test]
    fn members_come_and_go_with_their_handles() {
        let b = ReplyBudget::new(16 << 20);
        let a = b.join();
        assert_eq!(a.limit(), 8 << 20);
        assert_eq!(a.piece(), 1 << 20);
        let more: Vec<Share> = (0..15).map(|_| b.join()).collect();
        assert_eq!(b.members(), 16);
        assert_eq!(a.limit(), 1 << 20);
        assert_eq!(a.piece(), 256 << 10);
        drop(more);
        assert_eq!(b.members(), 1);
        assert_eq!(a.limit(), 8 << 20);
        drop(a);
        assert_eq!(b.members(), 0);
    }

    #[test]
    fn pieces_are_powers_of_two_within_bounds() {
        assert_eq!(piece_of(OUT_HIGH_WATER), 1 << 20);
        assert_eq!(piece_of(3 << 20), 512 << 10);
        assert_eq!(piece_of(MIN_SHARE), 64 << 10);
        assert_eq!(piece_of(1), MIN_PIECE);
    }
}
