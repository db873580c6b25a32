//! `ringbd`: command-line entry point. Parsing only; the work is in the
//! library crates.

#![forbid(unsafe_code)]

mod bench_plot;
mod cmd_bench;
mod cmd_copy;
mod cmd_generate;
mod cmd_info;
mod config;
mod logging;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod cmd_ublk;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use nbd_proto::TlsMode;
use ringbd_backend::Spec;
use ringbd_server::engine_uring::UringOptions;
use ringbd_server::server::EngineKind;

#[derive(Parser)]
#[command(name = "ringbd", version, about = "Userspace network block storage on io_uring")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Log warnings and errors only (RUST_LOG, in tracing's filter syntax, replaces -q and -v).
    #[arg(short, long, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve exports over NBD (fixed newstyle, structured replies, extended headers).
    Serve(Box<ServeArgs>),
    /// Serve a target as a local block device /dev/ublkbN (ublk; Linux 6.0+, root).
    Attach(cmd_ublk::AttachArgs),
    /// Stop and remove a ublk device (ID or /dev/ublkbN).
    Detach(cmd_ublk::DetachArgs),
    /// List ublk devices and the driver's features.
    List(cmd_ublk::ListArgs),
    /// Show an export's size, flags, block sizes and meta contexts (like nbdinfo); --list, --map, --json.
    Info(cmd_info::InfoArgs),
    /// Copy between NBD URIs, files, block devices and stdin/stdout; sparse-aware, multi-connection.
    Copy(cmd_copy::CopyArgs),
    /// Measure an export: IOPS, MiB/s, latency percentiles, client CPU per I/O; --verify checks data.
    Bench(cmd_bench::BenchArgs),
    /// Write man pages, or print shell completions, made from these definitions (for packages).
    Generate(cmd_generate::GenerateArgs),
}

