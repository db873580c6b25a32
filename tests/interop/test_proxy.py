"""A served NBD URI: a proxy in front of another server's export.

ringbd: `ringbd serve nbd+unix:///EXPORT?socket=UPSTREAM`; the reference
(nbdkit): `nbdkit nbd socket=UPSTREAM export=EXPORT`. The upstream is a
plain ringbd memory export (and qemu-nbd on a file, whose NBD client side
negotiates extended headers with ringbd's client). Every test checks the
data on the upstream too, not only through the proxy.
"""

import os
import subprocess
import time

import nbd
import pytest

import conftest
from helpers import MiB
from test_tls import pki, tls_uri  # noqa: F401 (pki is a fixture)

SIZE = 64 * MiB


@pytest.fixture
def upstream():
    """A ringbd memory export; tests take it before `start_server`, so the
    proxy stops first (its final flush goes upstream)."""
    srv = conftest.start("ringbd", exports={"": "memory:%d" % SIZE})
    yield srv
    srv.stop(check=False)


def connect(uri):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def test_proxy_round_trip_with_multi_conn(upstream, start_server, shm_tmp):
    proxy = start_server({"": upstream.uri()})
    src = os.path.join(shm_tmp, "src")
    with open(src, "wb") as f:
        f.write(os.urandom(40 * MiB))
        f.truncate(SIZE)
    subprocess.run(["nbdcopy", "--connections=4", src, proxy.uri()], check=True, timeout=120)
    for via, uri in (("the proxy", proxy.uri()), ("the upstream", upstream.uri())):
        back = os.path.join(shm_tmp, "back")
        subprocess.run(["nbdcopy", uri, back], check=True, timeout=120)
        with open(src, "rb") as a, open(back, "rb") as b:
            assert a.read() == b.read(), "data read back through %s differs" % via


# ringbd's io_uring engine only (no server_kind: nbdkit has no such engine)
def test_proxy_workers_run_the_client_on_their_own_threads(upstream, shm_tmp, monkeypatch):
    """With the io_uring engine and a multi-conn upstream, each ring worker
    drives a connection of its own to the upstream from its loop (no
    thread hop per request); the data is the same through the proxy and on
    the upstream."""
    monkeypatch.setenv("RINGBD_ARGS", "--engine uring --threads 2 -v")
    proxy = conftest.start("ringbd", exports={"": upstream.uri()})
    try:
        src = os.path.join(shm_tmp, "src")
        with open(src, "wb") as f:
            f.write(os.urandom(48 * MiB))
            f.truncate(SIZE)
        subprocess.run(["nbdcopy", "--connections=4", "--requests=16", src, proxy.uri()], check=True,
                       timeout=120)
        # 1 MiB writes, 8 at a time on each of 2 connections (both on one
        # worker's driver half the time): their sends to the upstream go out
        # in pieces, and the rest must be sent and the replies must arrive (a
        # driver that left the rest of a short send unsubmitted until its
        # ring's next completion stalled here).
        one = os.path.join(shm_tmp, "one")
        with open(one, "wb") as f:
            f.write(os.urandom(32 * MiB))
        subprocess.run(["nbdcopy", "--connections=2", "--requests=8", "--request-size=%d" % MiB, one,
                        proxy.uri()], check=True, timeout=60)
        with open(src, "r+b") as f:
            with open(one, "rb") as o:
                f.write(o.read())
        for via, uri in (("the proxy", proxy.uri()), ("the upstream", upstream.uri())):
            back = os.path.join(shm_tmp, "back")
            subprocess.run(["nbdcopy", "--connections=4", uri, back], check=True, timeout=120)
            with open(src, "rb") as a, open(back, "rb") as b:
                assert a.read() == b.read(), "data read back through %s differs" % via
        proxy.stop()  # before its upstream: its final flush goes there
        err = proxy.stderr()
        assert "this thread's connection is up" in err, err
        assert "failed" not in err, err
    finally:
        proxy.stop(check=False)


