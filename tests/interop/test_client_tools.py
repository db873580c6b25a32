"""ringbd's client tools (`ringbd info`, `ringbd copy`, `ringbd bench`)
against ringbd and nbdkit (the server_kind fixture), qemu-nbd 10 (extended
headers), nbd-server 3.24 (simple replies only) and a deliberately
corrupting server (flipserver.py).  Copies are checked with
`qemu-img compare`."""

import json
import os
import struct
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import _socket_activation_child, ringbd_bin
from helpers import MiB, random_file, run

HERE = os.path.dirname(os.path.abspath(__file__))


def ringbd(*args, check=True, timeout=120, **kw):
    return run([ringbd_bin(), *args], check=check, timeout=timeout, **kw)


def sparse_image(path, size, seed=1):
    """Random data in every other 4 MiB chunk, holes in between."""
    with open(path, "wb") as f:
        f.truncate(size)
    random_file(path + ".data", size // 2, seed=seed)
    with open(path + ".data", "rb") as src, open(path, "r+b") as dst:
        for i in range(0, size, 8 * MiB):
            dst.seek(i)
            dst.write(src.read(4 * MiB))
    os.unlink(path + ".data")
    return path


def qemu_img_compare(a, b):
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b])


def data_ranges(extents):
    """Merged (offset, end) ranges of allocated data from a --map --json list."""
    out = []
    for e in extents:
        if e["type"] & 2:  # zero
            continue
        start, end = e["offset"], e["offset"] + e["length"]
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


# --------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------

def test_info_matches_nbdinfo(server):
    ours = json.loads(ringbd("info", "--json", server.uri()).stdout)
    theirs = json.loads(run(["nbdinfo", "--json", server.uri()]).stdout)
    o, t = ours["exports"][0], theirs["exports"][0]
    assert o["export-size"] == t["export-size"] == 256 * MiB
    for key in ("is_read_only", "is_rotational", "can_flush", "can_fua", "can_trim", "can_zero",
                "can_fast_zero", "can_cache", "can_df", "can_multi_conn"):
        assert o[key] == t[key], key
    assert "base:allocation" in o["contexts"]
    for key in ("block_size_minimum", "block_size_preferred", "block_size_maximum"):
        assert o[key] == t[key], key
    text = ringbd("info", server.uri()).stdout
    assert "export-size: 268435456 (256M)" in text
    assert "protocol: newstyle-fixed without TLS" in text


def test_info_list_names_every_export(start_server):
    srv = start_server({"": "memory:16M", "b": "memory:32M"})
    ours = json.loads(ringbd("info", "--list", "--json", srv.uri()).stdout)
    sizes = {e["export-name"]: e["export-size"] for e in ours["exports"]}
    assert sizes == {"": 16 * MiB, "b": 32 * MiB}
    assert 'export="b":' in ringbd("info", "--list", srv.uri()).stdout


def test_info_map_matches_nbdinfo(server, nbd_handle):
    h = nbd_handle(server.uri())
    h.pwrite(b"\x55" * MiB, 0)
    h.pwrite(b"\xaa" * (2 * MiB), 64 * MiB)
    h.flush()
    ours = json.loads(ringbd("info", "--map", "--json", server.uri()).stdout)
    theirs = json.loads(run(["nbdinfo", "--map", "--json", server.uri()]).stdout)
    assert data_ranges(ours) == data_ranges(theirs)
    assert sum(e["length"] for e in ours) == 256 * MiB
    text = ringbd("info", "--map", server.uri()).stdout.splitlines()
    assert text[0].split()[:2] == ["0", str(MiB)] and text[0].endswith("data")


def test_bad_uris_say_what_is_wrong():
    p = ringbd("info", "nbds://alice@localhost/?tls-psk-file=/nonexistent/k.psk", check=False)
    assert p.returncode != 0 and "/nonexistent/k.psk" in p.stderr, p.stderr
    p = ringbd("info", "nbd+unix:///", check=False)
    assert p.returncode != 0 and "socket" in p.stderr
    p = ringbd("bench", "nbd://h:99999/", check=False)
    assert p.returncode != 0 and "bad port" in p.stderr


