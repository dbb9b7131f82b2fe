"""Operations on private data whose outcome a client sees through shapes alone.

Withholding a private value is not enough to hide it: the *shape* of a result
(`nonzero`, `unique`, `bincount` of it), the *fact* that an operation failed
(an index out of range, a matrix that is not positive definite) or its
*requires_grad* tell the value too, one query at a time. The rule this module
enforces: everything a client can observe of an operation on private-derived
arguments — whether it succeeds, its error, its result's type, shape, dtype,
strides and autograd flags — is a function of the arguments' shapes, dtypes and
public values only, never of the private values.

How: the operation first runs on *meta* tensors (shape, dtype, strides and
autograd flags, no data, no work). That run, which cannot see a value, is the
oracle:

- it fails (no shape-only form: the result's shape depends on values, as for
  `nonzero`; or the arguments' shapes do not fit): the operation is refused,
  with a message naming only the operation and the shapes' failure;
- it succeeds: the real operation runs. If it fails — which can only depend
  on values, since the shapes were fine — its result is made of the expected
  shapes filled with NaN (0 for integers), private like any other: the failure
  is not observable. If it succeeds but differs from the expectation in type,
  shape, dtype, strides or autograd flags, it is replaced the same way. Python
  values among the results (a `size()`, a `stride()`) are the oracle's.

Operations whose outcome does not depend on values by their nature — reading
attributes (`.grad`), `backward`, optimizers, taking an item of a tuple — run
as they are (`structural`): their failures say nothing of values, and their
messages are withheld anyway.

Meta runs cost tens of microseconds, so their outcomes are remembered by the
arguments' signature (shapes, dtypes, strides, flags, public values): a
training step repeated on batches of one shape infers each operation once.

Time is hidden apart: worker daemons flush subnormal numbers to zero, and
hold each operation on private data to a public schedule (`_pacing.py`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import torch

from torchrelay.broker import PrivateDataError, is_inplace

from ._checks import check_arguments, check_result, check_shapes, check_values
from ._limits import Limits
from ._pacing import Pacer, bucket
from ._store import graph_leaves

__all__ = ["PrivateExecution", "is_structural"]

log = logging.getLogger("torchrelay.worker")

_STRUCTURAL_PREFIXES: Final = ("Tensor@", "Optimizer.", "optim.")
_STRUCTURAL: Final = frozenset({"Tensor.backward", "Tensor.retain_grad"})

_CACHED_SIGNATURES: Final = 4096
"""Meta outcomes remembered (each a few meta tensors: shapes, no data)."""


def is_structural(op: str, args: list[Any]) -> bool:
    """Whether `op`'s outcome depends only on what its arguments are, not on their
    values: attribute reads, autograd and optimizer calls, items of a tuple or list."""
    if op in _STRUCTURAL or op.startswith(_STRUCTURAL_PREFIXES):
        return True
    return op in ("getitem", "setitem") and bool(args) and not isinstance(args[0],
                                                                          torch.Tensor)


class _Refusal:
    """What the meta run said of a signature it could not run: the refusal's reason."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Expected:
    """The meta run's outcome: the result, what an in-place target became, and which
    argument's memory (by position) each storage of the meta arguments is."""

    __slots__ = ("result", "storages", "target")

    def __init__(self, result: Any, target: torch.Tensor | None,
                 storages: dict[int, int]) -> None:
        self.result = result
        self.target = target
        self.storages = storages


