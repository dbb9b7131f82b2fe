"""The hot path's stamps (`broker/_trace.py`): off by default, in order when on."""

from __future__ import annotations

import torch

import torchrelay as tr
from torchrelay.broker import _trace

tr.hook(torch)


def test_nothing_is_kept_unless_tracing() -> None:
    _trace.stamp("worker.decoded", "a")
    assert _trace.stop() == []
    _trace.start()
    _trace.stamp("worker.decoded", "a")
    _trace.stamp("worker.ran")
    stamps = _trace.stop()
    assert [(stage, key) for stage, key, _ in stamps] == [("worker.decoded", "a"),
                                                          ("worker.ran", "")]
    assert stamps[0][2] <= stamps[1][2]
    _trace.stamp("worker.ran")
    assert _trace.stop() == []


def test_a_small_operation_crosses_every_layer_in_order() -> None:
    fleet = tr.connect()  # embedded: client and worker stamp in this process
    try:
        x = torch.ones(4).send(fleet.worker("bob"))
        fleet.sync()
        _trace.start()
        y = x + x
        fleet.sync()
        stages = [stage for stage, _, _ in _trace.stop()]
        assert torch.equal(y.get(), torch.full((4,), 2.0))
    finally:
        fleet.close()
    expected = ["client.call", "client.queued", "worker.decoded", "worker.admitted",
                "worker.started", "worker.resolved", "worker.checked", "worker.ran",
                "worker.stored", "worker.encoded", "client.settled"]
    assert [s for s in stages if s in expected] == expected
