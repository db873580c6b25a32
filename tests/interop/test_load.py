"""Load and soak: 64 connections x queue depth 64 of mixed random reads and
writes with per-block stamps, every read verified, on a memory export and a
file export on a disk filesystem; then multi-connection consistency (write
on A, FLUSH on B, read on C).

Each connection owns every 64th 64 KiB chunk of the export, so its model of
its own blocks is exact (no other connection writes them) while all 64
connections hammer the server at once; requests in flight on one connection
never overlap. Every block written carries a stamp (connection, block,
generation) and random bytes; the model keeps its digest.

Pass/fail: zero mismatches and zero failed requests; the server's RSS flat
after warm-up (sampled every 0.5 s from a third of the run to its end: the
peak of the second half of the samples at most RSS_TOLERANCE above the peak
of the first half; the whole export is written once before the soak, so the
memory export's pages all exist by then). Latency percentiles are reported, not asserted (shared CI
machines); they are measured in the Python client, whose own queueing
dominates them (4,096 requests in flight at a few thousand per second).

A second soak drives the same shape (64 connections x queue depth 64,
mixed random reads and writes, every read verified) from `ringbd bench
--verify`: one thread on an io_uring ring, whose own queueing is small,
so its latency percentiles (p50, p99, p99.9 from bench's --json) measure
the server far more closely than the Python client's. Pass: bench exits 0
(it stops at the first mismatch or failed request and exits 1), it verified
reads and made writes, and the server's RSS is flat as above.

RINGBD_SOAK_SECONDS sets the length of each soak (default 20; the figures in
docs/reliability.md come from 30 s runs).
"""

import hashlib
import json
import os
import random
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import ringbd_extra_args
from helpers import KiB, MiB

pytestmark = pytest.mark.ringbd_only

CONNS = 64
QD = 64
BLOCK = 4 * KiB
CHUNK = 64 * KiB
SIZE = 256 * MiB                     # 4096 chunks: 64 per connection
SECONDS = float(os.environ.get("RINGBD_SOAK_SECONDS", "20"))
RSS_TOLERANCE = 32 * MiB


def prefill_block(b):
    """What every block holds before the soak: the whole export is written
    once first, so the memory export's pages all exist and RSS can be flat."""
    return (b"ringbd-soak prefill b%08d " % b).ljust(BLOCK, b"\xa5")


