//! The server's life: open exports, bind, accept, stop cleanly.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ringbd_io::net::{poll_readable, take_activated_listeners};
use ringbd_io::signal::{TermSignals, HANGUP};
use ringbd_io::uring::Features;

use crate::access::{AccessOptions, Limits};
use crate::engine_threads;
use crate::engine_uring::{Engine, EngineStats, UringOptions};
use crate::exports::{ExportConfig, ExportTable, Exports};
use crate::listener::{Listener, Stream};
use crate::reload::{Reload, Served};

/// Default listen address: loopback only, the IANA NBD port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
/// How long in-flight connections get to finish after a stop request
/// before their sockets are shut down under them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What `ringbd serve` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The exports, in order.
    pub exports: Vec<ExportConfig>,
    pub listen: Vec<String>,
    pub unix: Option<PathBuf>,
    /// Every export read-only, whatever its own setting.
    pub read_only: bool,
    /// Captive mode: run this shell command, stop when it exits.
    pub run: Option<String>,
    pub engine: EngineKind,
    pub uring: UringOptions,
    /// Print the engine's counters this often (they are printed at exit too).
    pub stats_interval: Option<Duration>,
    /// STARTTLS policy and credentials.
    pub tls: crate::tls::TlsOptions,
    /// Connection limits, the handshake deadline, socket mode, privileges.
    pub access: AccessOptions,
    /// How `rbd:` exports reach their Ceph cluster.
    pub ceph: ringbd_backend::CephConfig,
    /// Serve Prometheus metrics on this TCP address (`--metrics`).
    pub metrics: Option<String>,
    /// SIGHUP reads the exports again from here (`None`: SIGHUP keeps its
    /// default action). See [`crate::reload`].
    pub reload: Option<Reload>,
}

/// Which engine serves connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring where the kernel has what it needs, else threads.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// A blocking thread per connection.
    Threads,
}

/// A fatal start-up or shutdown problem, with its message.
#[derive(Debug)]
pub struct ServeError(pub String);

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ServeError {}

fn err(msg: impl Into<String>) -> ServeError {
    ServeError(msg.into())
}

/// Live connections, so a stop can wake and drain them.
#[derive(Default)]
struct Registry {
    conns: Mutex<HashMap<u64, Stream>>,
    idle: Condvar,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Stream>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove(&self, id: u64) {
        let mut c = self.lock();
        c.remove(&id);
        if c.is_empty() {
            self.idle.notify_all();
        }
    }

