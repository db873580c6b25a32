"""Logging (docs/daemon.md, "Logging"): levels from -q/-v and RUST_LOG,
structured fields (connection, export, operation, errno) on the events that
have them, and the journal's native protocol when stderr is the journal
(JOURNAL_STREAM). ringbd's own interface: ringbd-only."""

import json
import os
import shutil
import signal
import socket
import struct
import subprocess

import nbd
import pytest

from conftest import ringbd_bin, ringbd_extra_args

pytestmark = pytest.mark.ringbd_only

SPEC = "fault:write=1@ENOSPC:memory:1M"
JOURNAL = "/run/systemd/journal/socket"


def serve_once(tmp, args=(), env=None, stderr=None):
    """Serves SPEC with `args`, makes one read and one failing write, stops
    the server with SIGTERM; returns its stderr (or "" when redirected)."""
    sock = os.path.join(tmp, "s.sock")
    err = stderr if stderr is not None else open(os.path.join(tmp, "err"), "w+b")
    p = subprocess.Popen([ringbd_bin(), "serve", *ringbd_extra_args(), "--unix", sock, *args, SPEC],
                         stdout=subprocess.PIPE, stderr=err, env=dict(os.environ, **(env or {})))
    try:
        # The URI on stdout: the server is listening.
        assert p.stdout.readline().strip(), "ringbd printed no URI"
        h = nbd.NBD()
        h.connect_uri("nbd+unix:///?socket=" + sock)
        h.pread(512, 0)
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"x" * 512, 4096)
        assert e.value.errnum == 28, e.value  # ENOSPC
        h.shutdown()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
    if stderr is not None:
        return ""
    err.seek(0)
    text = err.read().decode(errors="replace")
    err.close()
    return text


def lines(text, word):
    return [line for line in text.splitlines() if word in line]


def test_default_level_has_notices_and_warnings_with_their_fields(ringbd, server_kind, shm_tmp):
    out = serve_once(shm_tmp)
    assert all(line.startswith("ringbd: ") for line in out.splitlines()), out
    err = lines(out, "injected fault ENOSPC")
    assert len(err) == 1, out
    for field in ("op=write", "offset=4096", "len=512", "errno=ENOSPC", 'export=""', "conn="):
        assert field in err[0], (field, err[0])
    assert lines(out, "engine "), "no notice (the engine it runs) at the default level:\n" + out
    assert not lines(out, "structured replies"), "a debug event at the default level:\n" + out


def test_quiet_keeps_warnings_only(ringbd, server_kind, shm_tmp):
    out = serve_once(shm_tmp, ["-q"])
    assert lines(out, "errno=ENOSPC"), out
    assert not lines(out, "engine "), "-q kept a notice:\n" + out


def test_verbose_adds_the_negotiation_with_its_fields(ringbd, server_kind, shm_tmp):
    out = serve_once(shm_tmp, ["-v"])
    neg = lines(out, "structured replies")
    assert len(neg) == 1 and 'export=""' in neg[0] and "conn=" in neg[0], out


def test_rust_log_replaces_the_flags(ringbd, server_kind, shm_tmp):
    out = serve_once(shm_tmp, ["-q"], env={"RUST_LOG": "debug"})
    assert lines(out, "structured replies"), "RUST_LOG=debug did not win over -q:\n" + out
    out = serve_once(shm_tmp, env={"RUST_LOG": "error"})
    assert not lines(out, "ENOSPC") and not lines(out, "engine "), out
    out = serve_once(shm_tmp, env={"RUST_LOG": "ringbd_server=[bad"})
    assert lines(out, "RUST_LOG="), "a bad filter was not reported:\n" + out
    assert lines(out, "errno=ENOSPC"), out


def parse_journal_datagram(data):
    """journald's native protocol: KEY=VALUE lines, or KEY, a 64-bit
    little-endian length, the value and a newline (systemd's
    JOURNAL_NATIVE_PROTOCOL)."""
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            k, v = line, data[nl + 9:nl + 9 + n]
            i = nl + 9 + n + 1
        fields[k.decode()] = v.decode(errors="replace")
    return fields


def test_under_the_journal_events_are_native_with_their_fields(ringbd, server_kind, shm_tmp):
    """stderr is a stream socket named by JOURNAL_STREAM, as systemd sets it:
    the events go to journald's socket with CONN, EXPORT, OP, ERRNO as
    journal fields (warnings priority 4, notices 5, as tracing-journald maps levels) and nothing to stderr. Where no journald runs, this test
    listens on journald's socket itself (it needs root for /run)."""
    if os.path.exists(JOURNAL):
        # A real journald: its own record of this process.
        a, b = socket.socketpair()
        st = os.fstat(b.fileno())
        serve_once(shm_tmp, env={"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino)}, stderr=b)
        b.close()
        a.settimeout(1)
        assert a.recv(65536) == b"", "events went to stderr too"
        out = subprocess.run(["journalctl", "-o", "json", "SYSLOG_IDENTIFIER=ringbd", "ERRNO=ENOSPC", "-n", "1"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        rec = json.loads(out.splitlines()[-1])
        assert rec["OP"] == "write" and rec["PRIORITY"] == "4", rec
        return
    made = not os.path.isdir(os.path.dirname(JOURNAL))
    os.makedirs(os.path.dirname(JOURNAL), exist_ok=True)
    j = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        j.bind(JOURNAL)
        j.settimeout(5)
        a, b = socket.socketpair()
        st = os.fstat(b.fileno())
        serve_once(shm_tmp, env={"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino)}, stderr=b)
        b.close()
        a.settimeout(1)
        assert a.recv(65536) == b"", "events went to stderr too"
        records = []
        j.settimeout(0.5)
        while True:
            try:
                data = j.recv(1 << 20)
            except socket.timeout:
                break
            if data:
                records.append(parse_journal_datagram(data))
        err = [r for r in records if r.get("ERRNO") == "ENOSPC"]
        assert len(err) == 1, records
        r = err[0]
        assert r["OP"] == "write" and r["OFFSET"] == "4096" and r["LEN"] == "512", r
        assert r["EXPORT"] == '""' and "CONN" in r, r
        assert r["PRIORITY"] == "4" and r["SYSLOG_IDENTIFIER"] == "ringbd", r
        assert "injected fault ENOSPC" in r["MESSAGE"], r
        assert any(x.get("MESSAGE", "").startswith("engine ") and x["PRIORITY"] == "5" for x in records), records
    finally:
        j.close()
        os.unlink(JOURNAL)
        if made:
            shutil.rmtree(os.path.dirname(JOURNAL), ignore_errors=True)
            if not os.listdir("/run/systemd"):
                os.rmdir("/run/systemd")
