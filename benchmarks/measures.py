"""The six measures of the issue, each against its baseline, as table rows.

Where the two sides are timed in the same process they are interleaved in
blocks (torchrelay, baseline, torchrelay, ...), so drift on this shared, noisy
machine hits both alike; figures are medians (and nearest-rank p99s) over all
samples. Each measure leaves the workers' stores as it found them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import torchrelay as tr
from torchrelay.client import Fleet, PointerTensor, WorkerHandle

from . import breakdown, dpsgd, large_model, owners, secagg
from .cluster import cluster
from .fairness import fairness
from .faults import faults
from .federated import fedavg, train_step
from .processes import ChildFailed, bare_torch_processes, rss_bytes, run_module
from .report import MeasureResult, Row, at_least, at_most, failed, not_measured
from .session import MIB, Session, TransferPlan, send
from .sidechannels import sidechannels
from .stats import byte_count, gib, median, memory, mib, micros, millis, percentile, progress

SMALL_BODY = b"x" * 64
"""The bare pika request body: about what a small torchrelay command weighs."""

PIKA_MAX_MIB = 64
"""RabbitMQ 3.x refuses a single message over 128 MiB, so bare pika stops here."""


def _small_pointer(fleet: Fleet, worker: WorkerHandle) -> PointerTensor:
    pointer = send(torch.tensor([1, 2, 3, 4]), worker)
    fleet.sync()
    return pointer


def _time_literal_loop(fleet: Fleet, x: PointerTensor, count: int) -> list[float]:
    """`y = x + x; fleet.sync()` as a user writes it: rebinding `y` deletes the last result."""
    samples = []
    y = None
    for _ in range(count):
        start = time.perf_counter()
        y = x + x
        fleet.sync()
        samples.append(time.perf_counter() - start)
    del y
    fleet.sync()
    return samples


def _time_kept_loop(fleet: Fleet, x: PointerTensor, count: int) -> list[float]:
    """The same op with every result kept: one command and one reply per iteration."""
    samples = []
    kept = []
    for _ in range(count):
        start = time.perf_counter()
        kept.append(x + x)
        fleet.sync()
        samples.append(time.perf_counter() - start)
    del kept
    fleet.sync()  # the garbage goes with the next command, not timed
    return samples


def _time_get_loop(fleet: Fleet, x: PointerTensor, count: int) -> list[float]:
    """`(x + x).get()`: the line PySyft users write most."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        (x + x).get()
        samples.append(time.perf_counter() - start)
    return samples


def _time_small_moves(
    fleet: Fleet, bob: WorkerHandle, alice: WorkerHandle, count: int
) -> list[float]:
    """`p = p.move(w)` of a 4-element tensor, back and forth between bob and alice."""
    samples = []
    pointer = _small_pointer(fleet, bob)
    for i in range(count):
        destination = alice if i % 2 == 0 else bob
        start = time.perf_counter()
        pointer = pointer.move(destination)
        samples.append(time.perf_counter() - start)
    pointer.get()
    return samples


def _time_pipelined(fleet: Fleet, x: PointerTensor, count: int) -> float:
    """Seconds for `count` ops issued without waiting, then one `fleet.sync()`."""
    start = time.perf_counter()
    results = [x + x for _ in range(count)]
    fleet.sync()
    elapsed = time.perf_counter() - start
    del results
    fleet.sync()  # the garbage goes with the next command, not timed
    return elapsed


# -- 1. small sync op -------------------------------------------------------------


