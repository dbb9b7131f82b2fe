"""A worker's objects: id -> value, each with its provenance, within a memory budget.

Values are tensors, pointers to objects on other workers (`PointerRef`), and
whatever allow-listed operations return (tuples, scalars). Provenance is the set
of data owners an object derives from: the identity that stored it, unioned
through every operation that used it. It is what will let a data owner's worker
refuse to let anything but an aggregate leave.

Each object also records who may use it (`holders`): the identity that made
it, and those it was handed to (a pointer sent on grants the next worker down
the chain its target). To anyone else it does not exist: `use` answers "no
object N", as for an id never stored, and `describe` leaves it out. Objects with
no holders (`EVERYONE`) are the worker's datasets, usable by every client.

The store counts the bytes its tensors hold, each storage once however many
objects view it, and what its other values take (a `tolist` result is a list of
Python numbers, about 56 bytes each), and refuses an object that would take it
past `max_bytes`.
`describe` shows every object in a bounded number of characters, whatever it
holds: one value that cannot be shown does not break the listing.
"""

from __future__ import annotations

import reprlib
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import torch

from torchrelay.broker import ObjectNotFound, PointerRef, ProtocolError, format_pointer

from ._datasets import Dataset
from ._limits import BudgetExceeded

__all__ = ["EVERYONE", "MAX_DELETED_EARLY", "ObjectStore", "StoredObject", "describe_private",
           "describe_value", "graph_leaves"]

MAX_DELETED_EARLY = 1 << 16
"""How many ids deleted before they existed a worker remembers (8 bytes and a dict
slot each): far more than can be in flight towards it at once."""

DESCRIPTION_CHARACTERS: Final = 400
"""At most this many characters describe one object in `_objects` or an error."""


EVERYONE: Final[frozenset[str]] = frozenset()
"""The holders of an object any participant may use (a worker's datasets)."""


@dataclass(slots=True)
class StoredObject:
    value: Any
    provenance: frozenset[str] = frozenset()
    holders: frozenset[str] = EVERYONE
    """Who may use it (`EVERYONE` when empty)."""

    def usable_by(self, identity: str) -> bool:
        holders = self.holders
        return not holders or identity in holders


