"""QEMU 10 block layer as the client: qemu-img and qemu-io."""

import json
import os
import re

import pytest

from helpers import MiB, files_equal, pattern, run, sparse_file

IMG_SIZE = 256 * MiB


def export_spec(backing, shm_tmp, size):
    if backing == "memory":
        return "memory:%d" % size, None
    path = sparse_file(os.path.join(shm_tmp, "export.img"), size)
    return "file:" + path, path


@pytest.mark.parametrize("backing", ["memory", "file"])
def test_qemu_img_convert_and_compare(start_server, shm_tmp, random_image_256m, nbd_handle, backing):
    spec, backing_file = export_spec(backing, shm_tmp, IMG_SIZE)
    srv = start_server({"": spec})
    uri = srv.uri()

    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", random_image_256m, uri],
        timeout=120)
    p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", random_image_256m, uri])
    assert "Images are identical" in p.stdout

    # Same check through --image-opts with an explicit unix socket address.
    opts = "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=%s" % srv.sock
    p = run(["qemu-img", "compare", "--image-opts", "driver=raw,file.driver=file,file.filename=%s"
             % random_image_256m, opts])
    assert "Images are identical" in p.stdout

    if backing_file:
        # the bytes really landed in the exported file
        assert files_equal(random_image_256m, backing_file)

    # compare must notice a one-byte difference (exit 1): proves it read
    # the export rather than trusting metadata
    h = nbd_handle(uri)
    byte = h.pread(1, 200 * MiB + 4096)
    h.pwrite(bytes([byte[0] ^ 0xFF]), 200 * MiB + 4096)
    h.flush()
    p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", random_image_256m, uri], check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Content mismatch at offset %d" % (200 * MiB + 4096) in p.stdout


def test_qemu_img_info(start_server):
    srv = start_server({"": "memory:256M"})
    info = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw", srv.uri()]).stdout)
    assert info["virtual-size"] == 256 * MiB
    assert info["format"] == "raw"
    [child] = info["children"]
    assert child["info"]["format"] == "nbd"
    assert child["info"]["virtual-size"] == 256 * MiB

    text = run(["qemu-img", "info", "-f", "raw", srv.uri()]).stdout
    assert "virtual size: 256 MiB (268435456 bytes)" in text


@pytest.mark.parametrize("backing", ["memory", "file"])
def test_qemu_img_map_sparse(start_server, shm_tmp, nbd_handle, backing):
    size = 16 * MiB
    spec, _ = export_spec(backing, shm_tmp, size)
    srv = start_server({"": spec})
    h = nbd_handle(srv.uri())
    h.pwrite(pattern("qmap1", MiB), 2 * MiB)
    h.pwrite(pattern("qmap2", 2 * MiB), 8 * MiB)
    h.flush()

    extents = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", srv.uri()]).stdout)
    merged = []
    for e in extents:
        assert e["present"] is True
        kind = "data" if e["data"] else "zero"
        if kind == "zero":
            assert e["zero"] is True, e
        else:
            assert e["zero"] is False, e
        if merged and merged[-1][2] == kind:
            merged[-1][1] += e["length"]
        else:
            assert e["start"] == (merged[-1][0] + merged[-1][1] if merged else 0)
            merged.append([e["start"], e["length"], kind])
    assert merged == [
        [0, 2 * MiB, "zero"],
        [2 * MiB, MiB, "data"],
        [3 * MiB, 5 * MiB, "zero"],
        [8 * MiB, 2 * MiB, "data"],
        [10 * MiB, 6 * MiB, "zero"],
    ]


def qemu_io(uri, *cmds, trace=None, check=True):
    # -t writeback: plain writes carry no FUA (qemu-io's default cache mode,
    # writethrough, would put FUA on every write)
    argv = ["qemu-io", "-f", "raw", "-t", "writeback"]
    if trace:
        argv += ["--trace", trace]
    for c in cmds:
        argv += ["-c", c]
    p = run(argv + [uri], check=check)
    assert "Pattern verification failed" not in p.stdout + p.stderr
    return p


def test_qemu_io_commands(server, nbd_handle):
    uri = server.uri()
    p = qemu_io(
        uri,
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -P 0xcd 1M 64k",
        "write -P 0x5a -f 2M 64k",        # FUA
        "write -z 64k 64k",               # WRITE_ZEROES + NO_HOLE
        "write -P 0x99 3M 64k",
        "write -z -u 3M 64k",             # WRITE_ZEROES, may punch a hole
        "read -P 0 3M 64k",
        "read -P 0 64k 64k",
        "read -P 0xab 0 64k",
        "read -P 0xab 128k 896k",
        "discard 4M 1M",                  # TRIM
        "read -P 0 4M 1M",
        "flush",
        "read -P 0xcd 1M 64k",
        "read -P 0x5a 2M 64k",
        trace="nbd_send_request",
    )
    assert "wrote 1048576/1048576 bytes at offset 0" in p.stdout
    assert "discard 1048576/1048576 bytes at offset 4194304" in p.stdout
    # the commands really went over the wire as the NBD requests we mean
    sent = set(re.findall(r"\.type = \d+ \((\w[\w ]*)\)", p.stderr))
    for cmd in ("read", "write", "write zeroes", "trim", "flush"):
        assert cmd in sent, (cmd, sent)
    # flags as qemu sent them: plain write, FUA write, zero with NO_HOLE, zero
    for flags, typ in (("0x0", "1 (write)"), ("0x1", "1 (write)"),
                       ("0x2", "6 (write zeroes)"), ("0x0", "6 (write zeroes)")):
        assert ".flags = %s, .type = %s" % (flags, typ) in p.stderr, (flags, typ)

    # a second client sees the result
    h = nbd_handle(uri)
    assert h.pread(4096, 0) == b"\xab" * 4096
    assert h.pread(4096, 64 * 1024) == bytes(4096)
    assert h.pread(4096, MiB) == b"\xcd" * 4096


def test_qemu_io_detects_wrong_pattern(server):
    """Sanity check of the harness: a failed `read -P` is an error."""
    qemu_io(server.uri(), "write -P 0x11 0 4k")
    p = run(["qemu-io", "-f", "raw", "-c", "read -P 0x22 0 4k", server.uri()], check=False)
    assert p.returncode != 0
    assert "Pattern verification failed" in p.stdout + p.stderr
