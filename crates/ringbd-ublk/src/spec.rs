//! Target specs on the command line: `null:SIZE`, `file:PATH[,direct]`,
//! `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, and their
//! TLS forms `nbds://` and `nbds+unix://` (`?tls-certificates=DIR` ...);
//! and the other export specs of `ringbd serve` (`memory:SIZE`,
//! `fault:RULES:SPEC`), served through the backend layer ([`BackendTarget`]).

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, Result};
use ringbd_client::NbdUri;

use crate::backend::BackendTarget;
use crate::file::FileTarget;
use crate::nbd::NbdTarget;
use crate::null::NullTarget;
use crate::target::Target;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    Null(u64),
    File {
        path: PathBuf,
        direct: bool,
    },
    Nbd(NbdUri),
    /// An export spec of `ringbd serve` without a target of its own here
    /// (memory, fault).
    Backend(ringbd_backend::Spec),
}

impl std::str::FromStr for TargetSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if ringbd_client::uri::is_nbd_uri(s) {
            return s.parse::<NbdUri>().map(TargetSpec::Nbd).map_err(|e| e.to_string());
        }
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            format!("target {s:?} is not null:SIZE, file:PATH[,direct], memory:SIZE, fault:RULES:SPEC or an NBD URI")
        })?;
        match kind {
            "null" => Ok(TargetSpec::Null(ringbd_backend::parse_size(rest)?)),
            "file" => {
                let (path, direct) = match rest.strip_suffix(",direct") {
                    Some(p) => (p, true),
                    None => (rest, false),
                };
                if path.is_empty() {
                    return Err(format!("target {s:?}: file: needs a path"));
                }
                Ok(TargetSpec::File { path: PathBuf::from(path), direct })
            }
            "rbd" => Err(format!(
                "target {s:?}: rbd images cannot be attached yet (they need librbd's asynchronous path on the \
                 queue's ring); serve it with `ringbd serve {s}` and attach that export over nbd+unix://"
            )),
            "memory" | "mem" | "fault" => match s.parse::<ringbd_backend::Spec>() {
                Ok(spec) if contains_rbd(&spec) => {
                    Err(format!("target {s:?}: rbd images cannot be attached yet (see rbd:)"))
                }
                Ok(spec) => Ok(TargetSpec::Backend(spec)),
                Err(e) => Err(e.to_string()),
            },
            _ => Err(format!(
                "target {s:?}: unknown kind {kind:?} (null:SIZE, file:PATH[,direct], memory:SIZE, fault:RULES:SPEC, \
                 nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)"
            )),
        }
    }
}

fn contains_rbd(spec: &ringbd_backend::Spec) -> bool {
    match spec {
        ringbd_backend::Spec::Rbd(_) => true,
        ringbd_backend::Spec::Fault { inner, .. } => contains_rbd(inner),
        _ => false,
    }
}

impl TargetSpec {
    /// Whether the data lives only in this process (a memory export, also
    /// under a fault wrapper): a restarted process starts empty, so such a
    /// device must not be recovered.
    pub fn is_volatile(&self) -> bool {
        fn memory(spec: &ringbd_backend::Spec) -> bool {
            match spec {
                ringbd_backend::Spec::Memory(_) => true,
                ringbd_backend::Spec::Fault { inner, .. } => memory(inner),
                _ => false,
            }
        }
        matches!(self, TargetSpec::Backend(spec) if memory(spec))
    }

    pub fn open(&self, read_only: bool) -> Result<Arc<dyn Target>> {
        match self {
            TargetSpec::Backend(spec) => {
                let backend = ringbd_backend::open(spec, read_only)
                    .map_err(|e| Error::msg(e.to_string(), libc::EINVAL))?;
                Ok(Arc::new(BackendTarget::new(backend, read_only)))
            }
            TargetSpec::Null(size) => {
                if read_only {
                    return Err(Error::msg("null target: --read-only makes no sense", libc::EINVAL));
                }
                Ok(Arc::new(NullTarget::new(*size)))
            }
            TargetSpec::File { path, direct } => Ok(Arc::new(FileTarget::open(path, *direct, read_only)?)),
            TargetSpec::Nbd(uri) => Ok(Arc::new(NbdTarget::open(uri.clone(), read_only)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!("null:1G".parse::<TargetSpec>(), Ok(TargetSpec::Null(1 << 30)));
        assert_eq!(
            "file:/a/b,direct".parse::<TargetSpec>(),
            Ok(TargetSpec::File { path: "/a/b".into(), direct: true })
        );
        assert_eq!(
            "file:/a".parse::<TargetSpec>(),
            Ok(TargetSpec::File { path: "/a".into(), direct: false })
        );
        assert!("file:".parse::<TargetSpec>().is_err());
        assert_eq!(
            "memory:1G".parse::<TargetSpec>(),
            Ok(TargetSpec::Backend(ringbd_backend::Spec::Memory(1 << 30)))
        );
        let fault = "fault:write=1@ENOSPC:memory:1M".parse::<TargetSpec>().unwrap();
        assert!(matches!(&fault, TargetSpec::Backend(ringbd_backend::Spec::Fault { .. })));
        assert!(fault.is_volatile() && "mem:1M".parse::<TargetSpec>().unwrap().is_volatile());
        assert!(!"fault:read=1:file:/x".parse::<TargetSpec>().unwrap().is_volatile());
        assert!(!"file:/x".parse::<TargetSpec>().unwrap().is_volatile());
        assert!("rbd:pool/img".parse::<TargetSpec>().unwrap_err().contains("cannot be attached yet"));
        assert!("fault:read=1:rbd:pool/img"
            .parse::<TargetSpec>()
            .unwrap_err()
            .contains("cannot be attached yet"));
        assert!("fault:nonsense:memory:1M".parse::<TargetSpec>().is_err());
        assert!("floppy:1".parse::<TargetSpec>().unwrap_err().contains("unknown kind"));
        assert!("null:lots".parse::<TargetSpec>().is_err());
        assert!("disk".parse::<TargetSpec>().is_err());
        match "nbd+unix:///disk?socket=/run/nbd.sock".parse::<TargetSpec>() {
            Ok(TargetSpec::Nbd(u)) => assert_eq!(u.export, "disk"),
            other => panic!("{other:?}"),
        }
        assert!(matches!("nbd://localhost:10809/x".parse::<TargetSpec>(), Ok(TargetSpec::Nbd(_))));
        match "nbds+unix:///x?socket=/s&tls-certificates=/etc/pki/nbd".parse::<TargetSpec>() {
            Ok(TargetSpec::Nbd(u)) => {
                assert_eq!(u.tls.and_then(|t| t.certificates), Some(PathBuf::from("/etc/pki/nbd")))
            }
            other => panic!("{other:?}"),
        }
    }
}
