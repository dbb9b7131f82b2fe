"""Flower 1.42 on the same FedAvg workload: `flwr.server.start_server` and three clients.

    python -m benchmarks.flower_legacy run --rounds 20     # prints one JSON line

Flower's deprecated direct-gRPC API (`start_server` / `start_client`, three
persistent client processes, Flower's own `FedAvg` strategy), the fastest of the
ways Flower runs on one machine. The workload is torchrelay's demo, which is the
anchor's (`torchrelay/_federated.py`): the same data split, model, batch orders and
sample-weighted average, one torch thread per process.

Per-round time is measured as the anchor measured it: between the server's
centralized evaluations (so it leaves out that evaluation and start-up). Round 1
includes the clients connecting; the median does not care.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from torchrelay._federated import DIGIT_OWNERS, accuracy, anchor_order, load_digits, make_model

from .processes import free_port

PROCESS_TIMEOUT_S = 600.0


def _weights(model: torch.nn.Module) -> list[Any]:
    return [t.detach().numpy().copy() for t in model.state_dict().values()]


def _load(model: torch.nn.Module, weights: list[Any]) -> None:
    keys = list(model.state_dict())
    model.load_state_dict({k: torch.from_numpy(w.copy()) for k, w in zip(keys, weights,
                                                                          strict=True)})


def _share(position: int) -> tuple[torch.Tensor, torch.Tensor]:
    from torchrelay._federated import permutation  # noqa: PLC0415

    digits = load_digits()
    parts = torch.tensor_split(permutation(len(digits.train_data), seed=0), len(DIGIT_OWNERS))
    return digits.train_data[parts[position]], digits.train_target[parts[position]]


def serve(port: int, rounds: int, result: Path) -> None:
    import flwr  # noqa: PLC0415
    from flwr.common import ndarrays_to_parameters  # noqa: PLC0415
    from flwr.server.strategy import FedAvg  # noqa: PLC0415

    torch.set_num_threads(1)
    digits = load_digits()
    model = make_model()
    entered: dict[int, float] = {}
    left: dict[int, float] = {}
    accuracies: dict[int, float] = {}

    def evaluate(number: int, parameters: Any, config: Any) -> tuple[float, dict[str, float]]:
        entered[number] = time.perf_counter()
        _load(model, parameters)
        accuracies[number] = accuracy(model, digits.test_data, digits.test_target)
        left[number] = time.perf_counter()
        return 0.0, {"accuracy": accuracies[number]}

    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=3,
                      min_evaluate_clients=0, min_available_clients=3, evaluate_fn=evaluate,
                      on_fit_config_fn=lambda number: {"round": number},
                      initial_parameters=ndarrays_to_parameters(_weights(model)))
    flwr.server.start_server(server_address=f"127.0.0.1:{port}",
                             config=flwr.server.ServerConfig(num_rounds=rounds),
                             strategy=strategy)
    round_s = [entered[n] - left[n - 1] for n in range(1, rounds + 1)]
    result.write_text(json.dumps({
        "round_s": round_s, "median_round_s": statistics.median(round_s),
        "sum_round_s": sum(round_s),
        "accuracy_per_round": [accuracies[n] for n in range(1, rounds + 1)],
    }))


def train(port: int, position: int) -> None:
    import flwr  # noqa: PLC0415

    torch.set_num_threads(1)
    data, target = _share(position)
    model = make_model()

    class Client(flwr.client.NumPyClient):  # type: ignore[misc]
        def fit(self, parameters: Any, config: Any) -> tuple[list[Any], int, dict[str, Any]]:
            _load(model, parameters)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            model.train()
            order = anchor_order(int(config["round"]), position, len(data))
            for start in range(0, len(data), 32):
                batch = order[start : start + 32]
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(data[batch]), target[batch])
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
            return _weights(model), len(data), {}

    flwr.client.start_client(server_address=f"127.0.0.1:{port}", client=Client().to_client(),
                             insecure=True)


def run(rounds: int, workdir: Path) -> dict[str, Any]:
    """Start the server and three clients; the server's figures, and the whole run's time."""
    port = free_port()
    result = workdir / "flower.json"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_HOME=str(workdir / "flwr-home"))
    me = [sys.executable, "-m", "benchmarks.flower_legacy"]
    started = time.perf_counter()
    logs = [(workdir / f"{role}.log").open("w") for role in ("server", "c0", "c1", "c2")]
    processes = [subprocess.Popen([*me, "serve", "--port", str(port), "--rounds", str(rounds),
                                   "--result", str(result)], stdout=logs[0],
                                  stderr=subprocess.STDOUT, env=env)]
    try:
        processes += [subprocess.Popen([*me, "train", "--port", str(port), "--position",
                                        str(i)], stdout=logs[i + 1], stderr=subprocess.STDOUT,
                                       env=env) for i in range(3)]
        processes[0].wait(PROCESS_TIMEOUT_S)
        total = time.perf_counter() - started
        if not result.exists():
            raise RuntimeError("the Flower server ended without a result: "
                               + (workdir / "server.log").read_text()[-800:])
        figures: dict[str, Any] = json.loads(result.read_text())
        figures["total_incl_startup_s"] = total
        return figures
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["run", "serve", "train"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--position", type=int)
    parser.add_argument("--result", type=Path)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if args.role == "serve":
        serve(args.port, args.rounds, args.result)
    elif args.role == "train":
        train(args.port, args.position)
    else:
        import tempfile  # noqa: PLC0415

        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="torchrelay-flower-"))
        print(json.dumps(run(args.rounds, workdir)))


if __name__ == "__main__":
    main()
