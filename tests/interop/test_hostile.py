"""Hostile clients: a battery of raw-socket clients that break the protocol
in every way we could think of, run against one server while a
well-behaved libnbd client does verified I/O on the same server.

Afterwards the server must be alive and serving, its open file descriptors
back to where they started (exactly: tolerance 0 after the connections have
been seen to close) and its RSS back near its start: at most 48 MiB above it
after the first round (allocator caches and the buffer pools that a burst of
1,000 connections and 4 x 8 MiB of unread replies leave behind), and flat from
round to round (no round more than RSS_ROUND_TOLERANCE above the highest
earlier one: a leak per connection, 1,366 of them a round, would climb round
after round).
RINGBD_HOSTILE_ROUNDS sets the number of rounds (default 3).

Each case also checks what the protocol says must happen (an error reply, a
close, no reply after DISC...), so the battery is a test, not just a load.
"""

import os
import random
import re
import socket
import struct
import threading
import time

import pytest

import nbdraw
from nbdraw import RawClient
from helpers import KiB, MiB, server_still_serves

pytestmark = pytest.mark.ringbd_only

SIZE = 64 * MiB
GOOD_REGION = 8 * MiB       # the well-behaved client owns [0, 8 MiB)
HOSTILE_AT = 32 * MiB       # hostile writes land here, away from it
RSS_TOLERANCE = 48 * MiB
FD_SETTLE_S = 15            # deadline for the server to close dropped sockets
ABANDONED = 1000
STALLED = 50
NON_READERS = 4
BACKPRESSURE_RSS_LIMIT = 256 * MiB  # far below the 1 GiB of replies asked for
ROUNDS = int(os.environ.get("RINGBD_HOSTILE_ROUNDS", "3"))
# Round to round: glibc keeps freed memory in per-thread arenas and caches up
# to 40 MiB of freed thread stacks (the threaded engine runs each connection
# on its own thread), so RSS fills up over the first rounds and then wanders
# without climbing (6 rounds: 42, 51, 51, 62, 50, 52 MiB; a CI run: 39, 65,
# 72). A leak shows as a new high every round: each round may exceed the
# highest earlier one by at most this much.
RSS_ROUND_TOLERANCE = 24 * MiB


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for pid %d" % pid)


def wait_fds(pid, limit):
    """The server closes a dropped client's socket when it notices the EOF;
    there is no signal for that, so poll (bounded) until it has."""
    deadline = time.monotonic() + FD_SETTLE_S
    while True:
        n = fd_count(pid)
        if n <= limit or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


class GoodClient(threading.Thread):
    """Random writes and verified reads in its own region until stopped."""

    def __init__(self, uri, seed):
        super().__init__(daemon=True)
        import nbd
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.rng = random.Random(seed)
        self.model = bytearray(GOOD_REGION)
        self.ops = 0
        self.verified = 0
        self.error = None
        self.stop_event = threading.Event()

    def fill(self):
        """Write the whole region once (so the baseline RSS includes it)."""
        for off in range(0, GOOD_REGION, MiB):
            data = self.rng.randbytes(MiB)
            self.h.pwrite(data, off)
            self.model[off:off + MiB] = data

    def run(self):
        try:
            while not self.stop_event.is_set():
                n = self.rng.choice([4 * KiB, 64 * KiB, 256 * KiB])
                off = self.rng.randrange(0, GOOD_REGION - n + 1, 4 * KiB)
                if self.rng.random() < 0.5:
                    data = self.rng.randbytes(n)
                    self.h.pwrite(data, off)
                    self.model[off:off + n] = data
                else:
                    got = self.h.pread(n, off)
                    assert got == self.model[off:off + n], "good client read wrong data at %d" % off
                    self.verified += n
                self.ops += 1
        except BaseException as e:  # reported by the test
            self.error = e

    def finish(self):
        """Stops the I/O loop; the connection stays open (see `close`)."""
        self.stop_event.set()
        self.join(60)
        assert not self.is_alive(), "good client hung"
        if self.error:
            raise self.error


def raw(srv):
    return RawClient(srv.sock)


def blast(c, data):
    """Sends hostile bytes, then closes our side; the server may hang up
    first (that is one right answer), so a broken pipe is fine."""
    try:
        c.send(data)
        c.s.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass


