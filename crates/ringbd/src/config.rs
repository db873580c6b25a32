//! `ringbd serve --config FILE`: the TOML configuration file (docs/daemon.md).
//!
//! The file says what the flags say; a flag given on the command line wins
//! over the file, and exports given on the command line are added to the
//! file's (replacing one of the same name). Errors name the file, the line
//! and column, and the key. The schema is [`FileConfig`]; unknown keys are
//! errors.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ringbd_backend::Spec;
use ringbd_server::ExportConfig;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The whole file. Top-level keys are the listeners, privileges and the
/// default read-only setting; the rest is in sections.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `--listen`: TCP addresses.
    pub listen: Option<Vec<String>>,
    /// `--unix`.
    pub unix: Option<PathBuf>,
    /// `--unix-mode`, as an octal string ("660").
    pub unix_mode: Option<Mode>,
    /// `--user`, `--group`.
    pub user: Option<String>,
    pub group: Option<String>,
    /// The default of each export's `read_only` (reloaded with them).
    pub read_only: Option<bool>,
    /// `--verbose`.
    pub verbose: Option<bool>,
    /// `-q`: warnings and errors only (`verbose` wins).
    pub quiet: Option<bool>,
    /// `--metrics`: serve Prometheus metrics at this ADDR:PORT.
    pub metrics: Option<String>,
    /// `--run`.
    pub run: Option<String>,
    /// `[[export]]`: the exports, in order.
    #[serde(default, rename = "export")]
    pub exports: Vec<ExportEntry>,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub engine: EngineSection,
    #[serde(default)]
    pub ceph: CephSection,
}

/// One `[[export]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportEntry {
    /// The export name; absent or "": the default export.
    pub name: Option<toml::Spanned<String>>,
    /// What `ringbd serve SPEC` takes: memory:1G, file:PATH, nbd://...
    pub spec: toml::Spanned<SpecValue>,
    pub read_only: Option<bool>,
    pub description: Option<String>,
}

/// `[limits]`: docs/access.md and docs/engine.md.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub max_connections: Option<u64>,
    pub handshake_timeout: Option<Dur>,
    pub reply_timeout: Option<Dur>,
    pub reply_memory: Option<Size>,
}

/// `[tls]`: docs/tls.md.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// "off", "on" or "require".
    pub mode: Option<crate::TlsArg>,
    pub certificates: Option<PathBuf>,
    pub verify_peer: Option<bool>,
    pub authz: Option<Vec<String>>,
    pub authz_file: Option<PathBuf>,
    pub psk: Option<PathBuf>,
    /// false: `--no-ktls`.
    pub ktls: Option<bool>,
}

/// `[engine]`: docs/engine.md. The booleans are the A/B switches' positive
/// names (`coalesce = false` is `--no-coalesce`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    /// "auto", "uring" or "threads".
    pub kind: Option<crate::EngineArg>,
    pub threads: Option<usize>,
    pub coalesce: Option<bool>,
    pub bundle: Option<bool>,
    pub zerocopy: Option<bool>,
    pub zerocopy_threshold: Option<Size>,
    pub incremental: Option<bool>,
    pub fixed_files: Option<bool>,
    pub receive_share: Option<Size>,
    pub registered_buffers: Option<Size>,
    pub stats_interval: Option<Dur>,
}

/// `[ceph]`: docs/rbd.md.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CephSection {
    pub conf: Option<PathBuf>,
    pub id: Option<String>,
    pub timeout: Option<Dur>,
}

/// An export spec, parsed as the command line parses it.
#[derive(Debug, Clone)]
pub struct SpecValue(pub Spec);

/// A size: bytes, or a string with a unit ("256M").
#[derive(Debug, Clone, Copy)]
pub struct Size(pub u64);

/// A duration: seconds, or a string with a unit ("10s", "500ms"); 0: none.
#[derive(Debug, Clone, Copy)]
pub struct Dur(pub Duration);

/// Permission bits, written as an octal string ("660").
#[derive(Debug, Clone, Copy)]
pub struct Mode(pub u32);

impl ExportEntry {
    pub fn name(&self) -> &str {
        self.name.as_ref().map_or("", |n| n.get_ref())
    }
}

impl<'de> Deserialize<'de> for SpecValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // The error names the spec ("export spec \"x\": ...").
        s.parse::<Spec>().map(SpecValue).map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an octal mode as a string, like \"660\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Mode, E> {
                crate::parse_mode(s).map(Mode).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Both forms: a number (in `unit`s) or a string for `parse`.
