"""Ceph RBD exports (`rbd:POOL/IMAGE[@SNAPSHOT]`, docs/rbd.md) against a real
single-node cluster that this module starts (tests/ceph/cluster.sh: one mon,
one mgr, one memstore OSD on loopback, auth none) and stops at the end.

The data-path tests run against ringbd and, in the reference run (when
nbdkit is selected: nbdkit has no rbd plugin), against qemu-nbd 10 serving
the same image through qemu's own rbd driver (qemu-block-extra of the same
version, unpacked privately by tests/ceph/qemu-rbd.sh: qemu-utils stays as
it is). Start-up errors, the exclusive lock and the OSD failure are ringbd's
own behaviour (ringbd_only).

The cephx tests use a second cluster (CEPH_AUTH=cephx, fixture ceph_cephx),
started by the first of them and stopped at the end of the module; they are
ringbd's own (ringbd_only): serving as a restricted client named with
--ceph-id, and the refusals (a wrong or missing key, an unknown client,
missing caps) failing at once with a message that says so.

The OSD test stops and restarts the OSD: it runs last in this module. It
also checks that block status waiting on the cluster (an image without the
object map) does not hold up other exports served from the same ring.
"""

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from conftest import REPO_ROOT, ringbd_bin, ringbd_extra_args, selected_kinds, start
from helpers import MiB, STATE_HOLE, STATE_ZERO, files_equal, nbdinfo_json, pattern, run

CLUSTER = os.path.join(REPO_ROOT, "tests", "ceph", "cluster.sh")
QEMU_RBD = os.path.join(REPO_ROOT, "tests", "ceph", "qemu-rbd.sh")
POOL = "rbd"
# Bound on every cluster operation of the servers under test; the failure
# tests check that requests end within it (plus slack).
OP_TIMEOUT_S = 5

_names = itertools.count()


def pytest_generate_tests(metafunc):
    if "rbd_kind" in metafunc.fixturenames:
        kinds = ["ringbd"]
        # qemu-nbd is the reference where nbdkit (which cannot serve rbd) is.
        if "nbdkit" in selected_kinds(metafunc.config):
            kinds.append("qemu-nbd")
        metafunc.parametrize("rbd_kind", kinds)


class Ceph:
    """The running test cluster."""

    def __init__(self, workdir):
        self.dir = workdir
        self.conf = os.path.join(workdir, "ceph.conf")

    def rbd(self, *args, check=True, timeout=60):
        return run(["rbd", "-c", self.conf, *args], check=check, timeout=timeout)

    def image(self, size, features=None):
        """A fresh image of `size` (e.g. "64M"), with rbd's default features
        or `features` (e.g. "layering"); returns POOL/NAME."""
        name = "%s/t%d-%d" % (POOL, os.getpid(), next(_names))
        self.rbd("create", "--size", size, *(["--image-feature", features] if features else []), name)
        return name

    def stop_osd(self):
        run([CLUSTER, "stop-osd", self.dir], timeout=60)

    def start_osd(self):
        run([CLUSTER, "start-osd", self.dir], timeout=200)


@pytest.fixture(scope="module")
def ceph():
    d = tempfile.mkdtemp(prefix="ringbd-ceph-")
    try:
        run([CLUSTER, "start", d], timeout=240)
        yield Ceph(d)
    finally:
        run([CLUSTER, "stop", d], check=False, timeout=60)
        shutil.rmtree(d, ignore_errors=True)


class CephCephx(Ceph):
    """The cephx cluster: cluster.sh's clients (ringbd, ringbd-ro,
    ringbd-nopool; see there) with keyrings DIR/ceph.client.NAME.keyring,
    which the conf's [client] keyring names. The rbd CLI runs as admin."""

    def __init__(self, workdir, keyrings):
        super().__init__(workdir)
        self.keyrings = keyrings  # "ringbd-ro" -> path

    def mon_session_names(self):
        """Entity names of the monitor's client sessions (its admin socket)."""
        asok = os.path.join(self.dir, "run", "mon.a.asok")
        out = run(["ceph", "--admin-daemon", asok, "sessions"], timeout=30).stdout
        return [s["entity_name"] for s in json.loads(out)]