# --------------------------------------------------------------------------
# copy
# --------------------------------------------------------------------------

def test_copy_file_to_server_and_back_is_sparse(start_server, shm_tmp):
    srv = start_server({"": "memory:64M"})
    src = sparse_image(os.path.join(shm_tmp, "src.img"), 64 * MiB)
    ringbd("copy", "--connections", "4", "--flush", src, srv.uri())
    qemu_img_compare(src, srv.uri())
    # The holes of the source are zero on the server (written as
    # WRITE_ZEROES or skipped, not as data): only the data chunks are data.
    extents = json.loads(ringbd("info", "--map", "--json", srv.uri()).stdout)
    assert data_ranges(extents) == [(i, i + 4 * MiB) for i in range(0, 64 * MiB, 8 * MiB)]
    out = os.path.join(shm_tmp, "out.img")
    ringbd("copy", srv.uri(), out)
    qemu_img_compare(src, out)
    assert os.path.getsize(out) == 64 * MiB
    # A fresh destination file stays sparse.
    assert os.stat(out).st_blocks * 512 <= 40 * MiB
    # File to file: SEEK_DATA/SEEK_HOLE find the holes.
    out2 = os.path.join(shm_tmp, "out2.img")
    ringbd("copy", out, out2)
    qemu_img_compare(src, out2)
    assert os.stat(out2).st_blocks * 512 <= 40 * MiB


def test_copy_between_two_servers(start_server, shm_tmp):
    a = start_server({"": "memory:64M"})
    b = start_server({"": "memory:64M"})
    src = sparse_image(os.path.join(shm_tmp, "src.img"), 64 * MiB, seed=7)
    ringbd("copy", src, a.uri())
    ringbd("copy", "-C", "2", "-R", "16", "--request-size", "64k", "--flush", a.uri(), b.uri())
    qemu_img_compare(a.uri(), b.uri())
    qemu_img_compare(src, b.uri())


def test_copy_to_and_from_a_block_device(start_server, shm_tmp):
    """A loop device as either side of `ringbd copy`: the server's contents
    land on the block device (the ranges that are holes on the server are
    zeroed there, not left as they were) and come back identical."""
    srv = start_server({"": "memory:32M"})
    src = sparse_image(os.path.join(shm_tmp, "src.img"), 32 * MiB, seed=11)
    ringbd("copy", src, srv.uri())
    backing = os.path.join(shm_tmp, "loop.img")
    with open(backing, "wb") as f:
        f.write(b"\xee" * (32 * MiB))  # stale data the copy must overwrite
    dev = run(["losetup", "--find", "--show", backing]).stdout.strip()
    try:
        assert dev.startswith("/dev/loop"), dev
        ringbd("copy", "--flush", srv.uri(), dev)
        qemu_img_compare(src, dev)
        out = os.path.join(shm_tmp, "back.img")
        ringbd("copy", dev, out)
        qemu_img_compare(src, out)
    finally:
        run(["losetup", "--detach", dev], check=False)


