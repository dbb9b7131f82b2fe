"""FedAvg through a trusted aggregator: models go to the data, only their average comes back.

Each round, every worker with data loads the global model's weights into its
copy of the model and trains it on its own dataset for `local_epochs` (batches
cut on the worker, a remote optimizer, its state reset as a new optimizer's);
then its weights (parameters and buffers, and the mean training loss) go
straight to the aggregator worker, which averages them weighted by sample
count. Only that average is fetched, and becomes the next global model. No
weights of any one worker pass through the client.

How the weights travel depends on the model's size. One smaller than
`STREAMED_FROM` (16 MiB) goes whole: the global weights, flattened, ride with
the owner's run, and its trained weights move to the aggregator as one tensor —
one message each way per owner, and their weighted sum one recorded plan run on the
aggregator while the updates total at most `PLANNED_SUM_BYTES` (op by op past it),
in the owners' order, as a loop's `sum` adds them. A larger one is
streamed: loaded into the owner's model piece by piece and in place (messages of
about 64 MiB, each freed once copied in), its gradients freed after training,
and its trained tensors moved in waves and summed on the aggregator as they come
(`_streamed_sum.py`): no process ever holds more than the model and about one
more copy of it, whatever its size.

A worker's local round is a `Plan`: the first round runs it operation by
operation and records it, later rounds send it as one command whatever the
number of batches.

When the datasets are private (their workers say so), what moves to the
aggregator is each worker's update (its new weights minus the global ones,
flattened into one tensor: clipping bounds the norm of all of it) and
only `tr.aggregate` brings their average back: each update clipped to its
owner's bound, Gaussian noise added, each owner's (ε, δ) budget charged by the
owner's worker (DP-FedAvg, with central DP at the trusted aggregator). The
training loss is private then, and not reported; each round reports the ε
every owner has spent.

When the owners protect records (`unit = "record"` in their privacy policy), a
round is record-level DP-SGD instead: each owner's local epochs are `dp_train`
on its own worker (Poisson sampling, per-example clipping and noise, run and
charged by the owner's worker), each owner releases its trained model, and the
client averages them weighted by sample count — post-processing of releases, no
further noise and no aggregator needed (the models are public once released, so
this holds whoever `aggregator` is). Each round reports each owner's ε; the
per-example loss is recorded once per worker as a plan. The owners' runs are sent
together and waited for together (`round_timeout` does not apply): if one refuses
(its budget is spent) or fails, that round leaves the model as it was, naming it.

A round waits for its workers at most `round_timeout` seconds: one that has not
answered by then (or failed) is left out of that round's average and takes part
again in the next. A round with fewer than `min_workers` leaves the model as it
was. `fit` returns one `RoundResult` per round; a progress bar (tqdm, when it is
installed and `progress` is set) shows the rounds go by.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from torchrelay.broker import Command, Fetch, PrivateDataError, TorchRelayError

from ._data import DatasetPointer, FederatedDataLoader
from ._dp_train import record_loss, release_of, request_for
from ._handles import WorkerHandle
from ._module import ModulePointer, send_module
from ._optim import SGD, RemoteOptimizer
from ._plan_recording import Plan
from ._pointer import PointerTensor
from ._release import aggregate
from ._streamed_sum import WAVE_BYTES, pieces, streamed_sum

__all__ = ["FedAvg", "RoundResult"]

Loss = Callable[[Any, Any], Any]
MakeOptimizer = Callable[[list[PointerTensor]], RemoteOptimizer]
SampleOrder = Callable[[int, int, int], torch.Tensor]
_Sent = TypeVar("_Sent")
LOAD_BYTES = 4 * WAVE_BYTES
"""About how much of the global weights one message to an owner carries: a fraction of a
large model (the owner holds it beside the model for a moment), few publishes."""
STREAMED_FROM = WAVE_BYTES
"""A public round streams a model of this many bytes or more (`_streamed_round`). A
smaller one goes whole, as one flat tensor: its weights ride with the owner's run and
its update moves in one piece, one message each way per owner and one batch to the
aggregator, where streaming would cost three messages per owner and a wait between
them (the digits round: 31 ms against 47 ms)."""


@dataclass
class RoundResult:
    """What one round did."""

    round: int
    participants: list[str]
    samples: int
    loss: float
    """Training loss over the round's participants, weighted by sample count."""
    seconds: float
    left_out: dict[str, str] = field(default_factory=dict)
    """Workers whose update did not count this round, and why."""
    metrics: dict[str, float] = field(default_factory=dict)
    """What `evaluate` said of the model after the round."""
    epsilon: dict[str, float] = field(default_factory=dict)
    """With private datasets: each owner's ε spent so far, this round's release included."""
    delta: dict[str, float] = field(default_factory=dict)

    @property
    def updated(self) -> bool:
        return bool(self.participants)


