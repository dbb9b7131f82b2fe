"""Training the owner runs itself: `dp_train`, DP-SGD with record-level privacy.

The client names a model (its tensors, here), one of this worker's datasets and a
per-example loss recorded as a plan; the worker runs the whole mechanism
(`_dpsgd.py`) — sampling, per-example gradients, clipping, noise, the optimizer —
and charges its ledger for every step before the first one runs. What it
releases is the trained model, under the owner's name and at the ε charged: it
derives from no one's private data as far as the store is concerned, so it may be
fetched or moved anywhere. Nothing else of the run is kept: per-example
gradients, their noise-free sum, losses and batch membership live and die inside
this handler.

What the client's loss may not do, the worker refuses before spending anything:

- read private data other than its example: every object the plan reads besides
  its parameters must derive from no one's private data (the model's buffers, a
  constant the client sent); the data must be one of this worker's datasets as it
  was loaded, not something derived from it (a derived tensor's row could mix
  several records);
- cross examples: it is evaluated per example, under `vmap`, on a batch of one
  (so `mean` over the batch is the example's own); batch statistics in training
  mode (`batch_norm` with `training=True`) and anything in place are refused
  outright;
- train a model that derives from private data not released (another owner's,
  or this one's outside DP-SGD);
- ask for less noise than the owner's least, or fix the randomness (only a worker
  started for the test suite accepts a `seed`).

The loss is first run on a public example (zeros of the data's shapes): whatever
fails there fails in full view, and says why. What fails on private values
later contributes nothing (`_dpsgd.py`), and says nothing. On a worker daemon a
run ends on the pacer's public schedule (`_pacing.py`) for its size (steps x
expected batch x the model's parameters), `DP_TRAIN_SLACK` times a run over zeros:
how long it took tells of the values only what a schedule's growth tells (a loss
that fails on some values, its batch computed again example by example, can grow
it: one bit).
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any, Final

import torch

from torchrelay.broker import (
    DpTrain,
    ObjectRef,
    OperationRefused,
    PointerRef,
    PrivateDataError,
    is_inplace,
    resolve_op,
)

from .._checks import check_arguments, check_result
from .._datasets import Dataset
from .._dpsgd import DpSgd, DpSgdSettings, PerExampleLoss, sample_rate, steps_for
from .._limits import BudgetExceeded, Limits
from .._pacing import bucket
from .._plans import RecordedPlan
from ._registry import handles
from .privacy import charge_training
from .secure import trained_by_dp_sgd

if TYPE_CHECKING:
    from .._runtime import WorkerRuntime

_REFUSED_OPS: Final = frozenset({"Tensor.backward", "Tensor.retain_grad", "Tensor@grad",
                                 "Tensor@data"})
_REFUSED_PREFIXES: Final = ("Optimizer.", "optim.")
_BATCH_STATISTICS: Final = frozenset({"F.batch_norm", "F.instance_norm"})
DP_TRAIN_SLACK: Final = 1.5
"""A run's schedule over its benign run's time. Less than a small operation's (3x):
a run is hundreds of steps, whose time varies with the Poisson batches' sizes (about
5% over an epoch of 15 expected batches of 32) and the machine's load rather than a
kernel's jitter; a run past it doubles the schedule (a growth, as a failing loss
costs under any slack). Measured: paced at 3x, a private FedAvg round took 2.1-2.8x
Opacus's round; the mechanism itself, unpaced, 0.94x."""


