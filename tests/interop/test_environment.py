"""The suite's prerequisites, checked once up front so that a missing tool
shows up as one clear failure (tests never skip for a missing tool)."""

import re
import shutil
import sys

import pytest

from helpers import run

CLIENT_TOOLS = ("nbdinfo", "nbdsh", "nbdcopy", "qemu-img", "qemu-io", "fio", "cmp", "openssl")


@pytest.mark.parametrize("tool", CLIENT_TOOLS)
def test_client_tool_installed(tool):
    assert shutil.which(tool), "%s is not on PATH" % tool


def test_libnbd_python_binding():
    import nbd
    h = nbd.NBD()
    major, minor = (int(x) for x in h.get_version().split(".")[:2])
    assert (major, minor) >= (1, 14), h.get_version()
    assert sys.version_info >= (3, 9)


def test_qemu_speaks_extended_headers():
    # NBD extended headers appeared in the qemu 8.2 client; the
    # ringbd-only extended-header tests rely on it.
    out = run(["qemu-img", "--version"]).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    assert m and (int(m.group(1)), int(m.group(2))) >= (8, 2), out


def test_server_available(server_kind, ringbd_or_nbdkit):
    assert ringbd_or_nbdkit


@pytest.fixture
def ringbd_or_nbdkit(server_kind, request):
    if server_kind == "ringbd":
        return request.getfixturevalue("ringbd")
    exe = shutil.which("nbdkit")
    assert exe, "nbdkit is not installed"
    # the plugins and filters the nbdkit translation in conftest.py uses
    for extra in (["memory", "1M"], ["file", "dir=/"], ["null", "1M"]):
        run(["nbdkit", "-U", "-", "--filter=blocksize-policy", "--filter=exportname",
             *extra, "--run", "true"])
    return exe
