"""A worker's objects: id -> value, each with its provenance.

Values are tensors, pointers to objects on other workers (`PointerRef`), and
whatever allow-listed operations return (tuples, scalars). Provenance is the set
of data owners an object derives from: the identity that stored it, unioned
through every operation that used it. It is what will let a data owner's worker
refuse to let anything but an aggregate leave.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from torchrelay.broker import ObjectNotFound, PointerRef, ProtocolError, format_pointer

__all__ = ["ObjectStore", "StoredObject"]


@dataclass(slots=True)
class StoredObject:
    value: Any
    provenance: frozenset[str] = frozenset()


class ObjectStore:
    """The objects of the worker named `owner`."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._objects: dict[int, StoredObject] = {}

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._objects

    def __iter__(self) -> Iterator[int]:
        return iter(self._objects)

    def put(self, object_id: int, value: Any, provenance: frozenset[str] = frozenset()) -> None:
        if object_id in self._objects:
            raise ProtocolError(f"id {object_id} is already in use on worker {self.owner!r}")
        self._objects[object_id] = StoredObject(value, provenance)

    def replace(self, object_id: int, value: Any, provenance: frozenset[str]) -> None:
        self._objects[object_id] = StoredObject(value, provenance)

    def get(self, object_id: int) -> StoredObject:
        try:
            return self._objects[object_id]
        except KeyError:
            raise ObjectNotFound(f"no object {object_id} on worker {self.owner!r}") from None

    def pop(self, object_id: int) -> StoredObject:
        entry = self.get(object_id)
        del self._objects[object_id]
        return entry

    def discard(self, object_id: int) -> StoredObject | None:
        return self._objects.pop(object_id, None)

    def discard_if(self, object_id: int, entry: StoredObject) -> bool:
        """Remove `object_id` if it still holds `entry`; whether it did."""
        if self._objects.get(object_id) is not entry:
            return False
        del self._objects[object_id]
        return True

    def describe(self) -> dict[int, str]:
        """`{id: short description}`: a tensor's repr, or a pointer's."""
        return {object_id: self.describe_one(object_id) for object_id in self._objects}

    def describe_one(self, object_id: int) -> str:
        value = self.get(object_id).value
        if type(value) is PointerRef:
            return format_pointer(self.owner, object_id, value.location, value.id_at_location)
        return repr(value)

    def tensor_bytes(self) -> int:
        """Bytes held by stored tensors (aliases counted once per id)."""
        return sum(
            entry.value.numel() * entry.value.element_size()
            for entry in self._objects.values()
            if isinstance(entry.value, torch.Tensor)
        )
