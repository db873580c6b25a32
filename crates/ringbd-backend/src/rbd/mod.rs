//! Ceph RBD images (`rbd:POOL/IMAGE[@SNAPSHOT]`) through librbd.
//!
//! One image handle per export, shared by every connection (librbd is
//! thread-safe, and a flush on the handle covers every write completed on
//! it: multi-conn is safe). The io_uring engine runs reads, writes, flushes,
//! trims and zeroing through [`AsyncIo`](crate::AsyncIo): librbd's asynchronous calls,
//! whose completions come back to the ring worker through its eventfd
//! queue. librbd has no asynchronous allocation query, so block status
//! runs `rbd_diff_iterate2` on the export's status thread, which delivers
//! to the same queue. The threaded engine calls the
//! [`Backend`](crate::Backend) methods, which start the same asynchronous calls and wait.
//!
//! The pure parts (spec parsing, diff to extents) are always built; opening
//! an image needs the `rbd` feature (librbd).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::Extent;

/// How `ringbd serve` reaches Ceph (`--ceph-conf`, `--ceph-id`, `--ceph-timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephConfig {
    /// ceph.conf; `None`: librados' search ($CEPH_CONF, /etc/ceph/ceph.conf...).
    pub conf: Option<PathBuf>,
    /// Client id (`admin` when `None`); the keyring is found as librados finds it.
    pub id: Option<String>,
    /// Bound on connecting, monitor commands and each OSD operation;
    /// `None`: librados' defaults (OSD operations then wait forever).
    pub timeout: Option<Duration>,
}

/// The default bound on cluster operations.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for CephConfig {
    fn default() -> Self {
        CephConfig { conf: None, id: None, timeout: Some(DEFAULT_TIMEOUT) }
    }
}

/// `POOL/IMAGE[@SNAPSHOT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    pub pool: String,
    pub image: String,
    pub snap: Option<String>,
}

impl fmt::Display for RbdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rbd:{}/{}", self.pool, self.image)?;
        if let Some(s) = &self.snap {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

impl RbdSpec {
    /// Parses the part after `rbd:`.
    pub fn parse(arg: &str) -> Result<RbdSpec, String> {
        let (pool, rest) =
            arg.split_once('/').ok_or_else(|| format!("{arg:?} must look like POOL/IMAGE[@SNAPSHOT]"))?;
        let (image, snap) = match rest.split_once('@') {
            Some((i, s)) => (i, Some(s)),
            None => (rest, None),
        };
        if pool.is_empty() || image.is_empty() || snap.is_some_and(str::is_empty) {
            return Err(format!("{arg:?}: pool, image and snapshot names must not be empty"));
        }
        if image.contains('/') {
            return Err(format!("{arg:?}: RBD namespaces (POOL/NAMESPACE/IMAGE) are not supported"));
        }
        if arg.contains('\0') {
            return Err(format!("{arg:?} contains a NUL byte"));
        }
        Ok(RbdSpec { pool: pool.into(), image: image.into(), snap: snap.map(Into::into) })
    }
}

/// Turns librbd's allocated runs (`(offset, len, exists)` in order, as
/// `rbd_diff_iterate2` reports them, possibly whole objects reaching outside
/// the range) into extents covering `[start, end)` from `start`: gaps are
/// holes reading as zero, `exists == false` (discarded) too. `truncated`: the
/// runs stopped early, so nothing past the last one is claimed.
pub fn extents_from_diff(start: u64, end: u64, runs: &[(u64, u64, bool)], truncated: bool) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let push = |out: &mut Vec<Extent>, len: u64, data: bool| {
        if len == 0 {
            return;
        }
        match out.last_mut() {
            Some(l) if l.hole != data => l.len += len,
            _ => out.push(Extent { len, hole: !data, zero: !data }),
        }
    };
    let mut pos = start;
    for &(off, len, exists) in runs {
        let s = off.max(pos);
        let e = off.saturating_add(len).min(end);
        if e <= s {
            continue; // out of order, or outside the range
        }
        push(&mut out, s - pos, false);
        push(&mut out, e - s, exists);
        pos = e;
    }
    if !truncated {
        push(&mut out, end.saturating_sub(pos), false);
    }
    out
}

// librbd's C API made safe: the one module of this crate with `unsafe`.
#[cfg(feature = "rbd")]
#[allow(unsafe_code)]
mod librbd;

#[cfg(feature = "rbd")]
pub use imp::RbdBackend;

#[cfg(feature = "rbd")]
mod imp {
    use std::io;
    use std::sync::{mpsc, Arc};
    use std::thread::JoinHandle;

    use super::librbd::{CallError, Cluster, ClusterConfig, Image, Pool};
    use crate::aio::Sink;
    use ringbd_io::buf::IoBuf;

