//! Export specs: `memory:SIZE`, `file:PATH[,direct]`, `null:SIZE`,
//! `qcow2:PATH` ([`crate::qcow2`]), `rbd:POOL/IMAGE[@SNAPSHOT]` ([`crate::rbd`]), and the fault-injecting
//! wrapper `fault:RULES:SPEC` ([`crate::fault`]).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::fault::{FaultBackend, FaultPlan};
use crate::file::FileBackend;
use crate::memory::MemoryBackend;
use crate::null::NullBackend;
use crate::qcow2::Qcow2Backend;
use crate::rbd::{CephConfig, RbdSpec};
use crate::{Backend, Error};

/// A parsed export spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Memory(u64),
    /// `file:PATH[,direct]`.
    File {
        path: PathBuf,
        direct: bool,
    },
    Null(u64),
    /// `qcow2:PATH[,direct]`: a qcow2 image and its backing chain;
    /// `direct` reads and writes aligned data clusters with `O_DIRECT`.
    Qcow2 {
        path: PathBuf,
        direct: bool,
    },
    /// `rbd:POOL/IMAGE[@SNAPSHOT]`: a Ceph RBD image (a snapshot is read-only).
    Rbd(RbdSpec),
    /// `fault:RULES:SPEC`: another spec with injected errors and delays.
    Fault {
        plan: FaultPlan,
        inner: Box<Spec>,
    },
    /// `nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`: another server's
    /// export (a proxy).
    Nbd(ringbd_client::NbdUri),
}

/// Why a spec could not be used.
#[derive(Debug)]
pub enum SpecError {
    Syntax(String),
    Open(Error),
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecError::Syntax(s) => f.write_str(s),
            SpecError::Open(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SpecError {}

/// Largest export size (the NBD size field is unsigned, but files and
/// offsets are `off_t`).
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Parses `4096`, `512K`, `256M`, `1G`, `2T`, `1GiB`... (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("size {s:?} does not start with a number"));
    }
    let n: u64 = digits.parse().map_err(|_| format!("size {s:?} is too large"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => return Err(format!("size {s:?} has an unknown suffix {suffix:?} (use K, M, G, T, P or E)")),
    };
    let v = n.checked_mul(1u64 << shift).filter(|&v| v <= MAX_SIZE);
    v.ok_or_else(|| format!("size {s:?} exceeds the largest export size ({MAX_SIZE} bytes)"))
}

impl std::str::FromStr for Spec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        if ringbd_client::uri::is_nbd_uri(s) {
            return s
                .parse::<ringbd_client::NbdUri>()
                .map(Spec::Nbd)
                .map_err(|e| SpecError::Syntax(format!("export spec {s:?}: {e}")));
        }
        let (kind, arg) = s.split_once(':').ok_or_else(|| {
            SpecError::Syntax(format!(
                "export spec {s:?} must look like memory:SIZE, file:PATH[,direct], null:SIZE, qcow2:PATH[,direct] or rbd:POOL/IMAGE"
            ))
        })?;
        let size = |a: &str| parse_size(a).map_err(|e| SpecError::Syntax(format!("export spec {s:?}: {e}")));
        match kind {
            "memory" | "mem" => Ok(Spec::Memory(size(arg)?)),
            "null" => Ok(Spec::Null(size(arg)?)),
            "file" => parse_file(s, arg),
            "qcow2" if arg.is_empty() => Err(SpecError::Syntax(format!("export spec {s:?} names no image"))),
            "qcow2" => {
                let (path, direct) = path_and_direct(s, arg)?;
                Ok(Spec::Qcow2 { path, direct })
            }
            "rbd" => Ok(Spec::Rbd(
                RbdSpec::parse(arg).map_err(|e| SpecError::Syntax(format!("export spec {s:?}: {e}")))?,
            )),
            "fault" => {
                let (rules, inner) = arg.split_once(':').ok_or_else(|| {
                    SpecError::Syntax(format!("export spec {s:?} must look like fault:RULE[,RULE...]:SPEC"))
                })?;
                let plan = FaultPlan::parse(rules)
                    .map_err(|e| SpecError::Syntax(format!("export spec {s:?}: {e}")))?;
                Ok(Spec::Fault { plan, inner: Box::new(inner.parse()?) })
            }
            _ => Err(SpecError::Syntax(format!(
                "export spec {s:?}: unknown backend {kind:?} (memory, file, null, qcow2, rbd or fault)"
            ))),
        }
    }
}

/// `PATH[,direct]`. A trailing `,WORD` that is not an option stays part
/// of the path (file names may contain commas).
fn parse_file(spec: &str, arg: &str) -> Result<Spec, SpecError> {
    let (path, direct) = path_and_direct(spec, arg)?;
    Ok(Spec::File { path, direct })
}

fn path_and_direct(spec: &str, arg: &str) -> Result<(PathBuf, bool), SpecError> {
    let (path, direct) = match arg.rsplit_once(',') {
        Some((p, "direct")) => (p, true),
        _ => (arg, false),
    };
    if path.is_empty() {
        return Err(SpecError::Syntax(format!("export spec {spec:?} names no file")));
    }
    Ok((PathBuf::from(path), direct))
}

