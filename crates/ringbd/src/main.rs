//! `ringbd`: command-line entry point. Parsing only; the work is in the
//! library crates.

mod cmd_bench;
mod cmd_copy;
mod cmd_info;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod cmd_ublk;

use clap::{Args, Parser, Subcommand};
use nbd_proto::TlsMode;
use ringbd_backend::Spec;
use ringbd_server::engine_uring::UringOptions;
use ringbd_server::server::EngineKind;

#[derive(Parser)]
#[command(name = "ringbd", version, about = "Userspace network block storage on io_uring")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve exports over NBD (fixed newstyle, structured replies, extended headers).
    Serve(ServeArgs),
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
}

#[derive(Args)]
#[command(after_help = "\
SPEC is one of:
  memory:SIZE   sparse RAM disk, e.g. memory:1G (the default: memory:1G)
  file:PATH     a regular file or block device
  file:PATH,direct
                the same with O_DIRECT for aligned reads and writes (no page cache)
  null:SIZE     discards writes, reads zeroes
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

Examples:
  ringbd serve memory:1G
  ringbd serve --unix /tmp/nbd.sock file:/var/lib/disk.img
  ringbd serve --export a=memory:1G --export b=null:1T --listen [::1]:10809
  ringbd serve memory:256M --run 'qemu-img info \"$uri\"'
  ringbd serve fault:read=0.1@EIO,write=5%@ENOSPC,delay-flush=5ms:memory:1G")]
struct ServeArgs {
    /// The default export (the one named "").
    spec: Option<Spec>,
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
    /// Log each connection's negotiation to stderr.
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
    /// Registered buffers per ring for file exports' reads and writes (0 = none).
    #[arg(long, value_name = "SIZE", default_value = "8M", value_parser = ringbd_backend::parse_size)]
    registered_buffers: u64,
    /// Print the engine's counters (requests per receive, replies per send...) this often, e.g. 1s or 500ms; they are always printed at exit.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    stats_interval: Option<Duration>,
    /// STARTTLS: off (refused), on (offered), require (nothing without TLS) [default: require with --tls-certificates, else off].
    #[arg(long, value_enum)]
    tls: Option<TlsArg>,
    /// Directory with ca-cert.pem, server-cert.pem and server-key.pem (the qemu and nbdkit names).
    #[arg(long, value_name = "DIR")]
    tls_certificates: Option<PathBuf>,
    /// Require a client certificate signed by the directory's ca-cert.pem.
    #[arg(long)]
    tls_verify_peer: bool,
    /// A/B switch: keep TLS in userspace (rustls) even where the kernel has kTLS.
    #[arg(long)]
    no_ktls: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TlsArg {
    Off,
    On,
    Require,
}

#[derive(Clone, Copy, clap::ValueEnum)]
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

fn parse_named_export(s: &str) -> Result<(String, Spec), String> {
    let (name, spec) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=SPEC"))?;
    let spec = spec.parse::<Spec>().map_err(|e| e.to_string())?;
    Ok((name.to_owned(), spec))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve(a) => serve(a),
        Cmd::Attach(a) => cmd_ublk::attach(a),
        Cmd::Detach(a) => cmd_ublk::detach(a),
        Cmd::List(a) => cmd_ublk::list(a),
        Cmd::Info(a) => cmd_info::run(a),
        Cmd::Copy(a) => cmd_copy::run(a),
        Cmd::Bench(a) => cmd_bench::run(a),
    }
}

fn serve(a: ServeArgs) -> ExitCode {
    ringbd_server::log::set_verbose(a.verbose);
    let mut exports = Vec::new();
    match a.spec {
        Some(spec) => exports.push((String::new(), spec)),
        None if a.exports.is_empty() => exports.push((String::new(), Spec::Memory(1 << 30))),
        None => {}
    }
    exports.extend(a.exports);
    let config = ringbd_server::Config {
        exports,
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
            u
        },
        stats_interval: a.stats_interval,
        tls: ringbd_server::tls::TlsOptions {
            mode: match (a.tls, &a.tls_certificates) {
                (Some(TlsArg::Off), _) | (None, None) => TlsMode::Off,
                (Some(TlsArg::On), _) => TlsMode::On,
                (Some(TlsArg::Require), _) | (None, Some(_)) => TlsMode::Require,
            },
            certificates: a.tls_certificates,
            verify_peer: a.tls_verify_peer,
            no_ktls: a.no_ktls,
        },
    };
    match ringbd_server::run(config) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("ringbd: error: {e}");
            ExitCode::FAILURE
        }
    }
}