def prefill(uri):
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    step = 4 * MiB
    for off in range(0, SIZE, step):
        first = off // BLOCK
        h.pwrite(b"".join(prefill_block(b) for b in range(first, first + step // BLOCK)), off)
    h.flush()
    h.shutdown()


def digest(b):
    return hashlib.blake2b(b, digest_size=16).digest()


def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Worker(threading.Thread):
    def __init__(self, uri, index, seed, deadline):
        super().__init__(daemon=True)
        import nbd
        self.nbd = nbd
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.index = index
        self.rng = random.Random(seed * 1000 + index)
        self.deadline = deadline
        self.model = {}              # block -> digest
        self.gen = 0
        self.chunks = list(range(index, SIZE // CHUNK, CONNS))
        self.reads = self.writes = self.bytes = self.mismatches = self.failures = 0
        self.latencies = []
        self.error = None

    def issue(self, chunk):
        nbd = self.nbd
        nblocks = self.rng.choice([1, 1, 2, 4, 16])
        first = chunk * (CHUNK // BLOCK) + self.rng.randrange(0, CHUNK // BLOCK - nblocks + 1)
        off = first * BLOCK
        t0 = time.monotonic()
        if self.rng.random() < 0.5:
            blocks = []
            for b in range(first, first + nblocks):
                self.gen += 1
                head = b"ringbd-soak c%02d b%08d g%010d " % (self.index, b, self.gen)
                blocks.append(head + self.rng.randbytes(BLOCK - len(head)))
            data = b"".join(blocks)
            c = self.h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)
            return c, ("w", chunk, first, [digest(x) for x in blocks], t0)
        buf = nbd.Buffer(nblocks * BLOCK)
        c = self.h.aio_pread(buf, off)
        return c, ("r", chunk, first, buf, t0)

    def complete(self, meta):
        op, chunk, first, extra, t0 = meta
        self.latencies.append(time.monotonic() - t0)
        if op == "w":
            for i, d in enumerate(extra):
                self.model[first + i] = d
            self.writes += 1
            self.bytes += len(extra) * BLOCK
        else:
            data = bytes(extra.to_bytearray())
            for i in range(len(data) // BLOCK):
                b = first + i
                want = self.model.get(b) or digest(prefill_block(b))
                if digest(data[i * BLOCK:(i + 1) * BLOCK]) != want:
                    self.mismatches += 1
            self.reads += 1
            self.bytes += len(data)

    def run(self):
        try:
            inflight = {}
            free = list(self.chunks)
            self.rng.shuffle(free)
            while True:
                now = time.monotonic()
                while len(inflight) < QD and free and now < self.deadline:
                    chunk = free.pop()
                    c, meta = self.issue(chunk)
                    inflight[c] = meta
                if not inflight:
                    break
                self.h.poll(-1)
                for c in list(inflight):
                    try:
                        done = self.h.aio_command_completed(c)
                    except self.nbd.Error:
                        self.failures += 1
                        done = True
                        free.append(inflight.pop(c)[1])
                        continue
                    if done:
                        meta = inflight.pop(c)
                        self.complete(meta)
                        free.insert(self.rng.randrange(len(free) + 1), meta[1])
            self.h.shutdown()
        except BaseException as e:
            self.error = e


def serve(ringbd, spec, sock):
    p = subprocess.Popen([ringbd, "serve", *ringbd_extra_args(), "--unix", sock, spec],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()  # printed when ready
    assert line.startswith("nbd+unix://"), line
    return p, line.strip()


def stop(p):
    p.terminate()
    rc = p.wait(60)
    err = p.stderr.read()
    assert rc == 0 and "panicked" not in err, (rc, err)


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="ringbd-load-", dir="/var/tmp")
    yield d
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


def make_spec(kind, workdir):
    if kind == "memory":
        return "memory:%d" % SIZE
    path = os.path.join(workdir, "disk.img")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return "file:%s" % path


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_soak_64_connections_qd64_verified(ringbd, server_kind, workdir, kind):
    seed = random.randrange(1 << 32)
    p, uri = serve(ringbd, make_spec(kind, workdir), os.path.join(workdir, "nbd.sock"))
    try:
        prefill(uri)
        start = time.monotonic()
        deadline = start + SECONDS
        workers = [Worker(uri, i, seed, deadline) for i in range(CONNS)]
        for w in workers:
            w.start()
        samples = []
        warm = start + SECONDS / 3
        while True:
            alive = [w for w in workers if w.is_alive()]
            if not alive:
                break
            alive[0].join(0.5)  # also the RSS sampling period
            now = time.monotonic()
            if warm <= now <= deadline and p.poll() is None:
                samples.append(rss(p.pid))
            assert now < deadline + 120, "soak hung"
        elapsed = time.monotonic() - start
        for w in workers:
            if w.error:
                raise w.error
        assert p.poll() is None, "server died"
    finally:
        stop(p)
    reads = sum(w.reads for w in workers)
    writes = sum(w.writes for w in workers)
    moved = sum(w.bytes for w in workers)
    mismatches = sum(w.mismatches for w in workers)
    failures = sum(w.failures for w in workers)
    lat = [x for w in workers for x in w.latencies]
    print("soak %s (seed %d): %d conns x qd %d for %.1f s: %d reads, %d writes, %.1f MiB/s, "
          "%d ops/s; mismatches %d, failed requests %d; latency p50 %.2f ms p99 %.2f ms "
          "p99.9 %.2f ms; server RSS after warm-up %.1f -> %.1f MiB (max %.1f) %s"
          % (kind, seed, CONNS, QD, elapsed, reads, writes, moved / MiB / elapsed,
             (reads + writes) / elapsed, mismatches, failures, percentile(lat, 0.5) * 1e3,
             percentile(lat, 0.99) * 1e3, percentile(lat, 0.999) * 1e3,
             samples[0] / MiB, samples[-1] / MiB, max(samples) / MiB, [int(x / MiB) for x in samples]))
    assert mismatches == 0 and failures == 0
    assert reads > 0 and writes > 0
    rss_flat(samples)


def rss_flat(samples):
    """The second half of the samples peaks no higher than the first half's
    peak plus the tolerance (a leak climbs; a plateau does not)."""
    half = len(samples) // 2
    assert half > 0, "soak too short to sample RSS"
    assert max(samples[half:]) <= max(samples[:half]) + RSS_TOLERANCE, "server RSS grew: %r" % samples


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_soak_bench_64_connections_qd64_verified_latency(ringbd, server_kind, workdir, kind):
    """`ringbd bench --verify`, 64 x 64, randrw 50/50 of 4 KiB: real latency
    percentiles, zero mismatches, RSS flat."""
    p, uri = serve(ringbd, make_spec(kind, workdir), os.path.join(workdir, "nbd.sock"))
    try:
        prefill(uri)
        start = time.monotonic()
        # bench writes the whole region once more (its stamps), then measures
        b = subprocess.Popen(
            [ringbd, "bench", uri, "--rw", "randrw", "--rwmixread", "50", "--bs", "4k",
             "--conns", str(CONNS), "--qd", str(QD), "--time", "%dms" % (SECONDS * 1000),
             "--verify", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        samples = []
        warm = start + SECONDS / 3
        while True:
            try:
                b.wait(0.5)  # also the RSS sampling period
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now >= warm and p.poll() is None:
                samples.append(rss(p.pid))
            if now > start + SECONDS + 120:
                b.kill()
                raise AssertionError("ringbd bench hung")
        out, err = b.communicate()
        elapsed = time.monotonic() - start
        assert p.poll() is None, "server died"
    finally:
        stop(p)
    assert b.returncode == 0, "ringbd bench failed (a mismatch or a failed request):\n%s" % err
    d = json.loads(out)
    assert d["verify"] and d["conns"] == CONNS and d["qd"] == QD
    r = d["results"][0]
    lat = r["lat_us"]
    print("bench soak %s: %d conns x qd %d, randrw 4k --verify, %.1f s measured (%.1f s with bench's prefill): "
          "%d reads verified, %d writes, %d IOPS, %.1f MiB/s; 0 mismatches; latency p50 %.2f ms, "
          "p99 %.2f ms, p99.9 %.2f ms, max %.2f ms; client CPU %.2f us/IO; server RSS after warm-up "
          "%.1f -> %.1f MiB (max %.1f) %s"
          % (kind, CONNS, QD, r["seconds"], elapsed, r["reads"], r["writes"], r["iops"], r["mib_per_s"],
             lat["p50"] / 1e3, lat["p99"] / 1e3, lat["p99.9"] / 1e3, lat["max"] / 1e3, r["cpu_us_per_io"],
             samples[0] / MiB, samples[-1] / MiB, max(samples) / MiB, [int(x / MiB) for x in samples]))
    assert r["reads"] > 0 and r["writes"] > 0
    assert lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    rss_flat(samples)


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_write_on_a_flush_on_b_read_on_c(ringbd, server_kind, workdir, kind):
    """Multi-conn consistency: a write acknowledged on A and a FLUSH
    acknowledged on B are visible to a read on C (NBD_FLAG_CAN_MULTI_CONN)."""
    import nbd

    p, uri = serve(ringbd, make_spec(kind, workdir), os.path.join(workdir, "nbd.sock"))
    try:
        a, b, c = nbd.NBD(), nbd.NBD(), nbd.NBD()
        for h in (a, b, c):
            h.connect_uri(uri)
            assert h.can_multi_conn()
        rng = random.Random()
        for i in range(300):
            off = rng.randrange(0, SIZE // BLOCK) * BLOCK
            data = rng.randbytes(rng.choice([BLOCK, 16 * BLOCK]))
            data = data[:min(len(data), SIZE - off)]
            a.pwrite(data, off)
            b.flush()
            assert c.pread(len(data), off) == data, "read on C missed a write on A flushed on B"
        for h in (a, b, c):
            h.shutdown()
    finally:
        stop(p)
