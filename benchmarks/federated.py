"""Training where the data is: one remote training step, and FedAvg beside Flower.

`train_step`: one step of the demo's MLP (64-32-10) on a 64-sample batch
(forward, loss, backward, SGD step, loss fetched) on the daemon bob, three ways:
operation by operation (pipelined: one message, one round trip), as a
`tr.plan` (one command), and as a plan whose loss is not fetched (no round
trip at all: N steps, then one sync). Against the same step run locally, and
a bare pika round trip. Each way's commands, messages and waits per step are
counted on the client.

`fedavg`: the Flower anchor's workload (`../shared/anchors/flower`, repeated in
`torchrelay/_federated.py`) for 20 rounds, with bob, alice and carol as daemons
holding their shares and secure_worker aggregating, on RabbitMQ; on the
embedded broker; the anchor's one-process loop here; Flower 1.42's direct-gRPC
run here (`flower_legacy.py`, when flwr is installed); and Flower's Deployment
and Simulation engines as the anchor measured them (read from its results file).
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

import torchrelay as tr
from torchrelay._federated import (
    AGGREGATOR,
    DIGIT_OWNERS,
    accuracy,
    anchor_order,
    load_digits,
    make_model,
    one_torch_thread,
    permutation,
    train_centrally,
    write_shares,
)
from torchrelay.client import Fleet

from .processes import run_module
from .report import MeasureResult, Row, Skipped, Target, at_least, at_most, not_measured
from .session import Session, send
from .stats import median, micros, millis, percentile, progress

ANCHOR_RESULTS = (Path(__file__).resolve().parents[2] / "shared" / "anchors" / "flower"
                  / "results" / "flower_fedavg.json")
"""Flower's Deployment and Simulation figures, as measured for the anchor."""


# -- one training step -------------------------------------------------------------------


class _Counts:
    """Commands, messages and waits of a fleet while counting."""

    def __init__(self, fleet: Fleet) -> None:
        self.commands = self.messages = self.waits = 0
        self.fleet = fleet

    @contextmanager
    def counting(self) -> Iterator[_Counts]:
        fleet, endpoint = self.fleet, self.fleet.endpoint
        send, collect, publish = fleet._send, fleet._collect, endpoint.send_command

        def counted_send(*args: Any, **kwargs: Any) -> str:
            self.commands += 1
            return send(*args, **kwargs)

        def counted_collect(**kwargs: Any) -> None:
            if fleet.pending:  # (posted commands, published or still queued)
                self.waits += 1
            collect(**kwargs)

        def counted_publish(*args: Any, **kwargs: Any) -> None:
            self.messages += 1
            publish(*args, **kwargs)

        fleet._send, fleet._collect = counted_send, counted_collect  # type: ignore[method-assign]
        endpoint.send_command = counted_publish  # type: ignore[method-assign]
        try:
            yield self
        finally:
            del fleet._send, fleet._collect
            del endpoint.send_command

    def as_dict(self) -> dict[str, int]:
        return {"commands": self.commands, "messages": self.messages, "waits": self.waits}

    def per(self, steps: int) -> str:
        return (f"{self.commands / steps:g} commands, {self.messages / steps:g} messages, "
                f"{self.waits / steps:g} round trips per step")


