"""Fleet commands: describe (a client's objects here), grant (share one with
another participant), status (what the worker says of itself)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchrelay.broker import (
    Describe,
    Grant,
    Status,
)

from ._registry import handles

if TYPE_CHECKING:
    from .._runtime import WorkerRuntime


@handles(Describe)
def describe(worker: WorkerRuntime, command: Describe, sender: str) -> dict[int, str]:
    return worker.store.describe(sender)


@handles(Grant)
def grant(worker: WorkerRuntime, command: Grant, sender: str) -> None:
    worker.store.use(command.id, sender)  # only one who may use it may share it
    worker.store.grant(command.id, command.to)


@handles(Status)
def status(worker: WorkerRuntime, command: Status, sender: str) -> dict[str, Any]:
    holders = worker.presence.by_holder()
    return {**worker.presence.figures(), "holders": holders}
