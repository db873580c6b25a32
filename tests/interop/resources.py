"""The machinery of test_resources.py's hostile-load tests: the export
layout, raw-socket attackers and well-behaved clients, reply checking,
RSS measurement, and the `serve` and `closing` fixtures (imported there).
See test_resources.py for what the tests assert and why."""

import math
import os
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time

import pytest

import conftest
import nbdraw
from helpers import KiB, MiB

SIZE = 80 * MiB
PREFILL = 64 * MiB           # [0, 64 MiB): a known pattern, read by attackers
ATTACK_WRITES_AT = 64 * MiB  # [64, 72 MiB): attackers' writes (never read)
ATTACK_WRITES_SPAN = 8 * MiB
GOOD_AT = 72 * MiB           # [72, 80 MiB): well-behaved clients, 64 KiB each
GOOD_SLOT = 64 * KiB
BLOCK = 4 * KiB
BIG = 32 * MiB               # the advertised maximum payload

# --- limits ------------------------------------------------------------------
P99_LIMIT = 0.100            # well-behaved clients' p99 during an attack
HANDSHAKE_LIMIT = 1.0        # a new connection during an attack
OP_TIMEOUT = 3.0             # a well-behaved request with no reply: failure
GOOD_OPS = 200               # per measurement (more with new connections)
INFLIGHT_RSS_LIMIT = 200 * MiB   # growth with 512 MiB of reads parked
RSS_BACK_TOLERANCE = 64 * MiB    # after the attacker has gone...
RSS_BACK_WITHIN = 10.0           # ...within this many seconds
REPLY_TIMEOUT = 2.0              # ringbd --reply-timeout in its test

REFERENCE = os.environ.get("RESOURCE_REFERENCE", "")

# nbdkit 1.32's known failures, measured (nbdkit 1.32.5), marked
# xfail(strict=True): they stay visible, and a pass is reported as a failure.
# Delete an entry to see the raw failure.
NBDKIT_KNOWN = {
    "test_receive_buffers_non_readers_default_rings":
        "nbdkit 1.32.5 aborts (SIGABRT: connections.c:402: raw_send_socket: Assertion "
        "`sock >= 0' failed) when a client disconnects while its worker threads still send "
        "replies; the attack itself (latency, handshakes, reply data) passes",
    "test_receive_buffers_non_readers_one_ring":
        "nbdkit 1.32.5 aborts (SIGABRT: connections.c:402: raw_send_socket: Assertion "
        "`sock >= 0' failed) when a client disconnects while its worker threads still send "
        "replies; the attack itself (latency, handshakes, reply data) passes",
    "test_inflight_parked_large_file_reads":
        "nbdkit 1.32 holds a 32 MiB buffer for each parked read in each of its 16 worker "
        "threads per connection: RSS +512 MiB (and, with that bound lifted, it aborts as above "
        "when the attacker disconnects with replies parked)",
}

REQ = struct.Struct(">IHHQQI")
READ, WRITE, DISC = nbdraw.CMD_READ, nbdraw.CMD_WRITE, nbdraw.CMD_DISC


# --- data --------------------------------------------------------------------

def blk(off, tag=b"R"):
    """4 KiB naming its own offset: a block sent from the wrong place shows."""
    return (tag + b"%015x" % off) * 256


_prefill = None


def prefill_data():
    global _prefill
    if _prefill is None:
        _prefill = b"".join(blk(o) for o in range(0, PREFILL, BLOCK))
    return _prefill


def prefill_expected(off, length):
    assert off + length <= PREFILL, (off, length)
    return prefill_data()[off:off + length]


def hdr(cmd, cookie, off, length, flags=0):
    return REQ.pack(nbdraw.REQUEST_MAGIC, flags, cmd, cookie, off, length)


def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for pid %d" % pid)


def mib(n):
    return "%.1f MiB" % (n / MiB)


