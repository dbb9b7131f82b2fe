"""Transfers and moves: `transfer` sends an object straight to another worker (a
move) and drops it here once the destination has stored it; `pull` brings a
pointer's target here. Undoing a transfer whose outcome is unknown is the
runtime's (`WorkerRuntime.unsend`), as recovery needs it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchrelay.broker import (
    BrokerError,
    PointerRef,
    ProtocolError,
    Pull,
    ReplyTimeout,
    Store,
    Transfer,
    UnknownWorker,
)

from ._registry import handles
from .privacy import may_move
from .tensors import refuse_if_owned

if TYPE_CHECKING:
    from .._runtime import WorkerRuntime


@handles(Transfer)
async def transfer(worker: WorkerRuntime, command: Transfer, sender: str) -> None:
    refuse_if_owned(worker, command.id, "moved")
    entry = worker.store.use(command.id, sender)
    owners = worker.store.owners(entry)
    if owners:
        may_move(worker, command.id, owners, command.destination)
    store = Store(command.destination_id, entry.value, sorted(owners),
                  command.replaces_pointer, sorted(entry.holders))
    try:
        await worker.ask(command.destination, store, confirm=True)
    except (UnknownWorker, ReplyTimeout, BrokerError):
        # Whether the destination stored it is unknown (it is gone, or silent): ours
        # stays, and a delete right behind the store in its queue makes sure no
        # second copy appears there when it comes back.
        worker.unsend(command)
        raise
    # The destination holds it now. Drop ours, unless a command replaced it meanwhile.
    if not worker.store.discard_if(command.id, entry):
        return
    if command.keep_pointer:
        worker.store.put(command.id, PointerRef(command.destination, command.destination_id),
                       frozenset(), entry.holders)


@handles(Pull)
async def pull(worker: WorkerRuntime, command: Pull, sender: str) -> None:
    entry = worker.store.use(command.id, sender)
    pointer = entry.value
    if type(pointer) is not PointerRef:
        raise ProtocolError(
            f"object {command.id} on worker {worker.id!r} is not a pointer; nothing to pull"
        )
    await worker.ask(
        pointer.location,
        Transfer(pointer.id_at_location, worker.id, command.id, replaces_pointer=True),
    )
