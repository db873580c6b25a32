"""Test certificates for the TLS cases, made with openssl at test time.

make_pki(dir) writes a CA and, signed by it, a server certificate (for
localhost and 127.0.0.1) and a client certificate, with the file names
qemu, nbdkit and libnbd look for in a certificate directory:

    DIR/server/  ca-cert.pem server-cert.pem server-key.pem
    DIR/client/  ca-cert.pem client-cert.pem client-key.pem

(keyEncipherment is there because qemu refuses leaf certificates without it.)
Nothing here is committed: keys live only in the test's temporary directory.
"""

import os
import subprocess


def _openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _key(path, cwd):
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", path, cwd=cwd)


def make_ca(work, name):
    """A self-signed CA: (cert path, key path)."""
    key = os.path.join(work, "%s-key.pem" % name)
    cert = os.path.join(work, "%s-cert.pem" % name)
    _key(key, work)
    _openssl("req", "-x509", "-new", "-key", key, "-out", cert, "-days", "2",
             "-subj", "/CN=%s" % name,
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=work)
    return cert, key


def sign(work, ca, name, ext, out_cert, out_key):
    """A leaf certificate for `name` with extensions `ext`, signed by `ca`."""
    ca_cert, ca_key = ca
    csr = os.path.join(work, "%s.csr" % name)
    extfile = os.path.join(work, "%s.ext" % name)
    with open(extfile, "w") as f:
        f.write(ext)
    _key(out_key, work)
    _openssl("req", "-new", "-key", out_key, "-out", csr, "-subj", "/O=ringbd tests/CN=%s" % name,
             cwd=work)
    _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
             "-out", out_cert, "-days", "2", "-extfile", extfile, cwd=work)
    os.chmod(out_key, 0o600)


SERVER_EXT = ("basicConstraints=critical,CA:FALSE\n"
              "keyUsage=critical,digitalSignature,keyEncipherment\n"
              "extendedKeyUsage=serverAuth\n"
              "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n")
CLIENT_EXT = ("basicConstraints=critical,CA:FALSE\n"
              "keyUsage=critical,digitalSignature,keyEncipherment\n"
              "extendedKeyUsage=clientAuth\n")


def make_pki(work, ca_name="ringbd-test-ca", more_clients=()):
    """Makes DIR/server and DIR/client under `work`; returns (server_dir, client_dir).

    Each name in `more_clients` gets DIR/<name>/ too: another client
    certificate from the same CA, with the subject /O=ringbd tests/CN=<name>."""
    os.makedirs(work, exist_ok=True)
    ca = make_ca(work, ca_name)
    sdir = os.path.join(work, "server")
    cdir = os.path.join(work, "client")
    for d in (sdir, cdir):
        os.makedirs(d, exist_ok=True)
        with open(ca[0], "rb") as src, open(os.path.join(d, "ca-cert.pem"), "wb") as dst:
            dst.write(src.read())
    sign(work, ca, "localhost", SERVER_EXT,
         os.path.join(sdir, "server-cert.pem"), os.path.join(sdir, "server-key.pem"))
    for name in ("client",) + tuple(more_clients):
        d = os.path.join(work, name)
        os.makedirs(d, exist_ok=True)
        if d != cdir:
            with open(ca[0], "rb") as src, open(os.path.join(d, "ca-cert.pem"), "wb") as dst:
                dst.write(src.read())
        sign(work, ca, name, CLIENT_EXT,
             os.path.join(d, "client-cert.pem"), os.path.join(d, "client-key.pem"))
    return sdir, cdir


def subject(cert):
    """A certificate's subject as RFC 4514/2253 prints it (most specific
    first), as openssl shows it: e.g. "CN=client,O=ringbd tests"."""
    out = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in", cert],
                         check=True, capture_output=True, text=True).stdout.strip()
    return out.split("=", 1)[1] if out.startswith("subject=") else out