class PrivateExecution:
    """Runs operations on private-derived arguments (see the module docstring), with the
    worker's argument and result checks (`_checks.py`) around the real run."""

    def __init__(self, limits: Limits, pacer: Pacer | None = None) -> None:
        self.limits = limits
        self.pacer = pacer
        """Holds operations to a public schedule (worker daemons; see `_pacing.py`)."""
        self._outcomes: OrderedDict[Any, _Expected | _Refusal] = OrderedDict()
        self.filled = 0
        """Operations whose real run failed or strayed and were answered with fills."""

    def run(self, op: str, function: Callable[..., Any], args: list[Any],
            kwargs: dict[str, Any], owners: frozenset[str]) -> Any:
        pacer = self.pacer
        if is_structural(op, args):
            started = time.perf_counter()
            result: Any = None
            try:
                result = self._structural(op, function, args, kwargs, owners)
                return result
            finally:
                if pacer is not None:
                    pacer.pace((op, bucket(_work(op, args, result))), started)
        # Sizes and numbers first (a meta run of matrix_power(x, -2**63) never ends either).
        check_shapes(op, args, kwargs, self.limits)
        expected = self._expect(op, function, args, kwargs)
        if isinstance(expected, _Refusal):  # (from shapes: as fast whatever the values)
            raise PrivateDataError(
                f"{op} is refused on data derived from private data of "
                f"{', '.join(sorted(owners))}: {expected.reason}")
        check_result(op, expected.result, self.limits)  # too large: refused, from shapes
        if pacer is None:
            return self._real(op, function, args, kwargs, expected)
        # What came before depends on shapes alone: only the real run is paced.
        key = (op, bucket(_work(op, args, expected.result)))
        if not pacer.known(key):
            pacer.calibrated(key, _benign_seconds(op, function, args, kwargs, self.limits))
        started = time.perf_counter()
        try:
            return self._real(op, function, args, kwargs, expected)
        finally:
            pacer.pace(key, started)

    def _real(self, op: str, function: Callable[..., Any], args: list[Any],
              kwargs: dict[str, Any], expected: _Expected) -> Any:
        inplace = expected.target is not None
        try:
            check_values(op, args, kwargs, self.limits)
            result = function(*args, **kwargs)
            check_result(op, result, self.limits)
        except Exception as e:
            # Only values can have made it fail (the shapes passed): nothing shows it.
            log.debug("%s failed on private data (%s); answered with a fill", op,
                      type(e).__name__)
            return self._filled(expected, args)
        if inplace:
            return result
        conformed = _conform(result, expected.result, _Storages(expected, args))
        if conformed is _MISMATCH:
            log.warning("%s on private data gave a result unlike its meta run's; answered "
                        "with a fill", op)
            return self._filled(expected, args)
        return conformed

    def _expect(self, op: str, function: Callable[..., Any], args: list[Any],
                kwargs: dict[str, Any]) -> _Expected | _Refusal:
        key = _signature(op, args, kwargs)
        if key is not None:
            known = self._outcomes.get(key)
            if known is not None:
                self._outcomes.move_to_end(key)
                return known
        outcome = _meta_run(op, function, args, kwargs)
        if key is not None:
            self._outcomes[key] = outcome
            if len(self._outcomes) > _CACHED_SIGNATURES:
                self._outcomes.popitem(last=False)
        return outcome

    def _filled(self, expected: _Expected, args: list[Any]) -> Any:
        self.filled += 1
        if expected.target is not None:  # in place: the target stays, as changed
            target = args[0]
            # Changed, as far as autograd can tell, as a successful run would have it.
            torch.autograd.graph.increment_version(target)
            if expected.target.requires_grad and not target.requires_grad:
                link = _gradient_link(args[1:])
                if link is not None:
                    target.add_(link.to(target.dtype))  # in the graph, as it would be
            return expected.result if expected.result is None else target
        return _fill(expected.result, _gradient_link(args))

    def _structural(self, op: str, function: Callable[..., Any], args: list[Any],
                    kwargs: dict[str, Any], owners: frozenset[str]) -> Any:
        if op in ("getitem", "setitem") and any(
                isinstance(a, torch.Tensor) for a in (*args[1:], *kwargs.values())):
            # A tuple indexed by a tensor reads its value.
            raise PrivateDataError(
                f"{op} of a {type(args[0]).__name__} with a tensor index is refused on data "
                f"derived from private data of {', '.join(sorted(owners))}: the item chosen "
                "would depend on the index's value")
        try:
            check_arguments(op, args, kwargs, self.limits)
            result = function(*args, **kwargs)
            check_result(op, result, self.limits)
        except Exception as e:
            raise PrivateDataError(
                f"{op} failed on data derived from private data of "
                f"{', '.join(sorted(owners))} ({type(e).__name__}); what it said is "
                "withheld: it may describe the data") from None
        return result


def _work(op: str, args: list[Any], result: Any) -> int:
    """A public measure of an operation's size, for its schedule: the elements of its
    tensors (an optimizer's parameters; for `backward`, the leaves of the graph)."""
    if op == "Tensor.backward" and args and isinstance(args[0], torch.Tensor):
        return 1 + sum(t.numel() for t in graph_leaves(args[0]))
    return 1 + _elements(args) + _elements(result)


def _benign_seconds(op: str, function: Callable[..., Any], args: list[Any],
                    kwargs: dict[str, Any], limits: Limits) -> float:
    """How long `op` takes on arguments of the same shapes and no one's values (zeros,
    halves, copies of the public ones): what a schedule starts from, and a warm-up."""
    benign = [_benign(a) for a in args]
    benign_kwargs = {k: _benign(v) for k, v in kwargs.items()}
    started = time.perf_counter()
    try:
        check_values(op, benign, benign_kwargs, limits)
        function(*benign, **benign_kwargs)
    except Exception:  # noqa: S110 - how long it took is all that is wanted
        pass
    return time.perf_counter() - started


