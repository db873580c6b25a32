"""Access control and limits (docs/access.md): --max-connections, the
handshake deadline, --user/--group, the Unix socket's mode, --tls-authz
and oversized options.

Against nbdkit where it has the feature: its limit filter for the
connection limit, -u/-g for dropping privileges. The rest is ringbd's own
(marked ringbd_only, with the reason on each test).
"""

import os
import socket
import struct
import subprocess
import time

import pytest

import nbdraw
import tls_certs
from conftest import ringbd_bin, ringbd_extra_args
from helpers import run, server_still_serves

TIMEOUT = 60


def greeted(srv):
    """A raw client that got the server's greeting (it was admitted)."""
    c = nbdraw.RawClient(srv.address())
    c.read_greeting()
    return c


def refused_at_once(srv):
    """Connects and returns True if the server closed without a byte."""
    c = nbdraw.RawClient(srv.address())
    try:
        return c.s.recv(18) == b""
    except ConnectionResetError:
        return True
    finally:
        c.close()


def limit_args(kind, n):
    if kind == "nbdkit":
        return dict(args=["--filter=limit"], params=["limit=%d" % n])
    return dict(args=["--max-connections", str(n)])


def admitted(srv):
    """A client in transmission. Connects until greeted: a place may still
    be held by a client that just left (the start-up check's connection)."""
    give_up = time.monotonic() + 10
    while True:
        c = nbdraw.RawClient(srv.address())
        try:
            c.handshake_start()
            info = c.go()
            assert info["size"] == 16 << 20
            return c
        except (nbdraw.Closed, ConnectionResetError, BrokenPipeError):
            c.close()
            assert time.monotonic() < give_up, "no place came free for a client"
            time.sleep(0.01)


def test_max_connections_refuses_extra_clients_and_keeps_the_others(start_server, server_kind):
    """ringbd counts connections from accept; nbdkit's limit filter counts
    those past the handshake, so the admitted clients finish theirs first."""
    srv = start_server({"": "memory:16M"}, **limit_args(server_kind, 2))
    clients = []
    try:
        clients.append(admitted(srv))
        clients.append(admitted(srv))
        for _ in range(3):
            assert refused_at_once(srv), "a third client was served over the limit of 2"
        r = run(["nbdinfo", "--size", srv.uri()], check=False, timeout=TIMEOUT)
        assert r.returncode != 0, "nbdinfo was served over the limit"
        # The admitted clients are unaffected.
        for c in clients:
            c.request(nbdraw.CMD_WRITE, 4096, 4, payload=b"live")
            assert c.read_simple_reply()[0] == 0
            c.request(nbdraw.CMD_READ, 4096, 4)
            assert c.read_simple_reply()[0] == 0 and c.recv_exact(4) == b"live"
        # A place frees when a client leaves: a new client is served again.
        first = clients.pop(0)
        first.request(nbdraw.CMD_DISC)
        assert first.wait_eof()
        first.close()
        clients.append(admitted(srv))
    finally:
        for c in clients:
            c.close()
    if server_kind == "ringbd":
        srv.stop()
        assert "refused over --max-connections 2" in srv.stderr(), srv.stderr()


@pytest.mark.ringbd_only  # nbdkit 1.32 has no configurable handshake deadline
def test_handshake_deadline_drops_stalled_clients_and_serves_good_ones(start_server, server_kind):
    deadline = 1.5
    srv = start_server({"": "memory:16M"}, args=["--handshake-timeout", "%gs" % deadline])
    t0 = time.monotonic()
    # A client in transmission before the deadline is never cut off.
    done = nbdraw.RawClient(srv.address())
    done.handshake_start()
    done.go()
    stalled = []
    # Stalls after the greeting, after half the client flags, and mid-option.
    for data in (b"", b"\x00\x00",
                 struct.pack(">I", nbdraw.FLAG_FIXED_NEWSTYLE) +
                 struct.pack(">QII", nbdraw.IHAVEOPT, nbdraw.OPT_GO, 100) + b"\x00\x00"):
        c = nbdraw.RawClient(srv.address(), timeout=30)
        c.read_greeting()
        c.send(data)
        stalled.append(c)
    # A slowloris: keeps sending a byte of a LIST option every 200 ms.
    slow = nbdraw.RawClient(srv.address(), timeout=0.2)
    slow.read_greeting()
    slow.send(struct.pack(">I", nbdraw.FLAG_FIXED_NEWSTYLE))
    # Good clients are served meanwhile.
    server_still_serves(srv)
    trickle = struct.pack(">QII", nbdraw.IHAVEOPT, nbdraw.OPT_LIST, 4096) + b"x" * 4096
    slow_closed_at = None
    for b in trickle:
        try:
            slow.send(bytes([b]))
            if slow.s.recv(100) == b"":
                slow_closed_at = time.monotonic()
                break
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            slow_closed_at = time.monotonic()
            break
    assert slow_closed_at is not None, "the slowloris client was never dropped"
    for c in stalled:
        assert c.wait_eof()
    elapsed = time.monotonic() - t0
    assert deadline - 0.1 <= slow_closed_at - t0 and elapsed < deadline + 8, elapsed
    # The client that finished its handshake in time still works.
    done.request(nbdraw.CMD_READ, 0, 512)
    assert done.read_simple_reply()[0] == 0 and done.recv_exact(512) == bytes(512)
    for c in stalled + [slow, done]:
        c.close()
    server_still_serves(srv)
    srv.stop()
    assert "handshake not finished within" in srv.stderr(), srv.stderr()