@pytest.fixture(scope="module")
def ceph_cephx():
    d = tempfile.mkdtemp(prefix="ringbd-ceph-cephx-")
    try:
        out = run([CLUSTER, "start", d], timeout=240, env=dict(os.environ, CEPH_AUTH="cephx")).stdout
        keyrings = {}
        for line in out.splitlines():
            key, _, path = line.partition("=")
            if key.startswith("CEPH_KEYRING_"):
                keyrings[key[len("CEPH_KEYRING_"):].lower().replace("_", "-")] = path
        assert set(keyrings) == {"admin", "ringbd", "ringbd-ro", "ringbd-nopool"}, out
        yield CephCephx(d, keyrings)
    finally:
        run([CLUSTER, "stop", d], check=False, timeout=60)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def qemu_modules():
    """QEMU_MODULE_DIR holding block-rbd.so for the installed qemu (lazy)."""
    got = []

    def _get():
        if not got:
            cache = os.path.join(REPO_ROOT, "target", "rbd-cache", "qemu")
            got.append(run([QEMU_RBD, cache], timeout=600).stdout.strip())
        return got[0]
    return _get


def allocation_collector(entries):
    """A libnbd block-status callback appending base:allocation's
    (length, flags) pairs to `entries`."""
    import nbd

    def cb(metacontext, offset, e, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            entries.extend(e)
        return 0
    return cb


def stop_all(servers):
    """Stops servers newest first; fails with every server's complaint."""
    errors = []
    for srv in reversed(servers):
        try:
            srv.stop()
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)


@pytest.fixture
def serve_rbd(ceph, qemu_modules):
    """Factory: serve_rbd(kind, "POOL/IMAGE[@SNAP]", read_only=False) -> Server;
    for ringbd, `more` names further exports and `args` adds options."""
    servers = []

    def _serve(kind, image, read_only=False, more=None, args=()):
        if kind == "ringbd":
            exports = {"": "rbd:" + image, **(more or {})}
            srv = start("ringbd", exports, read_only=read_only,
                        args=["--ceph-conf", ceph.conf, "--ceph-timeout", "%ds" % OP_TIMEOUT_S, *args])
        else:
            fname = "rbd:%s:conf=%s" % (image, ceph.conf)
            srv = start("qemu-nbd", {"": fname}, read_only=read_only,
                        env={"QEMU_MODULE_DIR": qemu_modules()})
        servers.append(srv)
        return srv

    yield _serve
    stop_all(servers)


@pytest.fixture
def rbd_handle(serve_rbd):
    """Factory for libnbd handles, shut down before the servers stop
    (like conftest's nbd_handle, without its per-server_kind parametrization)."""
    import nbd
    handles = []

    def _connect(uri, strict=True):
        h = nbd.NBD()
        if not strict:
            h.set_strict_mode(0)
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(uri)
        handles.append(h)
        return h

    yield _connect
    for h in handles:
        try:
            h.shutdown()
        except Exception:
            pass


def test_rbd_qemu_img_round_trip(rbd_kind, serve_rbd, ceph, random_image_64m, shm_tmp):
    image = ceph.image("64M")
    srv = serve_rbd(rbd_kind, image)
    uri = srv.uri()
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", random_image_64m, uri], timeout=120)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", random_image_64m, uri], timeout=120)
    # The bytes really are in the cluster: read them back with the rbd CLI.
    back = os.path.join(shm_tmp, "exported.img")
    ceph.rbd("export", image, back, timeout=120)
    assert files_equal(random_image_64m, back)


def test_rbd_nbdcopy_multi_conn(rbd_kind, serve_rbd, ceph, random_image_64m, shm_tmp):
    srv = serve_rbd(rbd_kind, ceph.image("64M"))
    info = nbdinfo_json(srv.uri())
    [exp] = info["exports"]
    if rbd_kind == "ringbd":
        # One shared image handle: a flush on any connection covers all.
        assert exp["can_multi_conn"] is True
        assert exp["block_size_preferred"] == 4 * MiB  # the object size
        assert "Ceph RBD image rbd:" in exp.get("description", "")
    # nbdcopy uses several connections when multi-conn is advertised.
    run(["nbdcopy", "--flush", random_image_64m, srv.uri()], timeout=120)
    out = os.path.join(shm_tmp, "copy.img")
    run(["nbdcopy", srv.uri(), out], timeout=120)
    assert files_equal(random_image_64m, out)


def test_rbd_fio_randwrite_verify(rbd_kind, serve_rbd, ceph, shm_tmp):
    job = 16 * MiB
    srv = serve_rbd(rbd_kind, ceph.image("32M"))
    run([
        "fio", "--name=rbd", "--ioengine=nbd", "--uri=" + srv.uri(),
        "--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=2",
        "--size=%d" % job, "--offset_increment=%d" % job,
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=1024",
        "--verify_state_save=0", "--group_reporting",
    ], timeout=180, cwd=shm_tmp)


