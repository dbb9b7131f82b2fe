"""What time still tells of private values: the timing half of the noninterference rule.

The suite's campaign (`tests/noninterference.py`) proves that nothing a client
observes *but time* depends on private values. Time cannot be compared for
equality, so it is measured here:

1. The issue's attack through the broker: `(big * s) * 0.5` on a daemon, for a
   public 1024x1024 `big` and a scalar `s` that is subnormal or not, timed from
   the client (`sync` after each). Daemons flush subnormals to zero; the same
   computation in this process with flushing off shows what it was.
2. A sweep of every allow-listed operation that runs on private data, on large
   arguments (512x512 and the like) whose values are ordinary in one variant
   and zeros, negatives, NaN, ±inf, huge or subnormal in the others (indices in
   range or not), run as a worker runs it on private data
   (`PrivateExecution`), repeated and interleaved. For each operation and
   variant, the time difference is turned into what one query tells a client
   who sees it through the broker: the accuracy of the best threshold test
   between the two classes, after adding round-trip noise sampled from real
   small operations on a daemon, and that accuracy's information, `1 - H(p)`
   bits per query. Operations that give more than `REPORTED_BITS` are listed
   (the README's threat model quotes them).

Nothing here asserts: it reports.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from torchrelay.broker import resolve_op
from torchrelay.broker._ops import operation_names
from torchrelay.worker.runtime._limits import Limits
from torchrelay.worker.runtime._oblivious import PrivateExecution
from torchrelay.worker.runtime._pacing import Pacer

from .report import MeasureResult, Row
from .session import Session, send
from .stats import micros, millis, progress

REPORTED_BITS = 0.05
"""Operations whose timing tells more than this per query (through the broker) are listed."""

LIMITS = Limits(command_timeout=60.0, max_elements=1 << 26, max_bytes=8 << 30,
                max_list_elements=1 << 16)


# -- 1. the subnormal attack, through the broker ---------------------------------------


def _subnormal_attack(session: Session, repetitions: int) -> tuple[list[Row], dict[str, Any]]:
    fleet, bob, _, _ = session.require()
    big = send(torch.rand(1024, 1024), bob)
    scalars = {"normal": send(torch.tensor(0.5), bob), "subnormal": send(torch.tensor(1e-39), bob)}
    times: dict[str, list[float]] = {name: [] for name in scalars}
    for _ in range(3):  # warm up
        for s in scalars.values():
            (big * s) * 0.5
            fleet.sync()
    for _ in range(repetitions):
        for name, s in scalars.items():
            started = time.perf_counter()
            (big * s) * 0.5
            fleet.sync()
            times[name].append(time.perf_counter() - started)
    big.get()
    local = _local_subnormal_cost(repetitions)
    normal, subnormal = (statistics.median(times[n]) for n in ("normal", "subnormal"))
    rows = [Row("side channels: (big * s) * 0.5 through the broker, s subnormal / normal",
                millis(subnormal), millis(normal), subnormal / normal,
                note=f"daemons flush subnormals to zero; in this process without flushing: "
                     f"{millis(local['off_subnormal'])} / {millis(local['off_normal'])} "
                     f"({local['off_subnormal'] / local['off_normal']:.1f}x), with: "
                     f"{millis(local['on_subnormal'])} / {millis(local['on_normal'])}")]
    return rows, {"through_broker_s": times, "local_s": local}


def _local_subnormal_cost(repetitions: int) -> dict[str, float]:
    big = torch.rand(1024, 1024)
    found: dict[str, float] = {}
    previous = torch.set_flush_denormal(False)
    try:
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            for name, value in (("normal", 0.5), ("subnormal", 1e-39)):
                s = torch.tensor(value)
                samples = []
                for _ in range(repetitions):
                    started = time.perf_counter()
                    (big * s) * 0.5
                    samples.append(time.perf_counter() - started)
                found[f"{'on' if flush else 'off'}_{name}"] = statistics.median(samples)
    finally:
        torch.set_flush_denormal(previous)
    return found


# -- 2. the sweep ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pattern:
    """An operation's arguments: `make(values)` builds them, `values` filling the private
    one (the first tensor) with a variant's values."""

    name: str
    make: Callable[[Callable[[torch.Size, torch.dtype], torch.Tensor]], list[Any]]


