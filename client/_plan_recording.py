"""`tr.plan`: a function of pointers recorded once, then run as one command.

    @tr.plan
    def train_step(data, target):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    loss = train_step(data_ptr, target_ptr)   # first time: runs op by op, recorded
    loss = train_step(other_data, other_target)  # then: one `run_plan` command

The first call on a worker runs the function as usual and records the
operations it sends; the worker keeps them as a plan (see `worker/runtime/_plans.py`:
data, not code, every operation allow-listed and checked as a call of its own),
and later calls send one message where the function sent one per operation.
Arguments may be pointers on that worker or local tensors (sent along with each
run); what the function closes over (a model's parameters, an optimizer) is
used where it is, by reference.

A plan is only as general as what it recorded. Other arguments (numbers,
strings) are taken as constants: a call with different ones records again.
If the function looked at shapes (`len(x)`, `x.shape`), what it computed from
them is fixed too, so calls whose arguments have other shapes record a plan of
their own. A function that does anything but operations on that one worker
(fetches a value, sends or moves data, reaches another worker) cannot be a
plan: it keeps running op by op, and `plan.recorded` says why not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, ParamSpec, TypeVar

import torch

from torchrelay.broker import Call, Command, DefinePlan, Delete, Meta, ObjectRef, RunPlan

from ._handles import WorkerHandle
from ._pointer import PointerTensor, send
from ._session import Fleet

__all__ = ["Plan", "plan"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class Capture:
    """What one recording saw the fleet send (see `Fleet._send`)."""

    worker_id: str
    calls: list[Call] = field(default_factory=list)
    looked_at_shapes: bool = False
    broken: str | None = None
    """Why what was recorded cannot be a plan."""

    def saw(self, worker_id: str, command: Command, settles: bool) -> None:
        kind = type(command)
        if kind is Delete:  # garbage collection: not part of the function
            return
        if kind is Meta:
            self.looked_at_shapes = True
            return
        if self.broken is not None:
            return
        if worker_id != self.worker_id:
            self.broken = f"it sent {command.describe()} to worker {worker_id!r}"
        elif kind is not Call:
            self.broken = f"it sent {command.describe()}, not an operation"
        elif not settles:
            self.broken = "it used a pointer to a pointer"
        else:
            self.calls.append(command)  # type: ignore[arg-type]


class Plan(Generic[P, R]):
    """A function of pointers, recorded once per worker and kind of arguments (see
    the module docstring). Call it as the function."""

    def __init__(self, function: Callable[P, R]) -> None:
        functools.update_wrapper(self, function)
        self.function = function
        self._recorded: dict[tuple[str, Hashable], _Recorded | None] = {}
        self.recorded: dict[str, str] = {}
        """For each worker it ran on: how it runs there ("as a plan of N operations", or
        why it runs op by op)."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if kwargs:
            raise TypeError(f"plan {self.function.__name__} takes positional arguments only")
        worker = _worker_of(args)
        if worker is None:
            raise TypeError(f"plan {self.function.__name__} needs at least one pointer "
                            "argument: it runs where that points")
        key = (worker.id, _kinds(args, shaped=False))
        recorded = self._recorded.get(key, _UNSEEN)
        if recorded is _UNSEEN:
            return self._record(worker, args, key)
        if recorded is not None and recorded.shaped:
            recorded = self._recorded.get((worker.id, _kinds(args, shaped=True)), _UNSEEN)
            if recorded is _UNSEEN:
                return self._record(worker, args, key)
        if recorded is None:  # it cannot be a plan: op by op
            return self.function(*args)  # type: ignore[call-arg]
        result: R = recorded.run(worker, args)
        return result

    def _record(self, worker: WorkerHandle, args: tuple[Any, ...],
                key: tuple[str, Hashable]) -> R:
        fleet = worker.fleet
        pointers = [send(a, worker) if type(a) is torch.Tensor else a for a in args]
        if fleet.capture is not None:
            raise RuntimeError(f"plan {self.function.__name__} ran while another plan was "
                               "being recorded; plans do not nest")
        capture = fleet.capture = Capture(worker.id)
        try:
            result = self.function(*pointers)  # type: ignore[arg-type, call-arg]
        finally:
            fleet.capture = None
        parameters = [p.id_at_location for p in pointers if isinstance(p, PointerTensor)]
        returned, shape = _returned(result)
        reason = capture.broken
        made = {c.result_id for c in capture.calls}
        if reason is None and any(p.location is not worker for p in returned):
            reason = "it returned a pointer to another worker"
        if reason is None and not all(p.id_at_location in made or p.id_at_location in
                                      parameters for p in returned):
            reason = "it returned a pointer it did not make"
        if reason is None and not capture.calls:
            reason = "it ran no operation"
        if reason is not None:
            self._recorded[key] = None
            self.recorded[worker.id] = f"op by op: {reason}"
            return result
        plan_pointer = PointerTensor(worker, fleet.new_id())  # deletes the plan when it dies
        fleet.post(worker.id, DefinePlan(
            plan_pointer.id_at_location, parameters, [c.fields() for c in capture.calls],
            [p.id_at_location for p in returned]))
        recorded = _Recorded(plan_pointer, shape, capture.looked_at_shapes)
        self._recorded[key] = recorded
        if capture.looked_at_shapes:
            self._recorded[(worker.id, _kinds(args, shaped=True))] = recorded
        self.recorded[worker.id] = f"as a plan of {len(capture.calls)} operations"
        return result

    def __repr__(self) -> str:
        return f"<plan {self.function.__name__}: {self.recorded or 'not run yet'}>"


