"""ringbd's own command line: listeners and their readiness lines, captive
mode (--run) and signal handling.  These are ringbd's interface, not NBD
protocol, so they are ringbd-only (nbdkit's CLI differs; see conftest.py)."""

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest

from conftest import ringbd_extra_args

from helpers import MiB, run

pytestmark = pytest.mark.ringbd_only

SAFETY_TIMEOUT = 20  # seconds; a hang guard only, never a synchronisation


class Proc:
    """A `ringbd serve` process whose stdout is read line by line from the
    raw pipe (no Python-level buffering that select() cannot see)."""

    def __init__(self, argv):
        # stderr goes to a file: a chatty server can never block on a full pipe
        self.err = tempfile.TemporaryFile()
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.err,
                                  stdin=subprocess.DEVNULL)
        self.buf = b""

    def read_line(self):
        """Next stdout line: the readiness signal ('' on EOF)."""
        fd = self.p.stdout.fileno()
        while b"\n" not in self.buf:
            ready, _, _ = select.select([fd], [], [], SAFETY_TIMEOUT)
            assert ready, "ringbd printed no readiness line within %ds" % SAFETY_TIMEOUT
            chunk = os.read(fd, 4096)
            if not chunk:
                line, self.buf = self.buf, b""
                return line.decode()
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode() + "\n"


@pytest.fixture
def spawn(ringbd, server_kind):
    """spawn(args...) -> Proc running `ringbd serve ...`, killed at teardown."""
    assert server_kind == "ringbd"
    procs = []

    def _spawn(*args):
        proc = Proc([ringbd, "serve", *ringbd_extra_args(), *args])
        procs.append(proc)
        return proc

    yield _spawn
    for proc in procs:
        if proc.p.poll() is None:
            proc.p.kill()
            proc.p.wait()
        proc.p.stdout.close()
        proc.err.close()


def read_line(proc):
    return proc.read_line()


def finish(proc, sig):
    """Send `sig`, wait for exit; -> (status, rest of stdout, stderr)."""
    proc.p.send_signal(sig)
    out, _ = proc.p.communicate(timeout=SAFETY_TIMEOUT)
    out = (proc.buf + out).decode(errors="replace")
    proc.err.seek(0)
    err = proc.err.read().decode(errors="replace")
    assert "panicked" not in err, err
    return proc.p.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_unix_listener_ready_line_and_clean_signal_exit(spawn, tmp_path, sig):
    sock = str(tmp_path / "s.sock")
    p = spawn("memory:64M", "--unix", sock)
    line = read_line(p)
    assert line == "nbd+unix:///?socket=%s\n" % sock
    assert run(["nbdinfo", "--size", line.strip()]).stdout.strip() == str(64 * MiB)
    rc, out, err = finish(p, sig)
    assert rc == 0, err


def test_sigterm_on_idle_server_exits_zero(spawn, tmp_path):
    sock = str(tmp_path / "idle.sock")
    p = spawn("memory:1G", "--unix", sock)
    assert read_line(p).strip() == "nbd+unix:///?socket=%s" % sock
    rc, _, err = finish(p, signal.SIGTERM)   # no client ever connected
    assert rc == 0, err


def test_tcp_listener_ready_line(spawn):
    # pick a free port (tiny race with other processes is acceptable)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = spawn("memory:16M", "--listen", "127.0.0.1:%d" % port)
    line = read_line(p)
    assert line == "nbd://127.0.0.1:%d\n" % port
    assert run(["nbdinfo", "--size", line.strip()]).stdout.strip() == str(16 * MiB)
    rc, _, err = finish(p, signal.SIGTERM)
    assert rc == 0, err