def test_proxy_tls_on_both_sides(start_server, pki, shm_tmp):
    """X.509 TLS from the client to the proxy and from the proxy to the
    upstream (nbds:// in the export spec)."""
    up = conftest.start("ringbd", exports={"": "memory:%d" % SIZE},
                        tls={"mode": "require", "dir": pki["server"]})
    try:
        proxy = start_server({"": tls_uri(up, pki["client"])}, tls={"mode": "require", "dir": pki["server"]})
        src = os.path.join(shm_tmp, "src")
        with open(src, "wb") as f:
            f.write(os.urandom(8 * MiB))
            f.truncate(SIZE)
        subprocess.run(["nbdcopy", src, tls_uri(proxy, pki["client"])], check=True, timeout=120)
        back = os.path.join(shm_tmp, "back")
        subprocess.run(["nbdcopy", tls_uri(up, pki["client"]), back], check=True, timeout=120)
        with open(src, "rb") as a, open(back, "rb") as b:
            assert a.read() == b.read(), "the upstream does not hold what went through the TLS proxy"
        r = subprocess.run(["nbdinfo", "nbd://127.0.0.1:%d/" % proxy.port], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0, "the proxy served a plaintext client under --tls require"
        proxy.stop()  # before its upstream: its final flush goes there
    finally:
        up.stop(check=False)


def test_proxy_commands_reach_the_upstream(upstream, start_server):
    proxy = start_server({"": upstream.uri()})
    p, u = connect(proxy.uri()), connect(upstream.uri())
    assert p.get_size() == SIZE
    assert p.can_flush() and p.can_fua() and p.can_trim() and p.can_zero()
    assert p.can_multi_conn(), "one upstream connection pool: a flush covers every client"
    data = os.urandom(1 * MiB)
    p.pwrite(data, 3 * MiB, nbd.CMD_FLAG_FUA)
    assert u.pread(len(data), 3 * MiB) == data, "a FUA write did not reach the upstream"
    p.pwrite(b"\xab" * 65536, 8 * MiB)
    p.flush()
    assert u.pread(65536, 8 * MiB) == b"\xab" * 65536
    # (libnbd's argument order: count, then offset.)
    p.zero(MiB, 3 * MiB + MiB // 2)
    assert u.pread(MiB // 2, 3 * MiB + MiB // 2) == bytes(MiB // 2), "write-zeroes did not reach the upstream"
    assert u.pread(MiB // 2, 3 * MiB) == data[:MiB // 2], "write-zeroes went past its range"
    p.pwrite(b"\xcd" * MiB, 10 * MiB)
    p.trim(MiB, 10 * MiB)
    assert u.pread(MiB, 10 * MiB) == bytes(MiB), "trimmed memory should read as zeroes upstream"
    p.shutdown()
    u.shutdown()


def test_proxy_passes_write_zeroes_flags_through(start_server, shm_tmp):
    """NO_HOLE and FAST_ZERO reach the upstream (a file export there: a
    zeroing without NO_HOLE punches a hole in the file, one with NO_HOLE
    leaves the range allocated), and fast zero is offered as the upstream
    offers it."""
    img = os.path.join(shm_tmp, "up.img")
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    up = conftest.start("ringbd", exports={"": "file:" + img})
    try:
        proxy = start_server({"": up.uri()})
        p, u = connect(proxy.uri()), connect(up.uri())
        assert u.can_fast_zero() and p.can_fast_zero(), "fast zero not offered through the proxy"
        for off in (0, 4 * MiB, 8 * MiB):
            p.pwrite(b"\x5a" * MiB, off)
        p.flush()
        p.zero(MiB, 0)
        p.zero(MiB, 4 * MiB, nbd.CMD_FLAG_NO_HOLE)
        p.zero(MiB, 8 * MiB, nbd.CMD_FLAG_FAST_ZERO)
        for off in (0, 4 * MiB, 8 * MiB):
            assert u.pread(MiB, off) == bytes(MiB), "zeroing at %d MiB did not reach the upstream" % (off // MiB)
        hole = lambda off: all(flags & 1 for _, flags in extents(u, off, MiB))  # noqa: E731
        assert hole(0), "a zeroing without NO_HOLE left the upstream's range allocated"
        assert not hole(4 * MiB), "NO_HOLE did not reach the upstream: its range was deallocated"
        p.shutdown()
        u.shutdown()
        proxy.stop()  # before its upstream: its final flush goes there
    finally:
        up.stop(check=False)


def extents(h, off, length):
    got = []

    def cb(meta, offset, entries, err):
        if meta == "base:allocation":
            got.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(length, off, cb)
    return got


def test_proxy_passes_block_status_through(upstream, start_server):
    u = connect(upstream.uri())
    u.pwrite(b"\x01" * (2 * MiB), 4 * MiB)
    proxy = start_server({"": upstream.uri()})
    p = connect(proxy.uri())
    assert p.can_meta_context("base:allocation")
    via_proxy = extents(p, 0, 16 * MiB)
    direct = extents(u, 0, 16 * MiB)
    assert via_proxy, "no extents through the proxy"
    assert via_proxy == direct, "block status through the proxy %s, upstream %s" % (via_proxy, direct)
    assert any(flags & 1 for _, flags in via_proxy), "no hole reported"
    p.shutdown()
    u.shutdown()


def test_proxy_qemu_img_against_a_qemu_nbd_upstream(start_server, shm_tmp):
    """qemu-nbd 10 upstream (extended headers with ringbd's client): qemu-img
    converts into the proxy and compares; the file behind qemu-nbd holds it."""
    img = os.path.join(shm_tmp, "up.img")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    up = conftest.start("qemu-nbd", exports={"": img})
    try:
        proxy = start_server({"": up.uri()})
        src = os.path.join(shm_tmp, "src.raw")
        with open(src, "wb") as f:
            f.write(os.urandom(8 * MiB))
            f.truncate(SIZE)
        subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, proxy.uri()],
                       check=True, timeout=120)
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, proxy.uri()],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        proxy.stop()  # before its upstream: its final flush goes there
    finally:
        up.stop(check=False)
    with open(src, "rb") as a, open(img, "rb") as b:
        assert a.read() == b.read(), "the upstream's file does not hold what was written through the proxy"


def ringbd_upstream(img, sock):
    """`ringbd serve file:IMG --unix SOCK`, ready once it printed its URI."""
    p = subprocess.Popen([conftest.ringbd_bin(), "serve", "file:" + img, "--unix", sock],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    assert line.startswith("nbd+unix://"), "the upstream printed %r" % line
    return p


def stop(p):
    p.terminate()
    p.wait(timeout=10)


@pytest.mark.ringbd_only  # ringbd's reconnect (nbdkit 1.32's nbd plugin only retries the first connect)
def test_proxy_reconnects_and_resends_unanswered_requests(start_server, shm_tmp):
    img, sock = os.path.join(shm_tmp, "up.img"), os.path.join(shm_tmp, "up.sock")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    up = ringbd_upstream(img, sock)
    try:
        proxy = start_server({"": "nbd+unix:///?socket=" + sock})
        p = connect(proxy.uri())
        before = os.urandom(MiB)
        p.pwrite(before, 0)
        p.flush()
        stop(up)  # (ringbd removes its socket)
        # Requests during the outage wait for the upstream, then complete.
        during = os.urandom(MiB)
        cookie = p.aio_pwrite(during, 2 * MiB)
        time.sleep(0.5)  # the outage itself: nothing to wait for but time
        assert not p.aio_command_completed(cookie), "a write completed with no upstream"
        up = ringbd_upstream(img, sock)
        deadline = time.monotonic() + 10
        while not p.aio_command_completed(cookie):
            assert time.monotonic() < deadline, "the write did not complete within 10 s of the upstream's return"
            p.poll(1000)
        assert p.pread(MiB, 0) == before
        assert p.pread(MiB, 2 * MiB) == during
        p.flush()
        p.shutdown()
        assert "reconnected after" in proxy.stderr(), proxy.stderr()
        proxy.stop()
    finally:
        stop(up)
    with open(img, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(MiB) == during, "the write made during the outage is not in the upstream's file"


# The window this test asks for with the URI's reconnect-delay (ringbd's
# default is 30 s: crates/ringbd-backend/src/nbd/mod.rs).
RECONNECT_WINDOW = 5


@pytest.mark.ringbd_only  # ringbd's failure behaviour (nbdkit's plugin retries differently)
def test_proxy_upstream_gone_fails_requests_after_the_window(upstream, start_server):
    uri = upstream.uri()
    proxy = start_server({"": uri + ("&" if "?" in uri else "?") + "reconnect-delay=%d" % RECONNECT_WINDOW})
    p = connect(proxy.uri())
    p.pwrite(b"x" * 4096, 0)
    upstream.stop(check=False)
    t0 = time.monotonic()
    with pytest.raises(nbd.Error) as e:
        p.pread(4096, 0)
    took = time.monotonic() - t0
    assert RECONNECT_WINDOW - 2 < took < RECONNECT_WINDOW + 10, (
        "a request failed after %.1f s without its upstream (window %d s)" % (took, RECONNECT_WINDOW))
    # Later requests fail at once while the upstream stays away.
    t0 = time.monotonic()
    with pytest.raises(nbd.Error):
        p.pread(4096, 0)
    assert time.monotonic() - t0 < 2, "a request after the window waited again"
    assert e.value.errno in (5, None) or "Input/output" in str(e.value), e.value
    assert proxy.alive(), "the proxy died with its upstream"
    assert "no upstream for %d s" % RECONNECT_WINDOW in proxy.stderr(), proxy.stderr()
    p.shutdown()
    # Its final flush cannot reach the upstream: it says so and exits 1.
    rc = proxy.stop(check=False)
    assert rc == 1, "exit status %s after a shutdown whose flush failed" % rc
    assert "could not flush every export" in proxy.stderr(), proxy.stderr()