def sync_op(session: Session) -> MeasureResult:
    """Latency of small ops that wait, against one bare pika request/reply.

    This is the floor the broker sets: anything above it is torchrelay's own cost
    (encoding, the runtime, the client's bookkeeping, extra messages).
    """
    fleet, bob, alice, pika = session.require()
    s = session.settings
    x = _small_pointer(fleet, bob)
    _time_literal_loop(fleet, x, s.sync_warmup)
    _time_get_loop(fleet, x, s.sync_warmup)
    _time_small_moves(fleet, bob, alice, s.sync_warmup // 4)
    for _ in range(s.sync_warmup):
        pika.call(SMALL_BODY)
    literal: list[float] = []
    kept: list[float] = []
    got: list[float] = []
    moves: list[float] = []
    bare: list[float] = []
    block = s.sync_iterations // s.sync_blocks
    for _ in range(s.sync_blocks):
        literal += _time_literal_loop(fleet, x, block)
        got += _time_get_loop(fleet, x, block)
        kept += _time_kept_loop(fleet, x, block // 2)
        moves += _time_small_moves(fleet, bob, alice, block // 4)
        for _ in range(block):
            start = time.perf_counter()
            pika.call(SMALL_BODY)
            bare.append(time.perf_counter() - start)
    del x
    fleet.sync()

    raw: dict[str, Any] = {"torchrelay_s": literal, "torchrelay_get_s": got,
                           "torchrelay_kept_s": kept, "torchrelay_move_s": moves,
                           "pika_s": bare}
    result = MeasureResult(raw=raw)
    pika_median, pika_p99 = median(bare), percentile(bare, 0.99)
    for label, samples, target_median, target_p99, note in (
        ("1 sync x+x", literal, at_most(1.2), at_most(1.5),
         "`y = x + x; fleet.sync()`: the old y rides, as garbage, with the next command"),
        ("1 get (x+x).get()", got, at_most(1.3), at_most(1.6),
         "the op, told to fetch its result: one command, one round trip"),
        ("1 sync x+x, results kept", kept, None, None,
         "every result kept alive (no garbage at all); no target"),
        ("1 move 4 floats", moves, None, None,
         "bob->alice: client->bob, bob->alice (confirmed), both replies; no target"),
    ):
        ours_median, ours_p99 = median(samples), percentile(samples, 0.99)
        result.rows += [
            Row(f"{label}: median", micros(ours_median), f"pika {micros(pika_median)}",
                ours_median / pika_median, target_median, note=note),
            Row(f"{label}: p99", micros(ours_p99), f"pika {micros(pika_p99)}",
                ours_p99 / pika_p99, target_p99),
        ]
    try:
        rpc = session.torch_rpc()["sync_latency_s"]
    except Exception as e:
        result.rows.append(not_measured("1 sync x+x vs torch rpc_sync", e))
        return result
    raw["torch_rpc_sync_s"] = rpc
    ours_median, ours_p99 = median(literal), percentile(literal, 0.99)
    result.rows += [
        Row("1 sync x+x: median, vs torch rpc", micros(ours_median),
            f"rpc_sync {micros(median(rpc))}", ours_median / median(rpc), at_most(1.5),
            note="TensorPipe on loopback, no broker (the hot path issue's peer)"),
        Row("1 sync x+x: p99, vs torch rpc", micros(ours_p99),
            f"rpc_sync {micros(percentile(rpc, 0.99))}", ours_p99 / percentile(rpc, 0.99)),
    ]
    return result


# -- 2. pipelined small ops -------------------------------------------------------


def pipelined(session: Session) -> MeasureResult:
    """Throughput when nothing waits: what pipelining is for."""
    fleet, bob, _, pika = session.require()
    s = session.settings
    count = s.pipelined_ops
    x = _small_pointer(fleet, bob)
    _time_pipelined(fleet, x, min(count, 500))
    pika.pipelined(min(count, 500), SMALL_BODY)
    ours: list[float] = []
    bare: list[float] = []
    for _ in range(s.pipelined_rounds):
        ours.append(count / _time_pipelined(fleet, x, count))
        bare.append(count / pika.pipelined(count, SMALL_BODY))
    del x
    fleet.sync()

    raw: dict[str, Any] = {"ops": count, "torchrelay_ops_per_s": ours, "pika_ops_per_s": bare}
    result = MeasureResult(raw=raw)
    rate = median(ours)
    result.rows.append(
        Row(f"2 pipelined x+x ({count}), ops/s", f"{rate:,.0f}/s",
            f"pika {median(bare):,.0f}/s", rate / median(bare), at_least(0.8),
            note="N ops without waiting, then one fleet.sync()")
    )
    try:
        rpc = session.torch_rpc()["pipelined_ops_per_s"]
    except Exception as e:
        result.rows.append(not_measured("2 pipelined vs torch rpc_async", e))
        return result
    raw["torch_rpc_async_ops_per_s"] = rpc
    result.rows.append(
        Row("2 pipelined x+x, vs torch rpc", f"{rate:,.0f}/s",
            f"rpc_async {median(rpc):,.0f}/s", rate / median(rpc), note="reference")
    )
    return result


# -- 3. send + get of large tensors ----------------------------------------------


def _size_label(size_mib: int) -> str:
    return f"{size_mib // 1024} GiB" if size_mib >= 1024 else f"{size_mib} MiB"


def _transfer_child(session: Session, side: str, plan: TransferPlan) -> dict[str, Any]:
    """One fresh process timing `plan.reps` round trips of one size."""
    target = session.echo_queue if side == "pika" else session.require()[1].id
    # Generous: a stuck transfer is caught by the client's own reply timeout first.
    deadline = 90.0 + 2 * plan.mib * (plan.reps + plan.warmup) * 0.05
    args = [side, "--url", session.url, "--target", target, "--name", session.name("transfer"),
            "--mib", str(plan.mib), "--reps", str(plan.reps), "--warmup", str(plan.warmup),
            "--timeout", "60"]
    try:
        return run_module("benchmarks.transfer_child", args, deadline)
    except ChildFailed as e:
        return {"side": side, "mib": plan.mib, "seconds": [], "error": str(e),
                "peak_rss_bytes": None}


def _rate(runs: list[dict[str, Any]], size_mib: int) -> float | None:
    """MiB moved per second (2 x size / median round trip) over every timed round trip."""
    seconds = [t for run in runs for t in run["seconds"]]
    return 2 * size_mib / median(seconds) if seconds else None


def _peak(runs: list[dict[str, Any]]) -> int | None:
    peaks = [run["peak_rss_bytes"] for run in runs if run.get("peak_rss_bytes")]
    return max(peaks) if peaks else None


def _memory_note(who: str, runs: list[dict[str, Any]]) -> str:
    """Peak RSS of the process that peaked highest, and its growth over its start.

    The start is the RSS just before the first round trip: torch imported, the
    tensor (or body) already made; what comes on top is what the transfer cost.
    """
    measured = [run for run in runs if run.get("peak_rss_bytes") and run.get("rss_before_bytes")]
    if not measured:
        return ""
    top = max(measured, key=lambda run: int(run["peak_rss_bytes"]))
    peak, before = int(top["peak_rss_bytes"]), int(top["rss_before_bytes"])
    return f"{who} peak RSS {memory(peak)} (+{mib(peak - before)})"


def transfer(session: Session) -> MeasureResult:
    """Bandwidth and client memory of send+get, in fresh processes, size by size."""
    session.require()
    result = MeasureResult()
    for plan in session.settings.transfers:
        label = f"3 send+get {_size_label(plan.mib)}"
        ours_runs: list[dict[str, Any]] = []
        pika_runs: list[dict[str, Any]] = []
        for _ in range(plan.rounds):  # alternate fresh processes of both sides
            ours_runs.append(_transfer_child(session, "torchrelay", plan))
            if plan.mib <= PIKA_MAX_MIB:
                pika_runs.append(_transfer_child(session, "pika", plan))
        result.raw[f"{plan.mib}MiB"] = {"torchrelay": ours_runs, "pika": pika_runs}
        progress(f"  send+get {_size_label(plan.mib)} done")
        result.rows += _transfer_rows(label, plan, ours_runs, pika_runs)
    return result


def _transfer_rows(
    label: str, plan: TransferPlan, ours_runs: list[dict[str, Any]],
    pika_runs: list[dict[str, Any]],
) -> list[Row]:
    target = at_least(0.9) if plan.mib in (16, 64) else None
    rss_target = at_most(2.5 * 1024 * MIB, "works, <= 2.5 GiB") if plan.mib >= 1024 else None
    errors = [run["error"] for run in ours_runs if run["error"]]
    ours_rate = _rate(ours_runs, plan.mib)
    ours_peak = _peak(ours_runs)
    if errors or ours_rate is None:
        rows = [failed(f"{label}, MiB/s", errors[0] if errors else "no round trip", target)]
        if rss_target is not None:
            rss = gib(ours_peak) if ours_peak else "unknown"
            rows.append(failed(f"{label}: client peak RSS", f"peak RSS {rss}; {rows[0].error}",
                               rss_target))
        return rows
    pika_rate = _rate(pika_runs, plan.mib)
    pika_errors = [run["error"] for run in pika_runs if run["error"]]
    if plan.mib > PIKA_MAX_MIB:
        baseline, ratio = "n/a: RabbitMQ 3.x refuses messages > 128 MiB", None
    elif pika_rate is None or pika_errors:
        baseline, ratio = f"pika FAILED: {pika_errors[0] if pika_errors else '?'}", None
    else:
        baseline, ratio = f"pika {pika_rate:,.0f} MiB/s", ours_rate / pika_rate
    note = "; ".join(n for n in (_memory_note("client", ours_runs),
                                 _memory_note("pika", pika_runs)) if n)
    rows = [Row(f"{label}, MiB/s", f"{ours_rate:,.0f} MiB/s", baseline, ratio,
                None if ratio is None else target, note=note)]
    if rss_target is not None and ours_peak is not None:
        rows.append(Row(f"{label}: client peak RSS", gib(ours_peak), "-", None, rss_target,
                        checked=float(ours_peak), note="fresh process: tensor + what came back"))
    return rows


# -- 4. move bob -> alice ------------------------------------------------------------


def _endpoint_bytes(fleet: Fleet) -> int | None:
    """Bytes through the client's own connection, both ways (None: no counters)."""
    sent = getattr(fleet.endpoint, "bytes_sent", None)
    received = getattr(fleet.endpoint, "bytes_received", None)
    if sent is None or received is None:
        return None
    return int(sent) + int(received)


def move(session: Session) -> MeasureResult:
    """A move must go worker to worker: as fast as a send, without touching the client."""
    fleet, bob, alice, _ = session.require()
    tensor = torch.rand(64 * MIB // 4)
    sends: list[float] = []
    moves: list[float] = []
    send_bytes: list[int] = []
    move_bytes: list[int] = []
    for i in range(1 + session.settings.move_reps):  # the first one warms up
        before = _endpoint_bytes(fleet)
        start = time.perf_counter()
        pointer = send(tensor, bob)
        fleet.sync()
        send_s = time.perf_counter() - start
        middle = _endpoint_bytes(fleet)
        start = time.perf_counter()
        moved = pointer.move(alice)
        move_s = time.perf_counter() - start
        after = _endpoint_bytes(fleet)
        del pointer, moved
        fleet.sync()
        if i == 0:
            continue
        sends.append(send_s)
        moves.append(move_s)
        if before is not None and middle is not None and after is not None:
            send_bytes.append(middle - before)
            move_bytes.append(after - middle)
    raw = {"send_s": sends, "move_s": moves, "send_bytes": send_bytes, "move_bytes": move_bytes}
    result = MeasureResult(raw=raw)
    result.rows.append(
        Row("4 move 64 MiB bob->alice: time", millis(median(moves)),
            f"send+sync {millis(median(sends))}", median(moves) / median(sends), at_most(1.2),
            note="move() returns once alice confirmed")
    )
    if not move_bytes:
        result.rows.append(failed("4 move 64 MiB: bytes via client",
                                  "the client endpoint has no bytes_sent/bytes_received",
                                  at_most(64 * 1024, "<= 64 KiB")))
    else:
        worst = max(move_bytes)
        result.rows.append(
            Row("4 move 64 MiB: bytes via client", byte_count(worst),
                f"send {byte_count(median(send_bytes))}", None,
                at_most(64 * 1024, "<= 64 KiB"), checked=float(worst),
                note="largest over the moves; sent + received")
        )
    return result


# -- 5. embedded broker ---------------------------------------------------------------


def embedded(session: Session) -> MeasureResult:
    """The zero-setup path's overhead over plain torch, with no network in the way."""
    s = session.settings
    local = torch.tensor([1, 2, 3, 4])
    ours: list[float] = []
    plain: list[float] = []
    with tr.connect(name=session.name("embedded")) as fleet:
        bob = fleet.worker("bob")
        x = _small_pointer(fleet, bob)
        _time_literal_loop(fleet, x, s.sync_warmup)
        block = s.embedded_iterations // s.embedded_blocks
        for _ in range(s.embedded_blocks):
            ours += _time_literal_loop(fleet, x, block)
            for _ in range(block):
                start = time.perf_counter()
                y = local + local
                plain.append(time.perf_counter() - start)
            del y
        del x
    result = MeasureResult(raw={"torchrelay_s": ours, "local_s": plain})
    result.rows.append(
        Row("5 embedded sync x+x: median", micros(median(ours)),
            f"local x+x {micros(median(plain))}", median(ours) / median(plain), at_most(15),
            note=f"in-process workers; p99 {micros(percentile(ours, 0.99))}")
    )
    return result


# -- 5b. what containment costs ----------------------------------------------------------


def containment(session: Session) -> MeasureResult:
    """A small op on a supervised daemon (bob) against one serving unsupervised.

    The difference is what the journal and the mirror cost a command (see README,
    "A worker no command can take down").
    """
    fleet, bob, _, _ = session.require()
    s = session.settings
    _, (bare_id,) = session.workers(["unsupervised"], ("--unsupervised",))
    bare = fleet.worker(bare_id)
    x, y = _small_pointer(fleet, bob), _small_pointer(fleet, bare)
    _time_literal_loop(fleet, x, s.sync_warmup)
    _time_literal_loop(fleet, y, s.sync_warmup)
    supervised: list[float] = []
    unsupervised: list[float] = []
    block = s.sync_iterations // s.sync_blocks
    for _ in range(s.sync_blocks):
        supervised += _time_literal_loop(fleet, x, block)
        unsupervised += _time_literal_loop(fleet, y, block)
    del x, y
    fleet.sync()
    result = MeasureResult(raw={"supervised_s": supervised, "unsupervised_s": unsupervised})
    for label, pick in (("median", median), ("p99", lambda v: percentile(v, 0.99))):
        ours, base = pick(supervised), pick(unsupervised)
        result.rows.append(
            Row(f"5b sync x+x, contained: {label}", micros(ours),
                f"unsupervised {micros(base)}", ours / base,
                note="journal + mirror per command; no target" if label == "median" else "")
        )
    return result


# -- 6. idle worker memory -----------------------------------------------------------


def idle(session: Session) -> MeasureResult:
    """What a daemon costs beyond torch itself, on fresh daemons: bob has held GiBs by now."""
    s = session.settings
    roles = [f"idle{i}" for i in range(s.idle_workers)]
    processes, ids = session.workers(roles)
    with tr.connect(session.url, name=session.name("idle-client")) as fleet:
        statuses = [fleet.worker(i).status() for i in ids]
    pids = [(int(st["pid"]), int(st["executor_pid"])) for st in statuses]
    expected = {p.pid for p in processes.processes.values()}
    if not {supervisor for supervisor, _ in pids} <= expected:
        raise RuntimeError(f"status() named pids {pids}, the daemons are {sorted(expected)}")
    with bare_torch_processes(s.idle_workers) as bare_pids:
        time.sleep(s.idle_settle_s)
        # A daemon is two processes: its supervisor (no torch) and its executor.
        workers = [rss_bytes(supervisor) + rss_bytes(executor) for supervisor, executor in pids]
        bare = [rss_bytes(pid) for pid in bare_pids]
    for worker_id in ids:
        processes.stop(worker_id)
    result = MeasureResult(raw={"worker_rss_bytes": workers, "bare_torch_rss_bytes": bare})
    result.rows.append(
        Row("6 idle worker daemon RSS", mib(median(workers)),
            f"python+torch {mib(median(bare))}", median(workers) / median(bare), at_most(1.2),
            note=f"supervisor + executor, after one status(); median of {len(workers)} "
                 "daemons")
    )
    return result


@dataclass(frozen=True, slots=True)
class Measure:
    run: Callable[[Session], MeasureResult]
    needs_fleet: bool
    what: str


MEASURES: dict[str, Measure] = {
    "sync": Measure(sync_op, True, "small ops that wait (sync, get, move) vs bare pika"),
    "pipelined": Measure(pipelined, True, "N small ops then one sync, ops/s vs bare pika"),
    "breakdown": Measure(breakdown.measure, False, "where one sync x+x spends its time, "
                         "layer by layer, beside a bare pika round trip"),
    "transfer": Measure(transfer, True, "send+get 1 MiB .. 1 GiB, MiB/s and peak RSS"),
    "move": Measure(move, True, "move 64 MiB bob->alice: time and bytes via the client"),
    "embedded": Measure(embedded, False, "small sync op on the embedded broker vs local"),
    "containment": Measure(containment, True, "small sync op, supervised vs unsupervised"),
    "idle": Measure(idle, False, "idle worker daemon RSS vs python + import torch"),
    "train_step": Measure(train_step, True, "one remote training step (op by op, plan) vs "
                                            "local + pika"),
    "fedavg": Measure(fedavg, True, "FedAvg on the Flower anchor's digits workload vs Flower"),
    "dpsgd": Measure(dpsgd.measure, True, "record-level DP-SGD run by the owners' workers "
                     "vs Opacus: accuracy at epsilon 1/3/8, accounting, step, round"),
    "fairness": Measure(fairness, True, "a light participant's get and status while "
                        "another sends heavy commands back to back"),
    "sidechannels": Measure(sidechannels, True, "what time tells of private values: the "
                            "subnormal attack via the broker, every operation timed"),
    "cluster": Measure(cluster, False, "a RabbitMQ cluster node stopped mid-pipeline (the "
                       "worker's, the queue leader): time to the result, what was lost"),
    "secagg": Measure(secagg.measure, False, "secure aggregation vs a plain round: the "
                      "digits FedAvg at 3 owners, one aggregate at 3 and 10"),
    "owners": Measure(owners.measure, False, "FedAvg at 3, 10, 30 and 100 data owners: "
                      "hosted daemons on RabbitMQ, embedded, the one-process loop, Flower's "
                      "Simulation Engine; memory per additional owner"),
    "large_model": Measure(large_model.measure, False, "FedAvg of models of 10 KB to 1 GB "
                           "across 3 owners: round time vs bare pika's rate, bytes per owner, "
                           "peak RSS per process; Flower's gRPC limit at 400 MB"),
    # Last: its daemons are killed, and with --restart-broker the broker restarts.
    "faults": Measure(faults, False, "workers killed mid-command and mid-move, broker "
                      "restarts, a load run: time to a clear error, what was lost"),
}
