"""`ringbd serve --metrics ADDR`: the Prometheus exposition moves as the
load says.  fio writes a known number of 4 KiB blocks through its nbd
engine while the test scrapes: the connections gauge is seen during the
run, and afterwards the write requests, bytes and latency samples grew by
at least fio's count (bytes by 4096 a write); an injected write failure
(`fault:write=1@ENOSPC`) is counted under its errno.  With the io_uring
engine its counters are there too (RINGBD_ARGS="--engine threads" runs
the same test on the threaded engine, which has none)."""

import json
import os
import re
import socket
import subprocess
import time
import urllib.request

import pytest

from helpers import MiB

pytestmark = pytest.mark.ringbd_only

FIO_SIZE = 4 * MiB
BS = 4096
WRITES = FIO_SIZE // BS   # randwrite covers each block once (fio's random map)

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    """{(name, ((label, value), ...)): value} of one scrape."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4"
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, "not a sample line: %r" % line
        labels = tuple(sorted(LABEL.findall(m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def get(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_a_fio_run_and_an_injected_error(start_server, shm_tmp):
    import nbd

    port = free_port()
    srv = start_server({"": "memory:%d" % FIO_SIZE, "bad": "fault:write=1@ENOSPC:memory:1M"},
                       args=["--metrics", "127.0.0.1:%d" % port])
    before = scrape(port)
    assert get(before, "ringbd_connections", export="") == 0
    assert get(before, "ringbd_requests_total", export="", op="write") == 0

    out = os.path.join(shm_tmp, "fio.json")
    fio = subprocess.Popen([
        "fio", "--name=metrics", "--ioengine=nbd", "--uri=" + srv.uri(),
        "--rw=randwrite", "--bs=%d" % BS, "--iodepth=8", "--size=%d" % FIO_SIZE,
        # about 1 s, so the scrapes below see the connection
        "--rate_iops=%d" % WRITES,
        "--output-format=json", "--output=" + out,
    ], cwd=shm_tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = 0
    try:
        while fio.poll() is None:
            seen = max(seen, get(scrape(port), "ringbd_connections", export=""))
            time.sleep(0.02)
    finally:
        if fio.poll() is None:
            fio.kill()
        _, err = fio.communicate(timeout=60)
    assert fio.returncode == 0, err
    assert seen >= 1, "the connections gauge never showed fio's connection"
    with open(out) as f:
        [job] = json.load(f)["jobs"]
    assert job["error"] == 0
    fio_writes = job["write"]["total_ios"]
    assert fio_writes == WRITES

    # The server may see the disconnect a moment after fio exits.
    deadline = time.monotonic() + 5
    while True:
        after = scrape(port)
        if get(after, "ringbd_connections", export="") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert get(after, "ringbd_connections", export="") == 0
    grew = lambda name, **l: get(after, name, **l) - get(before, name, **l)
    assert grew("ringbd_connections_total", export="") >= 1
    writes = grew("ringbd_requests_total", export="", op="write")
    assert writes >= fio_writes
    assert grew("ringbd_bytes_total", export="", op="write") == BS * writes
    hist = "ringbd_request_duration_seconds"
    assert grew(hist + "_count", export="", op="write") == writes
    assert get(after, hist + "_bucket", export="", op="write", le="+Inf") == writes
    assert get(after, hist + "_sum", export="", op="write") > 0
    assert not any(k[0] == "ringbd_errors_total" and ("export", "") in k[1] for k in after)

    # One write to the faulty export: ENOSPC at the client, counted under
    # ENOSPC, and no bytes.  (libnbd's Python binding names the errno.)
    h = nbd.NBD()
    h.connect_uri(srv.uri("bad"))
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * BS, 0)
    assert e.value.errno == "ENOSPC", e.value
    during = scrape(port)
    assert get(during, "ringbd_connections", export="bad") == 1
    h.shutdown()
    last = scrape(port)
    assert get(last, "ringbd_errors_total", export="bad", op="write", errno="ENOSPC") == 1
    assert get(last, "ringbd_requests_total", export="bad", op="write") == 1
    assert get(last, "ringbd_bytes_total", export="bad", op="write") == 0

    # The io_uring engine's counters, when it is the engine serving.
    if "--engine threads" not in os.environ.get("RINGBD_ARGS", ""):
        assert get(last, "ringbd_engine_replies_total") >= writes
        assert get(last, "ringbd_engine_send_calls_total") >= 1
        assert get(last, "ringbd_engine_requests_total") >= writes


def test_metrics_listener_refuses_what_it_does_not_serve(start_server):
    port = free_port()
    start_server({"": "memory:1M"}, args=["--metrics", "127.0.0.1:%d" % port])
    for path, status in (("/", 404), ("/metrics/x", 404)):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10)
        assert e.value.code == status
    # An endless header line gets 431, not a stalled listener.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)
        assert s.recv(64).startswith(b"HTTP/1.1 431")
    assert scrape(port)
