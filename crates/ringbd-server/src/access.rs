//! Access control and limits around the connections, shared by both
//! engines: the `--max-connections` gate, the handshake deadline
//! (`--handshake-timeout`), the Unix socket's mode and dropping root
//! (`--user`/`--group`). Client certificate authorization
//! (`--tls-authz`) is part of the TLS configuration ([`crate::tls`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::user;

/// The default handshake deadline, as qemu-nbd's and nbdkit's 10 s for
/// the TLS handshake (ringbd's covers all of option haggling).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The default for `--reply-timeout`: how long a connection with replies
/// waiting may go without the socket taking a byte of them. A client that
/// reads at all resets it with every byte; only one that has stopped
/// reading (or a peer whose network is gone) reaches it. Long enough for
/// a congested or briefly stalled link (TCP's own retransmission timeout
/// backs off past a minute only when the peer is unreachable), short
/// enough that what such a connection holds (queued replies, in-flight
/// reads, parked requests: docs/engine.md) comes back within a minute.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Unix sockets are created for their owner alone unless asked otherwise.
pub const DEFAULT_UNIX_MODE: u32 = 0o600;

/// Limits and privileges from the command line.
#[derive(Debug, Clone)]
pub struct AccessOptions {
    /// Connections served at once; more are closed right after accept.
    pub max_connections: Option<usize>,
    /// A client that has not finished option haggling (TLS handshake
    /// included) this long after accept is dropped. `None`: no deadline.
    pub handshake_timeout: Option<Duration>,
    /// A connection with replies waiting whose socket takes no byte of them
    /// for this long is closed. `None`: never.
    pub reply_timeout: Option<Duration>,
    /// What all connections may hold of replies, operations in flight and
    /// received input, together (`crate::budget`).
    pub reply_memory: usize,
    /// Permission bits of a Unix socket ringbd binds.
    pub unix_mode: u32,
    /// Run as this user (name or number) once listening and with the
    /// exports open.
    pub user: Option<String>,
    /// Run as this group (name or number); default: the user's group.
    pub group: Option<String>,
}

impl Default for AccessOptions {
    fn default() -> Self {
        AccessOptions {
            max_connections: None,
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            reply_timeout: Some(DEFAULT_REPLY_TIMEOUT),
            reply_memory: crate::budget::DEFAULT_REPLY_MEMORY,
            unix_mode: DEFAULT_UNIX_MODE,
            user: None,
            group: None,
        }
    }
}

/// Counts open connections against `--max-connections`.
#[derive(Debug, Default)]
pub struct Gate {
    max: Option<usize>,
    open: AtomicUsize,
    refused: AtomicU64,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Ticket(Arc<Gate>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    pub fn new(max: Option<usize>) -> Arc<Gate> {
        Arc::new(Gate { max, ..Gate::default() })
    }

    /// A place for a new connection, or `None` (counted as refused) when
    /// `max` connections are open.
    pub fn admit(self: &Arc<Self>) -> Option<Ticket> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        let ticket = Ticket(self.clone());
        match self.max {
            Some(max) if before >= max => {
                drop(ticket);
                let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::debug!("connection refused: {max} open (--max-connections); {n} refused");
                None
            }
            _ => Some(ticket),
        }
    }

    /// Connections closed at accept because `max` were open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// What the engines need: the gate and the handshake deadline.
#[derive(Debug, Clone)]
pub struct Limits {
    pub gate: Arc<Gate>,
    pub handshake_timeout: Option<Duration>,
    pub reply_timeout: Option<Duration>,
}

impl Limits {
    pub fn new(opts: &AccessOptions) -> Limits {
        Limits {
            gate: Gate::new(opts.max_connections),
            handshake_timeout: opts.handshake_timeout,
            reply_timeout: opts.reply_timeout,
        }
    }
}

/// Switches to `--user`/`--group` for good (nothing to do without them).
pub fn drop_privileges(opts: &AccessOptions) -> Result<(), String> {
    if opts.user.is_none() && opts.group.is_none() {
        return Ok(());
    }
    let now = user::current_ids();
    let (uid, user_gid) = match &opts.user {
        Some(u) => {
            let ids = user::lookup_user(u).map_err(|e| format!("--user {u}: {e}"))?;
            (ids.uid, ids.gid)
        }
        None => (now.uid, now.gid),
    };
    let gid = match &opts.group {
        Some(g) => user::lookup_group(g).map_err(|e| format!("--group {g}: {e}"))?,
        None => user_gid,
    };
    user::drop_privileges(uid, gid)
        .map_err(|e| format!("cannot switch to uid {uid} gid {gid} (--user/--group): {e}"))?;
    tracing::debug!("running as uid {uid} gid {gid}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_admits_max_and_frees_places_on_drop() {
        let g = Gate::new(Some(2));
        let a = g.admit().unwrap();
        let b = g.admit().unwrap();
        assert!(g.admit().is_none());
        assert_eq!((g.open(), g.refused()), (2, 1));
        drop(a);
        let c = g.admit().unwrap();
        assert!(g.admit().is_none());
        drop((b, c));
        assert_eq!((g.open(), g.refused()), (0, 2));
    }

    #[test]
    fn no_max_admits_everyone() {
        let g = Gate::new(None);
        let t: Vec<_> = (0..100).map(|_| g.admit().unwrap()).collect();
        assert_eq!(g.open(), 100);
        drop(t);
        assert_eq!(g.open(), 0);
    }
}
