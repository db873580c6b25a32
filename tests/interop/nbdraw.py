"""Minimal hand-rolled NBD client for raw-socket protocol tests.

Everything here follows doc/proto.md of the NetworkBlockDevice/nbd
repository (and, for extended headers, its extension-ext-header branch).
It deliberately implements only what the tests need, with explicit
struct layouts, so that a test reads like the wire format.
"""

import socket
import struct

# --- handshake -------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC_OPT = 0x0003E889045565A9  # option reply magic

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# transmission flags
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

# --- transmission ------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_PAYLOAD_LEN = 1 << 5

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_ERROR = (1 << 15) + 1

EINVAL = 22
EPERM = 1


class Closed(Exception):
    """The peer closed the connection while we expected more bytes."""


class RawClient:
    def __init__(self, sock_path, timeout=10.0):
        # A path is a Unix socket; a (host, port) tuple is TCP.
        family = socket.AF_INET if isinstance(sock_path, tuple) else socket.AF_UNIX
        self.s = socket.socket(family, socket.SOCK_STREAM)
        # A timeout is a safety net against a hung server, never a
        # synchronisation mechanism: every read below waits for bytes the
        # protocol says must arrive (or for EOF).
        self.s.settimeout(timeout)
        self.s.connect(sock_path)
        self.cookie = 0

    # -- plumbing --
    def send(self, data):
        self.s.sendall(data)

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise Closed("EOF after %d of %d bytes" % (len(buf), n))
            buf += chunk
        return bytes(buf)

    def wait_eof(self):
        """Return True when the server closes the connection.

        Reads (and discards) whatever the server still sends; a reset also
        counts as closed.
        """
        try:
            while True:
                if not self.s.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self):
        self.s.close()

    # -- handshake --
    def read_greeting(self):
        magic, opt_magic, hflags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC, hex(magic)
        assert opt_magic == IHAVEOPT, hex(opt_magic)
        assert hflags & FLAG_FIXED_NEWSTYLE, "server is not fixed newstyle"
        return hflags

    def send_client_flags(self, flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        self.send(struct.pack(">I", flags))

    def handshake_start(self):
        hflags = self.read_greeting()
        self.send_client_flags(FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES))
        self.no_zeroes = bool(hflags & FLAG_NO_ZEROES)
        return hflags

    def send_option(self, opt, data=b""):
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def read_option_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == REPLY_MAGIC_OPT, hex(magic)
        return opt, rtype, self.recv_exact(length)

    def option_expect_final(self, opt, data=b""):
        """Send an option, collect replies up to the final (ACK or error)."""
        self.send_option(opt, data)
        replies = []
        while True:
            ropt, rtype, payload = self.read_option_reply()
            assert ropt == opt, (ropt, opt)
            replies.append((rtype, payload))
            if rtype == REP_ACK or rtype & REP_FLAG_ERROR:
                return replies

    def export_name(self, name=b""):
        """NBD_OPT_EXPORT_NAME: ends the handshake, returns (size, flags)."""
        self.send_option(OPT_EXPORT_NAME, name)
        size, tflags = struct.unpack(">QH", self.recv_exact(10))
        if not self.no_zeroes:
            self.recv_exact(124)
        return size, tflags

    def go(self, name=b"", infos=(INFO_BLOCK_SIZE,)):
        """NBD_OPT_GO: returns dict with 'size', 'flags', 'block_size'."""
        data = struct.pack(">I", len(name)) + name
        data += struct.pack(">H", len(infos))
        data += b"".join(struct.pack(">H", i) for i in infos)
        result = {}
        for rtype, payload in self.option_expect_final(OPT_GO, data):
            if rtype & REP_FLAG_ERROR:
                raise AssertionError("NBD_OPT_GO failed: 0x%x %r" % (rtype, payload))
            if rtype == REP_INFO:
                (itype,) = struct.unpack(">H", payload[:2])
                if itype == INFO_EXPORT:
                    result["size"], result["flags"] = struct.unpack(">QH", payload[2:12])
                elif itype == INFO_BLOCK_SIZE:
                    result["block_size"] = struct.unpack(">III", payload[2:14])
        assert "size" in result, "server sent no NBD_INFO_EXPORT before ACK"
        return result

    # -- transmission, compact (simple) headers --
    def next_cookie(self):
        self.cookie += 1
        return self.cookie

    def request(self, cmd, offset=0, length=0, flags=0, payload=b"", cookie=None):
        cookie = self.next_cookie() if cookie is None else cookie
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie,
                              offset, length) + payload)
        return cookie

    def read_simple_reply(self):
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        return error, cookie

    # -- transmission, extended headers --
    def ext_request(self, cmd, offset=0, length=0, flags=0, payload=b"", cookie=None):
        cookie = self.next_cookie() if cookie is None else cookie
        hdr = struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, cmd, cookie,
                          offset, length)
        assert len(hdr) == 32
        self.send(hdr + payload)
        return cookie

    def read_ext_reply(self):
        """One extended reply chunk: dict(flags,type,cookie,offset,payload)."""
        hdr = self.recv_exact(32)
        magic, flags, rtype, cookie, offset, length = struct.unpack(">IHHQQQ", hdr)
        assert magic == EXTENDED_REPLY_MAGIC, "bad extended reply magic 0x%x" % magic
        assert length < (1 << 32), length
        return dict(flags=flags, type=rtype, cookie=cookie, offset=offset,
                    payload=self.recv_exact(length))

    def read_ext_reply_chunks(self):
        """All chunks of one extended reply, up to REPLY_FLAG_DONE."""
        chunks = []
        while True:
            c = self.read_ext_reply()
            chunks.append(c)
            if c["flags"] & REPLY_FLAG_DONE:
                return chunks
