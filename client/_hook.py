"""`torchrelay.hook(torch)`: tensors and modules learn `.send(worker)`.

It adds `torch.Tensor.send`, `torch.nn.Module.send` and `torch.nn.Module.copy`
(a deep copy), and makes `torch.optim.SGD` and `torch.optim.Adam` build their
optimizer on the worker when given pointers. Calling it again changes nothing.
"""

from __future__ import annotations

import copy
from types import ModuleType
from typing import Any

from ._handles import WorkerHandle
from ._module import ModulePointer, send_module
from ._optim import hook_optimizers
from ._pointer import PointerTensor, send

__all__ = ["hook"]


def _tensor_send(self: Any, worker: WorkerHandle) -> PointerTensor:
    """Send this tensor to `worker` and return a pointer to it."""
    return send(self, worker)


def _module_send(self: Any, worker: WorkerHandle) -> ModulePointer:
    """Send this module's parameters and buffers to `worker`; a pointer to the module."""
    return send_module(self, worker)


def _module_copy(self: Any) -> Any:
    """A deep copy of this module (send it, and the original stays as it was)."""
    return copy.deepcopy(self)


def hook(torch_module: ModuleType) -> None:
    """Add `send` to tensors and modules, `copy` to modules, pointers to optimizers."""
    for cls, name, method in (
        (torch_module.Tensor, "send", _tensor_send),
        (torch_module.nn.Module, "send", _module_send),
        (torch_module.nn.Module, "copy", _module_copy),
    ):
        existing = getattr(cls, name, None)
        if existing is method:
            continue
        if existing is not None:
            raise RuntimeError(
                f"{cls.__name__}.{name} already exists ({existing!r}); not replacing it"
            )
        setattr(cls, name, method)
    hook_optimizers(torch_module.optim)