def note(srv):
    """For failure messages (only): how the server ended, if it did or is
    about to (an abort may still be dumping core)."""
    try:
        srv.proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        return ""
    return " [the %s server is gone: exit status %r; its stderr ends: %r]" % (
        srv.kind, srv.proc.poll(), srv.stderr()[-600:])


# --- sockets -----------------------------------------------------------------

def recv_into_exact(s, view):
    got = 0
    n = len(view)
    while got < n:
        k = s.recv_into(view[got:], n - got)
        if not k:
            raise nbdraw.Closed("EOF after %d of %d bytes" % (got, n))
        got += k


def readable(s, timeout):
    p = select.poll()
    p.register(s, select.POLLIN)
    return bool(p.poll(timeout * 1000))


def hung_up(s, timeout=0.0):
    """True once the peer has closed (or shut down) its end; reads nothing."""
    p = select.poll()
    p.register(s, select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
               for _, ev in p.poll(timeout * 1000))


def connect(srv, structured=False, timeout=OP_TIMEOUT, what="client"):
    """A RawClient through the handshake; returns (client, seconds taken)."""
    t0 = time.monotonic()
    c = nbdraw.RawClient(srv.address(), timeout=timeout)
    if c.s.family == socket.AF_INET:
        c.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        c.handshake_start()
        if structured:
            (rtype, _), = c.option_expect_final(nbdraw.OPT_STRUCTURED_REPLY)
            assert rtype == nbdraw.REP_ACK, "structured replies refused: 0x%x" % rtype
            c.go()
        else:
            c.export_name()
    except socket.timeout:
        c.close()
        raise AssertionError("%s: handshake not answered within %.0f s%s" % (what, timeout, note(srv)))
    except (nbdraw.Closed, ConnectionError) as e:
        c.close()
        raise AssertionError("%s: connection closed during the handshake: %s%s" % (what, e, note(srv)))
    except BaseException:
        c.close()
        raise
    c.structured = structured
    return c, time.monotonic() - t0


