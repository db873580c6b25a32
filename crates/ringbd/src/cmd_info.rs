//! `ringbd info URI`: what an export is (size, flags, block sizes, meta
//! contexts), in the shape nbdinfo prints it; `--list` for every export,
//! `--map` for the allocation map, `--json` for machines.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::Args;
use nbd_proto::wire::{state_flags, tx_flags};
use nbd_proto::ClientNegotiated;
use ringbd_client::{ClientConfig, Cmd, Engine, NbdUri};

use crate::cmd_bench::json_str;

#[derive(Args)]
#[command(after_help = "\
Examples:
  ringbd info nbd://127.0.0.1/
  ringbd info --list nbd+unix:///?socket=/tmp/nbd.sock
  ringbd info --map --json nbd://127.0.0.1/disk")]
pub struct InfoArgs {
    /// NBD URI of the export (with --list, of the server).
    uri: NbdUri,
    /// List every export of the server, with its details.
    #[arg(long)]
    list: bool,
    /// Print the allocation map (base:allocation extents) instead.
    #[arg(long)]
    map: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("ringbd info: {msg}");
    ExitCode::FAILURE
}

pub fn run(a: InfoArgs) -> ExitCode {
    match info(&a) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn info(a: &InfoArgs) -> Result<String, ringbd_client::Error> {
    if a.map {
        return map(a);
    }
    let names: Vec<(String, Option<String>)> = if a.list {
        ringbd_client::list_exports(&a.uri)?.into_iter().map(|l| (l.name, Some(l.description))).collect()
    } else {
        vec![(a.uri.export.clone(), None)]
    };
    let mut details = Vec::new();
    let mut tls = a.uri.tls.is_some();
    for (name, desc) in names {
        let mut uri = a.uri.clone();
        uri.export = name;
        let mut cfg = ClientConfig::new(&uri.export);
        cfg.list_meta = true;
        cfg.base_allocation = false;
        let c = ringbd_client::connect(&uri, cfg)?;
        drop(c.fd);
        tls = c.tls.is_some();
        details.push((uri, desc, c.negotiated));
    }
    let with = if tls { "with" } else { "without" };
    let mut o = String::new();
    if a.json {
        let proto = details.first().map(|d| protocol(&d.2)).unwrap_or("newstyle-fixed");
        let _ = write!(o, "{{\n\"protocol\": \"{proto}\",\n\"TLS\": {tls},\n\"exports\": [\n");
        for (i, (uri, desc, n)) in details.iter().enumerate() {
            if i > 0 {
                o.push_str(",\n");
            }
            o.push_str(&export_json(uri, desc.as_deref(), n));
        }
        o.push_str("\n]\n}\n");
    } else {
        if let Some(d) = details.first() {
            let _ = writeln!(o, "protocol: {} {with} TLS, using {}", protocol(&d.2), packets(&d.2));
        }
        for (uri, desc, n) in &details {
            o.push_str(&export_text(uri, desc.as_deref(), n));
        }
    }
    Ok(o)
}

fn protocol(_n: &ClientNegotiated) -> &'static str {
    "newstyle-fixed"
}

fn packets(n: &ClientNegotiated) -> &'static str {
    if n.extended {
        "extended packets"
    } else if n.structured {
        "structured packets"
    } else {
        "simple packets"
    }
}

fn flag_list(n: &ClientNegotiated) -> Vec<(&'static str, bool)> {
    let f = |b: u16| n.flags & b != 0;
    vec![
        ("is_rotational", f(tx_flags::ROTATIONAL)),
        ("is_read_only", f(tx_flags::READ_ONLY)),
        ("can_block_status_payload", f(tx_flags::BLOCK_STATUS_PAYLOAD)),
        ("can_cache", f(tx_flags::SEND_CACHE)),
        ("can_df", f(tx_flags::SEND_DF)),
        ("can_fast_zero", f(tx_flags::SEND_FAST_ZERO)),
        ("can_flush", f(tx_flags::SEND_FLUSH)),
        ("can_fua", f(tx_flags::SEND_FUA)),
        ("can_multi_conn", f(tx_flags::CAN_MULTI_CONN)),
        ("can_trim", f(tx_flags::SEND_TRIM)),
        ("can_zero", f(tx_flags::SEND_WRITE_ZEROES)),
    ]
}

