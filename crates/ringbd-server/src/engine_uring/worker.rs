//! The loop of one ring worker: wait for completions, hand each to the
//! connection it belongs to, start the file operations they produced, then
//! one pass over the connections that changed (sends, receives re-armed,
//! kTLS, closing); accepting, handing connections between workers,
//! deadlines and stopping.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ringbd_io::uring::{Completion, Ring, Sock};

use super::{Conn, Ctl, State, Worker, AIO_TOKEN, DEADLINE_TOKEN, WAKE_TOKEN};
use crate::access::Ticket;
use crate::conn::Connection;
use crate::listener::{Listener, Stream};
use crate::out::OutBuf;

/// How long connections get to finish once a stop is requested.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

impl Worker {
    pub(super) fn run(mut self) -> io::Result<()> {
        let r = self.serve();
        if let Err(e) = &r {
            tracing::warn!("ring worker failed: {e}");
        }
        r
    }

    fn serve(&mut self) -> io::Result<()> {
        let s = &mut self.state;
        for (i, l) in s.listeners.iter().enumerate() {
            self.ring.accept_multi(l.as_fd(), i as u32)?;
        }
        self.ring.poll_readable(s.wake_rx.as_fd(), WAKE_TOKEN)?;
        if let Some(q) = &s.aio {
            self.ring.poll_readable(q.as_fd(), AIO_TOKEN)?;
        }
        loop {
            self.ring.submit_and_wait(1)?;
            let state = &mut self.state;
            self.ring.completions(|ring, c| state.complete(ring, c));
            // File reads and writes that hit the page cache finish during
            // submission: start them now and collect their completions
            // before sending, so their replies join this turn's sends.
            if self.state.start_io(&mut self.ring) {
                self.ring.submit_and_wait(0)?;
                let state = &mut self.state;
                self.ring.completions(|ring, c| state.complete(ring, c));
            }
            self.state.flush(&mut self.ring);
            // Drivers send what this turn submitted; what they finished
            // (replies already in, requests refused) is sent now.
            while self.state.drive() {
                self.state.flush(&mut self.ring);
            }
            self.state.arm_deadline_timer(&mut self.ring);
            self.state.fold_stats(&self.ring);
            if let Some(since) = self.state.stopping {
                if self.state.live == 0 {
                    return Ok(());
                }
                if since.elapsed() > DRAIN_TIMEOUT {
                    self.state.abort_all();
                }
            }
        }
    }
}

