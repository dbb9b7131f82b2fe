"""ModulePointer: a model whose parameters and buffers live on a worker.

`module.send(worker)` sends every parameter and buffer of a `torch.nn.Module`
and keeps here a *shadow* of the module: the same structure and the same code,
its tensors replaced by pointers. Calling the pointer runs the module's forward
here, on those pointers, so each operation of it runs on the worker, where the
parameters are — exactly what PySyft did. A custom `nn.Module` written in the
client script works as a built-in one does, and the worker never imports,
unpickles or evaluates any of the client's code: all it ever receives are
allow-listed operations, each checked like any other (one the worker refuses
fails the forward with that refusal). Operations travel in batches, so a whole
forward, loss, backward and optimizer step is one message.

Attributes give pointers (`m.weight`, `m.weight.grad`, `m[0]` of a
`Sequential`); `parameters()`, `state_dict()`, `train()` and `eval()` work as
on the module. `get()` brings a real module back; `move(w)` moves every tensor
straight to `w` and updates this pointer (it returns itself); `send(w)` makes a
pointer to the pointers; `copy()` copies the tensors on the worker.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from torchrelay.broker import Fetch, OperationRefused, PointerRef, Transfer

from ._handles import WorkerHandle
from ._pointer import PointerTensor, send

__all__ = ["ModulePointer", "send_module"]


def send_module(module: nn.Module, worker: WorkerHandle) -> ModulePointer:
    """Send `module`'s parameters and buffers to `worker`; a pointer to the module."""
    return ModulePointer(_shadow(module, lambda tensor: send(tensor, worker)))


def _tensors(module: nn.Module) -> Iterator[tuple[bool, dict[str, Any], str, Any]]:
    """(a parameter?, the dict it is in, name, value) of every parameter and buffer,
    submodules included."""
    for submodule in module.modules():
        for is_parameter, table in ((True, submodule._parameters), (False, submodule._buffers)):
            for name, value in table.items():
                if value is not None:
                    yield is_parameter, table, name, value


def _shadow(module: nn.Module, convert: Callable[[Any], Any]) -> nn.Module:
    """A copy of `module` whose parameters and buffers are `convert(tensor)`; a tensor
    shared between submodules (tied weights) is converted once."""
    originals = {id(value): value for _, _, _, value in _tensors(module)}
    # The tensors themselves are not copied: the memo hands them over as they are.
    shadow = copy.deepcopy(module, memo=dict(originals))
    converted: dict[int, Any] = {}
    for _, table, name, value in _tensors(shadow):
        if id(value) not in converted:
            converted[id(value)] = convert(value)
        table[name] = converted[id(value)]
    return shadow


class ModulePointer:
    """A module whose tensors live on a worker (see the module docstring)."""

    __slots__ = ("_module",)
    _module: nn.Module

    def __init__(self, shadow: nn.Module) -> None:
        object.__setattr__(self, "_module", shadow)

    # -- running it -----------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._module(*args, **kwargs)

    def train(self, mode: bool = True) -> ModulePointer:
        self._module.train(mode)
        return self

    def eval(self) -> ModulePointer:
        return self.train(False)

    # -- looking inside ---------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._module, name)
        return ModulePointer(value) if isinstance(value, nn.Module) else value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._module, name, value._module if isinstance(value, ModulePointer) else value)

    def __getitem__(self, index: Any) -> Any:
        value = self._module[index]  # type: ignore[index]
        return ModulePointer(value) if isinstance(value, nn.Module) else value

    def __len__(self) -> int:
        return len(self._module)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for value in self._module:  # type: ignore[attr-defined]
            yield ModulePointer(value) if isinstance(value, nn.Module) else value

    @property
    def location(self) -> WorkerHandle:
        """The worker its tensors are on (the first's, if they are on several)."""
        for _, _, _, pointer in _tensors(self._module):
            location: WorkerHandle = pointer.location
            return location
        raise OperationRefused("this module has no parameters or buffers: it is nowhere")

    def pointers(self) -> list[PointerTensor]:
        """Every parameter and buffer, each once."""
        seen: dict[int, PointerTensor] = {}
        for _, _, _, pointer in _tensors(self._module):
            seen.setdefault(id(pointer), pointer)
        return list(seen.values())

    def __repr__(self) -> str:
        where = {p.location.id for p in self.pointers()}
        return (f"[ModulePointer | {type(self._module).__name__} -> "
                f"{', '.join(sorted(where)) or 'nowhere'}]")

    # -- moving it around ---------------------------------------------------------------

    def get(self) -> nn.Module | ModulePointer:
        """Bring the module back: a real one, its tensors fetched (and removed remotely).
        Of a pointer chain (`model.send(bob).send(alice)`), one hop nearer the data, as
        a tensor's `get` is: a pointer to the module on the next worker, whose own
        `get` brings it back."""
        pointers = self.pointers()
        if not pointers:
            return copy.deepcopy(self._module)
        fleet = pointers[0].fleet
        values = fleet.request_many([(p.location.id, Fetch(p.id_at_location)) for p in pointers])
        fetched: dict[int, Any] = {}
        for pointer, value in zip(pointers, values, strict=True):
            pointer.garbage_collect = False
            fetched[id(pointer)] = value
            if type(value) is PointerRef:  # a pointer to pointers: one hop nearer the data
                fetched[id(pointer)] = PointerTensor(
                    fleet.worker(value.location), value.id_at_location,
                    id=pointer.id_at_location, chain=True,
                )
        module = copy.deepcopy(self._module, memo={id(p): p for p in pointers})
        for is_parameter, table, name, pointer in _tensors(module):
            value = fetched[id(pointer)]
            if is_parameter and isinstance(value, torch.Tensor):
                value = nn.Parameter(value.detach(), requires_grad=value.requires_grad)
            table[name] = value
        if any(isinstance(value, PointerTensor) for _, _, _, value in _tensors(module)):
            return ModulePointer(module)
        return module

    def move(self, worker: WorkerHandle) -> ModulePointer:
        """Move every tensor straight to `worker` (not through here); this pointer follows
        them, and is returned."""
        pointers = [p for p in self.pointers() if p.location.id != worker.id]
        if not pointers:
            return self
        fleet = pointers[0].fleet
        new_ids = [fleet.new_id() for _ in pointers]
        fleet.request_many([
            (p.location.id, Transfer(p.id_at_location, worker.id, new_id))
            for p, new_id in zip(pointers, new_ids, strict=True)
        ])
        moved = {}
        for pointer, new_id in zip(pointers, new_ids, strict=True):
            pointer.garbage_collect = False
            there = moved[id(pointer)] = PointerTensor(worker, new_id, chain=pointer.chain)
            there._meta, there._meta_epoch = pointer._meta, pointer._meta_epoch
        for _, table, name, pointer in _tensors(self._module):
            if id(pointer) in moved:
                table[name] = moved[id(pointer)]
        return self

    def send(self, worker: WorkerHandle) -> ModulePointer:
        """A pointer to this one, kept on `worker`: its tensors are pointers to ours."""
        return ModulePointer(_shadow(self._module, lambda pointer: pointer.send(worker)))

    def copy(self) -> ModulePointer:
        """A copy made on the worker: parameters cloned as new leaves, buffers cloned."""
        parameters = {id(p) for p in self._module.parameters()}

        def clone(pointer: PointerTensor) -> PointerTensor:
            copied: PointerTensor = pointer.clone()
            if id(pointer) in parameters:
                copied = copied.detach().requires_grad_(True)
            return copied

        return ModulePointer(_shadow(self._module, clone))
