"""STARTTLS with pre-shared keys (TLS-PSK): libnbd tools, qemu and raw
sockets against a server run with --tls require (or on) and --tls-psk FILE.

The key files are made per session (psktool's `username:hexkey` lines):
with psktool where gnutls-bin is installed, else with a random key from
Python's `secrets`. Nothing is committed. Every case runs against ringbd
and against nbdkit (GnuTLS) as the reference.

libnbd takes the username from the URI's user part
(`nbds://alice@host/?tls-psk-file=FILE`); qemu reads DIR/keys.psk and
takes `username=` on its tls-creds-psk object.
"""

import json
import os
import secrets
import shutil
import struct
import subprocess
import urllib.parse

import pytest

import nbdraw
import tls_certs

TIMEOUT = 60


def write_key(path, user):
    """Appends a fresh random key for `user` to the psktool file `path`."""
    if shutil.which("psktool"):
        subprocess.run(["psktool", "-u", user, "-p", path], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    else:
        with open(path, "a") as f:
            f.write("%s:%s\n" % (user, secrets.token_hex(32)))
    os.chmod(path, 0o600)


@pytest.fixture(scope="module")
def psk(tmp_path_factory):
    """{"server": FILE with alice and bob, "alice": DIR with alice's
    keys.psk (qemu's layout), "wrong": alice with another key, "mallory":
    a user the server does not know}."""
    base = str(tmp_path_factory.mktemp("psk"))
    server = os.path.join(base, "server.psk")
    write_key(server, "alice")
    write_key(server, "bob")
    alice = os.path.join(base, "alice")
    os.makedirs(alice)
    with open(server) as f:
        line = next(ln for ln in f if ln.startswith("alice:"))
    with open(os.path.join(alice, "keys.psk"), "w") as f:
        f.write(line)
    wrong = os.path.join(base, "wrong.psk")
    write_key(wrong, "alice")
    mallory = os.path.join(base, "mallory.psk")
    write_key(mallory, "mallory")
    yield {"server": server, "alice": alice, "alice_file": os.path.join(alice, "keys.psk"),
           "wrong": wrong, "mallory": mallory}
    shutil.rmtree(base, ignore_errors=True)


def psk_uri(srv, user, pskfile, export=""):
    query = urllib.parse.urlencode({"tls-psk-file": pskfile})
    return "nbds://%s@127.0.0.1:%d/%s?%s" % (user, srv.port, urllib.parse.quote(export, safe=""), query)


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, **kw)


def psk_server(start_server, psk, mode="require", exports=None):
    return start_server(exports or {"": "memory:64M"}, tls={"mode": mode, "psk": psk["server"]})


def test_nbdinfo_over_tls_psk(start_server, psk):
    srv = psk_server(start_server, psk)
    r = run(["nbdinfo", "--json", psk_uri(srv, "alice", psk["alice_file"])])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 64 << 20
    # The second user of the file works too.
    r = run(["nbdinfo", "--size", psk_uri(srv, "bob", psk["server"])])
    assert r.returncode == 0, r.stderr


def test_nbdcopy_round_trip_over_tls_psk(start_server, psk, shm_tmp):
    srv = psk_server(start_server, psk)
    src = os.path.join(shm_tmp, "src")
    back = os.path.join(shm_tmp, "back")
    with open(src, "wb") as f:
        f.write(os.urandom(24 << 20))
    uri = psk_uri(srv, "alice", psk["alice_file"])
    r = run(["nbdcopy", "--connections=2", src, uri])
    assert r.returncode == 0, r.stderr
    r = run(["nbdcopy", "--connections=2", uri, back])
    assert r.returncode == 0, r.stderr
    with open(src, "rb") as a, open(back, "rb") as b:
        assert a.read() == b.read()[:24 << 20]


