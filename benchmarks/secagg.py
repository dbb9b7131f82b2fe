"""Secure aggregation: a secure round beside a plain one, on RabbitMQ daemons.

    PYTHONPATH=. python -m benchmarks --only secagg

- **FedAvg on the digits** (the Flower anchor's workload: bob, alice and carol with
  their public shares, one more daemon aggregating), `ROUNDS` rounds plain and
  `ROUNDS` rounds with `secure=True`: the per-round median. Target: at most 2x.
- **One aggregate of the digits model's update** (2,410 float32s), by 3 and by 10
  owners' daemons: the plain one (each update moved to the aggregator, averaged
  there) against the secure one (keys, shares, masked inputs, unmasking), the median
  of `REPS`; and the messages and bytes each owner sends for each, counted on the
  in-process broker (the same protocol, every message seen).
- **Flower 1.42's SecAgg+ workflow** on the same workload and rounds, as reference
  rows: `flower_secaggplus.py` runs plain FedAvg and SecAgg+ in Flower's Simulation
  Engine, which needs ray, kept out of torchrelay's environment: it runs with the
  interpreter `$FLOWER_SIM_PYTHON` names (a venv with `flwr[simulation]==1.42.0`,
  torch and scikit-learn); without it the row says how to get one.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import torchrelay as tr
from torchrelay._federated import (
    DIGIT_OWNERS,
    accuracy,
    anchor_order,
    load_digits,
    make_model,
    one_torch_thread,
    write_shares,
)
from torchrelay.broker import EmbeddedBroker

from .report import MeasureResult, Row, Target, at_most, failed, skipped
from .session import Session
from .stats import millis, progress

ROUNDS = 10
REPS = 5
FLOWER_ENV = "FLOWER_SIM_PYTHON"
FLOWER_TIMEOUT_S = 900.0
SIZE = 64 * 32 + 32 + 32 * 10 + 10
"""The digits MLP's parameters: what one owner's update holds."""


def _fedavg(fleet: tr.Fleet, owners: list[str], aggregator: str, *,
            secure: bool) -> tuple[list[float], float]:
    digits = load_digits()
    datasets = [d for owner in owners for d in fleet.worker(owner).search("#digits")]
    fedavg = tr.FedAvg(make_model(), F.cross_entropy, aggregator=fleet.worker(aggregator),
                       order=anchor_order, progress=False, secure=secure)
    history = fedavg.fit(datasets, ROUNDS, lambda model: {
        "accuracy": accuracy(model, digits.test_data, digits.test_target)})
    return [r.seconds for r in history], history[-1].metrics["accuracy"]


def _one_aggregate(fleet: tr.Fleet, owners: list[str], aggregator: str, *,
                   secure: bool) -> float:
    pointers = [torch.randn(SIZE).send(fleet.worker(o)) for o in owners]
    fleet.sync()
    started = time.perf_counter()
    release = tr.aggregate(pointers, aggregator=fleet.worker(aggregator), secure=secure)
    release.get()
    return time.perf_counter() - started


def _traffic(count: int, *, secure: bool) -> tuple[float, float]:
    """Messages and bytes each owner sends for one aggregate, on the in-process broker."""
    owners = [f"o{i:02d}" for i in range(count)]
    with tr.connect(name="counter") as fleet:
        broker: Any = fleet.broker
        assert isinstance(broker, EmbeddedBroker)
        pointers = [torch.randn(SIZE).send(fleet.worker(o)) for o in owners]
        fleet.worker("agg").status()
        fleet.sync()
        messages: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        route: Callable[..., bool] = broker.route

        def counted(queue: str, delivery: Any) -> bool:
            messages[delivery.sender] += 1
            sizes[delivery.sender] += len(delivery.body)
            return route(queue, delivery)

        broker.route = counted  # type: ignore[method-assign]
        tr.aggregate(pointers, aggregator=fleet.worker("agg"), secure=secure).get()
        broker.route = route  # type: ignore[method-assign]
    return (statistics.mean(messages[o] for o in owners),
            statistics.mean(sizes[o] for o in owners))


def measure(session: Session) -> MeasureResult:
    with one_torch_thread():
        return _measure(session)


def _measure(session: Session) -> MeasureResult:
    result = MeasureResult()
    raw = result.raw
    shares = write_shares(Path(session.log_dir()))
    progress("secagg: FedAvg on the digits, plain and secure, RabbitMQ daemons")
    roles = [f"sa-{role}" for role in (*DIGIT_OWNERS, "agg")]
    _, ids = session.workers(roles, ("--torch-threads", "1"), {
        f"sa-{owner}": ["--public-dataset", f"{path}:#digits"]
        for owner, path in shares.items()})
    with tr.connect(session.url, name=session.name("secagg-client")) as fleet:
        plain_s, plain_accuracy = _fedavg(fleet, ids[:3], ids[3], secure=False)
        secure_s, secure_accuracy = _fedavg(fleet, ids[:3], ids[3], secure=True)
    raw.update(plain_round_s=plain_s, secure_round_s=secure_s,
               plain_accuracy=plain_accuracy, secure_accuracy=secure_accuracy)
    plain, secure = statistics.median(plain_s[1:]), statistics.median(secure_s[1:])
    result.rows += [
        Row("20 secure FedAvg round, digits, 3 owners: median", millis(secure),
            f"plain {millis(plain)}", secure / plain, at_most(2),
            note=f"RabbitMQ daemons, {ROUNDS} rounds each (the first left out: it records "
                 "the plans)"),
        Row("20 secure FedAvg accuracy vs plain", f"{secure_accuracy:.4f}",
            f"plain {plain_accuracy:.4f}", None, Target(0.005, True, "within 0.005"),
            checked=abs(secure_accuracy - plain_accuracy),
            note=f"after {ROUNDS} rounds"),
    ]
    for count in (3, 10):
        progress(f"secagg: one aggregate of {SIZE} floats by {count} owners' daemons")
        _, ids = session.workers([f"sa{count}-o{i:02d}" for i in range(count)] + [
            f"sa{count}-agg"], ("--torch-threads", "1"))
        with tr.connect(session.url, name=session.name(f"secagg{count}-client")) as fleet:
            times = {secure: [_one_aggregate(fleet, ids[:count], ids[count], secure=secure)
                              for _ in range(REPS)] for secure in (False, True)}
        plain_t, secure_t = (statistics.median(times[s]) for s in (False, True))
        (plain_m, plain_b), (secure_m, secure_b) = (_traffic(count, secure=s)
                                                    for s in (False, True))
        raw[f"owners_{count}"] = {"plain_s": times[False], "secure_s": times[True],
                                  "plain_messages": plain_m, "plain_bytes": plain_b,
                                  "secure_messages": secure_m, "secure_bytes": secure_b}
        result.rows += [
            Row(f"20 secure aggregate, {count} owners: time", millis(secure_t),
                f"plain {millis(plain_t)}", secure_t / plain_t, None,
                note=f"{SIZE} float32s per owner, RabbitMQ daemons, median of {REPS}"),
            Row(f"20 secure aggregate, {count} owners: per owner", f"{secure_m:.0f} msgs, "
                f"{secure_b / 1024:.1f} KiB", f"plain {plain_m:.0f} msgs, "
                f"{plain_b / 1024:.1f} KiB", secure_b / plain_b, None,
                note="messages and bytes each owner sends (replies included), counted on "
                     "the in-process broker"),
        ]
    result.rows += _flower(raw, secure)
    return result


def _flower(raw: dict[str, Any], ours: float) -> list[Row]:
    """Flower's SecAgg+ and plain rounds, run by `flower_secaggplus.py` in its venv."""
    measure = "20 Flower 1.42 SecAgg+ round, digits, 3 owners: median"
    python = os.environ.get(FLOWER_ENV)
    if not python:
        return [skipped(measure, f"not measured: set {FLOWER_ENV} to a Python with "
                                 "flwr[simulation]==1.42.0, torch and scikit-learn (python3 "
                                 "-m venv /tmp/flwr-secagg-venv; pip install torch==2.13.0 "
                                 "'flwr[simulation]==1.42.0' scikit-learn); ray is not in "
                                 "torchrelay's dev extra")]
    progress(f"secagg: Flower 1.42 plain and SecAgg+ in its Simulation Engine ({python})")
    script = Path(__file__).with_name("flower_secaggplus.py")
    try:
        done = subprocess.run([python, str(script), "--rounds", str(ROUNDS)],
                              capture_output=True, text=True, timeout=FLOWER_TIMEOUT_S,
                              check=False)
        line = next((text for text in done.stdout.splitlines()
                     if text.startswith("FLOWER_SECAGGPLUS ")), None)
        if line is None:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"exit {done.returncode}: {last[:300]}")
        flower = json.loads(line.split(" ", 1)[1])
    except (OSError, subprocess.TimeoutExpired, RuntimeError, ValueError) as e:
        return [failed(measure, f"not measured: {e}")]
    raw["flower_secaggplus"] = flower
    plain, secagg = flower["plain"], flower["secaggplus"]
    return [
        Row(measure, millis(secagg["median_s"]), f"Flower plain {millis(plain['median_s'])}",
            secagg["median_s"] / plain["median_s"], None,
            note=f"reference: flwr {flower['flwr']} Simulation Engine (ray), 3 supernodes, "
                 f"SecAggPlusWorkflow (3 shares, threshold 2) + secaggplus_mod, "
                 f"{flower['rounds']} rounds (the first left out); accuracy "
                 f"{secagg['accuracy']:.4f} (plain {plain['accuracy']:.4f})"),
        Row("20 secure FedAvg round vs Flower's SecAgg+ round", millis(ours),
            f"Flower SecAgg+ {millis(secagg['median_s'])}", ours / secagg["median_s"], None,
            note="torchrelay on RabbitMQ daemons against Flower's simulation, same "
                 "workload and rounds"),
    ]


__all__ = ["measure"]