def test_unix_and_tcp_listeners_one_line_each(spawn, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock = str(tmp_path / "both.sock")
    p = spawn("memory:16M", "--unix", sock, "--listen", "127.0.0.1:%d" % port)
    lines = {read_line(p).strip(), read_line(p).strip()}
    assert lines == {"nbd+unix:///?socket=%s" % sock, "nbd://127.0.0.1:%d" % port}
    for uri in lines:
        assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(16 * MiB)
    rc, _, err = finish(p, signal.SIGTERM)
    assert rc == 0, err


def captive(ringbd, args, cmd, tmp_path):
    sock = str(tmp_path / "captive.sock")
    p = subprocess.run([ringbd, "serve", *ringbd_extra_args(), *args, "--unix", sock, "--run", cmd],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       stdin=subprocess.DEVNULL, timeout=60)
    assert "panicked" not in p.stderr, p.stderr
    return p, sock


def test_run_nbdinfo_exit_zero(ringbd, server_kind, tmp_path):
    p, sock = captive(ringbd, ["memory:64M"], 'nbdinfo "$uri"', tmp_path)
    assert p.returncode == 0, p.stderr
    assert "export-size: %d" % (64 * MiB) in p.stdout
    assert "can_multi_conn: true" in p.stdout


@pytest.mark.parametrize("cmd,status", [("false", 1), ("exit 7", 7), ("true", 0)])
def test_run_exit_status_is_commands(ringbd, server_kind, tmp_path, cmd, status):
    p, _ = captive(ringbd, ["memory:16M"], cmd, tmp_path)
    assert p.returncode == status, p.stderr


def test_run_environment(ringbd, server_kind, tmp_path):
    out = tmp_path / "env.txt"
    p, sock = captive(ringbd, ["memory:16M"],
                      'printf "%%s\\n%%s\\n" "$uri" "$unixsocket" > %s' % out, tmp_path)
    assert p.returncode == 0, p.stderr
    uri, unixsocket = out.read_text().splitlines()
    assert unixsocket == sock
    assert uri == "nbd+unix:///?socket=%s" % sock


def test_run_read_only_and_named_exports(ringbd, server_kind, tmp_path):
    cmd = ('nbdinfo --is read-only "$uri" && '
           'test "$(nbdinfo --size "nbd+unix:///a?socket=$unixsocket")" = %d && '
           'test "$(nbdinfo --size "nbd+unix:///b?socket=$unixsocket")" = %d'
           % (16 * MiB, 32 * MiB))
    p, _ = captive(ringbd, ["null:1G", "--export", "a=memory:16M", "--export", "b=null:32M",
                            "--read-only"], cmd, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr


def test_socket_activation_ready_line(server):
    """Under LISTEN_FDS=1 the inherited socket is the only listener, and it
    gets the one readiness line (read after exit, when stdout is complete)."""
    assert server.kind == "ringbd"
    run(["nbdinfo", "--size", server.uri()])
    assert server.stop() == 0
    assert server.stdout().splitlines() == [server.uri()]


def _stats_after_load(ringbd, tmp_path, *args):
    """Runs fio (4k randread, 2 jobs x qd 32, 1 s) against `ringbd serve
    --engine uring ARGS` in captive mode; returns the exit-time counters."""
    sock = str(tmp_path / "stats.sock")
    fio = ("fio --name=s --ioengine=nbd --uri=\"$uri\" --rw=randread --bs=4k --iodepth=32 "
           "--numjobs=2 --size=32M --time_based --runtime=1 --group_reporting >/dev/null")
    p = subprocess.run([ringbd, "serve", "--engine", "uring", *args, "memory:64M", "--unix", sock, "--run", fio],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       stdin=subprocess.DEVNULL, timeout=60)
    assert p.returncode == 0, p.stderr
    line = [l for l in p.stderr.splitlines() if "stats:" in l][-1]
    stats = {}
    for part in line.split("stats:", 1)[1].split(","):
        key, value = part.strip().rsplit(" ", 1)
        stats[key] = float(value)
    return stats, p.stderr


@pytest.mark.ringbd_only
def test_uring_counters_show_batching(ringbd, server_kind, tmp_path):
    stats, err = _stats_after_load(ringbd, tmp_path)
    assert "engine io_uring" in err
    assert stats["requests"] > 1000
    # Pipelined requests arrive several per receive completion and their
    # replies leave several per send call.
    assert stats["requests/recv completion"] > 1.0, stats
    assert stats["replies/send"] > 1.0, stats


@pytest.mark.ringbd_only
def test_no_coalesce_sends_one_reply_per_call(ringbd, server_kind, tmp_path):
    stats, _ = _stats_after_load(ringbd, tmp_path, "--no-coalesce")
    assert stats["requests"] > 1000
    assert stats["replies/send"] <= 1.0, stats


@pytest.mark.ringbd_only
def test_zero_copy_sends_over_tcp_are_exercised_and_correct(ringbd, server_kind, tmp_path):
    """Large reads over TCP go out with SENDMSG_ZC; over loopback the kernel
    copies (reported by the notification), after which the connection
    switches to plain sends. Either way the data must be right."""
    img = tmp_path / "rand.img"
    img.write_bytes(os.urandom(16 * MiB))
    cmd = ('qemu-img convert -n -f raw -O raw "%s" "$uri" && '
           'qemu-img compare -f raw -F raw "%s" "$uri"' % (img, img))
    p = subprocess.run([ringbd, "serve", "--engine", "uring", "memory:16M", "--listen", "127.0.0.1:0",
                        "--run", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Images are identical" in p.stdout
    line = [l for l in p.stderr.splitlines() if "stats:" in l][-1]
    zc = int(line.split("zero-copy sends ")[1].split(",")[0])
    copied = int(line.split("zero-copy sends the kernel copied ")[1].split(",")[0])
    assert zc > 0, line
    assert copied == zc, "loopback: the kernel copies every zero-copy send: " + line


@pytest.mark.ringbd_only
def test_file_export_on_a_disk_filesystem_runs_its_io_on_the_ring(ringbd, server_kind):
    """A file export on a disk filesystem (not tmpfs) has its reads, writes
    and flushes run as io_uring operations; data written through it reads
    back, and lands in the file."""
    d = tempfile.mkdtemp(prefix="ringbd-disk-", dir="/var/tmp")
    try:
        img, backing = os.path.join(d, "rand.img"), os.path.join(d, "export.img")
        with open(img, "wb") as f:
            f.write(os.urandom(16 * MiB))
        with open(backing, "wb") as f:
            f.truncate(16 * MiB)
        fio = ("fio --name=v --ioengine=nbd --uri=\"$uri\" --rw=randwrite --bs=4k --iodepth=16 "
               "--size=8M --offset=8M --verify=crc32c --verify_state_save=0 >/dev/null")
        cmd = ('qemu-img convert -n -f raw -O raw "%s" "$uri" && qemu-img compare -f raw -F raw "%s" "$uri" '
               '&& %s' % (img, img, fio))
        p = subprocess.run([ringbd, "serve", "--engine", "uring", "file:" + backing, "--listen", "127.0.0.1:0",
                            "--run", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           stdin=subprocess.DEVNULL, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "Images are identical" in p.stdout
        stats = file_stats(p.stderr)
        assert stats["ops"] > 0, p.stderr
        assert stats["registered"] > 0, "reads and writes use the ring's registered buffers: " + p.stderr
        assert stats["direct"] == 0, p.stderr
        with open(img, "rb") as a, open(backing, "rb") as b:
            assert a.read(8 * MiB) == b.read(8 * MiB)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_trims_and_zeroing_of_a_disk_file_export_run_on_the_ring(ringbd, server_kind):
    """Trim and write-zeroes (with and without FUA) on a file export on a disk
    filesystem are fallocate operations on the ring: the ranges read back as
    zeroes, the trimmed and zeroed ranges are deallocated in the file, and
    the ring counted the operations."""
    d = tempfile.mkdtemp(prefix="ringbd-falloc-", dir="/var/tmp")
    try:
        backing = os.path.join(d, "export.img")
        with open(backing, "wb") as f:
            f.write(b"\xaa" * (8 * MiB))
            os.fsync(f.fileno())
        script = ("import nbd,sys\n"
                  "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
                  "h.trim(2 * 1048576, 0)\n"
                  "h.trim(1048576, 3 * 1048576, nbd.CMD_FLAG_FUA)\n"
                  "h.zero(1048576, 5 * 1048576)\n"
                  "h.zero(4096, 7 * 1048576, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)\n"
                  "assert h.pread(2 * 1048576, 0) == bytes(2 * 1048576)\n"
                  "assert h.pread(1048576, 3 * 1048576) == bytes(1048576)\n"
                  "assert h.pread(1048576, 5 * 1048576) == bytes(1048576)\n"
                  "assert h.pread(4096, 2 * 1048576) == b'\\xaa' * 4096\n"
                  "assert h.pread(4096, 7 * 1048576) == bytes(4096)\n"
                  "assert h.pread(4096, 6 * 1048576) == b'\\xaa' * 4096\n"
                  "h.shutdown()\n")
        path = os.path.join(d, "t.py")
        with open(path, "w") as f:
            f.write(script)
        p = subprocess.run([ringbd, "serve", "--engine", "uring", "file:" + backing, "--listen", "127.0.0.1:0",
                            "--run", '/usr/bin/python3 %s "$uri"' % path],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           stdin=subprocess.DEVNULL, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        assert file_stats(p.stderr)["ops"] >= 6, p.stderr  # 4 fallocates + 2 fsyncs
        with open(backing, "rb") as f:
            data = f.read()
        for start, end, byte in [(0, 2, 0), (2, 3, 0xaa), (3, 4, 0), (4, 5, 0xaa), (5, 6, 0), (6, 7, 0xaa)]:
            assert data[start * MiB:end * MiB] == bytes([byte]) * ((end - start) * MiB), (start, end)
        assert data[7 * MiB:7 * MiB + 4096] == bytes(4096)
        assert data[7 * MiB + 4096:] == b"\xaa" * (MiB - 4096)
        # Punched: the 4 MiB trimmed or zeroed without NO_HOLE hold no blocks.
        assert os.stat(backing).st_blocks * 512 <= 4 * MiB + 64 * 1024
    finally:
        shutil.rmtree(d, ignore_errors=True)


def file_stats(stderr):
    """The file-operation counters of the last stats line."""
    line = [l for l in stderr.splitlines() if "stats:" in l][-1]
    m = re.search(r"file ops on the ring (\d+), file ops with registered buffers (\d+), file ops with O_DIRECT (\d+)", line)
    assert m, line
    return {"ops": int(m.group(1)), "registered": int(m.group(2)), "direct": int(m.group(3))}


def resident_bytes(path):
    """Bytes of `path` in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    return int(out.strip())


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_direct_file_export_bypasses_the_page_cache(ringbd, server_kind, direct):
    """`file:PATH,direct` reads and writes aligned requests with O_DIRECT:
    after reading and writing a whole image through it, almost none of the
    file is in the page cache; the same run without `,direct` leaves most of
    it cached (the control that shows the check can fail). Data round-trips
    either way, unaligned requests included."""
    d = tempfile.mkdtemp(prefix="ringbd-direct-", dir="/var/tmp")
    try:
        img, backing = os.path.join(d, "rand.img"), os.path.join(d, "export.img")
        data = os.urandom(16 * MiB)
        for path in (img, backing):
            with open(path, "wb") as f:
                f.write(data if path == img else b"\0" * (16 * MiB))
                f.flush()
                os.fsync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert resident_bytes(backing) < MiB
        # qemu-img writes and compares the image (aligned), then nbdsh does
        # one unaligned write and reads it back through the export.
        unaligned = ("/usr/bin/python3 -c 'import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); "
                     "h.pwrite(b\"xyz\", 4097); assert h.pread(3, 4097) == b\"xyz\"; h.shutdown()' \"$uri\"")
        cmd = ('qemu-img convert -n -f raw -O raw "%s" "$uri" && qemu-img compare -f raw -F raw "%s" "$uri" && %s'
               % (img, img, unaligned))
        spec = "file:" + backing + (",direct" if direct else "")
        p = subprocess.run([ringbd, "serve", "--engine", "uring", spec, "--listen", "127.0.0.1:0", "--run", cmd],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           stdin=subprocess.DEVNULL, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "Images are identical" in p.stdout
        stats = file_stats(p.stderr)
        cached = resident_bytes(backing)
        if direct:
            assert stats["direct"] > 0, p.stderr
            assert cached < 2 * MiB, "%d bytes of a 16 MiB O_DIRECT export in the page cache" % cached
        else:
            assert stats["direct"] == 0, p.stderr
            assert cached > 8 * MiB, "the buffered control run cached only %d bytes" % cached
        expect = bytearray(data)
        expect[4097:4100] = b"xyz"
        with open(backing, "rb") as b:
            assert b.read() == bytes(expect)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_direct_on_a_filesystem_without_o_direct_is_a_clear_error(ringbd, server_kind):
    """`,direct` on a filesystem that refuses O_DIRECT fails at start with a
    message that says so (and how to do without)."""
    probe = os.path.join("/proc/self", "status")
    p = subprocess.run([ringbd, "serve", "file:%s,direct" % probe, "--unix", "/nonexistent/x.sock"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                       timeout=30)
    assert p.returncode != 0
    assert "does not support O_DIRECT" in p.stderr, p.stderr


def test_generate_man_pages_and_completions(ringbd, server_kind, tmp_path):
    """`ringbd generate man DIR`: a page per subcommand that man renders
    without warnings and that lists every flag `--help` lists; `generate
    completions SHELL`: scripts that know the subcommands and flags (bash's
    parses with `bash -n`)."""
    subprocess.run([ringbd, "generate", "man", str(tmp_path)], check=True, timeout=30)
    pages = {p.name for p in tmp_path.iterdir()}
    subs = ["serve", "attach", "detach", "list", "info", "copy", "bench", "generate"]
    assert pages == {"ringbd.1"} | {"ringbd-%s.1" % s for s in subs}, pages
    env = dict(os.environ, MANWIDTH="200", LANG="C", LC_ALL="C")
    for sub in ("serve", "attach", "copy"):
        r = subprocess.run(["man", "--warnings", "-l", str(tmp_path / ("ringbd-%s.1" % sub))],
                           capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode == 0 and not r.stderr.strip(), "man ringbd-%s: %s" % (sub, r.stderr)
        helptext = subprocess.run([ringbd, sub, "--help"], capture_output=True, text=True, timeout=30).stdout
        flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)", helptext, re.M))
        assert flags, "no flags in `ringbd %s --help`" % sub
        missing = sorted(f for f in flags if f not in r.stdout)
        assert not missing, "ringbd-%s.1 lacks %s" % (sub, missing)
    for shell in ("bash", "zsh", "fish"):
        script = subprocess.run([ringbd, "generate", "completions", shell], capture_output=True,
                                text=True, check=True, timeout=30).stdout
        # (fish names long options without their dashes: `-l reply-memory`)
        assert "attach" in script and "reply-memory" in script, "%s completions" % shell
    bash = subprocess.run([ringbd, "generate", "completions", "bash"], capture_output=True,
                          text=True, check=True, timeout=30).stdout
    subprocess.run(["bash", "-n"], input=bash, text=True, check=True, timeout=30)