class FedAvg:
    """Federated averaging of `model` (see the module docstring).

    `loss(output, target)` is computed on the workers (an `F.*` loss, or any
    function of allow-listed operations); `optimizer(parameters)` makes each
    worker's optimizer (default: SGD with lr 0.1). Batches are drawn in an order
    shuffled from `seed`, or, to repeat another system's run exactly, in the
    order `order(round, position, samples)` gives (a permutation of the sample
    indices of the `position`-th dataset in round `round`, both from 1 and 0).

    With owners that protect records, the workers sample the batches themselves
    (expected size `batch_size`) and train with DP-SGD at learning rate `lr`
    (default 0.1) and `noise_multiplier` (default: each owner's least).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Loss,
        *,
        aggregator: WorkerHandle,
        optimizer: MakeOptimizer | None = None,
        local_epochs: int = 1,
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int = 0,
        min_workers: int = 1,
        round_timeout: float = 60.0,
        progress: bool = True,
        order: SampleOrder | None = None,
        lr: float | None = None,
        noise_multiplier: float | None = None,
        secure: bool = False,
        threshold: int | None = None,
    ) -> None:
        if local_epochs < 1 or batch_size < 1 or min_workers < 1 or round_timeout <= 0:
            raise ValueError("local_epochs, batch_size, min_workers and round_timeout must "
                             "be positive")
        self.model = model
        self.loss = loss
        self.aggregator = aggregator
        self.optimizer = optimizer or (lambda parameters: SGD(parameters, lr=0.1))
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.min_workers = min_workers
        self.round_timeout = round_timeout
        self.progress = progress
        self.order = order
        self.lr = 0.1 if lr is None else lr
        self.noise_multiplier = noise_multiplier
        self.secure = secure
        """Average by secure aggregation: `aggregator` learns the sum and nothing else
        (`_secure.py`), with `threshold` owners that must stay to the round's end."""
        self.threshold = threshold
        self._loss_plans: dict[str, PointerTensor] = {}
        """Each worker's per-example loss, recorded once (`dp_train`)."""
        self.history: list[RoundResult] = []
        self._workers: dict[str, _LocalTraining] = {}
        self._weighted_sum = Plan(_weighted_sum)
        """The aggregator's sum of the updates, one command a round after the first."""

    def fit(
        self,
        datasets: Sequence[DatasetPointer],
        rounds: int,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    ) -> list[RoundResult]:
        """Train for `rounds` rounds over `datasets` (one per worker); the history."""
        loader = FederatedDataLoader(datasets, self.batch_size, shuffle=self.shuffle,
                                     seed=self.seed)
        bar = _progress(rounds, self.progress)
        try:
            for _ in range(rounds):
                result = self._round(loader, datasets)
                if evaluate is not None:
                    result.metrics = evaluate(self.model)
                self.history.append(result)
                if bar is not None:
                    bar.set_postfix({"loss": f"{result.loss:.4f}", **{
                        k: f"{v:.4f}" for k, v in result.metrics.items()}})
                    bar.update()
        finally:
            if bar is not None:
                bar.close()
        return self.history

    def _round(self, loader: FederatedDataLoader,
               datasets: Sequence[DatasetPointer]) -> RoundResult:
        started = time.monotonic()
        number = len(self.history) + 1
        if any((d.privacy or {}).get("unit") == "record" for d in datasets):
            return self._record_round(number, started, datasets)
        private = any(d.private for d in datasets)
        if not private and not self.secure and _bytes(self.model) >= STREAMED_FROM:
            return self._streamed_round(number, started, loader, datasets)
        weights = torch.cat([t.detach().float().flatten() for t in _state(self.model)])
        sent: dict[str, tuple[PointerTensor, int]] = {}
        for position, dataset in enumerate(datasets):
            local = self._local_state(dataset, loader, private)
            orders = self._orders(loader, dataset, number, position)
            update = local.train(local.data, local.target, weights, *orders)
            sent[dataset.location.id] = (update if self.secure  # stays with its owner
                                         else update.move_later(self.aggregator), len(dataset))
        arrived, left_out, too_few = self._settle(number, started, sent)
        if too_few is not None:
            return too_few
        if self.secure:
            return self._secure_round(number, started, weights if private else None, arrived,
                                      left_out)
        if private:
            return self._private_round(number, started, weights, arrived, left_out)
        samples = sum(n for _, n in arrived.values())
        shares = [n / samples for _, n in arrived.values()]
        updates = [u for u, _ in arrived.values()]
        if len(updates) * _bytes(self.model) <= PLANNED_SUM_BYTES:
            total = self._weighted_sum(torch.tensor(shares), *updates)
        else:  # op by op: each product and partial sum freed once the next is made
            total = _weighted_sum(shares, *updates)
        average = total.get()
        self._load(average[:-1])
        return RoundResult(number, sorted(arrived), samples, float(average[-1]),
                           time.monotonic() - started, left_out)

    def _streamed_round(self, number: int, started: float, loader: FederatedDataLoader,
                        datasets: Sequence[DatasetPointer]) -> RoundResult:
        """A public round, tensor by tensor (`_streamed_sum.py`): no process holds more
        than the model and about one more copy of it, whatever its size."""
        fleet = self.aggregator.fleet
        state = [t.detach() for t in _state(self.model)]
        trained: dict[str, tuple[list[PointerTensor], int]] = {}
        for position, dataset in enumerate(datasets):
            fresh = dataset.location.id not in self._workers
            local = self._local_state(dataset, loader, False)
            if not fresh:  # (a copy just sent holds these weights already)
                local.load(state, fleet.flush)
            # Published now: what is loaded is freed on the worker before training needs
            # the memory for gradients.
            fleet.flush()
            orders = self._orders(loader, dataset, number, position)
            trained[dataset.location.id] = (list(local.train_public(local.data, local.target,
                                                                    *orders)), len(dataset))
        arrived, left_out, too_few = self._settle(number, started, trained)
        if too_few is not None:
            return too_few
        samples = sum(n for _, n in arrived.values())
        # The average is written straight into a copy-free view of the model where it
        # can be (float32 and contiguous), else into a float32 tensor copied in after.
        into = [t.view(-1) if t.dtype == torch.float32 and t.is_contiguous()
                else torch.zeros(t.numel()) for t in state]
        loss = torch.zeros(1)
        try:
            average = streamed_sum(self.aggregator, {w: r for w, (r, _) in arrived.items()},
                                   {w: n / samples for w, (_, n) in arrived.items()},
                                   [*(t.numel() for t in into), 1])
        except TorchRelayError as e:  # a move failed half-way: the sum is incomplete
            for worker_id in arrived:
                self._workers.pop(worker_id, None)
            return RoundResult(number, [], 0, math.nan, time.monotonic() - started,
                               left_out | {"round": f"the average could not be completed: "
                                                    f"{e}"})
        # (Only the aggregator failing now stops this half-way, raising: the model is
        # then partly the new average.)
        average.fetch_into([*into, loss])
        with torch.no_grad():
            for tensor, flat in zip(state, into, strict=True):
                if flat.data_ptr() != tensor.data_ptr():
                    tensor.copy_(flat.view_as(tensor).to(tensor.dtype))
        return RoundResult(number, sorted(arrived), samples, float(loss),
                           time.monotonic() - started, left_out)

    def _settle(self, number: int, started: float, sent: dict[str, _Sent],
                ) -> tuple[dict[str, _Sent], dict[str, str], RoundResult | None]:
        """Wait for what the round sent, together and at most `round_timeout`: what a
        worker has not done in time does not hold the round up. What arrived, who was
        left out and why, and the round's result if too few took part."""
        failures = self.aggregator.fleet.settle(self.round_timeout)
        left_out = {w: str(failures[w]) for w in sent if w in failures}
        for worker_id in left_out:  # it starts afresh next time: its state may be lost
            self._workers.pop(worker_id, None)
        arrived = {w: result for w, result in sent.items() if w not in failures}
        if len(arrived) >= self.min_workers:
            return arrived, left_out, None
        return arrived, left_out, RoundResult(
            number, [], 0, math.nan, time.monotonic() - started,
            left_out | {"round": f"{len(arrived)} of the min_workers {self.min_workers} "
                                 "took part"})

    def _private_round(self, number: int, started: float, weights: torch.Tensor,
                       arrived: dict[str, tuple[PointerTensor, int]],
                       left_out: dict[str, str]) -> RoundResult:
        """Average the updates with differential privacy; the only thing fetched."""
        try:
            release = aggregate([update for update, _ in arrived.values()],
                                [n for _, n in arrived.values()])
        except PrivateDataError as e:  # an owner refused: k, its budget, trust
            return RoundResult(number, [], 0, math.nan, time.monotonic() - started,
                               left_out | {"round": str(e)})
        self._load(weights + release.get())
        return RoundResult(number, sorted(arrived), sum(n for _, n in arrived.values()),
                           math.nan, time.monotonic() - started, left_out,
                           epsilon=release.epsilon, delta=release.delta)

    def _secure_round(self, number: int, started: float, weights: torch.Tensor | None,
                      arrived: dict[str, tuple[PointerTensor, int]],
                      left_out: dict[str, str]) -> RoundResult:
        """Average the updates by secure aggregation: private ones are the owners'
        differences to `weights` (each owner adds its share of the noise), public ones
        the new weights and the loss."""
        try:
            release = aggregate([update for update, _ in arrived.values()],
                                [n for _, n in arrived.values()], aggregator=self.aggregator,
                                secure=True, threshold=self.threshold)
        except PrivateDataError as e:  # too few survivors, or an owner refused
            return RoundResult(number, [], 0, math.nan, time.monotonic() - started,
                               left_out | {"round": str(e)})
        average = release.get()
        took_part = sorted(set(arrived) - set(release.dropped))
        samples = sum(n for w, (_, n) in arrived.items() if w in took_part)
        left_out |= {w: "dropped out of the secure aggregation round" for w in release.dropped}
        if weights is not None:
            self._load(weights + average)
            return RoundResult(number, took_part, samples, math.nan,
                               time.monotonic() - started, left_out,
                               epsilon=release.epsilon, delta=release.delta)
        self._load(average[:-1])
        return RoundResult(number, took_part, samples, float(average[-1]),
                           time.monotonic() - started, left_out)

    def _record_round(self, number: int, started: float,
                      datasets: Sequence[DatasetPointer]) -> RoundResult:
        """Each owner trains the global model by DP-SGD on its worker and releases it;
        their average, weighted by sample count, is the next global model."""
        fleet = self.aggregator.fleet
        sent = []
        for dataset in datasets:
            worker = dataset.location
            model = send_module(self.model, worker)  # the global weights, public
            plan = self._loss_plans.get(worker.id)
            if plan is None:
                plan = self._loss_plans[worker.id] = record_loss(model, dataset, self.loss)
            command, _, result = request_for(
                model, dataset, plan, lr=self.lr, batch_size=self.batch_size,
                epochs=self.local_epochs, noise_multiplier=self.noise_multiplier)
            sent.append((worker.id, command, model, result, len(dataset)))
        requests: list[tuple[str, Command]] = []
        for worker_id, command, _, result, _ in sent:
            requests.append((worker_id, command))
            if not self.secure:  # (securely, the models leave only in their sum)
                # each release fetched right behind its run: the worker runs them in order
                requests.append((worker_id, Fetch(result.id_at_location)))
        try:  # sent together, so that the owners train at the same time
            replies = fleet.request_many(requests)
        except TorchRelayError as e:  # an owner refused (its budget...), or failed
            who = getattr(e, "worker_id", "") or "round"
            self._loss_plans.pop(who, None)  # recorded again: a restart may have lost it
            return RoundResult(number, [], 0, math.nan, time.monotonic() - started,
                               {who: str(e)})
        samples = sum(n for *_, n in sent)
        if self.secure:
            return self._secure_record_round(number, started, sent, replies)
        average: torch.Tensor | None = None
        epsilon: dict[str, float] = {}
        delta: dict[str, float] = {}
        for position, (_, _, model, result, n) in enumerate(sent):
            result.garbage_collect = False  # fetched
            release = release_of(model, result, replies[2 * position])
            trained = torch.cat([t.detach().float().flatten() for t in _state(
                release.assemble(replies[2 * position + 1]))]) * (n / samples)
            average = trained if average is None else average + trained
            epsilon.update(release.epsilon)
            delta.update(release.delta)
        assert average is not None
        self._load(average)
        return RoundResult(number, sorted(w for w, *_ in sent), samples, math.nan,
                           time.monotonic() - started, epsilon=epsilon, delta=delta)

    def _secure_record_round(self, number: int, started: float, sent: list[Any],
                             reports: list[Any]) -> RoundResult:
        """The owners' DP-SGD models, summed by secure aggregation as they are (an owner
        with `secure_aggregation` keeps its model: it leaves only in the sum)."""
        from ._secure import secure_aggregate  # noqa: PLC0415 (beside _release's)

        model = sent[0][2]
        shapes = [list(p._metadata()[1]) for p in model.pointers()
                  if p._metadata()[0].is_floating_point]
        epsilon: dict[str, float] = {}
        delta: dict[str, float] = {}
        for report in reports:
            epsilon.update(report["epsilon"])
            delta.update(report["delta"])
        try:
            release = secure_aggregate([result for _, _, _, result, _ in sent],
                                       [n for *_, n in sent], self.aggregator,
                                       self.threshold, shapes=shapes, template=model._module)
        except PrivateDataError as e:
            return RoundResult(number, [], 0, math.nan, time.monotonic() - started,
                               {"round": str(e)}, epsilon=epsilon, delta=delta)
        self._load(torch.cat([t.detach().float().flatten() for t in _state(release.get())]))
        took_part = sorted(w for w, *_ in sent if w not in release.dropped)
        return RoundResult(number, took_part, sum(n for w, *_, n in sent if w in took_part),
                           math.nan, time.monotonic() - started,
                           dict.fromkeys(release.dropped, "dropped out of the secure "
                                         "aggregation round"), epsilon=epsilon, delta=delta)

    def _orders(self, loader: FederatedDataLoader, dataset: DatasetPointer, number: int,
                position: int) -> list[torch.Tensor]:
        """The sample indices of each batch of the round, epoch after epoch."""
        samples = len(dataset)
        batches: list[torch.Tensor] = []
        for _ in range(self.local_epochs):
            if self.order is not None:
                order = torch.as_tensor(self.order(number, position, samples))
            else:
                order = loader.order(samples)
            batches += [order[i : i + self.batch_size] for i in range(0, samples,
                                                                      self.batch_size)]
        return batches

    def _local_state(self, dataset: DatasetPointer, loader: FederatedDataLoader,
                     private: bool) -> _LocalTraining:
        worker = dataset.location
        local = self._workers.get(worker.id)
        if local is None:
            remote: ModulePointer = send_module(self.model, worker)
            optimizer = self.optimizer(list(remote.parameters()))
            data, target = loader.tensors(dataset)
            local = self._workers[worker.id] = _LocalTraining(
                remote, optimizer, data, target, self.loss, _layout(self.model), private)
        return local

    def _load(self, flat: torch.Tensor) -> None:
        """Put the averaged weights into the global model."""
        offset = 0
        with torch.no_grad():
            for tensor in _state(self.model):
                size = tensor.numel()
                tensor.copy_(flat[offset : offset + size].view_as(tensor).to(tensor.dtype))
                offset += size


