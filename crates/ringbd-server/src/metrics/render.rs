//! The text exposition of the metrics: Prometheus' text format 0.0.4,
//! written by the `prometheus` crate's `TextEncoder` (escaping, histogram
//! buckets, `+Inf`) from metric families built here at each scrape.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus::proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::Encoder;

use super::{Snapshot, BUCKETS_NS, ERRNOS, OPS};
use crate::engine_uring::EngineStats;
use crate::exports::Exports;

/// The scrape's `Content-Type`.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// The operations that move data: the `op` values of `ringbd_bytes_total`.
const DATA_OPS: [usize; 2] = [0, 1];

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).to_owned());
            l.set_value((*v).to_owned());
            l
        })
        .collect()
}

fn family(name: &str, help: &str, typ: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_owned());
    f.set_help(help.to_owned());
    f.set_field_type(typ);
    f.set_metric(metrics);
    f
}

fn counter(pairs: &[(&str, &str)], v: u64) -> Metric {
    let mut c = Counter::default();
    c.set_value(v as f64);
    let mut m = Metric::default();
    m.set_label(labels(pairs));
    m.set_counter(c);
    m
}

fn gauge(pairs: &[(&str, &str)], v: u64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v as f64);
    let mut m = Metric::default();
    m.set_label(labels(pairs));
    m.set_gauge(g);
    m
}

fn histogram(pairs: &[(&str, &str)], buckets: &[u64], nanos: u64) -> Metric {
    let mut h = Histogram::default();
    let mut cumulative = 0;
    let mut bs = Vec::with_capacity(BUCKETS_NS.len());
    for (bound, n) in BUCKETS_NS.iter().zip(buckets) {
        cumulative += n;
        let mut b = Bucket::default();
        b.set_upper_bound(*bound as f64 / 1e9);
        b.set_cumulative_count(cumulative);
        bs.push(b);
    }
    h.set_bucket(bs);
    // (The encoder adds `+Inf` with the count.)
    h.set_sample_count(buckets.iter().sum());
    h.set_sample_sum(nanos as f64 / 1e9);
    let mut m = Metric::default();
    m.set_label(labels(pairs));
    m.set_histogram(h);
    m
}

/// The families of the exports' counters; a family with no series yet
/// (no error so far) is left out.
fn export_families(snaps: &[(&str, Snapshot)]) -> Vec<MetricFamily> {
    let (mut conns, mut conns_total, mut reqs, mut bytes, mut errors, mut lat) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (export, s) in snaps {
        let export = *export;
        conns.push(gauge(&[("export", export)], s.connections));
        conns_total.push(counter(&[("export", export)], s.connections_total));
        for (i, (op, t)) in OPS.iter().zip(&s.ops).enumerate() {
            let pairs = [("export", export), ("op", op)];
            reqs.push(counter(&pairs, t.requests));
            if DATA_OPS.contains(&i) {
                bytes.push(counter(&pairs, t.bytes));
            }
            for (errno, n) in ERRNOS.iter().zip(&t.errors) {
                if *n > 0 {
                    errors.push(counter(&[("export", export), ("op", op), ("errno", errno)], *n));
                }
            }
            // Every operation would be 24 lines each: those never asked for are left out.
            if t.requests > 0 {
                lat.push(histogram(&pairs, &t.buckets, t.nanos));
            }
        }
    }
    use MetricType::{COUNTER, GAUGE, HISTOGRAM};
    [
        family("ringbd_connections", "Connections in the transmission phase, by export.", GAUGE, conns),
        family(
            "ringbd_connections_total",
            "Connections that entered the transmission phase, by export.",
            COUNTER,
            conns_total,
        ),
        family("ringbd_requests_total", "Requests answered, by export and operation.", COUNTER, reqs),
        family(
            "ringbd_bytes_total",
            "Bytes read or written by requests answered with success, by export and operation.",
            COUNTER,
            bytes,
        ),
        family(
            "ringbd_errors_total",
            "Requests answered with an error, by export, operation and errno.",
            COUNTER,
            errors,
        ),
        family(
            "ringbd_request_duration_seconds",
            "Time from a request's header parsed to its reply queued, by export and operation.",
            HISTOGRAM,
            lat,
        ),
    ]
    .into_iter()
    .filter(|f| !f.get_metric().is_empty())
    .collect()
}

/// The io_uring engine's counters (`--stats-interval`'s), as counters.
fn engine_families(s: &EngineStats) -> Vec<MetricFamily> {
    let rows: [(&str, &str, &AtomicU64); 16] = [
        ("connections_total", "Connections accepted.", &s.connections),
        ("requests_total", "Requests received.", &s.requests),
        (
            "receive_completions_total",
            "Receive completions (requests per receive: requests / this).",
            &s.recv_completions,
        ),
        ("receive_buffers_total", "Provided buffers consumed by receives.", &s.recv_buffers),
        ("send_calls_total", "Send operations (replies per send: replies / this).", &s.send_calls),
        ("replies_total", "Replies sent.", &s.replies),
        ("ring_enters_total", "io_uring_enter calls.", &s.enters),
        ("zerocopy_sends_total", "Zero-copy sends (SENDMSG_ZC).", &s.zc_sends),
        ("zerocopy_copied_total", "Zero-copy sends whose data the kernel copied anyway.", &s.zc_copied),
        ("file_ops_total", "File operations run on the ring.", &s.file_ops),
        ("file_ops_registered_total", "File operations with registered buffers.", &s.file_fixed),
        ("file_ops_direct_total", "File operations with O_DIRECT.", &s.file_direct),
        ("async_backend_ops_total", "Operations run by an asynchronous backend (librbd).", &s.aio_ops),
        (
            "spilled_bytes_total",
            "Received bytes copied out of the receive buffers (connection not ready).",
            &s.spilled_bytes,
        ),
        ("reply_timeouts_total", "Connections closed by --reply-timeout.", &s.reply_timeouts),
        (
            "buffer_ring_resyncs_total",
            "Receive completions that disagreed with the buffer ring.",
            &s.buf_resyncs,
        ),
    ];
    rows.into_iter()
        .map(|(name, help, v)| {
            let name = format!("ringbd_engine_{name}");
            family(&name, help, MetricType::COUNTER, vec![counter(&[], v.load(Relaxed))])
        })
        .collect()
}