class Replies:
    """Reads one connection's replies and checks each against its request.

    `expected(off, length)` gives the data a read must return. Replies are
    matched by cookie: each outstanding cookie answered once; structured
    chunks of different replies may interleave; a read's chunks must cover
    its range exactly once."""

    def __init__(self, c, expected=prefill_expected):
        self.s = c.s
        self.structured = c.structured
        self.expected = expected
        self.expect = {}      # cookie -> (cmd, off, length)
        self.partial = {}     # cookie -> (bytearray, [(start, len)])
        self.pending = bytearray()  # bytes already read off the socket
        self.answered = 0

    def add(self, cmd, cookie, off, length):
        assert cookie not in self.expect
        self.expect[cookie] = (cmd, off, length)

    def _into(self, view):
        n = min(len(self.pending), len(view))
        if n:
            view[:n] = self.pending[:n]
            del self.pending[:n]
        if n < len(view):
            recv_into_exact(self.s, view[n:])

    def _exact(self, n):
        buf = bytearray(n)
        self._into(memoryview(buf))
        return bytes(buf)

    def _check(self, cookie, off, length, data):
        want = self.expected(off, length)
        if data != want:
            for o in range(0, length, BLOCK):
                if data[o:o + BLOCK] != want[o:o + BLOCK]:
                    raise AssertionError(
                        "read (cookie %d, offset %d, %d bytes): wrong data at +%d: got %r, want %r"
                        % (cookie, off, length, o, bytes(data[o:o + 32]), want[o:o + 32]))
            raise AssertionError("read (cookie %d): wrong data" % cookie)

    def _take(self, cookie):
        assert cookie in self.expect, (
            "reply for cookie %d, which is not outstanding (unknown, or answered twice)" % cookie)
        self.answered += 1
        return self.expect.pop(cookie)

    def next(self):
        """Read up to the next complete reply; returns (cookie, cmd, length)."""
        while True:
            (magic,) = struct.unpack(">I", self._exact(4))
            if magic == nbdraw.SIMPLE_REPLY_MAGIC:
                error, cookie = struct.unpack(">IQ", self._exact(12))
                cmd, off, length = self._take(cookie)
                assert not (self.structured and cmd == READ), (
                    "simple reply to a read (cookie %d) after structured replies were negotiated" % cookie)
                assert error == 0, "request (cookie %d, cmd %d, offset %d, %d bytes) failed: error %d" % (
                    cookie, cmd, off, length, error)
                if cmd == READ:
                    data = bytearray(length)
                    self._into(memoryview(data))
                    self._check(cookie, off, length, data)
                return cookie, cmd, length
            if magic != nbdraw.STRUCTURED_REPLY_MAGIC or not self.structured:
                raise AssertionError("bad reply magic 0x%08x: the reply stream is out of step" % magic)
            flags, rtype, cookie, plen = struct.unpack(">HHQI", self._exact(16))
            assert cookie in self.expect, "chunk for cookie %d, which is not outstanding" % cookie
            cmd, off, length = self.expect[cookie]
            buf, spans = self.partial.setdefault(
                cookie, (bytearray(length) if cmd == READ else None, []))
            if rtype == nbdraw.REPLY_TYPE_OFFSET_DATA:
                assert cmd == READ and plen >= 8, (cookie, cmd, plen)
                (doff,) = struct.unpack(">Q", self._exact(8))
                n = plen - 8
                assert off <= doff and doff + n <= off + length, (
                    "data chunk [%d, +%d) outside the read [%d, +%d)" % (doff, n, off, length))
                self._into(memoryview(buf)[doff - off:doff - off + n])
                spans.append((doff - off, n))
            elif rtype == nbdraw.REPLY_TYPE_OFFSET_HOLE:
                assert cmd == READ and plen == 12, (cookie, cmd, plen)
                doff, n = struct.unpack(">QI", self._exact(12))
                assert off <= doff and doff + n <= off + length
                buf[doff - off:doff - off + n] = bytes(n)
                spans.append((doff - off, n))
            elif rtype == nbdraw.REPLY_TYPE_NONE:
                assert plen == 0, plen
            elif rtype & (1 << 15):
                payload = self._exact(plen)
                raise AssertionError("request (cookie %d, cmd %d, offset %d, %d bytes) failed: "
                                     "error chunk type %d, error %d, %r"
                                     % (cookie, cmd, off, length, rtype,
                                        struct.unpack(">I", payload[:4])[0], payload[6:]))
            else:
                raise AssertionError("unknown structured reply chunk type %d" % rtype)
            if flags & nbdraw.REPLY_FLAG_DONE:
                del self.partial[cookie]
                self._take(cookie)
                if cmd == READ:
                    at = 0
                    for start, n in sorted(spans):
                        assert start == at, "read (cookie %d): chunks leave a gap or overlap at +%d: %r" % (
                            cookie, at, sorted(spans)[:8])
                        at += n
                    assert at == length, "read (cookie %d): chunks cover %d of %d bytes" % (
                        cookie, at, length)
                    self._check(cookie, off, length, buf)
                return cookie, cmd, length


# --- clients -----------------------------------------------------------------

