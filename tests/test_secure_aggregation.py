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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import torchrelay as tr
from torchrelay.broker import (
    Fetch,
    SecAggCommit,
    SecAggIntroduce,
    SecAggJoin,
    SecAggMask,
    SecAggShare,
    SecAggUnmask,
    SecureAggregate,
    Transfer,
    worker_queue,
)
from torchrelay.worker import WorkerProcesses
from torchrelay.worker.runtime._secagg import RoundTerms, decode, unmask

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
        save_file({"data": _data(owner), "target": torch.arange(6)},
                  str(folder / f"{owner}.safetensors"))
        lines = ["[worker]", f'id = "{owner}"', 'broker = "amqp://set-by-flag/"', "",
                 "[[worker.datasets]]", f'path = "{owner}.safetensors"', 'tags = ["#secret"]',
                 "", "[worker.privacy]",
                 *(f"{k} = {json.dumps(v)}" for k, v in POLICY.items()),
                 f'ledger = "{owner}.privacy.json"']
        paths[owner] = folder / f"{owner}.toml"
        paths[owner].write_text("\n".join(lines) + "\n")
    return paths


def _start(request: pytest.FixtureRequest, configs: dict[str, Path],
           extra: tuple[str, ...] = ()) -> WorkerProcesses:
    factory = request.getfixturevalue("daemons_factory")
    daemons: WorkerProcesses = factory(WORKERS, *extra, worker_args={
        owner: ["--config", str(path)] for owner, path in configs.items()}, request=request)
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


