"""`tr.dp_train`: a model trained on an owner's records by DP-SGD the owner's worker runs.

    release = tr.dp_train(model_ptr, dataset_ptr, F.cross_entropy, lr=0.5, batch_size=32)
    model = release.get()        # the trained module: released by its owner
    release.epsilon              # {"bob": 0.41}: the owner's spend so far, per record

The client chooses the knobs (optimizer, learning rate, expected batch size,
epochs, a noise multiplier no lower than the owner's); the worker runs the
mechanism — Poisson sampling from its own randomness, per-example gradients,
clipping to the owner's bound, Gaussian noise, the steps — and charges every
step to the owner's budget before the first runs (see
`worker/runtime/_commands/training.py`). The loss and the model's forward
travel as a plan recorded here once, on a public example of the data's shapes:
operations, not code, which the worker evaluates per example so that no
operation can see two records.

The owner must protect records (`unit = "record"` in its `[worker.privacy]`); a
public dataset trains the same way, charged to no one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchrelay.broker import DefinePlan, DpTrain, OperationRefused

from ._data import DatasetPointer
from ._module import ModulePointer, _tensors
from ._plan_recording import Capture
from ._pointer import PointerTensor, send
from ._release import Release

__all__ = ["dp_train"]

Loss = Callable[[Any, Any], Any]


def dp_train(
    model_ptr: ModulePointer,
    dataset_ptr: DatasetPointer,
    loss: Loss,
    *,
    optimizer: str = "sgd",
    lr: float,
    batch_size: int,
    epochs: int = 1,
    noise_multiplier: float | None = None,
) -> Release:
    """Train `model_ptr` on `dataset_ptr` (on one worker) with DP-SGD run by that
    worker; see the module docstring. `loss(output, target)` is computed per example
    (`optimizer`: "sgd" or "adam"; `noise_multiplier`: the owner's least if None).
    The model pointer itself is left as it was; the release holds the trained one."""
    return _train(model_ptr, dataset_ptr, loss, optimizer=optimizer, lr=lr,
                  batch_size=batch_size, epochs=epochs, noise_multiplier=noise_multiplier)


def request_for(
    model_ptr: ModulePointer,
    dataset_ptr: DatasetPointer,
    loss: Loss | PointerTensor,
    *,
    optimizer: str = "sgd",
    lr: float,
    batch_size: int,
    epochs: int = 1,
    noise_multiplier: float | None = None,
    seed: int | None = None,
) -> tuple[DpTrain, PointerTensor, PointerTensor]:
    """The `dp_train` command for these arguments (the loss recorded as a plan unless
    given as one), the plan's pointer and the pointer its release will be under; for
    callers that send several at once (FedAvg)."""
    worker = model_ptr.location
    if dataset_ptr.location.id != worker.id:
        raise ValueError(f"the model is on {worker.id!r} and the dataset on "
                         f"{dataset_ptr.location.id!r}: dp_train runs where the data is "
                         "(send the model there)")
    plan = loss if isinstance(loss, PointerTensor) else record_loss(model_ptr, dataset_ptr,
                                                                    loss)
    fleet = worker.fleet
    result = PointerTensor(worker, fleet.new_id())
    floating = [p for p in model_ptr.pointers() if p._metadata()[0].is_floating_point]
    command = DpTrain(plan.id_at_location, dataset_ptr.id_at_location,
                      [p.id_at_location for p in floating],
                      [p.id_at_location for p in _trained(model_ptr)], result.id_at_location,
                      optimizer, float(lr), int(batch_size), int(epochs),
                      None if noise_multiplier is None else float(noise_multiplier), seed)
    return command, plan, result


def release_of(model_ptr: ModulePointer, result: PointerTensor,
               report: dict[str, Any]) -> Release:
    """The `Release` a `dp_train` command's reply describes."""
    return Release(result, report["epsilon"], report["delta"], report["noise_std"],
                   model_ptr._module, noise_multiplier=report["noise_multiplier"],
                   steps=report["steps"], sample_rate=report["sample_rate"])


def _train(model_ptr: ModulePointer, dataset_ptr: DatasetPointer, loss: Loss, *,
           seed: int | None = None, **options: Any) -> Release:
    command, _plan, result = request_for(model_ptr, dataset_ptr, loss, seed=seed, **options)
    worker = model_ptr.location
    report = worker.fleet.request(worker.id, command)
    return release_of(model_ptr, result, report)


def record_loss(model_ptr: ModulePointer, dataset_ptr: DatasetPointer,
                loss: Loss) -> PointerTensor:
    """`loss(model(x), y)` recorded as a plan on the model's worker, run once on a public
    example (zeros of the dataset's shapes, a batch of one): its parameters are the
    example, its target, then the model's parameters; a pointer to it."""
    worker = model_ptr.location
    fleet = worker.fleet
    for module in model_ptr._module.modules():
        # The worker refuses it too; said here, before a batch of one fails to record.
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.training:
            raise OperationRefused(
                f"{type(module).__name__} in training mode takes statistics over the "
                "batch: they would mix examples; put the model in eval mode "
                "(model.eval()) or use a per-example normalisation (group or layer norm)")
    data_dtype, data_shape = dataset_ptr.tensors["data"]
    target_dtype, target_shape = dataset_ptr.tensors["target"]
    x = send(torch.zeros((1, *data_shape[1:]), dtype=data_dtype), worker)
    y = send(torch.zeros((1, *target_shape[1:]), dtype=target_dtype), worker)
    if fleet.capture is not None:
        raise RuntimeError("dp_train ran while a plan was being recorded; plans do not nest")
    capture = fleet.capture = Capture(worker.id)
    try:
        output = loss(model_ptr(x), y)
    finally:
        fleet.capture = None
    made = {call.result_id for call in capture.calls}
    reason = capture.broken
    if reason is None and not (isinstance(output, PointerTensor)
                               and output.id_at_location in made):
        reason = "it did not compute a loss on the worker"
    if reason is not None:
        raise TypeError(f"the loss cannot be sent to the worker as a plan: {reason}")
    assert isinstance(output, PointerTensor)
    plan = PointerTensor(worker, fleet.new_id())  # deletes the plan when it dies
    fleet.post(worker.id, DefinePlan(
        plan.id_at_location,
        [x.id_at_location, y.id_at_location, *(p.id_at_location for p in _trained(model_ptr))],
        [call.fields() for call in capture.calls], [output.id_at_location]))
    return plan


def _trained(model_ptr: ModulePointer) -> list[PointerTensor]:
    """The model's parameters (not its buffers), each once, floating-point."""
    seen: dict[int, PointerTensor] = {}
    for is_parameter, _, _, pointer in _tensors(model_ptr._module):
        if is_parameter and isinstance(pointer, PointerTensor):
            seen.setdefault(id(pointer), pointer)
    return [p for p in seen.values() if p._metadata()[0].is_floating_point]
