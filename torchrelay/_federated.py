"""The federated demo: handwritten digits learnt where they are, only the average leaving.

Three hospitals' worth of data, in miniature: scikit-learn's 8x8 digits, the
training part split in three shares written to files of bob, alice and carol
(`write_shares`), each a worker that loads its own file and offers it under the
tag `#digits`. The client never sees a training sample: it finds the datasets
with `search`, and `FedAvg` trains a copy of its model on each worker and has
the trusted `aggregator` worker average them. The client keeps the held-out
test set, to say how good each round's model is, and compares the result with
the same model trained centrally on all the data (what pooling it would give).

By default the shares are private, as a data owner's worker keeps its data, and
the owners protect *records* (`record_privacy`): each round, every owner's worker
trains the global model on its share by DP-SGD it runs itself (`tr.dp_train`:
Poisson sampling, per-example clipping, Gaussian noise, each step charged to the
owner's budget of ε 3 per record), and releases it; the client averages the
released models. With owner-level privacy (`DEMO_PRIVACY`), nothing derived from
the shares leaves but `tr.aggregate`'s differentially private average, through
secure_worker, which every owner trusts. Each round prints the ε its owners have
spent. With `private=False` the shares are public and FedAvg averages the
weights exactly, as Flower does.

The workload is the one of the Flower anchor (`../shared/anchors/flower`):
digits / 16, a stratified 20 % test split, three shares of 479, an MLP
64-32-10 from `torch.manual_seed(0)`, one local epoch of batches of 32, SGD
with lr 0.1, 20 rounds.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchrelay.client import FedAvg, Fleet, RoundResult

__all__ = [
    "AGGREGATOR",
    "DEMO_PRIVACY",
    "DIGIT_OWNERS",
    "DP_LEARNING_RATE",
    "FederatedRun",
    "NoDatasets",
    "make_model",
    "one_torch_thread",
    "permutation",
    "record_privacy",
    "run_federated",
    "write_configs",
    "write_shares",
]

DIGIT_OWNERS = ("bob", "alice", "carol")
AGGREGATOR = "secure_worker"
DEMO_PRIVACY: dict[str, Any] = {
    "k": 2, "clip": 0.5, "noise_multiplier": 0.3, "epsilon": 250.0, "delta": 1e-5,
    "trusted": [AGGREGATOR],
}
"""The owners' rules in the demo. Three owners are few for differential privacy: at a
noise that keeps accuracy within a few points, epsilon is large (README, "Privacy")."""
TAG = "#digits"
BATCH_SIZE = 32
LEARNING_RATE = 0.1
DP_LEARNING_RATE = 0.5
"""DP-SGD's learning rate: the Opacus anchor's (noisy steps average out over more)."""
SHARE = 479
"""Records in each owner's share of the 1,437 training digits."""


