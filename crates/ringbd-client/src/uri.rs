//! NBD URIs as doc/uri.md defines them: `nbd://host[:port]/export`,
//! `nbd+unix:///export?socket=PATH`, and their TLS forms `nbds://` and
//! `nbds+unix://` with libnbd's query parameters: `tls-certificates=DIR`,
//! `tls-verify-peer=false`, `tls-hostname=NAME`, `tls-username=NAME`
//! (PSK only, ignored with X.509) and `tls-psk-file=FILE` (TLS-PSK
//! instead of X.509, see `tls.rs`). As in libnbd, `tls-*`
//! parameters on `nbd://` URIs are ignored: only the scheme turns TLS on.

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
    /// `nbds://` or `nbds+unix://`: TLS is required (libnbd's
    /// `LIBNBD_TLS_REQUIRE`), with these settings.
    pub tls: Option<TlsParams>,
    /// `reconnect-delay=SECONDS` (ringbd's parameter; qemu's NBD client
    /// option of that name does the same): how long a proxy's requests wait
    /// for a lost upstream to come back before they fail. `None`: the
    /// proxy's default.
    pub reconnect_delay: Option<u64>,
}

/// Longest `reconnect-delay` accepted (an hour).
pub const MAX_RECONNECT_DELAY: u64 = 3600;

/// The TLS settings of an `nbds://` URI (libnbd's query parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    /// `tls-certificates=DIR`: `ca-cert.pem`, and `client-cert.pem` with
    /// `client-key.pem` if present. Without it, libnbd's default
    /// directories, then the system's CA bundle.
    pub certificates: Option<PathBuf>,
    /// `tls-verify-peer` (default true): check the server's certificate.
    pub verify_peer: bool,
    /// `tls-hostname=NAME`: the name to send (SNI) and check, instead of
    /// the URI's host (Unix sockets have none).
    pub hostname: Option<String>,
    /// `tls-username=NAME` or the URI's userinfo: the PSK identity.
    pub username: Option<String>,
    /// `tls-psk-file=FILE`: PSK instead of X.509.
    pub psk_file: Option<PathBuf>,
}

impl Default for TlsParams {
    fn default() -> Self {
        TlsParams { certificates: None, verify_peer: true, hostname: None, username: None, psk_file: None }
    }
}

/// libnbd's booleans in URI parameters.
fn parse_bool(k: &str, v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err(format!("{k}={v:?} is not a boolean (true/false, on/off, yes/no, 1/0)")),
    }
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
        let s = if self.tls.is_some() { "s" } else { "" };
        let mut query = Vec::new();
        match &self.address {
            Address::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd{s}://[{host}]:{port}/{export}")?
            }
            // A host name is percent-decoded when parsed: encode it back.
            Address::Tcp { host, port } => write!(f, "nbd{s}://{}:{port}/{export}", encode_host(host))?,
            Address::Unix(p) => {
                write!(f, "nbd{s}+unix:///{export}")?;
                query.push(format!("socket={}", encode(&p.to_string_lossy(), true)));
            }
        }
        if let Some(t) = &self.tls {
            if let Some(d) = &t.certificates {
                query.push(format!("tls-certificates={}", encode(&d.to_string_lossy(), true)));
            }
            if !t.verify_peer {
                query.push("tls-verify-peer=false".into());
            }
            if let Some(h) = &t.hostname {
                query.push(format!("tls-hostname={}", encode(h, true)));
            }
            if let Some(u) = &t.username {
                query.push(format!("tls-username={}", encode(u, true)));
            }
            if let Some(p) = &t.psk_file {
                query.push(format!("tls-psk-file={}", encode(&p.to_string_lossy(), true)));
            }
        }
        if let Some(d) = self.reconnect_delay {
            query.push(format!("reconnect-delay={d}"));
        }
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
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

