"""The noninterference campaign: nothing a client observes depends on private values.

For every allow-listed operation and every argument pattern of the fuzz campaign
(`fuzzing.py`), and for indexing patterns whose index is in range or not, each
tensor argument in turn is made private (derived from the worker's own private
data) and the operation is run, as a worker runs a `call` command, once for each
of several *variants* of that argument: the same shape, dtype, strides and
autograd flags, different values — ordinary ones, zeros, negatives, NaN, ±inf,
the dtype's largest and, for floats, subnormal numbers; for integers, indices in
range and far out of it and the dtype's extremes.

What is compared across the variants is everything a client could observe, and
what it could observe later by using the result:

- the command's reply: success, or the error's type and message;
- the `meta` reply for the result (or an in-place target): dtype, shape,
  requires_grad; the `describe` entries of every object involved; the worker's
  object count, tensor bytes and failed-command count (`status`);
- inside the store, what later commands would show: every private tensor's
  type, shape, dtype, strides and autograd flags, every private Python value
  (a `size()`, a `stride()`), which objects became private, and which tensors
  autograd sees as changed (a later `backward` would fail on those).

A difference is a leak, reported with the operation, the argument and the two
variants. Each case runs in a child process of `fuzzing.run_campaign`, bounded
in time and memory. Outcomes per case: `safe` (the operation ran on private
data), `refused` (it fails or is refused the same way for every variant), or
`leak`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from fuzzing import (
    FAMILY,
    KNOWN_BAD,
    SCALAR_TENSORS,
    TENSORS,
    Alias,
    Case,
    Tensor,
    generic_cases,
    operation_names,
)

from torchrelay.broker import (
    Call,
    Delivery,
    Endpoint,
    Frame,
    Meta,
    ObjectRef,
    decode_reply,
)
from torchrelay.worker import WorkerRuntime
from torchrelay.worker.runtime._commands.tensors import meta
from torchrelay.worker.runtime._limits import Limits
from torchrelay.worker.runtime._privacy import PrivacyPolicy

OWNER = "bob"
CLIENT = "client"

NI_LIMITS = Limits(command_timeout=10.0, max_elements=1 << 24, max_bytes=2 << 30,
                   max_list_elements=1 << 16)


# -- variants: the same tensor in all but its values ------------------------------------------


def _float_values(n: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.finfo(torch.float32)
    generator = torch.Generator().manual_seed(7)
    if name == "ordinary":
        return torch.randn(n, generator=generator, dtype=torch.float64)
    if name == "zeros":
        return torch.zeros(n, dtype=torch.float64)
    if name == "negative":
        return -torch.rand(n, generator=generator, dtype=torch.float64) * 1e3 - 1
    if name == "nan":
        return torch.tensor([math.nan if i % 2 == 0 else 1.0 for i in range(n)])
    if name == "inf":
        return torch.tensor([math.inf if i % 2 == 0 else -math.inf for i in range(n)])
    if name == "huge":
        return torch.full((n,), info.max / 2, dtype=torch.float64)
    if name == "subnormal":
        return torch.full((n,), info.tiny / 4, dtype=torch.float64)
    raise ValueError(name)


def _int_values(n: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    info = torch.iinfo(dtype)
    if name == "zeros":
        return torch.zeros(n, dtype=torch.int64)
    if name == "ones":
        return torch.ones(n, dtype=torch.int64)
    if name == "minus_one":
        return torch.full((n,), -1 if info.min < 0 else 0, dtype=torch.int64)
    if name == "in_range":
        return torch.arange(n, dtype=torch.int64) % 2
    if name == "out_of_range":
        return torch.full((n,), min(1000, info.max), dtype=torch.int64)
    if name == "largest":
        return torch.full((n,), info.max, dtype=torch.int64)
    if name == "smallest":
        return torch.full((n,), info.min, dtype=torch.int64)
    raise ValueError(name)


FLOAT_VARIANTS = ("ordinary", "zeros", "negative", "nan", "inf", "huge", "subnormal")
INT_VARIANTS = ("in_range", "zeros", "ones", "minus_one", "out_of_range", "largest",
                "smallest")
BOOL_VARIANTS = ("mixed", "false", "true")


def variants_of(template: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """`template`'s variants: its shape, dtype, strides, storage size and autograd flags,
    each with other values."""
    dtype = template.dtype
    size = template.untyped_storage().nbytes() // template.element_size()
    made: list[tuple[str, torch.Tensor]] = []
    if dtype is torch.bool:
        names: tuple[str, ...] = BOOL_VARIANTS
    elif dtype.is_floating_point or dtype.is_complex:
        names = FLOAT_VARIANTS
    else:
        names = INT_VARIANTS
    for name in names:
        if dtype is torch.bool:
            flat = {"mixed": torch.arange(size) % 2 == 0, "false": torch.zeros(size) > 0,
                    "true": torch.ones(size) > 0}[name]
        elif dtype.is_complex:
            real = _float_values(size, torch.float32, name)
            flat = torch.complex(real, real.flip(0)).to(dtype)
        elif dtype.is_floating_point:
            flat = _float_values(size, dtype, name).to(dtype)
        else:
            flat = _int_values(size, dtype, name).to(dtype)
        variant = flat.as_strided(template.shape, template.stride(), template.storage_offset())
        if template.requires_grad:
            variant = variant.detach().requires_grad_(True)
        made.append((name, variant))
    return made


# -- cases -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrivateCase:
    """`case`, with its argument at `position` made private."""

    case: Case
    position: Position

    @property
    def op(self) -> str:
        return self.case.op

    @property
    def pattern(self) -> str:
        return f"{self.case.pattern}, argument {self.position} private"

    def __str__(self) -> str:
        return f"{self.case} with argument {self.position} private"


INDEXING: list[Case] = [
    # Index arguments in range or out of it (the variants decide which), private.
    Case("torch.index_select", "index", (Tensor("f3"), 0, Tensor("idx2"))),
    Case("Tensor.index_select", "index", (Tensor("f22"), 1, Tensor("idx2"))),
    Case("torch.gather", "index", (Tensor("f22"), 1, Tensor("idx22"))),
    Case("torch.take", "index", (Tensor("f22"), Tensor("idx2"))),
    Case("torch.take_along_dim", "index", (Tensor("f22"), Tensor("idx22"), 1)),
    Case("Tensor.index_add_", "index", (Tensor("f22"), 0, Tensor("idx2"), Tensor("f22"))),
    Case("torch.index_add", "index", (Tensor("f22"), 0, Tensor("idx2"), Tensor("f22"))),
    Case("Tensor.index_copy_", "index", (Tensor("f22"), 0, Tensor("idx2"), Tensor("f22"))),
    Case("Tensor.index_fill_", "index", (Tensor("f22"), 0, Tensor("idx2"), 1.5)),
    Case("Tensor.scatter_", "index", (Tensor("f22"), 1, Tensor("idx22"), Tensor("f22"))),
    Case("torch.scatter_add", "index", (Tensor("f22"), 1, Tensor("idx22"), Tensor("f22"))),
    Case("Tensor.put_", "index", (Tensor("f22"), Tensor("idx2"), Tensor("fpair"))),
    Case("Tensor.__getitem__", "index", (Tensor("f22"), Tensor("idx2"))),
    Case("getitem", "index", (Tensor("f22"), Tensor("idx2"))),
    Case("getitem", "mask", (Tensor("f22"), Tensor("mask22"))),
    Case("setitem", "index", (Tensor("f22"), Tensor("idx2"), 0.5)),
    Case("setitem", "value", (Tensor("f22"), 0, Tensor("fpair"))),
    Case("F.embedding", "index", (Tensor("idx2"), Tensor("f33"))),
    Case("F.one_hot", "index", (Tensor("idx2"), 3)),
    Case("F.one_hot", "any classes", (Tensor("idx2"),)),
    Case("F.cross_entropy", "target", (Tensor("f23"), Tensor("idx2"))),
    Case("F.nll_loss", "target", (Tensor("f23"), Tensor("idx2"))),
    Case("torch.bincount", "counts", (Tensor("idx2"),)),
    Case("Tensor.nonzero", "where", (Tensor("f22"),)),
    Case("torch.unique", "values", (Tensor("f22"),)),
    Case("torch.masked_select", "mask", (Tensor("f22"), Tensor("mask22"))),
    Case("torch.repeat_interleave", "repeats", (Tensor("f3"), Tensor("idx3"))),
    Case("linalg.cholesky", "positive definite", (Tensor("f22"),)),
    Case("linalg.inv", "invertible", (Tensor("f22"),)),
    Case("linalg.solve", "invertible", (Tensor("f22"), Tensor("f22"))),
    Case("torch.multinomial", "weights", (Tensor("f3"), 2)),
    Case("torch.bernoulli", "probabilities", (Tensor("f22"),)),
    Case("Tensor.item", "value", (Tensor("scalar"),)),
    Case("Tensor.tolist", "values", (Tensor("f22"),)),
    Case("Tensor.__bool__", "truth", (Tensor("scalar"),)),
    Case("Tensor.stride", "strides", (Tensor("transposed"),)),
    Case("Tensor.add_", "requires grad", (Tensor("f22"), Tensor("grad22"))),
    Case("Tensor.mul", "scalar tensor", (Tensor("f22"), Tensor("scalar"))),
]

SIGNATURES: list[Case] = [
    # Operations whose signature the generic patterns do not fit (lists of tensors,
    # dims, weights): each with arguments of the right kinds, so that it runs.
    *(Case(op, "list", ([Tensor("f22"), Tensor("f22")],))
      for op in ("torch.cat", "torch.concat", "torch.concatenate", "torch.stack",
                 "torch.hstack", "torch.vstack", "torch.dstack", "torch.column_stack",
                 "torch.row_stack", "linalg.multi_dot")),
    Case("torch.cat", "list and dim", ([Tensor("f22"), Tensor("f23")],), (("dim", 1),)),
    Case("torch.einsum", "matmul", ("ij,jk->ik", Tensor("f22"), Tensor("f23"))),
    Case("torch.where", "where", (Tensor("mask22"), Tensor("f22"), Tensor("f22"))),
    Case("Tensor.where", "where", (Tensor("f22"), Tensor("mask22"), Tensor("f22"))),
    *(Case(op, "mask", (Tensor("f22"), Tensor("mask22"), 0.5))
      for op in ("torch.masked_fill", "Tensor.masked_fill", "Tensor.masked_fill_")),
    *(Case(op, "mask", (Tensor("f22"), Tensor("mask22"), Tensor("f22")))
      for op in ("torch.masked_scatter", "Tensor.masked_scatter", "Tensor.masked_scatter_")),
    *(Case(op, "index", (Tensor("f22"), 1, Tensor("idx22"), Tensor("f22")))
      for op in ("torch.scatter", "Tensor.scatter", "Tensor.scatter_add", "Tensor.scatter_add_")),
    Case("Tensor.gather", "index", (Tensor("f22"), 1, Tensor("idx22"))),
    *(Case(op, "reduce", (Tensor("f22"), 1, Tensor("idx22"), Tensor("f22"), "sum"))
      for op in ("torch.scatter_reduce", "Tensor.scatter_reduce", "Tensor.scatter_reduce_")),
    *(Case(op, "index", (Tensor("f22"), 0, Tensor("idx2"), Tensor("f22")))
      for op in ("torch.index_copy", "Tensor.index_copy", "Tensor.index_add")),
    *(Case(op, "index", (Tensor("f22"), 0, Tensor("idx2"), Tensor("f22"), "prod"))
      for op in ("torch.index_reduce", "Tensor.index_reduce", "Tensor.index_reduce_")),
    *(Case(op, "index", (Tensor("f22"), 0, Tensor("idx2"), 2.0))
      for op in ("torch.index_fill", "Tensor.index_fill")),
    *(Case(op, "indices", (Tensor("f22"), [Tensor("idx2")], Tensor("fpair")))
      for op in ("torch.index_put", "Tensor.index_put", "Tensor.index_put_")),
    *(Case(op, "narrow", (Tensor("f22"), 0, 0, 1))
      for op in ("torch.narrow", "Tensor.narrow", "torch.narrow_copy", "Tensor.narrow_copy")),
    Case("torch.reshape", "shape", (Tensor("f22"), (4,))),
    Case("torch.flip", "dims", (Tensor("f22"), (0,))),
    Case("torch.permute", "dims", (Tensor("f22"), (1, 0))),
    Case("torch.tile", "dims", (Tensor("f22"), (2,))),
    Case("torch.broadcast_to", "shape", (Tensor("f3"), (2, 3))),
    *(Case(op, "sizes", (Tensor("f3"), [1, 2]))
      for op in ("torch.split_with_sizes", "Tensor.split_with_sizes")),
    *(Case(op, "dim", (Tensor("f22"), 0, (1, 2)))
      for op in ("torch.unflatten", "Tensor.unflatten")),
    Case("Tensor.unfold", "windows", (Tensor("f22"), 0, 1, 1)),
    Case("Tensor.new_full", "size", (Tensor("f22"), (3,), 2.0)),
    *(Case(op, "batched", (Tensor("f234"), Tensor("f243")))
      for op in ("torch.bmm", "Tensor.bmm")),
    *(Case(op, "batched", (Tensor("f33"), Tensor("f234"), Tensor("f243")))
      for op in ("torch.addbmm", "Tensor.addbmm", "Tensor.addbmm_")),
    *(Case(op, "batched", (Tensor("f233"), Tensor("f234"), Tensor("f243")))
      for op in ("torch.baddbmm", "Tensor.baddbmm", "Tensor.baddbmm_")),
    *(Case(op, "matrix-vector", (Tensor("f22"), Tensor("fpair")))
      for op in ("torch.mv", "Tensor.mv")),
    *(Case(op, "matrix-vector", (Tensor("fpair"), Tensor("f22"), Tensor("fpair")))
      for op in ("torch.addmv", "torch.addmv_", "Tensor.addmv", "Tensor.addmv_")),
    *(Case(op, "outer", (Tensor("f22"), Tensor("fpair"), Tensor("fpair")))
      for op in ("torch.addr", "Tensor.addr", "Tensor.addr_")),
    *(Case(op, "rows", (Tensor("f23"),))
      for op in ("torch.cov", "Tensor.cov", "torch.corrcoef", "Tensor.corrcoef")),
    *(Case(op, "renorm", (Tensor("f22"), 2, 0, 1.0))
      for op in ("torch.renorm", "Tensor.renorm", "Tensor.renorm_")),
    Case("Tensor.float_power_", "exponent", (Tensor("d22"), 2)),
    Case("torch.polygamma", "order", (1, Tensor("f22"))),
    *(Case(op, "triangular", (Tensor("f22"), Tensor("f22")), (("upper", True),))
      for op in ("linalg.solve_triangular",)),
    Case("linalg.lstsq", "square", (Tensor("f22"), Tensor("f22"))),
    Case("linalg.tensorsolve", "square", (Tensor("f22"), Tensor("fpair"))),
    Case("torch.lu_unpack", "lu", (Tensor("lu22"), Tensor("pivots2"))),
    *(Case(op, "lu", (Tensor("f22"), Tensor("lu22"), Tensor("pivots2")))
      for op in ("torch.lu_solve", "Tensor.lu_solve")),
    Case("linalg.lu_solve", "lu", (Tensor("lu22"), Tensor("pivots2"), Tensor("f22"))),
    *(Case(op, "qr", (Tensor("f22"), Tensor("fpair")))
      for op in ("torch.orgqr", "Tensor.orgqr", "linalg.householder_product")),
    *(Case(op, "qr", (Tensor("f22"), Tensor("fpair"), Tensor("f22")))
      for op in ("torch.ormqr", "Tensor.ormqr")),
    Case("F.linear", "weights", (Tensor("f23"), Tensor("f33"), Tensor("f3"))),
    Case("F.bilinear", "weights", (Tensor("f23"), Tensor("f23"), Tensor("f133"))),
    Case("F.conv1d", "weights", (Tensor("f118"), Tensor("f113"))),
    Case("F.conv2d", "weights", (Tensor("f1144"), Tensor("f1122"))),
    Case("F.conv_transpose1d", "weights", (Tensor("f118"), Tensor("f113"))),
    Case("F.conv3d", "weights", (Tensor("f11222"), Tensor("f11222"))),
    Case("F.conv_transpose3d", "weights", (Tensor("f11222"), Tensor("f11222"))),
    Case("F.conv_tbc", "weights", (Tensor("f234"), Tensor("f344"), Tensor("f4"))),
    Case("F.batch_norm", "training", (Tensor("f23"), Tensor("f3"), Tensor("f3")),
         (("training", True),)),
    Case("F.batch_norm", "evaluation", (Tensor("f23"), Tensor("f3"), Tensor("f3"))),
    Case("F.layer_norm", "shape", (Tensor("f23"), (3,))),
    Case("F.rms_norm", "shape", (Tensor("f23"), (3,))),
    Case("F.pad", "pad", (Tensor("f22"), (1, 1))),
    Case("F.lp_pool1d", "pool", (Tensor("f118"), 2.0, 2)),
    Case("F.lp_pool2d", "pool", (Tensor("f1144"), 2.0, 2)),
    Case("F.fold", "fold", (Tensor("fold_input"), 5, 2)),
    Case("F.affine_grid", "grid", (Tensor("f123"), (1, 1, 2, 2))),
    Case("F.grid_sample", "grid", (Tensor("f1144"), Tensor("grid"))),
    Case("F.cosine_embedding_loss", "loss", (Tensor("f23"), Tensor("f23"), Tensor("signs2"))),
    Case("F.gaussian_nll_loss", "loss", (Tensor("f23"), Tensor("f23"), Tensor("f23"))),
    Case("F.mse_loss", "loss", (Tensor("f23"), Tensor("f23"))),
    Case("F.binary_cross_entropy_with_logits", "loss", (Tensor("f23"), Tensor("f23"))),
    Case("F.softmax", "dim", (Tensor("f23"), 1)),
    Case("F.dropout", "training", (Tensor("f23"), 0.5)),
    Case("torch.histogramdd", "bins", (Tensor("f23"), [2, 2, 2])),
    Case("Tensor.backward", "gradient", (Tensor("grad22"), Tensor("f22"))),
]

TENSORS.update({
    "f243": lambda: torch.randn(2, 4, 3),
    "f233": lambda: torch.randn(2, 3, 3),
    "f133": lambda: torch.randn(1, 3, 3),
    "f113": lambda: torch.randn(1, 1, 3),
    "f1122": lambda: torch.randn(1, 1, 2, 2),
    "f344": lambda: torch.randn(3, 4, 4),
    "f4": lambda: torch.randn(4),
    "f123": lambda: torch.randn(1, 2, 3),
    "grid": lambda: torch.rand(1, 2, 2, 2) * 2 - 1,
    "signs2": lambda: torch.tensor([1.0, -1.0]),
    "lu22": lambda: torch.linalg.lu_factor(torch.tensor([[4.0, 1.0], [2.0, 3.0]]))[0],
    "pivots2": lambda: torch.tensor([1, 2], dtype=torch.int32),
})

TENSORS.update({
    "idx2": lambda: torch.tensor([0, 1]),
    "idx3": lambda: torch.tensor([1, 0, 2]),
    "idx22": lambda: torch.tensor([[0, 1], [1, 0]]),
    "mask22": lambda: torch.tensor([[True, False], [False, True]]),
    "fpair": lambda: torch.tensor([0.25, 0.75]),
    "f23": lambda: torch.randn(2, 3),
})


Position = tuple[int, ...]
"""Where an argument is: its index, and its index inside a list argument."""


def _positions(case: Case) -> list[Position]:
    found: list[Position] = []
    for i, token in enumerate(case.args):
        if isinstance(token, Tensor):
            found.append((i,))
        elif type(token) is list:
            found += [(i, j) for j, t in enumerate(token) if isinstance(t, Tensor)]
    return found


def _token(args: tuple[Any, ...], position: Position) -> Any:
    token = args[position[0]]
    return token[position[1]] if len(position) > 1 else token


def _values(args: tuple[Any, ...], position: Position, private: torch.Tensor) -> list[Any]:
    """The arguments a case's tokens stand for, `private` at `position`."""
    values: list[Any] = []
    for index, token in enumerate(args):
        if isinstance(token, Tensor):
            values.append(private if (index,) == position else TENSORS[token.kind]())
        elif isinstance(token, Alias):
            values.append(values[token.index])
        elif type(token) is list:
            values.append([(private if (index, j) == position else TENSORS[t.kind]())
                           if isinstance(t, Tensor) else t for j, t in enumerate(token)])
        else:
            values.append(token)
    return values


