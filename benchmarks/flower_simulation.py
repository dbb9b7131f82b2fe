"""Flower 1.42's Simulation Engine on the anchor's digits workload with N clients.

    python benchmarks/flower_simulation.py --clients 100 --rounds 20 --out result.json

Run by `benchmarks/owners.py` in a Python that has `flwr[simulation]` (Ray), which
the dev extra does not install: the anchor's setup (`../shared/anchors/flower`),
or `TORCHRELAY_FLOWER_PYTHON`. It is the anchor's ServerApp and ClientApp (Flower's
own message-API `FedAvg`, one local epoch per client in the anchor's batch order)
with the training data split in N shares instead of 3, run through
`flwr.simulation.run_simulation` (the Ray backend, one CPU per client, as Flower's
default). A round is timed as the anchor times it: between the server's held-out
evaluations, so it leaves out start-up and evaluation. It imports neither
torchrelay nor this package: only flwr and `flower_digits.py` beside it (torch,
numpy, scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

# Run by path in Flower's Python: the workload beside it is imported by its bare name.
import flower_digits as workload
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation


def run(clients: int, rounds: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        partition = int(context.node_config["partition-id"])
        x, y = workload.share(partition, int(context.node_config["num-partitions"]))
        model = workload.model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        workload.train_epoch(model, x, y, seed=1000 * int(msg.content["config"]["server-round"])
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
        model = workload.model()

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            entered[server_round] = time.time()
            model.load_state_dict(arrays.to_torch_state_dict())
            accuracies[server_round] = workload.accuracy(model)
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
