"""Hostile load, one test per shared server resource.

Each test drives attacking raw-socket clients to the bound of one resource
the server shares between connections, and asserts three things:

(a) the bound holds: the server's RSS (VmRSS in /proc/PID/status) stays
    within a stated limit, and connections are closed where the server says
    it closes them;
(b) well-behaved clients on the same server, connected before the attack and
    connecting during it, keep being served: p99 latency under 100 ms over at
    least 200 small requests (4 KiB writes and reads of what was written,
    one at a time, each timed with time.monotonic()) issued while the attack
    is in place, and new connections finish their handshake within 1 s;
(c) the attacker itself gets what the NBD protocol says: every reply it
    reads answers one of its requests (by cookie, each once) with the right
    data, or the server closes the connection cleanly.

The resources:

* receive buffers (test_receive_buffers_*): clients that pipeline large
  reads, then 8 MiB more of requests, over TCP, and never read their
  replies. An io_uring server that receives into a shared provided-buffer
  ring must not let them take every buffer of the ring (nobody else could
  be heard); six attackers per ring, with ringbd's default rings and with
  one (--threads 1).
* in-flight requests and bytes (test_inflight_*): 16 x 32 MiB reads of a
  file export parked on one connection (server memory must not grow by the
  512 MiB asked for, and must come back after the client leaves), the file
  on tmpfs and on a disk filesystem; deep pipelines of 5,000 and 2,000 small
  reads, all answered intact.
* sends and iovecs (test_send_*): a 32 MiB read (the advertised maximum) of a
  memory export kept in 32 KiB pages needs more iovecs than IOV_MAX in one
  sendmsg; 1,000 pipelined small reads likewise.
* parked replies (test_reply_timeout_*): a connection that asks for replies
  and stops reading them; ringbd's `--reply-timeout` closes it, not an idle
  connection and not a slow but progressing reader.

Readiness: servers are socket-activated (conftest); the attack is "in place"
once the attacker's socket is readable (poll, nothing consumed: the server
has answered) and the background senders have stopped making progress (a
bounded settle loop: the server has taken what it will take). A close by
the server is seen with poll(POLLRDHUP), without reading.

Protocol note: NBD does not require replies in request order (a server
with parallel workers, as nbdkit's, may reorder them); replies are matched
by cookie.

nbdkit 1.32's known failures (NBDKIT_KNOWN below) are xfail(strict=True)
for nbdkit: it aborts when the receive-buffer attackers disconnect, and it
holds 512 MiB for the parked file reads.

Against a reference server by hand: RESOURCE_REFERENCE=qemu-nbd makes the
nbdkit-parametrized tests run against `qemu-nbd -f raw -t -e 16 --cache=none
--aio=io_uring FILE` instead (memory exports become sparse files on
/dev/shm; the test ids still say [nbdkit]; no xfail marks); run it with
INTEROP_SERVERS=nbdkit (ringbd-parametrized tests are skipped in that mode;
ringbd_only ones are deselected).
"""

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
from resources import *  # noqa: F401,F403 (the machinery, and the serve/closing fixtures)

# --- layout of the export ----------------------------------------------------
# --- receive buffers -----------------------------------------------------------

RB_READ = 16 * MiB  # over ringbd's 8 MiB of queued replies (backpressure), and
                    # under 1,024 pages: the IOV_MAX case is test_send_*'s
RB_READS = 4
ATTACKERS_PER_RING = 6
ATTACKERS_MAX = 12  # nbdkit holds a buffer per parked read (12 x 64 MiB); qemu-nbd -e 16


