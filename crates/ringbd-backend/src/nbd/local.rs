//! The NBD client on the caller's thread ([`AsyncIo::local`](crate::AsyncIo::local)):
//! a server worker or a ublk queue owns a [`Driver`] with one upstream
//! connection on a ring of its own thread. The kernel signals the caller's
//! completion eventfd when that ring has a completion
//! ([`Engine::notify`]), so the caller's loop, which polls the eventfd
//! already, drives the connection: no worker thread, channel or eventfd
//! write per request.
//!
//! The handshake runs on a short-lived thread (it can take a network round
//! trip or a TLS exchange, which a ring worker must not wait for); until
//! it is done, and after the connection fails, the driver hands its
//! requests to the export's worker ([`super::Shared`]), which owns the
//! reconnection policy (the 30 s window, failing requests after it). The
//! driver tries again every [`RECONNECT_EVERY`](super::RECONNECT_EVERY).

use std::os::fd::AsFd;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use ringbd_client::{ClientConfig, Connected, Engine};
use ringbd_io::buf::IoBuf;

use super::client::{Client, Job, Reply};
use super::{Shared, RECONNECT_EVERY};
use crate::aio::{AioDone, CompletionQueue, LocalIo, Sink};
use crate::BlockOp;

enum State {
    /// The handshake is running on another thread.
    Connecting(Receiver<Result<Connected, String>>),
    Up(Box<Client>),
    /// No connection since `since` (never made, or failed).
    Down {
        since: Instant,
    },
}

pub(super) struct Driver {
    shared: Arc<Shared>,
    queue: Arc<CompletionQueue>,
    state: State,
    /// Jobs that ended without reaching the ring (refused at submission).
    ready: Vec<AioDone>,
}

impl Driver {
    pub(super) fn new(shared: Arc<Shared>, queue: Arc<CompletionQueue>) -> Driver {
        let mut d = Driver { shared, queue, state: State::Down { since: Instant::now() }, ready: Vec::new() };
        d.state = d.connect();
        d
    }

    /// Starts a handshake on a thread of its own, which wakes the caller
    /// (through its queue's eventfd) when done.
    fn connect(&self) -> State {
        let (tx, rx) = mpsc::channel();
        let (uri, queue) = (self.shared.uri.clone(), self.queue.clone());
        let spawned = std::thread::Builder::new().name("ringbd-nbd-connect".into()).spawn(move || {
            let r = ringbd_client::connect(&uri, ClientConfig::new(&uri.export)).map_err(|e| e.to_string());
            if tx.send(r).is_ok() {
                if let Err(e) = queue.wake() {
                    tracing::warn!("NBD export {uri}: waking the caller after a handshake: {e}");
                }
            }
        });
        match spawned {
            Ok(_) => State::Connecting(rx),
            Err(e) => {
                tracing::warn!("NBD export {}: starting a handshake thread: {e}", self.shared.uri);
                State::Down { since: Instant::now() }
            }
        }
    }

    /// A finished handshake becomes the driver's connection, if it is to
    /// the same export.
    fn adopt(&self, c: Connected) -> Result<Client, String> {
        let up = self.shared.up;
        if c.negotiated.size != up.size || c.negotiated.flags != up.flags {
            return Err(format!(
                "the upstream now has size {} flags {:#x}, not {} {:#x}",
                c.negotiated.size, c.negotiated.flags, up.size, up.flags
            ));
        }
        let mut engine = Engine::new().map_err(|e| e.to_string())?;
        engine.set_name(&self.shared.uri.to_string());
        engine.adopt(c);
        engine.notify(self.queue.as_fd()).map_err(|e| e.to_string())?;
        Ok(Client::new(engine, up))
    }

    /// Hands a job to the export's worker; its result comes back through
    /// the queue, with its tag.
    fn to_worker(&self, job: Job) {
        let queue = &self.queue;
        self.shared.send(job.map_tag(|tag| Sink::Queue { queue: queue.clone(), tag }));
    }

    fn submit_job(&mut self, job: Job) {
        if let State::Down { since } = self.state {
            if since.elapsed() >= RECONNECT_EVERY
                && !self.shared.failed.load(std::sync::atomic::Ordering::Relaxed)
            {
                self.state = self.connect();
            }
        }
        match &mut self.state {
            State::Up(c) => {
                if let Err((job, e)) = c.start(job) {
                    job.fail(e, &mut self.ready);
                }
            }
            State::Connecting(_) | State::Down { .. } => self.to_worker(job),
        }
    }
}

impl LocalIo for Driver {
    fn submit(&mut self, op: BlockOp, buf: IoBuf, tag: u64) {
        self.submit_job(Job::Io { op, buf, reply: Reply::Tag(tag) });
    }

    fn submit_extents(&mut self, offset: u64, len: u64, tag: u64) {
        self.submit_job(Job::Extents { offset, len, reply: Reply::Tag(tag) });
    }

    fn drive(&mut self, out: &mut Vec<AioDone>) {
        out.append(&mut self.ready);
        let uri = &self.shared.uri;
        if let State::Connecting(rx) = &self.state {
            self.state = match rx.try_recv() {
                Err(TryRecvError::Empty) => return,
                Ok(Ok(c)) => match self.adopt(c) {
                    Ok(c) => {
                        tracing::debug!("NBD export {uri}: this thread's connection is up");
                        State::Up(Box::new(c))
                    }
                    Err(e) => {
                        tracing::warn!("NBD export {uri}: a connection of this thread's: {e}");
                        State::Down { since: Instant::now() }
                    }
                },
                Ok(Err(e)) => {
                    tracing::debug!("NBD export {uri}: a connection of this thread's: {e}");
                    State::Down { since: Instant::now() }
                }
                Err(TryRecvError::Disconnected) => State::Down { since: Instant::now() },
            };
        }
        let State::Up(c) = &mut self.state else { return };
        if let Err(e) = c.poll(false, out) {
            let jobs = c.take_all();
            tracing::warn!(
                "NBD export {uri}: this thread's connection failed: {e}; its {} request(s) go to the export's \
                 worker",
                jobs.len()
            );
            self.state = State::Down { since: Instant::now() };
            for job in jobs {
                self.to_worker(job);
            }
        }
    }

    fn inflight(&self) -> usize {
        let own = match &self.state {
            State::Up(c) => c.inflight(),
            _ => 0,
        };
        own + self.ready.len()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let State::Up(c) = std::mem::replace(&mut self.state, State::Down { since: Instant::now() }) {
            if let Err(e) = c.engine.disconnect() {
                tracing::debug!(
                    "NBD export {}: disconnecting this thread's connection: {e}",
                    self.shared.uri
                );
            }
        }
    }
}