PUBLIC_SCALARS: list[Any] = [0, 1, -1, 0.5, 2**31, math.nan]
"""The public numbers beside a private tensor: fewer than the fuzz campaign's, which
tries each for crashes (here the private variants are what varies)."""
PUBLIC_INT_PAIRS = [(0, 1), (1, 2**31), (2, 0)]


def _wanted(case: Case) -> bool:
    """Of the fuzz campaign's patterns, those with the public numbers above."""
    scalars = [a for a in case.args if not isinstance(a, Tensor | Alias)]
    if len(scalars) == 1 and case.pattern.split(" and ")[0] in SCALAR_TENSORS:
        return any(scalars[0] is s or (scalars[0] == s and type(scalars[0]) is type(s))
                   for s in PUBLIC_SCALARS)
    if len(scalars) == 2 and " and " in case.pattern:
        return tuple(scalars) in PUBLIC_INT_PAIRS
    return True


def all_cases() -> list[PrivateCase]:
    """The whole campaign, in a fixed order."""
    cases = [case for op in operation_names() for case in generic_cases(op) if _wanted(case)]
    cases += FAMILY + KNOWN_BAD + INDEXING + SIGNATURES
    return [PrivateCase(case, position) for case in cases for position in _positions(case)]


# -- running a case (in a child) -----------------------------------------------------------------


