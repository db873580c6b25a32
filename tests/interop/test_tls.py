"""STARTTLS with X.509 certificates: libnbd tools, qemu and raw sockets
against a server run with --tls require (or on) and --tls-certificates.

The certificates are made per session with openssl (tls_certs.py): a CA,
a server certificate for localhost/127.0.0.1 and a client certificate;
a second, unrelated CA signs the client certificate that --tls-verify-peer
must refuse. Every case runs against ringbd and against nbdkit (GnuTLS).
"""

import json
import os
import shutil
import socket
import struct
import subprocess
import urllib.parse

import pytest

import nbdraw
import tls_certs

TIMEOUT = 60


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """{"server": DIR, "client": DIR, "foreign": DIR}; "foreign" trusts the
    right CA but holds a client certificate signed by another CA."""
    base = str(tmp_path_factory.mktemp("pki"))
    sdir, cdir = tls_certs.make_pki(os.path.join(base, "good"))
    _, odir = tls_certs.make_pki(os.path.join(base, "other"), ca_name="other-ca")
    fdir = os.path.join(base, "foreign")
    os.makedirs(fdir)
    shutil.copy(os.path.join(cdir, "ca-cert.pem"), fdir)
    for f in ("client-cert.pem", "client-key.pem"):
        shutil.copy(os.path.join(odir, f), fdir)
    yield {"server": sdir, "client": cdir, "foreign": fdir}
    shutil.rmtree(base, ignore_errors=True)


def tls_uri(srv, certdir, export=""):
    query = urllib.parse.urlencode({"tls-certificates": certdir})
    return "nbds://127.0.0.1:%d/%s?%s" % (srv.port, urllib.parse.quote(export, safe=""), query)


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, **kw)


def tls_server(start_server, pki, mode="require", verify_peer=False, exports=None):
    return start_server(exports or {"": "memory:64M"},
                        tls={"mode": mode, "dir": pki["server"], "verify_peer": verify_peer})


def test_nbdinfo_over_tls(start_server, pki):
    srv = tls_server(start_server, pki)
    r = run(["nbdinfo", "--json", tls_uri(srv, pki["client"])])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 64 << 20


def test_nbdcopy_round_trip_over_tls(start_server, pki, shm_tmp):
    srv = tls_server(start_server, pki)
    src = os.path.join(shm_tmp, "src")
    back = os.path.join(shm_tmp, "back")
    with open(src, "wb") as f:
        f.write(os.urandom(24 << 20))
    uri = tls_uri(srv, pki["client"])
    r = run(["nbdcopy", "--connections=2", src, uri])
    assert r.returncode == 0, r.stderr
    r = run(["nbdcopy", "--connections=2", uri, back])
    assert r.returncode == 0, r.stderr
    with open(src, "rb") as a, open(back, "rb") as b:
        assert a.read() == b.read()[:24 << 20]


def qemu_tls_args(srv, certdir):
    obj = "tls-creds-x509,id=tls0,endpoint=client,dir=%s" % certdir
    opts = "driver=nbd,host=127.0.0.1,port=%d,export=,tls-creds=tls0" % srv.port
    return ["--object", obj, "--image-opts", opts]


def test_qemu_io_and_qemu_img_over_tls(start_server, pki):
    srv = tls_server(start_server, pki)
    args = qemu_tls_args(srv, pki["client"])
    cmds = ["-c", "write -P 0x5a 1M 1M", "-c", "read -P 0x5a 1M 1M", "-c", "read -P 0 0 1M"]
    r = run(["qemu-io"] + args[:2] + cmds + args[2:])
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    r = run(["qemu-img", "info", "--output=json"] + args)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["virtual-size"] == 64 << 20


def test_plaintext_client_is_refused_and_learns_no_export_names(start_server, pki):
    srv = tls_server(start_server, pki, exports={"": "memory:1M", "secret-name": "memory:1M"})
    c = nbdraw.RawClient(srv.address())
    try:
        c.handshake_start()
        for opt, data in ((nbdraw.OPT_LIST, b""),
                          (nbdraw.OPT_INFO, struct.pack(">I", 0) + struct.pack(">H", 0)),
                          (nbdraw.OPT_GO, struct.pack(">I", 11) + b"secret-name" + struct.pack(">H", 0)),
                          (nbdraw.OPT_STRUCTURED_REPLY, b"")):
            replies = c.option_expect_final(opt, data)
            assert [t for t, _ in replies] == [nbdraw.REP_ERR_TLS_REQD], (opt, replies)
            assert all(b"secret-name" not in p for _, p in replies)
        # EXPORT_NAME cannot be refused: the server must hang up.
        c.send_option(nbdraw.OPT_EXPORT_NAME, b"")
        assert c.wait_eof()
    finally:
        c.close()
    # libnbd without TLS fails too.
    r = run(["nbdinfo", "--list", srv.uri()])
    assert r.returncode != 0
    assert "secret-name" not in r.stdout


def test_tls_on_serves_plaintext_and_tls_clients(start_server, pki):
    srv = tls_server(start_server, pki, mode="on")
    for uri in (srv.uri(), tls_uri(srv, pki["client"])):
        r = run(["nbdinfo", "--size", uri])
        assert r.returncode == 0, (uri, r.stderr)
        assert r.stdout.strip() == str(64 << 20)


def test_verify_peer_takes_the_ca_signed_client_and_refuses_others(start_server, pki):
    srv = tls_server(start_server, pki, verify_peer=True)
    r = run(["nbdinfo", "--size", tls_uri(srv, pki["client"])])
    assert r.returncode == 0, r.stderr
    r = run(["nbdinfo", "--size", tls_uri(srv, pki["foreign"])])
    assert r.returncode != 0, r.stdout
    # A client with no certificate at all (only the CA to check the server).
    nocert = os.path.join(os.path.dirname(pki["foreign"]), "nocert")
    os.makedirs(nocert, exist_ok=True)
    shutil.copy(os.path.join(pki["client"], "ca-cert.pem"), nocert)
    r = run(["nbdinfo", "--size", tls_uri(srv, nocert)])
    assert r.returncode != 0, r.stdout


def test_garbage_after_starttls_closes_only_that_connection(start_server, pki):
    srv = tls_server(start_server, pki)
    c = nbdraw.RawClient(srv.address())
    try:
        c.handshake_start()
        replies = c.option_expect_final(nbdraw.OPT_STARTTLS)
        assert [t for t, _ in replies] == [nbdraw.REP_ACK]
        c.send(b"this is not a TLS ClientHello\r\n" * 8)
        assert c.wait_eof()
    finally:
        c.close()
    r = run(["nbdinfo", "--size", tls_uri(srv, pki["client"])])
    assert r.returncode == 0, r.stderr


@pytest.mark.ringbd_only
def test_captive_uri_is_nbds_when_tls_is_required(server_kind, pki):
    """`--run` gets $uri = nbds://... under --tls require, as with nbdkit."""
    from conftest import ringbd_bin, ringbd_extra_args
    cmd = 'echo "uri=$uri"; nbdinfo --size "$uri?tls-certificates=%s"' % pki["client"]
    r = run([ringbd_bin(), "serve"] + ringbd_extra_args() +
            ["--tls-certificates", pki["server"], "--listen", "127.0.0.1:0", "--run", cmd, "memory:1M"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "uri=nbds://127.0.0.1:" in r.stdout
    assert r.stdout.strip().endswith(str(1 << 20))
