"""Checks of a command against the worker's `Limits`, before an operation runs and after.

Argument checks refuse the inputs on which particular allow-listed operations
crash the process or never return inside torch; each was found by the fuzz
campaign (`tests/test_fuzz.py`) and is kept there as a regression test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import torch

from torchrelay.broker import OperationRefused, resolve_op

from ._limits import BudgetExceeded, Limits

__all__ = ["check_arguments", "check_result", "check_shapes", "check_values"]


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
    """Refuse arguments on which `op` is known to crash, never return, or explode:
    `check_shapes`, then `check_values` (one lookup of `op`'s checks: this runs for
    every operation of every plan)."""
    check = _CHECKS.get(op)
    reads_values = check is not None and check in _READ_VALUES
    if check is not None and not reads_values:
        check(op, args, kwargs, limits)
    if _has_large_number(args) or (kwargs and _has_large_number(kwargs.values())):
        _estimate_result(op, args, kwargs, limits)
    if reads_values:
        assert check is not None
        check(op, args, kwargs, limits)


def check_shapes(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    """The checks that read only shapes, dtypes and numbers among the arguments, never a
    tensor's values: their refusals say nothing of private data."""
    check = _CHECKS.get(op)
    if check is not None and check not in _READ_VALUES:
        check(op, args, kwargs, limits)
    if _has_large_number(args) or _has_large_number(kwargs.values()):
        _estimate_result(op, args, kwargs, limits)


