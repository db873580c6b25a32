"""Hand-written NBD bytes on a raw Unix socket: misbehaving clients must
only ever affect their own connection.  After each case a fresh nbdinfo
must still be served."""

import socket
import struct

import pytest

import nbdraw
from nbdraw import RawClient
from helpers import MiB, pattern, server_still_serves


@pytest.fixture
def raw(server):
    """Factory for raw clients on the default export; closed at teardown."""
    clients = []

    def _connect():
        c = RawClient(server.sock)
        clients.append(c)
        return c

    yield _connect
    for c in clients:
        c.close()
    server_still_serves(server)


def test_greeting_bytes(raw):
    c = raw()
    greeting = c.recv_exact(18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    # handshake flags: FIXED_NEWSTYLE (required), NO_ZEROES (optional)
    (hflags,) = struct.unpack(">H", greeting[16:])
    assert hflags & nbdraw.FLAG_FIXED_NEWSTYLE
    assert hflags & ~(nbdraw.FLAG_FIXED_NEWSTYLE | nbdraw.FLAG_NO_ZEROES) == 0


def test_bad_option_magic_closes_connection(raw):
    c = raw()
    c.handshake_start()
    # 'IHAVEOPT' replaced by garbage, followed by a plausible NBD_OPT_GO
    c.send(bytes.fromhex("deadbeefcafef00d") + struct.pack(">II", nbdraw.OPT_GO, 0))
    assert c.wait_eof()
    # an unaffected second client still completes a handshake
    c2 = raw()
    c2.handshake_start()
    assert c2.go()["size"] == 256 * MiB


def test_truncated_handshake(raw):
    """Clients that stop sending mid-handshake (their side shut down for
    writing, so the server reads the end of stream in the middle of a
    field) are closed by the server, and a client that connected before
    them still completes its handshake after them."""
    early = raw()
    early.read_greeting()
    torn = []
    c = raw()
    c.recv_exact(18)
    c.send(b"\x00\x00")   # half of the 4-byte client flags
    torn.append(("half the client flags", c))
    c2 = raw()            # nothing at all
    torn.append(("no client flags", c2))
    c3 = raw()
    c3.handshake_start()
    c3.send(struct.pack(">Q", nbdraw.IHAVEOPT)[:5])   # torn option header
    torn.append(("a torn option header", c3))
    c4 = raw()
    c4.handshake_start()
    c4.send(struct.pack(">QII", nbdraw.IHAVEOPT, nbdraw.OPT_GO, 100) + b"\0" * 10)   # option data cut short
    torn.append(("option data cut short", c4))
    for what, t in torn:
        t.s.shutdown(socket.SHUT_WR)
    for what, t in torn:
        assert t.wait_eof(), what   # (RawClient's 10 s timeout would raise)
    early.send_client_flags()
    assert early.go()["size"] == 256 * MiB


def test_client_vanishes_mid_write_payload(raw, nbd_handle, server):
    h = nbd_handle(server.uri())
    h.pwrite(pattern("keep", 65536), 0)

    c = raw()
    c.handshake_start()
    size, tflags = c.export_name(b"")
    assert size == 256 * MiB
    c.request(nbdraw.CMD_WRITE, offset=4 * MiB, length=MiB)
    c.send(b"\xaa" * (100 * 1024))      # 100 KiB of the promised 1 MiB
    c.close()

    # the server carries on serving its other client
    assert h.pread(65536, 0) == pattern("keep", 65536)
    h.pwrite(pattern("after", 4096), 8 * MiB)
    assert h.pread(4096, 8 * MiB) == pattern("after", 4096)


def test_unknown_command_gets_einval(raw):
    c = raw()
    c.handshake_start()
    size, tflags = c.export_name(b"")      # no structured replies: simple replies
    assert size == 256 * MiB
    assert tflags & nbdraw.TFLAG_HAS_FLAGS

    cookie = c.request(99, offset=0, length=0)
    error, rcookie = c.read_simple_reply()
    assert (error, rcookie) == (nbdraw.EINVAL, cookie)

    # the connection keeps working
    data = pattern("raw", 4096)
    cookie = c.request(nbdraw.CMD_WRITE, offset=MiB, length=len(data), payload=data)
    assert c.read_simple_reply() == (0, cookie)
    cookie = c.request(nbdraw.CMD_READ, offset=MiB, length=len(data))
    assert c.read_simple_reply() == (0, cookie)
    assert c.recv_exact(len(data)) == data

    cookie = c.request(99, offset=12345, length=4096, cookie=0xFEEDFACE12345678)
    assert c.read_simple_reply() == (nbdraw.EINVAL, 0xFEEDFACE12345678)

    c.request(nbdraw.CMD_DISC)
    assert c.wait_eof()


def test_unknown_option_is_unsupported(raw):
    c = raw()
    c.handshake_start()
    replies = c.option_expect_final(0x7E57, b"\x01\x02\x03")
    assert len(replies) == 1
    assert replies[0][0] == nbdraw.REP_ERR_UNSUP
    # the handshake goes on
    replies = c.option_expect_final(nbdraw.OPT_STRUCTURED_REPLY)
    assert replies == [(nbdraw.REP_ACK, b"")]
    info = c.go()
    assert info["size"] == 256 * MiB
    assert info["flags"] & nbdraw.TFLAG_HAS_FLAGS
    assert info["block_size"] == (1, 4096, 32 * MiB)
    c.request(nbdraw.CMD_DISC)
    assert c.wait_eof()


def test_write_on_read_only_keeps_stream_in_sync(start_server):
    """The server must consume the rejected write's payload: the next
    request header is parsed correctly."""
    srv = start_server({"": "memory:16M"}, read_only=True)
    c = RawClient(srv.sock)
    try:
        c.handshake_start()
        size, tflags = c.export_name(b"")
        assert tflags & nbdraw.TFLAG_READ_ONLY
        cookie = c.request(nbdraw.CMD_WRITE, offset=0, length=65536, payload=b"\x55" * 65536)
        assert c.read_simple_reply() == (nbdraw.EPERM, cookie)
        cookie = c.request(nbdraw.CMD_READ, offset=0, length=512)
        assert c.read_simple_reply() == (0, cookie)
        assert c.recv_exact(512) == bytes(512)
        c.request(nbdraw.CMD_DISC)
        assert c.wait_eof()
    finally:
        c.close()
    server_still_serves(srv)