def receive_buffers_attack(srv, closing, attackers_n, new_conns=4):
    """`attackers_n` clients each pipeline 4 x 16 MiB reads of written data,
    then 2 MiB of 4 KiB read headers and 6 MiB of 4 KiB writes, in one
    send, over TCP, and never read a reply. A client connected before and
    new clients during the attack must be served; then each attacker reads
    (and checks) its first replies.

    Why TCP and these numbers: over a Unix socket a client gets no further
    ahead of the server than its send buffer (~208 KiB); over TCP the
    receive window lets MiBs arrive at once, and an io_uring server that
    receives with bundles from a shared buffer ring takes what has arrived
    (measured on ringbd 1a5d389: 1 to 5 MiB per attacker, by timing) and
    holds it while the connection is backpressured. Four such attackers
    emptied the 16 MiB ring of one worker here, three did not: six per ring
    leave a margin."""
    pid = srv.proc.pid
    prefill(srv)
    existing = closing(Good(srv, 0, what="client connected before the attack"))
    existing.ops(20)
    existing.lat.clear()
    rss0 = rss(pid)
    attackers = []
    for i in range(attackers_n):
        a = closing(Attacker(srv, what="attacker %d" % i))
        for j in range(RB_READS):
            a.read(j * RB_READ % PREFILL, RB_READ)
        for j in range(2 * MiB // REQ.size):
            a.read((j * BLOCK) % PREFILL, BLOCK)
        payload = b"\xa5" * BLOCK
        for j in range(6 * MiB // (REQ.size + BLOCK)):
            a.write(ATTACK_WRITES_AT + (j * BLOCK) % ATTACK_WRITES_SPAN, payload)
        attackers.append(a)
    for a in attackers:
        a.push()
    wait_attack_in_place(attackers)
    rss_attack = rss(pid)
    taken = ["%.1f" % (a.sent / MiB) for a in attackers]
    print("\n%s: %d attackers in place; MiB of their 8.0 MiB of requests out of their sockets: %s; "
          "RSS %s -> %s" % (srv.kind, attackers_n, " ".join(taken), mib(rss0), mib(rss_attack)))

    goods = [existing]
    existing.ops(GOOD_OPS)
    handshakes = []
    for k in range(new_conns):
        g = closing(Good(srv, 1 + k, what="new connection %d during the attack" % k))
        handshakes.append(g.handshake_s)
        goods.append(g)
        g.ops(GOOD_OPS // new_conns)
        g.close()
    rss_attack = max(rss_attack, rss(pid))
    print("%s: existing client %s; new connections: handshakes %s ms, %s; RSS during the attack %s"
          % (srv.kind, lat_summary(existing.lat), " ".join("%.1f" % (1000 * h) for h in handshakes),
             lat_summary([x for g in goods[1:] for x in g.lat]), mib(rss_attack)))
    assert max(handshakes) < HANDSHAKE_LIMIT, "a new connection's handshake took %.2f s" % max(handshakes)
    assert_served(goods, "%d attackers not reading" % attackers_n)
    for a in attackers:
        assert a.error is None, (
            "%s: the server closed the connection (%r after %d of %d bytes of requests) within "
            "seconds of the attack, before reading its requests" % (a.what, a.error, a.sent, a.total))

    # (c) each attacker now reads: its large replies and 256 small ones,
    # all for its own cookies with the right data (any order); then they
    # all vanish with the rest of their replies unread.
    t = time.monotonic()
    for a in attackers:
        big = [0]

        def enough(reply, big=big, a=a):
            big[0] += reply[2] == RB_READ
            return big[0] == RB_READS and a.r.answered >= RB_READS + 256

        n, closed = a.drain(until=enough)
        assert closed is None, "%s: replies stopped after %d: %s%s" % (
            a.what, n, closed, note(srv))
    print("%s: attackers' first replies checked in %.1f s" % (srv.kind, time.monotonic() - t))
    for a in attackers:
        a.close()
    existing.close()
    still_serves(srv)


def test_receive_buffers_non_readers_default_rings(serve, closing):
    """Six attackers per ring of ringbd's default count (one per CPU),
    at most 12."""
    srv = serve(memory_export(), tcp=True)
    rings = len(os.sched_getaffinity(0))
    receive_buffers_attack(srv, closing, min(ATTACKERS_MAX, ATTACKERS_PER_RING * rings))


def test_receive_buffers_non_readers_one_ring(serve, closing):
    """One io_uring ring (ringbd --threads 1): the client connected before
    the attack shares the ring (and its buffers) with six attackers."""
    srv = serve(memory_export(), ringbd_args=["--threads", "1"], tcp=True)
    receive_buffers_attack(srv, closing, ATTACKERS_PER_RING)


# --- in-flight requests and bytes -------------------------------------------------

def fs_type(path):
    """The filesystem type of the mount holding `path` (/proc/self/mounts)."""
    path = os.path.realpath(path)
    best, kind = "", None
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mnt, typ = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, typ
    return kind


@pytest.fixture
def disk_tmp():
    """A scratch directory on a disk filesystem (not tmpfs): ringbd's
    io_uring engine reads such files with ring operations into buffers of
    its own, where tmpfs files are read inline."""
    for cand in ("/var/tmp", os.path.join(conftest.REPO_ROOT, "target"), conftest.REPO_ROOT):
        if os.path.isdir(cand) and fs_type(cand) not in (None, "tmpfs", "ramfs"):
            d = tempfile.mkdtemp(prefix="interop-resources-", dir=cand)
            yield d
            shutil.rmtree(d, ignore_errors=True)
            return
    raise AssertionError("no disk filesystem for a scratch file (/var/tmp and the repository are tmpfs)")


def sockets(pid):
    """Sockets the server process has open."""
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            n += os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:")
        except OSError:
            pass
    return n


@pytest.mark.parametrize("replies", ["structured", "simple"])
@pytest.mark.parametrize("where", ["tmpfs", "disk"])
def test_inflight_parked_large_file_reads(serve, closing, request, where, replies):
    """16 x 32 MiB reads of a file export in one write, never read: the
    server must not hold 512 MiB of read buffers for them (growth below
    200 MiB), must keep serving, and must give the memory and the socket
    back once the attacker disconnects with 14 replies still unread. The
    file on tmpfs (/dev/shm) and on a disk filesystem (the page cache holds
    it either way); structured replies (a read may go in chunks) and simple
    ones (one header, then all the data)."""
    d = request.getfixturevalue("shm_tmp" if where == "tmpfs" else "disk_tmp")
    path = os.path.join(d, "inflight.img")
    with open(path, "wb") as f:
        f.write(prefill_data())
        f.truncate(SIZE)
    srv = serve({"": "file:%s" % path})
    pid = srv.proc.pid
    good = closing(Good(srv, 0, what="well-behaved client beside the parked reads"))
    good.ops(20)
    good.lat.clear()
    rss0 = rss(pid)
    socks0 = sockets(pid)
    a = closing(Attacker(srv, structured=replies == "structured", what="parked 16 x 32 MiB reads"))
    for j in range(16):
        a.read((j % 2) * BIG, BIG)
    a.send_now()
    assert readable(a.c.s, 15), "no reply began within 15 s"
    peak = settle_rss(pid)
    good.ops(GOOD_OPS)
    peak = max(peak, rss(pid))
    print("\n%s: RSS idle %s, with 16 x 32 MiB reads parked %s (+%s); %s"
          % (srv.kind, mib(rss0), mib(peak), mib(peak - rss0), lat_summary(good.lat)))
    assert peak - rss0 < INFLIGHT_RSS_LIMIT, (
        "RSS grew by %s (from %s to %s) with 16 x 32 MiB reads parked on one connection"
        % (mib(peak - rss0), mib(rss0), mib(peak)))
    assert_served([good], "16 x 32 MiB reads parked")

    # (c) the attacker's first two replies are intact; then it vanishes.
    n, closed = a.drain(want=2)
    assert closed is None and n == 2, "attacker: %d replies, then %s%s" % (n, closed, note(srv))
    a.close()
    deadline = time.monotonic() + RSS_BACK_WITHIN
    while True:
        if not srv.alive():
            raise AssertionError("after the attacker left:" + note(srv))
        now_rss = rss(pid)
        if now_rss <= rss0 + RSS_BACK_TOLERANCE or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    print("%s: RSS after the attacker left: %s" % (srv.kind, mib(now_rss)))
    assert now_rss <= rss0 + RSS_BACK_TOLERANCE, (
        "RSS %s %.0f s after the attacker left (idle %s)" % (mib(now_rss), RSS_BACK_WITHIN, mib(rss0)))
    while sockets(pid) > socks0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sockets(pid) == socks0, (
        "the server still has %d sockets open %.0f s after the attacker left (%d before it came)"
        % (sockets(pid), RSS_BACK_WITHIN, socks0))
    good.close()
    still_serves(srv)


def pipelined_reads(a, n, stride=BLOCK):
    for i in range(n):
        a.read((i * stride) % PREFILL, BLOCK)


def test_inflight_deep_pipeline_5000_reads(serve, closing):
    """5,000 pipelined 4 KiB reads of written data in one write; the client
    then reads all 5,000 replies: each cookie once, each with its data."""
    srv = serve(memory_export())
    prefill(srv)
    a = closing(Attacker(srv, what="5,000 pipelined reads"))
    pipelined_reads(a, 5000)
    a.push()  # one write, from a thread: the server may stop reading meanwhile
    n, closed = a.drain(want=5000)
    assert closed is None, "replies stopped after %d of 5,000: %s%s" % (n, closed, note(srv))
    assert n == 5000 and not a.r.expect
    a.thread.join(10)
    assert a.sent == a.total and a.error is None, (a.sent, a.total, a.error)


def test_inflight_pipeline_reader_pauses_2s(serve, closing):
    """2,000 pipelined 4 KiB reads (structured replies); the client reads
    nothing for 2 s, then reads everything: all 2,000 arrive intact."""
    srv = serve(memory_export())
    prefill(srv)
    a = closing(Attacker(srv, structured=True, what="2,000 pipelined reads, paused reader"))
    pipelined_reads(a, 2000, stride=3 * BLOCK)
    a.push()
    time.sleep(2)  # the scenario: a reader that stops for 2 s
    n, closed = a.drain(want=2000)
    assert closed is None, "replies stopped after %d of 2,000: %s%s" % (n, closed, note(srv))
    assert n == 2000 and not a.r.expect


# --- sends and iovecs ------------------------------------------------------------------

@pytest.mark.parametrize("replies", ["simple", "structured"])
def test_send_read_of_maximum_size(serve, closing, replies):
    """A READ of exactly 32 MiB (the advertised maximum) of written data, at
    a page boundary and 16 KiB past one: a memory export keeps 32 KiB pages,
    so the reply spans 1,024 or 1,025 of them (more iovecs than IOV_MAX with
    the header). Both must arrive complete and correct."""
    srv = serve(memory_export())
    prefill(srv)
    a = closing(Attacker(srv, structured=replies == "structured", what="32 MiB reader"))
    for off in (0, 16 * KiB):
        a.read(off, BIG)
        a.send_now()
        n, closed = a.drain(want=1)
        assert closed is None, "the 32 MiB read at offset %d (%s replies): no complete reply: %s%s" % (
            off, replies, closed, note(srv))
    a.close()
    still_serves(srv)


@pytest.mark.parametrize("replies", ["simple", "structured"])
def test_send_pipelined_1000_small_reads(serve, closing, replies):
    """1,000 pipelined 4 KiB reads of written data, each in its own 32 KiB
    page, in one write: every reply arrives, correct."""
    srv = serve(memory_export())
    prefill(srv)
    a = closing(Attacker(srv, structured=replies == "structured", what="1,000 pipelined reads"))
    for i in range(1000):
        a.read(i * 32 * KiB + (i % 8) * BLOCK, BLOCK)
    a.push()
    n, closed = a.drain(want=1000)
    assert closed is None, "replies stopped after %d of 1,000 (%s): %s%s" % (
        n, replies, closed, note(srv))
    assert n == 1000 and not a.r.expect
    a.close()
    still_serves(srv)


# --- parked replies: reply timeout --------------------------------------------------------

def park_reads(a, n=64):
    for j in range(n):
        a.read((j * MiB) % PREFILL, MiB)
    a.send_now()


class SlowReader(threading.Thread):
    """Reads up to 256 KiB every 500 ms (enough to empty a Unix socket's
    buffer, so the server can make progress each time) until stopped."""

    def __init__(self, a):
        super().__init__(daemon=True)
        self.a = a
        self.stop_event = threading.Event()
        self.got = bytearray()
        self.eof = None

    def run(self):
        s = self.a.c.s
        while not self.stop_event.wait(0.5):
            try:
                chunk = s.recv(256 * KiB)
            except OSError as e:
                self.eof = repr(e)
                return
            if not chunk:
                self.eof = "EOF"
                return
            self.got += chunk

    def finish(self):
        self.stop_event.set()
        self.join(5)
        self.a.r.pending += self.got


@pytest.mark.ringbd_only  # ringbd's --reply-timeout; nbdkit: see the next test
def test_reply_timeout_closes_parked_reader_not_idle_or_slow(serve, closing):
    """ringbd --reply-timeout 2s: a connection with 64 MiB of replies asked
    for and unread, making no send progress, is closed after ~2 s (and
    "reply-timeout" is logged); an idle connection with nothing queued and a
    slow reader that takes a little every 500 ms stay open and are served."""
    srv = serve(memory_export(), ringbd_args=["--reply-timeout", "%ds" % REPLY_TIMEOUT])
    prefill(srv)
    good = closing(Good(srv, 0, what="well-behaved client beside the parked reads"))
    good.ops(10)
    good.lat.clear()
    idle, _ = connect(srv, what="idle connection")
    closing(idle)
    t_idle = time.monotonic()
    slow = closing(Attacker(srv, what="slow reader"))
    park_reads(slow)
    parked = closing(Attacker(srv, what="parked reader"))
    park_reads(parked)
    t0 = time.monotonic()
    assert readable(parked.c.s, 10), "no reply began within 10 s"
    reader = SlowReader(slow)
    reader.start()
    good.ops(GOOD_OPS)
    closed = hung_up(parked.c.s, max(0.0, t0 + 8 - time.monotonic()))
    t_closed = time.monotonic() - t0
    log_seen = False
    deadline = time.monotonic() + 2
    while closed and time.monotonic() < deadline:
        if "reply-timeout" in srv.stderr():
            log_seen = True
            break
        time.sleep(0.05)
    print("\nparked reader closed: %s after %.2f s; stderr line: %s; good client %s"
          % (closed, t_closed, log_seen, lat_summary(good.lat)))
    assert closed, "the parked reader was not closed within 8 s (--reply-timeout %ds)" % REPLY_TIMEOUT
    assert REPLY_TIMEOUT - 0.2 <= t_closed <= 6.0, "parked reader closed after %.2f s" % t_closed
    assert log_seen, "no 'reply-timeout' line on stderr:\n" + srv.stderr()
    assert_served([good], "a parked reader under --reply-timeout")
    n, how = parked.drain(want=64)
    assert how is not None and n < 64, "the parked reader got all %d replies, no close" % n

    # The idle connection has been idle for longer than the timeout.
    left = t_idle + REPLY_TIMEOUT + 1.5 - time.monotonic()
    if left > 0:
        time.sleep(left)  # the scenario: idle for longer than the timeout
    assert not hung_up(idle.s), "the idle connection (nothing queued) was closed"
    r = Replies(idle)
    r.add(READ, 1, 5 * MiB, BLOCK)
    idle.s.sendall(hdr(READ, 1, 5 * MiB, BLOCK))
    r.next()

    reader.finish()
    assert reader.eof is None, "the slow reader was closed: %s" % reader.eof
    assert len(reader.got) > 0
    slow.c.s.settimeout(20)
    n, how = slow.drain(want=64)
    assert how is None and n == 64, "slow reader: %d of 64 replies, then %s" % (n, how)
    for x in (good, slow, parked):
        x.close()
    still_serves(srv)


def test_reply_timeout_parked_reads_beside_good_client(serve, closing):
    """Any server (nbdkit 1.32 has no reply timeout): a client that asks for
    64 x 1 MiB and reads nothing must not stall a well-behaved client or a
    new connection; afterwards it gets all its replies (or a clean close)."""
    srv = serve(memory_export())
    prefill(srv)
    good = closing(Good(srv, 0, what="well-behaved client beside the parked reads"))
    good.ops(10)
    good.lat.clear()
    parked = closing(Attacker(srv, what="parked reader"))
    park_reads(parked)
    t0 = time.monotonic()
    assert readable(parked.c.s, 10), "no reply began within 10 s"
    good.ops(GOOD_OPS)
    new = closing(Good(srv, 1, what="new connection beside the parked reads"))
    new.ops(50)
    open_after = not hung_up(parked.c.s)
    print("\n%s: parked reader still open after %.1f s: %s; good %s; new connection handshake "
          "%.1f ms, %s" % (srv.kind, time.monotonic() - t0, open_after, lat_summary(good.lat),
                           1000 * new.handshake_s, lat_summary(new.lat)))
    assert new.handshake_s < HANDSHAKE_LIMIT, "new connection's handshake took %.2f s" % new.handshake_s
    assert_served([good, new], "a parked reader")
    n, how = parked.drain(want=64)
    assert n == 64 or (how is not None and not open_after), (
        "parked reader: %d of 64 replies, then %s" % (n, how))
    for x in (good, new, parked):
        x.close()
    still_serves(srv)