def eof_soon(c):
    """The server closes the connection (after whatever it still sends)."""
    assert c.wait_eof()
    c.close()


def transmission(srv, extended=False, export=b""):
    c = raw(srv)
    c.handshake_start()
    if extended:
        (rtype, _), = c.option_expect_final(nbdraw.OPT_EXTENDED_HEADERS)
        assert rtype == nbdraw.REP_ACK
    else:
        (rtype, _), = c.option_expect_final(nbdraw.OPT_STRUCTURED_REPLY)
        assert rtype == nbdraw.REP_ACK
    c.go(export)
    return c


def read_reply_error(c, extended=False):
    """One complete reply to a request that must fail: its NBD error."""
    if extended:
        chunk = c.read_ext_reply()
    else:
        magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", c.recv_exact(20))
        assert magic == nbdraw.STRUCTURED_REPLY_MAGIC, hex(magic)
        chunk = dict(flags=flags, type=rtype, payload=c.recv_exact(length))
    assert chunk["type"] == nbdraw.REPLY_TYPE_ERROR, chunk
    assert chunk["flags"] & nbdraw.REPLY_FLAG_DONE
    return struct.unpack(">I", chunk["payload"][:4])[0]


def still_in_sync(c, extended=False):
    """A valid read after the abuse gets its data: the stream is in step."""
    send = c.ext_request if extended else c.request
    cookie = send(nbdraw.CMD_READ, HOSTILE_AT, 4096)
    if extended:
        chunks = c.read_ext_reply_chunks()
    else:
        chunks = []
        while True:
            magic, flags, rtype, ck, length = struct.unpack(">IHHQI", c.recv_exact(20))
            assert magic == nbdraw.STRUCTURED_REPLY_MAGIC
            chunks.append(dict(flags=flags, type=rtype, cookie=ck, payload=c.recv_exact(length)))
            if flags & nbdraw.REPLY_FLAG_DONE:
                break
    assert all(ch["cookie"] == cookie for ch in chunks)
    assert all(ch["type"] in (nbdraw.REPLY_TYPE_OFFSET_DATA, nbdraw.REPLY_TYPE_OFFSET_HOLE,
                              nbdraw.REPLY_TYPE_NONE) for ch in chunks), chunks


# --- the cases: each returns how many inputs it tried ----------------------

def case_malformed_magic(srv):
    c = raw(srv)
    c.read_greeting()
    c.send(struct.pack(">I", 0xFFFFFFFF))            # unknown client flags
    eof_soon(c)
    c = raw(srv)
    c.handshake_start()
    c.send(b"NOTMAGIC" + struct.pack(">II", 7, 0))    # bad option magic
    eof_soon(c)
    c = transmission(srv)
    c.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))  # bad request magic
    eof_soon(c)
    c = transmission(srv, extended=True)
    c.request(nbdraw.CMD_READ, 0, 512)                 # compact header after extended,
    c.send(bytes(4))                                   # padded to the 32 bytes expected
    eof_soon(c)
    return 4


def case_truncated_handshakes(srv):
    tried = 0
    prefixes = [b"", b"\x00", b"\x00\x00\x00",
                struct.pack(">I", 3) + b"IHAVE",
                struct.pack(">I", 3) + struct.pack(">QII", nbdraw.IHAVEOPT, nbdraw.OPT_GO, 100) + b"x" * 10,
                struct.pack(">I", 3) + struct.pack(">QII", nbdraw.IHAVEOPT, nbdraw.OPT_GO, 0xFFFFFFFF)]
    for p in prefixes:
        c = raw(srv)
        c.read_greeting()
        blast(c, p)
        eof_soon(c)
        tried += 1
    return tried


def case_random_bytes(srv, rng):
    tried = 0
    for i in range(40):
        c = raw(srv)
        c.read_greeting()
        if i % 2:
            c.send_client_flags()
            c.send(struct.pack(">QII", nbdraw.IHAVEOPT, rng.randrange(1 << 32), 64) + rng.randbytes(64))
        blast(c, rng.randbytes(rng.choice([1, 17, 4096, 65536])))
        eof_soon(c)
        tried += 1
    for i in range(40):
        c = transmission(srv, extended=bool(i % 2))
        blast(c, rng.randbytes(rng.choice([28, 32, 4096, 256 * KiB])))
        eof_soon(c)
        tried += 1
    # Random headers with a valid magic: any type, flags, offset, length.
    for i in range(200):
        ext = bool(i % 2)
        c = transmission(srv, extended=ext)
        send = c.ext_request if ext else c.request
        length = rng.choice([0, 1, 512, rng.randrange(1 << 32)])
        typ = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, rng.randrange(1 << 16)])
        try:
            send(typ, offset=rng.choice([0, rng.randrange(1 << 64), (1 << 64) - 1]),
                 length=length, flags=rng.randrange(1 << 16),
                 payload=rng.randbytes(min(length, 1024)))
        except (BrokenPipeError, ConnectionResetError):
            pass
        blast(c, b"")
        eof_soon(c)
        tried += 1
    return tried


