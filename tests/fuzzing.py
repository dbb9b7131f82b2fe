"""The allow-list fuzz campaign: every allow-listed operation, edge-case arguments,
each call in a child process bounded in time and memory.

A case is an operation's wire name and its arguments, written as data: a
`Tensor("kind")` token becomes a fresh tensor of that kind in the child,
`Alias(i)` the very tensor passed as argument `i` (in-place aliasing). The child
calls the operation exactly as a worker does — `check_arguments`, the call,
`check_result` — so a case the worker's checks refuse is a clean refusal, and
the campaign finds what they miss. A child that dies (a signal, an abort) or
runs a case past its time fails the campaign naming the case; the child is
replaced and the rest goes on.

No case is code: arguments are built from the tables below, nothing is
evaluated. Everything is deterministic (the seed is fixed per case).
"""

from __future__ import annotations

import collections
import importlib
import math
import multiprocessing as mp
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from torchrelay.broker import resolve_op
from torchrelay.broker._ops import operation_names
from torchrelay.worker.runtime._checks import check_arguments, check_result
from torchrelay.worker.runtime._limits import BudgetExceeded, Limits

NAN, INF = math.nan, math.inf

CAMPAIGN_LIMITS = Limits(command_timeout=10.0, max_elements=1 << 24, max_bytes=2 << 30,
                         max_list_elements=1 << 16)
"""The worker's limits in the campaign's children: tight, so huge results are refused
(not computed) and each case stays cheap."""


@dataclass(frozen=True, slots=True)
class Tensor:
    kind: str


@dataclass(frozen=True, slots=True)
class Alias:
    index: int


TENSORS: dict[str, Callable[[], torch.Tensor]] = {
    "f3": lambda: torch.randn(3),
    "f22": lambda: torch.randn(2, 2),
    "f33": lambda: torch.randn(3, 3),
    "f234": lambda: torch.randn(2, 3, 4),
    "f118": lambda: torch.randn(1, 1, 8),
    "f1144": lambda: torch.randn(1, 1, 4, 4),
    "f11222": lambda: torch.randn(1, 1, 2, 2, 2),
    "scalar": lambda: torch.tensor(1.5),
    "empty": lambda: torch.zeros(0),
    "empty03": lambda: torch.zeros(0, 3),
    "nan3": lambda: torch.tensor([NAN, 1.0, 2.0]),
    "nan22": lambda: torch.tensor([[NAN, 1.0], [1.0, 1.0]]),
    "inf22": lambda: torch.tensor([[INF, 1.0], [1.0, -INF]]),
    "allnan22": lambda: torch.full((2, 2), NAN),
    "nan118": lambda: torch.full((1, 1, 8), NAN),
    "huge22": lambda: torch.full((2, 2), 3e38),
    "i3": lambda: torch.tensor([1, 2, 3]),
    "i22": lambda: torch.tensor([[1, 2], [3, 4]]),
    "ibig": lambda: torch.tensor([-1, 2**62, -(2**63)]),
    "imin": lambda: torch.tensor([-(2**63)]),
    "i32min": lambda: torch.tensor([-(2**31)], dtype=torch.int32),
    "b3": lambda: torch.tensor([True, False, True]),
    "c22": lambda: torch.randn(2, 2, dtype=torch.complex64),
    "cnan22": lambda: torch.tensor([[complex(NAN, 0), 1], [1, 1]], dtype=torch.complex64),
    "h22": lambda: torch.randn(2, 2).half(),
    "bf22": lambda: torch.randn(2, 2).bfloat16(),
    "d22": lambda: torch.randn(2, 2, dtype=torch.float64),
    "u8": lambda: torch.tensor([0, 1, 255], dtype=torch.uint8),
    "expanded": lambda: torch.randn(1).expand(4, 4),
    "transposed": lambda: torch.randn(4, 4).t(),
    "grad22": lambda: torch.randn(2, 2, requires_grad=True),
}

ONE = ["f3", "f22", "f234", "f1144", "scalar", "empty", "empty03", "nan22", "inf22", "i22",
       "ibig", "b3", "c22", "h22", "u8", "expanded", "grad22"]