def proc_ids(pid):
    ids = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                ids[key] = value.split()
    return ids


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.parametrize("who", ["names", "numbers"])
def test_user_and_group_drop_root_and_the_server_still_serves(start_server, server_kind, nbdsh, who):
    user, group = ("nobody", "nogroup") if who == "names" else ("65534", "65534")
    if server_kind == "nbdkit":
        args = ["-u", user, "-g", group]
    else:
        args = ["--user", user, "--group", group]
    srv = start_server({"": "memory:16M"}, args=args)
    ids = proc_ids(srv.proc.pid)
    assert ids["Uid"] == ["65534"] * 4, ids
    assert ids["Gid"] == ["65534"] * 4, ids
    assert ids["Groups"] in ([], ["65534"]), ids
    nbdsh("-u", srv.uri(), "-c", "h.pwrite(b'x' * 4096, 0); assert h.pread(4096, 0) == b'x' * 4096")


def serve_directly(args, spec="memory:1M"):
    """ringbd serve with `args`, started by hand (no socket activation):
    (process, first stdout line); the line is printed once it listens."""
    p = subprocess.Popen([ringbd_bin(), "serve"] + ringbd_extra_args() + args + [spec],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, p.stdout.readline().strip()


def stop_directly(p):
    p.terminate()
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "panicked" not in err, err
    return err


@pytest.mark.ringbd_only  # ringbd's own flag (nbdkit creates the socket with the umask)
@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user needs root")
def test_unix_socket_mode(server_kind, shm_tmp):
    os.chmod(shm_tmp, 0o755)  # others may reach the socket; its mode decides
    path = os.path.join(shm_tmp, "nbd.sock")
    for args, mode in (([], 0o600), (["--unix-mode", "0660"], 0o660), (["--unix-mode", "666"], 0o666)):
        p, line = serve_directly(["--unix", path] + args)
        try:
            assert line.startswith("nbd+unix://"), line
            assert os.stat(path).st_mode & 0o7777 == mode, oct(os.stat(path).st_mode)
            r = run(["nbdinfo", "--size", line], check=False, timeout=TIMEOUT)
            assert r.returncode == 0 and r.stdout.strip() == str(1 << 20), r.stderr
            # As nobody (not the owner, not in root's group): only 0666 lets it in.
            r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                "nbdinfo", "--size", line], capture_output=True, text=True, timeout=TIMEOUT)
            if mode == 0o666:
                assert r.returncode == 0, r.stderr
            else:
                assert r.returncode != 0 and "ermission denied" in r.stderr, r.stdout + r.stderr
        finally:
            stop_directly(p)
        assert not os.path.exists(path)


