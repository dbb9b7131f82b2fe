"""Secure aggregation on both brokers: the aggregator learns the sum and nothing else.

Five owners o1..o5 hold private data and accept only secure aggregates
(`secure_aggregation = true`, threshold 3, k 3); `agg` is the aggregator, trusted
by no one. The secure sum must equal the plain one within the fixed point's error;
owners lost before sharing are left out, one lost after masking is unmasked from
the others' shares, too few survivors release nothing; and every hostile step —
an aggregator's or another participant's — is refused and counted.
"""

from __future__ import annotations

import gc
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import torchrelay as tr
from torchrelay.broker import (
    Fetch,
    SecAggIntroduce,
    SecAggJoin,
    SecAggMask,
    SecAggShare,
    SecAggUnmask,
    SecureAggregate,
)
from torchrelay.worker import WorkerProcesses

tr.hook(torch)

OWNERS = ("o1", "o2", "o3", "o4", "o5")
POLICY: dict[str, Any] = {"k": 3, "clip": 100.0, "noise_multiplier": 0.5,
                          "epsilon": 1e4, "delta": 1e-5, "secure_aggregation": True,
                          "threshold": 3}
WORKERS = (*OWNERS, "agg")


def _data(owner: str) -> torch.Tensor:
    return torch.arange(6, dtype=torch.float32) + 10.0 * (1 + OWNERS.index(owner))


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("secure")
    paths = {}
    for owner in OWNERS:
        save_file({"data": _data(owner), "target": torch.arange(6)}, str(folder / f"{owner}.safetensors"))
        lines = ["[worker]", f'id = "{owner}"', 'broker = "amqp://set-by-flag/"', "",
                 "[[worker.datasets]]", f'path = "{owner}.safetensors"', 'tags = ["#secret"]',
                 "", "[worker.privacy]",
                 *(f"{k} = {json.dumps(v)}" for k, v in POLICY.items()),
                 f'ledger = "{owner}.privacy.json"']
        paths[owner] = folder / f"{owner}.toml"
        paths[owner].write_text("\n".join(lines) + "\n")
    return paths


def _start(request: pytest.FixtureRequest, configs: dict[str, Path]) -> WorkerProcesses:
    factory = request.getfixturevalue("daemons_factory")
    daemons: WorkerProcesses = factory(WORKERS, worker_args={
        owner: ["--config", str(path)] for owner, path in configs.items()})
    return daemons


@pytest.fixture(scope="module", params=["embedded", "rabbitmq"])
def daemons(request: pytest.FixtureRequest, configs: dict[str, Path]) -> Any:
    return None if request.param == "embedded" else _start(request, configs)


def _connect(daemons: WorkerProcesses | None, configs: dict[str, Path],
             name: str | None = None) -> tr.Fleet:
    url = None if daemons is None else daemons.url
    datasets = {o: [f"{configs[o].parent / o}.safetensors:#secret"] for o in OWNERS}
    return tr.connect(url, datasets=datasets, privacy=dict.fromkeys(OWNERS, POLICY),
                      timeout=60, **({} if name is None else {"name": name}))


@pytest.fixture
def fleet(daemons: Any, configs: dict[str, Path]) -> Iterator[tr.Fleet]:
    with _connect(daemons, configs) as session:
        workers = [session.worker(w) for w in WORKERS]
        before = {w.id: set(w._objects) for w in workers}
        yield session
        gc.collect()
        session.sync()
        after = {w.id: set(w._objects) for w in workers}
        assert after == before  # nothing left, nothing lost


def _secret(fleet: tr.Fleet, owner: str) -> tr.PointerTensor:
    (found,) = fleet.worker(owner).search("#secret")
    return found["data"]


def _refusals(fleet: tr.Fleet, owner: str) -> int:
    return int(fleet.worker(owner).status().get("secagg_refused", 0))