class _Capture(Endpoint):
    """An endpoint that keeps the worker's replies, for the campaign to read."""

    in_process = True
    identity = OWNER
    reply_queue = f"torchrelay.reply.{CLIENT}.campaign"  # the client's, who asks

    def __init__(self) -> None:
        self.replies: list[bytes] = []

    def send_command(self, worker_id: str, type: str, frame: Frame, correlation_id: str,
                     *, confirm: bool = False) -> None:
        raise AssertionError("the campaign's operations reach no other worker")

    def send_reply(self, reply_to: str, type: str, frame: Frame, correlation_id: str) -> None:
        self.replies.append(frame.tobytes())

    def receive(self, timeout: float) -> Delivery | None:
        return None

    def ack(self, delivery: Delivery) -> None:
        pass

    def dead_letter(self, type: str, frame: Frame, correlation_id: str, sender: str,
                    reason: str) -> None:
        pass

    def ensure_worker(self, worker_id: str) -> None:
        pass

    def close(self) -> None:
        pass


class Observer:
    """A worker runtime and what a client could learn from it, command by command."""

    def __init__(self) -> None:
        self.endpoint = _Capture()
        self.runtime = WorkerRuntime(OWNER, self.endpoint, limits=NI_LIMITS,
                                     privacy=PrivacyPolicy())
        self._numbers = 0

    def ask(self, command: Any) -> Any:
        """Send `command` as the client; the reply as the client decodes it."""
        self._numbers += 1
        self.runtime.handle(Delivery(False, command.name, f"campaign.{self._numbers}", CLIENT,
                                     command.encode().tobytes(), self.endpoint.reply_queue))
        (frame,) = self.endpoint.replies
        self.endpoint.replies.clear()
        reply = decode_reply(frame)
        if reply.error is not None:
            return ("error", reply.error.type, reply.error.message)
        return ("ok", _shown(reply.value))

    def observe(self, case: Case, position: Position,
                private: torch.Tensor) -> tuple[Any, ...]:
        """Everything observable of `case` with the argument at `position` replaced by
        `private` (stored as derived from the worker's private data)."""
        store = self.runtime.store
        torch.default_generator.manual_seed(0)
        values = _values(case.args, position, private)
        ids: list[int | None] = []
        tensors: list[torch.Tensor] = []

        def stored(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                object_id = 1000 + len(ids)
                owners = frozenset({OWNER}) if value is private else frozenset()
                store.put(object_id, value, owners, frozenset({CLIENT}))
                if owners:
                    store.spread([value], owners)
                ids.append(object_id)
                tensors.append(value)
                return ObjectRef(object_id)
            if type(value) is list:
                return [stored(v) for v in value]
            return value

        wire = [stored(v) for v in values]
        if not ids or not isinstance(values[0], torch.Tensor):
            ids.insert(0, None)  # the first argument is not a tensor: nothing in place
        versions = [t._version for t in tensors]
        failed = self.runtime.presence.figures()["commands_failed"]
        result_id = None if _inplace(case.op) else 1
        # A result is asked for as `(x + x).get()` asks: the call told to fetch it, which
        # the worker refuses (the result is private) and keeps, as a `fetch` would.
        reply = self.ask(Call(case.op, wire, dict(case.kwargs), result_id,
                              fetch=result_id is not None))
        seen: list[Any] = [reply]
        touched = result_id if result_id is not None else ids[0]
        runtime = self.runtime
        ran = reply[0] == "ok" or _fetch_refused(reply)
        if ran and touched is not None:
            # What `meta` and `describe` answer (their handlers, without the round trip).
            seen.append(_outcome(lambda: meta(runtime, Meta(touched), CLIENT)))
            if touched in store:
                entry = store.get(touched)
                seen.append((_inside(entry.value), sorted(store.owners(entry)),
                             store.describe_one(touched)))
        status = runtime.presence.figures()
        seen.append((status["objects"], status["tensor_bytes"],
                     status["commands_failed"] - failed))
        for object_id in ids:
            if object_id is not None and object_id in store:
                entry = store.get(object_id)
                owners = sorted(store.owners(entry))
                seen.append((object_id, owners, _inside(entry.value),
                             store.describe_one(object_id) if owners else _content(entry.value)))
        seen.append([t._version != v for t, v in zip(tensors, versions, strict=True)])
        for object_id in list(store):
            store.discard(object_id)
        return tuple(seen)


def _fetch_refused(reply: Any) -> bool:
    """Whether `reply` refuses to fetch a call's private result: the call ran."""
    return (reply[0] == "error" and reply[1].endswith(".PrivateDataError")
            and "cannot be fetched" in reply[2])


def _outcome(run: Callable[[], Any]) -> Any:
    try:
        return ("ok", _shown(run()))
    except Exception as e:
        return ("error", type(e).__name__, str(e))


def _content(value: Any) -> Any:
    """A public object's values, exactly (NaN included): they must not have changed."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1).contiguous()
        return (value.dtype, tuple(value.shape), flat.view(torch.uint8).tolist()
                if flat.numel() else [])
    return repr(value)[:200]


def _inplace(op: str) -> bool:
    from torchrelay.broker import is_inplace  # noqa: PLC0415

    return is_inplace(op)


def _shown(value: Any) -> Any:
    """A reply's value as a client sees it (tensors by their metadata and values)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.tolist())
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_shown(v) for v in value]
    return value


