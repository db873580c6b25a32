//! Where an asynchronous backend's operations end ([`AsyncIo`](crate::AsyncIo)):
//! completions that finish on another library's threads (librbd's
//! callbacks, the NBD client's worker), delivered to a ring worker (a server
//! ring, a ublk queue) through an `eventfd`, or to a thread that waits.
//! Part of the block layer's contract, so it lives with the trait.
//!
//! A [`CompletionQueue`] belongs to one ring worker, which polls its
//! descriptor (`AsFd`) on the ring like any other. Foreign
//! threads [`push`](CompletionQueue::push) finished operations; the worker
//! wakes, [`drain`](CompletionQueue::drain)s them and completes each on its
//! connection. No thread ever blocks per request.
//!
//! The eventfd is written only when the list goes from empty to non-empty,
//! and the worker reads (clears) it before taking the list, so a push is
//! never missed: a push after the take finds the list empty and signals.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Condvar, Mutex, MutexGuard};

use ringbd_io::buf::IoBuf;
use ringbd_io::eventfd::EventFd;

/// A finished asynchronous operation.
#[derive(Debug)]
pub struct AioDone {
    /// What the submitter attached (the engine encodes connection and token).
    pub tag: u64,
    /// Bytes moved (reads and writes), or 0; the errno on failure.
    pub result: io::Result<usize>,
    /// The operation's buffer, handed back.
    pub buf: IoBuf,
}

/// Finished operations of one ring worker, signalled through an eventfd.
#[derive(Debug)]
pub struct CompletionQueue {
    fd: EventFd,
    done: Mutex<Vec<AioDone>>,
}

impl CompletionQueue {
    pub fn new() -> io::Result<CompletionQueue> {
        Ok(CompletionQueue { fd: EventFd::new()?, done: Mutex::new(Vec::new()) })
    }

    fn list(&self) -> MutexGuard<'_, Vec<AioDone>> {
        // A panic elsewhere cannot leave the Vec inconsistent: take it anyway.
        self.done.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a finished operation and wakes the worker (called from any
    /// thread). An error means the eventfd could not be written; the
    /// operation is queued regardless and is found at the next wake-up.
    pub fn push(&self, done: AioDone) -> io::Result<()> {
        let was_empty = {
            let mut l = self.list();
            let e = l.is_empty();
            l.push(done);
            e
        };
        if !was_empty {
            return Ok(());
        }
        self.fd.signal()
    }

    /// Makes the descriptor readable without queueing anything: wakes the
    /// worker (e.g. to end a poll it has in flight when it stops).
    pub fn wake(&self) -> io::Result<()> {
        self.fd.signal()
    }

    /// Clears the eventfd and moves every finished operation into `out`.
    pub fn drain(&self, out: &mut Vec<AioDone>) -> io::Result<()> {
        let r = self.fd.clear();
        out.append(&mut self.list());
        r
    }
}

impl AsFd for CompletionQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An asynchronous backend driven by the thread that submits to it
/// ([`AsyncIo::local`](crate::AsyncIo::local)): a server worker or a ublk
/// queue runs the backend's I/O from its own loop, with no thread of the
/// backend's in between (the NBD client's connections, on a ring of the
/// caller's thread). Not `Send`: it belongs to the thread that made it.
///
/// The caller already polls its [`CompletionQueue`]'s eventfd; the driver
/// has the kernel signal that eventfd when it has something to do, so the
/// caller calls [`LocalIo::drive`] whenever the eventfd is readable, and at
/// the end of every loop turn in which it submitted (that sends what was
/// submitted, batched). Finished operations come back from `drive`;
/// operations the driver hands to the backend's own path meanwhile (while
/// it connects, say) come back through the queue, as with
/// [`AsyncIo::submit`](crate::AsyncIo::submit). Both carry the caller's tag.
pub trait LocalIo {
    /// Starts `op` on `buf` ([`AsyncIo::submit`](crate::AsyncIo::submit)'s
    /// meaning); it ends as an [`AioDone`] with `tag`.
    fn submit(&mut self, op: crate::BlockOp, buf: IoBuf, tag: u64);
    /// Starts [`AsyncIo::submit_extents`](crate::AsyncIo::submit_extents).
    fn submit_extents(&mut self, offset: u64, len: u64, tag: u64);
    /// Sends what was submitted and moves every finished operation to
    /// `out`, without waiting.
    fn drive(&mut self, out: &mut Vec<AioDone>);
    /// Operations submitted here and not yet handed back by `drive`.
    fn inflight(&self) -> usize;
}

/// Where one asynchronous operation reports its end: a worker's queue, or a
/// thread waiting for it (the threaded engine and synchronous callers).
#[derive(Debug, Clone)]
pub enum Sink {
    Queue { queue: std::sync::Arc<CompletionQueue>, tag: u64 },
    Wait(std::sync::Arc<Waiter>),
}

impl Sink {
    /// Delivers the result.
    pub fn deliver(self, result: io::Result<usize>, buf: IoBuf) -> io::Result<()> {
        match self {
            Sink::Queue { queue, tag } => queue.push(AioDone { tag, result, buf }),
            Sink::Wait(w) => {
                *w.slot() = Some((result, buf));
                w.cv.notify_all();
                Ok(())
            }
        }
    }
}

/// A one-shot rendezvous for a synchronous wait on an asynchronous operation.
#[derive(Debug, Default)]
pub struct Waiter {
    done: Mutex<Option<(io::Result<usize>, IoBuf)>>,
    cv: Condvar,
}

impl Waiter {
    fn slot(&self) -> MutexGuard<'_, Option<(io::Result<usize>, IoBuf)>> {
        self.done.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until the operation delivered its result.
    pub fn wait(&self) -> (io::Result<usize>, IoBuf) {
        let mut g = self.slot();
        loop {
            if let Some(r) = g.take() {
                return r;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pushes_from_other_threads_are_drained_once() {
        let q = Arc::new(CompletionQueue::new().unwrap());
        let hs: Vec<_> = (0..4u64)
            .map(|i| {
                let q = q.clone();
                std::thread::spawn(move || {
                    q.push(AioDone { tag: i, result: Ok(1), buf: IoBuf::new() }).unwrap()
                })
            })
            .collect();
        hs.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(
            ringbd_io::net::poll_readable(&[q.as_fd()], Some(std::time::Duration::from_secs(1))).unwrap(),
            [true]
        );
        let mut out = Vec::new();
        q.drain(&mut out).unwrap();
        let mut tags: Vec<u64> = out.iter().map(|d| d.tag).collect();
        tags.sort();
        assert_eq!(tags, [0, 1, 2, 3]);
        // Cleared: nothing readable, nothing left.
        assert_eq!(
            ringbd_io::net::poll_readable(&[q.as_fd()], Some(std::time::Duration::ZERO)).unwrap(),
            [false]
        );
        out.clear();
        q.drain(&mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn a_waiter_gets_the_result() {
        let w = Arc::new(Waiter::default());
        let s = Sink::Wait(w.clone());
        std::thread::spawn(move || s.deliver(Err(io::Error::from_raw_os_error(libc::EIO)), IoBuf::new()));
        let (r, _) = w.wait();
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    }
}
