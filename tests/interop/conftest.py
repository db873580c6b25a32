"""Fixtures for the ringbd interop suite.

Every test that takes the ``server_kind`` fixture runs once per selected
server: ``ringbd`` (the server under test) and ``nbdkit`` (the reference,
nbdkit 1.32).  Select with ``--servers=ringbd,nbdkit`` or the environment
variable ``INTEROP_SERVERS`` (default: both).

Tests marked ``@pytest.mark.ringbd_only`` exercise features nbdkit 1.32
does not have (or ringbd's own command line); their nbdkit variants are
*deselected* at collection time (they show up in pytest's "deselected"
count), never skipped.

Readiness: servers are started with systemd-style socket activation.  The
fixture itself creates, binds and listens on a Unix socket and hands it to
the server as fd 3 with LISTEN_FDS=1 and LISTEN_PID=<server pid>, so the
socket is connectable the moment start() returns; nothing polls or sleeps.
start() then reads the 18-byte NBD greeting once (a blocking read, with a
hang guard) so that a server which died or ignored the socket fails fast
with its stderr, instead of leaving clients waiting in the listen backlog.

Teardown: SIGTERM; for ringbd the exit status must be 0 and stderr must not
contain "panicked".
"""

import faulthandler
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse

import pytest

from helpers import BLOCK_MAX, BLOCK_MIN, BLOCK_PREF

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
ALL_KINDS = ("ringbd", "nbdkit")

KILL_TIMEOUT = 20    # seconds to wait for a SIGTERM'ed server to exit
GREETING_TIMEOUT = 10  # hang guard for the start-up greeting check


# Longest any one test may run: a test that hangs (a reply that never
# comes: a client library waiting without a timeout of its own) ends the
# run here with every thread's stack, instead of at CI's limit.
TEST_TIMEOUT = int(os.environ.get("RINGBD_TEST_TIMEOUT", "300"))


@pytest.fixture(autouse=True)
def hang_watchdog(request):
    def fire():
        capman = request.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            capman.suspend_global_capture(in_=True)
        sys.stderr.write("\n%s: still running after %d s (RINGBD_TEST_TIMEOUT): "
                         "it hangs; every thread's stack follows\n" % (request.node.nodeid, TEST_TIMEOUT))
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(TEST_TIMEOUT, fire)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


def pytest_addoption(parser):
    parser.addoption(
        "--servers",
        default=None,
        help="comma-separated servers to test: ringbd,nbdkit "
        "(default: $INTEROP_SERVERS or both)",
    )


def selected_kinds(config):
    raw = config.getoption("--servers") or os.environ.get("INTEROP_SERVERS") or ",".join(ALL_KINDS)
    kinds = [k.strip() for k in raw.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad or not kinds:
        raise pytest.UsageError("unknown server kind(s) %r; choose from %s" % (bad, ALL_KINDS))
    return kinds


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "ringbd_only: feature nbdkit 1.32 lacks (e.g. NBD extended headers) or "
        "ringbd's own CLI; the nbdkit variant is deselected, not skipped",
    )


def pytest_generate_tests(metafunc):
    if "server_kind" in metafunc.fixturenames:
        metafunc.parametrize("server_kind", selected_kinds(metafunc.config))


def pytest_collection_modifyitems(config, items):
    # Explicit filter: ringbd_only tests are not collected for nbdkit.
    keep, drop = [], []
    for item in items:
        kind = getattr(getattr(item, "callspec", None), "params", {}).get("server_kind")
        if item.get_closest_marker("ringbd_only") and kind != "ringbd":
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# --------------------------------------------------------------------------
# server abstraction
# --------------------------------------------------------------------------

def ringbd_bin():
    path = os.environ.get("RINGBD_BIN", "target/release/ringbd")
    if not os.path.isabs(path):
        path = os.path.join(REPO_ROOT, path)
    return path


def parse_size(text):
    """'1G' / '256M' / '64K' / '4096' -> bytes (binary multiples)."""
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip()
    if text[-1:].upper() in mult:
        return int(text[:-1]) * mult[text[-1].upper()]
    return int(text)


