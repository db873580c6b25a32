"""ringbd's own client over TLS: `ringbd info`, `ringbd copy` and
`ringbd bench --verify` with nbds:// and nbds+unix:// URIs against
`ringbd serve --tls require` (each engine through RINGBD_ARGS) and against
nbdkit --tls=require with GnuTLS (the reference).

Also: a client certificate under --tls-verify-peer, a server certificate
from another CA refused with a clear error (and accepted with
tls-verify-peer=false), tls-hostname checked, a server without TLS refused
(never a silent plaintext fallback), and tls-psk-file refused as not
supported yet. Certificates come from tls_certs.py (openssl, per module).
"""

import json
import os
import shutil
import subprocess
import urllib.parse

import pytest

import tls_certs
from conftest import ringbd_bin
from helpers import MiB, random_file

TIMEOUT = 120


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """{"server", "client": the good CA's directories; "foreign": the right
    CA with a client certificate from another CA; "other": only another
    CA (to check the server against); "nocert": only the right CA}."""
    base = str(tmp_path_factory.mktemp("pki-client"))
    sdir, cdir = tls_certs.make_pki(os.path.join(base, "good"))
    _, odir = tls_certs.make_pki(os.path.join(base, "other"), ca_name="other-ca")
    dirs = {"server": sdir, "client": cdir, "other": odir}
    for name, ca_from, cert_from in (("foreign", cdir, odir), ("nocert", cdir, None)):
        d = os.path.join(base, name)
        os.makedirs(d)
        shutil.copy(os.path.join(ca_from, "ca-cert.pem"), d)
        if cert_from:
            for f in ("client-cert.pem", "client-key.pem"):
                shutil.copy(os.path.join(cert_from, f), d)
        dirs[name] = d
    yield dirs
    shutil.rmtree(base, ignore_errors=True)


def ringbd(*args, check=True):
    p = subprocess.run([ringbd_bin(), *args], capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert p.returncode == 0, "ringbd %s: %s" % (" ".join(args), p.stderr)
    return p


def nbds(srv, certdir=None, **params):
    q = {}
    if certdir:
        q["tls-certificates"] = certdir
    q.update(params)
    return "nbds://127.0.0.1:%d/?%s" % (srv.port, urllib.parse.urlencode(q))


def tls_server(start_server, pki, mode="require", verify_peer=False, size="64M"):
    return start_server({"": "memory:" + size},
                        tls={"mode": mode, "dir": pki["server"], "verify_peer": verify_peer})


def test_info_over_tls(start_server, pki):
    srv = tls_server(start_server, pki)
    info = json.loads(ringbd("info", "--json", nbds(srv, pki["client"])).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 64 * MiB
    text = ringbd("info", nbds(srv, pki["client"])).stdout
    assert "protocol: newstyle-fixed with TLS" in text
    listed = json.loads(ringbd("info", "--list", "--json", nbds(srv, pki["client"])).stdout)
    assert [e["export-size"] for e in listed["exports"]] == [64 * MiB]
    # The allocation map (block status) comes through TLS too.
    extents = json.loads(ringbd("info", "--map", "--json", nbds(srv, pki["client"])).stdout)
    assert sum(e["length"] for e in extents) == 64 * MiB


def test_copy_round_trip_over_tls(start_server, pki, shm_tmp):
    srv = tls_server(start_server, pki)
    src = os.path.join(shm_tmp, "src")
    back = os.path.join(shm_tmp, "back")
    random_file(src, 24 * MiB, seed=5)
    uri = nbds(srv, pki["client"])
    ringbd("copy", "-C", "2", "--flush", src, uri)
    ringbd("copy", "-C", "2", uri, back)
    with open(src, "rb") as a, open(back, "rb") as b:
        assert a.read() == b.read()[:24 * MiB]
    # Server to server, both over TLS, one ring.
    dst = tls_server(start_server, pki)
    ringbd("copy", "-C", "2", "--request-size", "64k", uri, nbds(dst, pki["client"]))
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, back], check=True,
                   capture_output=True, timeout=TIMEOUT)


