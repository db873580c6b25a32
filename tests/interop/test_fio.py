"""fio's nbd engine (libnbd based): deep queues, two jobs, crc32c verify."""

import json
import os

import pytest

from helpers import MiB, run, sparse_file

JOB_SIZE = 32 * MiB
NUMJOBS = 2


@pytest.mark.parametrize("backing", ["memory", "file"])
def test_fio_randwrite_verify(start_server, shm_tmp, backing):
    size = JOB_SIZE * NUMJOBS
    if backing == "memory":
        spec = "memory:%d" % size
    else:
        spec = "file:" + sparse_file(os.path.join(shm_tmp, "fio.img"), size)
    srv = start_server({"": spec})
    out = os.path.join(shm_tmp, "fio.json")

    run([
        "fio", "--name=interop", "--ioengine=nbd", "--uri=" + srv.uri(),
        "--rw=randwrite", "--bs=4k", "--iodepth=32",
        "--numjobs=%d" % NUMJOBS,
        # each job owns its own region, so verification cannot race
        "--size=%d" % JOB_SIZE, "--offset_increment=%d" % JOB_SIZE,
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
        "--verify_backlog=1024",
        # no local-*-verify.state files in the working directory
        "--verify_state_save=0",
        "--group_reporting", "--output-format=json", "--output=" + out,
    ], timeout=120, cwd=shm_tmp)

    with open(out) as f:
        result = json.load(f)
    [job] = result["jobs"]
    assert job["error"] == 0
    # every byte written once and read back for verification
    assert job["write"]["io_bytes"] == size
    assert job["read"]["io_bytes"] == size