PAIRS = [("f22", "f22"), ("f22", "alias"), ("nan22", "nan22"), ("f22", "i22"), ("i22", "f22"),
         ("f22", "c22"), ("f3", "f22"), ("empty03", "empty03"), ("imin", "imin"),
         ("i32min", "i32min"), ("f1144", "f1144"), ("h22", "bf22")]
TRIPLES = [("f22", "f22", "f22"), ("nan22", "nan22", "nan22"), ("i22", "i22", "i22"),
           ("f22", "alias", "alias")]
SCALARS: list[Any] = [0, 1, -1, 2**31, 2**62, -(2**63), 2**63 - 1, NAN, INF, -INF, 0.5, True]
SCALAR_TENSORS = ["f22", "f1144", "i3", "empty03"]
INT_PAIRS = [(0, 1), (1, 2**31), (-1, -1), (2**62, 2**62), (1, -(2**63)), (2, 0)]
SIZES: list[Any] = [0, 3, -1, 2**31, 2**62, (2, 2), (2**31, 2**31), (-1, 2), (3, -5)]


@dataclass(frozen=True, slots=True)
class Case:
    op: str
    pattern: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        shown = [_show(a) for a in self.args] + [f"{k}={_show(v)}" for k, v in self.kwargs]
        return f"{self.op}({', '.join(shown)})"


