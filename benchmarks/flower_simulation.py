"""Flower 1.42's Simulation Engine on the anchor's digits workload with N clients.

    python -m benchmarks.flower_simulation --clients 100 --rounds 20 --out result.json

Run by `benchmarks/owners.py` in a Python that has `flwr[simulation]` (Ray), which
the dev extra does not install: the anchor's setup (`../shared/anchors/flower`),
or `TORCHRELAY_FLOWER_PYTHON`. It is the anchor's ServerApp and ClientApp (Flower's
own message-API `FedAvg`, one local epoch per client in the anchor's batch order)
with the training data split in N shares instead of 3, run through
`flwr.simulation.run_simulation` (the Ray backend, one CPU per client, as Flower's
default). A round is timed as the anchor times it: between the server's held-out
evaluations, so it leaves out start-up and evaluation. Self-contained: it imports
neither torchrelay nor this package, only torch, numpy, scikit-learn and flwr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

BATCH, LR = 32, 0.1
_DATA: dict[str, Any] = {}


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if "split" not in _DATA:
        digits = load_digits()
        data = (digits.data / 16.0).astype(np.float32)
        _DATA["split"] = train_test_split(data, digits.target.astype(np.int64), test_size=0.2,
                                          stratify=digits.target, random_state=0)
    x_train, x_test, y_train, y_test = _DATA["split"]
    return x_train, y_train, x_test, y_test


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _share(partition: int, partitions: int) -> tuple[np.ndarray, np.ndarray]:
    x_train, y_train, _, _ = _digits()
    indices = np.array_split(np.random.default_rng(0).permutation(len(x_train)),
                             partitions)[partition]
    return x_train[indices], y_train[indices]


def _train_epoch(model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int) -> None:
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
def _accuracy(model: nn.Module) -> float:
    _, _, x_test, y_test = _digits()
    model.eval()
    return float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())


def run(clients: int, rounds: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        partition = int(context.node_config["partition-id"])
        x, y = _share(partition, int(context.node_config["num-partitions"]))
        model = _model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        _train_epoch(model, x, y, seed=1000 * int(msg.content["config"]["server-round"])
                     + partition)
        return Message(content=RecordDict({
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(x)})}), reply_to=msg)

    server_app = ServerApp()
    entered: dict[int, float] = {}
    left: dict[int, float] = {}
    accuracies: dict[int, float] = {}

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        model = _model()

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            entered[server_round] = time.time()
            model.load_state_dict(arrays.to_torch_state_dict())
            accuracies[server_round] = _accuracy(model)
            left[server_round] = time.time()
            return MetricRecord({"accuracy": accuracies[server_round]})

        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
               min_available_nodes=clients).start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
            evaluate_fn=evaluate)

    started = time.time()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}})
    round_s = [entered[r] - left[r - 1] for r in range(1, rounds + 1)]
    return {"clients": clients, "rounds": rounds, "round_s": round_s,
            "median_round_s": statistics.median(round_s),
            "total_incl_startup_s": time.time() - started,
            "accuracy_per_round": [accuracies[r] for r in range(1, rounds + 1)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", required=True, help="where the result JSON goes")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    result = run(args.clients, args.rounds)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
