use std::path::Path;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches};

use super::*;
use crate::{Cli, Cmd, ServeArgs};

const GOOD: &str = r#"
# A server for two disks.
listen = ["127.0.0.1:10809", "[::1]:10810"]
unix = "/run/ringbd/disks.sock"
unix_mode = "660"
user = "ringbd"
read_only = true
metrics = "127.0.0.1:9100"
quiet = true

[[export]]
spec = "memory:1G"
description = "scratch"
read_only = false

[[export]]
name = "golden"
spec = "file:/srv/golden.img,direct"

[[export]]
name = "flaky"
spec = "fault:read=0.1@EIO:null:1T"

[limits]
max_connections = 8
handshake_timeout = "5s"
reply_timeout = 0
reply_memory = "64M"

[tls]
mode = "require"
certificates = "/etc/ringbd/pki"
verify_peer = true
authz = ["CN=backup"]

[engine]
kind = "threads"
threads = 2
coalesce = false
zerocopy_threshold = 131072
stats_interval = "500ms"

[ceph]
id = "ringbd"
timeout = "1m"
"#;

fn parse(text: &str) -> Result<FileConfig, ConfigError> {
    super::parse(Path::new("/etc/ringbd/t.toml"), text)
}

fn err(text: &str) -> String {
    parse(text).expect_err("must be refused").to_string()
}

/// `ringbd serve ARGS...` as main parses it, with the given-on-the-command-line test.
fn serve_args(args: &[&str]) -> (ServeArgs, clap::ArgMatches) {
    let m = Cli::command().try_get_matches_from(["ringbd", "serve"].iter().chain(args)).unwrap();
    let Cmd::Serve(a) = Cli::from_arg_matches(&m).unwrap().command else { unreachable!() };
    let sub = m.subcommand_matches("serve").unwrap().clone();
    (*a, sub)
}

fn given(m: &clap::ArgMatches) -> impl Fn(&str) -> bool + '_ {
    |id: &str| {
        // Every id `apply` asks about is a real argument (clap would
        // answer None for a misspelt one, and the file would always win).
        assert!(
            Cli::command().find_subcommand("serve").unwrap().get_arguments().any(|a| a.get_id() == id),
            "{id}"
        );
        m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
    }
}

#[test]
fn a_good_file_sets_everything() {
    let f = parse(GOOD).unwrap();
    let (mut a, m) = serve_args(&[]);
    apply(&f, &mut a, &given(&m));
    assert_eq!(a.listen, ["127.0.0.1:10809", "[::1]:10810"]);
    assert_eq!(a.unix.as_deref(), Some(Path::new("/run/ringbd/disks.sock")));
    assert_eq!(a.unix_mode, 0o660);
    assert_eq!(a.user.as_deref(), Some("ringbd"));
    assert_eq!(a.metrics.as_deref(), Some("127.0.0.1:9100"));
    assert_eq!(f.quiet, Some(true));
    assert_eq!(a.max_connections, Some(8));
    assert_eq!(a.handshake_timeout, Duration::from_secs(5));
    assert_eq!(a.reply_timeout, Duration::ZERO);
    assert_eq!(a.reply_memory, 64 << 20);
    assert!(matches!(a.tls, Some(crate::TlsArg::Require)));
    assert!(a.tls_verify_peer && a.tls_authz == ["CN=backup"]);
    assert!(matches!(a.engine, crate::EngineArg::Threads));
    assert_eq!(a.threads, Some(2));
    assert!(a.no_coalesce && !a.no_bundle);
    assert_eq!(a.zerocopy_threshold, 128 << 10);
    assert_eq!(a.stats_interval, Some(Duration::from_millis(500)));
    assert_eq!(a.ceph.ceph_id.as_deref(), Some("ringbd"));
    assert_eq!(a.ceph.ceph_timeout, Duration::from_secs(60));

    let x = exports(&f, &FlagExports::default());
    let names: Vec<&str> = x.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["", "golden", "flaky"]);
    assert_eq!(x[0].spec, Spec::Memory(1 << 30));
    assert_eq!(x[0].description.as_deref(), Some("scratch"));
    // The top-level read_only is each export's default.
    assert_eq!(x.iter().map(|e| e.read_only).collect::<Vec<_>>(), [false, true, true]);
    assert!(matches!(&x[1].spec, Spec::File { direct: true, .. }));
}