def test_ringbd_client_tools_over_tls_psk(start_server, psk, shm_tmp):
    """ringbd's own client (info, copy, bench --verify) with libnbd's
    tls-psk-file= and the URI's user part; a wrong key is refused."""
    from conftest import ringbd_bin
    srv = psk_server(start_server, psk)
    uri = psk_uri(srv, "alice", psk["alice_file"])
    r = run([ringbd_bin(), "info", "--json", uri])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info.get("TLS") is True, info
    src = os.path.join(shm_tmp, "psk-src")
    back = os.path.join(shm_tmp, "psk-back")
    with open(src, "wb") as f:
        f.write(os.urandom(8 << 20))
    r = run([ringbd_bin(), "copy", src, uri, "--flush"])
    assert r.returncode == 0, r.stderr
    r = run([ringbd_bin(), "copy", uri, back])
    assert r.returncode == 0, r.stderr
    with open(src, "rb") as a, open(back, "rb") as b:
        assert a.read() == b.read()[:8 << 20]
    r = run([ringbd_bin(), "bench", uri, "--rw", "randrw", "--verify", "--time", "1s"])
    assert r.returncode == 0, r.stdout + r.stderr
    r = run([ringbd_bin(), "info", psk_uri(srv, "alice", psk["wrong"])])
    assert r.returncode != 0, "a wrong key was accepted"
    # The client names the username it offered and the likely cause: it
    # gets an alert from ringbd, nbdkit (GnuTLS) just hangs up.
    assert 'username "alice"' in r.stderr and "a wrong key" in r.stderr, r.stderr
    r = run([ringbd_bin(), "info", psk_uri(srv, "mallory", psk["mallory"])])
    assert r.returncode != 0, "an unknown username was accepted"
    assert 'username "mallory"' in r.stderr and "a wrong key" in r.stderr, r.stderr


def test_qemu_io_and_qemu_img_over_tls_psk(start_server, psk):
    srv = psk_server(start_server, psk)
    obj = ["--object", "tls-creds-psk,id=tls0,endpoint=client,dir=%s,username=alice" % psk["alice"]]
    opts = ["--image-opts", "driver=nbd,host=127.0.0.1,port=%d,export=,tls-creds=tls0" % srv.port]
    cmds = ["-c", "write -P 0x5a 1M 1M", "-c", "read -P 0x5a 1M 1M", "-c", "read -P 0 0 1M"]
    r = run(["qemu-io"] + obj + cmds + opts)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    r = run(["qemu-img", "info", "--output=json"] + obj + opts)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["virtual-size"] == 64 << 20


def test_a_wrong_key_an_unknown_username_and_a_certificate_client_are_refused(start_server, psk, server_kind):
    srv = psk_server(start_server, psk)
    r = run(["nbdinfo", "--size", psk_uri(srv, "alice", psk["wrong"])])
    assert r.returncode != 0, r.stdout
    r = run(["nbdinfo", "--size", psk_uri(srv, "mallory", psk["mallory"])])
    assert r.returncode != 0, r.stdout
    # qemu with the wrong key fails too.
    qdir = os.path.join(os.path.dirname(psk["wrong"]), "qemu-wrong")
    os.makedirs(qdir, exist_ok=True)
    shutil.copy(psk["wrong"], os.path.join(qdir, "keys.psk"))
    r = run(["qemu-img", "info", "--object",
             "tls-creds-psk,id=tls0,endpoint=client,dir=%s,username=alice" % qdir,
             "--image-opts", "driver=nbd,host=127.0.0.1,port=%d,export=,tls-creds=tls0" % srv.port])
    assert r.returncode != 0, r.stdout
    # A client with certificates only (no PSK) does not get in either.
    certs = tls_certs.make_pki(os.path.join(os.path.dirname(psk["wrong"]), "pki-%s" % server_kind))[1]
    r = run(["nbdinfo", "--size", "nbds://127.0.0.1:%d/?tls-certificates=%s" % (srv.port, certs)])
    assert r.returncode != 0, r.stdout
    # The server is still there for the right key.
    assert srv.alive()
    r = run(["nbdinfo", "--size", psk_uri(srv, "alice", psk["alice_file"])])
    assert r.returncode == 0, r.stderr
    if server_kind == "ringbd":
        err = srv.stderr()
        assert 'unknown PSK username "mallory"' in err, err
        assert 'handshake with username "alice" failed (wrong key?)' in err, err


def test_plaintext_client_is_refused_under_require(start_server, psk):
    srv = psk_server(start_server, psk, exports={"": "memory:1M", "secret-name": "memory:1M"})
    c = nbdraw.RawClient(srv.address())
    try:
        c.handshake_start()
        for opt, data in ((nbdraw.OPT_LIST, b""),
                          (nbdraw.OPT_GO, struct.pack(">I", 11) + b"secret-name" + struct.pack(">H", 0))):
            replies = c.option_expect_final(opt, data)
            assert [t for t, _ in replies] == [nbdraw.REP_ERR_TLS_REQD], (opt, replies)
            assert all(b"secret-name" not in p for _, p in replies)
    finally:
        c.close()
    r = run(["nbdinfo", "--list", srv.uri()])
    assert r.returncode != 0
    assert "secret-name" not in r.stdout


