"""The anchor's digits workload for the scripts run in Flower's own Python.

`flower_simulation.py` and `flower_secaggplus.py` run in a venv with
`flwr[simulation]` (Ray), which neither imports torchrelay nor this package: they
are run by path, so this module, beside them, is imported by its bare name. Only
torch, numpy and scikit-learn: the split, the shares, the model, one local epoch
and held-out accuracy, as `../shared/anchors/flower` defines them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["BATCH", "LR", "accuracy", "digits", "model", "share", "train_epoch"]

BATCH, LR = 32, 0.1
_SPLIT: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): pixels / 16, a stratified 20% test split."""
    if not _SPLIT:
        from sklearn.datasets import load_digits  # noqa: PLC0415
        from sklearn.model_selection import train_test_split  # noqa: PLC0415

        loaded = load_digits()
        data = (loaded.data / 16.0).astype(np.float32)
        x_train, x_test, y_train, y_test = train_test_split(
            data, loaded.target.astype(np.int64), test_size=0.2, stratify=loaded.target,
            random_state=0)
        _SPLIT.append((x_train, y_train, x_test, y_test))
    return _SPLIT[0]


def share(partition: int, partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """Share `partition` of the training data cut in `partitions`."""
    x_train, y_train, _, _ = digits()
    indices = np.array_split(np.random.default_rng(0).permutation(len(x_train)),
                             partitions)[partition]
    return x_train[indices], y_train[indices]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def train_epoch(model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int) -> None:
    """One local epoch of SGD in batches of `BATCH`, in an order drawn from `seed`."""
    data, target = torch.from_numpy(x), torch.from_numpy(y)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    for start in range(0, len(x), BATCH):
        batch = order[start : start + BATCH]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data[batch]), target[batch]).backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module) -> float:
    _, _, x_test, y_test = digits()
    model.eval()
    return float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
