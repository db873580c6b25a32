//! Opening the configured exports, and opening them again on SIGHUP.
//!
//! A reload reads the export list again (from wherever [`Reload`] gets it:
//! the binary re-reads its configuration file) and builds a new
//! [`Exports`] table for new connections:
//!
//! - an export whose spec and read-only setting are unchanged keeps its
//!   backend (a memory export keeps its data; a file stays open once);
//! - an added export, or one whose spec or read-only setting changed, is
//!   opened now; if any open fails, the reload is abandoned and nothing
//!   changes;
//! - a removed (or replaced) export is flushed, then left to the
//!   connections already using it: they keep working until they
//!   disconnect, and the backend is closed with the last of them (as
//!   qemu-storage-daemon's `block-export-del` in its default safe mode).
//!   New connections cannot choose it.
//!
//! Listeners, TLS, limits and engine settings are read at start only.

use std::fmt;
use std::sync::Arc;

use ringbd_backend::{Backend, CephConfig};

use crate::exports::{Export, ExportConfig, ExportTable, Exports};

/// Where a reload gets the export list: a function the binary provides
/// (it re-reads its configuration file and adds the command line's
/// exports). An `Err` is logged and changes nothing.
#[derive(Clone)]
pub struct Reload(Arc<dyn Fn() -> Result<Vec<ExportConfig>, String> + Send + Sync>);

impl Reload {
    pub fn new(f: impl Fn() -> Result<Vec<ExportConfig>, String> + Send + Sync + 'static) -> Self {
        Reload(Arc::new(f))
    }
}

impl fmt::Debug for Reload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reload(..)")
    }
}

/// The exports being served: what each was configured as, and its backend.
pub(crate) struct Served {
    exports: Vec<(ExportConfig, Arc<dyn Backend>)>,
    /// `--read-only`: every export, whatever its own setting.
    read_only: bool,
    ceph: CephConfig,
}

/// What a reload did, by export name.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Same name, a new spec or read-only setting: a new backend.
    pub replaced: Vec<String>,
    pub kept: Vec<String>,
}

impl fmt::Display for Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (what, names) in [
            ("added", &self.added),
            ("removed", &self.removed),
            ("replaced", &self.replaced),
            ("kept", &self.kept),
        ] {
            if names.is_empty() {
                continue;
            }
            let names: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
            write!(f, "{}{what} {}", if first { "" } else { "; " }, names.join(", "))?;
            first = false;
        }
        if first {
            f.write_str("no exports")?;
        }
        Ok(())
    }
}

impl Served {
    /// Opens `defs` into `table` (which brings the TLS policy and reply
    /// budget): the server's start.
    pub fn open(
        defs: Vec<ExportConfig>,
        read_only: bool,
        ceph: CephConfig,
        table: &mut Exports,
    ) -> Result<Served, String> {
        let mut served = Served { exports: Vec::new(), read_only, ceph };
        let (exports, _) = served.build(defs, table, None)?;
        served.exports = exports;
        Ok(served)
    }

    /// Opens `defs` into `table`, reusing the backends of unchanged
    /// exports, and their counters from `old` (the table being replaced);
    /// all or nothing.
    #[allow(clippy::type_complexity)]
    fn build(
        &self,
        defs: Vec<ExportConfig>,
        table: &mut Exports,
        old_table: Option<&Exports>,
    ) -> Result<(Vec<(ExportConfig, Arc<dyn Backend>)>, Changes), String> {
        let mut changes = Changes::default();
        let mut out = Vec::with_capacity(defs.len());
        for def in defs {
            let read_only = self.read_only || def.read_only;
            let old = self.exports.iter().find(|(d, _)| d.name == def.name);
            let mut metrics = None;
            let backend = match old {
                Some((d, b)) if d.spec == def.spec && d.read_only == def.read_only => {
                    changes.kept.push(def.name.clone());
                    metrics = old_table.and_then(|t| t.get(&def.name)).map(|e| e.metrics.clone());
                    b.clone()
                }
                _ => {
                    let b = ringbd_backend::open_with(&def.spec, read_only, &self.ceph)
                        .map_err(|e| format!("export {:?}: {e}", def.name))?;
                    let list = if old.is_some() { &mut changes.replaced } else { &mut changes.added };
                    list.push(def.name.clone());
                    b
                }
            };
            let mut export = Export::new(def.name.clone(), backend.clone(), read_only)
                .describe_as(def.description.as_deref());
            if let Some(m) = metrics {
                export = export.with_metrics(m);
            }
            table.add(export)?;
            out.push((def, backend));
        }
        for (d, _) in &self.exports {
            if !out.iter().any(|(n, _)| n.name == d.name) {
                changes.removed.push(d.name.clone());
            }
        }
        Ok((out, changes))
    }