#[derive(Args)]
#[command(after_help = "\
SPEC is one of:
  memory:SIZE   sparse RAM disk, e.g. memory:1G (the default: memory:1G)
  file:PATH     a regular file or block device
  file:PATH,direct
                the same with O_DIRECT for aligned reads and writes (no page cache)
  null:SIZE     discards writes, reads zeroes
  qcow2:PATH[,direct]
                a qcow2 image (read-write, or --read-only) and its backing chain;
                direct: O_DIRECT for aligned data clusters (docs/qcow2.md)
  nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH (and nbds://, nbds+unix://)
                another server's export: ringbd serves it as a proxy (docs/proxy.md)
  rbd:POOL/IMAGE[@SNAPSHOT]
                a Ceph RBD image through librbd (a snapshot is read-only); see --ceph-conf,
                --ceph-id, --ceph-timeout and docs/rbd.md
  fault:RULE[,RULE...]:SPEC
                SPEC with injected failures and delays (for testing clients), where RULE is
                  OP=RATE[@ERRNO]    fail that fraction of OP calls (RATE 0.1 or 10%) with
                                     ERRNO: EIO (default), ENOSPC, EDQUOT, EFBIG, ENOMEM, EPERM,
                                     EACCES, EROFS, EINVAL or EOVERFLOW
                  delay-OP=DURATION  sleep before each OP call (500us, 5ms, 1s)
                  seed=N             repeat a run's sequence of failures
                and OP is read, write, flush, trim, zero or all; a write whose payload arrives
                in pieces is one call per piece. See docs/reliability.md.

Each listener's URI is printed on stdout once it is ready.
With LISTEN_PID/LISTEN_FDS set (socket activation), the passed sockets are used instead.

--config FILE reads the settings from a TOML file (docs/daemon.md); flags given on the
command line win, and their exports are added to the file's. SIGHUP reads the file's
exports again: added ones are served to new connections, removed ones to no new
connection, unchanged ones keep their backend and connections.

Examples:
  ringbd serve memory:1G
  ringbd serve --unix /tmp/nbd.sock file:/var/lib/disk.img
  ringbd serve --export a=memory:1G --export b=null:1T --listen [::1]:10809
  ringbd serve memory:256M --run 'qemu-img info \"$uri\"'
  ringbd serve --config /etc/ringbd/disks.toml
  ringbd serve --check-config /etc/ringbd/disks.toml
  ringbd serve --ceph-conf /etc/ceph/ceph.conf --ceph-id admin rbd:rbd/disk
  ringbd serve fault:read=0.1@EIO,write=5%@ENOSPC,delay-flush=5ms:memory:1G")]
struct ServeArgs {
    /// The default export (the one named "").
    spec: Option<Spec>,
    /// Read the settings and exports from this TOML file (flags given here win; SIGHUP reloads its exports).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check this configuration file (and the other flags) and exit: 0 with a summary, or 1 with the error.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// A named export; repeatable.
    #[arg(long = "export", value_name = "NAME=SPEC", value_parser = parse_named_export)]
    exports: Vec<(String, Spec)>,
    /// TCP address to listen on; repeatable [default: 127.0.0.1:10809 unless --unix is given].
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<String>,
    /// Unix socket to listen on.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Refuse every write, trim and zero request (EPERM).
    #[arg(long)]
    read_only: bool,
    /// Captive mode: run CMD under sh with $uri, $unixsocket and $port set; stop when it exits and exit with its status.
    #[arg(long, value_name = "CMD")]
    run: Option<String>,
    /// Log debug events too: each connection's negotiation, TLS, kTLS (see -q, RUST_LOG).
    #[arg(short, long)]
    verbose: bool,
    /// Engine: io_uring (a ring per worker thread), threads (a blocking thread per connection), or auto (io_uring when the kernel has it).
    #[arg(long, value_enum, default_value = "auto")]
    engine: EngineArg,
    /// io_uring worker threads (one ring each) [default: number of CPUs].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// A/B switch: send each reply with its own send call instead of batching a loop turn's replies.
    #[arg(long)]
    no_coalesce: bool,
    /// A/B switch: receive one provided buffer per completion (no bundles).
    #[arg(long)]
    no_bundle: bool,
    /// A/B switch: never use zero-copy sends (SENDMSG_ZC).
    #[arg(long)]
    no_zerocopy: bool,
    /// Send batches carrying at least this much read payload with SENDMSG_ZC (TCP only).
    #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = ringbd_backend::parse_size)]
    zerocopy_threshold: u64,
    /// A/B switch: spend a whole receive buffer per receive (no IOU_PBUF_RING_INC).
    #[arg(long)]
    no_incremental: bool,
    /// A/B switch: name sockets by descriptor instead of registering them in the ring's file table.
    #[arg(long)]
    no_fixed_files: bool,
    /// Most bytes one arming of a connection's receive takes from its socket before the connection must consume them (Linux 6.16+); bounds what a connection that stops taking input holds; 0 = no limit. Smaller costs more ring enters for large writes.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = ringbd_backend::parse_size)]
    receive_share: u64,
    /// Registered buffers per ring for file exports' reads and writes (0 = none).
    #[arg(long, value_name = "SIZE", default_value = "8M", value_parser = ringbd_backend::parse_size)]
    registered_buffers: u64,
    /// Print the engine's counters (requests per receive, replies per send...) this often, e.g. 1s or 500ms; they are always printed at exit.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    stats_interval: Option<Duration>,
    /// STARTTLS: off (refused), on (offered), require (nothing without TLS) [default: require with --tls-certificates or --tls-psk, else off].
    #[arg(long, value_enum)]
    tls: Option<TlsArg>,
    /// Directory with ca-cert.pem, server-cert.pem and server-key.pem (the qemu and nbdkit names).
    #[arg(long, value_name = "DIR")]
    tls_certificates: Option<PathBuf>,
    /// Require a client certificate signed by the directory's ca-cert.pem.
    #[arg(long)]
    tls_verify_peer: bool,
    /// Only serve clients whose certificate subject is this distinguished name, RFC 4514 as qemu prints it (e.g. "CN=backup-host,O=Example"); repeatable; needs --tls-verify-peer.
    #[arg(long, value_name = "DN")]
    tls_authz: Vec<String>,
    /// Like --tls-authz, with one distinguished name per line of FILE (blank lines and #comments ignored).
    #[arg(long, value_name = "FILE")]
    tls_authz_file: Option<PathBuf>,
    /// Serve at most N connections at once; more are closed right after accept.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// Drop a client that has not finished option haggling (TLS handshake included) within this time; 0 = never.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    handshake_timeout: Duration,
    /// Close a connection whose socket takes none of its waiting replies for this long (a client that stopped reading); 0 = never.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_timeout)]
    reply_timeout: Duration,
    /// What all connections together may hold of unsent replies, operations in flight and received input; each connection in transmission gets an equal share (at most 8 MiB, at least 256 KiB), so the total stays near this (docs/engine.md, "Resource model").
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = ringbd_backend::parse_size)]
    reply_memory: u64,
    /// Permissions of the --unix socket, in octal.
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = parse_mode)]
    unix_mode: u32,
    /// After binding and opening the exports, run as this user (name or number).
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// After binding and opening the exports, run as this group (name or number) [default: the user's group].
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// TLS with pre-shared keys instead of certificates: a psktool file of username:hexkey lines (as nbdkit --tls-psk and qemu's keys.psk).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["tls_certificates", "tls_verify_peer"])]
    tls_psk: Option<PathBuf>,
    #[command(flatten)]
    ceph: CephArgs,
    /// A/B switch: keep TLS in userspace (rustls) even where the kernel has kTLS.
    #[arg(long)]
    no_ktls: bool,
    /// Serve Prometheus metrics (requests, bytes, errors, latency per export and operation; the engine's counters) at http://ADDR:PORT/metrics, e.g. 127.0.0.1:9100 (docs/metrics.md).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<String>,
}