def check_values(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    """The checks that read tensors' values (a NaN count, pivots out of order)."""
    check = _CHECKS.get(op)
    if check is not None and check in _READ_VALUES:
        check(op, args, kwargs, limits)


_LARGE: Final = 1 << 16
"""Numbers past this among the arguments (alone, or multiplied as sizes are) may make a
large result: it is estimated first."""


def _has_large_number(values: Any, depth: int = 0) -> bool:
    product = 1
    for value in values:
        kind = type(value)
        if kind is int or kind is float:
            if abs(value) > _LARGE:
                return True
            if kind is int and value:
                product *= abs(value)
        elif (kind is tuple or kind is list) and depth < 2 and _has_large_number(value,
                                                                                  depth + 1):
            return True
    return product > _LARGE


def _estimate_result(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    """Run `op` on meta tensors (shapes, no data, no work): refuse before running it for
    real if it would make a tensor of more than `max_elements` elements. An operation
    that cannot run on meta tensors is left to the check of its result."""
    meta_args = [_on_meta(a) for a in args]
    meta_kwargs = {k: _on_meta(v) for k, v in kwargs.items()}
    if not any(isinstance(a, torch.Tensor) for a in (*meta_args, *meta_kwargs.values())):
        if not op.startswith("torch."):
            return
        meta_kwargs["device"] = "meta"  # a tensor made from sizes alone
    try:
        result = resolve_op(op)(*meta_args, **meta_kwargs)
    except Exception:
        return
    check_result(op, result, limits)


def _on_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                   device="meta")
    if type(value) in (tuple, list):
        return type(value)(_on_meta(v) for v in value)
    return value


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


def _argument(args: list[Any], kwargs: dict[str, Any], position: int, name: str,
              default: Any = None) -> Any:
    """An argument given by position or by name."""
    return args[position] if len(args) > position else kwargs.get(name, default)


def _refuse(op: str, what: str, why: str) -> OperationRefused:
    return OperationRefused(f"{op} {what} is refused: {why}")


def _finite_input(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    # linalg.eigvals: oneMKL's SGEBAL is handed NaN, then the process dies (SIGSEGV).
    for tensor in _tensors(args, kwargs):
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(
            torch.isfinite(tensor).all()
        ):
            raise _refuse(op, "of a tensor with NaN or infinite entries",
                          "torch crashes on such input (replace them first, e.g. with "
                          "nan_to_num)")


def _binomial(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    count = _argument(args, kwargs, 0, "count")
    if isinstance(count, torch.Tensor) and count.is_floating_point() and bool(
        count.isnan().any()
    ):
        raise _refuse(op, "with a NaN count", "torch's sampler never returns on it")


def _pooling_sizes(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    # max_pool1d with a kernel of 2**62 never returns; 2**63-1 crashes (SIGSEGV).
    tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if tensor is None:
        return
    bound = 2 * max(tensor.shape, default=0) + 2
    for size in [*args[1:], *kwargs.values()]:
        for value in size if isinstance(size, tuple | list) else (size,):
            if type(value) is int and not -bound <= value <= bound:
                raise _refuse(
                    op, f"with a kernel, stride, padding or dilation of {value} for an input "
                    f"of shape {_shape(tensor)}", "sizes far past the input's make torch loop "
                    "or crash")


def _fold_sizes(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    # fold with padding 2**31 crashes (SIGSEGV); 2**32 never returns.
    for size in [*args[1:], *kwargs.values()]:
        for value in size if isinstance(size, tuple | list) else (size,):
            if type(value) is int and not -(1 << 31) < value < (1 << 31):
                raise _refuse(op, f"with a size of {value}", "sizes of 2**31 or more crash "
                              "torch's fold")


def _embedding_bag(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    # mode='max' over zero bags of a non-empty input crashes (SIGSEGV).
    indices = _argument(args, kwargs, 0, "input")
    offsets = _argument(args, kwargs, 2, "offsets")
    include_last = bool(_argument(args, kwargs, 9, "include_last_offset", False))
    if (isinstance(indices, torch.Tensor) and isinstance(offsets, torch.Tensor)
            and indices.numel() > 0 and offsets.numel() - include_last < 1):
        raise _refuse(op, "of a non-empty input into no bags at all",
                      "torch crashes on it in mode 'max'; give offsets for at least one bag")


def _lu_unpack(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    # Pivots that do not match the LU matrix (an empty tensor, say) crash (SIGSEGV).
    lu, pivots = _argument(args, kwargs, 0, "LU_data"), _argument(args, kwargs, 1, "LU_pivots")
    if isinstance(lu, torch.Tensor) and isinstance(pivots, torch.Tensor) and lu.dim() >= 2:
        expected = (*lu.shape[:-2], min(lu.shape[-2:]))
        if tuple(pivots.shape) != expected:
            raise _refuse(op, f"with pivots of shape {tuple(pivots.shape)} for an LU of shape "
                          f"{tuple(lu.shape)}", f"they must have shape {expected}, as lu "
                          "returns them (others crash torch)")


def _ldl_pivots(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    # Negative pivots not in equal adjacent pairs corrupt the heap (SIGABRT later on).
    pivots = _argument(args, kwargs, 1, "pivots")
    if not isinstance(pivots, torch.Tensor) or pivots.dim() < 1 or pivots.dtype not in (
        torch.int32, torch.int64
    ):
        return  # torch refuses those itself
    n = pivots.shape[-1]
    for row in pivots.reshape(-1, n).tolist() if n else ():
        k = 0
        while k < n:
            p = row[k]
            if not 1 <= abs(p) <= n:
                raise _refuse(op, f"with pivot {p}", f"pivots must be 1 to {n} in size")
            if p < 0:
                if k + 1 >= n or row[k + 1] != p:
                    raise _refuse(op, f"with a lone negative pivot {p}", "negative pivots come "
                                  "in equal adjacent pairs, as ldl_factor returns them (others "
                                  "corrupt memory)")
                k += 1
            k += 1


def _matrix_power(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    # n = -2**63 never returns.
    n = _argument(args, kwargs, 1, "n")
    if type(n) is int and abs(n) >= 1 << 62:
        raise _refuse(op, f"with n = {n}", "exponents of 2**62 or more in size never finish")


def _truncating_division(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    # The smallest int32/int64 divided by -1 with rounding_mode='trunc' raises SIGFPE.
    if kwargs.get("rounding_mode") != "trunc" or len(args) < 2:
        return
    dividend, divisor = args[0], args[1]
    if not isinstance(dividend, torch.Tensor) or dividend.dtype not in (torch.int32,
                                                                         torch.int64):
        return
    smallest = torch.iinfo(dividend.dtype).min
    minus_one = bool((divisor == -1).any()) if isinstance(divisor, torch.Tensor) else (
        divisor == -1)
    if minus_one and bool((dividend == smallest).any()):
        raise _refuse(op, f"of {smallest} by -1 with rounding_mode='trunc'",
                      "the result does not fit the dtype, and the CPU traps (SIGFPE)")


def _lcm_of_the_smallest(op: str, args: list[Any], kwargs: dict[str, Any],
                         limits: Limits) -> None:
    # lcm(INT64_MIN, INT64_MAX): their gcd comes out as -1, and INT64_MIN / -1 traps (SIGFPE).
    for tensor in _tensors(args, kwargs):
        if tensor.dtype in (torch.int8, torch.int16, torch.int32, torch.int64) and bool(
                (tensor == torch.iinfo(tensor.dtype).min).any()):
            raise _refuse(op, f"of {torch.iinfo(tensor.dtype).min}", "the least common "
                          "multiple overflows the dtype, and the CPU traps (SIGFPE)")


def _combinations(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    # Work grows like numel**r, whatever the size of the result.
    tensor = _argument(args, kwargs, 0, "input")
    r = _argument(args, kwargs, 1, "r", 2)
    if not (isinstance(tensor, torch.Tensor) and type(r) is int and tensor.numel() > 1):
        return
    if r > 64 or tensor.numel() ** max(r, 0) > limits.max_elements:  # r > 64: past 2**64
        raise BudgetExceeded(
            f"{op} of {tensor.numel()} elements taken {r} at a time works through "
            f"{tensor.numel()}**{r} candidates; this worker's max_elements is "
            f"{limits.max_elements:,}"
        )


def _low_rank_iterations(op: str, args: list[Any], kwargs: dict[str, Any], limits: Limits) -> None:
    # Time grows linearly with niter: 2**20 iterations on a 3x3 matrix take seconds.
    niter = _argument(args, kwargs, 2 if op == "torch.svd_lowrank" else 3, "niter", 2)
    if type(niter) is int and niter > 1000:
        raise _refuse(op, f"with niter = {niter}", "more than 1000 power iterations")


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
    "torch.binomial": _binomial,
    **dict.fromkeys(_POOLING, _pooling_sizes),
    "F.fold": _fold_sizes,
    "F.embedding_bag": _embedding_bag,
    "torch.lu_unpack": _lu_unpack,
    "linalg.ldl_solve": _ldl_pivots,
    **dict.fromkeys(("linalg.matrix_power", "torch.matrix_power", "Tensor.matrix_power"),
                    _matrix_power),
    **dict.fromkeys(("torch.div", "torch.divide", "Tensor.div", "Tensor.div_",
                     "Tensor.divide", "Tensor.divide_"), _truncating_division),
    **dict.fromkeys(("torch.lcm", "torch.lcm_", "Tensor.lcm", "Tensor.lcm_"),
                    _lcm_of_the_smallest),
    "torch.combinations": _combinations,
    **dict.fromkeys(("torch.svd_lowrank", "torch.pca_lowrank"), _low_rank_iterations),
}
"""Per operation: a check of its arguments. Completed from the fuzz campaign's findings
(and the noninterference campaign's: `lcm`)."""

_READ_VALUES: Final = frozenset({_finite_input, _binomial, _ldl_pivots, _truncating_division,
                                 _lcm_of_the_smallest})
"""The checks that read tensors' values: on private data, a refusal of theirs would tell
them (see `_oblivious.py`), so there they are not refusals but failures."""
