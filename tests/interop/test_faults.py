"""Backend faults: ringbd's `fault:` wrapper makes a chosen fraction of
backend calls fail (or sleep).  Every injected failure must reach the client
as the matching NBD error on exactly the request that hit it, no other
request may fail, and no read may ever return wrong data as success.

How "exactly that request" is checked: the server logs one line per failed
request (`export "": read of N bytes at 0x...: injected fault EIO ...`), in
the order it handled them, which on one connection is the order the client
sent them.  The test compares that sequence with the sequence of requests
that failed at the client: same length, same operation, same errno, and the
logged range inside the failed request's range (a write is written piece by
piece as its payload arrives, so the failed piece may start inside it).
"""

import errno
import os
import random
import re
import tempfile
import time

import pytest

from helpers import KiB, MiB

pytestmark = pytest.mark.ringbd_only

SIZE = 16 * MiB
SLOT = 256 * KiB          # requests of one batch use distinct slots
QD = 8                    # requests in flight per batch

# op -> (rate, errno name, errno the client must see)
RULES = {
    "read": ("0.15", "EIO", errno.EIO),
    "write": ("0.15", "ENOSPC", errno.ENOSPC),
    "flush": ("0.3", "EIO", errno.EIO),
    "trim": ("0.2", "EPERM", errno.EPERM),
    "zero": ("0.2", "EINVAL", errno.EINVAL),
}
# how each op names itself in the server's log line
LOG_OP = {"read": "read", "write": "write", "flush": "flush", "trim": "trim",
          "zero": "write zeroes"}
LINE = re.compile(r'injected fault (E[A-Z]+)')
RANGE = re.compile(r': (read|write|trim|write zeroes) of (\d+) bytes at 0x([0-9a-f]+): ')


def fault_spec(inner, seed, rules=RULES):
    parts = ["%s=%s@%s" % (op, rate, name) for op, (rate, name, _) in rules.items()]
    return "fault:%s,seed=%d:%s" % (",".join(parts), seed, inner)


def injected_lines(srv):
    """[(op, errno name, offset, length)] in the order the server logged them."""
    out = []
    for line in srv.stderr().splitlines():
        m = LINE.search(line)
        if not m or "final flush" in line:  # the flush at exit, no request's
            continue
        r = RANGE.search(line)
        if r:
            op = {v: k for k, v in LOG_OP.items()}[r.group(1)]
            out.append((op, m.group(1), int(r.group(3), 16), int(r.group(2))))
        else:
            assert ": flush: " in line, line
            out.append(("flush", m.group(1), 0, 0))
    return out


class Model:
    """What every byte of the export must read as; None = unspecified
    (after a failed write or zero, or a trim)."""

    def __init__(self, size):
        self.data = bytearray(size)
        self.known = bytearray(b"\x01" * size)

    def set(self, off, data):
        self.data[off:off + len(data)] = data
        self.known[off:off + len(data)] = b"\x01" * len(data)

    def forget(self, off, n):
        self.known[off:off + n] = bytes(n)

    def check(self, off, got):
        """A successful read must match every byte whose value is known."""
        want = self.data[off:off + len(got)]
        if got == want:
            return
        known = self.known[off:off + len(got)]
        bad = [i for i in range(len(got)) if known[i] and got[i] != want[i]]
        assert not bad, ("read at %d returned wrong data as success: first bad byte at +%d"
                         % (off, bad[0]))


