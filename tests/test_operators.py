"""Every operator the allow-list permits, on pointers, against local torch.

The pointer's operator methods are generated from the allow-list, in their
plain, reflected and in-place forms; this walks the same list and checks each
form against the same expression on a local tensor, on both brokers.
"""

from __future__ import annotations

import ast
import inspect
import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch

import torchrelay as tr
from torchrelay.client import OPERATORS
from torchrelay.client import _pointer as pointer_module

tr.hook(torch)

BINARY = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul,
    "truediv": operator.truediv, "floordiv": operator.floordiv, "mod": operator.mod,
    "pow": operator.pow, "matmul": operator.matmul, "and": operator.and_, "or": operator.or_,
    "xor": operator.xor, "lshift": operator.lshift, "rshift": operator.rshift,
}
IN_PLACE = {
    "add": operator.iadd, "sub": operator.isub, "mul": operator.imul,
    "truediv": operator.itruediv, "floordiv": operator.ifloordiv, "mod": operator.imod,
    "pow": operator.ipow, "and": operator.iand, "or": operator.ior, "xor": operator.ixor,
    "lshift": operator.ilshift, "rshift": operator.irshift,
}
UNARY = {"abs": operator.abs, "neg": operator.neg, "pos": operator.pos, "invert": operator.invert}
COMPARISONS = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
               "gt": operator.gt, "ge": operator.ge}
INTEGER_ONLY = {"and", "or", "xor", "lshift", "rshift", "invert"}


def classify(name: str) -> tuple[str, str]:
    """(`plain` | `reflected` | `in-place` | `unary` | `comparison`, the operation)."""
    core = name[2:-2]
    if core in BINARY:
        return "plain", core
    if core in COMPARISONS:
        return "comparison", core
    if core in UNARY:
        return "unary", core
    if core[0] == "r" and core[1:] in BINARY:
        return "reflected", core[1:]
    if core[0] == "i" and core[1:] in IN_PLACE:
        return "in-place", core[1:]
    raise AssertionError(f"allow-listed operator {name} is of no known kind: classify it")


def operands(operation: str) -> tuple[torch.Tensor, int | float]:
    if operation in INTEGER_ONLY:
        return torch.tensor([1, 2, 3, 12]), 2
    return torch.tensor([1.5, 2.0, 3.0, 4.0]), 2.5


def test_every_allow_listed_operator_is_classified_and_generated() -> None:
    kinds = {name: classify(name)[0] for name in OPERATORS}
    assert {"plain", "reflected", "in-place", "unary", "comparison"} == set(kinds.values())
    for name in OPERATORS:
        method = getattr(tr.PointerTensor, name)
        assert method.__qualname__ == f"PointerTensor.{name}"


def test_the_typing_stubs_list_exactly_the_generated_operators() -> None:
    tree = ast.parse(inspect.getsource(pointer_module))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PointerTensor"]
    (block,) = [n for n in cls.body if isinstance(n, ast.If)
                and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING"]
    stubbed = {target.id for node in block.body if isinstance(node, ast.Assign)
               for target in node.targets if isinstance(target, ast.Name)}
    assert stubbed == set(OPERATORS)


def same(remote: tr.PointerTensor, local: Any) -> None:
    value = remote.get()
    assert value.dtype == local.dtype
    assert torch.allclose(value, local, equal_nan=True) if value.is_floating_point() else (
        torch.equal(value, local)
    )


@pytest.mark.parametrize("name", OPERATORS)
def test_operator_behaves_as_on_a_local_tensor(bob: tr.WorkerHandle, name: str) -> None:
    kind, operation = classify(name)
    local, scalar = operands(operation)
    pointer = local.clone().send(bob)
    if kind == "unary":
        same(UNARY[operation](pointer), UNARY[operation](local))
    elif kind == "comparison":
        compare: Callable[[Any, Any], Any] = COMPARISONS[operation]
        same(compare(pointer, scalar), compare(local, scalar))
        same(compare(scalar, pointer), compare(scalar, local))  # reflected by Python
        other = (local + 1).send(bob)
        same(compare(pointer, other), compare(local, local + 1))
    elif kind == "plain":
        apply = BINARY[operation]
        if operation == "matmul":
            same(apply(pointer, (local * 2).send(bob)), apply(local, local * 2))
        else:
            same(apply(pointer, scalar), apply(local, scalar))
            same(apply(pointer, pointer), apply(local, local))
    elif kind == "reflected":
        if operation == "matmul":  # a number has no @: a local tensor on the left
            same(getattr(pointer, name)(local * 2), (local * 2) @ local)
        else:
            same(BINARY[operation](scalar, pointer), BINARY[operation](scalar, local))
    else:
        same_tensor = tr.PointerTensor(bob, pointer.id_at_location, garbage_collect=False)
        expected = local.clone()
        expected = IN_PLACE[operation](expected, scalar)
        result = IN_PLACE[operation](pointer, scalar)
        assert result is pointer  # rebinding `p %= 2` keeps the same pointer
        same(same_tensor, expected)  # changed in place: seen through another pointer
        return
    pointer.get()


def test_bitwise_and_shift_operators_from_the_issue(bob: tr.WorkerHandle) -> None:
    p = torch.tensor([1, 2, 3]).send(bob)
    view = p.view(-1)
    q = p
    p %= 2
    assert p is q
    assert torch.equal(view.get(), torch.tensor([1, 0, 1]))
    p <<= 1
    assert torch.equal((1 & p).get(), torch.tensor([0, 0, 0]))
    assert torch.equal((2 ** p).get(), torch.tensor([4, 1, 4]))
    assert torch.equal(p.get(), torch.tensor([2, 0, 2]))
