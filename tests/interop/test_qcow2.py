"""qcow2:PATH exports (tracker issue 20) against
qemu, the reference: nbdkit 1.32 has no qcow2 plugin and no qcow2dec filter
(`nbdkit --dump-plugin qcow2` fails; the filter arrived in 1.36), so every
test that serves is ringbd_only and qemu opens the same image directly
(the tests of refusals run the ringbd binary alone).

Images come from qemu-img create and qemu-io (several cluster sizes, raw
and qcow2 backing files named relatively, a `qemu-img convert -c` copy);
each is served with `ringbd serve --read-only qcow2:PATH` and checked with
`qemu-img compare` (the export against the image as qemu reads it) and
`qemu-img map` (the export's base:allocation against qemu's own map).

Served read-write, images are written through NBD by fio (crc32c verify),
qemu-img convert and qemu-io, then stopped and checked with `qemu-img
check` (no errors, no leaks) and compared with what was written; the
durability of qcow2 exports across kill -9 is in test_durability.py."""

import json
import os

import pytest

from helpers import MiB, run

SIZE = 64 * MiB

# qemu-io commands on every image: data in several places, zero clusters
# over data (kept allocated: qemu's ZERO_ALLOC) and over nothing (plain),
# and a discard.
WRITES = [
    "write -P 0x5a 0 64k",
    "write -P 0x33 5M 1M",
    "write -P 0x44 20M 4M",
    "write -z 21M 1M",
    "write -z -u 40M 2M",
    "write -P 0x66 63M 1M",
    "discard 63M 512k",
]


def qemu_img(*args):
    return run(["qemu-img", *args]).stdout


def qemu_io(fmt, path, *cmds):
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    run(argv + [path])


def make(path, *opts, size=SIZE, writes=WRITES):
    qemu_img("create", "-q", "-f", "qcow2", *opts, path, str(size))
    qemu_io("qcow2", path, *writes)
    return path


def normalized_map(target, fmt):
    """qemu-img map --output=json as [(start, length, zero)] with adjacent
    ranges of the same kind merged, checking that every range that does not
    read as zeroes is data.

    The map of the file and of the export are comparable this way: qemu's
    NBD client turns NBD_STATE_HOLE into "not data" and NBD_STATE_ZERO into
    "zero". A qcow2 zero cluster that keeps its host cluster is zero but
    allocated (ringbd: zero, not a hole; qemu-img map of the file: zero, not
    data), so data is compared only where the bytes are not zero."""
    # -U: qemu reads beside ringbd, which holds qemu's image locks as a writer would.
    force_share = ["-U"] if fmt == "qcow2" else []
    entries = json.loads(qemu_img("map", "--output=json", *force_share, "-f", fmt, target))
    out = []
    for e in entries:
        if not e["zero"]:
            assert e["data"], "a non-zero range that is not data in %s: %r" % (target, e)
        if out and out[-1][2] == e["zero"] and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], e["zero"])
        else:
            out.append((e["start"], e["length"], e["zero"]))
    return out


def check_served(start_server, image):
    srv = start_server({"": "qcow2:" + image}, read_only=True)
    uri = srv.uri()
    # Byte for byte, against the image (and its chain) as qemu reads it.
    run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", image, uri])
    file_map = normalized_map(image, "qcow2")
    assert normalized_map(uri, "raw") == file_map
    return srv, file_map


@pytest.mark.ringbd_only
@pytest.mark.parametrize("cluster", ["4k", "64k", "2M"])
def test_qemu_images_by_cluster_size(start_server, shm_tmp, cluster):
    img = make(os.path.join(shm_tmp, "disk.qcow2"), "-o", "cluster_size=%s" % cluster)
    srv, file_map = check_served(start_server, img)
    assert file_map[0] == (0, 64 * 1024 if cluster != "2M" else 2 * MiB, False), file_map
    assert any(z for _, _, z in file_map) and any(not z for _, _, z in file_map), file_map
    # nbdinfo sees the holes (base:allocation from the export).
    lines = [ln.split(None, 3) for ln in run(["nbdinfo", "--map", srv.uri()]).stdout.splitlines()]
    kinds = {desc.strip() for *_, desc in lines}
    assert "hole,zero" in kinds and "data" in kinds, lines
    assert lines[0][0] == "0" and lines[0][3].strip() == "data", lines
    info = json.loads(run(["nbdinfo", "--json", srv.uri()]).stdout)["exports"][0]
    assert info["is_read_only"] is True and info["export-size"] == SIZE
    assert info["can_multi_conn"] is True