@dataclass
class _LocalTraining:
    """A worker's copy of the model, its optimizer, and its local round as a plan."""

    model: ModulePointer
    optimizer: RemoteOptimizer
    data: PointerTensor
    target: PointerTensor
    loss: Loss
    layout: list[tuple[int, int, torch.Size]]
    """Where each of the model's tensors is in the flat weights: (start, stop, shape)."""
    private: bool
    """Its data is private: the round gives the update (no loss), not the weights."""

    def __post_init__(self) -> None:
        self.train = Plan(self.local_round)
        self.train_public = Plan(self.public_round)

    def load(self, state: list[torch.Tensor], flush: Callable[[], None]) -> None:
        """Copy the global weights into the worker's model in place, piece by piece,
        `flush`ing about every `LOAD_BYTES`: each message is freed on the worker once
        copied in, so it never holds a second copy of the model."""
        remote_state = _state(self.model)
        queued = 0
        for piece in pieces([t.numel() for t in state], WAVE_BYTES // 4):
            remote, tensor = remote_state[piece.tensor], state[piece.tensor]
            if piece.start == 0 and piece.stop == tensor.numel():
                remote.data.copy_(tensor)
            else:
                remote.data.view(-1)[piece.start : piece.stop].copy_(
                    tensor.view(-1)[piece.start : piece.stop])
            queued += (piece.stop - piece.start) * tensor.element_size()
            if queued >= LOAD_BYTES:
                flush()
                queued = 0
        flush()

    def public_round(self, data: Any, target: Any, *batches: Any) -> Any:
        """Train the loaded model on `batches`; its tensors (views: no copy) and the mean
        loss. Gradients are freed before returning: the weights they were for are
        replaced before the next round."""
        total = self._train(data, target, batches)
        return (*[t.detach().float().flatten() for t in _state(self.model)], total)

    def local_round(self, data: Any, target: Any, weights: Any, *batches: Any) -> Any:
        """Load `weights`, train on `batches` (index tensors), return the new weights and
        the mean loss, flattened into one tensor (private data: the new weights minus
        `weights`, and no loss)."""
        state = _state(self.model)
        for tensor, (start, stop, shape) in zip(state, self.layout, strict=True):
            tensor.data.copy_(weights[start:stop].view(shape))
        mean_loss = self._train(data, target, batches)
        trained = [t.detach().float().flatten() for t in state]
        if self.private:
            return torch.cat(trained) - weights
        return torch.cat([*trained, mean_loss])

    def _train(self, data: Any, target: Any, batches: tuple[Any, ...]) -> Any:
        """Train on `batches` (index tensors); the mean loss, a one-element tensor."""
        self.optimizer.reset()
        self.model.train()
        total: Any = None
        samples = 0
        for index in batches:
            self.optimizer.zero_grad()
            loss = self.loss(self.model(data[index]), target[index])
            loss.backward()
            self.optimizer.step()
            size = len(index)
            weighted = loss.detach() * size
            total = weighted if total is None else total + weighted
            samples += size
        self.optimizer.zero_grad()  # (set to None: the gradients' memory goes now)
        return (total / samples).reshape(1)


PLANNED_SUM_BYTES = 16 << 20
"""The updates' bytes up to which the aggregator sums them as one plan run: a plan keeps
every intermediate until it ends (about twice the updates), op by op keeps about two."""


def _weighted_sum(weights: Any, *updates: Any) -> Any:
    """`updates[i] * weights[i]` summed in order; `weights` a float32 tensor (for a plan:
    its values are the run's arguments, not constants) or the same numbers as Python
    floats, which multiply a float32 tensor to the same bits."""
    total = None
    for i, update in enumerate(updates):
        weighted = update * weights[i]
        total = weighted if total is None else total + weighted
    return total


def _bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _state(model))


def _layout(model: nn.Module) -> list[tuple[int, int, torch.Size]]:
    """Where each of the model's tensors is in the flat weights: (start, stop, shape)."""
    layout, offset = [], 0
    for tensor in _state(model):
        layout.append((offset, offset + tensor.numel(), tensor.shape))
        offset += tensor.numel()
    return layout


def _state(module: Any) -> list[Any]:
    """Parameters, then buffers, in a fixed order (the order they are averaged in)."""
    return [*module.parameters(), *module.buffers()]


def _progress(rounds: int, wanted: bool) -> Any:
    if not wanted:
        return None
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415 - an extra: torchrelay[demo]
    except ImportError:
        return None
    return tqdm(total=rounds, desc="FedAvg", unit="round")