/// The scrape: every export's counters and, with the io_uring engine, its
/// counters.
pub fn render(exports: &Exports, engine: Option<&EngineStats>) -> String {
    let snaps: Vec<(&str, Snapshot)> =
        exports.iter().map(|e| (e.name.as_str(), e.metrics.snapshot())).collect();
    encode(&snaps, engine)
}

fn encode(snaps: &[(&str, Snapshot)], engine: Option<&EngineStats>) -> String {
    let mut families = export_families(snaps);
    if let Some(s) = engine {
        families.extend(engine_families(s));
    }
    let mut out = Vec::new();
    // Fails only for a family without series or name, which are left out
    // above; then the scrape is what was written before it.
    if let Err(e) = prometheus::TextEncoder::new().encode(&families, &mut out) {
        tracing::warn!("metrics: {e}");
    }
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ExportMetrics;
    use nbd_proto::{CmdType, Errno};
    use std::time::Duration;

    #[test]
    fn exposition_of_one_export() {
        let m = ExportMetrics::new("d\"isk");
        let c = m.connect();
        c.answered(CmdType::WRITE, 4096, Duration::from_micros(3), None);
        c.answered(CmdType::WRITE, 4096, Duration::from_micros(30), None);
        c.answered(CmdType::READ, 4096, Duration::from_micros(7), Some(Errno::EIO));
        let text = encode(&[(m.name(), m.snapshot())], None);
        let has = |line: &str| text.lines().any(|l| l == line);
        // The export name is escaped as a label value.
        assert!(has("# TYPE ringbd_connections gauge"), "{text}");
        assert!(has(r#"ringbd_connections{export="d\"isk"} 1"#), "{text}");
        assert!(has(r#"ringbd_connections_total{export="d\"isk"} 1"#), "{text}");
        assert!(has(r#"ringbd_requests_total{export="d\"isk",op="write"} 2"#), "{text}");
        assert!(has(r#"ringbd_requests_total{export="d\"isk",op="trim"} 0"#), "{text}");
        assert!(has(r#"ringbd_bytes_total{export="d\"isk",op="write"} 8192"#), "{text}");
        assert!(has(r#"ringbd_bytes_total{export="d\"isk",op="read"} 0"#), "{text}");
        assert!(has(r#"ringbd_errors_total{export="d\"isk",op="read",errno="EIO"} 1"#), "{text}");
        assert!(has("# TYPE ringbd_request_duration_seconds histogram"), "{text}");
        let h = r#"ringbd_request_duration_seconds_bucket{export="d\"isk",op="write",le="#;
        assert!(has(&format!(r#"{h}"0.00000025"}} 0"#)), "{text}");
        assert!(has(&format!(r#"{h}"0.000001"}} 0"#)), "{text}");
        assert!(has(&format!(r#"{h}"0.000005"}} 1"#)), "{text}");
        assert!(has(&format!(r#"{h}"0.00005"}} 2"#)), "{text}");
        assert!(has(&format!(r#"{h}"+Inf"}} 2"#)), "{text}");
        assert!(has(r#"ringbd_request_duration_seconds_count{export="d\"isk",op="write"} 2"#), "{text}");
        assert!(has(r#"ringbd_request_duration_seconds_sum{export="d\"isk",op="write"} 0.000033"#), "{text}");
        // Operations never asked for have no histogram; no engine, no engine counters.
        assert!(!text.contains(r#"ringbd_request_duration_seconds_count{export="d\"isk",op="trim"}"#));
        assert!(!text.contains("ringbd_engine_"));
        // Every sample line is NAME{LABELS} VALUE with a finite number.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let v = l.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok_and(f64::is_finite), "{l}");
        }
    }

    #[test]
    fn no_errors_no_error_family_and_engine_counters() {
        let m = ExportMetrics::new("");
        let s = EngineStats::default();
        s.replies.store(10, Relaxed);
        s.send_calls.store(4, Relaxed);
        let text = encode(&[(m.name(), m.snapshot())], Some(&s));
        assert!(!text.contains("ringbd_errors_total"), "{text}");
        assert!(!text.contains("ringbd_request_duration_seconds"), "{text}");
        assert!(text.lines().any(|l| l == r#"ringbd_connections{export=""} 0"#), "{text}");
        assert!(text.lines().any(|l| l == "ringbd_engine_replies_total 10"), "{text}");
        assert!(text.lines().any(|l| l == "ringbd_engine_send_calls_total 4"), "{text}");
        assert!(text.lines().any(|l| l == "# TYPE ringbd_engine_zerocopy_sends_total counter"), "{text}");
    }
}