def _benign(value: Any, depth: int = 0) -> Any:
    if isinstance(value, torch.Tensor):
        made = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype)
        dtype = value.dtype
        made.fill_(0.5 if dtype.is_floating_point or dtype.is_complex else 0)
        return made.requires_grad_(True) if value.requires_grad else made
    kind = type(value)
    if (kind is list or kind is tuple) and depth < 4:
        return kind(_benign(v, depth + 1) for v in value)
    return value


def _elements(value: Any, depth: int = 0) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, torch.optim.Optimizer):
        return sum(p.numel() for group in value.param_groups for p in group["params"])
    if isinstance(value, tuple | list) and depth < 4:
        return sum(_elements(v, depth + 1) for v in value)
    return 0


# -- meta runs --------------------------------------------------------------------------


def _meta_run(op: str, function: Callable[..., Any], args: list[Any],
              kwargs: dict[str, Any]) -> _Expected | _Refusal:
    copier = _MetaCopier()
    try:
        meta_args = [copier.copy(a) for a in args]
        meta_kwargs = {k: copier.copy(v) for k, v in kwargs.items()}
        result = function(*meta_args, **meta_kwargs)
    except Exception as e:
        return _Refusal(_reason(e))
    if _holds_real_tensor(result):
        return _Refusal("it has no shape-only form (it reads values)")
    target = meta_args[0] if meta_args and isinstance(meta_args[0], torch.Tensor) else None
    storages = {a.untyped_storage()._cdata: i for i, a in enumerate(meta_args)
                if isinstance(a, torch.Tensor)}
    return _Expected(result, target if is_inplace(op) else None, storages)


_DATA_DEPENDENT: Final = ("meta", "data-dependent", "data dependent", "Scalar", "item()",
                          "no data")


def _reason(error: Exception) -> str:
    text = str(error).split("\n", 1)[0]
    if isinstance(error, NotImplementedError) or any(w in text for w in _DATA_DEPENDENT):
        return ("its result's shape, or whether it succeeds, depends on the values (it has "
                "no shape-only form), and those are private")
    if len(text) > 300:
        text = text[:299] + "…"
    # Shapes and public values are all a meta run sees: its message says no more.
    return f"it fails on arguments of these shapes and dtypes ({type(error).__name__}: {text})"


class _MetaCopier:
    """Meta copies of arguments: same shapes, dtypes, strides and autograd flags; one
    copy per tensor, so aliased arguments stay aliased."""

    __slots__ = ("_copies",)

    def __init__(self) -> None:
        self._copies: dict[int, torch.Tensor] = {}

    def copy(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, torch.Tensor):
            copied = self._copies.get(id(value))
            if copied is None:
                copied = _meta_tensor(value)
                self._copies[id(value)] = copied
            return copied
        kind = type(value)
        if (kind is list or kind is tuple) and depth < 4:
            return kind(self.copy(v, depth + 1) for v in value)
        if kind is dict and depth < 4:
            return {k: self.copy(v, depth + 1) for k, v in value.items()}
        return value


def _meta_tensor(tensor: torch.Tensor) -> torch.Tensor:
    copy = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype,
                               device="meta")
    if tensor.requires_grad:
        copy.requires_grad_(True)
        if not tensor.is_leaf:
            copy = copy.clone()  # made by an operation, as the real one was
    return copy