@pytest.mark.ringbd_only  # ringbd's own messages
def test_bad_access_options_fail_clearly(server_kind, tmp_path):
    for args, message in (
        (["--user", "no-such-user-ringbd"], 'no user named "no-such-user-ringbd"'),
        (["--group", "no-such-group-ringbd"], 'no group named "no-such-group-ringbd"'),
        (["--tls-certificates", str(tmp_path), "--tls-authz", "CN=x"], "--tls-authz needs --tls-verify-peer"),
        (["--unix-mode", "999"], "octal"),
        (["--max-connections", "0"], "--max-connections"),
    ):
        r = run([ringbd_bin(), "serve", "--listen", "127.0.0.1:0"] + args + ["memory:1M"],
                check=False, timeout=TIMEOUT)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
        assert "panicked" not in r.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server and two clients, "client" and "other-client"."""
    base = str(tmp_path_factory.mktemp("pki"))
    sdir, cdir = tls_certs.make_pki(base, more_clients=("other-client",))
    return {"server": sdir, "client": cdir, "other": os.path.join(base, "other-client")}


def tls_uri(srv, certdir):
    return "nbds://127.0.0.1:%d/?tls-certificates=%s" % (srv.port, certdir)


@pytest.mark.ringbd_only  # nbdkit 1.32 has no client certificate allow list
def test_tls_authz_serves_listed_subjects_only(start_server, server_kind, pki, tmp_path):
    client_dn = tls_certs.subject(os.path.join(pki["client"], "client-cert.pem"))
    other_dn = tls_certs.subject(os.path.join(pki["other"], "client-cert.pem"))
    # RFC 4514 order, most specific first, as qemu prints it.
    assert client_dn == "CN=client,O=ringbd tests", client_dn
    assert other_dn == "CN=other-client,O=ringbd tests", other_dn
    tls = {"mode": "require", "dir": pki["server"], "verify_peer": True}

    srv = start_server({"": "memory:1M", "secret-name": "memory:1M"}, tls=tls,
                       args=["--tls-authz", client_dn, "--tls-authz", "CN=someone-else"])
    r = run(["nbdinfo", "--size", tls_uri(srv, pki["client"])], check=False, timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout.strip() == str(1 << 20), r.stderr
    r = run(["nbdinfo", "--list", tls_uri(srv, pki["other"])], check=False, timeout=TIMEOUT)
    assert r.returncode != 0, r.stdout
    assert "secret-name" not in r.stdout
    # Raw: the unlisted client's TLS handshake ends in an alert or a hang-up,
    # and no option gets an answer.
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(pki["other"], "ca-cert.pem"))
    ctx.load_cert_chain(os.path.join(pki["other"], "client-cert.pem"),
                        os.path.join(pki["other"], "client-key.pem"))
    c = nbdraw.RawClient(srv.address())
    try:
        c.handshake_start()
        assert [t for t, _ in c.option_expect_final(nbdraw.OPT_STARTTLS)] == [nbdraw.REP_ACK]
        got = b""
        try:
            t = ctx.wrap_socket(c.s, server_hostname="127.0.0.1")
            t.sendall(struct.pack(">QII", nbdraw.IHAVEOPT, nbdraw.OPT_LIST, 0))
            while True:
                chunk = t.recv(4096)
                if not chunk:
                    break
                got += chunk
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            pass  # the access_denied alert, or the hang-up after it
        assert got == b"", got
    finally:
        c.close()
    srv.stop()
    err = srv.stderr()
    assert '"CN=other-client,O=ringbd tests" is not in --tls-authz' in err, err

    # The same from a file: now only the other client is listed.
    listf = tmp_path / "authz"
    listf.write_text("# who may connect\n%s\n\n" % other_dn)
    srv = start_server({"": "memory:1M"}, tls=tls, args=["--tls-authz-file", str(listf)])
    r = run(["nbdinfo", "--size", tls_uri(srv, pki["other"])], check=False, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    r = run(["nbdinfo", "--size", tls_uri(srv, pki["client"])], check=False, timeout=TIMEOUT)
    assert r.returncode != 0, r.stdout


def test_oversized_options(start_server, server_kind):
    """64 KiB + 1 bytes of option data: ringbd skips it and answers
    NBD_REP_ERR_TOO_BIG (haggling goes on); nbdkit, whose limit is higher,
    answers the option. Over 1 MiB ringbd hangs up without reading it."""
    srv = start_server({"": "memory:1M"})
    c = nbdraw.RawClient(srv.address())
    try:
        c.handshake_start()
        c.send_option(0x7fff, b"\xee" * (64 * 1024 + 1))     # an unknown option
        opt, rtype, _ = c.read_option_reply()
        assert opt == 0x7fff
        want = (nbdraw.REP_FLAG_ERROR | 9) if server_kind == "ringbd" else nbdraw.REP_ERR_UNSUP
        assert rtype == want, hex(rtype)
        assert [t for t, _ in c.option_expect_final(nbdraw.OPT_LIST)][-1] == nbdraw.REP_ACK
        assert c.go()["size"] == 1 << 20
    finally:
        c.close()
    if server_kind == "ringbd":
        c = nbdraw.RawClient(srv.address())
        try:
            c.handshake_start()
            c.send(struct.pack(">QII", nbdraw.IHAVEOPT, nbdraw.OPT_LIST, 64 << 20))
            assert c.wait_eof()
        finally:
            c.close()
    server_still_serves(srv)