/// How to reach the Ceph cluster of `rbd:` specs (`serve` and `attach`).
#[derive(clap::Args)]
pub struct CephArgs {
    /// rbd: exports: the ceph.conf to read [default: librados' search: $CEPH_CONF, /etc/ceph/ceph.conf, ...].
    #[arg(long, value_name = "PATH")]
    ceph_conf: Option<PathBuf>,
    /// rbd: exports: the Ceph client id (client.ID); its keyring is found as librados finds it [default: admin].
    #[arg(long, value_name = "NAME")]
    ceph_id: Option<String>,
    /// rbd: exports: bound on connecting, monitor commands and each OSD operation (0 = librados' defaults: OSD operations wait forever).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_timeout)]
    ceph_timeout: Duration,
}

impl CephArgs {
    pub fn config(self) -> ringbd_backend::CephConfig {
        ringbd_backend::CephConfig {
            conf: self.ceph_conf,
            id: self.ceph_id,
            timeout: (!self.ceph_timeout.is_zero()).then_some(self.ceph_timeout),
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum TlsArg {
    Off,
    On,
    Require,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum EngineArg {
    Auto,
    Uring,
    Threads,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len()));
    let v: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 1s or 500ms"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" | "" => v,
        "m" => v * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s or m)")),
    };
    if !(secs > 0.0 && secs < 1e9) {
        return Err(format!("{s:?} must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A duration, or 0 (zero: none).
fn parse_timeout(s: &str) -> Result<Duration, String> {
    if s.trim().trim_end_matches(['s', 'm']) == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim().trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode like 600 or 0660"))?;
    if mode > 0o777 {
        return Err(format!("{s:?}: only permission bits (at most 777)"));
    }
    Ok(mode)
}

fn parse_named_export(s: &str) -> Result<(String, Spec), String> {
    let (name, spec) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=SPEC"))?;
    let spec = spec.parse::<Spec>().map_err(|e| e.to_string())?;
    Ok((name.to_owned(), spec))
}

fn main() -> ExitCode {
    // The matches say which flags were given, so that they win over a
    // configuration file's settings.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Before any worker thread exists (see ringbd_io::mem).
    if let Err(e) = ringbd_io::mem::retain_heap() {
        eprintln!("ringbd: warning: heap settings: {e} (TLS replies may be slower)");
    }
    // `serve` installs it once its configuration file said how verbose.
    if !matches!(cli.command, Cmd::Serve(_)) {
        let verbose = matches!(&cli.command, Cmd::Attach(a) if a.verbose());
        logging::init(logging::Level::from_flags(verbose, cli.quiet));
    }
    match cli.command {
        Cmd::Serve(a) => serve(*a, matches.subcommand_matches("serve"), cli.quiet),
        Cmd::Attach(a) => cmd_ublk::attach(a),
        Cmd::Detach(a) => cmd_ublk::detach(a),
        Cmd::List(a) => cmd_ublk::list(a),
        Cmd::Info(a) => cmd_info::run(a),
        Cmd::Copy(a) => cmd_copy::run(a),
        Cmd::Bench(a) => cmd_bench::run(a),
        Cmd::Generate(a) => cmd_generate::run(a, <Cli as clap::CommandFactory>::command()),
    }
}

fn serve(mut a: ServeArgs, matches: Option<&ArgMatches>, mut quiet: bool) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("ringbd: error: {e}");
        ExitCode::FAILURE
    };
    let flags = config::FlagExports { default: a.spec.take(), named: std::mem::take(&mut a.exports) };
    let file_path = a.config.clone().or(a.check_config.clone());
    let (exports, reload) = match &file_path {
        Some(path) => {
            let file = match config::load(path) {
                Ok(f) => f,
                Err(e) => return fail(&e),
            };
            let given = |id: &str| matches.and_then(|m| m.value_source(id)) == Some(ValueSource::CommandLine);
            config::apply(&file, &mut a, &given);
            // -q is the top command's (global) flag: the file's counts when it is absent.
            quiet = quiet || file.quiet.unwrap_or(false);
            let exports = config::exports(&file, &flags);
            if exports.is_empty() {
                return fail(&format_args!(
                    "{}: no exports: the file has no [[export]] and the command line none",
                    path.display()
                ));
            }
            let (path, flags) = (path.clone(), flags.clone());
            let reload = ringbd_server::Reload::new(move || {
                let file = config::load(&path).map_err(|e| e.to_string())?;
                Ok(config::exports(&file, &flags))
            });
            (exports, Some(reload))
        }
        None => {
            let mut exports = Vec::new();
            match flags.default {
                Some(spec) => exports.push(ringbd_server::ExportConfig::new("", spec)),
                None if flags.named.is_empty() => {
                    exports.push(ringbd_server::ExportConfig::new("", Spec::Memory(1 << 30)))
                }
                None => {}
            }
            exports.extend(flags.named.into_iter().map(|(n, s)| ringbd_server::ExportConfig::new(n, s)));
            (exports, None)
        }
    };
    logging::init(logging::Level::from_flags(a.verbose, quiet));
    let check = a.check_config.clone();
    let config = ringbd_server::Config {
        exports,
        reload,
        listen: a.listen,
        unix: a.unix,
        read_only: a.read_only,
        run: a.run,
        engine: match a.engine {
            EngineArg::Auto => EngineKind::Auto,
            EngineArg::Uring => EngineKind::Uring,
            EngineArg::Threads => EngineKind::Threads,
        },
        uring: {
            let mut u = UringOptions::default();
            if let Some(n) = a.threads {
                u.threads = n.max(1);
            }
            u.coalesce = !a.no_coalesce;
            u.bundle = !a.no_bundle;
            u.zerocopy = !a.no_zerocopy;
            u.zerocopy_threshold = usize::try_from(a.zerocopy_threshold).unwrap_or(usize::MAX);
            u.fixed_files = !a.no_fixed_files;
            u.incremental = !a.no_incremental;
            u.registered_buffers = usize::try_from(a.registered_buffers).unwrap_or(usize::MAX).min(1 << 30);
            u.receive_share = u32::try_from(a.receive_share).ok().filter(|&n| n > 0);
            u
        },
        stats_interval: a.stats_interval,
        tls: ringbd_server::tls::TlsOptions {
            mode: match (a.tls, a.tls_certificates.is_some() || a.tls_psk.is_some()) {
                (Some(TlsArg::Off), _) | (None, false) => TlsMode::Off,
                (Some(TlsArg::On), _) => TlsMode::On,
                (Some(TlsArg::Require), _) | (None, true) => TlsMode::Require,
            },
            certificates: a.tls_certificates,
            verify_peer: a.tls_verify_peer,
            authz: a.tls_authz,
            authz_file: a.tls_authz_file,
            psk: a.tls_psk,
            no_ktls: a.no_ktls,
        },
        access: ringbd_server::access::AccessOptions {
            max_connections: a.max_connections.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            handshake_timeout: Some(a.handshake_timeout).filter(|t| !t.is_zero()),
            reply_timeout: Some(a.reply_timeout).filter(|t| !t.is_zero()),
            reply_memory: usize::try_from(a.reply_memory).unwrap_or(usize::MAX),
            unix_mode: a.unix_mode,
            user: a.user,
            group: a.group,
        },
        ceph: a.ceph.config(),
        metrics: a.metrics,
    };
    if let Some(path) = check {
        return match config::check(&path, &config) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    match ringbd_server::run(config) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("ringbd: error: {e}");
            ExitCode::FAILURE
        }
    }
}