fn human_size(b: u64) -> String {
    for (shift, unit) in [(60, "E"), (50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if b >= 1 << shift {
            let v = b as f64 / (1u64 << shift) as f64;
            return if b.is_multiple_of(1 << shift) {
                format!("{}{unit}", b >> shift)
            } else {
                format!("{v:.1}{unit}")
            };
        }
    }
    format!("{b}")
}

fn export_text(uri: &NbdUri, desc: Option<&str>, n: &ClientNegotiated) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "export={}:", json_str(&uri.export));
    let description = n.description.as_deref().or(desc).filter(|d| !d.is_empty());
    if let Some(d) = description {
        let _ = writeln!(o, "\tdescription: {d}");
    }
    let _ = writeln!(o, "\texport-size: {} ({})", n.size, human_size(n.size));
    let _ = writeln!(o, "\turi: {uri}");
    if !n.meta_contexts.is_empty() {
        let _ = writeln!(o, "\tcontexts:");
        for c in &n.meta_contexts {
            let _ = writeln!(o, "\t\t{c}");
        }
    }
    for (name, v) in flag_list(n) {
        let _ = writeln!(o, "\t{name}: {v}");
    }
    if let Some(b) = n.block_sizes {
        let _ = writeln!(o, "\tblock_size_minimum: {}", b.minimum);
        let _ = writeln!(o, "\tblock_size_preferred: {}", b.preferred);
        let _ = writeln!(o, "\tblock_size_maximum: {}", b.maximum);
    }
    o
}

fn export_json(uri: &NbdUri, desc: Option<&str>, n: &ClientNegotiated) -> String {
    let mut o = String::from("{\n");
    let _ = writeln!(o, "\t\"export-name\": {},", json_str(&uri.export));
    if let Some(d) = n.description.as_deref().or(desc).filter(|d| !d.is_empty()) {
        let _ = writeln!(o, "\t\"description\": {},", json_str(d));
    }
    let _ = writeln!(o, "\t\"uri\": {},", json_str(&uri.to_string()));
    let ctx: Vec<String> = n.meta_contexts.iter().map(|c| json_str(c)).collect();
    let _ = writeln!(o, "\t\"contexts\": [{}],", ctx.join(", "));
    let _ = writeln!(o, "\t\"packets\": \"{}\",", packets(n));
    for (name, v) in flag_list(n) {
        let _ = writeln!(o, "\t\"{name}\": {v},");
    }
    if let Some(b) = n.block_sizes {
        let _ = writeln!(o, "\t\"block_size_minimum\": {},", b.minimum);
        let _ = writeln!(o, "\t\"block_size_preferred\": {},", b.preferred);
        let _ = writeln!(o, "\t\"block_size_maximum\": {},", b.maximum);
    }
    let _ = write!(o, "\t\"export-size\": {}\n}}", n.size);
    o
}

/// One run of extents with the same flags.
pub struct MapEntry {
    pub offset: u64,
    pub len: u64,
    pub flags: u32,
}

fn describe(flags: u32) -> &'static str {
    match flags & (state_flags::HOLE | state_flags::ZERO) {
        0 => "data",
        state_flags::HOLE => "hole",
        state_flags::ZERO => "zero",
        _ => "hole,zero",
    }
}

/// The whole export's `base:allocation` map, adjacent equal extents merged.
pub fn allocation_map(e: &mut Engine, conn: usize, size: u64) -> Result<Vec<MapEntry>, ringbd_client::Error> {
    let mut out: Vec<MapEntry> = Vec::new();
    let mut off = 0u64;
    let max_query = if e.negotiated_of(conn).is_some_and(|n| n.extended) {
        1 << 40
    } else {
        u64::from(u32::MAX) & !0xfff
    };
    while off < size {
        let len = (size - off).min(max_query);
        let c = e.run(conn, Cmd::block_status(off, len), Vec::new())?;
        c.result?;
        let start = off;
        for x in &c.extents {
            let l = x.len.min(size - off);
            if l == 0 {
                break;
            }
            match out.last_mut() {
                Some(m) if m.flags == x.flags && m.offset + m.len == off => m.len += l,
                _ => out.push(MapEntry { offset: off, len: l, flags: x.flags }),
            }
            off += l;
        }
        if off == start {
            return Err(ringbd_client::Error::Protocol {
                context: format!("block status at {off:#x}"),
                what: "no progress".into(),
            });
        }
    }
    Ok(out)
}

fn map(a: &InfoArgs) -> Result<String, ringbd_client::Error> {
    let cfg = ClientConfig::new(&a.uri.export);
    let mut e = Engine::connect(&a.uri, &cfg, 1)?;
    if e.negotiated().is_none_or(|n| n.base_allocation.is_none()) {
        return Err(ringbd_client::Error::Invalid(format!("{} does not support base:allocation", a.uri)));
    }
    let size = e.size();
    let m = allocation_map(&mut e, 0, size)?;
    e.disconnect()?;
    let mut o = String::new();
    if a.json {
        o.push_str("[\n");
        for (i, x) in m.iter().enumerate() {
            let sep = if i + 1 < m.len() { "," } else { "" };
            let _ = writeln!(
                o,
                "{{ \"offset\": {}, \"length\": {}, \"type\": {}, \"description\": \"{}\" }}{sep}",
                x.offset,
                x.len,
                x.flags,
                describe(x.flags)
            );
        }
        o.push_str("]\n");
    } else {
        for x in &m {
            let _ = writeln!(o, "{:>12} {:>12} {:>4}  {}", x.offset, x.len, x.flags, describe(x.flags));
        }
    }
    Ok(o)
}