@handles(DpTrain)
def dp_train(worker: WorkerRuntime, command: DpTrain, sender: str) -> dict[str, Any]:
    policy = worker.privacy
    dataset = _dataset(worker, command.dataset, sender)
    data, target = dataset["data"], dataset["target"]
    if len(data) != len(target) or len(data) == 0:
        raise ValueError(f"dataset {command.dataset} has {len(data)} samples and "
                         f"{len(target)} targets: dp_train needs as many, at least one")
    private = dataset.private
    noise = policy.noise_multiplier if command.noise_multiplier is None else (
        command.noise_multiplier)
    if command.seed is not None and not worker.fault_injection:
        raise OperationRefused(
            "dp_train with a seed is refused: the worker's randomness is its own (only a "
            "worker started with --fault-injection, for the test suite, accepts one)")
    settings = DpSgdSettings(clip=policy.clip, noise_multiplier=noise, lr=command.lr,
                             batch_size=command.batch_size, epochs=command.epochs,
                             optimizer=command.optimizer)
    tensors = _model_tensors(worker, command, sender)
    plan = worker.store.use(command.loss, sender).value
    if type(plan) is not RecordedPlan:
        raise OperationRefused(f"object {command.loss} is not a plan")
    if len(plan.parameters) != 2 + len(command.trained) or len(plan.returns) != 1:
        raise TypeError(f"the loss plan takes {len(plan.parameters)} arguments and returns "
                        f"{len(plan.returns)} results: dp_train needs the example, its "
                        f"target and the {len(command.trained)} trained tensors, and a loss")
    loss = PlanLoss(worker, plan, sender)
    by_id = dict(zip(command.tensors, tensors, strict=True))
    parameters = {key: by_id[i].detach().clone()
                  for key, i in zip(plan.parameters[2:], command.trained, strict=True)}
    seed = command.seed if command.seed is not None else secrets.randbits(63)
    mechanism = DpSgd(loss, parameters, settings, torch.Generator().manual_seed(seed))
    _try_on_public_examples(worker, loss, mechanism, data, target)

    rate = sample_rate(len(data), settings.batch_size)
    steps = steps_for(len(data), settings.batch_size, settings.epochs)
    report: dict[str, Any] = {"epsilon": {}, "delta": {}, "noise_multiplier": noise,
                              "noise_std": noise * settings.clip, "steps": steps,
                              "sample_rate": rate, "clip": settings.clip}
    if private:  # the owner's rules, and every step paid for before the first runs
        report["epsilon"][worker.id] = charge_training(worker, noise, rate, steps)
        report["delta"][worker.id] = policy.delta
    pacer = worker.private_execution.pacer if private else None
    # The run's schedule depends on public sizes only: steps, expected batch, model.
    key = ("dp_train", bucket(steps * settings.batch_size * mechanism.size))
    if pacer is not None and not pacer.known(key):
        pacer.calibrated(key, mechanism.benign_seconds(data, target), DP_TRAIN_SLACK)
    started = time.perf_counter()
    try:
        mechanism.run(data, target)
    except Exception as e:  # not the loss's (it cannot fail here): nothing of values
        raise RuntimeError(f"dp_train failed on worker {worker.id!r} "
                           f"({type(e).__name__})") from None
    finally:
        if pacer is not None:  # ends on the schedule, whatever the values made it take
            pacer.pace(key, started)
    trained = dict(zip(command.trained, mechanism.parameters.values(), strict=True))
    released = tuple(trained.get(i, tensor.detach().clone())
                     for i, tensor in zip(command.tensors, tensors, strict=True))
    # Released by its owner: it derives from no one's private data any more — unless
    # the owner lets its data out only in secure aggregates: then the model stays its
    # own, DP already, to leave only summed with others' as it is (`secure.py`).
    held = private and policy.secure_aggregation
    worker.store.put(command.result_id, released[0] if len(released) == 1 else released,
                     frozenset({worker.id}) if held else frozenset(), frozenset({sender}),
                     by=sender)
    if held:
        trained_by_dp_sgd(worker, command.result_id)
    return report


