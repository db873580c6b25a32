//! The server's exports: names bound to opened backends, and the table of
//! them that a reload replaces ([`ExportTable`]).

use std::sync::{Arc, Mutex};

use nbd_proto::{BlockSizes, Errno, ExportCaps, ExportCatalog, ExportDescriptor, ExportListing};
use ringbd_backend::{Backend, ErrorKind, Op, Spec};

use crate::budget::ReplyBudget;
use crate::metrics::ExportMetrics;
use crate::tls::TlsServer;

/// What `ringbd serve` was asked to serve under one name (from the
/// command line or the configuration file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    pub name: String,
    pub spec: Spec,
    /// This export only (`--read-only` makes every export read-only).
    pub read_only: bool,
    /// What `NBD_INFO_DESCRIPTION` and `nbdinfo --list` show; `None`: the
    /// backend's own description (e.g. "memory 1 GiB").
    pub description: Option<String>,
}

impl ExportConfig {
    pub fn new(name: impl Into<String>, spec: Spec) -> Self {
        ExportConfig { name: name.into(), spec, read_only: false, description: None }
    }
}

/// One named export.
pub struct Export {
    pub name: String,
    pub description: String,
    pub backend: Arc<dyn Backend>,
    pub read_only: bool,
    /// Its connections' counters (`--metrics`).
    pub metrics: Arc<ExportMetrics>,
}

impl Export {
    pub fn new(name: impl Into<String>, backend: Arc<dyn Backend>, read_only: bool) -> Self {
        let read_only = read_only || backend.caps().read_only;
        let name = name.into();
        let metrics = ExportMetrics::new(name.clone());
        Export { name, description: backend.describe(), backend, read_only, metrics }
    }

    /// Counts into `metrics` (an export kept across a reload keeps its
    /// counters) instead of new ones.
    pub fn with_metrics(mut self, metrics: Arc<ExportMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Replaces the backend's own description.
    pub fn describe_as(mut self, description: Option<&str>) -> Self {
        if let Some(d) = description {
            self.description = d.to_owned();
        }
        self
    }

    pub fn descriptor(&self) -> ExportDescriptor {
        let c = self.backend.caps();
        ExportDescriptor {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.backend.size(),
            caps: ExportCaps {
                read_only: self.read_only,
                flush: c.flush,
                fua: c.fua,
                trim: c.trim,
                write_zeroes: c.write_zeroes,
                fast_zero: c.fast_zero,
                cache: c.cache,
                multi_conn: c.multi_conn,
                rotational: false,
                base_allocation: true,
            },
            block_sizes: {
                let mut b = BlockSizes::default();
                if let Some(p) = self.backend.preferred_block_size() {
                    b.preferred = p.clamp(b.minimum.max(512), b.maximum);
                }
                b
            },
        }
    }
}

/// All exports of one server.
#[derive(Default)]
pub struct Exports {
    list: Vec<Export>,
    /// TLS policy and credentials every connection uses (`None`: no TLS).
    tls: Option<Arc<TlsServer>>,
    /// What the connections may hold of replies, together (`--reply-memory`).
    budget: Arc<ReplyBudget>,
}

impl Exports {
    /// Adds an export; names must be unique.
    pub fn add(&mut self, export: Export) -> Result<(), String> {
        if self.list.iter().any(|e| e.name == export.name) {
            return Err(format!("export {:?} is defined twice", export.name));
        }
        if export.name.len() > nbd_proto::wire::MAX_STRING {
            return Err("export names are limited to 4096 bytes".into());
        }
        self.list.push(export);
        Ok(())
    }

    /// An empty table with the same TLS policy and reply budget (the
    /// budget is shared: connections of both tables draw on one total).
    pub fn empty_like(&self) -> Exports {
        Exports { list: Vec::new(), tls: self.tls.clone(), budget: self.budget.clone() }
    }

    /// Serves these exports with this TLS policy.
    pub fn set_tls(&mut self, tls: Option<TlsServer>) {
        self.tls = tls.map(Arc::new);
    }

    /// Shares `bytes` of replies out among the connections (see
    /// [`ReplyBudget`]).
    pub fn set_reply_memory(&mut self, bytes: usize) {
        self.budget = ReplyBudget::new(bytes);
    }

