"""`ringbd serve --config FILE` (docs/daemon.md): serving from a TOML file,
flags over the file, `--check-config` errors that name file:line and key,
and SIGHUP reloads that add and remove exports without touching the
connections to the others.  ringbd's own interface: ringbd-only."""

import os
import re
import signal
import time

import pytest

from helpers import MiB, nbdinfo_json, run
from test_ringbd_cli import SAFETY_TIMEOUT, finish, spawn  # noqa: F401 (spawn is a fixture)

pytestmark = pytest.mark.ringbd_only


def write_config(path, sock, exports, extra=""):
    """A config file listening on `sock` with `exports`: (name, spec, options)."""
    text = 'unix = "%s"\n%s\n' % (sock, extra)
    for name, spec, opts in exports:
        text += '[[export]]\nname = "%s"\nspec = "%s"\n%s\n' % (name, spec, opts)
    path.write_text(text)


def uri(sock, export):
    return "nbd+unix:///%s?socket=%s" % (export, sock)


def stderr_of(proc):
    proc.err.seek(0)
    return proc.err.read().decode(errors="replace")


def wait_for_log(proc, pattern, count=1):
    """Wait (bounded) until `pattern` has appeared `count` times on stderr."""
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while len(re.findall(pattern, stderr_of(proc))) < count:
        assert proc.p.poll() is None, "ringbd exited:\n" + stderr_of(proc)
        assert time.monotonic() < deadline, "no %r on stderr within %ds:\n%s" % (
            pattern, SAFETY_TIMEOUT, stderr_of(proc))
        time.sleep(0.02)
    return stderr_of(proc)


def listed(sock):
    return {e["export-name"]: e for e in nbdinfo_json("--list", uri(sock, ""))["exports"]}


def test_serve_from_a_config_file(spawn, tmp_path):
    sock = str(tmp_path / "s.sock")
    conf = tmp_path / "ringbd.toml"
    write_config(conf, sock, [
        ("a", "memory:64M", 'description = "disk a"'),
        ("b", "null:1G", "read_only = true"),
    ], extra='[limits]\nmax_connections = 4\nhandshake_timeout = "5s"\n')
    p = spawn("--config", str(conf))
    assert p.read_line() == "nbd+unix:///?socket=%s\n" % sock
    got = listed(sock)
    assert set(got) == {"a", "b"}
    assert got["a"]["description"] == "disk a"
    assert got["a"]["export-size"] == 64 * MiB and not got["a"]["is_read_only"]
    assert got["b"]["is_read_only"]
    rc, _, err = finish(p, signal.SIGTERM)
    assert rc == 0, err


def test_flags_win_over_the_file_and_add_exports(spawn, tmp_path):
    conf = tmp_path / "ringbd.toml"
    write_config(conf, str(tmp_path / "file.sock"), [("a", "memory:16M", "")])
    sock = str(tmp_path / "flag.sock")
    p = spawn("--config", str(conf), "--unix", sock, "--export", "c=null:1M", "--read-only")
    assert p.read_line() == "nbd+unix:///?socket=%s\n" % sock
    got = listed(sock)
    assert set(got) == {"a", "c"}
    assert got["a"]["is_read_only"] and got["c"]["export-size"] == MiB
    rc, _, err = finish(p, signal.SIGTERM)
    assert rc == 0, err


