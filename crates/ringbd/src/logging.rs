//! Logging: every crate emits `tracing` events (the server, the ublk
//! frontend, the backends); this sets where they go and which are kept.
//!
//! - **Level**: warnings and the daemon's notices by default; `-q` keeps
//!   warnings and errors only, `-v` adds each connection's negotiation and
//!   other debug events; `RUST_LOG` (tracing's filter syntax, e.g.
//!   `RUST_LOG=ringbd_server=debug,warn`) replaces both.
//! - **stderr**: one line per event, `ringbd: MESSAGE key=value...`, the
//!   event's structured fields (connection, export, operation, errno) after
//!   its message, no timestamp (the service manager adds one).
//! - **The journal**: when stderr *is* the journal (systemd's
//!   `JOURNAL_STREAM` names it), events go to journald's native protocol
//!   instead, each field a journal field (`CONN=`, `EXPORT=`, `OP=`,
//!   `ERRNO=`, with `PRIORITY=` from the level), so `journalctl
//!   EXPORT=disk` works.

use std::fmt;
use std::os::unix::fs::MetadataExt;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// How much to log, from `-q`/`-v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Quiet,
    Normal,
    Verbose,
}

impl Level {
    pub fn from_flags(verbose: bool, quiet: bool) -> Level {
        match (verbose, quiet) {
            (true, _) => Level::Verbose,
            (false, true) => Level::Quiet,
            (false, false) => Level::Normal,
        }
    }

    fn filter(self) -> &'static str {
        match self {
            Level::Quiet => "warn",
            Level::Normal => "info",
            Level::Verbose => "debug",
        }
    }
}

/// Installs the process's subscriber; call once, before the work starts.
/// A `RUST_LOG` that does not parse is reported and the level used instead.
pub fn init(level: Level) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.is_empty() => EnvFilter::try_new(&s).unwrap_or_else(|e| {
            eprintln!("ringbd: RUST_LOG={s:?}: {e}; logging at the default level");
            EnvFilter::new(level.filter())
        }),
        _ => EnvFilter::new(level.filter()),
    };
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(journal) => {
                // Our field names as they are (CONN, not tracing-journald's
                // default F_CONN): none of them is a journal field of its own.
                let journal = journal.with_field_prefix(None).with_syslog_identifier("ringbd".to_owned());
                if tracing_subscriber::registry().with(filter).with(journal).try_init().is_err() {
                    eprintln!("ringbd: a logger was already installed");
                }
                return;
            }
            Err(e) => eprintln!("ringbd: journald's socket: {e}; logging to stderr"),
        }
    }
    let stderr = tracing_subscriber::fmt::layer().event_format(Line).with_writer(std::io::stderr);
    if tracing_subscriber::registry().with(filter).with(stderr).try_init().is_err() {
        eprintln!("ringbd: a logger was already installed");
    }
}

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM`
/// to its `device:inode` (systemd.exec(5)); a child that inherited the
/// variable but not the stream does not match.
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = v.split_once(':') else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// `ringbd: MESSAGE key=value...` (what ringbd printed before `tracing`,
/// so logs and the tests that read them keep their lines).
struct Line;

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        w.write_str("ringbd: ")?;
        if *event.metadata().level() == tracing::Level::ERROR {
            w.write_str("error: ")?;
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_pick_the_level() {
        assert_eq!(Level::from_flags(false, false).filter(), "info");
        assert_eq!(Level::from_flags(false, true).filter(), "warn");
        assert_eq!(Level::from_flags(true, false).filter(), "debug");
        assert_eq!(Level::from_flags(true, true), Level::Verbose, "-v wins");
    }

    #[test]
    fn a_journal_stream_that_is_not_stderr_is_not_the_journal() {
        // (The test's stderr is a pipe or a terminal, never inode 1 of device 0.)
        std::env::set_var("JOURNAL_STREAM", "0:1");
        assert!(!stderr_is_journal());
        std::env::set_var("JOURNAL_STREAM", "nonsense");
        assert!(!stderr_is_journal());
        std::env::remove_var("JOURNAL_STREAM");
        assert!(!stderr_is_journal());
    }
}