macro_rules! number_or_string {
    ($ty:ident, $what:literal, $from_int:expr, $parse:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_i64<E: de::Error>(self, n: i64) -> Result<$ty, E> {
                        let n = u64::try_from(n).map_err(|_| E::custom(concat!("expected ", $what)))?;
                        Ok($ty($from_int(n)))
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$ty, E> {
                        $parse(s).map($ty).map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

number_or_string!(Size, "a size: bytes, or a string like \"256M\"", |n| n, ringbd_backend::parse_size);
number_or_string!(
    Dur,
    "a duration: seconds, or a string like \"10s\" or \"500ms\"",
    Duration::from_secs,
    crate::parse_timeout
);

/// A configuration file that could not be used: where and why.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column.
    pub at: Option<(usize, usize)>,
    /// The dotted key (`limits.max_connections`, `export[1].spec`).
    pub key: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.at {
            write!(f, ":{line}:{col}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        at: None,
        key: None,
        message: format!("cannot read it: {e}"),
    })?;
    parse(path, &text)
}

/// Parses `text` (the contents of `path`, which errors name).
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    let error = |span: Option<std::ops::Range<usize>>, key: Option<String>, message: String| ConfigError {
        file: path.to_owned(),
        at: span.map(|s| line_col(text, s.start)),
        key,
        message,
    };
    let de = toml::Deserializer::parse(text).map_err(|e| error(e.span(), None, e.message().to_owned()))?;
    let config: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        // toml::Spanned reads its value under a private key: not the user's.
        let path = e.path().to_string().replace(".$__serde_spanned_private_value", "");
        let inner = e.into_inner();
        let message = inner.message().trim_end().to_owned();
        let key = match unknown_field(&message) {
            // At the top level the path is "."; below, it ends with the key.
            Some(k) if path == "." => k.to_owned(),
            None if path == "." => return error(inner.span(), None, message),
            _ => path,
        };
        error(inner.span(), Some(key), message)
    })?;
    let mut seen: Vec<&str> = Vec::new();
    for (i, e) in config.exports.iter().enumerate() {
        let name = e.name();
        if seen.contains(&name) {
            return Err(error(
                Some(e.name.as_ref().map_or(e.spec.span(), |n| n.span())),
                Some(format!("export[{i}].name")),
                format!("export {name:?} is defined twice"),
            ));
        }
        seen.push(name);
    }
    if config.tls.psk.is_some() && (config.tls.certificates.is_some() || config.tls.verify_peer == Some(true))
    {
        return Err(error(
            None,
            Some("tls.psk".into()),
            "pre-shared keys exclude tls.certificates and tls.verify_peer: choose one".into(),
        ));
    }
    Ok(config)
}

/// The key serde names in "unknown field `x`, expected ...".
fn unknown_field(message: &str) -> Option<&str> {
    message.strip_prefix("unknown field `")?.split('`').next()
}

/// 1-based line and column (in characters) of byte `at` of `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The exports given on the command line, which a reload adds again.
#[derive(Debug, Clone, Default)]
pub struct FlagExports {
    /// `ringbd serve SPEC`: the default export.
    pub default: Option<Spec>,
    /// `--export NAME=SPEC`.
    pub named: Vec<(String, Spec)>,
}

/// The file's exports with the command line's added (a flag's export
/// replaces the file's of the same name).
pub fn exports(file: &FileConfig, flags: &FlagExports) -> Vec<ExportConfig> {
    let mut out: Vec<ExportConfig> = file
        .exports
        .iter()
        .map(|e| ExportConfig {
            name: e.name().to_owned(),
            spec: e.spec.get_ref().0.clone(),
            read_only: e.read_only.or(file.read_only).unwrap_or(false),
            description: e.description.clone(),
        })
        .collect();
    let flagged = flags
        .default
        .iter()
        .map(|s| (String::new(), s))
        .chain(flags.named.iter().map(|(n, s)| (n.clone(), s)));
    for (name, spec) in flagged {
        let def = ExportConfig::new(name, spec.clone());
        match out.iter_mut().find(|e| e.name == def.name) {
            Some(e) => *e = def,
            None => out.push(def),
        }
    }
    out
}

