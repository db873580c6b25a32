#!/usr/bin/env python3
"""Opens N connections to an NBD server on a Unix socket, has each send the
most it can have in flight (a deep pipeline of reads it never reads the
replies of), and reports the server's RSS: before, at its peak while the
connections hold their load, and after they close. Used by bench/memory.sh.

Usage: hold.py SOCKET SERVER_PID N small|large [SECONDS]
  small: each connection pipelines 4 KiB reads (2 MiB of request headers,
         75,000 reads: far more than any queue takes)
  large: each connection pipelines 64 reads of 32 MiB (the largest the
         server advertises)
"""
import os
import socket
import struct
import sys
import time

MAGIC_REQ = 0x25609513


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    greeting = b""
    while len(greeting) < 18:
        b = s.recv(18 - len(greeting))
        if not b:
            raise RuntimeError("server closed during the greeting")
        greeting += b
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    # NBD_OPT_EXPORT_NAME "" -> size (8) + flags (2), no zeroes
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, 0))
    got = b""
    while len(got) < 10:
        b = s.recv(10 - len(got))
        if not b:
            raise RuntimeError("server closed during the handshake")
        got += b
    s.setblocking(False)
    return s


def main():
    path, pid, n, kind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    hold = float(sys.argv[5]) if len(sys.argv) > 5 else 8.0
    if kind == "small":
        load = b"".join(struct.pack(">IHHQQI", MAGIC_REQ, 0, 0, i, (i % 16384) * 4096, 4096)
                        for i in range(75000))
    else:
        load = b"".join(struct.pack(">IHHQQI", MAGIC_REQ, 0, 0, i, (i % 4) << 25, 32 << 20)
                        for i in range(64))
    before = rss_kib(pid)
    conns = [connect(path) for _ in range(n)]
    pending = {c: memoryview(load) for c in conns}
    peak = before
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        for c, rest in list(pending.items()):
            try:
                sent = c.send(rest)
            except BlockingIOError:
                continue
            if sent == len(rest):
                del pending[c]
            else:
                pending[c] = rest[sent:]
        peak = max(peak, rss_kib(pid))
        time.sleep(0.05)
    for c in conns:
        c.close()
    after = before
    for _ in range(40):
        time.sleep(0.25)
        after = rss_kib(pid)
    print("%d connections, %s load: server RSS %d MiB before, peak %d MiB while held "
          "(%.0f KiB per connection), %d MiB after they closed"
          % (n, kind, before // 1024, peak // 1024, (peak - before) / n, after // 1024))


if __name__ == "__main__":
    main()