def test_rbd_block_status_of_a_sparse_image(rbd_kind, serve_rbd, ceph, rbd_handle):
    srv = serve_rbd(rbd_kind, ceph.image("64M"))
    h = rbd_handle(srv.uri())
    h.pwrite(pattern("rbd", MiB), 20 * MiB)
    h.flush()
    entries = []
    cb = allocation_collector(entries)

    ext, off = [], 0
    while off < 64 * MiB:
        entries.clear()
        h.block_status(64 * MiB - off, off, cb)
        for i in range(0, len(entries), 2):
            ext.append((off, entries[i], entries[i + 1]))
            off += entries[i]
    flags = {o: f for o, _, f in ext}
    at = lambda x: next(f for o, n, f in ext if o <= x < o + n)  # noqa: E731
    assert at(0) & STATE_HOLE, ext
    assert at(40 * MiB) & STATE_HOLE, ext
    assert not at(20 * MiB) & STATE_HOLE, ext
    assert flags, ext
    # nbdinfo --map agrees (whole 4 MiB objects: data from 20 MiB to 24 MiB).
    text = run(["nbdinfo", "--map", srv.uri()]).stdout
    rows = [line.split() for line in text.splitlines() if line.strip()]
    data = [(int(r[0]), int(r[1])) for r in rows if "data" in r[3:]]
    assert any(o <= 20 * MiB < o + n for o, n in data), text
    assert sum(n for _, n in data) <= 8 * MiB, text


def test_rbd_snapshot_is_read_only(rbd_kind, serve_rbd, ceph, rbd_handle):
    import nbd
    image = ceph.image("16M")
    data = pattern("snap", MiB)
    srv = serve_rbd(rbd_kind, image)
    h = rbd_handle(srv.uri())
    h.pwrite(data, 0)
    h.flush()
    h.shutdown()
    srv.stop()
    ceph.rbd("snap", "create", image + "@s1")
    # ringbd: the snapshot alone makes the export read-only; qemu-nbd: -r.
    snap = serve_rbd(rbd_kind, image + "@s1", read_only=(rbd_kind == "qemu-nbd"))
    [exp] = nbdinfo_json(snap.uri())["exports"]
    assert exp["is_read_only"] is True
    h = rbd_handle(snap.uri(), strict=False)
    assert h.pread(MiB, 0) == data
    with pytest.raises(nbd.Error) as ei:
        h.pwrite(b"x" * 4096, 0)
    # (qemu-nbd answers writes to a read-only export with EINVAL.)
    assert ei.value.errno == ("EPERM" if rbd_kind == "ringbd" else "EINVAL"), ei.value
    assert h.pread(4096, 0) == data[:4096]


@pytest.mark.ringbd_only
def test_rbd_start_up_errors_are_clear_and_bounded(server_kind, ceph, shm_tmp):
    image = ceph.image("4M")

    def serve(spec, conf=ceph.conf, timeout="3s"):
        t0 = time.monotonic()
        p = run([ringbd_bin(), "serve", *ringbd_extra_args(), "--unix", os.path.join(shm_tmp, "x.sock"),
                 "--ceph-conf", conf, "--ceph-timeout", timeout, spec], check=False, timeout=60)
        assert p.returncode != 0, p
        assert "panicked" not in p.stderr
        return p.stderr, time.monotonic() - t0

    err, _ = serve("rbd:nopool/x")
    assert 'opening pool "nopool"' in err and "No such file" in err, err
    err, _ = serve("rbd:%s/missing" % POOL)
    assert "no such image" in err, err
    err, _ = serve("rbd:%s@nosnap" % image)
    assert "no such image or snapshot" in err, err
    # A cluster that is not there: a monitor address nothing listens on.
    down = os.path.join(shm_tmp, "down.conf")
    with open(ceph.conf) as f, open(down, "w") as g:
        g.write("".join("mon host = [v2:127.0.0.1:9]\n" if line.startswith("mon host") else line
                        for line in f))
    err, took = serve("rbd:" + image, conf=down)
    assert "no monitor answered (within 3s)" in err, err
    assert took < 30, took


