"""The vocabulary of remote operations: wire names <-> allow-listed callables.

A wire name says where the operation comes from:

    torch.<name>      a function in the torch namespace        torch.add
    linalg.<name>     a function in torch.linalg                linalg.norm
    F.<name>          a function in torch.nn.functional         F.relu
    Tensor.<name>     a tensor method, called with self first   Tensor.__add__
    Tensor@<name>     a tensor attribute read (no call)         Tensor@grad
    optim.<name>      an optimizer over tensors on the worker   optim.SGD
    Optimizer.<name>  a method of such an optimizer             Optimizer.step
    getitem/setitem   indexing, also of tuple results           getitem

Workers resolve names through `resolve`, which refuses anything that is not on
the allow-list (`_allowlist.py`): there is no path from a name to `getattr` on
an arbitrary object. Clients use `wire_name` to name the torch functions that
reach a pointer through `__torch_function__`.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import _allowlist
from ._errors import OperationRefused

__all__ = ["is_inplace", "operation_names", "resolve", "wire_name"]

Op = Callable[..., Any]


def _attribute_reader(name: str) -> Op:
    def read(tensor: torch.Tensor) -> Any:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"Tensor@{name} needs a tensor, not {type(tensor).__name__}")
        return getattr(tensor, name)

    return read


def _build_table() -> dict[str, Op]:
    table: dict[str, Op] = {"getitem": operator.getitem, "setitem": operator.setitem}
    namespaces: list[tuple[str, object, frozenset[str]]] = [
        ("torch.", torch, _allowlist.TORCH_FUNCTIONS),
        ("linalg.", torch.linalg, _allowlist.LINALG),
        ("F.", F, _allowlist.FUNCTIONAL),
        ("Tensor.", torch.Tensor, _allowlist.TENSOR_METHODS),
    ]
    for prefix, namespace, names in namespaces:
        for name in names:
            function = getattr(namespace, name, None)
            if callable(function):  # an allow-listed name this torch lacks is skipped
                table[prefix + name] = function
    for name in _allowlist.TENSOR_ATTRIBUTES:
        table[f"Tensor@{name}"] = _attribute_reader(name)
    for name, options in _allowlist.OPTIMIZERS.items():
        table[f"optim.{name}"] = _optimizer_factory(getattr(torch.optim, name), options)
    for name in _allowlist.OPTIMIZER_METHODS:
        table[f"Optimizer.{name}"] = _optimizer_method(name)
    return table


def _optimizer_factory(kind: type[torch.optim.Optimizer], options: frozenset[str]) -> Op:
    """`kind(parameters, **hyperparameters)`, with every argument checked first: the
    parameters are leaf tensors that require gradients, the hyperparameters numbers."""

    def make(parameters: Any, **hyperparameters: Any) -> torch.optim.Optimizer:
        if not (isinstance(parameters, list | tuple) and parameters and all(
            isinstance(p, torch.Tensor) and p.is_leaf and p.requires_grad for p in parameters
        )):
            raise TypeError(f"optim.{kind.__name__} takes a list of leaf tensors that require "
                            "gradients (a model's parameters)")
        unknown = sorted(set(hyperparameters) - options)
        if unknown:
            raise TypeError(f"optim.{kind.__name__} does not take {unknown}; it takes "
                            f"{sorted(options)}")
        for name, value in hyperparameters.items():
            numbers = value if isinstance(value, tuple | list) else (value,)
            if not all(type(n) in (int, float, bool) and math.isfinite(n) for n in numbers):
                raise TypeError(f"optim.{kind.__name__}: {name} must be a finite number")
        return kind(list(parameters), **hyperparameters)

    make.__name__ = kind.__name__
    return make


def _optimizer_method(name: str) -> Op:
    def call(optimizer: Any, **kwargs: Any) -> Any:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Optimizer.{name} needs an optimizer, not {type(optimizer).__name__}")
        if name == "zero_grad" and set(kwargs) - {"set_to_none"}:
            raise TypeError("Optimizer.zero_grad takes only set_to_none")
        if name != "zero_grad" and kwargs:
            raise TypeError(f"Optimizer.{name} takes no arguments")
        if name == "reset":
            optimizer.state.clear()
            return None
        return getattr(optimizer, name)(**kwargs)

    return call


_TABLE: dict[str, Op] = _build_table()
_NAMES: dict[Op, str] = {}
for _name, _function in _TABLE.items():
    _NAMES.setdefault(_function, _name)


def operation_names() -> list[str]:
    """Every allow-listed function, method and attribute this torch has, as wire names, in
    a fixed order (for the campaigns that try each of them)."""
    names = []
    for prefix, namespace, allowed in (
        ("torch.", torch, _allowlist.TORCH_FUNCTIONS),
        ("linalg.", torch.linalg, _allowlist.LINALG),
        ("F.", F, _allowlist.FUNCTIONAL),
        ("Tensor.", torch.Tensor, _allowlist.TENSOR_METHODS),
    ):
        names += [prefix + n for n in sorted(allowed) if callable(getattr(namespace, n, None))]
    names += [f"Tensor@{n}" for n in sorted(_allowlist.TENSOR_ATTRIBUTES)]
    return names


def resolve(name: str) -> Op:
    """The callable for wire name `name`; raises `OperationRefused` if not allowed."""
    try:
        return _TABLE[name]
    except (KeyError, TypeError):
        raise OperationRefused(f"operation {name!r} is not on the allow-list") from None


def wire_name(function: Any) -> str | None:
    """The wire name of a torch function or tensor method, or None if not allowed."""
    try:
        return _NAMES.get(function)
    except TypeError:  # unhashable
        return None


_INPLACE_OPERATIONS = frozenset({"Optimizer.reset", "Optimizer.step", "Optimizer.zero_grad"})
"""Operations that change objects and make nothing: no result to store."""

_INPLACE_OPERATORS = frozenset(
    f"__i{op}__"
    for op in (
        "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
        "and", "or", "xor", "lshift", "rshift",
    )
)


@functools.cache
def is_inplace(name: str) -> bool:
    """Whether the operation modifies its first argument and returns it (or nothing)."""
    if name in _INPLACE_OPERATIONS:
        return True
    short = name.rpartition(".")[2]
    if short in ("setitem", "__setitem__") or short in _INPLACE_OPERATORS:
        return True
    return short.endswith("_") and not short.endswith("__")
