"""Models and plans: a recorded plan is checked when defined, and run here as one
command (every call through `tensors.execute`, intermediates counted in
`max_bytes`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from torchrelay.broker import (
    DefinePlan,
    OperationRefused,
    RunPlan,
)

from .._limits import BudgetExceeded
from .._plans import RecordedPlan, check_plan
from ._registry import handles
from .tensors import ArgumentResolver, execute

if TYPE_CHECKING:
    from .._runtime import WorkerRuntime


@handles(DefinePlan)
def define_plan(worker: WorkerRuntime, command: DefinePlan, sender: str) -> None:
    worker.store.put(command.id, check_plan(command), frozenset(), frozenset({sender}))


@handles(RunPlan)
def run_plan(worker: WorkerRuntime, command: RunPlan, sender: str) -> None:
    plan = worker.store.use(command.plan, sender).value
    if type(plan) is not RecordedPlan:
        raise OperationRefused(f"object {command.plan} is not a plan")
    if len(command.arguments) != len(plan.parameters):
        raise TypeError(f"the plan takes {len(plan.parameters)} arguments, not "
                        f"{len(command.arguments)}")
    if len(command.result_ids) != len(plan.returns):
        raise TypeError(f"the plan returns {len(plan.returns)} results, not "
                        f"{len(command.result_ids)}")
    resolver = ArgumentResolver(worker.store, sender)
    scope = dict(zip(plan.parameters, resolver.arguments(command.arguments), strict=True))
    resolver.scope = scope
    budget = worker.store.max_bytes
    held = worker.store.bytes
    counted: set[int] = set()  # storages counted already: views of one count it once
    for number, (call, op) in enumerate(zip(plan.calls, plan.ops, strict=True)):
        args = resolver.arguments(call.args)
        kwargs = resolver.resolve(call.kwargs) if call.kwargs else {}
        if resolver.location is not None:
            raise OperationRefused(
                f"plan call {number} ({call.op}) uses a pointer to worker "
                f"{resolver.location!r}: a plan runs where all its data is"
            )
        result = execute(worker, call, op, args=args, kwargs=kwargs, owners=resolver.provenance)
        if call.result_id is not None:
            scope[call.result_id] = result
            if budget is not None and type(result) is torch.Tensor:
                storage = result.untyped_storage()
                if storage._cdata not in counted and not worker.store.counts(storage):
                    counted.add(storage._cdata)
                    held += storage.nbytes()  # intermediates count too
                if held > budget:
                    raise BudgetExceeded(
                        f"the plan's results would take worker {worker.id!r} past its "
                        f"max_bytes ({budget} bytes) at call {number} ({call.op})")
    for result_id, value in zip(command.result_ids, plan.returns, strict=True):
        worker.store.put(result_id, scope[value], resolver.provenance, frozenset({sender}),
                         by=sender)