def _show(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"<{value.kind}>"
    if isinstance(value, Alias):
        return f"<argument {value.index}>"
    return repr(value)


def _t(kind: str) -> Tensor | Alias:
    return Alias(0) if kind == "alias" else Tensor(kind)


def generic_cases(op: str) -> Iterator[Case]:
    """The patterns every operation gets."""
    for kind in ONE:
        yield Case(op, f"one {kind}", (Tensor(kind),))
    if op.startswith("Tensor@"):
        return
    for a, b in PAIRS:
        yield Case(op, f"pair {a},{b}", (Tensor(a), _t(b)))
    for a, b, c in TRIPLES:
        yield Case(op, f"triple {a},{b},{c}", (Tensor(a), _t(b), _t(c)))
    for kind in SCALAR_TENSORS:
        for scalar in SCALARS:
            yield Case(op, f"{kind} and {scalar!r}", (Tensor(kind), scalar))
    for kind in ("f22", "f1144"):
        for i, j in INT_PAIRS:
            yield Case(op, f"{kind} and {i}, {j}", (Tensor(kind), i, j))
    if not op.startswith("Tensor."):  # functions that make tensors from sizes
        for size in SIZES:
            yield Case(op, f"size {size!r}", (size,))


KNOWN_BAD: list[Case] = [
    # Each crashed the process or never returned in torch 2.13 before the worker's
    # checks refused it (found by this campaign; see worker/runtime/_checks.py).
    Case("linalg.eigvals", "NaN on the diagonal (SIGSEGV in SGEBAL)", (Tensor("nan22"),)),
    Case("linalg.eigvals", "all NaN (SIGSEGV)", (Tensor("allnan22"),)),
    Case("linalg.eigvals", "complex NaN (SIGSEGV)", (Tensor("cnan22"),)),
    Case("torch.binomial", "NaN count (never returns)", (Tensor("nan3"), Tensor("f3"))),
    Case("F.max_pool1d", "kernel 2**62 (never returns)", (Tensor("f118"), 2**62)),
    Case("F.max_pool1d", "kernel 2**63-1 (SIGSEGV)", (Tensor("f118"), 2**63 - 1)),
    Case("F.max_pool1d", "kernel 2**32 (slow)", (Tensor("f118"), 2**32)),
    Case("F.fold", "padding 2**31 (SIGSEGV)", (Tensor("fold_input"), 5, 2),
         (("padding", 2**31),)),
    Case("F.fold", "padding 2**32 (never returns)", (Tensor("fold_input"), 5, 2),
         (("padding", 2**32),)),
    Case("F.embedding_bag", "max over no bags (SIGSEGV)",
         (Tensor("indices"), Tensor("weights"), Tensor("no_offsets")), (("mode", "max"),)),
    Case("torch.lu_unpack", "empty pivots (SIGSEGV)", (Tensor("f22"), Tensor("no_pivots"))),
    Case("linalg.ldl_solve", "lone negative pivots (heap corruption, SIGABRT)",
         (Tensor("ldl_factor"), Tensor("minus_ones"), Tensor("rhs"))),
    Case("linalg.matrix_power", "n = -2**63 (never returns)", (Tensor("eye2"), -(2**63))),
    Case("Tensor.matrix_power", "n = -2**63 (never returns)", (Tensor("eye2"), -(2**63))),
    Case("torch.div", "INT64_MIN // -1, trunc (SIGFPE)", (Tensor("imin"), -1),
         (("rounding_mode", "trunc"),)),
    Case("Tensor.div_", "INT32_MIN // -1, trunc (SIGFPE)",
         (Tensor("i32min"), Tensor("i32_minus_one")), (("rounding_mode", "trunc"),)),
    Case("torch.lcm", "INT64_MIN and INT64_MAX (SIGFPE; found by the noninterference "
         "campaign)", (Tensor("imin"), Tensor("imax"))),
    Case("Tensor.lcm_", "INT64_MIN and INT64_MAX (SIGFPE)", (Tensor("imin"), Tensor("imax"))),
    Case("torch.combinations", "10 taken 8 at a time (slow)", (Tensor("f10"), 8)),
    Case("torch.svd_lowrank", "niter 2**20 (slow)", (Tensor("f33"),), (("q", 2),
                                                                         ("niter", 2**20))),
    Case("torch.pca_lowrank", "niter 2**20 (slow)", (Tensor("f33"),), (("niter", 2**20),)),
]

TENSORS.update({
    "fold_input": lambda: torch.randn(1, 8, 16),
    "indices": lambda: torch.tensor([0, 1]),
    "weights": lambda: torch.randn(5, 3),
    "no_offsets": lambda: torch.zeros(0, dtype=torch.long),
    "no_pivots": lambda: torch.zeros(0, dtype=torch.int32),
    "ldl_factor": lambda: torch.linalg.ldl_factor(torch.eye(3) * 2)[0],
    "minus_ones": lambda: torch.full((3,), -1, dtype=torch.int32),
    "rhs": lambda: torch.randn(3, 2),
    "eye2": lambda: torch.eye(2),
    "i32_minus_one": lambda: torch.tensor([-1], dtype=torch.int32),
    "imax": lambda: torch.tensor([2**63 - 1]),
    "f10": lambda: torch.randn(10),
})

FAMILY: list[Case] = [
    # Shapes of arguments near the known-bad ones, which must stay clean errors.
    *(Case(op, f"pooling {size}", (Tensor("f118"), size))
      for op in ("F.max_pool1d", "F.avg_pool1d", "F.lp_pool1d", "F.max_pool1d_with_indices")
      for size in (9, 2**31, 2**32, -(2**31), 0)),
    *(Case(op, f"pooling2d {size}", (Tensor("f1144"), size))
      for op in ("F.max_pool2d", "F.avg_pool2d", "F.max_pool2d_with_indices")
      for size in (5, 2**31, 2**62)),
    *(Case("F.fold", f"fold {name}={size}", (Tensor("fold_input"), 5, 2), ((name, size),))
      for name in ("stride", "dilation", "padding") for size in (2**31 - 1, -1)),
    *(Case(op, f"linalg {kind}", (Tensor(kind),))
      for op in ("linalg.eig", "linalg.eigh", "linalg.svd", "linalg.inv", "linalg.det",
                 "linalg.cholesky", "linalg.qr", "linalg.lu_factor", "linalg.pinv",
                 "linalg.matrix_rank", "linalg.cond", "linalg.eigvalsh", "linalg.ldl_factor")
      for kind in ("nan22", "allnan22", "inf22", "huge22", "cnan22")),
    *(Case("linalg.ldl_solve", f"ldl pivots {pivots}",
           (Tensor("ldl_factor"), Tensor(f"pivots{pivots}"), Tensor("rhs")))
      for pivots in ("_paired", "_zero", "_big")),
    *(Case(op, f"sampling {kind}", (Tensor(kind),))
      for op in ("torch.poisson", "torch.bernoulli", "Tensor.exponential_", "Tensor.geometric_",
                 "Tensor.cauchy_", "Tensor.log_normal_", "Tensor.random_")
      for kind in ("nan3", "inf22", "huge22")),
    Case("torch.multinomial", "NaN weights", (Tensor("nan3"), 2)),
    *(Case("torch.div", f"trunc {kind}", (Tensor(kind), -1), (("rounding_mode", "trunc"),))
      for kind in ("i3", "ibig", "u8")),
    *(Case(op, "matrix_power huge", (Tensor("eye2"), n))
      for op in ("linalg.matrix_power", "torch.matrix_power") for n in (2**62 - 1, -(2**62) + 1)),
]

TENSORS.update({
    "pivots_paired": lambda: torch.tensor([-2, -2, 3], dtype=torch.int32),
    "pivots_zero": lambda: torch.tensor([0, 1, 2], dtype=torch.int32),
    "pivots_big": lambda: torch.tensor([9, 1, 2], dtype=torch.int32),
})


def all_cases() -> list[Case]:
    """The whole campaign, in a fixed order: every operation's generic patterns, then the
    families around known findings, then the known findings themselves."""
    cases = [case for op in operation_names() for case in generic_cases(op)]
    return cases + FAMILY + KNOWN_BAD


# -- running a case (in the child) ---------------------------------------------------------


def _build(case: Case) -> tuple[list[Any], dict[str, Any]]:
    args: list[Any] = []
    for token in case.args:
        if isinstance(token, Tensor):
            args.append(TENSORS[token.kind]())
        elif isinstance(token, Alias):
            args.append(args[token.index])
        else:
            args.append(token)
    return args, dict(case.kwargs)


def run_case(case: Case) -> str:
    """`ok`, `refused` (by the worker's checks) or `error` (a clean exception in torch)."""
    torch.manual_seed(0)
    args, kwargs = _build(case)
    try:
        check_arguments(case.op, args, kwargs, CAMPAIGN_LIMITS)
    except (BudgetExceeded, PermissionError):
        return "refused"
    except Exception:  # a check that trips on odd input: still a clean error reply
        return "error"
    try:
        result = resolve_op(case.op)(*args, **kwargs)
        check_result(case.op, result, CAMPAIGN_LIMITS)
    except BudgetExceeded:
        return "refused"
    except Exception:
        return "error"
    return "ok"


def _child(connection: Connection, memory_limit: int, campaign: str = "fuzzing") -> None:
    """Run the cases the parent hands over, one by one, reporting each outcome. The cases
    and how to run one are `campaign`'s (a module beside this one): `all_cases()` and
    `run_case(case)`, which answers an outcome, optionally `outcome|details`."""
    module = importlib.import_module(campaign)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    quiet = os.open(os.devnull, os.O_WRONLY)  # MKL and torch print to stdout and stderr
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    torch.set_num_threads(1)
    cases = module.all_cases()
    connection.send(("ready",))
    while True:
        batch = connection.recv()
        if batch is None:
            return
        for index in batch:
            connection.send(("start", index))
            try:
                outcome = module.run_case(cases[index])
            except MemoryError:
                outcome = "error"
            except Exception as e:  # the campaign's own fault: said, not taken for a crash
                outcome = f"harness|{type(e).__name__}: {e}"[:2000]
            connection.send(("done", index, outcome))
        connection.send(("batch",))


# -- running the campaign (in the test) ----------------------------------------------------


@dataclass
class Finding:
    case: Any
    what: str  # "crash: SIGSEGV", "overrun: more than 10 s", "leak: ..."

    def __str__(self) -> str:
        return f"{self.what}: {self.case}  [{self.case.pattern}]"


@dataclass
class Report:
    operations: int = 0
    cases: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    outcome_of: dict[int, str] = field(default_factory=dict)
    details: dict[int, str] = field(default_factory=dict)
    """What a case's outcome said beyond its name (`outcome|details`)."""

    @property
    def crashes(self) -> int:
        return sum(f.what.startswith("crash") for f in self.findings)

    @property
    def overruns(self) -> int:
        return sum(f.what.startswith("overrun") for f in self.findings)

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return (f"{self.operations} operations x their argument patterns = {self.cases} cases "
                f"in {self.seconds:.0f} s: {counts}; crashes {self.crashes}, "
                f"overruns {self.overruns}")


@dataclass
class _Slot:
    process: Any = None
    connection: Connection | None = None
    batch: list[int] = field(default_factory=list)
    current: int | None = None
    deadline: float = 0.0


def run_campaign(
    indices: list[int] | None = None,
    *,
    timeout: float = 10.0,
    workers: int = 2,
    batch_size: int = 200,
    memory_limit: int = 4 << 30,
    campaign: str = "fuzzing",
    max_findings: int = 50,
) -> Report:
    """Run the cases at `indices` of `campaign`'s `all_cases()` (all by default) in child
    processes. After `max_findings` crashes and overruns the campaign stops: each costs a
    fresh child (seconds), so a harness broken for every case would otherwise run for
    hours; the cases left are not counted, which fails the campaign's tests at once."""
    cases = importlib.import_module(campaign).all_cases()
    queue = collections.deque(range(len(cases)) if indices is None else indices)
    report = Report(operations=len({cases[i].op for i in queue}), cases=len(queue))
    context = mp.get_context("spawn")
    slots = [_Slot() for _ in range(workers)]
    started = time.monotonic()

    def start(slot: _Slot) -> None:
        parent, child = context.Pipe()
        slot.process = context.Process(target=_child, args=(child, memory_limit, campaign),
                                       daemon=True)
        slot.process.start()
        child.close()
        slot.connection, slot.batch, slot.current = parent, [], None
        slot.deadline = time.monotonic() + 300.0  # starting up: importing torch

    def give_work(slot: _Slot) -> None:
        assert slot.connection is not None
        slot.batch = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
        slot.connection.send(slot.batch or None)
        slot.deadline = time.monotonic() + 300.0

    def lost(slot: _Slot, what: str) -> None:
        """The child died or overran: blame the case in hand, give back the rest."""
        if slot.process is not None and slot.process.is_alive():
            slot.process.kill()
        if slot.process is not None:
            slot.process.join(10)
        if slot.current is not None:
            report.findings.append(Finding(cases[slot.current], what))
            report.outcome_of[slot.current] = what.split(":", maxsplit=1)[0]
            rest = slot.batch[slot.batch.index(slot.current) + 1:]
        else:
            rest = slot.batch
        queue.extendleft(reversed(rest))
        slot.process = slot.connection = None
        slot.current = None

    while True:
        if len(report.findings) >= max_findings:
            queue.clear()
            for slot in slots:
                if slot.process is not None:
                    slot.process.kill()
                    slot.process.join(10)
            break
        for slot in slots:
            if slot.process is None and queue:
                start(slot)
        live = [s for s in slots if s.process is not None]
        if not live:
            break
        ready = wait([s.connection for s in live if s.connection is not None], timeout=0.5)
        for slot in live:
            while slot.connection is not None and slot.connection in ready and (
                slot.connection.poll()
            ):
                try:
                    message = slot.connection.recv()
                except (EOFError, OSError):
                    slot.process.join(5)
                    code = slot.process.exitcode
                    name = signal.Signals(-code).name if code and code < 0 else f"exit {code}"
                    lost(slot, f"crash: {name}")
                    break
                if message[0] in ("ready", "batch"):
                    if queue:
                        give_work(slot)
                    else:
                        slot.connection.send(None)
                        slot.process.join(10)
                        slot.process = slot.connection = None
                        break
                elif message[0] == "start":
                    slot.current = message[1]
                    slot.deadline = time.monotonic() + timeout
                elif message[0] == "done":
                    outcome, _, details = message[2].partition("|")
                    report.outcomes[outcome] += 1
                    report.outcome_of[message[1]] = outcome
                    if details:
                        report.details[message[1]] = details
                    slot.current = None
                    slot.deadline = time.monotonic() + 300.0
        now = time.monotonic()
        for slot in slots:
            if slot.process is None:
                continue
            if not slot.process.is_alive() and not (slot.connection and slot.connection.poll()):
                code = slot.process.exitcode
                name = signal.Signals(-code).name if code and code < 0 else f"exit {code}"
                lost(slot, f"crash: {name}")
            elif now > slot.deadline:
                lost(slot, f"overrun: more than {timeout:g} s" if slot.current is not None
                     else "crash: unresponsive")
    report.seconds = time.monotonic() - started
    return report