    /// Stops reading from every connection, waits up to `timeout` for them
    /// to finish their replies, then cuts the rest off.
    fn drain(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut c = self.lock();
        for s in c.values() {
            s.shutdown(Shutdown::Read).ok();
        }
        while !c.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("{} connection(s) did not finish in time; closing them", c.len());
                for s in c.values() {
                    s.shutdown(Shutdown::Both).ok();
                }
                break;
            }
            c = self.idle.wait_timeout(c, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// Runs the server until SIGINT/SIGTERM (exit code 0) or, in captive mode,
/// until the command exits (its exit code); with `config.reload`, SIGHUP
/// reloads the exports. Must be called before the process starts any other
/// thread (signals are routed to a signalfd).
pub fn run(config: Config) -> Result<i32, ServeError> {
    let signals = if config.reload.is_some() { TermSignals::with_hangup() } else { TermSignals::new() }
        .map_err(|e| err(format!("cannot set up signal handling: {e}")))?;

    let mut exports = Exports::default();
    let served = Served::open(config.exports.clone(), config.read_only, config.ceph.clone(), &mut exports)
        .map_err(err)?;
    let mut reloader = Reloader { served, source: config.reload.clone() };
    let tls = crate::tls::TlsServer::load(&config.tls).map_err(|e| err(format!("TLS: {e}")))?;
    if let Some(t) = &tls {
        let from = config.tls.psk.as_deref().or(config.tls.certificates.as_deref());
        tracing::debug!(
            "TLS {:?} with the {} in {:?}{}",
            t.mode,
            t.kind(),
            from.unwrap_or(std::path::Path::new("")),
            if config.tls.verify_peer { ", client certificates required" } else { "" }
        );
    }
    let tls_required = tls.as_ref().is_some_and(|t| t.mode == nbd_proto::TlsMode::Require);
    exports.set_tls(tls);
    exports.set_reply_memory(config.access.reply_memory);
    let exports = Arc::new(ExportTable::new(exports));

    let listeners = bind(&config)?;
    let metrics = config.metrics.as_deref().map(crate::metrics::http::bind).transpose().map_err(err)?;
    for l in &listeners {
        l.set_nonblocking().map_err(|e| err(format!("listener: {e}")))?;
    }
    // Sockets bound, exports and credentials open: root is no longer needed
    // (before the readiness lines, so a client never meets the old ids).
    crate::access::drop_privileges(&config.access).map_err(err)?;
    let limits = Limits::new(&config.access);
    {
        let mut stdout = io::stdout().lock();
        for l in &listeners {
            writeln!(stdout, "{}", l.uri_with(tls_required)).ok();
        }
        stdout.flush().ok();
    }

    let (wake_rx, wake_tx) = io::pipe().map_err(|e| err(format!("pipe: {e}")))?;
    let child_status: Arc<Mutex<Option<ExitStatus>>> = Arc::default();
    if let Some(cmd) = &config.run {
        let mut child = captive_command(cmd, &listeners, tls_required)
            .spawn()
            .map_err(|e| err(format!("--run: cannot start sh: {e}")))?;
        let status = child_status.clone();
        let mut wake_tx = wake_tx;
        thread::Builder::new()
            .name("run-waiter".into())
            .spawn(move || {
                let s = child.wait();
                if let Ok(s) = s {
                    *status.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                }
                // The accept loop wakes on this byte (or on EOF if it fails).
                wake_tx.write_all(b"x").ok();
            })
            .map_err(|e| err(format!("cannot start thread: {e}")))?;
    } else {
        // Keep the write end open so the pipe never reads EOF.
        std::mem::forget(wake_tx);
    }

    let features = Features::probe();
    let usable =
        features.io_uring && features.accept_multishot && features.recv_multishot && features.buf_ring;
    let engine = match config.engine {
        EngineKind::Threads => EngineKind::Threads,
        EngineKind::Uring if !usable => {
            return Err(err(format!(
                "--engine uring: this kernel lacks what the engine needs ({features:?})"
            )));
        }
        EngineKind::Uring => EngineKind::Uring,
        EngineKind::Auto if usable => EngineKind::Uring,
        EngineKind::Auto => {
            tracing::warn!("io_uring unavailable or too old here ({features:?}); using the threaded engine");
            EngineKind::Threads
        }
    };
    if engine == EngineKind::Uring {
        let o = &config.uring;
        let bundle = match (o.bundle, features.bundle) {
            (true, true) => "on",
            (true, false) => "unavailable",
            (false, _) => "off",
        };
        let inc = match (o.incremental, features.buf_inc) {
            (true, true) => " (consumed incrementally)",
            (true, false) => " (incremental consumption unavailable)",
            (false, _) => "",
        };
        tracing::info!(
            "engine io_uring: {} ring(s) (single issuer + defer taskrun: {}), multishot accept, multishot recv over \
             {} x {} KiB provided buffers{inc}, {}, bundles {bundle}, replies {}, zero-copy sends {}",
            o.threads,
            if features.defer_taskrun { "yes" } else { "no" },
            o.recv_buffers,
            o.recv_buffer_size / 1024,
            if let (true, Some(n)) = (features.recv_limit, o.receive_share) {
                format!("{} KiB per connection per arming", n / 1024)
            } else if features.recv_limit {
                "no per-arming limit (--receive-share 0)".to_owned()
            } else {
                "no per-arming limit (Linux 6.16+; a stalled connection spills what it received)".to_owned()
            },
            if o.coalesce { "coalesced per loop turn" } else { "one send each" },
            match (o.zerocopy, features.send_zc) {
                (true, true) => format!("over TCP from {} KiB of read payload", o.zerocopy_threshold / 1024),
                (true, false) => "unavailable".to_owned(),
                (false, _) => "off".to_owned(),
            },
        );
        let listeners = Arc::new(listeners);
        let eng = Engine::start(listeners, exports.clone(), config.uring, features, limits.clone())
            .map_err(|e| err(format!("io_uring engine: {e}")))?;
        if let Some(l) = metrics {
            serve_metrics(l, &exports, Some(eng.stats.clone()))?;
        }
        wait_for_stop(&signals, &wake_rx, config.stats_interval, &eng.stats, &mut reloader, &exports)?;
        let stats = eng.stats.clone();
        let stopped = eng.stop();
        tracing::info!("stats: {}", stats.summary());
        stopped.map_err(|e| err(format!("io_uring engine: {e}")))?;
    } else {
        tracing::info!("engine threads: one thread per connection");
        if let Some(l) = metrics {
            serve_metrics(l, &exports, None)?;
        }
        serve_threads(listeners, &exports, &signals, &wake_rx, &limits, &mut reloader)?;
        if let Some(t) = exports.load().tls() {
            tracing::info!("stats: {}", t.stats.summary());
        }
    }
    if limits.gate.refused() > 0 {
        tracing::warn!(
            "{} connection(s) refused over --max-connections {}",
            limits.gate.refused(),
            config.access.max_connections.unwrap_or_default()
        );
    }

    let mut flush_failed = false;
    for (name, backend) in reloader.served.backends() {
        if let Err(x) = backend.flush() {
            tracing::warn!("export {name:?}: final {x}");
            flush_failed = true;
        }
    }
    if flush_failed {
        return Err(err("could not flush every export; recent writes may not be durable"));
    }
    let status = *child_status.lock().unwrap_or_else(|p| p.into_inner());
    Ok(match (config.run.is_some(), status) {
        (false, _) => 0,
        (true, Some(s)) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        // Stopped by a signal before the command finished.
        (true, None) => 1,
    })
}

/// Starts the `--metrics` thread on its bound listener.
fn serve_metrics(
    l: std::net::TcpListener,
    exports: &Arc<ExportTable>,
    engine: Option<Arc<EngineStats>>,
) -> Result<(), ServeError> {
    let addr = l.local_addr().map_err(|e| err(format!("--metrics: {e}")))?;
    crate::metrics::http::spawn(l, exports.clone(), engine)
        .map_err(|e| err(format!("--metrics: cannot start its thread: {e}")))?;
    tracing::debug!("metrics on http://{addr}/metrics");
    Ok(())
}

/// The exports being served and where SIGHUP reloads them from.
struct Reloader {
    served: Served,
    source: Option<Reload>,
}

impl Reloader {
    /// Handles a signal from `signals`: returns whether it asks to stop
    /// (SIGHUP reloads and does not).
    fn on_signal(&mut self, sig: i32, table: &ExportTable) -> bool {
        if sig != HANGUP {
            tracing::debug!("signal {sig}: stopping");
            return true;
        }
        match &self.source {
            Some(source) => self.served.reload(table, source),
            None => tracing::warn!("SIGHUP: no configuration file to reload"),
        }
        false
    }
}

/// The threaded engine's accept loop: a thread per connection until a
/// signal or the captive command's exit, then a drain.
fn serve_threads(
    listeners: Vec<Listener>,
    exports: &Arc<ExportTable>,
    signals: &TermSignals,
    wake_rx: &io::PipeReader,
    limits: &Limits,
    reloader: &mut Reloader,
) -> Result<(), ServeError> {
    let registry = Arc::new(Registry::default());
    let mut next_id = 0u64;
    let mut workers = Vec::new();
    'accept: loop {
        let mut fds: Vec<_> = listeners.iter().map(|l| l.as_fd()).collect();
        fds.push(signals.as_fd());
        fds.push(wake_rx.as_fd());
        let ready = poll_readable(&fds, None).map_err(|e| err(format!("poll: {e}")))?;
        if ready[listeners.len()] {
            if let Ok(Some(sig)) = signals.take() {
                if reloader.on_signal(sig, exports) {
                    break 'accept;
                }
            }
        }
        if ready[listeners.len() + 1] {
            // The captive command exited (the byte itself carries nothing).
            break 'accept;
        }
        for (i, l) in listeners.iter().enumerate() {
            if !ready[i] {
                continue;
            }
            loop {
                let stream = match l.accept() {
                    Ok(s) => s,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // EMFILE and friends: report, keep serving others.
                        tracing::warn!("accept: {e}");
                        break;
                    }
                };
                // Over --max-connections: closed before any byte.
                let Some(ticket) = limits.gate.admit() else {
                    drop(stream);
                    continue;
                };
                let id = next_id;
                next_id += 1;
                match stream.try_clone() {
                    Ok(handle) => {
                        registry.lock().insert(id, handle);
                    }
                    Err(e) => {
                        tracing::warn!("connection setup: {e}");
                        continue;
                    }
                }
                // The table current at accept, for this connection's life.
                let (exports, registry2) = (exports.load(), registry.clone());
                let timeouts = engine_threads::Timeouts {
                    handshake: limits.handshake_timeout,
                    reply: limits.reply_timeout,
                };
                let spawned = thread::Builder::new().name(format!("conn-{id}")).spawn(move || {
                    let peer = stream.peer();
                    if let Err(e) = engine_threads::serve_limited(stream, exports, timeouts) {
                        tracing::warn!("{peer}: connection ended with error: {e}");
                    }
                    registry2.remove(id);
                    drop(ticket);
                });
                match spawned {
                    Ok(h) => workers.push(h),
                    Err(e) => {
                        tracing::warn!("cannot start connection thread: {e}");
                        registry.remove(id);
                    }
                }
                workers.retain(|h| !h.is_finished());
            }
        }
    }

