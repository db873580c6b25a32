//! `ringbd`: command-line entry point. Parsing only; the work is in the
//! library crates.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ringbd_backend::Spec;

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
}

#[derive(Args)]
#[command(after_help = "\
SPEC is one of:
  memory:SIZE   sparse RAM disk, e.g. memory:1G (the default: memory:1G)
  file:PATH     a regular file or block device
  null:SIZE     discards writes, reads zeroes

Each listener's URI is printed on stdout once it is ready.
With LISTEN_PID/LISTEN_FDS set (socket activation), the passed sockets are used instead.

Examples:
  ringbd serve memory:1G
  ringbd serve --unix /tmp/nbd.sock file:/var/lib/disk.img
  ringbd serve --export a=memory:1G --export b=null:1T --listen [::1]:10809
  ringbd serve memory:256M --run 'qemu-img info \"$uri\"'")]
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
    let config =
        ringbd_server::Config { exports, listen: a.listen, unix: a.unix, read_only: a.read_only, run: a.run };
    match ringbd_server::run(config) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("ringbd: error: {e}");
            ExitCode::FAILURE
        }
    }
}