@pytest.mark.ringbd_only
def test_rbd_attach_opens_images_through_the_shared_backend(server_kind, ceph, shm_tmp):
    """`ringbd attach rbd:...` opens the image with the same backend code and
    --ceph-* options as `ringbd serve`: the same errors for a missing pool
    or image, and an existing image opens before the ublk step (which this
    host's kernel lacks: then attach fails there, naming ublk_drv)."""
    image = ceph.image("4M")

    def attach(spec):
        return run([ringbd_bin(), "attach", "--ceph-conf", ceph.conf, "--ceph-timeout", "3s", "--queues", "1",
                    spec], check=False, timeout=60)

    p = attach("rbd:nopool/x")
    assert p.returncode != 0 and 'opening pool "nopool"' in p.stderr, p
    p = attach("rbd:%s/missing" % POOL)
    assert p.returncode != 0 and "no such image" in p.stderr, p
    if os.path.exists("/dev/ublk-control"):
        # A kernel with the driver (and root): the device appears; detach it.
        proc = subprocess.Popen([ringbd_bin(), "attach", "--ceph-conf", ceph.conf, "--queues", "1", "rbd:" + image],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            dev = proc.stdout.readline().strip()
            assert dev.startswith("/dev/ublkb"), (dev, proc.stderr.read() if proc.poll() is not None else "")
            run([ringbd_bin(), "detach", dev], timeout=60)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    else:
        p = attach("rbd:" + image)
        assert p.returncode != 0 and "ublk_drv not loaded" in p.stderr, p
        assert "opening" not in p.stderr and "no such image" not in p.stderr, p.stderr


@pytest.mark.ringbd_only
def test_rbd_exclusive_lock_keeps_a_second_writer_out(server_kind, serve_rbd, ceph, rbd_handle, shm_tmp):
    image = ceph.image("16M")
    srv = serve_rbd("ringbd", image)
    assert "exclusive lock held" in nbdinfo_json(srv.uri())["exports"][0]["description"]
    # A second ringbd serving it writable refuses to start ...
    p = run([ringbd_bin(), "serve", *ringbd_extra_args(), "--unix", os.path.join(shm_tmp, "y.sock"),
             "--ceph-conf", ceph.conf, "--ceph-timeout", "5s", "rbd:" + image], check=False, timeout=60)
    assert p.returncode != 0 and "exclusive lock" in p.stderr, p
    # ... another librbd writer gets EROFS instead of interleaving writes ...
    p = ceph.rbd("bench", "--io-type", "write", "--io-total", "1M", image, check=False)
    assert p.returncode != 0 and "Read-only file system" in (p.stdout + p.stderr), p
    # ... and ours keep working.
    h = rbd_handle(srv.uri())
    h.pwrite(b"a" * 4096, 0)
    h.flush()
    assert h.pread(4096, 0) == b"a" * 4096
    # Read-only access (a snapshot, or --read-only) needs no lock.
    ro = serve_rbd("ringbd", image, read_only=True)
    assert nbdinfo_json(ro.uri())["exports"][0]["is_read_only"] is True


@pytest.fixture
def serve_cephx(ceph_cephx):
    """Factory: serve_cephx(CLIENT_ID, "POOL/IMAGE", read_only=False) -> ringbd
    serving it as client.CLIENT_ID with the cephx cluster's conf (whose
    keyring = DIR/ceph.$name.keyring finds the client's key)."""
    servers = []

    def _serve(client_id, image, read_only=False):
        srv = start("ringbd", {"": "rbd:" + image}, read_only=read_only,
                    args=["--ceph-conf", ceph_cephx.conf, "--ceph-id", client_id,
                          "--ceph-timeout", "%ds" % OP_TIMEOUT_S])
        servers.append(srv)
        return srv

    yield _serve
    stop_all(servers)


def refused(ceph, spec, client_id, shm_tmp, read_only=False, env=None, timeout_s=20):
    """`ringbd serve` as client_id that must fail to start: (stderr, seconds)."""
    t0 = time.monotonic()
    p = run([ringbd_bin(), "serve", *ringbd_extra_args(), "--unix", os.path.join(shm_tmp, "r.sock"),
             "--ceph-conf", ceph.conf, "--ceph-id", client_id, "--ceph-timeout", "%ds" % timeout_s,
             *(["--read-only"] if read_only else []), spec],
            check=False, timeout=3 * timeout_s, env=dict(os.environ, **(env or {})))
    took = time.monotonic() - t0
    assert p.returncode != 0, p
    assert "panicked" not in p.stderr, p.stderr
    return p.stderr, took


@pytest.mark.ringbd_only
def test_rbd_cephx_restricted_client_round_trip(server_kind, serve_cephx, ceph_cephx, random_image_64m, shm_tmp):
    image = ceph_cephx.image("64M")  # created by client.admin
    srv = serve_cephx("ringbd", image)
    # The monitor sees ringbd's session as client.ringbd (not admin).
    assert "client.ringbd" in ceph_cephx.mon_session_names()
    uri = srv.uri()
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", random_image_64m, uri], timeout=120)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", random_image_64m, uri], timeout=120)
    srv.stop()  # closes the image (flushes librbd's cache) and lets the lock go
    back = os.path.join(shm_tmp, "exported.img")
    ceph_cephx.rbd("export", image, back, timeout=120)
    assert files_equal(random_image_64m, back)


