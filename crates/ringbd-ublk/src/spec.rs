//! Target specs on the command line: `null:SIZE`, `file:PATH[,direct]`,
//! `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, and their
//! TLS forms `nbds://` and `nbds+unix://` (`?tls-certificates=DIR` ...).

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, Result};
use ringbd_client::NbdUri;

use crate::file::FileTarget;
use crate::nbd::NbdTarget;
use crate::null::NullTarget;
use crate::target::Target;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    Null(u64),
    File { path: PathBuf, direct: bool },
    Nbd(NbdUri),
}

impl std::str::FromStr for TargetSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if ringbd_client::uri::is_nbd_uri(s) {
            return s.parse::<NbdUri>().map(TargetSpec::Nbd).map_err(|e| e.to_string());
        }
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("target {s:?} is not null:SIZE, file:PATH[,direct] or an NBD URI"))?;
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
            _ => Err(format!(
                "target {s:?}: unknown kind {kind:?} (null:SIZE, file:PATH[,direct], nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)"
            )),
        }
    }
}

impl TargetSpec {
    pub fn open(&self, read_only: bool) -> Result<Arc<dyn Target>> {
        match self {
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
        assert!("memory:1G".parse::<TargetSpec>().unwrap_err().contains("unknown kind"));
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