    /// SIGHUP: reads the export list again from `source` and makes it what
    /// new connections see. Logs what changed, or why nothing did.
    pub fn reload(&mut self, table: &ExportTable, source: &Reload) {
        let defs = match (source.0)() {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("reload: {e}; exports unchanged");
                return;
            }
        };
        let current = table.load();
        let mut next = current.empty_like();
        let (exports, changes) = match self.build(defs, &mut next, Some(&current)) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("reload: {e}; exports unchanged");
                return;
            }
        };
        table.replace(next);
        // What new connections can no longer reach: make what was written
        // durable now; connections still using it flush on their own.
        for (d, b) in &self.exports {
            let gone = changes.removed.contains(&d.name) || changes.replaced.contains(&d.name);
            if gone {
                if let Err(e) = b.flush() {
                    tracing::warn!("reload: export {:?} (removed): {e}", d.name);
                }
            }
        }
        self.exports = exports;
        tracing::info!("reload: {changes}");
    }

    /// Every backend being served, for the final flush.
    pub fn backends(&self) -> impl Iterator<Item = (&str, &Arc<dyn Backend>)> {
        self.exports.iter().map(|(d, b)| (d.name.as_str(), b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringbd_backend::Spec;

    fn def(name: &str, spec: &str) -> ExportConfig {
        ExportConfig::new(name, spec.parse::<Spec>().unwrap())
    }

    #[test]
    fn unchanged_exports_keep_their_backend() {
        let mut first = Exports::default();
        let mut served = Served::open(
            vec![def("a", "memory:1M"), def("b", "memory:1M"), def("c", "null:1M")],
            false,
            CephConfig::default(),
            &mut first,
        )
        .unwrap();
        let a = first.get("a").unwrap().backend.clone();
        let (a_metrics, c_metrics) =
            (first.get("a").unwrap().metrics.clone(), first.get("c").unwrap().metrics.clone());
        let table = ExportTable::new(first);
        let mut ro_c = def("c", "null:1M");
        ro_c.read_only = true;
        let next = vec![def("a", "memory:1M"), ro_c, def("d", "null:2M")];
        served.reload(&table, &Reload::new(move || Ok(next.clone())));
        let now = table.load();
        assert!(Arc::ptr_eq(&now.get("a").unwrap().backend, &a));
        // Its counters go on (--metrics); a changed export's start again.
        assert!(Arc::ptr_eq(&now.get("a").unwrap().metrics, &a_metrics));
        assert!(!Arc::ptr_eq(&now.get("c").unwrap().metrics, &c_metrics));
        assert!(now.get("b").is_none());
        assert!(now.get("c").unwrap().read_only);
        assert_eq!(now.get("d").unwrap().backend.size(), 2 << 20);
    }

    #[test]
    fn a_failed_reload_changes_nothing() {
        let mut first = Exports::default();
        let mut served =
            Served::open(vec![def("a", "memory:1M")], false, CephConfig::default(), &mut first).unwrap();
        let table = ExportTable::new(first);
        let before = table.load();
        served.reload(&table, &Reload::new(|| Err("bad file".into())));
        let dup = vec![def("a", "memory:1M"), def("a", "null:1M")];
        served.reload(&table, &Reload::new(move || Ok(dup.clone())));
        let missing = vec![def("b", "file:/nonexistent/ringbd-test")];
        served.reload(&table, &Reload::new(move || Ok(missing.clone())));
        assert!(Arc::ptr_eq(&table.load(), &before));
        assert_eq!(served.backends().count(), 1);
    }

    #[test]
    fn changes_read_well() {
        let c = Changes { added: vec!["c".into()], removed: vec!["b".into()], ..Changes::default() };
        assert_eq!(c.to_string(), r#"added "c"; removed "b""#);
        assert_eq!(Changes::default().to_string(), "no exports");
    }
}