/// Opens the backend a spec names (RBD with the default [`CephConfig`]).
pub fn open(spec: &Spec, read_only: bool) -> Result<Arc<dyn Backend>, SpecError> {
    open_with(spec, read_only, &CephConfig::default())
}

/// Opens the backend a spec names; `ceph` says how to reach an RBD image's cluster.
pub fn open_with(spec: &Spec, read_only: bool, ceph: &CephConfig) -> Result<Arc<dyn Backend>, SpecError> {
    Ok(match spec {
        Spec::Memory(size) => Arc::new(MemoryBackend::new(*size)),
        Spec::Null(size) => Arc::new(NullBackend::new(*size)),
        Spec::File { path, direct } => {
            Arc::new(FileBackend::open(path, read_only, *direct).map_err(SpecError::Open)?)
        }
        Spec::Qcow2 { path, direct } => {
            Arc::new(Qcow2Backend::open_with(path, read_only, *direct).map_err(SpecError::Open)?)
        }
        Spec::Fault { plan, inner } => {
            Arc::new(FaultBackend::new(open_with(inner, read_only, ceph)?, plan.clone()))
        }
        Spec::Rbd(r) => open_rbd(r, read_only, ceph)?,
        Spec::Nbd(uri) => Arc::new(crate::nbd::NbdBackend::open(uri, read_only).map_err(SpecError::Open)?),
    })
}

#[cfg(feature = "rbd")]
fn open_rbd(spec: &RbdSpec, read_only: bool, ceph: &CephConfig) -> Result<Arc<dyn Backend>, SpecError> {
    Ok(Arc::new(crate::rbd::RbdBackend::open(spec, read_only, ceph).map_err(SpecError::Open)?))
}

#[cfg(not(feature = "rbd"))]
fn open_rbd(spec: &RbdSpec, _read_only: bool, _ceph: &CephConfig) -> Result<Arc<dyn Backend>, SpecError> {
    Err(SpecError::Syntax(format!("{spec}: this ringbd was built without RBD support (cargo feature `rbd`)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("8E").unwrap_err().contains("largest"));
        assert_eq!(parse_size("7E"), Ok(7 << 60));
        assert!(parse_size("G").is_err());
        assert!(parse_size("12Q").unwrap_err().contains("suffix"));
        assert!(parse_size("99999999999999999999").is_err());
    }

    #[test]
    fn specs() {
        assert_eq!("memory:1G".parse::<Spec>().unwrap(), Spec::Memory(1 << 30));
        assert_eq!("null:4096".parse::<Spec>().unwrap(), Spec::Null(4096));
        let file = |p: &str, direct| Spec::File { path: p.into(), direct };
        assert_eq!("file:/a/b".parse::<Spec>().unwrap(), file("/a/b", false));
        assert_eq!("file:/a/b,direct".parse::<Spec>().unwrap(), file("/a/b", true));
        assert_eq!("file:/a,b".parse::<Spec>().unwrap(), file("/a,b", false));
        assert!("file:,direct".parse::<Spec>().is_err());
        assert!("disk:/x".parse::<Spec>().unwrap_err().to_string().contains("unknown backend"));
        assert!("memory".parse::<Spec>().is_err());
        assert!("file:".parse::<Spec>().is_err());
        let Spec::Rbd(r) = "rbd:pool/img@s".parse::<Spec>().unwrap() else { panic!("not rbd") };
        assert_eq!((r.pool.as_str(), r.image.as_str(), r.snap.as_deref()), ("pool", "img", Some("s")));
        let q = |p: &str, direct| Spec::Qcow2 { path: p.into(), direct };
        assert_eq!("qcow2:/a/b.qcow2".parse::<Spec>().unwrap(), q("/a/b.qcow2", false));
        assert_eq!("qcow2:a,direct".parse::<Spec>().unwrap(), q("a", true));
        assert_eq!("qcow2:a,b".parse::<Spec>().unwrap(), q("a,b", false));
        assert!("qcow2:".parse::<Spec>().unwrap_err().to_string().contains("names no image"));
        assert!("rbd:img".parse::<Spec>().unwrap_err().to_string().contains("POOL/IMAGE"));
    }

    #[test]
    fn fault_specs_wrap_any_spec() {
        let s = "fault:read=0.1@EIO,delay-write=5ms:file:/a:b,direct".parse::<Spec>().unwrap();
        let Spec::Fault { plan, inner } = s else { panic!("not a fault spec") };
        assert_eq!(plan.rules[0].rate_ppb, 100_000_000);
        assert_eq!(*inner, Spec::File { path: "/a:b".into(), direct: true });
        let err = |s: &str| s.parse::<Spec>().unwrap_err().to_string();
        assert!(err("fault:read=0.1").contains("fault:RULE[,RULE...]:SPEC"), "{}", err("fault:read=0.1"));
        assert!(err("fault:read=2:memory:1G").contains("fraction"));
        assert!(err("fault:read=0.5:disk:1G").contains("unknown backend"));
        let b = open(&"fault:write=1@ENOSPC:memory:1M".parse().unwrap(), false).unwrap();
        assert_eq!(b.size(), 1 << 20);
        assert!(b.write(0, &[1], false).is_err());
        assert!(b.describe().contains("write 100% ENOSPC"), "{}", b.describe());
    }
}
