"""Checks of a command against the worker's `Limits`, before an operation runs and after.

Argument checks refuse the inputs on which particular allow-listed operations
crash the process or never return inside torch; each was found by the fuzz
campaign (`tests/test_fuzz.py`) and is kept there as a regression test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import torch

from torchrelay.broker import OperationRefused

from ._limits import BudgetExceeded, Limits

__all__ = ["check_arguments", "check_result"]


def check_result(op: str, value: Any, limits: Limits) -> None:
    """Refuse a result holding a tensor of more than `max_elements` elements."""
    if isinstance(value, torch.Tensor):
        if value.numel() > limits.max_elements:
            raise BudgetExceeded(
                f"{op} would make a tensor of {value.numel():,} elements "
                f"({_shape(value)}); this worker's max_elements is {limits.max_elements:,}"
            )
    elif type(value) in (tuple, list):
        for item in value:
            check_result(op, item, limits)


def check_arguments(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    """Refuse arguments on which `op` is known to crash, never return, or explode."""
    check = _CHECKS.get(op)
    if check is not None:
        check(op, args, kwargs, limits)


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(str(d) for d in tensor.shape) or "a scalar"


def _tensors(args: list[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    found = [a for a in args if isinstance(a, torch.Tensor)]
    found += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return found


def _list_size(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if tensor is not None and tensor.numel() > limits.max_list_elements:
        raise BudgetExceeded(
            f"{op} of a tensor of {tensor.numel():,} elements would build that many Python "
            f"objects; this worker's max_list_elements is {limits.max_list_elements:,}. "
            "Fetch the tensor itself with .get() instead"
        )


def _finite_input(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    for tensor in _tensors(args, kwargs):
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(
            torch.isfinite(tensor).all()
        ):
            raise OperationRefused(
                f"{op} of a tensor with NaN or infinite entries is refused: torch crashes "
                "or never returns on such input (replace them first, e.g. with nan_to_num)"
            )


def _pooling_sizes(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if tensor is None:
        return
    bound = 2 * max(tensor.shape, default=0) + 2
    sizes = [*args[1:], *kwargs.values()]
    for size in sizes:
        for value in size if isinstance(size, tuple | list) else (size,):
            if type(value) is int and not -bound <= value <= bound:
                raise OperationRefused(
                    f"{op} with a kernel, stride, padding or dilation of {value} for an input "
                    f"of shape {_shape(tensor)} is refused: sizes past the input's make torch "
                    "loop without end"
                )


_Check = Callable[[str, list[Any], dict[str, Any], Limits], None]

_POOLING: Final = (
    "F.max_pool1d", "F.max_pool2d", "F.max_pool3d", "F.max_pool1d_with_indices",
    "F.max_pool2d_with_indices", "F.max_pool3d_with_indices", "F.avg_pool1d", "F.avg_pool2d",
    "F.avg_pool3d", "F.lp_pool1d", "F.lp_pool2d", "F.lp_pool3d",
)

_CHECKS: Final[dict[str, _Check]] = {
    "Tensor.tolist": _list_size,
    "linalg.eigvals": _finite_input,
    "linalg.eig": _finite_input,
    "torch.binomial": _finite_input,
    **dict.fromkeys(_POOLING, _pooling_sizes),
}
"""Per operation: a check of its arguments. Completed from the fuzz campaign's findings."""
