"""nbdcopy (libnbd 1.14) with several connections (needs CAN_MULTI_CONN)."""

import os

from helpers import MiB, files_equal, run


def test_nbdcopy_roundtrip_4_connections(start_server, shm_tmp, random_image_64m):
    srv = start_server({"": "memory:64M"})
    uri = srv.uri()

    run(["nbdcopy", "--connections=4", "--flush", random_image_64m, uri])
    out = os.path.join(shm_tmp, "out.img")
    run(["nbdcopy", "--connections=4", uri, out])

    assert os.path.getsize(out) == 64 * MiB
    assert files_equal(random_image_64m, out)
