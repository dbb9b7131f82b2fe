"""Privacy and aggregation: the guard every way out of the worker passes.

What may be fetched (`releasable`), moved (`may_move`) and released (`aggregate`,
with the budget `charge_privacy` spends; a model trained by DP-SGD, with the
budget `charge_training` spends) — the rules themselves are the owner's policy
(`_privacy.py`); a new way out calls these, a new rule changes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from torchrelay.broker import (
    Aggregate,
    ChargePrivacy,
    PrivateDataError,
)

from .._aggregation import AggregationPlan
from .._privacy import BudgetSpent
from ._registry import handles

if TYPE_CHECKING:
    from .._runtime import WorkerRuntime


def releasable(worker: WorkerRuntime, value: Any, owners: frozenset[str]) -> bool:
    """Whether a value derived from private data may leave as it is: a scalar, of
    this worker's data only, whose owner opted in (`release_scalars`)."""
    scalar = (isinstance(value, torch.Tensor) and value.numel() <= 1) or type(value) in (
        int, float, bool)
    return scalar and owners == {worker.id} and worker.privacy.release_scalars


def may_move(worker: WorkerRuntime, object_id: int, owners: frozenset[str],
             destination: str) -> None:
    """Refuse to send private-derived data anywhere its owners do not trust."""
    if owners == {worker.id}:
        _only_secure(worker, f"object {object_id} cannot move to {destination!r}")
        if destination not in worker.privacy.trusted:
            trusted = ", ".join(worker.privacy.trusted) or "no worker"
            raise PrivateDataError(
                f"object {object_id} on worker {worker.id!r} derives from its private "
                f"data: it may move only to workers {worker.id!r} trusts ({trusted}), "
                f"not to {destination!r}"
            )
        try:
            worker.budget.check(worker.id)  # no contribution it could not afford to release
        except BudgetSpent as e:
            raise PrivateDataError(f"{e}: it contributes no more") from None
    elif owners != {destination}:
        raise PrivateDataError(
            f"object {object_id} on worker {worker.id!r} derives from private data of "
            f"{', '.join(sorted(owners))}: it may go back to its owner, or leave as an "
            f"aggregate, but not to {destination!r}"
        )


def charge_training(worker: WorkerRuntime, noise_multiplier: float, sample_rate: float,
                    steps: int) -> float:
    """Whether this worker's data may leave as a model trained by `steps` DP-SGD steps
    (`training.dp_train`) at `sample_rate` with `noise_multiplier`: only if its owner
    protects records, at no less than its least noise, within its budget. Charged
    here, before the first step runs; ε spent after it. (An owner that lets its data
    out only in secure aggregates keeps the model: `training.dp_train`.)"""
    policy = worker.privacy
    if policy.unit != "record":
        raise PrivateDataError(
            f"{worker.id!r} protects its data as a whole (privacy unit 'owner'): its data "
            "leaves only as an aggregate of several owners (tr.aggregate); DP-SGD protects "
            "records, which its owner accepts with unit = \"record\" in [worker.privacy]")
    if noise_multiplier < policy.noise_multiplier:
        raise PrivateDataError(
            f"{worker.id!r} accepts a noise multiplier of at least "
            f"{policy.noise_multiplier:g}, not {noise_multiplier:g}")
    try:
        return worker.budget.charge_steps(worker.id, sample_rate, noise_multiplier, steps)
    except BudgetSpent as e:
        raise PrivateDataError(str(e)) from None


def _only_secure(worker: WorkerRuntime, what: str) -> None:
    if worker.privacy.secure_aggregation:
        raise PrivateDataError(
            f"{worker.id!r}'s data leaves only in secure aggregates (secure_aggregation "
            f"in its [worker.privacy]): {what}; use tr.aggregate(..., secure=True)")


@handles(ChargePrivacy)
def charge_privacy(worker: WorkerRuntime, command: ChargePrivacy, sender: str) -> dict[str, Any]:
    if sender != worker.id and sender not in worker.privacy.trusted:
        raise PrivateDataError(
            f"worker {sender!r} is not trusted by {worker.id!r}: it cannot release "
            f"{worker.id!r}'s data"
        )
    _only_secure(worker, "an aggregator that sees its contribution cannot release it")
    if command.contributors < worker.privacy.k:
        raise PrivateDataError(
            f"{worker.id!r}'s data is released only in aggregates of at least "
            f"{worker.privacy.k} data owners; this one has {command.contributors}"
        )
    try:
        spent = worker.budget.charge(worker.id)
    except BudgetSpent as e:
        raise PrivateDataError(str(e)) from None
    return {**worker.privacy.public(), "epsilon_spent": spent}


@handles(Aggregate)
async def aggregate(worker: WorkerRuntime, command: Aggregate, sender: str) -> dict[str, Any]:
    contributions = [[worker.store.use(i, sender) for i in ids]
                     for ids in command.contributions]
    owners = [frozenset().union(*(worker.store.owners(e) for e in entries))
              for entries in contributions]
    plan = AggregationPlan.check(
        [[e.value for e in entries] for entries in contributions], owners,
        command.weights)
    policies: dict[str, dict[str, Any]] = {}
    for owner in plan.owners:  # each owner charges its own budget, or refuses
        charge = ChargePrivacy(len(contributions))
        policies[owner] = (charge_privacy(worker, charge, worker.id) if owner == worker.id
                           else await worker.ask(owner, charge))
    result, report = plan.release(policies)
    # An aggregate: no one's private data.
    worker.store.put(command.result_id, result, frozenset(), frozenset({sender}))
    for ids in command.contributions if plan.owners else ():
        for object_id in ids:  # spent: the same contribution is not released twice
            worker.store.discard(object_id)
    return report