def _inside(value: Any, depth: int = 0) -> Any:
    """What later commands could learn of a stored value without reading it: a tensor's
    metadata; a Python value itself (it can size what is made from it)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.stride(), value.requires_grad,
                value.is_leaf)
    if isinstance(value, tuple | list) and depth < 4:
        return (type(value).__name__, [_inside(v, depth + 1) for v in value])
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return (type(value).__name__, value if isinstance(value, int | float | bool | str | None)
            else repr(value)[:200])


_OBSERVER: list[Observer] = []


def run_case(pcase: PrivateCase) -> str:
    """`safe`, `refused`, or `leak|<what differed>`."""
    if not _OBSERVER:
        _OBSERVER.append(Observer())
    observer = _OBSERVER[0]
    torch.default_generator.manual_seed(0)
    template = _template(pcase)
    observed: list[tuple[str, tuple[Any, ...]]] = []
    for name, variant in variants_of(template):
        observed.append((name, observer.observe(pcase.case, pcase.position, variant)))
    first_name, first = observed[0]
    for name, seen in observed[1:]:
        if seen != first:
            return f"leak|{first_name} vs {name}: {_difference(first, seen)}"
    return "safe" if first[0][0] == "ok" or _fetch_refused(first[0]) else "refused"


def _template(pcase: PrivateCase) -> torch.Tensor:
    token = _token(pcase.case.args, pcase.position)
    assert isinstance(token, Tensor)
    made: Callable[[], torch.Tensor] = TENSORS[token.kind]
    return made()


def _difference(first: tuple[Any, ...], other: tuple[Any, ...]) -> str:
    for a, b in zip(first, other, strict=False):
        if a != b:
            return f"{str(a)[:300]} / {str(b)[:300]}"
    return f"{len(first)} observations / {len(other)}"