@pytest.mark.ringbd_only
def test_version_2_image(start_server, shm_tmp):
    img = make(os.path.join(shm_tmp, "v2.qcow2"), "-o", "compat=0.10,cluster_size=64k",
               writes=[w for w in WRITES if "-z" not in w])
    check_served(start_server, img)


@pytest.mark.ringbd_only
@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
def test_backing_file_named_relatively(start_server, shm_tmp, base_format):
    sub = os.path.join(shm_tmp, "base")
    os.mkdir(sub)
    base = os.path.join(sub, "base." + base_format)
    # The base is shorter than the image above it: past its end reads zero.
    qemu_img("create", "-q", "-f", base_format, base, str(SIZE // 2))
    qemu_io(base_format, base, "write -P 0x11 0 8M", "write -P 0x12 30M 2M")
    top = os.path.join(shm_tmp, "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base/base." + base_format,
             "-F", base_format, top, str(SIZE))
    qemu_io("qcow2", top, "write -P 0x21 1M 64k", "write -z 2M 64k", "write -P 0x22 31M 4M")
    info = json.loads(qemu_img("info", "--output=json", top))
    assert info["backing-filename"] == "base/base." + base_format
    srv, _ = check_served(start_server, top)
    desc = json.loads(run(["nbdinfo", "--json", srv.uri()]).stdout)["exports"][0].get("description", "")
    assert "backing %s" % base_format in desc and "base/base." in desc, desc


@pytest.mark.ringbd_only
def test_compressed_image(start_server, shm_tmp):
    src = make(os.path.join(shm_tmp, "src.qcow2"), "-o", "cluster_size=64k")
    comp = os.path.join(shm_tmp, "comp.qcow2")
    qemu_img("convert", "-q", "-c", "-O", "qcow2", src, comp)
    assert os.path.getsize(comp) < os.path.getsize(src) // 4, "qemu compressed the clusters"
    check_served(start_server, comp)
    run(["qemu-img", "compare", "-q", src, comp])


def serve_fails(ringbd, shm_tmp, spec, *args):
    """`ringbd serve` of `spec` must exit at start; returns its stderr."""
    sock = os.path.join(shm_tmp, "refused.sock")
    p = run([ringbd, "serve", "--unix", sock, *args, spec], check=False, timeout=30)
    assert p.returncode != 0, "ringbd served %s: %s" % (spec, p.stdout)
    return p.stderr


def check_clean(image):
    p = run(["qemu-img", "check", image], check=False)
    assert p.returncode == 0, "qemu-img check %s: exit %d\n%s%s" % (image, p.returncode, p.stdout, p.stderr)


@pytest.mark.ringbd_only
# 2 MiB clusters are written in the unit tests (write_tests.rs).
@pytest.mark.parametrize("cluster,backing", [("4k", False), ("64k", True)])
def test_fio_verify_through_a_qcow2_export(start_server, shm_tmp, cluster, backing):
    """fio writes every 4 KiB block once at random (each one allocating or
    copying on write until its cluster exists), verifying with crc32c;
    the image is then clean for qemu-img check and reads the same through
    qemu as through ringbd."""
    img = os.path.join(shm_tmp, "fio.qcow2")
    opts = ["-o", "cluster_size=%s" % cluster]
    if backing:
        base = os.path.join(shm_tmp, "base.raw")
        qemu_img("create", "-q", "-f", "raw", base, str(SIZE))
        qemu_io("raw", base, "write -P 0x11 0 %d" % SIZE)
        opts += ["-b", "base.raw", "-F", "raw"]
    qemu_img("create", "-q", "-f", "qcow2", *opts, img, str(SIZE))
    srv = start_server({"": "qcow2:" + img})
    out = os.path.join(shm_tmp, "fio.json")
    half = SIZE // 2
    run([
        "fio", "--name=qcow2", "--ioengine=nbd", "--uri=" + srv.uri(),
        "--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=2",
        "--size=%d" % half, "--offset_increment=%d" % half,
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=1024",
        "--verify_state_save=0", "--group_reporting", "--output-format=json", "--output=" + out,
    ], timeout=180, cwd=shm_tmp)
    with open(out) as f:
        [job] = json.load(f)["jobs"]
    assert job["error"] == 0 and job["write"]["io_bytes"] == SIZE and job["read"]["io_bytes"] == SIZE
    # After a flush the file holds it all: the export against the file,
    # while served (qemu opens it read-only, without locks).
    uri = srv.uri()
    qemu_io("raw", uri, "flush")
    run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", "-U", img, uri])
    srv.stop()
    check_clean(img)
    # fio wrote every block: all data, nothing left of the backing file.
    assert all(not z for _, _, z in normalized_map(img, "qcow2"))


@pytest.mark.ringbd_only
def test_writes_zeroes_and_discards_through_nbd(start_server, shm_tmp):
    """qemu-img convert writes an image into the export (zeroes skipped or
    sent as write-zeroes), qemu-io zeroes and discards over it; the export
    and the file read the same, their maps agree, and the file checks clean."""
    src = make(os.path.join(shm_tmp, "src.qcow2"), "-o", "cluster_size=64k")
    img = os.path.join(shm_tmp, "dst.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, str(SIZE))
    srv = start_server({"": "qcow2:" + img})
    uri = srv.uri()
    run(["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", src, uri])
    run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", src, uri])
    qemu_io("raw", uri, "write -z 5M 64k", "write -z -u 20M 1M", "discard 22M 1M",
            "write -P 0x77 22M 4k", "write -z 100 1000", "aio_flush")
    # What qemu reads from the file is what the export reads.
    run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", "-U", img, uri])
    assert normalized_map(uri, "raw") == normalized_map(img, "qcow2")
    zeroed = json.loads(qemu_img("map", "--output=json", "-f", "raw", uri))
    at = [e for e in zeroed if e["start"] <= 20 * MiB < e["start"] + e["length"]][0]
    assert at["zero"], zeroed
    srv.stop()
    check_clean(img)
    data = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x77 22M 4k", "-c", "read -P 0 5M 64k",
                "-c", "read -P 0x5a 0 100", "-c", "read -P 0 100 1000", img]).stdout
    assert "Pattern verification failed" not in data, data


@pytest.mark.ringbd_only
def test_image_locks_keep_qemu_and_a_second_writer_out(start_server, ringbd, shm_tmp):
    """ringbd takes qemu's image locks: while it serves an image read-write,
    qemu cannot open it (without -U) and a second ringbd cannot write it."""
    img = make(os.path.join(shm_tmp, "locked.qcow2"), writes=[])
    start_server({"": "qcow2:" + img})
    p = run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", img], check=False)
    assert p.returncode != 0 and "lock" in p.stderr, p.stderr
    err = serve_fails(ringbd, shm_tmp, "qcow2:" + img)
    assert "locked.qcow2" in err and "the image is locked" in err, err


def test_images_with_snapshots_are_refused_for_writing(ringbd, shm_tmp):
    img = make(os.path.join(shm_tmp, "snap.qcow2"), writes=["write -P 0x5a 0 64k"])
    qemu_img("snapshot", "-c", "s1", img)
    err = serve_fails(ringbd, shm_tmp, "qcow2:" + img)
    assert "snap.qcow2" in err and "1 internal snapshots" in err, err


def test_encrypted_image_is_refused(ringbd, shm_tmp):
    img = os.path.join(shm_tmp, "enc.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=x",
             "-o", "encrypt.format=luks,encrypt.key-secret=sec0", img, "16M")
    err = serve_fails(ringbd, shm_tmp, "qcow2:" + img, "--read-only")
    assert "enc.qcow2" in err and "crypt_method: 2 (LUKS encryption)" in err, err


def test_missing_backing_file_is_refused(ringbd, shm_tmp):
    img = os.path.join(shm_tmp, "orphan.qcow2")
    qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", "gone.raw", "-F", "raw", img, "16M")
    err = serve_fails(ringbd, shm_tmp, "qcow2:" + img, "--read-only")
    assert "orphan.qcow2" in err and '"gone.raw"' in err, err