class ObjectStore:
    """The objects of the worker named `owner`."""

    def __init__(self, owner: str, max_bytes: int | None = None) -> None:
        self.owner = owner
        self.max_bytes = max_bytes
        self.bytes = 0
        """Bytes held by the tensors of all objects, each storage counted once."""
        self._objects: dict[int, StoredObject] = {}
        self._storages: dict[int, list[int]] = {}  # storage identity -> [bytes, references]
        self._values: dict[int, int] = {}  # object id -> bytes of its Python objects
        self.owned: set[int] = set()
        """Objects the worker owns itself (its datasets): no client fetches, moves or
        deletes them."""
        self.taint: dict[int, frozenset[str]] = {}
        """Data owners (see `_privacy.py`) by storage identity: what a tensor sharing that
        memory derives from, whichever object it is reached through. Forgotten when the
        storage is freed."""
        self.deleted_early: dict[int, str] = {}
        """Ids deleted before anything was stored under them (a delete that overtook a
        late transfer, a given-up command), and by whom: what arrives for them later,
        for or from that participant, is dropped — not what arrives for another (a
        delete of an id one does not hold must not make another's store vanish). The
        most recent `MAX_DELETED_EARLY`, oldest first."""
        self.read_only: set[int] = set()
        """Storages (by identity) no operation may change in place: its datasets'."""

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._objects

    def __iter__(self) -> Iterator[int]:
        return iter(self._objects)

    def put(self, object_id: int, value: Any, provenance: frozenset[str],
            holders: frozenset[str], *, by: str | None = None) -> None:
        """Store `value` for `holders`; `by`: who asked (see `deleted_early`)."""
        if self.deleted_early:
            deleter = self.deleted_early.get(object_id)
            if deleter is not None and (deleter == by or deleter in holders):
                del self.deleted_early[object_id]
                return  # its holder let go of it before it arrived: it is garbage already
        if object_id in self._objects:
            raise ProtocolError(f"id {object_id} is already in use on worker {self.owner!r}")
        self._count_in(object_id, value)
        self._objects[object_id] = StoredObject(value, provenance, holders)

    # -- provenance: the private data owners an object derives from --------------------

    def owners(self, entry: StoredObject) -> frozenset[str]:
        """The data owners `entry`'s value derives from: its own record, and those of
        the memory its tensors share."""
        owners = entry.provenance
        taint = self.taint
        if not taint:
            return owners
        for tensor in _tensors_of(entry.value):
            found = taint.get(tensor.untyped_storage()._cdata)
            if found is not None and not found <= owners:
                owners = owners | found
        return owners

    def spread(self, tensors: Iterator[torch.Tensor] | list[torch.Tensor],
               owners: frozenset[str]) -> None:
        """Record that the memory of `tensors` now derives from `owners` too."""
        taint = self.taint
        for tensor in tensors:
            storage = tensor.untyped_storage()
            key = storage._cdata
            known = taint.get(key)
            if known is None:
                taint[key] = owners
                weakref.finalize(storage, taint.pop, key, None)  # freed: forgotten
            elif not owners <= known:
                taint[key] = known | owners

    def add_owners(self, object_id: int, owners: frozenset[str]) -> None:
        """`object_id` changed in place with data of `owners`."""
        entry = self._objects.get(object_id)
        if entry is not None and not owners <= entry.provenance:
            self._objects[object_id] = StoredObject(entry.value, entry.provenance | owners,
                                                    entry.holders)

    def delete_early(self, object_id: int, by: str) -> None:
        """Remember that `by` deleted `object_id` before it existed (see `deleted_early`)."""
        early = self.deleted_early
        early[object_id] = by
        if len(early) > MAX_DELETED_EARLY:
            del early[next(iter(early))]

    def delete_for(self, sender: str, ids: list[int],
                   missing: list[int] | None = None) -> dict[str, list[int]]:
        """Delete the objects of `ids` that `sender` holds; the targets of the pointers
        among them, by worker (to be deleted down their chains).

        Deleting twice is harmless: ids not found go to `missing`, and so do those of
        others (to `sender` they do not exist). The worker's own objects are no
        client's to collect."""
        targets: dict[str, list[int]] = {}
        for object_id in ids:
            if object_id in self.owned:
                continue
            present = self._objects.get(object_id)
            if present is not None and not present.usable_by(sender):
                if missing is not None:
                    missing.append(object_id)
                continue
            entry = self.discard(object_id)
            if entry is None:
                self.delete_early(object_id, sender)
                if missing is not None:
                    missing.append(object_id)
            elif type(entry.value) is PointerRef:
                targets.setdefault(entry.value.location, []).append(entry.value.id_at_location)
        return targets

    def replace(self, object_id: int, value: Any, provenance: frozenset[str],
                holders: frozenset[str]) -> None:
        old = self._objects.get(object_id)
        if old is not None:  # (what it held is replaced: counted out first)
            self._count_out(object_id, old.value)
        try:
            self._count_in(object_id, value)
        except BudgetExceeded:
            if old is not None:  # refused: it stays as it was
                self._count_in(object_id, old.value)
            raise
        self._objects[object_id] = StoredObject(value, provenance, holders)

    def get(self, object_id: int) -> StoredObject:
        """The object, whoever holds it: for the worker's own bookkeeping."""
        try:
            return self._objects[object_id]
        except KeyError:
            raise self._missing(object_id) from None

    def entries(self) -> Iterator[tuple[int, StoredObject]]:
        """Every object with its id; for the worker's own bookkeeping."""
        return iter(list(self._objects.items()))

    def objects_get(self, object_id: int) -> StoredObject | None:
        """The object, or None; for the worker's own bookkeeping (no mirror sees it)."""
        return self._objects.get(object_id)

    def use(self, object_id: int, identity: str) -> StoredObject:
        """The object, if `identity` may use it; else the error for a missing one."""
        entry = self.get(object_id)  # (a mirrored store notes that it may change)
        if not entry.usable_by(identity):
            raise self._missing(object_id)
        return entry

    def grant(self, object_id: int, identity: str) -> None:
        """Let `identity` use `object_id` too."""
        entry = self._objects[object_id]
        if entry.holders and identity not in entry.holders:
            entry.holders |= {identity}

    def _missing(self, object_id: int) -> ObjectNotFound:
        return ObjectNotFound(f"no object {object_id} on worker {self.owner!r}")

    def pop(self, object_id: int) -> StoredObject:
        entry = self.get(object_id)
        del self._objects[object_id]
        self._count_out(object_id, entry.value)
        return entry

    def discard(self, object_id: int) -> StoredObject | None:
        entry = self._objects.pop(object_id, None)
        if entry is not None:
            self._count_out(object_id, entry.value)
        return entry

    def discard_if(self, object_id: int, entry: StoredObject) -> bool:
        """Remove `object_id` if it still holds `entry`; whether it did."""
        if self._objects.get(object_id) is not entry:
            return False
        del self._objects[object_id]
        self._count_out(object_id, entry.value)
        return True

    def describe(self, identity: str) -> dict[int, str]:
        """`{id: short description}` of what `identity` may use: a tensor's repr, or a
        pointer's; bounded in size."""
        return {object_id: self.describe_one(object_id)
                for object_id, entry in self._objects.items() if entry.usable_by(identity)}

    def describe_one(self, object_id: int) -> str:
        entry = self.get(object_id)
        value = entry.value
        if type(value) is PointerRef:
            return format_pointer(self.owner, object_id, value.location, value.id_at_location)
        owners = self.owners(entry)
        if owners:  # what it is, never what it holds
            return describe_private(value, owners)
        return describe_value(value)

    def tensor_bytes(self) -> int:
        return self.bytes

    def counts(self, storage: Any) -> bool:
        """Whether `storage`'s bytes are counted in `bytes` already (a stored object
        views it)."""
        return storage._cdata in self._storages

    # -- memory accounting ------------------------------------------------------------

    def _count_in(self, object_id: int, value: Any) -> None:
        """Count the storages of `value` in; refuse it (counting nothing) past the budget."""
        if type(value) is not torch.Tensor and type(value) is not PointerRef:
            held = _python_bytes(value)
            if held:
                if self.max_bytes is not None and self.bytes + held > self.max_bytes:
                    self._refuse(object_id, held)
                self._values[object_id] = held
                self.bytes += held
                try:
                    self._count_storages_in(object_id, value)
                except BudgetExceeded:
                    self.bytes -= self._values.pop(object_id)
                    raise
                return
        self._count_storages_in(object_id, value)

    def _count_storages_in(self, object_id: int, value: Any) -> None:
        storages = self._storages
        if type(value) is torch.Tensor:  # the usual object: one tensor
            storage = value.untyped_storage()
            pointer = storage._cdata  # its identity: sharing its memory does not change it
            counted = storages.get(pointer)
            if counted is not None:
                counted[1] += 1
            elif pointer:
                size = storage.nbytes()
                if self.max_bytes is not None and self.bytes + size > self.max_bytes:
                    self._refuse(object_id, size)
                storages[pointer] = [size, 1]
                self.bytes += size
            return
        new: dict[int, int] = {}
        for tensor in _tensors_in(value):
            storage = tensor.untyped_storage()
            pointer = storage._cdata
            if pointer and pointer not in storages:
                new[pointer] = storage.nbytes()
        added = sum(new.values())
        if self.max_bytes is not None and added and self.bytes + added > self.max_bytes:
            self._refuse(object_id, added)
        for tensor in _tensors_in(value):
            pointer = tensor.untyped_storage()._cdata
            if pointer:
                if pointer in new:
                    storages[pointer] = [new.pop(pointer), 0]
                storages[pointer][1] += 1
        self.bytes += added

    def _refuse(self, object_id: int, size: int) -> None:
        raise BudgetExceeded(
            f"storing object {object_id} would take {_size(size)} more; worker "
            f"{self.owner!r} holds {_size(self.bytes)} of its max_bytes "
            f"{_size(self.max_bytes or 0)}. Delete objects (drop their pointers) first"
        )

    def _count_out(self, object_id: int, value: Any) -> None:
        held = self._values.pop(object_id, 0) if self._values else 0
        self.bytes -= held
        storages = self._storages
        tensors = (value,) if type(value) is torch.Tensor else _tensors_in(value)
        for tensor in tensors:
            pointer = tensor.untyped_storage()._cdata
            counted = storages.get(pointer)
            if counted is not None:
                counted[1] -= 1
                if not counted[1]:
                    del storages[pointer]
                    self.bytes -= counted[0]