def test_copy_stdin_and_stdout(server, shm_tmp):
    src = os.path.join(shm_tmp, "src.img")
    random_file(src, 8 * MiB + 12345, seed=3)
    with open(src, "rb") as f:
        ringbd("copy", "-", server.uri(), stdin=f)
    out = os.path.join(shm_tmp, "out.img")
    with open(out, "wb") as f:
        p = subprocess.run([ringbd_bin(), "copy", server.uri(), "-"], stdout=f,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(out) == 256 * MiB
    with open(src, "rb") as a, open(out, "rb") as b:
        want = a.read()
        assert b.read(len(want)) == want
        assert b.read(MiB) == b"\0" * MiB
    assert "\r" not in p.stderr, "no progress bar when stderr is not a terminal"


# --------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------

def test_bench_verify_passes_on_a_correct_server(server):
    p = ringbd("bench", server.uri(), "--rw", "randrw", "--verify", "--time", "1s",
               "--size", "16M", "--qd", "16", "--json")
    r = json.loads(p.stdout)
    res = r["results"][0]
    assert r["verify"] and res["reads"] > 100 and res["writes"] > 100
    for key in ("iops", "mib_per_s", "cpu_us_per_io"):
        assert res[key] > 0
    assert res["lat_us"]["p50"] <= res["lat_us"]["p99"] <= res["lat_us"]["p99.9"] <= res["lat_us"]["max"]


def test_bench_sweep_table_json_and_plot(server, shm_tmp):
    p = ringbd("bench", server.uri(), "--rw", "read", "--sweep-bs", "4k,64k", "--time", "300ms",
               "--qd", "4", "--conns", "1")
    lines = p.stdout.splitlines()
    assert lines[1].split()[:3] == ["bs", "IOPS", "MiB/s"]
    assert [l.split()[0] for l in lines[2:]] == ["4k", "64k"]
    png = os.path.join(shm_tmp, "sweep.png")
    p = ringbd("bench", server.uri(), "--rw", "randwrite", "--sweep-bs", "4k,16k", "--time", "200ms",
               "--json", "--plot", png)
    assert [r["bs"] for r in json.loads(p.stdout)["results"]] == [4096, 16384]
    # Drawn in-process (plotters): no Python or matplotlib involved.
    with open(png, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[8:16] == b"\x00\x00\x00\x0dIHDR"
    assert struct.unpack(">II", data[16:24]) == (800, 450)
    assert len(data) > 8000  # bars, a line and text, not a blank image


class FlipServer:
    """flipserver.py on a Unix socket; ready when it prints "ready"."""

    def __init__(self, path, size, flip_every=0, evil=None):
        argv = [sys.executable, os.path.join(HERE, "flipserver.py"), path, str(size)]
        if flip_every:
            argv += ["--flip-every", str(flip_every)]
        if evil:
            argv += ["--evil", evil]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", "flipserver did not start: %r" % line
        self.uri = "nbd+unix:///?socket=%s" % path

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.mark.parametrize("flip_every", [0, 25])
def test_bench_verify_catches_a_corrupting_server(shm_tmp, flip_every):
    srv = FlipServer(os.path.join(shm_tmp, "flip.sock"), 4 * MiB, flip_every)
    try:
        info = ringbd("info", srv.uri).stdout
        assert "using simple packets" in info
        p = ringbd("bench", srv.uri, "--rw", "randrw", "--verify", "--time", "1s", "--qd", "4",
                   check=False)
    finally:
        srv.stop()
    if flip_every:
        assert p.returncode != 0, p.stdout
        assert "data mismatch at offset 0x" in p.stderr, p.stderr
    else:
        assert p.returncode == 0, p.stderr
        assert "no mismatch" in p.stdout


@pytest.mark.parametrize("evil,messages", [
    ("magic", ["bad reply magic 0x12345678"]),
    ("cookie", ["which is not in flight"]),
    # A hang-up reads as EOF, or as a reset or broken pipe when requests
    # were still unread in the server's socket.
    ("short", ["server closed the connection", "Connection reset by peer", "Broken pipe"]),
])
def test_protocol_violations_end_the_run_cleanly(shm_tmp, evil, messages):
    """A server that breaks the protocol makes the tools fail with a message
    that names the connection, never a panic or a hang."""
    srv = FlipServer(os.path.join(shm_tmp, "evil.sock"), 4 * MiB, evil=evil)
    try:
        p = ringbd("bench", srv.uri, "--rw", "randread", "--bs", "64k", "--time", "5s", "--qd", "4",
                   check=False, timeout=60)
    finally:
        srv.stop()
    assert p.returncode == 1, p.stdout + p.stderr
    assert any(m in p.stderr for m in messages) and "(connection " in p.stderr, p.stderr
    assert "panicked" not in p.stderr


# --------------------------------------------------------------------------
# other servers: qemu-nbd 10 (extended headers), nbd-server 3.24 (simple)
# --------------------------------------------------------------------------

class Activated:
    """A server started with socket activation on a Unix socket we bound:
    connectable as soon as it is constructed."""

    def __init__(self, argv, path):
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(path)
        lst.listen(64)
        env = dict(os.environ, LISTEN_FDS="1")
        try:
            self.proc = subprocess.Popen(
                ["sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh"] + argv,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env=env, close_fds=False, preexec_fn=_socket_activation_child(lst.fileno()))
        finally:
            lst.close()
        self.path = path

    def uri(self, export=""):
        return "nbd+unix:///%s?socket=%s" % (export, self.path)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_qemu_nbd_with_extended_headers(shm_tmp):
    disk = os.path.join(shm_tmp, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    srv = Activated(["qemu-nbd", "-f", "raw", "-e", "8", "-t", disk], os.path.join(shm_tmp, "q.sock"))
    try:
        info = ringbd("info", srv.uri()).stdout
        assert "using extended packets" in info, info
        src = sparse_image(os.path.join(shm_tmp, "src.img"), 64 * MiB, seed=5)
        ringbd("copy", "-C", "4", "--flush", src, srv.uri())
        qemu_img_compare(src, srv.uri())
        out = os.path.join(shm_tmp, "out.img")
        ringbd("copy", srv.uri(), out)
        qemu_img_compare(src, out)
        ringbd("bench", srv.uri(), "--rw", "randrw", "--verify", "--time", "1s", "--size", "8M",
               "--qd", "8")
    finally:
        srv.stop()


def test_nbd_server_with_simple_replies(shm_tmp):
    """nbd-server 3.24 refuses structured replies.  It daemonizes before it
    listens and has no readiness signal, so the test waits (bounded) for
    its socket to accept a connection."""
    disk = os.path.join(shm_tmp, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(32 * MiB)
    sock, pidfile, conf = (os.path.join(shm_tmp, n) for n in ("ns.sock", "ns.pid", "ns.conf"))
    with open(conf, "w") as f:
        f.write("[generic]\nallowlist = true\nunixsock = %s\n[disk]\nexportname = %s\n" % (sock, disk))
    run(["nbd-server", "-C", conf, "-p", pidfile])
    deadline = time.monotonic() + 20
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock)
            s.close()
            break
        except OSError:
            s.close()
            assert time.monotonic() < deadline, "nbd-server never listened on %s" % sock
            time.sleep(0.05)
    uri = "nbd+unix:///disk?socket=%s" % sock
    try:
        listed = json.loads(ringbd("info", "--list", "--json", "nbd+unix:///?socket=%s" % sock).stdout)
        assert [e["export-name"] for e in listed["exports"]] == ["disk"]
        assert "using simple packets" in ringbd("info", uri).stdout
        src = os.path.join(shm_tmp, "src.img")
        random_file(src, 32 * MiB, seed=9)
        ringbd("copy", "-C", "2", src, uri)
        qemu_img_compare(src, uri)
        ringbd("bench", uri, "--rw", "randrw", "--verify", "--time", "1s", "--qd", "8")
    finally:
        with open(pidfile) as f:
            os.kill(int(f.read().strip()), signal.SIGTERM)


def test_tools_over_tcp_with_ringbd_run(shm_tmp):
    """nbd:// over TCP loopback: ringbd serve's captive mode (--run) starts
    the tools once it listens, with $uri set."""
    src = sparse_image(os.path.join(shm_tmp, "src.img"), 32 * MiB, seed=11)
    script = ('set -e; "$RB" info "$uri" | grep -q "using extended packets"; '
              '"$RB" copy -C 3 "$SRC" "$uri"; qemu-img compare -q -f raw -F raw "$SRC" "$uri"; '
              '"$RB" bench "$uri" --rw randrw --verify --time 500ms --size 8M --qd 8')
    env = dict(os.environ, RB=ringbd_bin(), SRC=src)
    p = ringbd("serve", "memory:32M", "--listen", "127.0.0.1:0", "--run", script, env=env)
    assert "no mismatch" in p.stdout, p.stdout + p.stderr