def test_bench_verify_over_tls(start_server, pki):
    srv = tls_server(start_server, pki)
    p = ringbd("bench", nbds(srv, pki["client"]), "--rw", "randrw", "--verify", "--time", "1s",
               "--size", "16M", "--qd", "16", "--conns", "2", "--bs", "16k", "--json")
    res = json.loads(p.stdout)["results"][0]
    assert res["reads"] > 50 and res["writes"] > 50, res


def test_client_certificate_under_verify_peer(start_server, pki):
    srv = tls_server(start_server, pki, verify_peer=True)
    info = json.loads(ringbd("info", "--json", nbds(srv, pki["client"])).stdout)
    assert info["exports"][0]["export-size"] == 64 * MiB
    for d in ("foreign", "nocert"):
        p = ringbd("info", nbds(srv, pki[d]), check=False)
        assert p.returncode != 0, (d, p.stdout)
        assert "TLS" in p.stderr, (d, p.stderr)


def test_server_certificate_from_another_ca_is_refused(start_server, pki):
    srv = tls_server(start_server, pki)
    p = ringbd("info", nbds(srv, pki["other"]), check=False)
    assert p.returncode != 0
    assert "UnknownIssuer" in p.stderr and "not signed by the CA" in p.stderr, p.stderr
    # ... and taken without verification, as libnbd's tls-verify-peer=false.
    p = ringbd("info", "--json", nbds(srv, pki["other"], **{"tls-verify-peer": "false"}))
    assert json.loads(p.stdout)["TLS"] is True
    # The name is checked: the certificate names localhost and 127.0.0.1.
    p = ringbd("info", nbds(srv, pki["client"], **{"tls-hostname": "nbd.example.com"}), check=False)
    assert p.returncode != 0 and "not valid for name" in p.stderr, p.stderr
    ringbd("info", nbds(srv, pki["client"], **{"tls-hostname": "localhost"}))


def test_no_plaintext_fallback_from_a_server_without_tls(start_server, pki):
    srv = start_server({"": "memory:16M"}, tls={"mode": "off", "dir": pki["server"]})
    for argv in (["info"], ["bench", "--time", "200ms"]):
        p = ringbd(*argv, nbds(srv, pki["client"]), check=False)
        assert p.returncode != 0, p.stdout
        assert "refused NBD_OPT_STARTTLS" in p.stderr and "not falling back" in p.stderr, p.stderr


def test_a_missing_psk_file_is_named_before_connecting(start_server, pki):
    # (PSK itself: test_tls_psk.py, test_ringbd_client_tools_over_tls_psk.)
    srv = tls_server(start_server, pki)
    p = ringbd("info", nbds(srv, **{"tls-psk-file": "/nonexistent/keys.psk", "tls-username": "alice"}),
               check=False)
    assert p.returncode != 0
    assert "/nonexistent/keys.psk" in p.stderr, p.stderr


def test_nbds_unix(start_server, pki):
    """nbds+unix://: the chain is checked against the CA; no name unless
    tls-hostname gives one (libnbd checks none on Unix sockets)."""
    srv = start_server({"": "memory:32M"}, tls={"mode": "require", "dir": pki["server"], "unix": True})
    base = "nbds+unix:///?socket=%s&tls-certificates=%s" % (srv.sock, pki["client"])
    info = json.loads(ringbd("info", "--json", base).stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 32 * MiB
    ringbd("bench", base, "--rw", "randrw", "--verify", "--time", "500ms", "--size", "8M")
    ringbd("info", base + "&tls-hostname=localhost")
    p = ringbd("info", base + "&tls-hostname=elsewhere.example", check=False)
    assert p.returncode != 0 and "not valid for name" in p.stderr, p.stderr
    other = "nbds+unix:///?socket=%s&tls-certificates=%s" % (srv.sock, pki["other"])
    p = ringbd("info", other, check=False)
    assert p.returncode != 0 and "UnknownIssuer" in p.stderr, p.stderr
