"""How FedAvg's cost grows with the number of data owners: 3, 10, 30 and 100.

The Flower anchor's digits workload (`torchrelay/_federated.py`) with its
training data split in N shares instead of 3 (1,437 samples: 479 each at 3, 14
or 15 at 100), one owner per share, 20 rounds, one torch thread everywhere; at
each N:

- on RabbitMQ, every owner a worker of its own — its queue, store, identity,
  dataset — hosted several to a process (`torchrelay worker --unsupervised
  --config ...`, `worker/containment/_host.py`), the aggregator in a host of
  its own; the hosts' RSS, summed with any children's, after the rounds;
- on the embedded broker (every worker in the client's process);
- the anchor's one-process loop with N shares (the reference of the round time);
- Flower 1.42's Simulation Engine with N clients (`benchmarks/flower_simulation.py`),
  when a Python with Ray is at hand: this one, or `TORCHRELAY_FLOWER_PYTHON`.

Memory per additional owner: (the hosts' RSS with N owners - with 1) / (N - 1),
each after the same FedAvg rounds. Round figures are medians over the rounds;
round 1 records each owner's plan and is slower. Nothing here asserts timings.

    PYTHONPATH=. python -m benchmarks --only owners --json owners.json
    PYTHONPATH=. python -m benchmarks.owners owners.json --plot docs/scaling-owners.png
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torchrelay as tr
from torchrelay._federated import one_torch_thread, write_shares
from torchrelay.worker import WorkerProcesses

from . import plots
from .federated import fedavg_run, loop_rounds
from .processes import rss_bytes, tree
from .report import MeasureResult, Row, Skipped, Target, at_most, failed, not_measured
from .session import Session
from .stats import median, memory, millis, progress

FLOWER_PYTHON_ENV = "TORCHRELAY_FLOWER_PYTHON"
"""A Python with `flwr[simulation]==1.42.0` (Ray) and torch, for Flower's Simulation
Engine: the dev extra does not install Ray."""
OWNERS_PER_HOST = 50
"""Owners one host process serves: two processes at 100 owners, one per core."""
_MEMORY_TARGET = Target(60 << 20, True, "<= 60 MiB")


@dataclass
class HostedRun:
    seconds: list[float]
    accuracies: list[float]
    rss: int
    """The hosting processes' RSS after the rounds, children included."""
    processes: int
    startup_s: float


def _config(folder: Path, worker: str, dataset: Path | None) -> Path:
    lines = ["[worker]", f"id = {json.dumps(worker)}", 'broker = "amqp://set-by-flag/"']
    if dataset is not None:  # public, as the anchor's shares (no DP in this comparison)
        lines += ["", "[[worker.datasets]]", f"path = {json.dumps(str(dataset))}",
                  'tags = ["#digits"]', "private = false"]
    path = folder / f"{worker}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _tree_rss(pid: int) -> int:
    """RSS of `pid` and every descendant (a host has none today; a supervised one would)."""
    total = 0
    for member in tree(pid):
        with contextlib.suppress(Exception):
            total += rss_bytes(member)
    return total


def _hosted_run(session: Session, folder: Path, owners: int, rounds: int,
                between: Callable[[], object] | None = None) -> HostedRun:
    """FedAvg over `owners` hosted workers and a hosted aggregator, on RabbitMQ;
    `between` runs before each round."""
    ids = [session.name(f"owner{i}of{owners}") for i in range(owners)]
    aggregator = session.name(f"aggregator{owners}")
    session.known_queues.update(f"torchrelay.worker.{w}" for w in (*ids, aggregator))
    work = folder / f"hosted-{owners}"
    shares = write_shares(work, ids)
    with WorkerProcesses(session.url, [], extra_args=["--torch-threads", "1"],
                         log_dir=work / "logs") as daemons:
        started = time.perf_counter()
        groups = [ids[i : i + OWNERS_PER_HOST] for i in range(0, owners, OWNERS_PER_HOST)]
        for number, group in enumerate(groups):
            daemons.spawn_host(f"owners{number}", group, *(
                arg for w in group for arg in ("--config", str(_config(work, w, shares[w])))))
        daemons.spawn_host("aggregator", [aggregator], "--config",
                           str(_config(work, aggregator, None)))
        daemons.wait_ready([*ids, aggregator], timeout=300)
        startup = time.perf_counter() - started
        with tr.connect(session.url, name=session.name(f"owners-client-{owners}"),
                        timeout=120) as fleet:
            seconds, accuracies = fedavg_run(fleet, ids, aggregator, rounds, between)
        rss = sum(_tree_rss(p.pid) for p in daemons.processes.values())
        processes = len(daemons.processes)
        statuses = daemons.stop_all()
    if any(statuses.values()):
        raise RuntimeError(f"hosts exited with {statuses}")
    return HostedRun(seconds, accuracies, rss, processes, startup)


