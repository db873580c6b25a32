//! NBD URIs as doc/uri.md defines them: `nbd://host[:port]/export` and
//! `nbd+unix:///export?socket=PATH`. The TLS schemes are recognized and
//! refused until TLS lands.

use std::fmt;
use std::path::PathBuf;

/// The NBD port IANA assigned.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    /// The export name (the path without its leading `/`, percent-decoded).
    pub export: String,
}

/// What is wrong with a URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriError {
    pub uri: String,
    pub reason: String,
}

impl fmt::Display for UriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad NBD URI {:?}: {}", self.uri, self.reason)
    }
}

impl std::error::Error for UriError {}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = encode(&self.export, false);
        match &self.address {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "nbd://[{host}]:{port}/{export}"),
            Address::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
            Address::Unix(p) => {
                write!(f, "nbd+unix:///{export}?socket={}", encode(&p.to_string_lossy(), true))
            }
        }
    }
}

/// Whether `s` looks like an NBD URI (as opposed to a file name).
pub fn is_nbd_uri(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://"]
        .iter()
        .any(|p| lower.starts_with(p))
}

fn encode(s: &str, query: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        let keep =
            b.is_ascii_alphanumeric() || b"-._~/".contains(&b) || (!query && b":@!$&'()*+,;=".contains(&b));
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(s: &str, what: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let v = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
            let Some(v) = v else {
                return Err(format!("bad percent-escape in the {what} at byte {i}"));
            };
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the {what} is not UTF-8 after percent-decoding"))
}

impl std::str::FromStr for NbdUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, UriError> {
        parse(uri).map_err(|reason| UriError { uri: uri.to_owned(), reason })
    }
}