def _tensors_of(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor `value` holds or changes: `_tensors_in`, and an optimizer's
    parameters and state (its momentum, its moments)."""
    if isinstance(value, torch.optim.Optimizer):
        for group in value.param_groups:
            yield from group["params"]
        for state in value.state.values():
            yield from (t for t in state.values() if isinstance(t, torch.Tensor))
        return
    yield from _tensors_in(value)


def _tensors_in(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif type(value) in (tuple, list) and depth < 8:
        for item in value:
            yield from _tensors_in(item, depth + 1)
    elif type(value) is Dataset:
        yield from value.tensors.values()


_NUMBER_BYTES: Final = 56
"""What one number of a Python list costs: its pointer, and the int or float object."""


def _python_bytes(value: Any, depth: int = 0) -> int:
    """Bytes held by the Python objects of a stored value (not its tensors' storages):
    the lists and numbers `tolist` builds, above all."""
    kind = type(value)
    if kind is list or kind is tuple:
        if depth > 32:
            return sys.getsizeof(value)
        total = sys.getsizeof(value)
        for item in value:
            item_kind = type(item)
            if item_kind is float or item_kind is int or item_kind is bool:
                total += _NUMBER_BYTES - 8
            elif item_kind is list or item_kind is tuple or item_kind is dict:
                total += _python_bytes(item, depth + 1)
        return total
    if kind is dict and depth <= 32:
        return sys.getsizeof(value) + sum(_python_bytes(v, depth + 1) for v in value.values())
    return 0


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 4
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = 8
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80


def describe_private(value: Any, owners: frozenset[str]) -> str:
    """What an object derived from private data shows: its kind, shape and dtype."""
    private = f"private to {', '.join(sorted(owners))}"
    if isinstance(value, torch.Tensor):
        return f"tensor {str(value.dtype)[6:]} {list(value.shape)}, {private}"
    if type(value) is Dataset:
        return f"{value!r}, {private}"
    return f"{type(value).__name__}, {private}"


def describe_value(value: Any) -> str:
    """A description of `value` in at most `DESCRIPTION_CHARACTERS`, whatever it is."""
    try:
        if isinstance(value, torch.Tensor):
            text = repr(value)  # torch summarises large tensors itself
        elif type(value) is Dataset:
            text = repr(value)
        elif isinstance(value, torch.optim.Optimizer):
            group = value.param_groups[0]
            settings = ", ".join(f"{k}={v}" for k, v in sorted(group.items())
                                 if k in ("lr", "momentum", "betas", "eps", "weight_decay",
                                          "nesterov", "amsgrad"))
            tensors = sum(len(g["params"]) for g in value.param_groups)
            text = f"<{type(value).__name__} over {tensors} tensors: {settings}>"
        else:
            text = _SHORT_REPR.repr(value)  # bounded in depth, items and length
    except Exception as e:  # a value whose repr fails must not break a listing
        return f"<a {type(value).__name__} that cannot be shown: {type(e).__name__}>"
    if len(text) > DESCRIPTION_CHARACTERS:
        text = text[: DESCRIPTION_CHARACTERS - 1] + "…"
    return text


def graph_leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors `tensor`'s autograd graph accumulates gradients into (what a
    `backward` through it changes)."""
    leaves: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [tensor.grad_fn] if tensor.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.append(variable)
        stack += [child for child, _ in node.next_functions if child is not None]
    return leaves