def record_privacy(epsilon: float = 3.0, rounds: int = 20, *, delta: float = 1e-5,
                   samples: int = SHARE, batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    """The owners' rules for record-level privacy: a budget of `epsilon` per record,
    with the least noise that lets `rounds` local epochs of DP-SGD fit in it (asked of
    dp-accounting's RDP accountant, for the steps and sample rate the workers use)."""
    from torchrelay.worker.runtime._dpsgd import sample_rate, steps_for  # noqa: PLC0415
    from torchrelay.worker.runtime._privacy import least_noise  # noqa: PLC0415

    noise = least_noise(epsilon, delta, sample_rate(samples, batch_size),
                        steps_for(samples, batch_size, rounds))
    return {"unit": "record", "clip": 1.0, "noise_multiplier": noise, "epsilon": epsilon,
            "delta": delta}


@dataclass
class Digits:
    train_data: torch.Tensor
    train_target: torch.Tensor
    test_data: torch.Tensor
    test_target: torch.Tensor


def load_digits() -> Digits:
    """The digits, scaled to [0, 1], with the anchor's stratified 20 % test split."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits  # noqa: PLC0415
        from sklearn.model_selection import train_test_split  # noqa: PLC0415
    except ImportError:
        raise SystemExit("the federated demo needs scikit-learn: "
                         "pip install 'torchrelay[demo]'") from None
    digits = sklearn_digits()
    data = (digits.data / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        data, digits.target.astype("int64"), test_size=0.2, stratify=digits.target,
        random_state=0)
    return Digits(torch.from_numpy(x_train), torch.from_numpy(y_train),
                  torch.from_numpy(x_test), torch.from_numpy(y_test))


def write_shares(directory: Path, owners: Sequence[str] = DIGIT_OWNERS) -> dict[str, Path]:
    """Split the training digits among `owners`, one safetensors file each (the
    anchor's split); `{owner: file}`."""
    from safetensors.torch import save_file  # noqa: PLC0415

    digits = load_digits()
    directory.mkdir(parents=True, exist_ok=True)
    order = permutation(len(digits.train_data), seed=0)
    files = {}
    for owner, indices in zip(owners, torch.tensor_split(order, len(owners)), strict=True):
        path = directory / f"{owner}-digits.safetensors"
        save_file({"data": digits.train_data[indices].contiguous(),
                   "target": digits.train_target[indices].contiguous()}, str(path))
        files[owner] = path
    return files


def write_configs(directory: Path, files: dict[str, Path], url: str, *,
                  privacy: dict[str, Any] | None = DEMO_PRIVACY) -> dict[str, Path]:
    """A worker config for each data owner (its dataset listed, private under
    `privacy`, or public without) and for the aggregator, next to the data files;
    `{worker: config file}`. A new demo run starts new budgets: old ledgers go."""
    configs = {}
    quote = json.dumps  # a JSON string is a TOML basic string
    for worker in [*files, AGGREGATOR]:
        lines = ["[worker]", f"id = {quote(worker)}", f"broker = {quote(url)}",
                 'log_level = "INFO"',
                 "torch_threads = 1  # four workers share this machine's cores"]
        if worker in files:
            lines += ["", "[[worker.datasets]]", f"path = {quote(files[worker].name)}",
                      'tags = ["#digits", "#train"]',
                      f"description = {quote(f'8x8 digits, {worker} share')}",
                      f"private = {'true' if privacy else 'false'}"]
            if privacy:
                ledger = directory / f"{worker}.privacy.json"
                ledger.unlink(missing_ok=True)
                lines += ["", "[worker.privacy]",
                          *(f"{key} = {quote(value)}" for key, value in privacy.items()),
                          f"ledger = {quote(ledger.name)}"]
        path = directory / f"{worker}.toml"
        path.write_text("\n".join(lines) + "\n")
        configs[worker] = path
    return configs


def permutation(samples: int, seed: int) -> torch.Tensor:
    """numpy's `default_rng(seed).permutation(samples)`: the anchor's orders exactly."""
    import numpy as np  # noqa: PLC0415 - scikit-learn brings it

    return torch.from_numpy(np.random.default_rng(seed).permutation(samples))


def anchor_order(round_number: int, position: int, samples: int) -> torch.Tensor:
    """The anchor's batch order for the `position`-th share in round `round_number`."""
    return permutation(samples, seed=1000 * round_number + position)



@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread meanwhile, as many as before afterwards: the anchors' setting
    and the daemons' (`--torch-threads 1`). A reference computed in-process then sums
    in their order (on some CPUs a kernel sums in another order on two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@torch.no_grad()
def accuracy(model: nn.Module, data: torch.Tensor, target: torch.Tensor) -> float:
    model.eval()
    return float((model(data).argmax(1) == target).float().mean())


def train_centrally(digits: Digits, epochs: int) -> float:
    """What pooling all the data would give: the same model, `epochs` epochs over all
    the training samples; its test accuracy."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    model.train()
    for epoch in range(1, epochs + 1):
        order = permutation(len(digits.train_data), seed=epoch)
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(digits.train_data[batch]),
                                               digits.train_target[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    return accuracy(model, digits.test_data, digits.test_target)


@dataclass
class FederatedRun:
    history: list[RoundResult]
    central_accuracy: float
    seconds: float
    unit: str | None = None
    """The owners' privacy unit ("record", "owner"), None for public data."""

    @property
    def accuracy(self) -> float:
        return self.history[-1].metrics["accuracy"]


class NoDatasets(LookupError):
    """The digit owners offer no `#digits` dataset to train on."""


def run_federated(
    fleet: Fleet,
    rounds: int = 20,
    *,
    plot: Path | None = None,
    echo: Callable[[str], None] = print,
    progress: bool = False,
) -> FederatedRun:
    """FedAvg over the `#digits` datasets `fleet`'s workers offer, through the worker
    `secure_worker`; prints each round, and the comparison with central training."""
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give
    digits = load_digits()
    owners = [fleet.worker(owner) for owner in DIGIT_OWNERS]
    datasets = [d for owner in owners for d in owner.search(TAG)]
    if not datasets:
        raise NoDatasets(f"none of {', '.join(DIGIT_OWNERS)} offers a dataset tagged {TAG}: "
                         "start workers whose configs list their shares, as configs/ does "
                         "(torchrelay fleet up configs/fleet.toml)")
    echo(f"Found {len(datasets)} datasets tagged {TAG}; the client has seen none of them:")
    for dataset in datasets:
        echo(f"  {dataset!r}")
    model = make_model()
    private = any(d.private for d in datasets)
    policy = datasets[0].privacy or {}
    records = policy.get("unit") == "record"
    fedavg = FedAvg(model, nn.functional.cross_entropy, aggregator=fleet.worker(AGGREGATOR),
                    batch_size=BATCH_SIZE, order=anchor_order, progress=progress,
                    lr=DP_LEARNING_RATE)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"accuracy": accuracy(model, digits.test_data, digits.test_target)}

    if records:
        echo(f"\nThe shares are private: FedAvg with differential privacy per record, {rounds} "
             f"rounds. Each owner's worker trains on its share by DP-SGD it runs itself "
             f"(Poisson sampling of batches of {BATCH_SIZE} expected, per-example clipping "
             f"at {policy.get('clip')}, noise multiplier {policy.get('noise_multiplier'):.4g}, "
             f"lr {DP_LEARNING_RATE}) and releases its model; the client averages them. "
             f"Budget: epsilon {policy.get('epsilon')} per record at delta "
             f"{policy.get('delta')}.")
        echo(" round  workers  samples  epsilon spent  test accuracy  seconds")
    elif private:
        echo(f"\nThe shares are private: FedAvg with differential privacy, {rounds} rounds. "
             f"Only {AGGREGATOR}'s noisy average of the clipped updates reaches the client "
             f"(clip {policy.get('clip')}, noise multiplier {policy.get('noise_multiplier')},"
             f" budget epsilon {policy.get('epsilon')} at delta {policy.get('delta')}).")
        echo(" round  workers  samples  epsilon spent  test accuracy  seconds")
    else:
        echo(f"\nFedAvg, {rounds} rounds; only the aggregator's average reaches the client.")
        echo(" round  workers  samples  train loss  test accuracy  seconds")
    started = time.monotonic()
    for _ in range(rounds):
        result = fedavg.fit(datasets, 1, evaluate)[-1]
        shown = (max(result.epsilon.values(), default=math.nan) if private else result.loss)
        echo(f"{result.round:6d}  {len(result.participants):7d}  {result.samples:7d}  "
             f"{shown:{13 if private else 10}.4f}  {result.metrics['accuracy']:13.4f}  "
             f"{result.seconds:7.3f}")
        for worker, reason in result.left_out.items():
            echo(f"        left out: {worker}: {reason}")
    seconds = time.monotonic() - started
    central = train_centrally(digits, rounds)
    run = FederatedRun(fedavg.history, central, seconds,
                       policy.get("unit") if private else None)
    echo(f"\nFederated: test accuracy {run.accuracy:.4f} after {rounds} rounds "
         f"({seconds:.1f} s). Central training on all the data, {rounds} epochs: "
         f"{central:.4f} ({run.accuracy / central:.1%} of it).")
    if private:
        spent = {o: e for r in run.history for o, e in r.epsilon.items()}
        delta = next((d for r in run.history for d in r.delta.values()), math.nan)
        echo("Privacy spent, at delta " + f"{delta:g}: " + ", ".join(
            f"{owner} epsilon {epsilon:.{2 if records else 1}f}"
            for owner, epsilon in sorted(spent.items()))
            + (" per record." if records else ". Three owners are few: the noise that keeps "
               "accuracy costs a large epsilon."))
    if plot is not None:
        _plot(run, plot)
        echo(f"Plot written to {plot}")
    return run


def _plot(run: FederatedRun, path: Path) -> None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")  # a file, no display
        from matplotlib import pyplot  # noqa: PLC0415
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'torchrelay[demo]'") from None
    rounds = [r.round for r in run.history]
    figure, (loss_axes, accuracy_axes) = pyplot.subplots(1, 2, figsize=(10, 4))
    if any(r.epsilon for r in run.history):
        loss_axes.plot(rounds, [max(r.epsilon.values(), default=math.nan)
                                for r in run.history], marker="o", color="tab:red")
        loss_axes.set(xlabel="round", ylabel="epsilon spent (each owner)",
                      title="Privacy spent (delta 1e-05, RDP accountant)")
        if run.unit == "record":
            loss_axes.set(ylabel="epsilon spent per record (each owner)",
                          title="Record-level privacy spent (delta 1e-05, RDP)")
    else:
        loss_axes.plot(rounds, [r.loss for r in run.history], marker="o")
        loss_axes.set(xlabel="round", ylabel="mean training loss on the workers",
                      title="Training loss (reported by the workers)")
    accuracy_axes.plot(rounds, [r.metrics["accuracy"] for r in run.history], marker="o",
                       label="FedAvg (bob, alice, carol)")
    accuracy_axes.axhline(run.central_accuracy, color="grey", linestyle="--",
                          label="central training, same epochs")
    accuracy_axes.set(xlabel="round", ylabel="test accuracy", title="Held-out digits")
    accuracy_axes.legend(loc="lower right")
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
