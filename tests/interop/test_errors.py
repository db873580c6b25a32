"""Bad requests sent through libnbd with strict mode off (so libnbd does not
refuse them client-side).  Error codes follow proto.md "Error values":

  * read or trim beyond the end          -> NBD_EINVAL
  * write (and write zeroes) beyond end  -> NBD_ENOSPC
  * write/trim/zero on a read-only export -> NBD_EPERM

and after a failed request the connection stays usable.
"""

import errno

import nbd
import pytest

from helpers import BLOCK_MAX, pattern, server_still_serves

U64 = 1 << 64


def expect_errno(fn, *errnums):
    with pytest.raises(nbd.Error) as ei:
        fn()
    assert ei.value.errnum in errnums, "got %s, want %s" % (
        ei.value, [errno.errorcode[e] for e in errnums])


@pytest.fixture
def lax(server, nbd_handle):
    """A handle on the default 256 MiB export with strict mode off."""
    h = nbd_handle(server.uri(), strict=False)
    yield h
    # every bad request above must leave the connection up and in sync
    assert not h.aio_is_dead()
    h.pwrite(b"sync", 4096)
    assert h.pread(4, 4096) == b"sync"


def test_read_past_end(lax):
    size = lax.get_size()
    expect_errno(lambda: lax.pread(4096, size), errno.EINVAL)
    expect_errno(lambda: lax.pread(8192, size - 4096), errno.EINVAL)   # straddles
    expect_errno(lambda: lax.pread(1, size), errno.EINVAL)


def test_write_past_end(lax):
    size = lax.get_size()
    expect_errno(lambda: lax.pwrite(b"x" * 4096, size), errno.ENOSPC)
    expect_errno(lambda: lax.pwrite(b"x" * 8192, size - 4096), errno.ENOSPC)
    # the in-range half of the straddling write must not have been applied
    assert lax.pread(4096, size - 4096) == bytes(4096)


def test_trim_and_zero_past_end(lax):
    size = lax.get_size()
    expect_errno(lambda: lax.trim(4096, size), errno.EINVAL)
    expect_errno(lambda: lax.zero(4096, size), errno.ENOSPC)


def test_offset_plus_length_overflows_u64(lax):
    off = U64 - 2048  # off + 4096 wraps around to 2048
    lax.pwrite(pattern("guard", 4096), 0)
    expect_errno(lambda: lax.pread(4096, off), errno.EINVAL)
    expect_errno(lambda: lax.pwrite(b"w" * 4096, off), errno.ENOSPC)
    expect_errno(lambda: lax.trim(4096, off), errno.EINVAL)
    expect_errno(lambda: lax.zero(4096, off), errno.ENOSPC)
    # nothing wrapped around onto the start of the export
    assert lax.pread(4096, 0) == pattern("guard", 4096)


@pytest.mark.parametrize("op", ["read", "write"])
def test_request_over_max_block_size(server, nbd_handle, op):
    """Payload larger than the advertised 32 MiB maximum: the server either
    answers EINVAL (and stays in sync) or hard-disconnects this client."""
    h = nbd_handle(server.uri(), strict=False)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == BLOCK_MAX
    length = BLOCK_MAX + 4096
    try:
        if op == "read":
            h.pread(length, 0)
        else:
            h.pwrite(b"o" * length, 0)
    except nbd.Error as e:
        if not (h.aio_is_dead() or h.aio_is_closed()):
            assert e.errnum == errno.EINVAL, e
            assert h.pread(4096, 0) == bytes(4096)   # still in sync
    else:
        pytest.fail("server accepted a %d-byte %s (max %d)" % (length, op, BLOCK_MAX))
    server_still_serves(server)


@pytest.mark.parametrize("op", ["write", "write_fua", "trim", "trim_fua", "zero", "zero_fua",
                                "zero_no_hole", "zero_fast", "write_empty", "zero_empty"])
def test_read_only_export_refuses_writes(start_server, nbd_handle, op):
    """Every write-type command (proto.md: WRITE, TRIM, WRITE_ZEROES; the
    experimental RESIZE is advertised by neither server) with every flag
    gets EPERM; zero-length ones too."""
    srv = start_server({"": "memory:16M"}, read_only=True)
    h = nbd_handle(srv.uri(), strict=False)
    assert h.is_read_only()
    calls = {
        "write": lambda: h.pwrite(b"w" * 4096, 0),
        "write_fua": lambda: h.pwrite(b"w" * 4096, 0, nbd.CMD_FLAG_FUA),
        "trim": lambda: h.trim(4096, 0),
        "trim_fua": lambda: h.trim(4096, 0, nbd.CMD_FLAG_FUA),
        "zero": lambda: h.zero(4096, 0),
        "zero_fua": lambda: h.zero(4096, 0, nbd.CMD_FLAG_FUA),
        "zero_no_hole": lambda: h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE),
        "zero_fast": lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO),
        "write_empty": lambda: h.pwrite(b"", 0),
        "zero_empty": lambda: h.zero(0, 0),
    }
    expect_errno(calls[op], errno.EPERM)
    # connection still in sync, data untouched
    assert h.pread(4096, 0) == bytes(4096)
    h.flush()   # flush is harmless on a read-only export