/// The file's settings, for each flag not given on the command line
/// (`given(id)`: clap's argument id, the field's name).
pub fn apply(file: &FileConfig, a: &mut crate::ServeArgs, given: &dyn Fn(&str) -> bool) {
    macro_rules! set {
        ($id:literal, $field:expr, $value:expr) => {
            if !given($id) {
                if let Some(v) = $value {
                    $field = v;
                }
            }
        };
    }
    set!("listen", a.listen, file.listen.clone());
    set!("unix", a.unix, file.unix.clone().map(Some));
    set!("unix_mode", a.unix_mode, file.unix_mode.map(|m| m.0));
    set!("user", a.user, file.user.clone().map(Some));
    set!("group", a.group, file.group.clone().map(Some));
    set!("verbose", a.verbose, file.verbose);
    set!("run", a.run, file.run.clone().map(Some));
    set!("metrics", a.metrics, file.metrics.clone().map(Some));

    let l = &file.limits;
    set!("max_connections", a.max_connections, l.max_connections.map(Some));
    set!("handshake_timeout", a.handshake_timeout, l.handshake_timeout.map(|d| d.0));
    set!("reply_timeout", a.reply_timeout, l.reply_timeout.map(|d| d.0));
    set!("reply_memory", a.reply_memory, l.reply_memory.map(|s| s.0));

    let t = &file.tls;
    set!("tls", a.tls, t.mode.map(Some));
    // The credentials are one choice: certificates or keys from the command
    // line replace both of the file's.
    if !given("tls_certificates") && !given("tls_psk") {
        a.tls_certificates = t.certificates.clone();
        a.tls_psk = t.psk.clone();
    }
    set!("tls_verify_peer", a.tls_verify_peer, t.verify_peer);
    set!("tls_authz", a.tls_authz, t.authz.clone());
    set!("tls_authz_file", a.tls_authz_file, t.authz_file.clone().map(Some));
    set!("no_ktls", a.no_ktls, t.ktls.map(|k| !k));

    let e = &file.engine;
    set!("engine", a.engine, e.kind);
    set!("threads", a.threads, e.threads.map(Some));
    set!("no_coalesce", a.no_coalesce, e.coalesce.map(|v| !v));
    set!("no_bundle", a.no_bundle, e.bundle.map(|v| !v));
    set!("no_zerocopy", a.no_zerocopy, e.zerocopy.map(|v| !v));
    set!("zerocopy_threshold", a.zerocopy_threshold, e.zerocopy_threshold.map(|s| s.0));
    set!("no_incremental", a.no_incremental, e.incremental.map(|v| !v));
    set!("no_fixed_files", a.no_fixed_files, e.fixed_files.map(|v| !v));
    set!("receive_share", a.receive_share, e.receive_share.map(|s| s.0));
    set!("registered_buffers", a.registered_buffers, e.registered_buffers.map(|s| s.0));
    set!("stats_interval", a.stats_interval, e.stats_interval.map(|d| Some(d.0).filter(|d| !d.is_zero())));

    let c = &file.ceph;
    set!("ceph_conf", a.ceph.ceph_conf, c.conf.clone().map(Some));
    set!("ceph_id", a.ceph.ceph_id, c.id.clone().map(Some));
    set!("ceph_timeout", a.ceph.ceph_timeout, c.timeout.map(|d| d.0));
}

/// `ringbd serve --check-config FILE`: what can be checked without
/// serving (nothing is bound, opened for writing or contacted). Returns a
/// one-line summary.
pub fn check(path: &Path, c: &ringbd_server::Config) -> Result<String, String> {
    let mut checked = vec!["keys and types", "export specs"];
    let mut files = 0;
    for e in &c.exports {
        files += check_paths(&e.name, &e.spec)?;
    }
    if files > 0 {
        checked.push("that file: exports exist");
    }
    for a in &c.listen {
        let port = a.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
        if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
            return Err(format!("listen address {a:?} is not ADDR:PORT"));
        }
    }
    checked.push("listen addresses' syntax");
    if let Some(m) = &c.metrics {
        let port = m.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
        if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
            return Err(format!("metrics address {m:?} is not ADDR:PORT"));
        }
        checked.push("the metrics address's syntax");
    }
    if let Some(dir) = c.unix.as_deref().and_then(Path::parent).filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(format!("unix socket directory {} does not exist", dir.display()));
        }
        checked.push("the unix socket's directory");
    }
    let tls = ringbd_server::tls::TlsServer::load(&c.tls).map_err(|e| format!("TLS: {e}"))?;
    if tls.is_some() {
        checked.push("TLS credentials");
    }
    if let Some(u) = &c.access.user {
        ringbd_server::user::lookup_user(u).map_err(|e| format!("user {u}: {e}"))?;
    }
    if let Some(g) = &c.access.group {
        ringbd_server::user::lookup_group(g).map_err(|e| format!("group {g}: {e}"))?;
    }
    if c.access.user.is_some() || c.access.group.is_some() {
        checked.push("user and group");
    }
    let names: Vec<String> = c.exports.iter().map(|e| format!("{:?}", e.name)).collect();
    let mut listeners: Vec<String> = c.listen.clone();
    listeners.extend(c.unix.iter().map(|p| format!("unix {}", p.display())));
    if listeners.is_empty() {
        listeners.push(format!("{} (or activated sockets)", ringbd_server::DEFAULT_LISTEN));
    }
    Ok(format!(
        "{}: ok: {} export(s) {}; listening on {}; TLS {}; checked {}",
        path.display(),
        c.exports.len(),
        names.join(", "),
        listeners.join(", "),
        match &tls {
            Some(t) => format!("{} with the {}", format!("{:?}", t.mode).to_lowercase(), t.kind()),
            None => "off".into(),
        },
        checked.join(", ")
    ))
}

/// The number of `file:` paths in `spec`, once each has been found.
fn check_paths(name: &str, spec: &Spec) -> Result<usize, String> {
    match spec {
        Spec::File { path, .. } => std::fs::metadata(path)
            .map(|_| 1)
            .map_err(|e| format!("export {name:?}: {}: {e}", path.display())),
        Spec::Fault { inner, .. } => check_paths(name, inner),
        _ => Ok(0),
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
