"""PointerTensor: a local stand-in for an object that lives on a worker.

Operators, tensor methods and `torch.*` functions applied to pointers run where
the data is and return new pointers; the caller picks the result's id, so
nothing has to come back (see `Fleet` for when errors surface). A pointer can
itself be sent on (a pointer to a pointer); operations then run at the end of
the chain and leave a result pointer at every hop.

Garbage collection: a pointer that owns its target deletes it when it dies.
Sending a pointer on, getting, or moving its target hands that duty over.
"""

from __future__ import annotations

from typing import Any

import torch

from torchrelay.broker import (
    Call,
    Fetch,
    ObjectRef,
    OperationRefused,
    PointerRef,
    Pull,
    Store,
    Transfer,
    format_pointer,
    is_inplace,
    resolve_op,
    wire_name,
)

from ._fleet import Fleet, WorkerHandle

__all__ = ["PointerTensor", "send"]


def send(value: Any, worker: WorkerHandle) -> PointerTensor:
    """Send a local tensor (or any value that can travel) to `worker`; return a pointer to it."""
    if isinstance(value, PointerTensor):
        return value.send(worker)
    fleet = worker.fleet
    id_at_location = fleet.new_id()
    fleet.post(worker.id, Store(id_at_location, value))
    return PointerTensor(worker, id_at_location)


class PointerTensor:
    """Points at the object stored under `id_at_location` on `location`."""

    __slots__ = ("__weakref__", "garbage_collect", "id", "id_at_location", "location")

    def __init__(
        self,
        location: WorkerHandle,
        id_at_location: int,
        *,
        id: int | None = None,
        garbage_collect: bool = True,
    ) -> None:
        self.location = location
        self.id_at_location = id_at_location
        self.id = location.fleet.new_id() if id is None else id
        self.garbage_collect = garbage_collect
        location.fleet.track(self)

    @property
    def fleet(self) -> Fleet:
        return self.location.fleet

    def __repr__(self) -> str:
        return format_pointer(self.fleet.name, self.id, self.location.id, self.id_at_location)

    def __del__(self) -> None:
        if self.garbage_collect:
            self.location.fleet.doom(self.location.id, self.id_at_location)

    # -- moving things around ------------------------------------------------------

    def get(self) -> Any:
        """Bring the target back (removing it from the worker); a pointer stays a pointer."""
        value = self.fleet.request(self.location.id, Fetch(self.id_at_location))
        self.garbage_collect = False
        if type(value) is PointerRef:
            location = self.fleet.worker(value.location)
            return PointerTensor(location, value.id_at_location, id=self.id_at_location)
        return value

    def send(self, worker: WorkerHandle) -> PointerTensor:
        """Send this pointer (not the data) to `worker`: a pointer to a pointer."""
        reference = PointerRef(self.location.id, self.id_at_location)
        self.fleet.post(worker.id, Store(self.id, reference))
        self.garbage_collect = False  # the copy on `worker` owns the target now
        return PointerTensor(worker, self.id)

    def move(self, worker: WorkerHandle) -> PointerTensor:
        """Move the target straight from its worker to `worker`; return the new pointer."""
        if worker.id == self.location.id:
            return self
        new_id = self.fleet.new_id()
        self.fleet.request(self.location.id, Transfer(self.id_at_location, worker.id, new_id))
        self.garbage_collect = False
        return PointerTensor(worker, new_id)

    def remote_get(self) -> PointerTensor:
        """Have the worker this points at pull the data its own pointer points at."""
        self.fleet.request(self.location.id, Pull(self.id_at_location))
        return self

    def remote_send(self, worker: WorkerHandle) -> PointerTensor:
        """Have the target sent on to `worker`; its old worker keeps a pointer to it."""
        transfer = Transfer(self.id_at_location, worker.id, self.fleet.new_id(), keep_pointer=True)
        self.fleet.request(self.location.id, transfer)
        return self

    # -- remote operations ---------------------------------------------------------

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        name = wire_name(func)
        if name is None:
            raise OperationRefused(f"{getattr(func, '__name__', func)!r} cannot run on pointers")
        return _remote_call(name, args, kwargs or {})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        attribute = f"Tensor@{name}"
        if _allowed(attribute):
            return _remote_call(attribute, (self,), {})
        method = f"Tensor.{name}"
        if _allowed(method):
            return _BoundRemoteMethod(method, self)
        raise AttributeError(
            f"'PointerTensor' has no attribute {name!r}: it is not an allow-listed tensor method"
        )

    @property
    def shape(self) -> torch.Size:
        """The target's shape (asks the worker)."""
        return torch.Size(_remote_call("Tensor@shape", (self,), {}).get())

    def __getitem__(self, key: Any) -> PointerTensor:
        return _remote_call("getitem", (self, key), {})

    def __setitem__(self, key: Any, value: Any) -> None:
        _remote_call("setitem", (self, key, value), {})

    def __bool__(self) -> bool:
        raise TypeError("a PointerTensor has no truth value here; .get() it first")

    def __len__(self) -> int:
        raise TypeError("a PointerTensor has no length here; use .shape or .get() it first")

    def __iter__(self) -> Any:
        raise TypeError("a PointerTensor cannot be iterated; index it instead (ptr[0])")

    __hash__ = object.__hash__

    def __add__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__add__", (self, other), {})

    def __radd__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__radd__", (self, other), {})

    def __iadd__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__iadd__", (self, other), {})

    def __sub__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__sub__", (self, other), {})

    def __rsub__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__rsub__", (self, other), {})

    def __isub__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__isub__", (self, other), {})

    def __mul__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__mul__", (self, other), {})

    def __rmul__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__rmul__", (self, other), {})

    def __imul__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__imul__", (self, other), {})

    def __truediv__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__truediv__", (self, other), {})

    def __rtruediv__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__rtruediv__", (self, other), {})

    def __itruediv__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__itruediv__", (self, other), {})

    def __floordiv__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__floordiv__", (self, other), {})

    def __rfloordiv__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__rfloordiv__", (self, other), {})

    def __mod__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__mod__", (self, other), {})

    def __pow__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__pow__", (self, other), {})

    def __rpow__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__rpow__", (self, other), {})

    def __matmul__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__matmul__", (self, other), {})

    def __rmatmul__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__rmatmul__", (self, other), {})

    def __neg__(self) -> PointerTensor:
        return _remote_call("Tensor.__neg__", (self,), {})

    def __pos__(self) -> PointerTensor:
        return _remote_call("Tensor.__pos__", (self,), {})

    def __abs__(self) -> PointerTensor:
        return _remote_call("Tensor.__abs__", (self,), {})

    def __invert__(self) -> PointerTensor:
        return _remote_call("Tensor.__invert__", (self,), {})

    def __and__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__and__", (self, other), {})

    def __or__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__or__", (self, other), {})

    def __xor__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__xor__", (self, other), {})

    def __eq__(self, other: object) -> PointerTensor:  # type: ignore[override]
        return _remote_call("Tensor.__eq__", (self, other), {})

    def __ne__(self, other: object) -> PointerTensor:  # type: ignore[override]
        return _remote_call("Tensor.__ne__", (self, other), {})

    def __lt__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__lt__", (self, other), {})

    def __le__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__le__", (self, other), {})

    def __gt__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__gt__", (self, other), {})

    def __ge__(self, other: Any) -> PointerTensor:
        return _remote_call("Tensor.__ge__", (self, other), {})