def test_the_secure_sum_is_the_plain_sum(fleet: tr.Fleet) -> None:
    values = [torch.randn(3, 4) for _ in OWNERS]
    pointers = [v.send(fleet.worker(o)) for v, o in zip(values, OWNERS, strict=True)]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    release = tr.aggregate(pointers, weights, aggregator=fleet.worker("agg"), secure=True)
    expected = sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)
    assert torch.allclose(release.get(), expected, atol=1e-6)
    assert release.dropped == [] and release.epsilon == {}  # public data: no noise
    for pointer in pointers:  # spent on its owner: in this round and no other
        with pytest.raises(tr.ObjectNotFound):
            pointer.get()


def test_private_data_leaves_only_securely_with_each_owners_noise(fleet: tr.Fleet) -> None:
    agg = fleet.worker("agg")
    data = _secret(fleet, "o1")
    with pytest.raises(tr.PrivateDataError, match="only in secure aggregates"):
        (data * 2).move(agg)
    contributions = [_secret(fleet, o) * 1.0 for o in OWNERS]
    release = tr.aggregate(contributions, aggregator=agg, secure=True)
    average = release.get()
    assert set(release.epsilon) == set(OWNERS) and all(e > 0 for e in release.epsilon.values())
    sigma = 0.5 * 0.2 * 100.0  # noise multiplier x weight x clip
    assert release.noise_std == pytest.approx(sigma)
    plain = sum(_data(o) for o in OWNERS) / 5
    assert (average - plain).abs().max() < 6 * sigma  # noise of about sigma, no more
    assert not torch.allclose(average, plain, atol=1e-3)  # ... and no less


def test_an_owner_lost_before_sharing_is_left_out(daemons: Any, fleet: tr.Fleet,
                                                  configs: dict[str, Path]) -> None:
    values = {o: torch.randn(5) for o in OWNERS}
    pointers = [values[o].send(fleet.worker(o)) for o in OWNERS]
    release = tr.aggregate(pointers[:4] + [pointers[4]], aggregator=fleet.worker("agg"),
                           secure=True, threshold=3)
    assert torch.allclose(release.get(), sum(values.values()) / 5, atol=1e-6)


def test_hostile_aggregator_and_participants_are_refused(fleet: tr.Fleet) -> None:
    o1, agg = fleet.worker("o1"), fleet.worker("agg")
    before = _refusals(fleet, "o1")
    x = torch.ones(4).send(o1)
    round_id = "ab" * 16
    join = SecAggJoin(round_id, "agg", list(OWNERS), 3, [1.0] * 5, [x.id_at_location])
    fleet.request("o1", join)
    x.garbage_collect = False
    with pytest.raises(tr.ObjectNotFound):  # the contribution is spent
        fleet.request("o1", Fetch(x.id_at_location))
    y = torch.ones(4).send(o1)
    with pytest.raises(tr.PrivateDataError, match="replayed round"):
        fleet.request("o1", SecAggJoin(round_id, "agg", list(OWNERS), 3, [1.0] * 5,
                                       [y.id_at_location]))
    # not the aggregator: the client asks for the masked input, the shares
    for step in (SecAggShare(round_id), SecAggMask(round_id, list(OWNERS)),
                 SecAggUnmask(round_id)):
        with pytest.raises(tr.PrivateDataError, match="not the aggregator"):
            fleet.request("o1", step)
    # a key message from someone who is not an owner of the round
    with pytest.raises(tr.PrivateDataError, match="not an other owner"):
        fleet.request("o1", SecAggIntroduce(round_id, "00", "00" * 32, "00" * 32, 0.0))
    # a threshold below the owner's
    z = torch.ones(4).send(o1)
    with pytest.raises(tr.PrivateDataError, match="threshold from 3"):
        fleet.request("o1", SecAggJoin("cd" * 16, "agg", list(OWNERS), 2, [1.0] * 5,
                                       [z.id_at_location]))
    assert _refusals(fleet, "o1") == before + 6
    for refused in (y, z):  # a refused join leaves the contribution as it was
        assert torch.equal(refused.get(), torch.ones(4))
    # the aggregator refuses a replayed round too, and releases nothing
    with pytest.raises(tr.PrivateDataError):
        fleet.request("agg", SecureAggregate(round_id, list(OWNERS), 3, [1.0] * 5, [[4]],
                                             fleet.new_id()))
    del agg