    pub fn budget(&self) -> &Arc<ReplyBudget> {
        &self.budget
    }

    pub fn tls(&self) -> Option<Arc<TlsServer>> {
        self.tls.clone()
    }

    pub fn get(&self, name: &str) -> Option<&Export> {
        self.list.iter().find(|e| e.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Export> {
        self.list.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

impl ExportCatalog for Exports {
    fn list(&self) -> Vec<ExportListing> {
        self.list
            .iter()
            .map(|e| ExportListing { name: e.name.clone(), description: e.description.clone() })
            .collect()
    }

    fn lookup(&self, name: &str) -> Option<ExportDescriptor> {
        self.get(name).map(Export::descriptor)
    }
}

/// The exports new connections see. Each connection takes the table current
/// at its accept and keeps it to the end ([`crate::conn::Connection`] holds
/// an `Arc<Exports>`): a reload that replaces the table changes what new
/// connections can choose, never the export an existing connection is
/// using. Read once per accepted connection, so a mutex is cheap enough.
pub struct ExportTable {
    current: Mutex<Arc<Exports>>,
}

impl ExportTable {
    pub fn new(exports: Exports) -> Self {
        ExportTable { current: Mutex::new(Arc::new(exports)) }
    }

    /// The current table.
    pub fn load(&self) -> Arc<Exports> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes `exports` the table of every later [`ExportTable::load`];
    /// returns the one it replaces.
    pub fn replace(&self, exports: Exports) -> Arc<Exports> {
        std::mem::replace(&mut *self.current.lock().unwrap_or_else(|p| p.into_inner()), Arc::new(exports))
    }
}

/// The NBD error a backend failure is reported as.
pub fn nbd_errno(e: &ringbd_backend::Error) -> Errno {
    match e.kind {
        ErrorKind::Io => Errno::EIO,
        ErrorKind::NoSpace => Errno::ENOSPC,
        ErrorKind::Permission => Errno::EPERM,
        ErrorKind::Invalid => Errno::EINVAL,
        // ENOTSUP is reserved by the spec for fast-zero refusals.
        ErrorKind::Unsupported if e.op == Op::WriteZeroes => Errno::ENOTSUP,
        ErrorKind::Unsupported => Errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringbd_backend::memory::MemoryBackend;

    #[test]
    fn duplicate_names_are_refused() {
        let mut x = Exports::default();
        x.add(Export::new("a", Arc::new(MemoryBackend::new(1)), false)).unwrap();
        assert!(x.add(Export::new("a", Arc::new(MemoryBackend::new(1)), false)).is_err());
    }

    #[test]
    fn a_replaced_table_leaves_loaded_ones_alone() {
        let mut x = Exports::default();
        x.add(Export::new("a", Arc::new(MemoryBackend::new(1)), false)).unwrap();
        let table = ExportTable::new(x);
        let before = table.load();
        let mut y = before.empty_like();
        y.add(Export::new("b", Arc::new(MemoryBackend::new(1)), false).describe_as(Some("bee"))).unwrap();
        let old = table.replace(y);
        assert!(old.get("a").is_some() && before.get("a").is_some());
        let now = table.load();
        assert!(now.get("a").is_none());
        assert_eq!(now.get("b").map(|e| e.description.as_str()), Some("bee"));
        assert!(Arc::ptr_eq(now.budget(), before.budget()));
    }

    #[test]
    fn read_only_flag_reaches_the_descriptor() {
        let e = Export::new("", Arc::new(MemoryBackend::new(4096)), true);
        let d = e.descriptor();
        assert!(d.caps.read_only);
        assert_eq!(d.size, 4096);
    }

    #[test]
    fn errors_map_to_nbd_errnos() {
        let io = |n| ringbd_backend::Error::new(Op::Write, 0, 1, std::io::Error::from_raw_os_error(n));
        assert_eq!(nbd_errno(&io(libc_enospc())), Errno::ENOSPC);
        assert_eq!(nbd_errno(&io(5)), Errno::EIO);
        assert_eq!(nbd_errno(&io(30)), Errno::EPERM); // EROFS
    }

    fn libc_enospc() -> i32 {
        28
    }
}