def _dataset(worker: WorkerRuntime, object_id: int, sender: str) -> Dataset:
    entry = worker.store.use(object_id, sender)
    if object_id not in worker.store.owned or type(entry.value) is not Dataset:
        raise OperationRefused(
            f"object {object_id} is not a dataset of worker {worker.id!r}: dp_train trains "
            "on a dataset as its worker loaded it (tr.dp_train(model, dataset, ...) with a "
            "DatasetPointer from search)")
    dataset: Dataset = entry.value
    for key in ("data", "target"):
        if key not in dataset.tensors:
            raise KeyError(f"dataset {object_id} has no {key!r} tensor")
    return dataset


def _model_tensors(worker: WorkerRuntime, command: DpTrain, sender: str,
                   ) -> list[torch.Tensor]:
    """The model's floating-point tensors, public (or released) every one."""
    if len(set(command.tensors)) != len(command.tensors) or not (
            set(command.trained) <= set(command.tensors)) or len(
            set(command.trained)) != len(command.trained):
        raise ValueError("dp_train: the trained tensors must be distinct tensors of the model")
    tensors = []
    for object_id in command.tensors:
        entry = worker.store.use(object_id, sender)
        value = entry.value
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            raise TypeError(f"object {object_id} is not a floating-point tensor: it cannot "
                            "be a trained model's")
        owners = worker.store.owners(entry)
        if owners:
            raise PrivateDataError(
                f"the model's tensor {object_id} derives from private data of "
                f"{', '.join(sorted(owners))}: dp_train trains public models (or models "
                "released by DP-SGD), else what it releases would carry that data")
        tensors.append(value)
    return tensors