def run_batches(h, model, rng, batches):
    """Pipelined random requests; returns the client's view of failures in
    request order and counts of what was tried."""
    import nbd

    failures = []
    tried = {op: 0 for op in RULES}
    verified = 0
    can_trim = h.can_trim()
    for _ in range(batches):
        slots = rng.sample(range(SIZE // SLOT), QD)
        batch = []
        for slot in slots:
            op = rng.choices(["read", "write", "flush", "trim", "zero"],
                             weights=[40, 35, 8, 8 if can_trim else 0, 9])[0]
            length = rng.choice([512, 4 * KiB, 16 * KiB, 64 * KiB, SLOT])
            off = slot * SLOT + rng.randrange(0, SLOT - length + 1, 512)
            tried[op] += 1
            if op == "read":
                buf = nbd.Buffer(length)
                cookie = h.aio_pread(buf, off)
                batch.append((cookie, op, off, length, buf))
            elif op == "write":
                data = rng.randbytes(length)
                cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)
                batch.append((cookie, op, off, length, data))
            elif op == "flush":
                cookie = h.aio_flush()
                batch.append((cookie, op, 0, 0, None))
            elif op == "trim":
                cookie = h.aio_trim(length, off)
                batch.append((cookie, op, off, length, None))
            else:
                cookie = h.aio_zero(length, off)
                batch.append((cookie, op, off, length, None))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for cookie, op, off, length, payload in batch:
            try:
                assert h.aio_command_completed(cookie)
                err = None
            except nbd.Error as e:
                err = e.errnum
            if err is not None:
                failures.append((op, err, off, length))
                if op in ("write", "zero"):
                    model.forget(off, length)
                continue
            if op == "read":
                model.check(off, bytes(payload.to_bytearray()))
                verified += length
            elif op == "write":
                model.set(off, payload)
            elif op == "zero":
                model.set(off, bytes(length))
            elif op == "trim":
                model.forget(off, length)
    return failures, tried, verified


def stop_with_failed_final_flush_allowed(srv, must_fail=False):
    """The server flushes every export at exit; an injected flush fault
    there makes it exit 1 with a clear message (it must not claim success)."""
    rc = srv.stop(check=False)
    err = srv.stderr()
    assert "panicked" not in err, err
    failed = "final flush: injected fault" in err
    assert rc == (1 if failed else 0), (rc, err)
    if failed:
        assert "could not flush every export" in err
    assert failed or not must_fail, err


def check_one_to_one(failures, logged):
    assert len(failures) == len(logged), (
        "client saw %d failed requests, server injected %d faults\nclient: %r\nserver: %r"
        % (len(failures), len(logged), failures[:20], logged[:20]))
    for (op, err, off, length), (lop, lname, loff, llen) in zip(failures, logged):
        assert op == lop, (op, lop)
        assert RULES[op][1] == lname
        assert err == RULES[op][2], "%s failed with errno %d, want %s" % (op, err, lname)
        if op != "flush":
            assert off <= loff and loff + llen <= off + length, (
                "fault at %d+%d logged for request %d+%d" % (loff, llen, off, length))


@pytest.fixture
def disk_dir():
    d = tempfile.mkdtemp(prefix="ringbd-faults-", dir="/var/tmp")
    yield d
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


@pytest.mark.parametrize("backing", ["memory", "file"])
def test_each_injected_fault_fails_exactly_its_request(start_server, nbd_handle, disk_dir, backing):
    seed = random.randrange(1 << 32)
    if backing == "memory":
        inner = "memory:%d" % SIZE
    else:
        # A file on a disk filesystem: without the wrapper its reads and
        # writes would run as ring operations, bypassing the backend.
        path = os.path.join(disk_dir, "disk.img")
        with open(path, "wb") as f:
            f.truncate(SIZE)
        inner = "file:%s" % path
    srv = start_server({"": fault_spec(inner, seed)})
    h = nbd_handle(srv.uri())
    rng = random.Random(seed)
    model = Model(SIZE)
    failures, tried, verified = run_batches(h, model, rng, batches=150)
    h.shutdown()
    stop_with_failed_final_flush_allowed(srv)
    logged = injected_lines(srv)
    print("seed %d: tried %r, failed %d, verified %d bytes" % (seed, tried, len(failures), verified))
    check_one_to_one(failures, logged)
    # The rates are high enough that every op kind was hit and most passed.
    for op in ("read", "write", "flush", "zero"):
        hit = sum(1 for f in failures if f[0] == op)
        assert 0 < hit < tried[op], "%s: %d of %d failed (seed %d)" % (op, hit, tried[op], seed)
    assert verified > 4 * MiB


def test_certain_faults_leave_data_untouched_and_other_ops_working(start_server, nbd_handle):
    import nbd

    srv = start_server({"": "fault:write=1@ENOSPC,flush=100%%:memory:%d" % SIZE})
    h = nbd_handle(srv.uri())
    for off in (0, 4096, 5 * MiB + 512):
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"\xaa" * 8192, off)
        assert e.value.errnum == errno.ENOSPC
        assert h.pread(8192, off) == bytes(8192), "a failed write changed the data"
    with pytest.raises(nbd.Error) as e:
        h.flush()
    assert e.value.errnum == errno.EIO
    # Reads and zeroes have no rule: they all succeed, and the connection
    # is still in step after the errors.
    h.zero(4096, 0)
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()
    stop_with_failed_final_flush_allowed(srv, must_fail=True)
    assert len(injected_lines(srv)) == 4


def test_delays_slow_requests_without_changing_results(start_server, nbd_handle):
    srv = start_server({"": "fault:delay-read=20ms,delay-write=10ms:memory:%d" % SIZE})
    h = nbd_handle(srv.uri())
    data = os.urandom(64 * KiB)
    t0 = time.monotonic()
    for i in range(5):
        h.pwrite(data, i * 64 * KiB)
    for i in range(5):
        assert h.pread(64 * KiB, i * 64 * KiB) == data
    elapsed = time.monotonic() - t0
    # Lower bound only: 5 reads x 20 ms + 5 writes x >= 10 ms.
    assert elapsed >= 0.15, "delays not applied: %.3f s" % elapsed
    assert "injected" not in srv.stderr()


def test_bad_fault_specs_are_clear_errors(ringbd, server_kind):
    import subprocess

    for spec, want in [
        ("fault:read=2:memory:1M", "fraction from 0 to 1"),
        ("fault:reed=0.1:memory:1M", "unknown operation"),
        ("fault:read=0.1@EWHAT:memory:1M", "not one of EIO"),
        ("fault:read=0.1", "fault:RULE[,RULE...]:SPEC"),
        ("fault:delay-read=5:memory:1M", "unit"),
    ]:
        p = subprocess.run([ringbd, "serve", spec], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=30)
        assert p.returncode != 0, spec
        assert want in p.stderr, (spec, p.stderr)