    use super::{extents_from_diff, CephConfig, RbdSpec};
    use crate::{
        blocking, extents_to_buf, AsyncIo, Backend, BlockOp, Caps, Error, ErrorKind, Extent, Holes, Op,
        Result, ZeroFlags, MAX_EXTENTS,
    };

    /// librbd settings ringbd changes from librbd's defaults. `rados_conf_set`
    /// outranks ceph.conf and `CEPH_ARGS` whatever the order, so these hold;
    /// docs/rbd.md names the settings that undo their effect:
    /// - `rbd_cache_writethrough_until_flush = false`: librbd's cache writes
    ///   back from the first write instead of staying writethrough until the
    ///   client's first flush (a guard for guests that never flush). NBD's
    ///   contract is that acknowledged writes are durable after FLUSH or FUA,
    ///   which ringbd passes to librbd as `rbd_aio_flush`; file exports work
    ///   the same way through the page cache.
    const CLIENT_DEFAULTS: [(&std::ffi::CStr, &std::ffi::CStr); 1] =
        [(c"rbd_cache_writethrough_until_flush", c"false")];

    /// Most bytes one block-status call asks librbd about when the object
    /// map answers (fast-diff).
    const MAX_STATUS_SPAN: u64 = 4 << 30;
    /// Most objects one block-status call covers without the object map:
    /// librbd then asks the OSDs about every object in the range.
    const MAX_STATUS_OBJECTS: u64 = 64;

    pub struct RbdBackend {
        // Dropped first: the status thread ends before the image closes.
        status: Status,
        image: Arc<Image>,
        spec: RbdSpec,
        object_size: u64,
        read_only: bool,
        locked: bool,
    }

    /// What `extents` needs, shared with the status thread.
    #[derive(Clone, Copy)]
    struct Geometry {
        size: u64,
        /// Most bytes one query covers.
        span: u64,
    }