fn parse(uri: &str) -> Result<NbdUri, String> {
    let (scheme, rest) = uri.split_once("://").ok_or("no scheme (expected nbd:// or nbd+unix://)")?;
    let scheme = scheme.to_ascii_lowercase();
    match scheme.as_str() {
        "nbd" | "nbd+unix" => {}
        "nbds" | "nbds+unix" => {
            return Err(format!("{scheme}:// needs TLS, which ringbd does not support yet"))
        }
        "nbd+vsock" | "nbds+vsock" => return Err(format!("{scheme}:// (AF_VSOCK) is not supported")),
        other => return Err(format!("unknown scheme {other:?} (expected nbd:// or nbd+unix://)")),
    }
    if rest.contains('#') {
        return Err("fragments (#...) are not allowed".into());
    }
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], &before_query[i..]),
        None => (before_query, ""),
    };
    let export = decode(path.strip_prefix('/').unwrap_or(path), "export name")?;
    if export.contains('\0') {
        return Err("the export name contains NUL".into());
    }
    let mut socket = None;
    for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        match k {
            "socket" => socket = Some(decode(v, "socket parameter")?),
            k if k.starts_with("tls-") => {
                return Err(format!("query parameter {k:?} needs TLS, which ringbd does not support yet"))
            }
            // Unknown parameters are ignored, as doc/uri.md allows.
            _ => {}
        }
    }
    // Userinfo is only for TLS authentication.
    let authority = match authority.rsplit_once('@') {
        Some((_, a)) => a,
        None => authority,
    };
    if scheme == "nbd+unix" {
        if !authority.is_empty() {
            return Err(format!(
                "nbd+unix:// takes no host (got {authority:?}); write nbd+unix:///export?socket=PATH"
            ));
        }
        let path = socket.ok_or("nbd+unix:// needs ?socket=PATH")?;
        if path.is_empty() {
            return Err("the socket parameter is empty".into());
        }
        return Ok(NbdUri { address: Address::Unix(PathBuf::from(path)), export });
    }
    if socket.is_some() {
        return Err("?socket= is only for nbd+unix://".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unterminated [IPv6] host")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(format!("unexpected {p:?} after the IPv6 address"))?),
        };
        (h.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (authority.to_owned(), None),
        }
    };
    let bracketed = authority.starts_with('[');
    let host = decode(&host, "host")?;
    if host.is_empty() {
        return Err("no host (nbd://HOST[:PORT]/EXPORT)".into());
    }
    if bracketed {
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{host:?} in brackets is not an IPv6 address"));
        }
    } else if host.contains(':') {
        return Err(format!("host {host:?} contains ':' (an IPv6 address goes in brackets: nbd://[::1]/)"));
    } else if let Some(c) =
        host.chars().find(|c| c.is_whitespace() || c.is_control() || "[]@/?#".contains(*c))
    {
        return Err(format!("host {host:?} contains {c:?}"));
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("bad port {p:?} (1-65535)")),
            Ok(n) => n,
        },
    };
    Ok(NbdUri { address: Address::Tcp { host, port }, export })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> NbdUri {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(s: &str) -> String {
        s.parse::<NbdUri>().unwrap_err().reason
    }

    fn tcp(host: &str, port: u16) -> Address {
        Address::Tcp { host: host.into(), port }
    }

    #[test]
    fn export_names_as_in_the_spec_table() {
        assert_eq!(ok("nbd://example.com/disk").export, "disk");
        assert_eq!(ok("nbd+unix:///disk?socket=sock").export, "disk");
        assert_eq!(ok("nbd://example.com/").export, "");
        assert_eq!(ok("nbd://example.com").export, "");
        assert_eq!(ok("nbd://example.com//disk").export, "/disk");
        assert_eq!(ok("nbd://example.com/hello%20world").export, "hello world");
    }

    #[test]
    fn hosts_that_would_not_print_back_are_refused() {
        // Found by the `uri` fuzz target: a host with ':' (and ']') parsed,
        // then printed in brackets as a URI that did not parse.
        assert!(err("nbd://ix:RRR&RR\u{11}RRRRRRR]RRRRRR:").contains("contains ':'"));
        assert!(err("nbd://a:b:c/").contains("brackets"));
        assert!(err("nbd://[not-v6]/").contains("not an IPv6 address"));
        assert!(err("nbd://ho%20st/").contains("contains ' '"));
        assert!(err("nbd://a]b/").contains("contains ']'"));
        assert_eq!(ok("nbd://[fe80::1]:7/").address, tcp("fe80::1", 7));
    }

    #[test]
    fn addresses() {
        assert_eq!(ok("nbd://example.com").address, tcp("example.com", 10809));
        assert_eq!(ok("nbd://127.0.0.1:1234/x").address, tcp("127.0.0.1", 1234));
        assert_eq!(ok("NBD://[::1]:99/").address, tcp("::1", 99));
        assert_eq!(ok("nbd://[::1]").address, tcp("::1", 10809));
        assert_eq!(ok("nbd://user@host:5/").address, tcp("host", 5));
        assert_eq!(ok("nbd+unix:///?socket=/tmp/a%20b.sock").address, Address::Unix("/tmp/a b.sock".into()));
        assert_eq!(ok("nbd+unix:///e?other=1&socket=s").address, Address::Unix("s".into()));
    }

    #[test]
    fn display_round_trips() {
        for s in ["nbd://h:1/a%20b", "nbd://[::1]:10809/", "nbd+unix:///x?socket=/tmp/s%20s"] {
            let u = ok(s);
            assert_eq!(ok(&u.to_string()), u, "{s}");
        }
    }

    #[test]
    fn bad_uris_say_what_is_wrong() {
        assert!(err("nbds://host/").contains("TLS"));
        assert!(err("nbds+unix:///?socket=x").contains("TLS"));
        assert!(err("nbd://host/?tls-type=psk").contains("TLS"));
        assert!(err("http://host/").contains("unknown scheme"));
        assert!(err("/dev/sda").contains("no scheme"));
        assert!(err("nbd://host:0/").contains("bad port"));
        assert!(err("nbd://host:99999/").contains("bad port"));
        assert!(err("nbd://host:x/").contains("bad port"));
        assert!(err("nbd:///").contains("no host"));
        assert!(err("nbd+unix:///").contains("socket"));
        assert!(err("nbd+unix://host/?socket=s").contains("no host"));
        assert!(err("nbd://h/?socket=s").contains("only for nbd+unix"));
        assert!(err("nbd://h/%zz").contains("percent"));
        assert!(err("nbd://h/%00").contains("NUL"));
        assert!(err("nbd://[::1/").contains("IPv6"));
        assert!(err("nbd://h/#frag").contains("fragment"));
        assert!(is_nbd_uri("NBD+UNIX:///") && !is_nbd_uri("disk.img"));
    }
}