    drop(listeners);
    registry.drain(DRAIN_TIMEOUT);
    for h in workers {
        h.join().ok();
    }
    Ok(())
}

/// Blocks until SIGINT/SIGTERM or the captive command's exit, printing the
/// engine's counters every `interval` and reloading on SIGHUP.
fn wait_for_stop(
    signals: &TermSignals,
    wake_rx: &io::PipeReader,
    interval: Option<Duration>,
    stats: &EngineStats,
    reloader: &mut Reloader,
    table: &ExportTable,
) -> Result<(), ServeError> {
    loop {
        let ready = poll_readable(&[signals.as_fd(), wake_rx.as_fd()], interval)
            .map_err(|e| err(format!("poll: {e}")))?;
        if ready[0] {
            if let Ok(Some(sig)) = signals.take() {
                if reloader.on_signal(sig, table) {
                    return Ok(());
                }
                continue;
            }
        }
        if ready[1] {
            return Ok(());
        }
        if interval.is_some() && !ready.iter().any(|&r| r) {
            tracing::info!("stats: {}", stats.summary());
        }
    }
}

fn bind(config: &Config) -> Result<Vec<Listener>, ServeError> {
    let activated = take_activated_listeners().map_err(|e| err(format!("socket activation: {e}")))?;
    if let Some(fds) = activated {
        return Ok(fds.into_iter().map(Listener::from_activated).collect());
    }
    let mut out = Vec::new();
    if let Some(path) = &config.unix {
        // bind creates the socket file with 0777 less the umask: with the
        // umask set to the complement, it has exactly the mode asked for,
        // with no window of wider permissions (a chmod after would leave one).
        let mode = config.access.unix_mode & 0o777;
        let l = crate::user::with_umask(!mode & 0o777, || Listener::bind_unix(path))
            .map_err(|e| err(e.to_string()))?;
        out.push(l);
    }
    let mut addrs = config.listen.clone();
    if addrs.is_empty() && config.unix.is_none() {
        addrs.push(DEFAULT_LISTEN.to_owned());
    }
    for a in &addrs {
        out.push(Listener::bind_tcp(a).map_err(|e| err(e.to_string()))?);
    }
    Ok(out)
}

/// `sh -c CMD` with `$uri`, `$unixsocket`, `$port` (as nbdkit's `--run`).
fn captive_command(cmd: &str, listeners: &[Listener], tls: bool) -> Command {
    let mut c = Command::new("/bin/sh");
    c.arg("-c").arg(cmd);
    // The activated sockets were ours, not the command's.
    for v in ringbd_io::net::ACTIVATION_VARS {
        c.env_remove(v);
    }
    let unix = listeners.iter().find_map(Listener::unix_path);
    let tcp = listeners.iter().find_map(Listener::tcp_addr);
    let uri = listeners
        .iter()
        .find(|l| l.unix_path().is_some())
        .or_else(|| listeners.first())
        .map(|l| l.uri_with(tls))
        .unwrap_or_default();
    c.env("uri", uri);
    match unix {
        Some(p) => c.env("unixsocket", p),
        None => c.env_remove("unixsocket"),
    };
    match tcp {
        Some(a) => c.env("port", a.port().to_string()),
        None => c.env_remove("port"),
    };
    c
}