def case_lengths_over_maximum(srv):
    c = transmission(srv)
    c.request(nbdraw.CMD_READ, HOSTILE_AT, 64 * MiB)           # read over the maximum
    assert read_reply_error(c) == nbdraw.EINVAL
    still_in_sync(c)
    c.request(nbdraw.CMD_WRITE, HOSTILE_AT, 0xFFFFFFFF)        # 4 GiB payload: refused, closed
    assert read_reply_error(c) == nbdraw.EINVAL
    eof_soon(c)
    c = transmission(srv, extended=True)
    c.ext_request(nbdraw.CMD_WRITE, HOSTILE_AT, 1 << 63)       # 8 EiB payload
    assert read_reply_error(c, extended=True) == nbdraw.EINVAL
    eof_soon(c)
    c = transmission(srv, extended=True)
    c.ext_request(nbdraw.CMD_READ, HOSTILE_AT, (1 << 64) - 1)
    assert read_reply_error(c, extended=True) == nbdraw.EINVAL
    still_in_sync(c, extended=True)
    c.close()
    return 4


def case_offsets_overflowing(srv):
    top = (1 << 64) - 512
    c = transmission(srv)
    c.request(nbdraw.CMD_READ, top, 1024)
    assert read_reply_error(c) == nbdraw.EINVAL
    c.request(nbdraw.CMD_WRITE, top, 1024, payload=b"\xee" * 1024)  # payload discarded
    assert read_reply_error(c) == 28  # ENOSPC
    c.request(4, top, 1024)                                           # TRIM
    assert read_reply_error(c) == nbdraw.EINVAL
    c.request(6, (1 << 64) - 1, 0xFFFFFFFF)                           # WRITE_ZEROES
    assert read_reply_error(c) == 28
    still_in_sync(c)
    c.close()
    c = transmission(srv, extended=True)
    c.ext_request(nbdraw.CMD_READ, top, 1 << 62)
    assert read_reply_error(c, extended=True) == nbdraw.EINVAL
    still_in_sync(c, extended=True)
    c.close()
    return 5


def case_unknown_commands_and_flags(srv):
    c = transmission(srv)
    tried = 0
    for typ in (8, 9, 100, 0x7FFF, 0xFFFF):
        c.request(typ, HOSTILE_AT, 512)
        assert read_reply_error(c) == nbdraw.EINVAL
        tried += 1
    for flag in (1 << 6, 1 << 7, 1 << 15, 0xFFFF):
        c.request(nbdraw.CMD_READ, HOSTILE_AT, 512, flags=flag)
        assert read_reply_error(c) == nbdraw.EINVAL
        tried += 1
    still_in_sync(c)
    c.close()
    return tried


def case_requests_after_disc(srv):
    c = transmission(srv)
    c.send(struct.pack(">IHHQQI", nbdraw.REQUEST_MAGIC, 0, nbdraw.CMD_DISC, 1, 0, 0)
           + struct.pack(">IHHQQI", nbdraw.REQUEST_MAGIC, 0, nbdraw.CMD_READ, 2, 0, 4096)
           + struct.pack(">IHHQQI", nbdraw.REQUEST_MAGIC, 0, nbdraw.CMD_WRITE, 3, HOSTILE_AT, 4096)
           + b"\xdd" * 4096)
    # No reply to anything after DISC: the next thing is EOF.
    rest = b""
    try:
        while True:
            chunk = c.s.recv(65536)
            if not chunk:
                break
            rest += chunk
    except ConnectionResetError:
        pass
    assert rest == b"", "server answered requests sent after NBD_CMD_DISC: %r" % rest[:64]
    c.close()
    return 1