    /// Allocation of `[offset, offset+len)` (clipped to `g.span`), waiting
    /// for librbd.
    fn extents_of(image: &Image, g: Geometry, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len.clamp(1, g.span)).min(g.size);
        if offset >= end {
            return Ok(vec![Extent { len: len.max(1), hole: false, zero: false }]);
        }
        let runs = image
            .allocated(offset, end - offset, MAX_EXTENTS)
            .map_err(|e| Error::new(Op::Extents, offset, len, e.io_error()))?;
        let truncated = runs.len() >= MAX_EXTENTS;
        let ext = extents_from_diff(offset, end, &runs, truncated);
        if ext.is_empty() {
            // "Allocated, contents unknown" is always true.
            return Ok(vec![Extent { len: end - offset, hole: false, zero: false }]);
        }
        Ok(ext)
    }

    /// A block-status query for the status thread.
    struct StatusJob {
        offset: u64,
        len: u64,
        sink: Sink,
    }

    /// The export's status thread: runs block-status queries one after
    /// another, so that a ring worker never waits for the cluster. Dropping
    /// it ends the thread once the queries already sent are answered.
    struct Status {
        tx: Option<mpsc::Sender<StatusJob>>,
        thread: Option<JoinHandle<()>>,
        geometry: Geometry,
    }

    impl Status {
        fn start(image: Arc<Image>, geometry: Geometry, spec: &RbdSpec) -> io::Result<Status> {
            let (tx, rx) = mpsc::channel::<StatusJob>();
            let thread = std::thread::Builder::new().name("rbd-status".into()).spawn(move || {
                for job in rx {
                    job.answer(&image, geometry);
                }
            });
            let thread = thread
                .map_err(|e| io::Error::new(e.kind(), format!("{spec}: starting the status thread: {e}")))?;
            Ok(Status { tx: Some(tx), thread: Some(thread), geometry })
        }

        fn submit(&self, image: &Image, job: StatusJob) {
            let job = match &self.tx {
                Some(tx) => match tx.send(job) {
                    Ok(()) => return,
                    Err(mpsc::SendError(job)) => job,
                },
                None => job,
            };
            // The thread is gone (only a panic in it could end it): answer
            // here rather than never.
            job.answer(image, self.geometry);
        }
    }

    impl StatusJob {
        fn answer(self, image: &Image, geometry: Geometry) {
            let (result, buf) = match extents_of(image, geometry, self.offset, self.len) {
                Ok(ext) => (Ok(ext.len()), extents_to_buf(&ext)),
                Err(e) => (Err(e.source), IoBuf::new()),
            };
            if let Err(e) = self.sink.deliver(result, buf) {
                tracing::warn!("rbd: waking the ring worker after a block status: {e}");
            }
        }
    }

    impl Drop for Status {
        fn drop(&mut self) {
            drop(self.tx.take());
            if let Some(t) = self.thread.take() {
                if t.join().is_err() {
                    tracing::warn!("rbd: the status thread panicked");
                }
            }
        }
    }

    /// An open-time failure: what was being done, the call and its errno.
    fn open_error(spec: &RbdSpec, what: &str, e: CallError, hint: &str) -> Error {
        let src = e.io_error();
        let msg = format!("{spec}: {what}: {e}{hint}");
        Error {
            kind: ErrorKind::of(&src),
            op: Op::Open,
            offset: 0,
            len: 0,
            source: io::Error::new(src.kind(), msg),
        }
    }

    impl RbdBackend {
        /// Connects to the cluster and opens the image (read-only for a
        /// snapshot or `read_only`). A writable image with the
        /// exclusive-lock feature is locked for as long as it is served.
        pub fn open(spec: &RbdSpec, read_only: bool, ceph: &CephConfig) -> Result<RbdBackend> {
            let cfg = ClusterConfig {
                conf: ceph.conf.as_deref(),
                id: ceph.id.as_deref(),
                timeout: ceph.timeout,
                settings: &CLIENT_DEFAULTS,
            };
            // The client as the cluster names it (and as keyring paths do).
            let id = ceph.id.as_deref().unwrap_or("admin");
            let client = if id.starts_with("client.") { id.to_owned() } else { format!("client.{id}") };
            let where_keyring = format!(
                "librados looks where the conf's `keyring` says, else /etc/ceph/ceph.{client}.keyring; \
                 CEPH_ARGS=\"--keyring PATH\" names one"
            );
            let bound = match ceph.timeout {
                Some(t) => format!(" (within {}s)", t.as_secs()),
                None => String::new(),
            };
            let cluster = Cluster::connect(&cfg).map_err(|e| {
                let hint = match e.errno {
                    libc::ETIMEDOUT | libc::EINTR => format!(
                        "; no monitor answered{bound}: is the cluster up, and is `mon host` in {} right?",
                        ceph.conf.as_ref().map_or("ceph.conf".into(), |p| p.display().to_string())
                    ),
                    libc::ENOENT if e.call == "rados_conf_read_file" => match &ceph.conf {
                        Some(p) => format!("; cannot read {}", p.display()),
                        None => "; no ceph.conf found (give --ceph-conf PATH)".into(),
                    },
                    // cephx with no key for the client: librados gives up before asking.
                    libc::ENOENT => format!("; no keyring found for {client} ({where_keyring})"),
                    libc::EACCES | libc::EPERM => format!(
                        "; the cluster refused {client}: a wrong key, or a client it does not know \
                         (check --ceph-id and the keyring; {where_keyring})"
                    ),
                    _ => String::new(),
                };
                open_error(spec, "connecting to the cluster", e, &hint)
            })?;
            let pool = Pool::open(&cluster, &spec.pool).map_err(|e| {
                let hint = if e.errno == libc::ENOENT { "; no such pool" } else { "" };
                open_error(spec, &format!("opening pool {:?}", spec.pool), e, hint)
            })?;
            let snap = spec.snap.as_deref();
            let read_only = read_only || snap.is_some();
            let image = Image::open(&pool, &spec.image, snap, read_only).map_err(|e| {
                let hint = match (e.errno, snap) {
                    (libc::ENOENT, Some(_)) => "; no such image or snapshot".into(),
                    (libc::ENOENT, None) => "; no such image".into(),
                    // The OSD refused: the client's caps do not cover this pool (or only reading).
                    (libc::EPERM | libc::EACCES, _) => format!(
                        "; {client}'s caps do not allow opening it {} (that needs osd 'profile rbd{} pool={}')",
                        if read_only { "read-only" } else { "read-write" },
                        if read_only { "-read-only" } else { "" },
                        spec.pool
                    ),
                    _ => String::new(),
                };
                open_error(spec, "opening the image", e, &hint)
            })?;
            let (size, object_size) =
                image.stat().map_err(|e| open_error(spec, "reading the image's size", e, ""))?;
            let features = image.features().map_err(|e| open_error(spec, "reading features", e, ""))?;
            let mut locked = false;
            if !read_only && features.exclusive_lock() {
                image.lock_exclusive().map_err(|e| {
                    let hint = if matches!(e.errno, libc::EROFS | libc::EBUSY | libc::EAGAIN) {
                        "; another client holds the image's exclusive lock and will not release it \
                         (serve a snapshot, or --read-only)"
                    } else {
                        ""
                    };
                    open_error(spec, "taking the exclusive lock", e, hint)
                })?;
                locked = true;
            }
            let span = if features.fast_diff() {
                MAX_STATUS_SPAN
            } else {
                object_size.max(4096).saturating_mul(MAX_STATUS_OBJECTS)
            };
            let image = Arc::new(image);
            let geometry = Geometry { size, span };
            let status = Status::start(image.clone(), geometry, spec).map_err(|e| Error {
                kind: ErrorKind::of(&e),
                op: Op::Open,
                offset: 0,
                len: 0,
                source: e,
            })?;
            Ok(RbdBackend { image, status, spec: spec.clone(), object_size, read_only, locked })
        }
    }

    impl Backend for RbdBackend {
        fn size(&self) -> u64 {
            self.status.geometry.size
        }

        fn caps(&self) -> Caps {
            Caps {
                read_only: self.read_only,
                flush: true,
                fua: true,
                trim: true,
                write_zeroes: true,
                fast_zero: false,
                cache: false,
                multi_conn: true,
                extents: true,
            }
        }

        fn describe(&self) -> String {
            let mut s = format!("Ceph RBD image {}", self.spec);
            if self.locked {
                s.push_str(" (exclusive lock held)");
            }
            s
        }

        fn preferred_block_size(&self) -> Option<u32> {
            u32::try_from(self.object_size).ok().filter(|s| s.is_power_of_two())
        }

        fn aio(&self) -> Option<&dyn AsyncIo> {
            Some(self)
        }

        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Holes> {
            blocking::read(self, offset, buf)
        }

        fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
            blocking::write(self, offset, data, fua)
        }

        fn flush(&self) -> Result<()> {
            blocking::flush(self)
        }

        fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
            blocking::trim(self, offset, len, fua)
        }

        fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
            blocking::write_zeroes(self, offset, len, flags)
        }

        fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
            Ok(())
        }

        fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            extents_of(&self.image, self.status.geometry, offset, len)
        }
    }

    impl AsyncIo for RbdBackend {
        fn submit(&self, op: BlockOp, buf: IoBuf, sink: Sink) {
            // librbd cannot promise a quick zeroing (caps: no fast_zero).
            if let BlockOp::WriteZeroes { fast: true, .. } = op {
                let refused = Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
                if let Err(e) = sink.deliver(refused, buf) {
                    tracing::warn!("{}: delivering a refused fast zero: {e}", self.spec);
                }
                return;
            }
            self.image.submit(op, buf, sink)
        }

        fn submit_extents(&self, offset: u64, len: u64, sink: Sink) {
            self.status.submit(&self.image, StatusJob { offset, len, sink })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let s = RbdSpec::parse("rbd/disk").unwrap();
        assert_eq!(s, RbdSpec { pool: "rbd".into(), image: "disk".into(), snap: None });
        let s = RbdSpec::parse("p/i@snap1").unwrap();
        assert_eq!(s.snap.as_deref(), Some("snap1"));
        assert_eq!(s.to_string(), "rbd:p/i@snap1");
        for bad in ["disk", "/disk", "rbd/", "rbd/i@", "a/b/c", "a/b\0"] {
            assert!(RbdSpec::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    fn ext(v: &[Extent]) -> Vec<(u64, bool)> {
        v.iter().map(|e| (e.len, e.hole)).collect()
    }

    #[test]
    fn diff_runs_become_extents_with_holes_between() {
        const M: u64 = 1 << 20;
        // Objects of 4 MiB: #1 and #2 allocated, #4 discarded.
        let runs = [(4 * M, 4 * M, true), (8 * M, 4 * M, true), (16 * M, 4 * M, false)];
        let e = extents_from_diff(0, 24 * M, &runs, false);
        assert_eq!(ext(&e), [(4 * M, true), (8 * M, false), (12 * M, true)]);
        assert!(e[0].zero && !e[1].zero && e[2].zero);
        // A range inside an object: whole-object runs are clipped to it.
        let e = extents_from_diff(5 * M, 6 * M, &runs, false);
        assert_eq!(ext(&e), [(M, false)]);
        // Nothing allocated: one hole.
        assert_eq!(ext(&extents_from_diff(0, 3 * M, &[], false)), [(3 * M, true)]);
        // Truncated: nothing claimed after the last run.
        let e = extents_from_diff(0, 24 * M, &runs[..1], true);
        assert_eq!(ext(&e), [(4 * M, true), (4 * M, false)]);
        // Out-of-order or out-of-range runs are ignored, never panic.
        let e = extents_from_diff(8 * M, 12 * M, &[(8 * M, M, true), (0, M, true), (20 * M, M, true)], false);
        assert_eq!(ext(&e), [(M, false), (3 * M, true)]);
        assert_eq!(ext(&extents_from_diff(0, 8, &[(0, u64::MAX, true)], false)), [(8, false)]);
    }
}