NBD_URI_SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://")


def parse_spec(spec):
    if spec.startswith(NBD_URI_SCHEMES):
        # Another server's export: a proxy (nbdkit: its nbd plugin).
        return "nbd", spec
    kind, sep, arg = spec.partition(":")
    # qcow2: nbdkit 1.32 has no qcow2 plugin or qcow2dec filter: those
    # tests are ringbd_only, with qemu as the reference (test_qcow2.py).
    if not sep or kind not in ("memory", "file", "null", "fault", "rbd", "qcow2"):
        raise ValueError("bad export spec %r" % spec)
    if kind == "fault":
        # ringbd's fault-injecting wrapper (tests using it are ringbd_only).
        _rules, sep, inner = arg.partition(":")
        if not sep:
            raise ValueError("bad fault spec %r" % spec)
        parse_spec(inner)
    return kind, arg


def tls_args(kind, tls):
    """Server arguments for `tls` = {"mode": off|on|require, "dir": DIR,
    "verify_peer": bool} or {"mode": ..., "psk": FILE}, in each server's
    syntax (and "unix": True to listen on a Unix socket, not TCP)."""
    if not tls:
        return []
    if tls.get("psk"):
        if kind == "nbdkit":
            return ["--tls=%s" % tls["mode"], "--tls-psk=%s" % tls["psk"]]
        return ["--tls", tls["mode"], "--tls-psk", tls["psk"]]
    if kind == "nbdkit":
        argv = ["--tls=%s" % tls["mode"], "--tls-certificates=%s" % tls["dir"]]
        if tls.get("verify_peer"):
            argv.append("--tls-verify-peer")
        return argv
    argv = ["--tls", tls["mode"], "--tls-certificates", tls["dir"]]
    if tls.get("verify_peer"):
        argv.append("--tls-verify-peer")
    return argv


def nbdkit_argv(exports, read_only, workdir):
    """Translate ringbd-syntax export specs into an nbdkit command line."""
    argv = ["nbdkit", "--exit-with-parent"]
    if read_only:
        argv.append("-r")
    # Advertise (and enforce: error policy) the same block size constraints
    # ringbd advertises, so the block-size tests mean the same for both.
    filters = ["--filter=blocksize-policy"]
    params = [
        "blocksize-minimum=%d" % BLOCK_MIN,
        "blocksize-preferred=%d" % BLOCK_PREF,
        "blocksize-maximum=%d" % BLOCK_MAX,
        "blocksize-error-policy=error",
    ]
    if list(exports) == [""]:
        kind, arg = parse_spec(exports[""])
        if kind == "fault":
            raise ValueError("fault: specs are ringbd's own (mark the test ringbd_only)")
        if kind == "nbd":
            u = urllib.parse.urlsplit(arg)
            q = urllib.parse.parse_qs(u.query)
            plugin = ["nbd", "export=%s" % urllib.parse.unquote(u.path[1:])]
            if u.scheme == "nbd+unix":
                plugin.append("socket=%s" % q["socket"][0])
            else:
                assert u.scheme in ("nbd", "nbds"), "nbdkit translation: %s" % arg
                plugin += ["hostname=%s" % u.hostname, "port=%d" % (u.port or 10809)]
                if u.scheme == "nbds":
                    plugin += ["tls=require", "tls-certificates=%s" % q["tls-certificates"][0]]
            return argv + filters + plugin + params
        plugin = [kind, arg]  # memory SIZE | file PATH | null SIZE
        return argv + filters + plugin + params

    # Several (or named) exports: nbdkit-file-plugin dir= mode serves each
    # file of a directory as the export of that name; memory:SIZE becomes a
    # sparse file on tmpfs, file:PATH a symlink.  The exportname filter
    # maps "" to its backing file and advertises exactly our names.
    expdir = os.path.join(workdir, "exports")
    os.mkdir(expdir)
    names = {}
    for name, spec in exports.items():
        kind, arg = parse_spec(spec)
        fname = name if name else "__default__"
        assert fname and "/" not in fname and fname not in (".", ".."), name
        path = os.path.join(expdir, fname)
        if kind == "memory":
            with open(path, "wb") as f:
                f.truncate(parse_size(arg))
        elif kind == "file":
            os.symlink(os.path.abspath(arg), path)
        else:
            raise ValueError("nbdkit translation: %s not supported with several exports" % kind)
        names[name] = fname
    filters.append("--filter=exportname")
    params.append("exportname-list=explicit")
    params += ["exportname=%s" % n for n in exports]
    if "" in names:
        params.append("default-export=%s" % names[""])
    return argv + filters + ["file", "dir=%s" % expdir] + params


