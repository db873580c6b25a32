"""nbdinfo (libnbd 1.14) against the server: handshake results, export
listing and allocation maps."""

import json
import os

import pytest

from helpers import (BLOCK_MAX, BLOCK_MIN, BLOCK_PREF, MiB, STATE_HOLE,
                     STATE_ZERO, nbdinfo_json, pattern, run, sparse_file)


def test_json_memory_export(server):
    info = nbdinfo_json(server.uri())

    assert info["protocol"] == "newstyle-fixed"
    assert info["TLS"] is False
    # libnbd 1.14 asks for structured replies (it knows nothing of extended
    # headers), so a server must grant them.
    assert info["structured"] is True

    assert len(info["exports"]) == 1
    exp = info["exports"][0]
    assert exp["export-name"] == ""
    assert exp["export-size"] == 256 * MiB
    assert "base:allocation" in exp["contexts"]
    assert exp["is_read_only"] is False
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_df",
                "can_multi_conn", "can_cache", "can_fast_zero"):
        assert exp[cap] is True, cap
    # NBD_INFO_BLOCK_SIZE
    assert exp["block_size_minimum"] == BLOCK_MIN
    assert exp["block_size_preferred"] == BLOCK_PREF
    assert exp["block_size_maximum"] == BLOCK_MAX


def test_is_read_only_flag(start_server):
    rw = start_server({"": "memory:16M"})
    ro = start_server({"": "memory:16M"}, read_only=True)

    # nbdinfo --is read-only: exit 0 = true, 2 = false
    assert run(["nbdinfo", "--is", "read-only", ro.uri()], check=False).returncode == 0
    assert run(["nbdinfo", "--is", "read-only", rw.uri()], check=False).returncode == 2

    exp = nbdinfo_json(ro.uri())["exports"][0]
    assert exp["is_read_only"] is True
    assert exp["export-size"] == 16 * MiB


def test_list_named_exports(start_server, shm_tmp, nbd_handle):
    beta_img = sparse_file(os.path.join(shm_tmp, "beta.img"), 32 * MiB)
    srv = start_server({
        "": "memory:64M",
        "alpha": "memory:16M",
        "beta": "file:%s" % beta_img,
    })

    text = run(["nbdinfo", "--list", srv.uri()]).stdout
    assert 'export="alpha"' in text
    assert 'export="beta"' in text

    listing = json.loads(run(["nbdinfo", "--list", "--json", srv.uri()]).stdout)
    sizes = {e["export-name"]: e["export-size"] for e in listing["exports"]}
    assert sizes["alpha"] == 16 * MiB
    assert sizes["beta"] == 32 * MiB
    # The default export may be listed under "" or under a canonical name
    # (NBD_INFO_NAME); either way nothing but our three exports appears.
    assert len(listing["exports"]) <= 3
    assert sorted(sizes.values()) in ([16 * MiB, 32 * MiB], [16 * MiB, 32 * MiB, 64 * MiB])

    # Each name reaches its own storage.
    assert run(["nbdinfo", "--size", srv.uri()]).stdout.strip() == str(64 * MiB)
    a = nbd_handle(srv.uri("alpha"))
    b = nbd_handle(srv.uri("beta"))
    a.pwrite(pattern("alpha", 4096), 0)
    b.pwrite(pattern("beta", 4096), 0)
    assert a.pread(4096, 0) == pattern("alpha", 4096)
    assert b.pread(4096, 0) == pattern("beta", 4096)

    # Unknown export names are refused.
    p = run(["nbdinfo", "--size", srv.uri("no-such-export")], check=False)
    assert p.returncode != 0


# 1 MiB aligned data regions inside a 16 MiB export.
MAP_REGIONS = [(1 * MiB, 1 * MiB), (4 * MiB, 2 * MiB), (9 * MiB, 1 * MiB), (15 * MiB, 1 * MiB)]


def expected_map(size, regions):
    """[(offset, length, is_data)] with adjacent equal kinds merged."""
    out = []
    pos = 0
    for off, length in sorted(regions):
        if off > pos:
            out.append((pos, off - pos, False))
        out.append((off, length, True))
        pos = off + length
    if pos < size:
        out.append((pos, size - pos, False))
    merged = []
    for e in out:
        if merged and merged[-1][2] == e[2] and merged[-1][0] + merged[-1][1] == e[0]:
            merged[-1] = (merged[-1][0], merged[-1][1] + e[1], e[2])
        else:
            merged.append(e)
    return merged


@pytest.mark.parametrize("backing", ["memory", "file"])
def test_map_sparse_export(start_server, shm_tmp, nbd_handle, backing):
    size = 16 * MiB
    if backing == "memory":
        spec = "memory:16M"
    else:
        spec = "file:" + sparse_file(os.path.join(shm_tmp, "sparse.img"), size)
    srv = start_server({"": spec})

    h = nbd_handle(srv.uri())
    for i, (off, length) in enumerate(MAP_REGIONS):
        h.pwrite(pattern("map%d" % i, length), off)
    h.flush()

    extents = json.loads(run(["nbdinfo", "--map", "--json", srv.uri()]).stdout)
    # contiguous, complete coverage
    pos = 0
    for e in extents:
        assert e["offset"] == pos, extents
        pos += e["length"]
    assert pos == size

    for e in extents:
        if e["type"] & STATE_HOLE:
            # an unallocated extent must also read as zero
            assert e["type"] == STATE_HOLE | STATE_ZERO, e
            assert e["description"] == "hole,zero"
        else:
            # we wrote non-zero bytes: data, and never flagged zero
            assert e["type"] == 0, e
            assert e["description"] == "data"

    got = []
    for e in extents:
        is_data = not (e["type"] & STATE_HOLE)
        if got and got[-1][2] == is_data:
            got[-1] = (got[-1][0], got[-1][1] + e["length"], is_data)
        else:
            got.append((e["offset"], e["length"], is_data))
    assert got == expected_map(size, MAP_REGIONS)

    # The text form agrees on the totals.
    totals = run(["nbdinfo", "--map", "--totals", srv.uri()]).stdout
    by_type = {}
    for line in totals.splitlines():
        nbytes, _pct, typ = line.split()[:3]
        by_type[int(typ)] = int(nbytes)
    data_bytes = sum(length for _, length in MAP_REGIONS)
    assert by_type == {0: data_bytes, STATE_HOLE | STATE_ZERO: size - data_bytes}


def test_null_export(start_server, nbd_handle):
    srv = start_server({"": "null:1G"})
    exp = nbdinfo_json(srv.uri())["exports"][0]
    assert exp["export-size"] == 1 << 30
    h = nbd_handle(srv.uri())
    assert h.pread(MiB, 512 * MiB) == bytes(MiB)
    assert h.pread(4096, (1 << 30) - 4096) == bytes(4096)