@pytest.mark.ringbd_only
def test_rbd_cephx_refused_keys_fail_at_once(server_kind, ceph_cephx, shm_tmp):
    image = ceph_cephx.image("4M")
    # A key that is not client.ringbd's, named with CEPH_ARGS (which wins
    # over the conf's keyring, where the right key is).
    wrong = os.path.join(shm_tmp, "wrong.keyring")
    run(["ceph-authtool", "--create-keyring", wrong, "--gen-key", "-n", "client.ringbd"])
    err, took = refused(ceph_cephx, "rbd:" + image, "ringbd", shm_tmp, env={"CEPH_ARGS": "--keyring " + wrong})
    assert "rados_connect: Permission denied" in err and "the cluster refused client.ringbd" in err, err
    assert took < 10, took  # refused, not timed out (--ceph-timeout 20s)
    # A client the cluster does not know, with a key of its own.
    stranger = os.path.join(shm_tmp, "stranger.keyring")
    run(["ceph-authtool", "--create-keyring", stranger, "--gen-key", "-n", "client.stranger"])
    err, took = refused(ceph_cephx, "rbd:" + image, "stranger", shm_tmp,
                        env={"CEPH_ARGS": "--keyring " + stranger})
    assert "rados_connect: Permission denied" in err and "the cluster refused client.stranger" in err, err
    assert took < 10, took
    # No keyring at all for the client (none where the conf's keyring points).
    err, took = refused(ceph_cephx, "rbd:" + image, "nobody", shm_tmp)
    assert "no keyring found for client.nobody" in err, err
    assert took < 10, took


@pytest.mark.ringbd_only
def test_rbd_cephx_caps_decide_what_a_client_may_serve(server_kind, serve_cephx, ceph_cephx, shm_tmp):
    image = ceph_cephx.image("4M")
    data = os.path.join(shm_tmp, "data.img")
    with open(data, "wb") as f:
        f.write(pattern("cephx", 4 * MiB))
    srv = serve_cephx("ringbd", image)
    run(["nbdcopy", "--flush", data, srv.uri()], timeout=60)
    srv.stop()  # lets the exclusive lock go
    # No caps on the pool: the OSD refuses, read-write and read-only alike.
    for ro, mode in ((False, "read-write"), (True, "read-only")):
        err, took = refused(ceph_cephx, "rbd:" + image, "ringbd-nopool", shm_tmp, read_only=ro)
        assert "rbd_open: Operation not permitted" in err, err
        assert "client.ringbd-nopool's caps do not allow opening it %s" % mode in err, err
        assert took < 10, took
    # Read-only caps: not writable ...
    err, took = refused(ceph_cephx, "rbd:" + image, "ringbd-ro", shm_tmp)
    assert "rbd_open: Operation not permitted" in err, err
    assert "client.ringbd-ro's caps do not allow opening it read-write" in err, err
    assert took < 10, took
    # ... but enough to serve it --read-only.
    ro = serve_cephx("ringbd-ro", image, read_only=True)
    assert nbdinfo_json(ro.uri())["exports"][0]["is_read_only"] is True
    out = os.path.join(shm_tmp, "back.img")
    run(["nbdcopy", ro.uri(), out], timeout=60)
    assert files_equal(data, out)


