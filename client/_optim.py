"""Optimizers whose state stays where the parameters are.

`tr.optim.SGD(params=model_ptr.parameters(), lr=0.1)` builds a `torch.optim.SGD`
on the parameters' worker (an allow-listed operation, its hyperparameters
checked there); `zero_grad()` and `step()` run there, and momentum and Adam's
moments never leave it. After `tr.hook(torch)`, `torch.optim.SGD` and
`torch.optim.Adam` given pointers do the same, and given tensors are torch's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torchrelay.broker import OperationRefused

from ._pointer import PointerTensor, remote_call

__all__ = ["SGD", "Adam", "RemoteOptimizer", "hook_optimizers"]


class RemoteOptimizer:
    """An optimizer on the worker of its parameters (all on one worker)."""

    kind = ""

    def __init__(self, params: Iterable[Any], **hyperparameters: Any) -> None:
        parameters = list(params)
        if not parameters or not all(isinstance(p, PointerTensor) for p in parameters):
            raise TypeError(f"{type(self).__name__} takes pointers to a model's parameters "
                            "(model_ptr.parameters())")
        locations = {p.location.id for p in parameters}
        if len(locations) > 1:
            raise OperationRefused(
                f"an optimizer's parameters must be on one worker, not on {sorted(locations)}: "
                "move the model to one worker first"
            )
        hyperparameters = {k: v for k, v in hyperparameters.items() if v is not None}
        self.pointer = remote_call(f"optim.{self.kind}", (parameters,), hyperparameters)

    def step(self) -> None:
        remote_call("Optimizer.step", (self.pointer,), {})

    def reset(self) -> None:
        """Forget the state (momentum, Adam's moments), as a new optimizer would start."""
        remote_call("Optimizer.reset", (self.pointer,), {})

    def zero_grad(self, set_to_none: bool = True) -> None:
        remote_call("Optimizer.zero_grad", (self.pointer,), {"set_to_none": set_to_none})

    def __repr__(self) -> str:
        return f"<{self.kind} on {self.pointer.location.id}: {self.pointer!r}>"


class SGD(RemoteOptimizer):
    kind = "SGD"

    def __init__(  # noqa: PLR0917 - torch.optim.SGD's own signature
        self, params: Iterable[Any], lr: float = 0.001, momentum: float = 0.0,
        dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov)


class Adam(RemoteOptimizer):
    kind = "Adam"

    def __init__(  # noqa: PLR0917 - torch.optim.Adam's own signature
        self, params: Iterable[Any], lr: float = 0.001,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0.0, amsgrad: bool = False,
    ) -> None:
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps,
                         weight_decay=weight_decay, amsgrad=amsgrad)


class _PointerAware(type):
    """A metaclass for torch's optimizer classes: given pointers, build on the worker."""

    remote: type[RemoteOptimizer]

    def __call__(cls, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        parameters = list(params) if params is not None else kwargs.pop("params")
        if parameters and all(isinstance(p, PointerTensor) for p in parameters):
            return cls.remote(parameters, *args, **kwargs)
        return super().__call__(parameters, *args, **kwargs)


def hook_optimizers(optim: Any) -> None:
    """Make `optim.SGD` and `optim.Adam` (torch's) build remote optimizers from pointers."""
    for name, remote in (("SGD", SGD), ("Adam", Adam)):
        original = getattr(optim, name)
        if isinstance(original, _PointerAware):
            continue
        hooked = _PointerAware(name, (original,), {"__module__": original.__module__,
                                                    "__doc__": original.__doc__})
        hooked.remote = remote
        setattr(optim, name, hooked)
