"""The server-wide reply budget (`ringbd serve --reply-memory`), under the
hostile load of test_resources.py: many connections that each park the
most they can and never read must hold, together, about what the budget
says, not each the per-connection maximum; well-behaved clients keep being
served meanwhile, the attackers' replies are intact, and everything comes
back when they leave.

ringbd only: nbdkit and qemu-nbd have no such budget (their per-connection
results are test_resources.py's).
"""

import os
import time

import pytest

from helpers import MiB
from test_resources import (  # noqa: F401 (fixtures are found by name)
    Attacker, BIG, GOOD_OPS, Good, RSS_BACK_TOLERANCE, RSS_BACK_WITHIN, SIZE,
    assert_served, closing, disk_tmp, lat_summary, mib, note, prefill_data,
    readable, rss, serve, settle_rss, still_serves)

ATTACKERS = 32
BUDGET = 16 * MiB
# What the model allows (docs/engine.md, "Resource model"): with 33
# connections the share is 16 MiB / 33 (496 KiB), and each connection holds
# at most its share of replies, two 64 KiB pieces, a share of received
# input and a quarter share of recycled buffers: about 1.2 MiB, 40 MiB for
# all. The limit leaves room for the allocator; without the budget (8 MiB
# shares) the same attack holds over 250 MiB.
BUDGET_RSS_LIMIT = 64 * MiB


@pytest.mark.ringbd_only
@pytest.mark.parametrize("replies", ["structured", "simple"])
def test_reply_budget_many_parked_connections(serve, closing, disk_tmp, replies):
    path = os.path.join(disk_tmp, "budget.img")
    with open(path, "wb") as f:
        f.write(prefill_data())
        f.truncate(SIZE)
    srv = serve({"": "file:%s" % path}, ringbd_args=["--reply-memory", str(BUDGET)])
    pid = srv.proc.pid
    good = closing(Good(srv, 0, what="well-behaved client beside the parked reads"))
    good.ops(20)
    good.lat.clear()
    rss0 = rss(pid)
    attackers = []
    for i in range(ATTACKERS):
        a = closing(Attacker(srv, structured=replies == "structured", what="attacker %d" % i))
        for j in range(4):
            a.read(((i + j) % 2) * BIG, BIG)
        a.send_now()
        attackers.append(a)
    for a in attackers:
        assert readable(a.c.s, 15), "%s: no reply began within 15 s%s" % (a.what, note(srv))
    peak = settle_rss(pid)
    good.ops(GOOD_OPS)
    peak = max(peak, rss(pid))
    print("\n%d connections x 4 x 32 MiB reads parked, --reply-memory %s: RSS %s -> %s (+%s); %s"
          % (ATTACKERS, mib(BUDGET), mib(rss0), mib(peak), mib(peak - rss0), lat_summary(good.lat)))
    assert peak - rss0 < BUDGET_RSS_LIMIT, (
        "RSS grew by %s (from %s to %s) with %d connections parking reads under a %s budget"
        % (mib(peak - rss0), mib(rss0), mib(peak), ATTACKERS, mib(BUDGET)))
    assert_served([good], "%d connections parking reads" % ATTACKERS)

    # The attackers' replies are intact (read in pieces of a small share).
    for a in attackers[:4]:
        n, closed = a.drain(want=2)
        assert closed is None and n == 2, "%s: %d replies, then %s%s" % (a.what, n, closed, note(srv))
    for a in attackers:
        a.close()
    deadline = time.monotonic() + RSS_BACK_WITHIN
    while rss(pid) > rss0 + RSS_BACK_TOLERANCE and time.monotonic() < deadline:
        assert srv.alive(), "after the attackers left:" + note(srv)
        time.sleep(0.1)
    assert rss(pid) <= rss0 + RSS_BACK_TOLERANCE, "RSS %s after the attackers left" % mib(rss(pid))
    good.close()
    still_serves(srv)