def _float_variant(name: str) -> Callable[[torch.Size, torch.dtype], torch.Tensor]:
    def made(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        generator = torch.Generator().manual_seed(3)
        if not dtype.is_floating_point:
            high = shape[0] if shape else 1
            if name == "ordinary":
                return torch.randint(0, max(high, 1), shape, generator=generator, dtype=dtype)
            return torch.full(shape, 10**6 if name == "huge" else -(10**6), dtype=dtype)
        info = torch.finfo(dtype)
        values = {
            "ordinary": lambda: torch.rand(shape, generator=generator, dtype=dtype) + 0.5,
            "zeros": lambda: torch.zeros(shape, dtype=dtype),
            "negative": lambda: -torch.rand(shape, generator=generator, dtype=dtype) * 1e3,
            "nan": lambda: torch.full(shape, math.nan, dtype=dtype),
            "inf": lambda: torch.full(shape, math.inf, dtype=dtype),
            "huge": lambda: torch.full(shape, info.max / 4, dtype=dtype),
            "subnormal": lambda: torch.full(shape, info.tiny / 4, dtype=dtype),
        }
        return values[name]()

    return made


FLOAT_VARIANTS = ("zeros", "negative", "nan", "inf", "huge", "subnormal")
INDEX_VARIANTS = ("huge", "negative")  # out of range, both ways

SIDE = 512


def _patterns(op: str) -> Iterator[Pattern]:
    square = torch.Size([SIDE, SIDE])
    yield Pattern("one", lambda v: [v(square, torch.float32)])
    if op.startswith("Tensor@"):
        return
    yield Pattern("pair", lambda v: [v(square, torch.float32), torch.rand(square) + 0.5])
    yield Pattern("scalar", lambda v: [v(square, torch.float32), 0.5])


INDEXED: dict[str, Callable[[Callable[[torch.Size, torch.dtype], torch.Tensor]], list[Any]]] = {
    "torch.index_select": lambda v: [torch.rand(4096, 64), 0, v(torch.Size([4096]),
                                                                 torch.int64)],
    "F.embedding": lambda v: [v(torch.Size([4096]), torch.int64), torch.rand(4096, 64)],
    "F.cross_entropy": lambda v: [torch.rand(4096, 10), v(torch.Size([4096]), torch.int64)],
    "torch.gather": lambda v: [torch.rand(512, 512), 1, v(torch.Size([512, 512]),
                                                           torch.int64)],
    "torch.take": lambda v: [torch.rand(512, 512), v(torch.Size([65536]), torch.int64)],
}


def _operations() -> list[str]:
    return [n for n in operation_names() if not n.startswith("Tensor@")]


@dataclass(slots=True)
class Finding:
    op: str
    pattern: str
    variant: str
    ordinary_s: float
    variant_s: float
    bits: float


def _time(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _bits_per_query(a: list[float], b: list[float], noise: list[float]) -> float:
    """What one observation (an operation's time plus a round trip's) tells of which
    class it came from: 1 - H(p) for the best threshold's accuracy p."""
    seen_a = sorted(x + n for x in a for n in noise)
    seen_b = sorted(x + n for x in b for n in noise)
    best = 0.5
    for threshold in seen_a[:: max(1, len(seen_a) // 200)] + seen_b[:: max(1, len(seen_b) // 200)]:
        below_a = _fraction_below(seen_a, threshold)
        below_b = _fraction_below(seen_b, threshold)
        best = max(best, (below_a + (1 - below_b)) / 2, (below_b + (1 - below_a)) / 2)
    p = min(best, 1 - 1e-12)
    return 1 + p * math.log2(p) + (1 - p) * math.log2(1 - p)


def _fraction_below(ordered: list[float], threshold: float) -> float:
    low, high = 0, len(ordered)
    while low < high:
        middle = (low + high) // 2
        if ordered[middle] < threshold:
            low = middle + 1
        else:
            high = middle
    return low / len(ordered)


def _sweep(noise: list[float], repetitions: int, budget_s: float,
           paced: bool) -> tuple[list[Finding], int]:
    torch.set_flush_denormal(True)  # as the daemons run
    execution = PrivateExecution(LIMITS, Pacer() if paced else None)
    owners = frozenset({"owner"})
    findings: list[Finding] = []
    measured = 0
    started = time.monotonic()
    cases: list[tuple[str, str, Any, tuple[str, ...]]] = [
        (op, p.name, p.make, FLOAT_VARIANTS) for op in _operations() for p in _patterns(op)]
    cases += [(op, "index", make, INDEX_VARIANTS) for op, make in INDEXED.items()]
    for op, pattern, make, variants in cases:
        if time.monotonic() - started > budget_s:
            progress(f"side channels: stopped after {budget_s:.0f} s, at {op}")
            break
        function = resolve_op(op)

        def run(values: Callable[[torch.Size, torch.dtype], torch.Tensor], op: str = op,
                function: Any = function, make: Any = make) -> float | None:
            args = make(values)
            try:
                return _time(lambda: execution.run(op, function, args, {}, owners))
            except Exception:
                return None  # refused on private data: the same for every value

        ordinary = _float_variant("ordinary")
        if run(ordinary) is None:
            continue
        measured += 1
        for variant in variants:
            other = _float_variant(variant)
            a: list[float] = []
            b: list[float] = []
            for _ in range(repetitions):  # interleaved: drift hits both alike
                ta, tb = run(ordinary), run(other)
                if ta is None or tb is None:
                    break
                a.append(ta)
                b.append(tb)
            if len(a) < repetitions:
                continue
            bits = _bits_per_query(a, b, noise)
            if bits > REPORTED_BITS:
                findings.append(Finding(op, pattern, variant, statistics.median(a),
                                        statistics.median(b), bits))
    return findings, measured


def _round_trip_noise(session: Session, count: int) -> list[float]:
    """Round trips of a small operation on a daemon, less their median: what a client's
    clock adds to an operation's time, from which only the spread matters."""
    fleet, bob, _, _ = session.require()
    x = send(torch.ones(4), bob)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        x + x
        fleet.sync()
        samples.append(time.perf_counter() - started)
    x.get()
    middle = statistics.median(samples)
    return [s - middle for s in samples]


def sidechannels(session: Session) -> MeasureResult:
    s = session.settings
    result = MeasureResult()
    rows, raw = _subnormal_attack(session, s.sidechannel_repetitions)
    result.rows += rows
    noise = _round_trip_noise(session, 300)
    result.raw.update(raw)
    spread = statistics.quantiles(noise, n=4)
    for paced in (False, True):
        how = "paced as daemons pace them" if paced else "unpaced: what the kernels do"
        progress(f"side channels: timing every operation that runs on private data, {how}")
        findings, measured = _sweep(noise[::3], s.sidechannel_repetitions,
                                    s.sidechannel_budget_s, paced)
        findings.sort(key=lambda f: -f.bits)
        total_bits = sum(f.bits for f in findings)
        result.rows.append(Row(
            f"side channels, {how}: operations whose time tells > {REPORTED_BITS} bit/query",
            f"{len({f.op for f in findings})} of {measured}", "", None,
            note=f"round-trip noise IQR {micros(spread[2] - spread[0])}; largest: " + "; ".join(
                f"{f.op} ({f.pattern}, {f.variant}: {micros(f.variant_s)} vs "
                f"{micros(f.ordinary_s)}, {f.bits:.2f} bit)" for f in findings[:6])
            + f"; {total_bits:.1f} bits over all"))
        result.raw["paced" if paced else "unpaced"] = {
            "operations_timed": measured,
            "findings": [{"op": f.op, "pattern": f.pattern, "variant": f.variant,
                          "ordinary_s": f.ordinary_s, "variant_s": f.variant_s,
                          "bits_per_query": f.bits} for f in findings]}
    return result