def test_hostile_aggregator_and_participants_are_refused(fleet: tr.Fleet) -> None:
    o1, agg = fleet.worker("o1"), fleet.worker("agg")
    before = _refusals(fleet, "o1")
    x = torch.ones(4).send(o1)
    round_id = "ab" * 16
    join = SecAggJoin(round_id, "agg", list(OWNERS), 3, [1.0] * 5, [x.id_at_location])
    fleet.request("o1", join)
    x.garbage_collect = False
    with pytest.raises(tr.ObjectNotFound):  # the contribution is spent: not fetched,
        fleet.request("o1", Fetch(x.id_at_location))
    with pytest.raises(tr.ObjectNotFound):  # ... not moved elsewhere,
        fleet.request("o1", Transfer(x.id_at_location, "agg", fleet.new_id()))
    with pytest.raises(tr.ObjectNotFound):
        fleet.request("o1", SecAggJoin("ef" * 16, "agg", list(OWNERS), 3, [1.0] * 5,
                                       [x.id_at_location]))  # ... nor in another round
    y = torch.ones(4).send(o1)
    with pytest.raises(tr.PrivateDataError, match="replayed round"):
        fleet.request("o1", SecAggJoin(round_id, "agg", list(OWNERS), 3, [1.0] * 5,
                                       [y.id_at_location]))
    # not the aggregator: the client asks for the masked input, the shares
    for step in (SecAggShare(round_id, list(OWNERS)), SecAggMask(round_id, list(OWNERS)),
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


def test_an_owner_told_other_terms_is_refused_by_the_others_and_left_out(
        fleet: tr.Fleet) -> None:
    values = {o: torch.randn(4) for o in OWNERS}
    pointers = {o: values[o].send(fleet.worker(o)) for o in OWNERS}
    before = {o: _refusals(fleet, o) for o in OWNERS}
    round_id = "9" * 32
    for owner, pointer in pointers.items():  # o5 is told it weighs five times the others
        weights = [1.0, 1.0, 1.0, 1.0, 5.0 if owner == "o5" else 1.0]
        fleet.request(owner, SecAggJoin(round_id, "agg", list(OWNERS), 3, weights,
                                        [pointer.id_at_location]))
        pointer.garbage_collect = False
    report = fleet.request("agg", SecureAggregate(round_id, list(OWNERS), 3, [1.0] * 5, [[4]],
                                                  (result := fleet.new_id())))
    assert report["dropped"] == ["o5"]
    average = tr.PointerTensor(fleet.worker("agg"), result).get()
    assert torch.allclose(average, sum(values[o] for o in OWNERS[:4]) / 4, atol=1e-6)
    # each of o1..o4 refused o5's introduction, and o5 refused each of theirs
    assert [_refusals(fleet, o) - before[o] for o in OWNERS] == [1, 1, 1, 1, 4]


def test_a_hostile_aggregator_gets_no_share_that_unmasks_an_input(daemons: Any) -> None:
    if daemons is None:
        pytest.skip("the test plays the aggregator: a second identity, RabbitMQ's shared "
                    "account")
    with tr.connect(daemons.url, name="evil", timeout=60) as evil:
        before = {o: _refusals(evil, o) for o in OWNERS}
        pointers = [torch.randn(4).send(evil.worker(o)) for o in OWNERS]
        round_id = "e" * 32
        for pointer in pointers:
            evil.request(pointer.location.id, SecAggJoin(
                round_id, "evil", list(OWNERS), 3, [1.0] * 5, [pointer.id_at_location]))
            pointer.garbage_collect = False
        for owner in OWNERS:
            evil.request(owner, SecAggShare(round_id, list(OWNERS)))
        for owner in OWNERS:
            evil.request(owner, SecAggMask(round_id, list(OWNERS)))
        # To o1, o5 "dropped" (its pairwise masks would come off); to the others, it
        # survived (its self-mask would come off): together, o5's input in the clear.
        evil.request("o1", SecAggCommit(round_id, list(OWNERS[:4])))
        for owner in OWNERS[1:]:
            evil.request(owner, SecAggCommit(round_id, list(OWNERS)))
        for owner in OWNERS:
            with pytest.raises(tr.PrivateDataError, match="inconsistent participant lists"):
                evil.request(owner, SecAggUnmask(round_id))
        # told other survivors now, to get the other share of o5: refused
        with pytest.raises(tr.PrivateDataError, match="named other survivors"):
            evil.request("o2", SecAggCommit(round_id, list(OWNERS[:4])))
        with pytest.raises(tr.PrivateDataError, match="replay"):  # its masked input again
            evil.request("o3", SecAggMask(round_id, list(OWNERS)))
        fresh = torch.randn(4).send(evil.worker("o4"))
        with pytest.raises(tr.PrivateDataError, match="replayed round"):
            evil.request("o4", SecAggJoin(round_id, "evil", list(OWNERS), 3, [1.0] * 5,
                                          [fresh.id_at_location]))
        del fresh
        after = [_refusals(evil, o) - before[o] for o in OWNERS]
        assert after == [1, 2, 2, 2, 1]


# -- dropouts: a fleet of its own for each test, owners killed at exact points ----------


@pytest.fixture(params=["embedded", "rabbitmq"])
def lossy(request: pytest.FixtureRequest, configs: dict[str, Path],
          ) -> Iterator[tuple[tr.Fleet, Callable[[str], None], str | None]]:
    """A fleet, a way to kill an owner's worker (its daemon and executor, or its queue
    in process), and the broker's URL (None in process)."""
    # (Those a killed owner leaves waiting fail after 3 s, not the default 15: nothing
    # here restarts.)
    daemons = None if request.param == "embedded" else _start(request, configs,
                                                              ("--gone-after", "3"))
    with _connect(daemons, configs) as session:
        def kill(owner: str) -> None:
            if daemons is None:
                broker: Any = session.broker
                endpoint = broker._queues[worker_queue(owner)]
                endpoint.closed = True
                broker.detach(endpoint)
                broker._start_worker = None  # gone, not started again on first use
            else:
                executor = int(session.worker(owner).status()["executor_pid"])
                for pid in (daemons.processes[owner].pid, executor):
                    os.kill(pid, signal.SIGKILL)

        yield session, kill, None if daemons is None else daemons.url


def _contributions(fleet: tr.Fleet, owners: tuple[str, ...] = OWNERS,
                   ) -> tuple[dict[str, torch.Tensor], list[tr.PointerTensor]]:
    values = {o: torch.randn(7, dtype=torch.float64).float() for o in owners}
    return values, [values[o].send(fleet.worker(o)) for o in owners]


def test_owners_lost_before_masking_are_left_out_and_too_few_release_nothing(
        lossy: tuple[tr.Fleet, Callable[[str], None], str | None]) -> None:
    fleet, kill, _ = lossy
    agg = fleet.worker("agg")
    values, pointers = _contributions(fleet)
    for pointer in pointers:
        fleet.request(pointer.location.id, SecAggJoin(
            "1" * 32, "agg", list(OWNERS), 3, [1.0] * 5, [pointer.id_at_location]))
        pointer.garbage_collect = False
    kill("o5")  # joined, then lost before it shared its keys: left out
    report = fleet.request("agg", SecureAggregate("1" * 32, list(OWNERS), 3, [1.0] * 5,
                                                  [[7]], (result := fleet.new_id())))
    assert report["survivors"] == ["o1", "o2", "o3", "o4"] and report["dropped"] == ["o5"]
    average = tr.PointerTensor(agg, result).get()
    assert torch.allclose(average, sum(values[o] for o in OWNERS[:4]) / 4, atol=1e-6)
    # three of five lost: fewer than the threshold; the round aborts, nothing released
    values, pointers = _contributions(fleet, OWNERS[:4])
    for pointer in pointers:
        fleet.request(pointer.location.id, SecAggJoin(
            "2" * 32, "agg", list(OWNERS), 3, [1.0] * 5, [pointer.id_at_location]))
        pointer.garbage_collect = False
    kill("o3")
    kill("o4")
    before = set(agg._objects)
    with pytest.raises(tr.PrivateDataError, match=r"only 2 owners shared their keys.*nothing is "
                       "released"):
        fleet.request("agg", SecureAggregate("2" * 32, list(OWNERS), 3, [1.0] * 5, [[7]],
                                             fleet.new_id()))
    assert set(agg._objects) == before


def test_an_owner_lost_after_masking_is_unmasked_from_the_others_shares(
        lossy: tuple[tr.Fleet, Callable[[str], None], str | None]) -> None:
    fleet, kill, url = lossy
    if url is None:
        values, pointers = _contributions(fleet)
        # In process, o5 is lost the moment it has sent its masked input, under the
        # aggregator worker itself.
        endpoint: Any = fleet.broker._queues[worker_queue("o5")]  # type: ignore[attr-defined]
        handler = endpoint.handler

        def then_lost(delivery: Any) -> None:
            handler(delivery)
            if delivery.type == SecAggMask.name:
                kill("o5")

        endpoint.handler = then_lost
        release = tr.aggregate(pointers, aggregator=fleet.worker("agg"), secure=True)
        assert release.dropped == []  # its input is in the sum
        with pytest.raises(tr.UnknownWorker):
            fleet.worker("o5").status()  # and it was gone before the shares were revealed
        assert torch.allclose(release.get(), sum(values.values()) / 5, atol=1e-6)
        return
    # On daemons, the test is the aggregator (a shared account: the sender is who it
    # says), so that o5's daemon dies exactly after its masked input came.
    with tr.connect(url, name="tester", timeout=60) as us:
        round_id = "3" * 32
        values, pointers = _contributions(us)
        for pointer in pointers:
            us.request(pointer.location.id, SecAggJoin(
                round_id, "tester", list(OWNERS), 3, [1.0] * 5, [pointer.id_at_location]))
            pointer.garbage_collect = False
        shared = [o for o in OWNERS
                  if us.request(o, SecAggShare(round_id, list(OWNERS))) is not None]
        masked = {o: us.request(o, SecAggMask(round_id, shared)) for o in OWNERS}
        kill("o5")
        for o in OWNERS[:4]:
            us.request(o, SecAggCommit(round_id, list(OWNERS)))
        # (Together: each asks o5 for its view, and waits until o5 is known gone; four
        # such waits overlap, as the aggregator's do.)
        revealed = us.request_many([(o, SecAggUnmask(round_id)) for o in OWNERS[:4]])
    terms = RoundTerms(round_id, "tester", OWNERS, 3, (0.2,) * 5, 7)
    total = unmask(torch.stack([m["masked"] for m in masked.values()]).sum(0), terms,
                   shared=list(OWNERS), survivors=list(OWNERS),
                   s_publics={o: bytes.fromhex(m["s_public"]) for o, m in masked.items()},
                   revealed=revealed)
    assert torch.allclose(decode(total).float(), sum(values.values()) / 5, atol=1e-6)
