"""A tiny NBD server for client tests: fixed newstyle, NBD_OPT_GO and
NBD_OPT_EXPORT_NAME, simple replies only (it refuses structured replies and
extended headers with NBD_REP_ERR_UNSUP), a RAM disk shared by all
connections.  With --flip-every N it flips one bit in every Nth read reply
(a deliberately corrupting server, to prove that `ringbd bench --verify`
notices).

Usage: flipserver.py SOCKET SIZE [--flip-every N]
Prints "ready" on stdout once it listens (the readiness signal).
"""

import os
import socket
import struct
import sys
import threading

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698

OPT_EXPORT_NAME, OPT_ABORT, OPT_GO = 1, 2, 7
REP_ACK, REP_INFO, ERR_UNSUP = 1, 3, 0x80000001
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
# HAS_FLAGS | SEND_FLUSH | CAN_MULTI_CONN
TX_FLAGS = 1 | 4 | 256


class Disk:
    def __init__(self, size, flip_every):
        self.data = bytearray(size)
        self.lock = threading.Lock()
        self.flip_every = flip_every
        self.reads = 0


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def option_reply(s, opt, typ, data=b""):
    s.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, typ, len(data)) + data)


def handshake(s, disk):
    s.sendall(NBDMAGIC + struct.pack(">QH", IHAVEOPT, 3))
    flags = struct.unpack(">I", recv_exact(s, 4))[0]
    no_zeroes = flags & 2
    size = len(disk.data)
    while True:
        magic, opt, length = struct.unpack(">QII", recv_exact(s, 16))
        data = recv_exact(s, length)
        if opt == OPT_EXPORT_NAME:
            s.sendall(struct.pack(">QH", size, TX_FLAGS) + (b"" if no_zeroes else b"\0" * 124))
            return True
        if opt == OPT_GO:
            option_reply(s, opt, REP_INFO, struct.pack(">HQH", 0, size, TX_FLAGS))
            option_reply(s, opt, REP_ACK)
            return True
        if opt == OPT_ABORT:
            option_reply(s, opt, REP_ACK)
            return False
        option_reply(s, opt, ERR_UNSUP)


def serve(s, disk):
    try:
        if not handshake(s, disk):
            return
        while True:
            magic, flags, typ, cookie, offset, length = struct.unpack(">IHHQQI", recv_exact(s, 28))
            if magic != REQ_MAGIC:
                return
            if typ == CMD_DISC:
                return
            bad = offset + length > len(disk.data)
            if typ == CMD_WRITE:
                payload = recv_exact(s, length)
                if not bad:
                    with disk.lock:
                        disk.data[offset:offset + length] = payload
                s.sendall(struct.pack(">IIQ", SIMPLE_MAGIC, 22 if bad else 0, cookie))
            elif typ == CMD_READ:
                if bad:
                    s.sendall(struct.pack(">IIQ", SIMPLE_MAGIC, 22, cookie))
                    continue
                with disk.lock:
                    out = bytearray(disk.data[offset:offset + length])
                    disk.reads += 1
                    flip = disk.flip_every and disk.reads % disk.flip_every == 0
                if flip and length:
                    out[length // 2] ^= 0x10
                s.sendall(struct.pack(">IIQ", SIMPLE_MAGIC, 0, cookie) + bytes(out))
            elif typ == CMD_FLUSH:
                s.sendall(struct.pack(">IIQ", SIMPLE_MAGIC, 0, cookie))
            else:
                s.sendall(struct.pack(">IIQ", SIMPLE_MAGIC, 22, cookie))
    except (EOFError, ConnectionError):
        pass
    finally:
        s.close()


def main():
    path, size = sys.argv[1], int(sys.argv[2])
    flip_every = 0
    if len(sys.argv) > 4 and sys.argv[3] == "--flip-every":
        flip_every = int(sys.argv[4])
    disk = Disk(size, flip_every)
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    lst.bind(path)
    lst.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = lst.accept()
        threading.Thread(target=serve, args=(conn, disk), daemon=True).start()


if __name__ == "__main__":
    main()
