"""Nothing a client observes depends on private values: tried in two worlds.

Two worlds hold private datasets of the same shapes and dtypes whose values
differ: ordinary ones, and adversarial ones (NaN, ±inf, zeros, huge, subnormal,
negative numbers, labels far out of range). A curious client's script runs in
both — the side-channel attacks of the issue (shapes, failures, a NaN release),
and the paths around single operations: pointer chains, plans, a model's
forward and backward, optimizer steps, moves to a trusted worker, `aggregate`
and FedAvg's private path. Everything it observes is written to a transcript
(every outcome, error and message, shape, dtype, listing, release report);
the two transcripts must be equal. On both brokers, daemons included.

The single operations themselves are the campaign's (`noninterference.py`,
`test_fuzz.py`).
"""

from __future__ import annotations

import gc
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import torchrelay as tr
from torchrelay.worker import WorkerProcesses

tr.hook(torch)

OWNERS = ("bob", "alice")
WORKERS = (*OWNERS, "secure_worker")
POLICY: dict[str, Any] = {"k": 2, "clip": 1.0, "noise_multiplier": 1.0, "epsilon": 1e6,
                          "delta": 1e-5, "trusted": ["secure_worker"]}
ROWS, FEATURES, CLASSES = 16, 4, 3


def _world(name: str, owner: str) -> dict[str, torch.Tensor]:
    """A dataset of 16 rows of 4 features and a label: the same shapes in every world."""
    generator = torch.Generator().manual_seed(OWNERS.index(owner))
    if name == "ordinary":
        data = torch.rand(ROWS, FEATURES, generator=generator)
        target = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    else:  # what an attacker's probes would tell apart, if anything could
        specials = [math.nan, math.inf, -math.inf, 0.0, 3e38, 1e-40, -7.0, 1e-39]
        data = torch.tensor(specials * (ROWS * FEATURES // len(specials))).view(ROWS, FEATURES)
        target = torch.tensor([99, -5, 2, 0] * (ROWS // 4))
    return {"data": data, "target": target}


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    made: dict[str, dict[str, Path]] = {}
    for world in ("ordinary", "adversarial"):
        folder = tmp_path_factory.mktemp(world)
        made[world] = {}
        for owner in OWNERS:
            save_file(_world(world, owner), str(folder / f"{owner}.safetensors"))
            lines = ["[worker]", f'id = "{owner}"', 'broker = "amqp://set-by-flag/"', "",
                     "[[worker.datasets]]", f'path = "{owner}.safetensors"',
                     'tags = ["#private"]', "", "[worker.privacy]",
                     *(f"{k} = {json.dumps(v)}" for k, v in POLICY.items()),
                     f'ledger = "{owner}.privacy.json"']
            made[world][owner] = folder / f"{owner}.toml"
            made[world][owner].write_text("\n".join(lines) + "\n")
    return made


Opener = Callable[[str], Any]


@pytest.fixture(scope="module", params=["embedded", "rabbitmq"])
def open_world(request: pytest.FixtureRequest,
               configs: dict[str, dict[str, Path]]) -> Opener:
    """`open_world(world)`: a session on that world's workers."""
    daemons: dict[str, WorkerProcesses] = {}
    if request.param == "rabbitmq":
        for world, paths in configs.items():
            daemons[world] = request.getfixturevalue("daemons_factory")(
                WORKERS, worker_args={o: ["--config", str(p)] for o, p in paths.items()},
                request=request)

    def open_(world: str) -> Any:
        paths = configs[world]
        if request.param == "rabbitmq":
            return tr.connect(daemons[world].url, timeout=60)
        datasets = {o: [f"{paths[o].parent / o}.safetensors:#private"] for o in OWNERS}
        return tr.connect(None, datasets=datasets, privacy=dict.fromkeys(OWNERS, POLICY),
                          timeout=60)

    open_.broker = request.param  # type: ignore[attr-defined]
    return open_


class Transcript:
    """What a client observed, step by step; object ids (random) are left out."""

    def __init__(self, fleet: tr.Fleet) -> None:
        self.fleet = fleet
        self.lines: list[Any] = []

    def step(self, what: str, run: Callable[[], Any]) -> Any:
        """Run `run` and write down its outcome (and the first error a sync then gives)."""
        try:
            value = run()
            self.fleet.sync()
        except tr.TorchRelayError as e:
            self.lines.append((what, "error", type(e).__name__, _anonymous(str(e))))
            return None
        self.lines.append((what, "ok", _seen(value)))
        return value

    def note(self, what: str, value: Any) -> None:
        self.lines.append((what, _seen(value)))


def _anonymous(text: str) -> str:
    return re.sub(r"\d{6,}", "N", text)


def _seen(value: Any) -> Any:
    """What a client sees of a value without fetching it."""
    if isinstance(value, tr.PointerTensor):
        try:
            return ("pointer", value.dtype, tuple(value.shape), value.requires_grad)
        except tr.TorchRelayError as e:
            return ("pointer", type(e).__name__, _anonymous(str(e)))
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape))
    if isinstance(value, dict):
        return {str(k): _seen(v) for k, v in sorted(value.items(), key=str)}
    if isinstance(value, list | tuple):
        return [_seen(v) for v in value]
    if isinstance(value, str):
        return _anonymous(value)
    if value is None or isinstance(value, int | float | bool | torch.dtype | torch.Size):
        return value
    return type(value).__name__


def _private(fleet: tr.Fleet, owner: str) -> tuple[tr.PointerTensor, tr.PointerTensor]:
    (found,) = fleet.worker(owner).search("#private")
    return found["data"], found["target"]


def _listing(fleet: tr.Fleet, worker: str) -> list[str]:
    return sorted(_anonymous(str(d)) for d in fleet.worker(worker)._objects.values())


# -- the scenarios: a curious client's script ----------------------------------------------


def shapes_that_depend_on_values(t: Transcript) -> None:
    data, _ = _private(t.fleet, "bob")
    value = data[0, 0]
    t.step("bincount", lambda: torch.bincount((value * 100).long().reshape(1)))
    for threshold in (0.25, 0.5, 0.75):
        above = (value > threshold).reshape(1)
        t.step(f"nonzero {threshold}", lambda above=above: above.nonzero())
        t.step(f"masked_select {threshold}", lambda above=above: torch.masked_select(
            data[0, :1], above))
        t.step(f"boolean index {threshold}", lambda above=above: data[0, :1][above])
    t.step("unique", lambda: torch.unique(data))
    t.step("one_hot", lambda: F.one_hot(data[:, 0].long()))
    t.step("repeat_interleave", lambda: torch.repeat_interleave(
        data[0, :3], (data[1, :3] * 3).long()))


def failures_that_depend_on_values(t: Transcript) -> None:
    data, target = _private(t.fleet, "bob")
    bob = t.fleet.worker("bob")
    zeros = torch.zeros(3).send(bob)
    for threshold in (0.25, 0.5, 0.75):
        index = ((data[0, 0] > threshold).long() * 5).reshape(1)
        t.step(f"index_select {threshold}", lambda index=index: torch.index_select(
            zeros, 0, index))
        t.step(f"getitem {threshold}", lambda index=index: zeros[index])
        eye = torch.eye(2).send(bob)
        t.step(f"cholesky {threshold}", lambda eye=eye, th=threshold: torch.linalg.cholesky(
            eye * (data[0, 0] - th)))
    t.step("inverse", lambda: torch.linalg.inv(data[:4, :4]))
    t.step("solve", lambda: torch.linalg.solve(data[:4, :4], data[:4, 0]))
    t.step("cross_entropy", lambda: F.cross_entropy(data[:, :CLASSES], target))
    t.step("embedding", lambda: F.embedding(target, torch.randn(CLASSES, 2).send(bob)))
    t.step("multinomial", lambda: torch.multinomial(data[0], 2))
    t.step("bernoulli", lambda: torch.bernoulli(data))
    t.step("item", data[0, 0].item)
    t.step("tolist", data.tolist)
    gc.collect()  # dead pointers' objects deleted first: the same in every world
    t.step("listing", lambda: _listing(t.fleet, "bob"))
    t.note("status", {k: v for k, v in bob.status().items()
                      if k in ("objects", "tensor_bytes", "commands_failed")})


def a_release_that_is_nan_on_some_values(t: Transcript) -> None:
    secure = t.fleet.worker("secure_worker")
    contributions = []
    for owner in OWNERS:
        data, _ = _private(t.fleet, owner)
        # NaN exactly when the first value is above 0.5, else its (finite) mean
        poisoned = data.mean(0) + torch.log(0.5 - data[0, 0]).clamp(max=0) * 0
        contributions.append(poisoned.move(secure))
    release = t.step("aggregate", lambda: tr.aggregate(contributions))
    if release is not None:
        t.note("finite", bool(torch.isfinite(release.get()).all()))
        t.note("report", (sorted(release.epsilon), release.delta, release.noise_std))


def chains_and_moves(t: Transcript) -> None:
    alice, secure = t.fleet.worker("alice"), t.fleet.worker("secure_worker")
    data, _ = _private(t.fleet, "bob")
    chained = data.send(alice)  # alice -> bob
    result = t.step("op down a chain", lambda: (chained * 2).sum(0))
    t.step("meta down a chain", lambda: result.shape if result is not None else None)
    t.step("chain get", lambda: result.get() if result is not None else None)
    moved = t.step("move to trusted", lambda: (data * 1).move(secure))
    t.step("op where moved", lambda: moved.softmax(0) if moved is not None else None)
    t.step("move to untrusted", lambda: (data * 1).move(alice))
    t.step("listing", lambda: (_listing(t.fleet, "bob"), _listing(t.fleet, "secure_worker")))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(FEATURES, 8)
        self.out = nn.Linear(8, CLASSES)

    def forward(self, x: Any) -> Any:
        return self.out(torch.relu(self.hidden(x)))


def a_model_trained_on_private_data(t: Transcript) -> None:
    bob = t.fleet.worker("bob")
    data, target = _private(t.fleet, "bob")
    torch.manual_seed(0)
    model = _Net().send(bob)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        optimizer.zero_grad()
        loss = t.step(f"loss {step}", lambda: F.cross_entropy(model(data), target))
        t.step(f"backward {step}", lambda loss=loss: loss.backward())
        t.step(f"step {step}", optimizer.step)
        t.step(f"grad {step}", lambda: model.hidden.weight.grad)
    t.step("get a trained weight", model.hidden.weight.get)
    gc.collect()  # dead pointers' objects deleted first: the same in every world
    t.step("listing", lambda: _listing(t.fleet, "bob"))


def a_plan_on_private_data(t: Transcript) -> None:
    bob = t.fleet.worker("bob")
    data, target = _private(t.fleet, "bob")
    weight = torch.zeros(FEATURES, CLASSES, requires_grad=True).send(bob)

    @tr.plan
    def step(w: Any, x: Any, y: Any) -> Any:
        loss = F.cross_entropy(x @ w, y)
        loss.backward()
        return loss

    for run in range(3):
        t.step(f"plan run {run}", lambda: step(weight, data, target))
    t.note("recorded", str(step.recorded))
    t.step("weight grad", lambda: weight.grad)


def fedavg_on_private_data(t: Transcript) -> None:
    datasets = [t.fleet.worker(o).search("#private")[0] for o in OWNERS]
    torch.manual_seed(0)
    fedavg = tr.FedAvg(_Net(), F.cross_entropy, aggregator=t.fleet.worker("secure_worker"),
                       batch_size=4, progress=False)
    history = t.step("fit", lambda: fedavg.fit(datasets, 2))
    for number, result in enumerate(history or ()):
        t.note(f"round {number}", (result.participants, result.samples, result.left_out,
                                   math.isnan(result.loss), sorted(result.epsilon)))
    t.note("model", [p.shape for p in fedavg.model.parameters()])
    t.note("finite", all(bool(torch.isfinite(p).all()) for p in fedavg.model.parameters()))


SCENARIOS = [shapes_that_depend_on_values, failures_that_depend_on_values,
             a_release_that_is_nan_on_some_values, chains_and_moves,
             a_model_trained_on_private_data, a_plan_on_private_data, fedavg_on_private_data]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_a_curious_client_observes_the_same_whatever_the_private_values(
    open_world: Opener, scenario: Callable[[Transcript], None]
) -> None:
    transcripts = {}
    for world in ("ordinary", "adversarial"):
        with open_world(world) as fleet:
            transcript = Transcript(fleet)
            torch.manual_seed(0)
            scenario(transcript)
            transcripts[world] = transcript.lines
    for ordinary, adversarial in zip(transcripts["ordinary"], transcripts["adversarial"],
                                     strict=True):
        assert ordinary == adversarial
    assert len(transcripts["ordinary"]) > 2


def test_daemons_flush_subnormal_numbers_to_zero(open_world: Opener) -> None:
    # Arithmetic on subnormals is several times slower: a client could time it. (In
    # process, the worker's arithmetic is the client's: left as it is.)
    if open_world.broker == "embedded":  # type: ignore[attr-defined]
        pytest.skip("an embedded worker computes in the client's own process")
    with open_world("ordinary") as fleet:
        tiny = torch.full((4,), 1e-39).send(fleet.worker("alice"))
        assert torch.equal((tiny * 0.5).get(), torch.zeros(4))
