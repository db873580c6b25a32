"""Small helpers shared by the interop tests (no fixtures here)."""

import json
import subprocess

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# ringbd's advertised NBD_INFO_BLOCK_SIZE (the CLI contract).  nbdkit is
# configured with its blocksize-policy filter to advertise and enforce the
# same limits (see conftest.nbdkit_argv), so these hold for both servers.
BLOCK_MIN = 1
BLOCK_PREF = 4096
BLOCK_MAX = 32 * MiB

# base:allocation status bits (proto.md)
STATE_HOLE = 1
STATE_ZERO = 2


def run(argv, check=True, timeout=120, **kw):
    """subprocess.run with captured text output and a useful failure message.

    A missing program raises AssertionError: a missing tool is a failure.
    """
    try:
        p = subprocess.run([str(a) for a in argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=timeout, **kw)
    except FileNotFoundError as e:
        raise AssertionError("required tool %r is not installed: %s" % (argv[0], e))
    if check and p.returncode != 0:
        raise AssertionError("%s exited %d\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(map(str, argv)), p.returncode, p.stdout, p.stderr))
    return p


def nbdinfo_json(*args):
    return json.loads(run(["nbdinfo", "--json", *args]).stdout)


def server_still_serves(srv, export=""):
    """A fresh client (nbdinfo) can still connect: used after abusive clients."""
    p = run(["nbdinfo", "--size", srv.uri(export)], check=False, timeout=30)
    assert p.returncode == 0, "server no longer serves: %s" % p.stderr
    assert int(p.stdout.strip()) > 0
    assert srv.alive(), "server process died"


def random_file(path, size, seed=0):
    """Write `size` pseudo-random (incompressible) bytes; fast and repeatable."""
    import random
    rng = random.Random(seed)
    chunk = 4 * MiB
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(rng.randbytes(n))
            left -= n
    return path


def sparse_file(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def pattern(tag, length):
    """Deterministic, position-dependent data so misplaced bytes are caught."""
    unit = ("%s-" % tag).encode()
    block = bytearray()
    i = 0
    while len(block) < length:
        block += unit + i.to_bytes(4, "big")
        i += 1
    return bytes(block[:length])


def files_equal(a, b):
    return run(["cmp", a, b], check=False).returncode == 0


def extents_to_map(entries, start=0):
    """libnbd block_status entries [len, flags, len, flags...] -> [(off, len, flags)]."""
    out = []
    off = start
    for i in range(0, len(entries), 2):
        out.append((off, entries[i], entries[i + 1]))
        off += entries[i]
    return out


def flags_at(extents, offset):
    for off, length, flags in extents:
        if off <= offset < off + length:
            return flags
    raise AssertionError("offset %d not covered by %r" % (offset, extents))