class _BoundRemoteMethod:
    """`pointer.sum` before it is called."""

    __slots__ = ("name", "pointer")

    def __init__(self, name: str, pointer: PointerTensor) -> None:
        self.name = name
        self.pointer = pointer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _remote_call(self.name, (self.pointer, *args), kwargs)

    def __repr__(self) -> str:
        return f"<remote method {self.name} of {self.pointer!r}>"


def _allowed(name: str) -> bool:
    try:
        resolve_op(name)
    except OperationRefused:
        return False
    return True


def _remote_call(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> PointerTensor:
    """Publish `op(*args, **kwargs)` to the worker the pointer arguments live on.

    Returns a pointer to the result, or for an in-place operation its target.
    """
    finder = _LocationFinder()
    wire_args = finder.replace(list(args))
    wire_kwargs = finder.replace(kwargs)
    first = finder.first
    if first is None:
        raise TypeError(f"{op} was given no PointerTensor")
    location = first.location
    result_id = None if is_inplace(op) else location.fleet.new_id()
    location.fleet.post(location.id, Call(op, wire_args, wire_kwargs, result_id))
    return first if result_id is None else PointerTensor(location, result_id)


class _LocationFinder:
    """Turns pointers in call arguments into `ObjectRef`s, checking they share a worker."""

    __slots__ = ("first",)

    def __init__(self) -> None:
        self.first: PointerTensor | None = None

    def replace(self, value: Any) -> Any:
        if isinstance(value, PointerTensor):
            if self.first is None:
                self.first = value
            elif value.location is not self.first.location:
                raise OperationRefused(
                    f"the arguments point to different workers ({self.first.location.id} and "
                    f"{value.location.id}); move them to one worker first"
                )
            return ObjectRef(value.id_at_location)
        if isinstance(value, list | tuple):
            replaced = [self.replace(v) for v in value]
            return replaced if isinstance(value, list) else tuple(replaced)
        if isinstance(value, dict):
            return {k: self.replace(v) for k, v in value.items()}
        return value