#[test]
fn flags_win_and_add_exports() {
    let f = parse(GOOD).unwrap();
    let (mut a, m) = serve_args(&[
        "--listen",
        "0.0.0.0:1",
        "--max-connections",
        "3",
        "--engine",
        "uring",
        "--tls-psk",
        "/k.psk",
        "--handshake-timeout",
        "10s",
        "--metrics",
        "[::1]:9101",
    ]);
    apply(&f, &mut a, &given(&m));
    assert_eq!(a.listen, ["0.0.0.0:1"]);
    assert_eq!(a.max_connections, Some(8).map(|_| 3));
    assert!(matches!(a.engine, crate::EngineArg::Uring));
    // Given on the command line, even though it is the default value.
    assert_eq!(a.handshake_timeout, Duration::from_secs(10));
    // Keys from the command line replace the file's certificates.
    assert_eq!(a.tls_psk.as_deref(), Some(Path::new("/k.psk")));
    assert!(a.tls_certificates.is_none());
    assert_eq!(a.metrics.as_deref(), Some("[::1]:9101"));
    // Not given: the file's.
    assert_eq!(a.threads, Some(2));

    let flags = FlagExports {
        default: Some(Spec::Null(1 << 20)),
        named: vec![("new".into(), Spec::Memory(4096)), ("golden".into(), Spec::Null(1))],
    };
    let x = exports(&f, &flags);
    let got: Vec<(&str, &Spec, bool)> = x.iter().map(|e| (e.name.as_str(), &e.spec, e.read_only)).collect();
    assert_eq!(got[0], ("", &Spec::Null(1 << 20), false));
    assert_eq!(got[1], ("golden", &Spec::Null(1), false));
    assert_eq!(got[3], ("new", &Spec::Memory(4096), false));
    assert_eq!(x.len(), 4);
}

#[test]
fn an_empty_file_changes_no_default() {
    let f = parse("").unwrap();
    let (mut a, m) = serve_args(&[]);
    apply(&f, &mut a, &given(&m));
    assert_eq!(a.handshake_timeout, Duration::from_secs(10));
    assert_eq!(a.unix_mode, 0o600);
    assert!(a.listen.is_empty() && a.tls_certificates.is_none());
    assert!(exports(&f, &FlagExports::default()).is_empty());
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let e = err("listen = []\n\n[limits]\nmax_conections = 3\n");
    assert!(
        e.starts_with("/etc/ringbd/t.toml:4:1: key limits.max_conections: unknown field `max_conections`"),
        "{e}"
    );
    let e = err("lissen = [\"x:1\"]\n");
    assert!(e.starts_with("/etc/ringbd/t.toml:1:1: key lissen: unknown field"), "{e}");
    let e = err("[[export]]\nspec = \"null:1\"\n\n[[export]]\nspec = \"null:1\"\nreadonly = true\n");
    assert!(e.starts_with("/etc/ringbd/t.toml:6:1: key export[1].readonly: unknown field"), "{e}");
    let e = err("[tlss]\n");
    assert!(e.contains(":1:") && e.contains("key tlss"), "{e}");
}

#[test]
fn wrong_types_name_the_key() {
    let e = err("[limits]\nmax_connections = \"eight\"\n");
    assert!(
        e.starts_with("/etc/ringbd/t.toml:2:19: key limits.max_connections: invalid type: string"),
        "{e}"
    );
    let e = err("read_only = 1\n");
    assert!(e.starts_with("/etc/ringbd/t.toml:1:13: key read_only: invalid type: integer"), "{e}");
    let e = err("[engine]\nkind = \"fast\"\n");
    assert!(e.contains(":2:8: key engine.kind: unknown variant `fast`"), "{e}");
    let e = err("[limits]\nhandshake_timeout = \"ten\"\n");
    assert!(e.contains(":2:21: key limits.handshake_timeout:"), "{e}");
    let e = err("unix_mode = 660\n");
    assert!(e.contains(":1:13: key unix_mode:") && e.contains("\"660\""), "{e}");
    let e = err("unix_mode = \"999\"\n");
    assert!(e.contains("key unix_mode:") && e.contains("octal"), "{e}");
}

#[test]
fn bad_specs_and_duplicates_are_refused() {
    let e = err("[[export]]\nname = \"a\"\nspec = \"floppy:1G\"\n");
    assert!(e.starts_with("/etc/ringbd/t.toml:3:8: key export[0].spec: export spec \"floppy:1G\""), "{e}");
    let e = err("[[export]]\nname = \"a\"\n");
    assert!(e.contains("missing field `spec`"), "{e}");
    let e = err("[[export]]\nname = \"a\"\nspec = \"null:1\"\n[[export]]\nname = \"a\"\nspec = \"null:1\"\n");
    assert!(
        e.starts_with("/etc/ringbd/t.toml:5:8: key export[1].name: export \"a\" is defined twice"),
        "{e}"
    );
    let e = err("[tls]\npsk = \"k\"\ncertificates = \"d\"\n");
    assert!(e.contains("key tls.psk"), "{e}");
}

#[test]
fn syntax_errors_have_a_line() {
    let e = err("listen = [\n\"a:1\",\nport = 3\n");
    assert!(e.starts_with("/etc/ringbd/t.toml:3:"), "{e}");
    let e = load(Path::new("/nonexistent/ringbd.toml")).unwrap_err().to_string();
    assert!(e.starts_with("/nonexistent/ringbd.toml: cannot read it:"), "{e}");
}

#[test]
fn line_col_counts_characters() {
    assert_eq!(line_col("ab\ncé = 1", 6), (2, 3));
    assert_eq!(line_col("", 0), (1, 1));
    assert_eq!(line_col("a\n", 99), (2, 1));
}