/// A host name (not an IPv6 literal) for a URI's authority: unreserved
/// characters and sub-delimiters stay, everything else (`%` included) is
/// percent-encoded.
fn encode_host(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b) {
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
    let tls = match scheme.as_str() {
        "nbd" | "nbd+unix" => false,
        "nbds" | "nbds+unix" => true,
        "nbd+vsock" | "nbds+vsock" => return Err(format!("{scheme}:// (AF_VSOCK) is not supported")),
        other => {
            return Err(format!(
                "unknown scheme {other:?} (expected nbd://, nbds://, nbd+unix:// or nbds+unix://)"
            ))
        }
    };
    let unix = scheme.ends_with("+unix");
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
    let mut reconnect_delay = None;
    let mut t = TlsParams::default();
    for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        let value = |what: &str| decode(v, &format!("{what} parameter"));
        let path = |what: &str| -> Result<PathBuf, String> {
            match value(what)? {
                p if p.is_empty() => Err(format!("the {what} parameter is empty")),
                p => Ok(PathBuf::from(p)),
            }
        };
        match k {
            "socket" => socket = Some(value("socket")?),
            "tls-certificates" => t.certificates = Some(path("tls-certificates")?),
            "tls-verify-peer" => t.verify_peer = parse_bool(k, &value(k)?)?,
            "tls-hostname" => t.hostname = Some(value(k)?).filter(|h| !h.is_empty()),
            "tls-username" => t.username = Some(value(k)?),
            "tls-psk-file" => t.psk_file = Some(path("tls-psk-file")?),
            "reconnect-delay" => {
                let v = value(k)?;
                let d = v.parse::<u64>().ok().filter(|d| *d <= MAX_RECONNECT_DELAY).ok_or(format!(
                    "reconnect-delay={v:?}: expected whole seconds from 0 to {MAX_RECONNECT_DELAY}"
                ))?;
                reconnect_delay = Some(d);
            }
            // Unknown parameters are ignored, as doc/uri.md allows.
            _ => {}
        }
    }
    // Userinfo is the TLS username (PSK identity), as in libnbd.
    let authority = match authority.rsplit_once('@') {
        Some((user, a)) => {
            if tls && t.username.is_none() && !user.is_empty() {
                t.username = Some(decode(user, "user name")?);
            }
            a
        }
        None => authority,
    };
    let tls = tls.then_some(t);
    if unix {
        if !authority.is_empty() {
            return Err(format!(
                "{scheme}:// takes no host (got {authority:?}); write {scheme}:///export?socket=PATH"
            ));
        }
        let path = socket.ok_or(format!("{scheme}:// needs ?socket=PATH"))?;
        if path.is_empty() {
            return Err("the socket parameter is empty".into());
        }
        return Ok(NbdUri { address: Address::Unix(PathBuf::from(path)), export, tls, reconnect_delay });
    }
    if socket.is_some() {
        return Err("?socket= is only for nbd+unix:// and nbds+unix://".into());
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
    Ok(NbdUri { address: Address::Tcp { host, port }, export, tls, reconnect_delay })
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
    fn tls_schemes_and_parameters() {
        let u = ok("nbds://127.0.0.1/disk");
        assert_eq!((u.address, u.export.as_str()), (tcp("127.0.0.1", 10809), "disk"));
        assert_eq!(u.tls, Some(TlsParams::default()));
        assert!(u.tls.is_some_and(|t| t.verify_peer), "verification is on by default");
        let u = ok("NBDS+UNIX://alice@/e?socket=/run/s&tls-certificates=/etc/pki/a%20b&tls-verify-peer=false&tls-hostname=nbd.example.com");
        assert_eq!(u.address, Address::Unix("/run/s".into()));
        assert_eq!(
            u.tls,
            Some(TlsParams {
                certificates: Some("/etc/pki/a b".into()),
                verify_peer: false,
                hostname: Some("nbd.example.com".into()),
                username: Some("alice".into()),
                psk_file: None,
            })
        );
        let t = ok("nbds://u@h/?tls-username=bob&tls-psk-file=keys.psk&tls-verify-peer=ON").tls.unwrap();
        assert_eq!((t.username.as_deref(), t.verify_peer), (Some("bob"), true));
        assert_eq!(t.psk_file, Some("keys.psk".into()), "kept for the PSK session");
        for v in ["1", "true", "yes", "on"] {
            assert!(ok(&format!("nbds://h/?tls-verify-peer={v}")).tls.unwrap().verify_peer);
        }
        for v in ["0", "False", "no", "off"] {
            assert!(!ok(&format!("nbds://h/?tls-verify-peer={v}")).tls.unwrap().verify_peer);
        }
        // As in libnbd, only the scheme turns TLS on.
        assert_eq!(ok("nbd://h/?tls-certificates=/x").tls, None);
        assert!(err("nbds://h/?tls-verify-peer=maybe").contains("not a boolean"));
        assert!(err("nbds://h/?tls-certificates=").contains("empty"));
        assert!(err("nbds+unix:///").contains("nbds+unix:// needs ?socket="));
        assert!(err("nbds+unix://h/?socket=s").contains("no host"));
        assert!(err("nbds://h/?socket=s").contains("only for nbd+unix"));
        assert!(err("nbds+vsock://2/").contains("AF_VSOCK"));
        assert!(err("nbds://%zz@h/").contains("percent"), "the user name is decoded with TLS");
        assert_eq!(ok("nbd://%zz@h/").tls, None, "and ignored without");
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "nbd://h:1/a%20b",
            "nbd://[::1]:10809/",
            "nbd+unix:///x?socket=/tmp/s%20s",
            "nbds://[::1]:10809/",
            "nbds://h:2/d?tls-certificates=/a%20b&tls-verify-peer=false&tls-hostname=n&tls-username=u&tls-psk-file=/k",
            "nbds+unix:///x?socket=/s&tls-hostname=localhost",
            // Found by the uri fuzz target: a host that decodes to "%".
            "nbds://%25",
            "nbd://a%7Eb%2Cc:7/",
        ] {
            let u = ok(s);
            assert_eq!(ok(&u.to_string()), u, "{s}");
        }
    }

    #[test]
    fn bad_uris_say_what_is_wrong() {
        let u = ok("nbd+unix:///e?socket=/s&reconnect-delay=5");
        assert_eq!(u.reconnect_delay, Some(5));
        assert_eq!(u.to_string(), "nbd+unix:///e?socket=/s&reconnect-delay=5");
        assert_eq!(ok("nbd://h/").reconnect_delay, None);
        assert!(err("nbd://h/?reconnect-delay=soon").contains("whole seconds"));
        assert!(err("nbd://h/?reconnect-delay=3601").contains("0 to 3600"));
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