def plan(function: Callable[P, R]) -> Plan[P, R]:
    """Make `function` a `Plan` (a decorator)."""
    return Plan(function)


_UNSEEN: Any = object()


@dataclass(frozen=True)
class _Recorded:
    pointer: PointerTensor
    shape: Any
    """How the function's results were arranged: None, one pointer, or a tuple."""
    shaped: bool
    """It looked at shapes: valid only for arguments shaped as the recorded ones."""

    def run(self, worker: WorkerHandle, args: tuple[Any, ...]) -> Any:
        fleet: Fleet = worker.fleet
        arguments = [ObjectRef(a.id_at_location) if isinstance(a, PointerTensor) else a
                     for a in args if isinstance(a, PointerTensor | torch.Tensor)]
        count = 0 if self.shape is None else 1 if self.shape == "one" else self.shape
        result_ids = [fleet.new_id() for _ in range(count)]
        fleet.post(worker.id, RunPlan(self.pointer.id_at_location, arguments, result_ids))
        results = [PointerTensor(worker, i) for i in result_ids]
        if self.shape is None:
            return None
        if self.shape == "one":
            return results[0]
        return tuple(results)


def _worker_of(args: tuple[Any, ...]) -> WorkerHandle | None:
    worker = None
    for arg in args:
        if isinstance(arg, PointerTensor):
            if worker is not None and arg.location is not worker:
                raise TypeError("a plan's pointer arguments must all be on one worker")
            if arg.chain:
                raise TypeError("a plan runs where its data is: not through a pointer to a "
                                "pointer")
            worker = arg.location
    return worker


def _kinds(args: tuple[Any, ...], *, shaped: bool) -> Hashable:
    """What a recording depends on of the arguments."""
    kinds: list[Hashable] = []
    for arg in args:
        if isinstance(arg, PointerTensor):
            if shaped:
                kinds.append(("pointer", arg.dtype, tuple(arg.shape)))
            else:
                kinds.append("pointer")
        elif isinstance(arg, torch.Tensor):
            kinds.append(("tensor", arg.dtype, tuple(arg.shape), arg.requires_grad))
        else:
            try:
                hash(arg)
                constant: Hashable = arg
            except TypeError:
                constant = repr(arg)
            kinds.append(("value", type(arg).__name__, constant))
    return tuple(kinds)


def _returned(result: Any) -> tuple[list[PointerTensor], Any]:
    if result is None:
        return [], None
    if isinstance(result, PointerTensor):
        return [result], "one"
    if isinstance(result, tuple) and all(isinstance(r, PointerTensor) for r in result):
        return list(result), len(result)
    raise TypeError("a plan returns a pointer, a tuple of pointers, or None, not "
                    f"{type(result).__name__}")