def test_tls_on_serves_plaintext_and_psk_clients(start_server, psk):
    srv = psk_server(start_server, psk, mode="on")
    for uri in (srv.uri(), psk_uri(srv, "alice", psk["alice_file"])):
        r = run(["nbdinfo", "--size", uri])
        assert r.returncode == 0, (uri, r.stderr)
        assert r.stdout.strip() == str(64 << 20)


def test_garbage_after_starttls_closes_only_that_connection(start_server, psk):
    srv = psk_server(start_server, psk)
    c = nbdraw.RawClient(srv.address())
    try:
        c.handshake_start()
        replies = c.option_expect_final(nbdraw.OPT_STARTTLS)
        assert [t for t, _ in replies] == [nbdraw.REP_ACK]
        c.send(b"this is not a TLS ClientHello\r\n" * 8)
        assert c.wait_eof()
    finally:
        c.close()
    r = run(["nbdinfo", "--size", psk_uri(srv, "alice", psk["alice_file"])])
    assert r.returncode == 0, r.stderr


@pytest.mark.ringbd_only
def test_bad_psk_files_and_option_clashes_stop_the_server_with_a_clear_error(server_kind, psk, tmp_path):
    from conftest import ringbd_bin
    bad = tmp_path / "bad.psk"
    bad.write_text("alice:%s\nbob:abc\n" % secrets.token_hex(16))
    r = run([ringbd_bin(), "serve", "--tls-psk", str(bad), "--listen", "127.0.0.1:0", "memory:1M"])
    assert r.returncode != 0
    assert "%s:2: key of \"bob\": odd number of hex digits (3)" % bad in r.stderr, r.stderr
    r = run([ringbd_bin(), "serve", "--tls-psk", psk["server"], "--tls-certificates", str(tmp_path),
             "--listen", "127.0.0.1:0", "memory:1M"])
    assert r.returncode != 0
    assert "--tls-certificates" in r.stderr, r.stderr


@pytest.mark.ringbd_only
def test_captive_uri_is_nbds_with_psk_and_tls13_is_negotiated(server_kind, psk):
    from conftest import ringbd_bin, ringbd_extra_args
    cmd = 'echo "uri=$uri"; nbdinfo --size "nbds://alice@127.0.0.1:$port/?tls-psk-file=%s"' % psk["alice_file"]
    r = run([ringbd_bin(), "serve", "-v"] + ringbd_extra_args() +
            ["--tls-psk", psk["server"], "--listen", "127.0.0.1:0", "--run", cmd, "memory:1M"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "uri=nbds://127.0.0.1:" in r.stdout
    assert r.stdout.strip().endswith(str(1 << 20))
    # GnuTLS offers TLS 1.3 with an external PSK (SHA-256 binder); OpenSSL
    # takes it and picks the first SHA-256 suite of its own list.
    assert 'TLS established: TLSv1.3 TLS_AES_128_GCM_SHA256 PSK username "alice"' in r.stderr, r.stderr


@pytest.mark.ringbd_only
def test_tls12_psk_when_openssl_is_capped_at_tls12(server_kind, psk, tmp_path):
    """GnuTLS clients also offer TLS 1.2 PSK suites: with OpenSSL capped at
    TLS 1.2 by its configuration file, libnbd and qemu get
    ECDHE-PSK-CHACHA20-POLY1305."""
    from conftest import ringbd_bin, ringbd_extra_args
    conf = tmp_path / "tls12.cnf"
    conf.write_text("openssl_conf = c\n[c]\nssl_conf = s\n[s]\nsystem_default = d\n"
                    "[d]\nMaxProtocol = TLSv1.2\n")
    qemu = ("qemu-img info --object tls-creds-psk,id=tls0,endpoint=client,dir=%s,username=alice "
            "--image-opts driver=nbd,host=127.0.0.1,port=$port,export=,tls-creds=tls0" % psk["alice"])
    cmd = 'nbdinfo --size "nbds://alice@127.0.0.1:$port/?tls-psk-file=%s" && %s' % (psk["alice_file"], qemu)
    r = run([ringbd_bin(), "serve", "-v"] + ringbd_extra_args() +
            ["--tls-psk", psk["server"], "--listen", "127.0.0.1:0", "--run", cmd, "memory:1M"],
            env=dict(os.environ, OPENSSL_CONF=str(conf)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\n%d\n" % (1 << 20) in r.stdout, r.stdout
    assert r.stderr.count('TLS established: TLSv1.2 ECDHE-PSK-CHACHA20-POLY1305 PSK username "alice"') == 2, r.stderr