class Good:
    """A well-behaved client: alternately writes a 4 KiB block of its own
    slot and reads it back (verified), one request at a time, each timed."""

    def __init__(self, srv, slot, what="good client", structured=False):
        self.what = what
        self.srv = srv
        self.c, self.handshake_s = connect(srv, structured, OP_TIMEOUT, what)
        self.model = {}
        self.r = Replies(self.c, lambda off, length: self.model[off])
        self.base = GOOD_AT + slot * GOOD_SLOT
        self.slot = slot
        self.gen = 0
        self.lat = []

    def ops(self, n):
        for _ in range(n):
            off = self.base + (self.gen // 2) % (GOOD_SLOT // BLOCK) * BLOCK
            cookie = self.gen + 1
            if self.gen % 2 == 0:
                data = (b"G%03d%012x" % (self.slot, self.gen)) * 256
                msg, cmd = hdr(WRITE, cookie, off, BLOCK) + data, WRITE
                self.model[off] = data
            else:
                msg, cmd = hdr(READ, cookie, off, BLOCK), READ
            self.r.add(cmd, cookie, off, BLOCK)
            t = time.monotonic()
            try:
                self.c.s.sendall(msg)
                self.r.next()
            except socket.timeout:
                raise AssertionError(
                    "%s: request %d (%s of 4 KiB) got no reply within %.0f s (latencies so far: %s)%s"
                    % (self.what, self.gen, "write" if cmd == WRITE else "read", OP_TIMEOUT,
                       lat_summary(self.lat), note(self.srv)))
            except (nbdraw.Closed, ConnectionError) as e:
                raise AssertionError("%s: connection lost at request %d: %s%s"
                                     % (self.what, self.gen, e, note(self.srv)))
            self.lat.append(time.monotonic() - t)
            self.gen += 1

    def close(self):
        try:
            self.c.s.sendall(hdr(DISC, 0, 0, 0))
        except OSError:
            pass
        self.c.close()


def p99(lat):
    s = sorted(lat)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


def lat_summary(lat):
    if not lat:
        return "no requests"
    s = sorted(lat)
    return "%d requests, p50 %.2f ms, p99 %.2f ms, max %.2f ms" % (
        len(s), 1000 * s[len(s) // 2], 1000 * p99(s), 1000 * s[-1])


def assert_served(goods, what):
    lat = [x for g in goods for x in g.lat]
    assert len(lat) >= GOOD_OPS, (what, len(lat))
    assert p99(lat) < P99_LIMIT, "%s: well-behaved clients' p99 %.1f ms >= %.0f ms (%s)" % (
        what, 1000 * p99(lat), 1000 * P99_LIMIT, lat_summary(lat))


class Attacker:
    """A client that queues requests and sends them from a daemon thread
    (a sendall blocks once the server stops reading); `sent` counts what the
    kernel took. close() shuts the socket down first, which wakes a sender
    blocked on it."""

    def __init__(self, srv, structured=False, what="attacker", timeout=20):
        self.what = what
        self.c, _ = connect(srv, structured, timeout, what)
        self.r = Replies(self.c)
        self.cookie = 0
        self.parts = []
        self.sent = 0
        self.total = 0
        self.finished = False
        self.error = None
        self.thread = None

    def read(self, off, length):
        self.cookie += 1
        self.r.add(READ, self.cookie, off, length)
        self.parts.append(hdr(READ, self.cookie, off, length))

    def write(self, off, data):
        self.cookie += 1
        self.r.add(WRITE, self.cookie, off, len(data))
        self.parts.append(hdr(WRITE, self.cookie, off, len(data)))
        self.parts.append(data)

    def send_now(self):
        """Everything queued, in one write (small batches only)."""
        data = b"".join(self.parts)
        self.parts = []
        self.c.s.sendall(data)
        self.sent += len(data)

    def push(self):
        data = memoryview(b"".join(self.parts))
        self.parts = []
        self.total = len(data)

        def run():
            try:
                while self.sent < len(data):
                    try:
                        self.sent += self.c.s.send(data[self.sent:])
                    except socket.timeout:
                        continue
            except OSError as e:
                self.error = e
            finally:
                self.finished = True

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def drain(self, want=None, until=None):
        """Read and verify replies: `want` of them, or until `until(reply)`
        says stop, or until the stream ends. Returns (count, None) or
        (count, how the stream ended: EOF, reset, or no reply in time)."""
        n = 0
        while want is None or n < want:
            try:
                reply = self.r.next()
            except (nbdraw.Closed, ConnectionResetError) as e:
                return n, str(e)
            except socket.timeout:
                return n, "no reply within %.0f s" % self.c.s.gettimeout()
            n += 1
            if until and until(reply):
                break
        return n, None

    def close(self):
        try:
            self.c.s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.thread:
            self.thread.join(5)
        self.c.close()


def wait_attack_in_place(attackers, quiet=0.3, deadline=5.0):
    """Each attacker has a reply waiting (the server is at work on it), and
    the senders have stopped making progress (the server has taken what it
    takes) or finished."""
    for a in attackers:
        assert readable(a.c.s, 5), (
            "%s: its first request got no reply within 5 s: the server no longer hears a "
            "connection (%d attackers connected)" % (a.what, len(attackers)))
    start = since = time.monotonic()
    last = None
    while True:
        cur = [a.sent for a in attackers]
        now = time.monotonic()
        if all(a.finished for a in attackers) or now - start > deadline:
            break
        if cur != last:
            last, since = cur, now
        elif now - since >= quiet:
            break
        time.sleep(0.05)


def settle_rss(pid, quiet=0.5, deadline=5.0):
    """Peak RSS once it stops moving by more than 1 MiB for `quiet` s."""
    start = since = time.monotonic()
    cur = peak = rss(pid)
    while time.monotonic() - start < deadline:
        time.sleep(0.05)
        r = rss(pid)
        peak = max(peak, r)
        if abs(r - cur) > MiB:
            cur, since = r, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return peak


def prefill(srv):
    """Write the pattern over [0, PREFILL) (memory exports keep it in pages)."""
    c, _ = connect(srv, timeout=60, what="prefill")
    r = Replies(c)
    data = memoryview(prefill_data())
    for i, off in enumerate(range(0, PREFILL, BIG)):
        r.add(WRITE, i + 1, off, BIG)
        c.s.sendall(hdr(WRITE, i + 1, off, BIG))
        c.s.sendall(data[off:off + BIG])
        r.next()
    c.s.sendall(hdr(DISC, 0, 0, 0))
    c.close()


def still_serves(srv, slot=127):
    assert srv.alive(), "after the attack:" + note(srv)
    g = Good(srv, slot, what="client after the attack")
    g.ops(20)
    g.close()


# --- fixtures ----------------------------------------------------------------

@pytest.fixture
def serve(start_server, server_kind, shm_tmp, request):
    """serve(exports, ringbd_args=(), tcp=False) -> Server; `ringbd_args`
    only for ringbd; `tcp`: TCP loopback instead of a Unix socket.
    With RESOURCE_REFERENCE=qemu-nbd: qemu-nbd on the one export instead."""
    refs = []
    if REFERENCE:
        assert REFERENCE == "qemu-nbd", "RESOURCE_REFERENCE: only qemu-nbd is supported"
        if server_kind == "ringbd":
            pytest.skip("RESOURCE_REFERENCE runs the nbdkit-parametrized tests against %s" % REFERENCE)
    elif server_kind == "nbdkit" and request.node.originalname in NBDKIT_KNOWN:
        request.node.add_marker(pytest.mark.xfail(
            reason=NBDKIT_KNOWN[request.node.originalname], strict=True))

    def _serve(exports, ringbd_args=(), tcp=False):
        if REFERENCE:
            kind, arg = conftest.parse_spec(exports[""])
            if kind == "memory":
                path = os.path.join(shm_tmp, "qemu-nbd-%d.img" % len(refs))
                with open(path, "wb") as f:
                    f.truncate(conftest.parse_size(arg))
            else:
                assert kind == "file", kind
                path = arg
            srv = conftest.start("qemu-nbd", exports={"": path},
                                 args=["--cache=none", "--aio=io_uring"], tcp=tcp)
            refs.append(srv)
            return srv
        return start_server(exports, args=list(ringbd_args) if server_kind == "ringbd" else [], tcp=tcp)

    yield _serve
    for srv in refs:
        srv.stop()


@pytest.fixture
def closing(serve):
    """closing(obj) -> obj: closed at teardown, before the servers stop."""
    objs = []

    def _add(obj):
        objs.append(obj)
        return obj

    yield _add
    for obj in reversed(objs):
        try:
            obj.close()
        except Exception:
            pass


def memory_export():
    return {"": "memory:%d" % SIZE}