@pytest.mark.parametrize("text, where", [
    ('[[export]]\nspec = "memory:1G"\n\n[limits]\nmax_conections = 3\n',
     r":5:1: key limits\.max_conections: unknown field"),
    ('[[export]]\nspec = "memory:1G"\n[engine]\nthreads = "two"\n',
     r":4:11: key engine\.threads: invalid type: string"),
    ('[[export]]\nname = "a"\nspec = "floppy:1G"\n',
     r":3:8: key export\[0\]\.spec: export spec \"floppy:1G\""),
    ('[[export]]\nname = "a"\nspec = "null:1"\n[[export]]\nname = "a"\nspec = "null:2"\n',
     r":5:8: key export\[1\]\.name: export \"a\" is defined twice"),
], ids=["unknown-key", "wrong-type", "bad-spec", "duplicate"])
def test_check_config_names_file_line_and_key(ringbd, server_kind, tmp_path, text, where):
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    p = run([ringbd, "serve", "--check-config", conf], check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert re.search(re.escape(str(conf)) + where, p.stderr), p.stderr
    assert "panicked" not in p.stderr


def test_check_config_checks_what_it_can_without_serving(ringbd, server_kind, tmp_path):
    sock = str(tmp_path / "never.sock")
    conf = tmp_path / "ringbd.toml"
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 4096)
    write_config(conf, sock, [("a", "memory:1G", ""), ("f", "file:%s" % img, "")])
    p = run([ringbd, "serve", "--check-config", conf])
    assert p.stdout.startswith("%s: ok: 2 export(s)" % conf), p.stdout
    assert "that file: exports exist" in p.stdout
    assert not os.path.exists(sock), "--check-config must not bind"
    # A file export that is missing, TLS credentials that are not there.
    img.unlink()
    p = run([ringbd, "serve", "--check-config", conf], check=False)
    assert p.returncode == 1 and str(img) in p.stderr, p.stderr
    write_config(conf, sock, [("a", "memory:1G", "")],
                 extra='[tls]\ncertificates = "%s"\n' % (tmp_path / "no-pki"))
    p = run([ringbd, "serve", "--check-config", conf], check=False)
    assert p.returncode == 1 and "TLS" in p.stderr, p.stderr


def test_reload_adds_and_removes_exports_and_keeps_connections(spawn, tmp_path, nbd_handle):
    sock = str(tmp_path / "s.sock")
    conf = tmp_path / "ringbd.toml"
    write_config(conf, sock, [("a", "memory:16M", ""), ("b", "memory:16M", "")])
    p = spawn("--config", str(conf))
    p.read_line()
    h = nbd_handle(uri(sock, "a"))
    data = os.urandom(64 * 1024)
    h.pwrite(data, 4096)

    write_config(conf, sock, [("a", "memory:16M", ""), ("c", "null:1M", "")])
    p.p.send_signal(signal.SIGHUP)
    err = wait_for_log(p, r"reload: ")
    assert 'reload: added "c"; removed "b"; kept "a"' in err, err

    # The connection to "a" was not touched, and "a" kept its backend.
    assert h.pread(len(data), 4096) == data
    h.pwrite(data, 8 * MiB)
    assert nbd_handle(uri(sock, "a")).pread(len(data), 4096) == data
    assert set(listed(sock)) == {"a", "c"}
    assert run(["nbdinfo", "--size", uri(sock, "c")]).stdout.strip() == str(MiB)
    refused = run(["nbdinfo", "--size", uri(sock, "b")], check=False)
    assert refused.returncode != 0, refused.stdout

    # A broken file: logged with its line, nothing changes.
    conf.write_text(conf.read_text() + "\n[limits]\nmax_connections = \"many\"\n")
    p.p.send_signal(signal.SIGHUP)
    err = wait_for_log(p, r"reload: ", count=2)
    assert re.search(re.escape(str(conf)) + r":\d+:\d+: key limits\.max_connections: .*; exports unchanged",
                     err), err
    assert set(listed(sock)) == {"a", "c"}
    assert h.pread(len(data), 8 * MiB) == data
    rc, _, err = finish(p, signal.SIGTERM)
    assert rc == 0, err


def test_a_client_of_a_removed_export_keeps_working_until_it_leaves(spawn, tmp_path, nbd_handle):
    sock = str(tmp_path / "s.sock")
    conf = tmp_path / "ringbd.toml"
    write_config(conf, sock, [("a", "memory:16M", ""), ("b", "memory:16M", "")])
    p = spawn("--config", str(conf))
    p.read_line()
    hb = nbd_handle(uri(sock, "b"))
    hb.pwrite(b"x" * 4096, 0)
    write_config(conf, sock, [("a", "memory:16M", "")])
    p.p.send_signal(signal.SIGHUP)
    wait_for_log(p, r'reload: removed "b"')
    assert hb.pread(4096, 0) == b"x" * 4096
    hb.pwrite(b"y" * 4096, 4096)
    hb.flush()
    assert run(["nbdinfo", "--size", uri(sock, "b")], check=False).returncode != 0
    rc, _, err = finish(p, signal.SIGTERM)
    assert rc == 0, err