def _holds_real_tensor(value: Any, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device.type != "meta"
    if isinstance(value, tuple | list) and depth < 4:
        return any(_holds_real_tensor(v, depth + 1) for v in value)
    return False


# -- signatures: what a meta run's outcome depends on ---------------------------------------


def _signature(op: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """A hashable summary of everything a meta run of `op` sees; None if some argument
    cannot be summarised (then nothing is remembered)."""
    seen: dict[int, int] = {}
    try:
        parts = [_part(a, seen, 0) for a in args]
        named = tuple(sorted((k, _part(v, seen, 0)) for k, v in kwargs.items()))
    except _Unsummarised:
        return None
    return (op, tuple(parts), named, torch.is_grad_enabled())


class _Unsummarised(Exception):
    pass


def _part(value: Any, seen: dict[int, int], depth: int) -> Any:
    if isinstance(value, torch.Tensor):
        alias = seen.setdefault(id(value), len(seen))
        return ("T", alias, tuple(value.shape), value.stride(), value.dtype,
                value.requires_grad, value.is_leaf, type(value) is torch.nn.Parameter)
    kind = type(value)
    if kind is float:
        if math.isnan(value):
            raise _Unsummarised  # NaN != NaN: it would never be found again
        return (kind, value)
    if kind in (int, bool, str, type(None), torch.dtype, complex) or value is Ellipsis:
        return (kind, value)
    if kind is slice:
        return (kind, _part(value.start, seen, depth), _part(value.stop, seen, depth),
                _part(value.step, seen, depth))
    if (kind is list or kind is tuple or kind is torch.Size) and depth < 4:
        return (kind, tuple(_part(v, seen, depth + 1) for v in value))
    raise _Unsummarised


# -- fills: results of the expected shapes, whatever the values did ---------------------------


class _Mismatch:
    pass


_MISMATCH: Final = _Mismatch()


class _Storages:
    """Which argument (by position) a tensor's memory is, for the meta run's tensors and
    for the real ones: a result is a view of the same argument, or new memory."""

    __slots__ = ("_expected", "_real", "args")

    def __init__(self, expected: _Expected, args: list[Any]) -> None:
        self._expected = expected.storages
        self.args = args
        self._real: dict[int, int] | None = None

    def expected(self, tensor: torch.Tensor) -> int | None:
        return self._expected.get(tensor.untyped_storage()._cdata)

    def real(self, tensor: torch.Tensor) -> int | None:
        if self._real is None:
            self._real = {a.untyped_storage()._cdata: i for i, a in enumerate(self.args)
                          if isinstance(a, torch.Tensor)}
        return self._real.get(tensor.untyped_storage()._cdata)


def _conform(real: Any, expected: Any, storages: _Storages, depth: int = 0) -> Any:
    """`real` if it is what the meta run said it would be (with the meta run's Python
    values in it); else `_MISMATCH`. A tensor laid out otherwise — other strides, or
    memory of another size (both show: `stride()`, a worker's bytes held) — is copied
    into the meta run's layout."""
    if isinstance(expected, torch.Tensor):
        if not (isinstance(real, torch.Tensor) and real.shape == expected.shape
                and real.dtype == expected.dtype
                and real.requires_grad == expected.requires_grad):
            return _MISMATCH
        if storages.expected(expected) is not None:  # a view of an argument, as expected
            return real
        if (storages.real(real) is not None or real.stride() != expected.stride()
                or real.storage_offset() != expected.storage_offset()
                or real.untyped_storage().nbytes() != expected.untyped_storage().nbytes()):
            return _fresh_like(expected).copy_(real)  # (differentiable: the graph goes on)
        return real
    if isinstance(expected, tuple | list) and depth < 4:
        if type(real) is not type(expected) or len(real) != len(expected):
            return _MISMATCH
        items = [_conform(r, e, storages, depth + 1)
                 for r, e in zip(real, expected, strict=True)]
        if any(i is _MISMATCH for i in items):
            return _MISMATCH
        return _rebuilt(expected, items)
    if type(real) is not type(expected):
        return _MISMATCH
    return expected  # a Python value: the meta run's, computed from shapes alone


def _fresh_like(expected: torch.Tensor) -> torch.Tensor:
    """New memory laid out as the meta run's tensor: its shape, strides, offset and the
    size of its storage."""
    elements = expected.untyped_storage().nbytes() // max(expected.element_size(), 1)
    return torch.empty(elements, dtype=expected.dtype).as_strided(
        expected.shape, expected.stride(), expected.storage_offset())


def _rebuilt(like: Any, items: list[Any]) -> Any:
    kind = type(like)
    if kind is list:
        return items
    if kind is tuple:
        return tuple(items)
    if hasattr(kind, "_fields"):  # a namedtuple
        return kind(*items)
    return kind(items)  # torch.return_types: structseqs built from a sequence


def _fill(expected: Any, link: torch.Tensor | None, depth: int = 0) -> Any:
    if isinstance(expected, torch.Tensor):
        dtype = expected.dtype
        value: Any = (math.nan if dtype.is_floating_point or dtype.is_complex
                      else False if dtype is torch.bool else 0)
        filled = _fresh_like(expected).fill_(value)
        if expected.requires_grad:
            # Part of the arguments' graph, as the real result would have been: a
            # backward through it reaches the same leaves.
            source = (filled + link.to(dtype) if link is not None
                      else filled.clone().requires_grad_(True) * 1)
            filled = _fresh_like(expected).copy_(source)
        return filled
    if isinstance(expected, tuple | list) and depth < 4:
        return _rebuilt(expected, [_fill(e, link, depth + 1) for e in expected])
    return expected


def _gradient_link(args: list[Any]) -> torch.Tensor | None:
    """A zero that depends on every argument that requires a gradient, or None."""
    link = None
    for value in args:
        values = value if isinstance(value, tuple | list) else (value,)
        for tensor in values:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad and (
                    tensor.is_floating_point() or tensor.is_complex()):
                term = tensor.detach().new_zeros(()) * tensor.sum()
                link = term if link is None else link + term.to(link.dtype)
    return link