def ringbd_extra_args():
    """Extra `ringbd serve` arguments from $RINGBD_ARGS (e.g. `--engine threads`),
    so the whole suite can be run against each engine."""
    return shlex.split(os.environ.get("RINGBD_ARGS", ""))


def ringbd_argv(exports, read_only):
    argv = [ringbd_bin(), "serve"] + ringbd_extra_args()
    for name, spec in exports.items():
        parse_spec(spec)
        if name == "":
            argv.insert(2, spec)
        else:
            argv += ["--export", "%s=%s" % (name, spec)]
    if read_only:
        argv.append("--read-only")
    return argv


def _socket_activation_child(listen_fd):
    """preexec_fn: put the listening socket at fd 3 for LISTEN_FDS=1."""
    def child():
        if listen_fd != 3:
            os.dup2(listen_fd, 3)
        os.set_inheritable(3, True)
    return child


class Server:
    """One NBD server process under test, reachable on a Unix socket."""

    def __init__(self, kind, exports=None, read_only=False, workdir=None, tls=None, args=(), params=(),
                 env=None, tcp=False):
        self.kind = kind
        # Extra options in this server's own syntax; `params` (nbdkit's
        # key=value plugin/filter parameters) go after the plugin name;
        # `env`: more environment for the server.
        self.args = list(args)
        self.params = list(params)
        self.extra_env = dict(env or {})
        # With TLS the server listens on TCP loopback (as nbds:// clients
        # connect and check the certificate's address) unless tls["unix"]
        # asks for nbds+unix://, else on a Unix socket; `tcp` asks for TCP
        # loopback without TLS.
        self.tls = tls
        self.tcp = bool(tcp) or (bool(tls) and not tls.get("unix"))
        self.port = None
        self.exports = dict(exports or {"": "memory:256M"})
        self.read_only = read_only
        self.workdir = tempfile.mkdtemp(prefix="srv-%s-" % kind, dir=workdir or _shm_dir())
        self.sock = os.path.join(self.workdir, "nbd.sock")
        self.stdout_path = os.path.join(self.workdir, "stdout")
        self.stderr_path = os.path.join(self.workdir, "stderr")
        self.returncode = None
        self._final_stderr = None
        self._final_stdout = None

        try:
            self._launch(kind, read_only)
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def _launch(self, kind, read_only):
        if kind == "nbdkit":
            argv = nbdkit_argv(self.exports, read_only, self.workdir)
            assert shutil.which("nbdkit"), "nbdkit is not installed (missing tool = failure)"
            argv[2:2] = tls_args(kind, self.tls) + self.args
            argv += self.params
        elif kind == "qemu-nbd":
            # The reference for rbd: exports (test_rbd.py): the export spec
            # is qemu's filename (rbd:POOL/IMAGE:conf=...), served with
            # socket activation, several clients, until stopped.
            argv = ["qemu-nbd", "-f", "raw", "-t", "-e", "16"]
            if not any(a.startswith("--cache") for a in self.args):
                argv.append("--cache=writeback")  # unless `args` chooses (qemu-nbd takes one)
            if read_only:
                argv.append("-r")
            argv += self.args + [self.exports[""]]
        elif kind == "ringbd":
            argv = ringbd_argv(self.exports, read_only) + tls_args(kind, self.tls) + self.args
            assert os.access(argv[0], os.X_OK), (
                "ringbd binary %s not found/executable (set RINGBD_BIN or "
                "run `cargo build --release`)" % argv[0])
        else:
            raise ValueError(kind)
        self.argv = argv

        if self.tcp:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        else:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.tcp:
                listener.bind(("127.0.0.1", 0))
                self.port = listener.getsockname()[1]
            else:
                listener.bind(self.sock)
            # systemd's default Backlog= (SOMAXCONN, 4096), as `ringbd serve
            # --unix/--listen` uses too: with 128, the hostile battery's 1,000
            # abandoned connections could leave the queue full when a good
            # client's non-blocking connect came (EAGAIN, "server backlog
            # overflowed" from libnbd), before the server had drained it.
            listener.listen(socket.SOMAXCONN)
            env = dict(os.environ, LISTEN_FDS="1", **self.extra_env)
            env.pop("LISTEN_PID", None)
            env.pop("LISTEN_FDNAMES", None)
            with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
                # sh sets LISTEN_PID to its own pid and execs the server,
                # so LISTEN_PID equals the server's pid.
                self.proc = subprocess.Popen(
                    ["sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh"] + argv,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                    close_fds=False, preexec_fn=_socket_activation_child(listener.fileno()),
                )
        finally:
            # The server owns the listening socket now; our copy can go.
            # (If the server dies, connects are refused instead of hanging.)
            listener.close()
        self._check_greeting()

    def _check_greeting(self):
        """Fail fast, with the server's stderr, unless it greets a client.

        One blocking read of the 18-byte NBD greeting (not a poll): catches
        a server that died on start-up or ignored the activated socket.
        """
        s = socket.socket(socket.AF_INET if self.port else socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(GREETING_TIMEOUT)
        try:
            s.connect(self.address())
            got = b""
            while len(got) < 18:
                chunk = s.recv(18 - len(got))
                if not chunk:
                    break
                got += chunk
        except OSError as e:
            got = repr(e).encode()
        finally:
            s.close()
        if not got.startswith(b"NBDMAGICIHAVEOPT"):
            status = self.proc.poll()
            if status is None:
                self.proc.kill()
                self.proc.wait()
            raise AssertionError(
                "%s did not send the NBD greeting on the activated socket "
                "(got %r, exit status %r)\nargv: %s\nstderr:\n%s"
                % (self.kind, got, status, self.argv, self.stderr()))

    def address(self):
        """What to connect a socket to: the Unix path or (host, port)."""
        return ("127.0.0.1", self.port) if self.port else self.sock

    def uri(self, export=""):
        if self.port:
            return "nbd://127.0.0.1:%d/%s" % (self.port, urllib.parse.quote(export, safe=""))
        return "nbd+unix:///%s?socket=%s" % (urllib.parse.quote(export, safe=""), self.sock)

    def stderr(self):
        if self._final_stderr is not None:
            return self._final_stderr
        with open(self.stderr_path, "r", errors="replace") as f:
            return f.read()

    def stdout(self):
        if self._final_stdout is not None:
            return self._final_stdout
        with open(self.stdout_path, "r", errors="replace") as f:
            return f.read()

    def alive(self):
        return self.proc.poll() is None

    def stop(self, check=True):
        """SIGTERM the server and wait for it; for ringbd check a clean exit.

        A second call (e.g. the fixture's teardown after a test stopped the
        server itself and checked its exit) only returns the status."""
        if self._final_stderr is not None:
            return self.returncode
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.returncode = self.proc.wait(timeout=KILL_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.returncode = self.proc.wait()
                self._final_stderr = self.stderr()
                shutil.rmtree(self.workdir, ignore_errors=True)
                raise AssertionError("%s did not exit within %ds of SIGTERM\nstderr:\n%s"
                                     % (self.kind, KILL_TIMEOUT, self.stderr()))
        err = self._final_stderr = self.stderr()
        self._final_stdout = self.stdout()
        try:
            if check and self.kind == "ringbd":
                assert "panicked" not in err, "ringbd panicked:\n" + err
                assert self.returncode == 0, "ringbd exited %r on SIGTERM\nstderr:\n%s" % (
                    self.returncode, err)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.returncode


def start(kind, exports=None, read_only=False, workdir=None, tls=None, args=(), params=(), env=None,
          tcp=False):
    """Start a server; `exports` maps export name -> ringbd-syntax spec;
    `tls` (see tls_args) serves TLS on TCP loopback; `args` are extra
    options and `params` extra nbdkit parameters, in the server's syntax;
    `env` more environment for the server; `tcp` listens on TCP loopback
    (without TLS) instead of a Unix socket."""
    return Server(kind, exports=exports, read_only=read_only, workdir=workdir, tls=tls,
                  args=args, params=params, env=env, tcp=tcp)


def _shm_dir():
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

@pytest.fixture
def shm_tmp():
    """A scratch directory on tmpfs (fast, sparse-capable) for images."""
    d = tempfile.mkdtemp(prefix="interop-", dir=_shm_dir())
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_server(server_kind):
    """Factory: start_server(exports=..., read_only=...) -> Server.

    All servers it started are stopped (SIGTERM) at teardown; for ringbd
    a non-zero exit status or a panic message fails the test.
    """
    servers = []

    def _start(exports=None, read_only=False, tls=None, args=(), params=(), tcp=False):
        srv = start(server_kind, exports=exports, read_only=read_only, tls=tls,
                    args=args, params=params, tcp=tcp)
        servers.append(srv)
        return srv

    yield _start
    errors = []
    for srv in servers:
        try:
            srv.stop()
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)


@pytest.fixture
def server(start_server):
    """Default: one 256 MiB sparse memory export named ""."""
    return start_server({"": "memory:256M"})


@pytest.fixture
def nbd_handle(start_server):
    """Factory for connected libnbd handles (disconnected at teardown).

    Depends on start_server so that handles are shut down *before* the
    servers get SIGTERM (nbdkit 1.32 waits for connected clients to leave).
    """
    import nbd

    handles = []

    def _connect(uri, strict=True, meta=True):
        h = nbd.NBD()
        if not strict:
            h.set_strict_mode(0)
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(uri)
        handles.append(h)
        return h

    yield _connect
    for h in handles:
        try:
            h.shutdown()
        except Exception:
            pass
    handles.clear()


@pytest.fixture
def ringbd():
    """Path of the ringbd binary (RINGBD_BIN); missing binary = failure."""
    path = ringbd_bin()
    assert os.access(path, os.X_OK), (
        "ringbd binary %s not found/executable (set RINGBD_BIN or run "
        "`cargo build --release`)" % path)
    return path


@pytest.fixture(scope="session")
def nbdsh(tmp_path_factory):
    """Run nbdsh with the Python that has the `nbd` module.

    /usr/bin/nbdsh execs `python3 -mnbd` from PATH; put a python3 that can
    import nbd (this interpreter) first on PATH for it.
    """
    import sys

    shim = tmp_path_factory.mktemp("nbdsh-python")
    os.symlink(sys.executable, shim / "python3")
    env = dict(os.environ, PATH="%s:%s" % (shim, os.environ.get("PATH", "")))

    exe = shutil.which("nbdsh")
    assert exe, "nbdsh is not installed (missing tool = failure)"

    def _nbdsh(*args, check=True):
        p = subprocess.run([exe, *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, timeout=60)
        if check and p.returncode != 0:
            raise AssertionError("nbdsh %s exited %d\nstdout:\n%s\nstderr:\n%s"
                                 % (args, p.returncode, p.stdout, p.stderr))
        return p
    return _nbdsh


@pytest.fixture(scope="session")
def image_dir():
    d = tempfile.mkdtemp(prefix="interop-images-", dir=_shm_dir())
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def random_image_256m(image_dir):
    from helpers import MiB, random_file
    return random_file(os.path.join(image_dir, "random-256m.img"), 256 * MiB, seed=256)


@pytest.fixture(scope="session")
def random_image_64m(image_dir):
    from helpers import MiB, random_file
    return random_file(os.path.join(image_dir, "random-64m.img"), 64 * MiB, seed=64)
