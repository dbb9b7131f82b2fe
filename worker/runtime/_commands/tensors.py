"""Tensors and calls: store, fetch, delete, call, meta.

A call runs here when its arguments are here (`execute`: the allow-list, the
argument and result checks, private data through `PrivateExecution`), or is
forwarded to the one worker its pointer arguments point at (`forward_call`).
`ArgumentResolver` turns the ids a command names into the objects they are,
and refuses mixing workers.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import torch

from torchrelay.broker import (
    MAX_HOPS,
    Call,
    Delete,
    Fetch,
    Meta,
    ObjectRef,
    OperationRefused,
    PointerRef,
    PrivateDataError,
    ProtocolError,
    Reply,
    Store,
    is_inplace,
    resolve_op,
    stamp,
)

from .._checks import check_arguments, check_result
from .._faults import FAULT_OPERATIONS
from .._faults import PREFIX as FAULT_PREFIX
from .._store import ObjectStore, StoredObject, graph_leaves
from ._registry import Encoded, handles
from .privacy import releasable

if TYPE_CHECKING:
    from .._runtime import WorkerRuntime


@handles(Store)
def store(worker: WorkerRuntime, command: Store, sender: str) -> None:
    value = command.value
    if type(value) is PointerRef and value.location == worker.id and (
        value.id_at_location == command.id
    ):
        raise ProtocolError(f"object {command.id} on worker {worker.id!r} cannot point at itself")
    check_result("store", value, worker.limits)
    # The owners a sending worker names are added to, never taken from: what a
    # client sends is its own, and carries no one's private data.
    provenance = frozenset(command.provenance)
    holders = _holders(command, sender)
    if not command.replaces_pointer:
        worker.store.put(command.id, command.value, provenance, holders, by=sender)
        return
    entry = worker.store.get(command.id)  # whoever holds it: the check is the pointer's
    value = entry.value
    if not (type(value) is PointerRef and value.location == sender):
        raise ProtocolError(
            f"object {command.id} on worker {worker.id!r} is not a pointer to {sender!r}; "
            "only the target of a pointer can replace it"
        )
    worker.store.replace(command.id, command.value, provenance, entry.holders | holders)


@handles(Fetch)
def fetch(worker: WorkerRuntime, command: Fetch, sender: str) -> Encoded:
    refuse_if_owned(worker, command.id, "fetched")
    entry = worker.store.use(command.id, sender)
    owners = worker.store.owners(entry)
    if owners and not releasable(worker, entry.value, owners):
        raise PrivateDataError(
            f"object {command.id} on worker {worker.id!r} derives from private data of "
            f"{', '.join(sorted(owners))}: it cannot be fetched. Private data leaves "
            "only as an aggregate of several owners' contributions, with noise: "
            "tr.aggregate(...) on a worker they trust"
        )
    frame = Reply(entry.value).encode()  # before removing: nothing is lost if it cannot travel
    # A pointer leaves with its duty to delete the target: no delete down the chain.
    worker.store.discard(command.id)
    return Encoded(frame)


@handles(Delete)
def delete(worker: WorkerRuntime, command: Delete, sender: str) -> Any:
    missing: list[int] = []
    targets = worker.store.delete_for(sender, command.ids, missing)
    if targets:
        return worker.then_delete(missing, targets)
    return missing


def resolve(worker: WorkerRuntime, name: str) -> Any:
    if worker.fault_injection and name.startswith(FAULT_PREFIX):
        fault = FAULT_OPERATIONS.get(name)
        if fault is not None:
            return fault
    return resolve_op(name)


@handles(Call)
def call(worker: WorkerRuntime, command: Call, sender: str) -> Any:
    op = resolve(worker, command.op)
    if "out" in command.kwargs:
        raise OperationRefused(
            f"{command.op} with out= is refused: results are new objects here (use the "
            "in-place method, such as add_, to change a tensor)"
        )
    fetched = command.result_id if command.fetch else None  # (`Call.fetch`)
    if command.fetch and fetched is None:
        raise ProtocolError(f"{command.describe()}: there is no result to fetch (result_id "
                            "is null)")
    resolver = ArgumentResolver(worker.store, sender)
    args = resolver.arguments(command.args)
    kwargs = resolver.resolve(command.kwargs) if command.kwargs else {}
    if resolver.location is None:
        owners = resolver.provenance
        stamp("worker.resolved")
        result = execute(worker, command, op, args=args, kwargs=kwargs, owners=owners)
        if command.result_id is not None:
            worker.store.put(command.result_id, result, owners, _holders(command, sender),
                             by=sender)
            stamp("worker.stored")
            if fetched is not None:  # stored first: a fetch refused leaves it, as a `fetch` does
                return fetch(worker, Fetch(fetched), sender)
        elif owners and command.args and type(command.args[0]) is ObjectRef:
            worker.store.add_owners(command.args[0].id, owners)  # changed in place
        return None
    forwarded = forward_call(worker, command, sender, resolver.location, args=args,
                             kwargs=kwargs)
    return forwarded if fetched is None else _then_fetch(worker, forwarded, fetched, sender)


async def _then_fetch(worker: WorkerRuntime, forwarded: Coroutine[Any, Any, None],
                      result_id: int, sender: str) -> Encoded:
    """A call forwarded down a chain, then its result (the pointer to it) fetched."""
    await forwarded
    return fetch(worker, Fetch(result_id), sender)


def execute(worker: WorkerRuntime, call: Call, op: Any, *, args: list[Any],
            kwargs: dict[str, Any], owners: frozenset[str] = frozenset()) -> Any:
    """Run one allow-listed operation on resolved arguments, with every check; with
    `owners` (its inputs derive from their private data), what it changes in place
    derives from them too, and its errors do not say what it saw."""
    if worker.lost_graphs and call.op == "Tensor.backward":
        lost = {a.id for a in call.args if type(a) is ObjectRef} & worker.lost_graphs
        if lost:
            raise OperationRefused(
                f"the autograd graph of object {min(lost)} was lost when worker "
                f"{worker.id!r} restarted after a crash; compute it again from its leaves"
            )
    if (worker.store.read_only and is_inplace(call.op) and args
            and isinstance(args[0], torch.Tensor)
            and args[0].untyped_storage()._cdata in worker.store.read_only):
        raise OperationRefused(
            f"{call.op} would change a dataset of worker {worker.id!r} in place: "
            "datasets are read-only (work on a copy, such as .clone())"
        )
    if not owners:
        check_arguments(call.op, args, kwargs, worker.limits)
        stamp("worker.checked")
        result = op(*args, **kwargs)
        stamp("worker.ran")
        check_result(call.op, result, worker.limits)
        return result
    touched = _changeable(call.op, args, kwargs)
    versions = [t._version for t in touched]
    try:
        # Whatever the values, the outcome shows only what shapes tell (_oblivious.py).
        result = worker.private_execution.run(call.op, op, args, kwargs, owners)
    finally:  # what it changed, even if it failed half-way
        changed = [t for t, v in zip(touched, versions, strict=True)
                   if t._version != v or call.op in _UPDATES_ITS_ARGUMENTS]
        if is_inplace(call.op) and args and isinstance(args[0], torch.Tensor):
            changed.append(args[0])  # its target, changed or not: the values decide
        worker.store.spread(changed, owners)
    if call.op == "Tensor.backward" and args and isinstance(args[0], torch.Tensor):
        worker.store.spread(graph_leaves(args[0]), owners)  # their gradients now
    return result


async def forward_call(worker: WorkerRuntime, command: Call, sender: str, location: str, *,
                       args: list[Any], kwargs: dict[str, Any]) -> None:
    """Every object argument is a pointer to `location`: the call runs there, its
    result usable by whom it is done for (so a pointer chain can be fetched from
    its end)."""
    _check_hops(command.hops, f"call {command.op}")
    remote_result = None if command.result_id is None else worker.new_id()
    holders = _holders(command, sender)
    forwarded = Call(command.op, args, kwargs, remote_result, command.hops + 1,
                     sorted(holders))
    if command.result_id is not None:
        # Stored before the answer, so later commands on it queue up behind this one.
        assert remote_result is not None
        worker.store.put(command.result_id, PointerRef(location, remote_result), frozenset(),
                       holders)
    try:
        await worker.ask(location, forwarded)
    except BaseException:
        if command.result_id is not None:
            worker.store.discard(command.result_id)
            # If the call does run there after all (we gave up waiting), its
            # result has no owner: have it deleted right behind it.
            assert remote_result is not None
            worker.tell(location, Delete([remote_result]))
        raise


@handles(Meta)
def meta(worker: WorkerRuntime, command: Meta, sender: str) -> Any:
    value = worker.store.use(command.id, sender).value
    if type(value) is PointerRef:
        return forward_meta(worker, value, command.hops)
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"object {command.id} on worker {worker.id!r} is a {type(value).__name__}, "
            "not a tensor: it has no shape or dtype"
        )
    return [value.dtype, list(value.shape), value.requires_grad]


async def forward_meta(worker: WorkerRuntime, pointer: PointerRef, hops: int) -> Any:
    _check_hops(hops, "meta")
    return await worker.ask(pointer.location, Meta(pointer.id_at_location, hops + 1))


def refuse_if_owned(worker: WorkerRuntime, object_id: int, what: str) -> None:
    if object_id in worker.store.owned:
        raise OperationRefused(
            f"object {object_id} is a dataset of worker {worker.id!r}: it is not {what}; use "
            "it where it is, through pointers"
        )


def _check_hops(hops: int, what: str) -> None:
    if hops >= MAX_HOPS:
        raise OperationRefused(
            f"{what} has been forwarded {hops} times: a pointer chain that long is a "
            "cycle of pointers with no data at its end"
        )


class ArgumentResolver:
    """Replaces `ObjectRef`s in call arguments by the stored values.

    Either every referenced object is local data, or every one is a pointer to
    the same other worker (then `location` names it and the refs are rewritten
    to that worker's ids, ready to forward).
    """

    __slots__ = ("_local", "_pointers", "location", "provenance", "scope", "sender", "store")

    def __init__(self, store: ObjectStore, sender: str,
                 scope: dict[int, Any] | None = None) -> None:
        self.store = store
        self.sender = sender
        self.scope = scope
        """A plan run's own values by id, looked up before the store's."""
        self.location: str | None = None
        self.provenance: frozenset[str] = frozenset()
        self._local = False
        self._pointers = False

    def arguments(self, args: list[Any]) -> list[Any]:
        """`resolve` of a call's argument list: the usual flat one without recursion."""
        resolved = []
        for value in args:
            kind = type(value)
            if kind is ObjectRef:
                resolved.append(self._object(value.id))
            elif kind is list or kind is tuple or kind is dict:
                resolved.append(self.resolve(value))
            else:
                resolved.append(value)
        return resolved

    def resolve(self, value: Any) -> Any:
        kind = type(value)
        if kind is ObjectRef:
            return self._object(value.id)
        if kind is list:
            return [self.resolve(v) for v in value]
        if kind is tuple:
            return tuple(self.resolve(v) for v in value)
        if kind is dict:
            return {k: self.resolve(v) for k, v in value.items()}
        return value

    def _object(self, object_id: int) -> Any:
        scope = self.scope
        if scope is not None and object_id in scope:
            return scope[object_id]
        return self._reference(self.store.use(object_id, self.sender))

    def _reference(self, entry: StoredObject) -> Any:
        value = entry.value
        if type(value) is PointerRef:
            if self._local or (self.location is not None and self.location != value.location):
                self._refuse_mix(value.location)
            self.location = value.location
            self._pointers = True
            return ObjectRef(value.id_at_location)
        if self._pointers:
            self._refuse_mix(None)
        self._local = True
        owners = self.store.owners(entry)
        if owners:
            self.provenance |= owners
        return value

    def _refuse_mix(self, location: str | None) -> None:
        where = sorted({self.location or "here", location or "here"})
        raise OperationRefused(
            f"the arguments live on different workers ({' and '.join(where)}) on worker "
            f"{self.store.owner!r}; move them to one worker first"
        )


_UPDATES_ITS_ARGUMENTS = frozenset({"F.batch_norm", "F.instance_norm"})
"""Operations that write into arguments without bumping their version (running statistics
updated inside the kernel): all their tensor arguments count as changed."""


def _holders(command: Store | Call, sender: str) -> frozenset[str]:
    """Who may use what `command` makes: its sender, and whom it names (the client a
    forwarded call or a move acts for)."""
    return frozenset(command.holders) | {sender}


def _changeable(op: str, args: list[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors an operation could change in place: its tensor arguments (an
    optimizer's parameters and state for its methods), to compare versions after."""
    if op.startswith("Optimizer.") and args and isinstance(args[0], torch.optim.Optimizer):
        optimizer = args[0]
        state = [t for s in optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor)]
        return [p for g in optimizer.param_groups for p in g["params"]] + state
    found: list[torch.Tensor] = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif type(value) in (list, tuple):
            found += [v for v in value if isinstance(v, torch.Tensor)]
    return found
