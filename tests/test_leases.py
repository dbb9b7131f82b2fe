"""Leases: the objects of a client that died are reclaimed once its lease runs out,
and not before; other participants' objects stay (RabbitMQ, a daemon)."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import torch

import torchrelay as tr

tr.hook(torch)

LEASE = 10.0

_DOOMED_CLIENT = """
import sys, time, torch, torchrelay as tr
tr.hook(torch)
fleet = tr.connect(sys.argv[1], name="doomed")
kept = [torch.ones(1000).send(fleet.worker("keeper")) for _ in range(10)]
fleet.sync()
print("ready", flush=True)
time.sleep(600)
"""


def _held(fleet: tr.Fleet, identity: str) -> int:
    holders = fleet.worker("keeper").status()["holders"]
    return int(holders.get(identity, {}).get("objects", 0))


def test_a_dead_client_s_objects_are_reclaimed_after_its_lease_and_not_before(
    daemons_for_test: Any,
) -> None:
    daemons = daemons_for_test(("keeper",), worker_args={"keeper": ["--lease", str(LEASE)]})
    with tr.connect(daemons.url, name="watcher") as watcher:
        mine = torch.tensor([7.0]).send(watcher.worker("keeper"))
        client = subprocess.Popen([sys.executable, "-c", _DOOMED_CLIENT, daemons.url],
                                  stdout=subprocess.PIPE)
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == b"ready"
            status = watcher.worker("keeper").status()["holders"]["doomed"]
            assert status == {"objects": 10, "bytes": 10 * 4000}  # per holder, in status
        finally:
            client.kill()  # no goodbye: its connection just drops
            client.wait()
            if client.stdout is not None:
                client.stdout.close()
        killed = time.monotonic()
        assert _held(watcher, "doomed") == 10  # a lease is not over at once
        deadline = killed + LEASE + 60
        while _held(watcher, "doomed") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _held(watcher, "doomed") == 0
        assert time.monotonic() - killed >= LEASE  # reclaimed only once the lease ran out
        assert mine.get().tolist() == [7.0]  # someone else's stay