class PlanLoss:
    """A loss plan as a function of (parameters, x, y), for `torch.func`; refuses, when
    made, what could read private data beyond its example (see the module docstring)."""

    def __init__(self, worker: WorkerRuntime, plan: RecordedPlan, sender: str) -> None:
        self.x, self.y = plan.parameters[:2]
        made = set(plan.parameters)
        self.constants: dict[int, torch.Tensor] = {}
        self.steps: list[tuple[str, Any, Any, Any, int | None]] = []
        for number, call in enumerate(plan.calls):
            _refuse_op(number, call.op, call.args, call.kwargs)
            for object_id in _references((call.args, call.kwargs)):
                if object_id not in made and object_id not in self.constants:
                    self.constants[object_id] = _constant(worker, object_id, sender)
            op = resolve_op(call.op)
            if call.op == "F.cross_entropy" and _plain_cross_entropy(call.args, call.kwargs):
                op = _class_cross_entropy
            self.steps.append((call.op, op, call.args, call.kwargs, call.result_id))
            if call.result_id is not None:
                made.add(call.result_id)
        self.returned = plan.returns[0]

    def __call__(self, parameters: dict[int, torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor, limits: Limits | None = None) -> torch.Tensor:
        """The loss; with `limits`, each operation's arguments and result checked as a
        call's are (the run on a public example: the private runs repeat its shapes)."""
        scope: dict[int, Any] = {**self.constants, **parameters, self.x: x, self.y: y}
        for name, op, args, kwargs, result_id in self.steps:
            bound_args, bound_kwargs = _bind(args, scope), _bind(kwargs, scope)
            if limits is not None:
                check_arguments(name, bound_args, bound_kwargs, limits)
            result = op(*bound_args, **bound_kwargs)
            if limits is not None:
                check_result(name, result, limits)
            if result_id is not None:
                scope[result_id] = result
        value: torch.Tensor = scope[self.returned]
        return value


def plan_loss(worker: WorkerRuntime, plan: RecordedPlan, sender: str) -> PerExampleLoss:
    """The plan as a function of (parameters, x, y) (see `PlanLoss`)."""
    return PlanLoss(worker, plan, sender)


_CROSS_ENTROPY_DEFAULTS: Final = {"weight": None, "size_average": None, "ignore_index": -100,
                                  "reduce": None, "reduction": "mean", "label_smoothing": 0.0}


def _plain_cross_entropy(args: list[Any], kwargs: dict[str, Any]) -> bool:
    return len(args) == 2 and all(_CROSS_ENTROPY_DEFAULTS.get(k, k) == v
                                  for k, v in kwargs.items())


def _class_cross_entropy(input: torch.Tensor, target: torch.Tensor,
                         **kwargs: Any) -> torch.Tensor:
    """`F.cross_entropy` with its defaults, for class indices: under vmap, torch runs
    cross_entropy through a Python decomposition, the largest part of a small model's
    step; log_softmax and gather are batched natively. The same values (an index out
    of range fails either way, and then the example contributes nothing)."""
    if input.dim() == 2 and not target.is_floating_point():
        return -input.log_softmax(1).gather(1, target.unsqueeze(1)).mean()
    return torch.nn.functional.cross_entropy(input, target, **kwargs)


def _refuse_op(number: int, op: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    if op in _REFUSED_OPS or op.startswith(_REFUSED_PREFIXES):
        raise OperationRefused(f"loss call {number} ({op}) is refused in a per-example loss: "
                               "the worker computes the gradients itself")
    if is_inplace(op) or kwargs.get("inplace") is True:
        raise OperationRefused(f"loss call {number} ({op}) changes a tensor in place: refused "
                               "in a per-example loss (use its out-of-place form)")
    if op in _BATCH_STATISTICS and (kwargs.get("training") or kwargs.get("use_input_stats")
                                    or (len(args) > 5 and args[5] is True)):
        raise OperationRefused(
            f"loss call {number} ({op}) takes statistics over the batch (training mode): "
            "they would mix examples; put the model in eval mode (model.eval()) or use a "
            "per-example normalisation (group or layer norm)")


def _constant(worker: WorkerRuntime, object_id: int, sender: str) -> torch.Tensor:
    entry = worker.store.use(object_id, sender)
    value = entry.value
    if type(value) is PointerRef:
        raise OperationRefused(f"the loss reads object {object_id}, a pointer to worker "
                               f"{value.location!r}: a loss runs where all its data is")
    owners = worker.store.owners(entry)
    if owners:
        raise PrivateDataError(
            f"the loss reads object {object_id}, which derives from private data of "
            f"{', '.join(sorted(owners))}: a per-example loss may read its example, the "
            "model and public values only")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the loss reads object {object_id}, a {type(value).__name__}: a "
                        "loss reads tensors only")
    return value


def _references(value: Any) -> list[int]:
    kind = type(value)
    if kind is ObjectRef:
        return [value.id]
    if kind in (list, tuple):
        return [i for v in value for i in _references(v)]
    if kind is dict:
        return [i for v in value.values() for i in _references(v)]
    return []


def _bind(value: Any, scope: dict[int, Any]) -> Any:
    kind = type(value)
    if kind is ObjectRef:
        return scope[value.id]
    if kind is list:
        return [_bind(v, scope) for v in value]
    if kind is tuple:
        return tuple(_bind(v, scope) for v in value)
    if kind is dict:
        return {k: _bind(v, scope) for k, v in value.items()}
    return value


def _try_on_public_examples(worker: WorkerRuntime, loss: PlanLoss, mechanism: DpSgd,
                            data: torch.Tensor, target: torch.Tensor) -> None:
    """Run the loss once on a public example (zeros of the data's shapes), each operation
    checked against the worker's limits, then the per-example gradients of two: what
    cannot work fails here, in full view, before anything is spent."""
    x = torch.zeros((2, *data.shape[1:]), dtype=data.dtype)
    y = torch.zeros((2, *target.shape[1:]), dtype=target.dtype)
    try:
        with torch.no_grad():
            loss(mechanism.parameters, x[0:1], y[0:1], worker.limits)
        mechanism.check(x, y)
    except (OperationRefused, PrivateDataError, BudgetExceeded):
        raise
    except Exception as e:
        raise OperationRefused(f"the loss cannot run per example on public examples of the "
                               f"data's shapes: {type(e).__name__}: {e}") from None
