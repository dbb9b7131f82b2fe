"""`torchrelay.hook(torch)`: give local tensors a `.send(worker)` method."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ._fleet import WorkerHandle
from ._pointer import PointerTensor, send

__all__ = ["hook"]


def _tensor_send(self: Any, worker: WorkerHandle) -> PointerTensor:
    """Send this tensor to `worker` and return a pointer to it."""
    return send(self, worker)


def hook(torch_module: ModuleType) -> None:
    """Add `torch.Tensor.send`. Calling it again changes nothing."""
    tensor_class = torch_module.Tensor
    existing = getattr(tensor_class, "send", None)
    if existing is _tensor_send:
        return
    if existing is not None:
        raise RuntimeError(f"torch.Tensor.send already exists ({existing!r}); not replacing it")
    tensor_class.send = _tensor_send