def _embedded_run(folder: Path, owners: int, rounds: int) -> tuple[list[float], list[float]]:
    ids = [f"owner{i}" for i in range(owners)]
    shares = write_shares(folder / f"embedded-{owners}", ids)
    with tr.connect(datasets={o: [{"path": str(p), "tags": ["#digits"], "private": False}]
                              for o, p in shares.items()}) as fleet:
        return fedavg_run(fleet, ids, "aggregator", rounds)


def _flower_python() -> str:
    given = os.environ.get(FLOWER_PYTHON_ENV)
    if given:
        return given
    if importlib.util.find_spec("ray") is not None:
        return sys.executable
    raise Skipped(f"Flower's Simulation Engine needs Ray (flwr[simulation]), which the dev "
                  f"extra does not install: set {FLOWER_PYTHON_ENV} to a Python that has "
                  "flwr[simulation]==1.42.0 and torch (the anchor's venv)")


@contextlib.contextmanager
def _session_group(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` in a process group of its own, and end that group (Ray's raylet and
    workers with it) however it ends."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _flower_simulation(clients: int, rounds: int, timeout: float) -> dict[str, Any]:
    python = _flower_python()
    script = Path(__file__).with_name("flower_simulation.py")
    with tempfile.TemporaryDirectory(prefix="torchrelay-flower-sim-") as work:
        out = Path(work) / "result.json"
        argv = [python, str(script), "--clients", str(clients), "--rounds", str(rounds),
                "--out", str(out)]
        with _session_group(argv) as process:
            try:
                _, stderr = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"Flower's simulation of {clients} clients did not finish "
                                   f"within {timeout:.0f} s") from None
        if process.returncode != 0 or not out.exists():
            tail = " ".join(stderr.decode(errors="replace").strip().splitlines()[-3:])
            raise RuntimeError(f"Flower's simulation exited with {process.returncode}: {tail}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def measure(session: Session) -> MeasureResult:
    with one_torch_thread(), tempfile.TemporaryDirectory(prefix="torchrelay-owners-") as folder:
        return _measure(session, Path(folder))


def _measure(session: Session, folder: Path) -> MeasureResult:
    s = session.settings
    rounds = s.owner_rounds
    result = MeasureResult(raw={"rounds": rounds, "owners_per_host": OWNERS_PER_HOST})
    progress("owners: 1 hosted owner (the memory baseline)")
    single = _hosted_run(session, folder, 1, rounds)
    result.raw["1"] = {"rss": single.rss}
    for owners in s.owner_counts:
        result.rows += _at(session, folder, owners, rounds, single,
                           last=owners == max(s.owner_counts), raw=result.raw)
    return result


def _at(session: Session, folder: Path, owners: int, rounds: int, single: HostedRun, *,
        last: bool, raw: dict[str, Any]) -> list[Row]:
    """The rows of one number of owners; its raw figures into `raw[str(owners)]`."""
    s = session.settings
    figures: dict[str, Any] = {}
    raw[str(owners)] = figures
    label = f"12 FedAvg, {owners} owners"
    rows: list[Row] = []
    # The loop's rounds interleave with the RabbitMQ run's, a round each in turn: on a
    # shared machine, both then see the same load.
    loop_source, loop_s, loop_accuracy = loop_rounds(owners), [], []

    def loop_round() -> None:
        seconds, accuracy = next(loop_source)
        loop_s.append(seconds)
        loop_accuracy.append(accuracy)

    hosted: HostedRun | None = None
    try:
        progress(f"owners: {owners}, RabbitMQ (hosted), interleaved with the one-process loop")
        hosted = _hosted_run(session, folder, owners, rounds, between=loop_round)
    except Exception as e:
        rows.append(failed(f"{label}: RabbitMQ round", e))
    while len(loop_s) < rounds:
        loop_round()
    loop = median(loop_s)
    figures.update(loop_s=loop_s, loop_accuracy=loop_accuracy)
    progress(f"owners: {owners}, embedded")
    embedded_s, embedded_accuracy = _embedded_run(folder, owners, rounds)
    figures.update(embedded_s=embedded_s, embedded_accuracy=embedded_accuracy)
    if hosted is not None:
        ours = median(hosted.seconds)
        extra = (hosted.rss - single.rss) / (owners - 1) if owners > 1 else None
        figures.update(rabbitmq_s=hosted.seconds, rabbitmq_accuracy=hosted.accuracies,
                       rss=hosted.rss, rss_per_extra_owner=extra, processes=hosted.processes,
                       startup_s=hosted.startup_s)
        differ = sum(a != b or c != b for a, b, c in zip(
            hosted.accuracies, loop_accuracy, embedded_accuracy, strict=True))
        rows.append(Row(
            f"{label}: RabbitMQ round, median", millis(ours),
            f"one-process loop {millis(loop)}", ours / loop, at_most(3) if owners == 100 else None,
            note=f"{hosted.processes - 1} host(s) of <= {OWNERS_PER_HOST} owners + the "
                 f"aggregator's; loop rounds interleaved; round 1 {hosted.seconds[0]:.2f} s "
                 f"(records the plans); start-up {hosted.startup_s:.1f} s; rounds whose "
                 f"accuracy differs from the loop's or embedded: {differ}"))
        rows.append(Row(f"{label}: hosts' RSS", memory(hosted.rss),
                        f"1 owner {memory(single.rss)}",
                        note=f"{hosted.processes} processes, after {rounds} rounds"))
        if extra is not None:
            rows.append(Row(
                f"{label}: RSS per additional owner", memory(extra),
                target=_MEMORY_TARGET if last else None, checked=extra,
                note=f"({memory(hosted.rss)} - {memory(single.rss)}) / {owners - 1}"))
    rows.append(Row(
        f"{label}: embedded round, median", millis(median(embedded_s)),
        f"one-process loop {millis(loop)}", median(embedded_s) / loop,
        note=f"all {owners} owners' workers and the aggregator in the client's process"))
    try:
        progress(f"owners: {owners}, Flower's Simulation Engine")
        flower = _flower_simulation(owners, rounds, s.flower_timeout_s)
        figures["flower_simulation"] = flower
        theirs = flower["median_round_s"]
        same = all(abs(a - b) < 1e-6 for a, b in zip(flower["accuracy_per_round"],
                                                     loop_accuracy, strict=True))
        rows.append(Row(
            f"{label}: vs Flower Simulation Engine, round median",
            "-" if hosted is None else millis(median(hosted.seconds)),
            f"flower {millis(theirs)}",
            None if hosted is None else median(hosted.seconds) / theirs,
            at_most(1) if owners == 100 else None,
            note=f"flwr 1.42 run_simulation, Ray, {owners} clients; total incl. start-up "
                 f"{flower['total_incl_startup_s']:.1f} s; same accuracy every round: "
                 f"{'yes' if same else 'no'}"))
    except Exception as e:
        rows.append(not_measured(f"{label}: vs Flower Simulation Engine", e))
    return rows


# -- the README's plot ------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.owners")
    parser.add_argument("json", type=Path, help="what `python -m benchmarks --only owners "
                                                "--json FILE` wrote")
    parser.add_argument("--plot", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    raw = json.loads(args.json.read_text())["raw"]["owners"]
    _plot(raw, args.plot)
    print(f"plot written to {args.plot}")


def _plot(raw: dict[str, Any], path: Path) -> None:
    pyplot = plots.pyplot()
    counts = sorted(int(k) for k, v in raw.items() if k.isdigit() and "loop_s" in v)
    figure, (rounds, rss) = pyplot.subplots(1, 2, figsize=(11, 4))
    for key, label, style in (("rabbitmq_s", "torchrelay, RabbitMQ (hosted daemons)", "o-"),
                              ("embedded_s", "torchrelay, embedded", "s--"),
                              ("loop_s", "one-process loop", "^:"),
                              ("flower_simulation", "Flower 1.42 Simulation Engine", "x-")):
        shown = [(n, raw[str(n)][key]) for n in counts if key in raw[str(n)]]
        values = [(n, v["median_round_s"] if isinstance(v, dict) else median(v))
                  for n, v in shown]
        if values:
            rounds.plot([n for n, _ in values], [1000 * v for _, v in values], style,
                        label=label)
    rounds.set(xscale="log", yscale="log", xlabel="data owners",
               ylabel="FedAvg round, median (ms)", title="Round time against owners")
    rounds.legend(loc="upper left", fontsize=8)
    hosted = [(n, raw[str(n)]["rss"]) for n in counts if "rss" in raw[str(n)]]
    rss.plot([n for n, _ in hosted], [v / (1 << 20) for _, v in hosted], "o-",
             label="hosts' RSS, all owners + aggregator")
    rss.plot([n for n, _ in hosted], [n * 250 for n, _ in hosted], ":",
             label="a supervised daemon per owner (estimate: ~250 MiB each)")
    rss.set(xscale="log", yscale="log", xlabel="data owners", ylabel="RSS (MiB)",
            title="Memory against owners")
    rss.legend(loc="upper left", fontsize=8)
    for axes in (rounds, rss):
        axes.set_xticks(counts, [str(n) for n in counts])
    plots.save(figure, path)


if __name__ == "__main__":
    main()