@pytest.mark.ringbd_only
def test_rbd_cache_writes_back_and_a_clean_stop_keeps_unflushed_writes(server_kind, ceph, shm_tmp):
    """ringbd turns librbd's rbd_cache_writethrough_until_flush off (docs/rbd.md):
    the client's admin socket shows it, and writes the client never flushed
    are on the cluster after the server's SIGTERM (it flushes and closes)."""
    import nbd
    image = ceph.image("16M")
    name = "wb%d-%d" % (os.getpid(), next(_names))  # its own admin socket
    srv = start("ringbd", {"": "rbd:" + image},
                args=["--ceph-conf", ceph.conf, "--ceph-id", name, "--ceph-timeout", "%ds" % OP_TIMEOUT_S])
    data = pattern("unflushed", 2 * MiB)
    try:
        asok = os.path.join(ceph.dir, "run", "client.%s.asok" % name)
        out = run(["ceph", "--admin-daemon", asok, "config", "get", "rbd_cache_writethrough_until_flush"],
                  timeout=30).stdout
        assert json.loads(out) == {"rbd_cache_writethrough_until_flush": "false"}, out
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        h.pwrite(data, 3 * MiB)  # acknowledged, never flushed
        h.shutdown()
    finally:
        srv.stop()
    exported = os.path.join(shm_tmp, "exported")
    ceph.rbd("export", image, exported)
    with open(exported, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(2 * MiB) == data


@pytest.mark.ringbd_only
def test_rbd_osd_down_fails_requests_in_bounded_time_then_recovers(server_kind, serve_rbd, ceph, rbd_handle):
    import nbd
    image = ceph.image("16M")
    # Without the object map (features: layering only), librbd answers
    # block status by asking the OSDs about each object. Served from the same
    # ring (--threads 1) as a memory export.
    plain = ceph.image("16M", features="layering")
    srv = serve_rbd("ringbd", image, more={"plain": "rbd:" + plain, "mem": "memory:1M"},
                    args=["--threads", "1"])
    h = rbd_handle(srv.uri())
    hp = rbd_handle(srv.uri("plain"))
    hm = rbd_handle(srv.uri("mem"))
    before = pattern("before", 4 * MiB)
    h.pwrite(before, 0)
    h.flush()
    hp.pwrite(b"p" * 4096, 0)
    hp.flush()
    entries = []
    cb = allocation_collector(entries)

    hp.block_status(16 * MiB, 0, cb)
    assert entries == [4 * MiB, 0, 12 * MiB, STATE_HOLE | STATE_ZERO], entries
    ceph.stop_osd()
    try:
        # With the only OSD down, a write and its flush cannot be durable:
        # the flush must fail within the operation timeout, not hang.
        t0 = time.monotonic()
        with pytest.raises(nbd.Error) as ei:
            h.pwrite(b"w" * 65536, 8 * MiB)
            h.flush()
        took = time.monotonic() - t0
        assert ei.value.errno == "EIO", ei.value
        assert took < 6 * OP_TIMEOUT_S, took
        # Reads end in bounded time too: an error, or (from librbd's cache)
        # the right bytes, never garbage.
        t0 = time.monotonic()
        try:
            assert h.pread(4096, 4 * MiB - 4096) == before[-4096:]
        except nbd.Error as e:
            assert e.errno == "EIO", e
        assert time.monotonic() - t0 < 6 * OP_TIMEOUT_S
        # Block status of the plain image now waits for the OSD; it runs
        # off the ring worker, so the memory export on the same ring answers
        # meanwhile, and the query itself fails within the timeout.
        entries.clear()
        cookie = hp.aio_block_status(16 * MiB, 0, cb)
        t0 = time.monotonic()
        hm.pwrite(b"m" * 4096, 0)
        assert hm.pread(4096, 0) == b"m" * 4096
        took = time.monotonic() - t0
        assert took < OP_TIMEOUT_S / 2, "the memory export waited %.1fs behind block status" % took
        hp.poll(0)
        assert hp.aio_in_flight() == 1, "block status answered while the OSD is down?"
        with pytest.raises(nbd.Error) as ei:
            while not hp.aio_command_completed(cookie):
                hp.poll(-1)
        assert ei.value.errno == "EIO", ei.value
        assert time.monotonic() - t0 < 6 * OP_TIMEOUT_S
        assert srv.alive()
    finally:
        ceph.start_osd()
    # Back: the same connection works again, old data intact, new data lands.
    deadline = time.monotonic() + 60
    while True:
        try:
            h.pwrite(b"n" * 4096, 12 * MiB)
            h.flush()
            break
        except nbd.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert h.pread(4 * MiB, 0) == before
    assert h.pread(4096, 12 * MiB) == b"n" * 4096
    entries.clear()
    hp.block_status(16 * MiB, 0, cb)
    assert entries == [4 * MiB, 0, 12 * MiB, STATE_HOLE | STATE_ZERO], entries
    p = subprocess.run(["nbdinfo", "--size", srv.uri()], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
