"""PointerTensor: a local stand-in for an object that lives on a worker.

Operators, tensor methods and `torch.*` functions applied to pointers run where
the data is and return new pointers; the caller picks the result's id, so
nothing has to come back (see `Fleet` for when errors surface). A pointer can
itself be sent on (a pointer to a pointer); operations then run at the end of
the chain and leave a result pointer at every hop.

The operator methods are generated from the worker's allow-list, in their
plain, reflected and in-place forms: `1 & p`, `p %= 2` and `p <<= 1` do on the
worker what they do on a local tensor, and an in-place form returns the same
pointer. Metadata (`shape`, `dtype`, `ndim`, `requires_grad`, `device`) answers
with local values, fetched once and cached until an operation that can change
it runs.

Garbage collection: a pointer that owns its target deletes it when it dies.
Sending a pointer on, getting, or moving its target hands that duty over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import torch

from torchrelay.broker import (
    Call,
    Describe,
    Grant,
    Meta,
    ObjectRef,
    OperationRefused,
    PointerRef,
    Pull,
    RemoteError,
    Store,
    TorchRelayError,
    Transfer,
    UnknownWorker,
    format_pointer,
    is_inplace,
    resolve_op,
    stamp,
    wire_name,
)
from torchrelay.broker._allowlist import TENSOR_METHODS

if TYPE_CHECKING:  # (the session imports pointers, not the other way round)
    from ._handles import WorkerHandle
    from ._session import Fleet

__all__ = ["OPERATORS", "PointerTensor", "remote_call", "send"]

log = logging.getLogger("torchrelay.client")

_UNSETTLED: Final = frozenset({"UnknownWorker", "ReplyTimeout", "BrokerError", "ConnectionLost",
                               "BrokerUnavailable"})
"""How a source's wait on a move's destination can fail with the outcome unknown."""

OPERATORS: Final = tuple(sorted(
    name for name in TENSOR_METHODS
    if name.startswith("__") and name.endswith("__") and name not in ("__getitem__", "__setitem__")
))
"""The Python operators a pointer supports: every one the allow-list permits."""

_METADATA_CHANGING: Final = frozenset({
    "t_", "transpose_", "squeeze_", "unsqueeze_", "swapaxes_", "swapdims_",
    "requires_grad_", "detach_",
})
"""In-place operations that change a tensor's shape or `requires_grad`: any pointer's
cached metadata may be stale after one (another pointer may reach the same tensor)."""


def send(value: Any, worker: WorkerHandle) -> PointerTensor:
    """Send a local tensor (or any value that can travel) to `worker`; return a pointer to it."""
    if isinstance(value, PointerTensor):
        return value.send(worker)
    fleet = worker.fleet
    id_at_location = fleet.new_id()
    fleet.post(worker.id, Store(id_at_location, value))
    pointer = PointerTensor(worker, id_at_location)
    if isinstance(value, torch.Tensor):  # what it is, known without asking
        pointer._meta = (value.dtype, value.shape, value.requires_grad)
        pointer._meta_epoch = fleet.meta_epoch
    return pointer


class PointerTensor:
    """Points at the object stored under `id_at_location` on `location`.

    `chain` is whether the target may itself be a pointer (to a worker further
    down a chain): operations on it are forwarded, and the client then waits for
    them before a call that must see their effect.
    """

    __slots__ = (
        "__weakref__", "_meta", "_meta_epoch", "chain", "garbage_collect", "id",
        "id_at_location", "location",
    )

    def __init__(
        self,
        location: WorkerHandle,
        id_at_location: int,
        *,
        id: int | None = None,
        garbage_collect: bool = True,
        chain: bool = False,
    ) -> None:
        self.location = location
        self.id_at_location = id_at_location
        self.id = location.fleet.new_id() if id is None else id
        self.garbage_collect = garbage_collect
        self.chain = chain
        self._meta: tuple[torch.dtype, torch.Size, bool] | None = None
        self._meta_epoch = -1
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
        value = self.fleet.fetch(self.location.id, self.id_at_location)
        self.garbage_collect = False
        if type(value) is PointerRef:
            location = self.fleet.worker(value.location)
            return PointerTensor(location, value.id_at_location, id=self.id_at_location,
                                 chain=True)
        return value

    def send(self, worker: WorkerHandle) -> PointerTensor:
        """Send this pointer (not the data) to `worker`: a pointer to a pointer."""
        reference = PointerRef(self.location.id, self.id_at_location)
        # Its target is ours: `worker` may use it now, to work through the chain.
        self.fleet.post(self.location.id, Grant(self.id_at_location, worker.id))
        self.fleet.post(worker.id, Store(self.id, reference))
        self.garbage_collect = False  # the copy on `worker` owns the target now
        return PointerTensor(worker, self.id, chain=True)

    def move(self, worker: WorkerHandle) -> PointerTensor:
        """Move the target straight from its worker to `worker`; return the new pointer."""
        return self._move(worker, wait=True)

    def move_later(self, worker: WorkerHandle) -> PointerTensor:
        """`move` without waiting: the transfer is published with the next wait, and
        anything sent to `worker` afterwards waits until it has landed there."""
        return self._move(worker, wait=False)

    def _move(self, worker: WorkerHandle, *, wait: bool) -> PointerTensor:
        if worker.id == self.location.id:
            return self
        new_id = self.fleet.new_id()
        transfer = Transfer(self.id_at_location, worker.id, new_id)
        if wait:
            try:
                self.fleet.request(self.location.id, transfer)
            except UnknownWorker as e:
                if e.worker_id != self.location.id:
                    raise
                self._settle_move(worker, new_id, e)
            except RemoteError as e:
                kind = e.remote_type.rsplit(".", 1)[-1]
                if kind == "ObjectNotFound" and not e.origin:
                    # A daemon that died after sending its copy, and was started again at
                    # once, gets the move again (it was not acknowledged) and has no object.
                    self._settle_move(worker, new_id, e)
                else:
                    if kind in _UNSETTLED:
                        # The source gave up on the destination: it keeps its object, and
                        # had the copy that may land there deleted behind it.
                        e.add_note(f"object {self.id_at_location} is still on worker "
                                   f"{self.location.id!r}; its pointer is valid")
                    raise
        else:
            self.fleet.post(self.location.id, transfer)
        self.garbage_collect = False
        moved = PointerTensor(worker, new_id, chain=self.chain)
        moved._meta, moved._meta_epoch = self._meta, self._meta_epoch  # the same tensor
        return moved

    def _settle_move(self, destination: WorkerHandle, new_id: int,
                     error: TorchRelayError) -> None:
        """The source's daemon is gone, or was replaced (`error`), and a daemon takes its
        objects with it: whether it had sent this one is for the destination to say (its
        copy would be in the destination's queue ahead of the question). There: the move
        stands, and the new pointer is valid. Not there: raise `error`, saying so."""
        source = self.location.id
        try:
            there = {int(i) for i in self.fleet.request(destination.id, Describe())}
        except TorchRelayError as probe:
            error.add_note(f"whether object {self.id_at_location} reached worker "
                           f"{destination.id!r} could not be asked: {probe}")
            raise error from None
        if new_id not in there:
            error.add_note(f"object {self.id_at_location} did not reach worker "
                           f"{destination.id!r}: if the daemon of {source!r} died, it is "
                           "lost with it")
            raise error
        log.warning("worker %s is gone or was restarted, but it had moved object %d to %s: "
                    "the move stands", source, self.id_at_location, destination.id)

    def remote_get(self) -> PointerTensor:
        """Have the worker this points at pull the data its own pointer points at."""
        self.fleet.request(self.location.id, Pull(self.id_at_location))
        self.chain = True  # what was pulled may itself be a pointer
        return self

    def remote_send(self, worker: WorkerHandle) -> PointerTensor:
        """Have the target sent on to `worker`; its old worker keeps a pointer to it."""
        transfer = Transfer(self.id_at_location, worker.id, self.fleet.new_id(), keep_pointer=True)
        self.fleet.request(self.location.id, transfer)
        self.chain = True
        return self

    # -- metadata, answered locally ------------------------------------------------

    def _metadata(self) -> tuple[torch.dtype, torch.Size, bool]:
        fleet = self.fleet
        if fleet.capture is not None:  # what is computed from it is fixed in the plan
            fleet.capture.looked_at_shapes = True
        if self._meta is None or self._meta_epoch != fleet.meta_epoch:
            dtype, shape, requires_grad = fleet.request(self.location.id,
                                                        Meta(self.id_at_location))
            self._meta = (dtype, torch.Size(shape), requires_grad)
            self._meta_epoch = fleet.meta_epoch
        return self._meta

    @property
    def dtype(self) -> torch.dtype:
        return self._metadata()[0]

    @property
    def shape(self) -> torch.Size:
        return self._metadata()[1]

    @property
    def ndim(self) -> int:
        return len(self._metadata()[1])

    @property
    def requires_grad(self) -> bool:
        return self._metadata()[2]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # workers compute on the CPU: `to` and `cpu` stay there

    def size(self, dim: int | None = None) -> Any:
        shape = self.shape
        return shape if dim is None else shape[dim]

    def dim(self) -> int:
        return self.ndim

    ndimension = dim

    def numel(self) -> int:
        return self.shape.numel()

    nelement = numel

    def element_size(self) -> int:
        return self.dtype.itemsize

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def is_complex(self) -> bool:
        return self.dtype.is_complex

    def __len__(self) -> int:
        shape = self.shape
        if not shape:
            raise TypeError("len() of a 0-d tensor")
        return shape[0]

    def __iter__(self) -> Iterator[PointerTensor]:
        return (self[i] for i in range(len(self)))

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
        return remote_call(name, args, kwargs or {})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        attribute = f"Tensor@{name}"
        if _allowed(attribute):
            return remote_call(attribute, (self,), {})
        method = f"Tensor.{name}"
        if _allowed(method):
            return _BoundRemoteMethod(method, self)
        raise AttributeError(
            f"'PointerTensor' has no attribute {name!r}: it is not an allow-listed tensor method"
        )

    def __getitem__(self, key: Any) -> PointerTensor:
        return remote_call("getitem", (self, key), {})

    def __setitem__(self, key: Any, value: Any) -> None:
        remote_call("setitem", (self, key, value), {})

    def __bool__(self) -> bool:
        raise TypeError("a PointerTensor has no truth value here; .get() it first")

    __hash__ = object.__hash__

    if TYPE_CHECKING:  # the generated operators, as mypy sees them (a test checks the list)
        def _unary(self) -> PointerTensor: ...
        def _binary(self, other: Any) -> PointerTensor: ...
        def _comparison(self, other: object) -> PointerTensor: ...

        __abs__ = __invert__ = __neg__ = __pos__ = _unary
        __add__ = __radd__ = __iadd__ = __sub__ = __rsub__ = __isub__ = _binary
        __mul__ = __rmul__ = __imul__ = __matmul__ = __rmatmul__ = _binary
        __truediv__ = __rtruediv__ = __itruediv__ = _binary
        __floordiv__ = __rfloordiv__ = __ifloordiv__ = _binary
        __mod__ = __rmod__ = __imod__ = __pow__ = __rpow__ = __ipow__ = _binary
        __and__ = __rand__ = __iand__ = __or__ = __ror__ = __ior__ = _binary
        __xor__ = __rxor__ = __ixor__ = _binary
        __lshift__ = __rlshift__ = __ilshift__ = __rshift__ = __rrshift__ = __irshift__ = _binary
        __lt__ = __le__ = __gt__ = __ge__ = _binary
        __eq__ = __ne__ = _comparison  # type: ignore[assignment]


def _operator(name: str) -> Callable[..., PointerTensor]:
    wire = f"Tensor.{name}"

    def operator(self: PointerTensor, *args: Any) -> PointerTensor:
        return remote_call(wire, (self, *args), {})

    operator.__name__ = name
    operator.__qualname__ = f"PointerTensor.{name}"
    operator.__doc__ = f"`{name}` of the target, run on its worker."
    return operator


for _name in OPERATORS:
    setattr(PointerTensor, _name, _operator(_name))


class _BoundRemoteMethod:
    """`pointer.sum` before it is called."""

    __slots__ = ("name", "pointer")

    def __init__(self, name: str, pointer: PointerTensor) -> None:
        self.name = name
        self.pointer = pointer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return remote_call(self.name, (self.pointer, *args), kwargs)

    def __repr__(self) -> str:
        return f"<remote method {self.name} of {self.pointer!r}>"


def _allowed(name: str) -> bool:
    try:
        resolve_op(name)
    except OperationRefused:
        return False
    return True


def remote_call(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> PointerTensor:
    """Post `op(*args, **kwargs)` to the worker the pointer arguments live on.

    Returns a pointer to the result, or for an in-place operation its target.
    """
    stamp("client.call")
    finder = _LocationFinder()
    wire_args = [
        # The usual arguments (pointers and numbers) without a recursive call each.
        finder.pointer(arg) if type(arg) is PointerTensor
        else arg if type(arg) in _PLAIN
        else finder.replace(arg)
        for arg in args
    ]
    wire_kwargs = finder.replace(kwargs) if kwargs else kwargs
    first = finder.first
    if first is None:
        raise TypeError(f"{op} was given no PointerTensor")
    location = first.location
    fleet = location.fleet
    inplace = is_inplace(op)
    if inplace and op.rpartition(".")[2] in _METADATA_CHANGING:
        fleet.meta_epoch += 1
    result_id = None if inplace else fleet.new_id()
    fleet.post(location.id, Call(op, wire_args, wire_kwargs, result_id), settles=not finder.chain)
    if result_id is None:
        return first
    return PointerTensor(location, result_id, chain=finder.chain)


_PLAIN: Final = frozenset({int, float, bool, str, type(None)})


class _LocationFinder:
    """Turns pointers in call arguments into `ObjectRef`s, checking they share a worker."""

    __slots__ = ("chain", "first")

    def __init__(self) -> None:
        self.first: PointerTensor | None = None
        self.chain = False

    def pointer(self, value: PointerTensor) -> ObjectRef:
        if self.first is None:
            self.first = value
        elif value.location is not self.first.location:
            raise OperationRefused(
                f"the arguments point to different workers ({self.first.location.id} and "
                f"{value.location.id}); move them to one worker first"
            )
        self.chain = self.chain or value.chain
        return ObjectRef(value.id_at_location)

    def replace(self, value: Any) -> Any:
        if isinstance(value, PointerTensor):
            return self.pointer(value)
        if isinstance(value, list | tuple):
            replaced = [self.replace(v) for v in value]
            return replaced if isinstance(value, list) else tuple(replaced)
        if isinstance(value, dict):
            return {k: self.replace(v) for k, v in value.items()}
        return value