def case_disconnect_mid_write(srv):
    for size in (4096, MiB, 32 * MiB):
        c = transmission(srv)
        c.request(nbdraw.CMD_WRITE, HOSTILE_AT, size, payload=b"\xcc" * (size // 3))
        c.close()
    return 3


def open_abandoned(srv, n, rng):
    """n connections at once, each left at a random point, then dropped."""
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A blocking connect waits for room in the listen backlog (with a
        # timeout set, a Unix connect fails with EAGAIN instead).
        s.connect(srv.sock)
        s.settimeout(10)
        k = i % 4
        if k >= 1:
            s.sendall(struct.pack(">I", 3))
        if k >= 2:
            s.sendall(struct.pack(">QII", nbdraw.IHAVEOPT, nbdraw.OPT_GO, 6) + b"\x00\x00")
        socks.append(s)
    for s in socks:
        if rng.random() < 0.5:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        s.close()
    return n


def battery_round(srv, rng, tried):
    """Every case once; counts go into `tried`."""
    def count(name, n):
        tried[name] = tried.get(name, 0) + n

    # Clients that stall mid-handshake, and clients that never read their
    # replies, stay connected for the whole round.
    stalled = []
    for _ in range(STALLED):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.sock)
        s.sendall(b"\x00\x00")
        stalled.append(s)
    non_readers = []
    for _ in range(NON_READERS):
        # A file export on tmpfs: its reads are copied into buffers, so
        # without backpressure the queued replies would be real memory.
        c = transmission(srv, export=b"copy")
        c.s.setblocking(False)
        hdrs = b"".join(struct.pack(">IHHQQI", nbdraw.REQUEST_MAGIC, 0, nbdraw.CMD_READ, i,
                                    (i % 8) * MiB, MiB) for i in range(256))
        try:
            c.s.send(hdrs)  # as much as the socket takes; never read
        except BlockingIOError:
            pass
        non_readers.append(c)
    count("stalled mid-handshake", STALLED)
    count("never read replies", NON_READERS)
    count("malformed magic", case_malformed_magic(srv))
    count("truncated handshakes", case_truncated_handshakes(srv))
    count("random bytes", case_random_bytes(srv, rng))
    count("lengths over maximum", case_lengths_over_maximum(srv))
    count("offsets overflowing u64", case_offsets_overflowing(srv))
    count("unknown commands and flags", case_unknown_commands_and_flags(srv))
    count("requests after DISC", case_requests_after_disc(srv))
    count("disconnect mid write payload", case_disconnect_mid_write(srv))
    count("opened and abandoned", open_abandoned(srv, ABANDONED, rng))
    server_still_serves(srv)
    # Backpressure: the non-readers asked for 4 x 256 MiB of replies; the
    # server queues at most OUT_HIGH_WATER (8 MiB) per connection.
    peak = rss(srv.proc.pid)
    tried["peak RSS with non-readers (MiB)"] = max(tried.get("peak RSS with non-readers (MiB)", 0),
                                                  peak // MiB)
    assert peak < BACKPRESSURE_RSS_LIMIT, "RSS %d MiB with non-reading clients" % (peak // MiB)
    for s in stalled:
        s.close()
    for c in non_readers:
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()


def test_hostile_clients_do_not_hurt_the_server_or_a_good_client(start_server, shm_tmp):
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    copy = os.path.join(shm_tmp, "copy.img")
    with open(copy, "wb") as f:
        f.write(os.urandom(8 * MiB))
    srv = start_server({"": "memory:%d" % SIZE, "copy": "file:%s" % copy})
    pid = srv.proc.pid
    good = GoodClient(srv.uri(), seed)
    good.fill()
    # Warm up once so that lazily built state (buffer pools, rings) counts
    # in the baseline.
    eof_soon_after = transmission(srv)
    still_in_sync(eof_soon_after)
    eof_soon_after.close()
    case_disconnect_mid_write(srv)
    fds0 = wait_fds(pid, fd_count(pid))
    server_still_serves(srv)
    fds0 = wait_fds(pid, fds0)
    rss0 = rss(pid)

    good.start()
    tried = {}
    rss_rounds = []
    for _ in range(ROUNDS):
        ops_before = good.ops
        battery_round(srv, rng, tried)
        # The good client made progress while all that ran, with the
        # stalled and non-reading clients still connected.
        assert good.ops > ops_before, "the good client made no progress during the battery"
        assert srv.alive()
        fds1 = wait_fds(pid, fds0)
        assert fds1 <= fds0, "open fds did not come back: %d at start, %d after" % (fds0, fds1)
        rss_rounds.append(rss(pid))
    good.finish()
    good.h.shutdown()
    server_still_serves(srv)
    # A fresh well-behaved client still gets verified I/O.
    after = GoodClient(srv.uri(), seed + 1)
    after.fill()
    for off in range(0, GOOD_REGION, MiB):
        assert after.h.pread(MiB, off) == after.model[off:off + MiB]
    after.h.shutdown()
    peak = tried.pop("peak RSS with non-readers (MiB)")
    total = sum(tried.values())
    print("hostile battery (seed %d, %d rounds): %d hostile connections/inputs %r; good client "
          "%d ops, %d bytes verified; fds %d at start and after each round; RSS %.1f MiB at "
          "start, after each round %s MiB, peak with the non-readers connected %d MiB"
          % (seed, ROUNDS, total, tried, good.ops, good.verified, fds0, rss0 / MiB,
             ["%.1f" % (r / MiB) for r in rss_rounds], peak))
    assert rss_rounds[0] <= rss0 + RSS_TOLERANCE, "RSS grew from %.1f to %.1f MiB" % (
        rss0 / MiB, rss_rounds[0] / MiB)
    # No climb from round to round: a per-connection leak would set a new
    # high every round.
    for i in range(1, len(rss_rounds)):
        assert rss_rounds[i] <= max(rss_rounds[:i]) + RSS_ROUND_TOLERANCE, "RSS climbs: %r" % rss_rounds
    assert "panicked" not in srv.stderr()


def test_tcp_clients_vanishing_mid_zero_copy_send(ringbd, server_kind):
    """Over TCP the io_uring engine sends large reads with SENDMSG_ZC, whose
    buffers (the export's own pages) stay pinned until the kernel's
    notification: clients that ask for many 1 MiB reads and reset the
    connection at once must not leak descriptors, pages or the server."""
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from conftest import ringbd_extra_args
    p = subprocess.Popen([ringbd, "serve", *ringbd_extra_args(), "--listen", "127.0.0.1:%d" % port,
                          "memory:%d" % (16 * MiB)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "nbd://127.0.0.1:%d" % port  # ready
        import nbd
        h = nbd.NBD()
        h.connect_uri("nbd://127.0.0.1:%d" % port)
        data = os.urandom(16 * MiB)
        h.pwrite(data, 0)
        fds0, rss0 = fd_count(p.pid), rss(p.pid)
        for rnd in range(10):
            socks = []
            for _ in range(20):
                c = RawClient.__new__(RawClient)
                c.s = socket.create_connection(("127.0.0.1", port), timeout=10)
                c.cookie = 0
                c.handshake_start()
                c.option_expect_final(nbdraw.OPT_STRUCTURED_REPLY)
                c.go()
                c.send(b"".join(struct.pack(">IHHQQI", nbdraw.REQUEST_MAGIC, 0, nbdraw.CMD_READ, i,
                                            (i % 16) * MiB, MiB) for i in range(64)))
                if rnd % 2:
                    c.recv_exact(4096)  # take a little of a reply first
                socks.append(c.s)
            for s in socks:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            # The good client's data is intact after every round.
            assert h.pread(MiB, (rnd % 16) * MiB) == data[(rnd % 16) * MiB:(rnd % 16 + 1) * MiB]
        fds1 = wait_fds(p.pid, fds0)
        rss1 = rss(p.pid)
        h.shutdown()
        print("TCP zero-copy abandonment: 200 connections x 64 MiB asked; fds %d -> %d; "
              "RSS %.1f -> %.1f MiB" % (fds0, fds1, rss0 / MiB, rss1 / MiB))
        assert fds1 <= fds0
        assert rss1 <= rss0 + RSS_TOLERANCE
        assert p.poll() is None
    finally:
        p.terminate()
        rc = p.wait(30)
        err = p.stderr.read()
    assert rc == 0 and "panicked" not in err, (rc, err)
    m = re.search(r"zero-copy sends (\d+)", err)
    if m:  # the io_uring engine's counters: the path under test was taken
        print("zero-copy sends:", m.group(1))
        assert int(m.group(1)) > 0, err