impl State {
    fn complete(&mut self, ring: &mut Ring<OutBuf>, c: Completion<OutBuf>) {
        match c {
            Completion::Accept { listener, result, more } => {
                match result {
                    Ok(fd) => {
                        // Over --max-connections: closed before any byte.
                        let Some(ticket) = self.limits.gate.admit() else {
                            drop(fd);
                            return self.rearm_accept(ring, listener, more);
                        };
                        // Spread connections over the rings round robin; the
                        // kernel tends to hand every accept to one ring.
                        let n = self.peers.ctl.len();
                        let target = self.peers.next.fetch_add(1, Ordering::Relaxed) % n;
                        if target == self.index {
                            self.accepted(ring, listener, fd, ticket);
                        } else if let Err(e) = self.peers.send(target, Ctl::Conn(fd, listener, ticket)) {
                            tracing::warn!("handing a connection to ring {target}: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("accept: {e}"),
                }
                self.rearm_accept(ring, listener, more);
            }
            Completion::Recv { conn, result, more } => self.received(ring, conn, result, more),
            Completion::Send { conn, result, source, skip, copied } => {
                if let Some(Some(c)) = self.conns.get_mut(conn as usize) {
                    c.note_zerocopy(copied);
                }
                self.sent(ring, conn, result, source, skip)
            }
            Completion::Readable { token: WAKE_TOKEN } => self.woken(ring),
            Completion::Timer { .. } => {
                self.timer_armed = false;
                self.expire_handshakes();
                self.expire_stalled();
            }
            Completion::Readable { token: AIO_TOKEN } => self.aio_completed(ring),
            Completion::File { conn, token, result, buf } => {
                if let Some(Some(c)) = self.conns.get_mut(conn as usize) {
                    c.conn.io_complete(token, result, buf);
                    c.dirty = true;
                }
            }
            Completion::Readable { .. } | Completion::Cancelled => {}
        }
    }

    /// A multishot accept that ended (`more` false) is armed again.
    fn rearm_accept(&mut self, ring: &mut Ring<OutBuf>, listener: u32, more: bool) {
        if !more && self.stopping.is_none() {
            if let Some(l) = self.listeners.get(listener as usize) {
                if let Err(e) = ring.accept_multi(l.as_fd(), listener) {
                    tracing::warn!("re-arming accept: {e}");
                }
            }
        }
    }

    /// Drops the connections whose handshake deadline has passed while
    /// they are still haggling.
    fn expire_handshakes(&mut self) {
        let now = Instant::now();
        while let Some(&(deadline, id, serial)) = self.handshakes.front() {
            if deadline > now {
                break;
            }
            self.handshakes.pop_front();
            let Some(Some(c)) = self.conns.get_mut(id as usize) else { continue };
            if c.serial != serial || !c.conn.in_handshake() || c.broken {
                continue;
            }
            tracing::warn!(
                "{}: handshake not finished within {:?} (--handshake-timeout); closing",
                c.stream.peer(),
                self.limits.handshake_timeout.unwrap_or_default()
            );
            c.broken = true;
            c.stream.shutdown(Shutdown::Both).ok();
            c.dirty = true;
        }
    }

    /// Closes the connections whose replies have waited `--reply-timeout`
    /// without the socket taking a byte (a client that stopped reading):
    /// what they hold comes back.
    fn expire_stalled(&mut self) {
        let Some(timeout) = self.limits.reply_timeout else { return };
        let now = Instant::now();
        for c in self.conns.iter_mut().flatten() {
            let Some(since) = c.stalled_since else { continue };
            if c.broken || now.duration_since(since) < timeout {
                continue;
            }
            c.end(format_args!(
                "none of its {} bytes of replies could be sent for {:?} (--reply-timeout)",
                c.sending + c.conn.out().len(),
                timeout
            ));
            self.local.reply_timeouts += 1;
            // The send in flight ends with an error once the socket is shut.
            c.stream.shutdown(Shutdown::Both).ok();
            c.dirty = true;
        }
    }

    /// Sets the ring timer for the oldest connection still haggling, a
    /// little after its deadline so that one wake-up covers a batch, and,
    /// while replies wait anywhere, for the next check of the reply
    /// timeout (a tick of a quarter of it, at most a second).
    fn arm_deadline_timer(&mut self, ring: &mut Ring<OutBuf>) {
        if self.timer_armed || self.stopping.is_some() {
            return;
        }
        let mut after: Option<Duration> = None;
        if let Some(timeout) = self.limits.handshake_timeout {
            // Connections that finished haggling (or left) need no wake-up.
            while let Some(&(_, id, serial)) = self.handshakes.front() {
                match self.conns.get(id as usize) {
                    Some(Some(c)) if c.serial == serial && c.conn.in_handshake() && !c.broken => break,
                    _ => {
                        self.handshakes.pop_front();
                    }
                }
            }
            if let Some(&(deadline, _, _)) = self.handshakes.front() {
                let slack = (timeout / 10).min(Duration::from_millis(100));
                after = Some(deadline.saturating_duration_since(Instant::now()) + slack);
            }
        }
        if let Some(timeout) = self.limits.reply_timeout {
            if self.conns.iter().flatten().any(|c| c.stalled_since.is_some()) {
                let tick = (timeout / 4).min(Duration::from_secs(1));
                after = Some(after.map_or(tick, |a| a.min(tick)));
            }
        }
        let Some(after) = after else { return };
        match ring.timer(after, DEADLINE_TOKEN) {
            Ok(armed) => self.timer_armed = armed,
            Err(e) => tracing::warn!("arming the deadline timer: {e}"),
        }
    }

    fn accepted(&mut self, ring: &mut Ring<OutBuf>, listener: u32, fd: OwnedFd, ticket: Ticket) {
        if self.stopping.is_some() {
            return; // dropping the fd closes it
        }
        let tcp = matches!(self.listeners.get(listener as usize), Some(Listener::Tcp(_)));
        let stream = match self.listeners.get(listener as usize) {
            Some(Listener::Tcp(_)) => {
                let s = TcpStream::from(fd);
                if let Err(e) = s.set_nodelay(true) {
                    tracing::warn!("TCP_NODELAY: {e}");
                }
                Stream::Tcp(s)
            }
            _ => Stream::Unix(UnixStream::from(fd)),
        };
        let mut conn = Connection::new(self.exports.load(), stream.peer());
        if tcp {
            conn.allow_ktls();
        }
        // File exports: reads, writes and flushes become ring operations.
        conn.enable_async_file_io(ring.arena().cloned());
        if !self.coalesce {
            conn.set_reply_limit(1);
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.conns.push(None);
                (self.conns.len() - 1) as u32
            }
        };
        let sock = match ring.register_socket(stream.as_fd()) {
            Ok(Some(s)) => s,
            Ok(None) => Sock::raw(stream.as_fd()),
            Err(e) => {
                tracing::debug!("registering a socket: {e}");
                Sock::raw(stream.as_fd())
            }
        };
        let serial = self.next_serial;
        self.next_serial += 1;
        if let Some(t) = self.limits.handshake_timeout {
            self.handshakes.push_back((Instant::now() + t, id, serial));
        }
        let mut c = Conn {
            stream,
            _ticket: ticket,
            serial,
            sock,
            conn,
            recv_armed: false,
            cancel_sent: false,
            send_inflight: false,
            backlog: VecDeque::new(),
            spill: Vec::new(),
            spill_at: 0,
            stalled_since: None,
            sending: 0,
            broken: false,
            zc_ok: tcp,
            zc_copied_streak: 0,
            shut: false,
            dirty: true,
        };
        match ring.recv_multi(c.sock, id, self.receive_share) {
            Ok(()) => c.recv_armed = true,
            Err(e) => c.end(format_args!("arming its receive: {e}")),
        }
        self.conns[id as usize] = Some(c);
        self.live += 1;
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// After a batch of completions: send queued replies, re-arm receives,
    /// close finished connections.
    fn flush(&mut self, ring: &mut Ring<OutBuf>) {
        for id in 0..self.conns.len() {
            match &self.conns[id] {
                Some(c) if c.dirty => {}
                _ => continue,
            }
            // Operations queued by completions collected after start_io
            // (the next piece of a large read, the rest of a short
            // transfer) start now: nothing else would start them.
            self.submit_io(ring, id);
            let Some(c) = &mut self.conns[id] else { continue };
            c.dirty = false;
            if !c.send_inflight && !c.conn.out().is_empty() && !c.broken {
                let out = c.conn.take_out();
                // More replies follow right after this send: let TCP cork.
                let more = c.has_backlog();
                let zc = c.zc_ok && self.zerocopy.is_some_and(|t| out.largest_payload() >= t);
                c.sending = out.len();
                match ring.send(c.sock, id as u32, out, 0, more, zc) {
                    Ok(()) => c.send_inflight = true,
                    Err(e) => c.end(format_args!("send: {e}")),
                }
            }
            // Replies waiting: the reply timeout runs from now, unless it
            // already runs (only a byte the socket takes resets it).
            if c.send_inflight {
                c.stalled_since.get_or_insert_with(Instant::now);
            } else {
                c.stalled_since = None;
            }
            // Input it cannot take now leaves the shared buffers.
            if !c.backlog.is_empty() && !c.conn.wants_input() && !c.conn.is_closed() {
                self.local.spilled += c.spill_backlog(ring) as u64;
            }
            if !c.broken && !c.send_inflight && !c.has_backlog() && c.conn.ktls_ready() {
                // Received bytes must not leave the socket between the last
                // record rustls sees and TLS_RX: stop the receive first.
                if !c.recv_armed {
                    if c.conn.enable_ktls(c.stream.as_fd()) {
                        // The kernel encrypts from our pages during the
                        // send itself: SEND_ZC would only add a
                        // notification (it always reports "copied").
                        c.zc_ok = false;
                    }
                } else if !c.cancel_sent && c.conn.ktls_stop_receive() && ring.cancel_recv(id as u32).is_ok()
                {
                    c.cancel_sent = true;
                }
            }
            let finished = c.conn.is_closed() || c.broken;
            if !finished
                && !c.recv_armed
                && !c.has_backlog()
                && c.conn.wants_input()
                && ring.free_recv_buffers() > 0
            {
                let share = self.receive_share.map(|n| c.conn.receive_share(n));
                match ring.recv_multi(c.sock, id as u32, share) {
                    Ok(()) => c.recv_armed = true,
                    Err(e) => c.end(format_args!("re-arming its receive: {e}")),
                }
            }
            if finished && !c.send_inflight && c.conn.io_pending() == 0 {
                if !c.shut {
                    c.shut = true;
                    if !c.broken {
                        c.conn.ktls_close_notify(c.stream.as_fd());
                    }
                    c.stream.shutdown(Shutdown::Both).ok();
                }
                if !c.recv_armed {
                    c.backlog.drain(..).for_each(|p| ring.recycle(p));
                    // The table holds a reference: without this the socket
                    // would stay open after the stream is dropped.
                    if let Err(e) = ring.unregister_socket(c.sock) {
                        tracing::warn!("unregistering a socket: {e}");
                    }
                    let backend = c.conn.backend().cloned();
                    self.conns[id] = None;
                    self.free.push(id as u32);
                    self.live -= 1;
                    if let Some(b) = backend {
                        self.release_driver(&b);
                    }
                }
            } else if !c.recv_armed && !finished && !c.has_backlog() && c.conn.wants_input() {
                // Waiting for receive buffers: look again next turn.
                c.dirty = true;
            }
        }
    }

    /// The wake-up pipe is readable: drain it and the message channel, then
    /// poll again.
    fn woken(&mut self, ring: &mut Ring<OutBuf>) {
        let mut b = [0u8; 64];
        // The poll said readable, so this read does not block.
        if let Err(e) = (&self.wake_rx).read(&mut b) {
            tracing::warn!("wake-up pipe: {e}");
        }
        while let Ok(msg) = self.ctl_rx.try_recv() {
            match msg {
                Ctl::Conn(fd, listener, ticket) => self.accepted(ring, listener, fd, ticket),
                Ctl::Stop => self.stop(),
            }
        }
        if let Err(e) = ring.poll_readable(self.wake_rx.as_fd(), WAKE_TOKEN) {
            tracing::warn!("re-arming the wake-up poll: {e}");
        }
    }

    fn stop(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(Instant::now());
        for c in self.conns.iter_mut().flatten() {
            // Requests already received are answered; nothing new is read.
            c.stream.shutdown(Shutdown::Read).ok();
            c.dirty = true;
        }
    }

    fn abort_all(&mut self) {
        for c in self.conns.iter_mut().flatten() {
            c.broken = true;
            c.stream.shutdown(Shutdown::Both).ok();
            c.dirty = true;
        }
    }

    fn fold_stats(&mut self, ring: &Ring<OutBuf>) {
        let s = &self.stats;
        s.requests.fetch_add(std::mem::take(&mut self.local.requests), Ordering::Relaxed);
        s.replies.fetch_add(std::mem::take(&mut self.local.replies), Ordering::Relaxed);
        s.file_direct.fetch_add(std::mem::take(&mut self.local.direct), Ordering::Relaxed);
        s.aio_ops.fetch_add(std::mem::take(&mut self.local.aio), Ordering::Relaxed);
        s.spilled_bytes.fetch_add(std::mem::take(&mut self.local.spilled), Ordering::Relaxed);
        s.reply_timeouts.fetch_add(std::mem::take(&mut self.local.reply_timeouts), Ordering::Relaxed);
        // Ring counters are cumulative per ring: publish the deltas.
        let rs = ring.stats;
        s.recv_completions
            .fetch_add(rs.recv_completions.saturating_sub(self.seen.recv_completions), Ordering::Relaxed);
        s.recv_buffers.fetch_add(rs.recv_buffers.saturating_sub(self.seen.recv_buffers), Ordering::Relaxed);
        s.send_calls.fetch_add(rs.send_calls.saturating_sub(self.seen.send_calls), Ordering::Relaxed);
        s.enters.fetch_add(rs.enters.saturating_sub(self.seen.enters), Ordering::Relaxed);
        s.zc_sends.fetch_add(rs.zc_sends.saturating_sub(self.seen.zc_sends), Ordering::Relaxed);
        s.zc_copied.fetch_add(rs.zc_copied.saturating_sub(self.seen.zc_copied), Ordering::Relaxed);
        s.file_ops.fetch_add(rs.file_ops.saturating_sub(self.seen.file_ops), Ordering::Relaxed);
        s.file_fixed.fetch_add(rs.file_fixed.saturating_sub(self.seen.file_fixed), Ordering::Relaxed);
        s.buf_resyncs.fetch_add(rs.buf_resyncs.saturating_sub(self.seen.buf_resyncs), Ordering::Relaxed);
        self.seen = rs;
    }
}