def train_step(session: Session) -> MeasureResult:
    fleet, bob, _, pika = session.require()
    s = session.settings
    torch.manual_seed(0)
    model = make_model()
    local = copy.deepcopy(model)
    data, target = torch.rand(64, 64), torch.randint(0, 10, (64,))
    local_optimizer = torch.optim.SGD(local.parameters(), lr=0.1)
    remote = cast(Any, model).send(bob)  # nn.Module.send, from tr.hook(torch)
    optimizer = tr.optim.SGD(remote.parameters(), lr=0.1)
    remote_data, remote_target = send(data, bob), send(target, bob)

    def local_step() -> None:
        local_optimizer.zero_grad()
        loss = F.cross_entropy(local(data), target)
        loss.backward()  # type: ignore[no-untyped-call]
        local_optimizer.step()
        loss.item()

    def remote_ops(d: Any, t: Any) -> Any:
        optimizer.zero_grad()
        loss = F.cross_entropy(remote(d), t)
        loss.backward()
        optimizer.step()
        return loss.detach()

    planned = tr.plan(remote_ops)

    def op_by_op() -> None:
        remote_ops(remote_data, remote_target).get()

    def plan_fetched() -> None:
        planned(remote_data, remote_target).get()

    def timed(step: Callable[[], None], count: int) -> list[float]:
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            step()
            samples.append(time.perf_counter() - start)
        return samples

    def pika_call() -> None:
        pika.call(b"x" * 64)

    ways = {"local": local_step, "op by op": op_by_op, "plan": plan_fetched, "pika": pika_call}
    for step in ways.values():
        timed(step, max(20, s.train_steps // 20))
    counts = {}
    for name in ("op by op", "plan"):
        with _Counts(fleet).counting() as counted:
            timed(ways[name], 10)
            fleet.sync()
        counts[name] = counted
    samples: dict[str, list[float]] = {name: [] for name in (*ways, "plan, not fetched")}
    block = s.train_steps // s.train_blocks
    for _ in range(s.train_blocks):
        for name, step in ways.items():
            samples[name] += timed(step, block)
        start = time.perf_counter()
        kept = [planned(remote_data, remote_target) for _ in range(block)]
        fleet.sync()
        samples["plan, not fetched"].append((time.perf_counter() - start) / block)
        del kept
    with _Counts(fleet).counting() as unfetched:
        kept = [planned(remote_data, remote_target) for _ in range(10)]
        fleet.sync()
    del kept  # the rest dies with this function; its garbage rides with later commands

    result = MeasureResult(raw={**{f"{k}_s": v for k, v in samples.items()},
                                "counts": {k: c.as_dict() for k, c in counts.items()}})
    local_s, pika_s = median(samples["local"]), median(samples["pika"])
    floor = local_s + pika_s
    result.rows.append(Row("8 train step, local: median", micros(local_s), note=(
        "the demo's MLP 64-32-10, 64 samples, SGD; loss.item(); p99 "
        f"{micros(percentile(samples['local'], 0.99))}")))
    for name, label, target in (("plan", "as a plan, loss.get()", at_most(2)),
                                ("op by op", "op by op, loss.get()", None)):
        ours = median(samples[name])
        result.rows.append(Row(
            f"8 train step, {label}: median", micros(ours),
            f"pika {micros(pika_s)} + local {micros(local_s)}", ours / floor, target,
            note=f"{counts[name].per(10)}; p99 {micros(percentile(samples[name], 0.99))}"))
    ours = median(samples["plan, not fetched"])
    result.rows.append(Row(
        "8 train step, plan, loss kept: per step", micros(ours), f"local {micros(local_s)}",
        ours / local_s,
        note=f"{block} steps then one sync; {unfetched.per(10)} (10 steps, then the sync: "
             "its only wait)"))
    return result


# -- FedAvg on the anchor's workload -----------------------------------------------------


def loop_rounds(owners: int = len(DIGIT_OWNERS)) -> Iterator[tuple[float, float]]:
    """The anchor's one-process loop (its training data split in `owners` shares, as
    `write_shares` splits it), a round at a time: seconds and test accuracy of each."""
    digits = load_digits()
    parts = torch.tensor_split(permutation(len(digits.train_data), seed=0), owners)
    shares = [(digits.train_data[p], digits.train_target[p]) for p in parts]
    model, local = make_model(), make_model()
    for number in itertools.count(1):
        start = time.perf_counter()
        updates = []
        for position, (data, target) in enumerate(shares):
            local.load_state_dict(model.state_dict())
            optimizer = torch.optim.SGD(local.parameters(), lr=0.1)
            order = anchor_order(number, position, len(data))
            for first in range(0, len(data), 32):
                batch = order[first : first + 32]
                optimizer.zero_grad()
                loss = F.cross_entropy(local(data[batch]), target[batch])
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
            updates.append(({k: v.clone() for k, v in local.state_dict().items()}, len(data)))
        total = sum(n for _, n in updates)
        model.load_state_dict({key: sum(state[key] * (n / total) for state, n in updates)
                               for key in model.state_dict()})
        seconds = time.perf_counter() - start
        yield seconds, accuracy(model, digits.test_data, digits.test_target)


def local_loop(rounds: int, owners: int = len(DIGIT_OWNERS)) -> tuple[list[float], list[float]]:
    """`rounds` rounds of the one-process loop: their seconds, and their accuracies."""
    done = list(itertools.islice(loop_rounds(owners), rounds))
    return [s for s, _ in done], [a for _, a in done]


def fedavg_run(fleet: Fleet, owners: list[str], aggregator: str, rounds: int,
               between: Callable[[], object] | None = None) -> tuple[list[float], list[float]]:
    """FedAvg over the `#digits` datasets of `owners`: each round's seconds and accuracy.
    `between` runs before each round (what a comparison interleaves with it)."""
    digits = load_digits()
    datasets = [d for owner in owners for d in fleet.worker(owner).search("#digits")]
    fedavg = tr.FedAvg(make_model(), F.cross_entropy, aggregator=fleet.worker(aggregator),
                       order=anchor_order, progress=False)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"accuracy": accuracy(model, digits.test_data, digits.test_target)}

    for _ in range(rounds):
        if between is not None:
            between()
        history = fedavg.fit(datasets, 1, evaluate)
    del fedavg
    return [r.seconds for r in history], [r.metrics["accuracy"] for r in history]


def fedavg(session: Session) -> MeasureResult:
    with one_torch_thread():
        return _fedavg(session, session.settings.fedavg_rounds)


def _fedavg(session: Session, rounds: int) -> MeasureResult:
    folder = Path(session.log_dir())
    shares = write_shares(folder)
    progress("fedavg: the one-process loop")
    loop_s, loop_accuracy = local_loop(rounds)
    progress("fedavg: embedded")
    with tr.connect(name=session.name("fedavg-embedded"), datasets={
            owner: [{"path": str(path), "tags": ["#digits"], "private": False}]
            for owner, path in shares.items()}) as fleet:
        embedded_s, embedded_accuracy = fedavg_run(fleet, list(DIGIT_OWNERS), AGGREGATOR,
                                                    rounds)
    progress("fedavg: RabbitMQ, four daemons")
    started = time.perf_counter()
    roles = [f"fed-{role}" for role in (*DIGIT_OWNERS, AGGREGATOR)]  # not the session's bob
    _, ids = session.workers(roles, ("--torch-threads", "1"), {
        f"fed-{owner}": ["--public-dataset", f"{path}:#digits"]  # the anchor has no DP
        for owner, path in shares.items()})
    with tr.connect(session.url, name=session.name("fedavg-client")) as fleet:
        rabbit_s, rabbit_accuracy = fedavg_run(fleet, ids[:3], ids[3], rounds)
    rabbit_total = time.perf_counter() - started
    central = train_centrally(load_digits(), rounds)

    raw: dict[str, Any] = {"rounds": rounds, "loop_s": loop_s, "loop_accuracy": loop_accuracy,
                           "embedded_s": embedded_s, "embedded_accuracy": embedded_accuracy,
                           "rabbitmq_s": rabbit_s, "rabbitmq_accuracy": rabbit_accuracy,
                           "rabbitmq_total_s": rabbit_total, "central_accuracy": central}
    result = MeasureResult(raw=raw)
    ours, loop = median(rabbit_s), median(loop_s)
    result.rows += [
        Row("8 FedAvg digits, RabbitMQ: per-round median", millis(ours),
            f"one-process loop {millis(loop)}", ours / loop, Target(0.1, True, "<= 0.1 s"),
            checked=ours, note=f"{rounds} rounds, 3 daemons with data + secure_worker; sum "
                               f"{sum(rabbit_s):.2f} s, round 1 {rabbit_s[0]:.2f} s (records "
                               f"the plans), total incl. start-up {rabbit_total:.1f} s"),
        Row("8 FedAvg digits, embedded: per-round median", millis(median(embedded_s)),
            f"one-process loop {millis(loop)}", median(embedded_s) / loop, at_most(3),
            note=f"sum {sum(embedded_s):.2f} s; loop sum {sum(loop_s):.2f} s"),
        Row("8 FedAvg accuracy = one-process loop, every round",
            f"final {rabbit_accuracy[-1]:.4f}", f"loop {loop_accuracy[-1]:.4f}",
            target=Target(0, True, "same every round"),
            checked=sum(a != b or c != b for a, b, c in
                        zip(rabbit_accuracy, loop_accuracy, embedded_accuracy, strict=True)),
            note="rounds that differ, RabbitMQ or embedded: the number checked"),
        Row("8 FedAvg final accuracy vs central training", f"{rabbit_accuracy[-1]:.4f}",
            f"central {central:.4f}", rabbit_accuracy[-1] / central, at_least(0.95),
            note=f"central: the same model, {rounds} epochs over all the training data"),
    ]
    result.rows += _flower_rows(session, rounds, rabbit_s, rabbit_total, raw)
    return result


def _flower_rows(session: Session, rounds: int, ours: list[float], total: float,
                 raw: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    ours_median = median(ours)
    try:
        if importlib.util.find_spec("flwr") is None:
            raise Skipped("flwr is not installed (pip install -e '.[dev]')")
        progress("fedavg: Flower 1.42, start_server + 3 start_client processes")
        workdir = tempfile.mkdtemp(prefix="torchrelay-flower-")
        flower = run_module("benchmarks.flower_legacy", ["run", "--rounds", str(rounds),
                                                         "--workdir", workdir], 600)
        raw["flower_legacy"] = flower
        rows.append(Row(
            "8 FedAvg vs Flower direct gRPC (here): per-round median", millis(ours_median),
            f"flower {millis(flower['median_round_s'])}",
            ours_median / flower["median_round_s"], at_most(1),
            note=f"flwr 1.42 start_server/start_client (deprecated; the next goal); totals "
                 f"incl. start-up: ours {total:.1f} s, flower "
                 f"{flower['total_incl_startup_s']:.1f} s; same accuracy every round: "
                 f"{_same(flower['accuracy_per_round'], raw['rabbitmq_accuracy'])}"))
    except Exception as e:
        rows.append(not_measured("8 FedAvg vs Flower direct gRPC (here)", e))
    if rounds == 20 and ANCHOR_RESULTS.exists():
        anchor = json.loads(ANCHOR_RESULTS.read_text())
        for engine in ("simulation", "deployment"):
            theirs = anchor[engine]["median_round_s"]
            rows.append(Row(
                f"8 FedAvg vs Flower {engine} (anchor): per-round median",
                millis(ours_median), f"flower {millis(theirs)}", ours_median / theirs,
                at_most(1), note="Flower's figure from the anchor's results, same machine "
                                 "type, not re-run here"))
    return rows


def _same(theirs: list[float], ours: list[float]) -> str:
    return "yes" if all(abs(a - b) < 1e-6 for a, b in zip(theirs, ours, strict=True)) else "no"
