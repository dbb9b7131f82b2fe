"""Flower 1.42's SecAgg+ on the digits workload, in Flower's Simulation Engine.

    /tmp/flwr-secagg-venv/bin/python benchmarks/flower_secaggplus.py [--rounds 10]

Runs in a venv of its own, not torchrelay's (Flower's simulation needs ray):
`python3 -m venv /tmp/flwr-secagg-venv; pip install torch==2.13.0; pip install
"flwr[simulation]==1.42.0" scikit-learn`. `benchmarks/secagg.py` runs it with the
interpreter `$FLOWER_SIM_PYTHON` names and shows its figures beside torchrelay's.

The workload is the Flower anchor's (/work/shared/anchors/flower, task.py) and
`benchmarks/secagg.py`'s: sklearn's digits / 16, a stratified 20 % test split, three
shares of 479, the MLP 64-32-10 from `torch.manual_seed(0)`, one local epoch of SGD
(batch 32, lr 0.1) in the anchor's batch order, FedAvg weighted by sample count.
Two runs of `--rounds` rounds, each its own simulation of 3 supernodes: Flower's
legacy FedAvg strategy under the `DefaultWorkflow`, with the plain fit workflow,
then with `SecAggPlusWorkflow` (all 3 owners share with each other, reconstruction
threshold 2 — torchrelay's default t for 3 owners; Flower's defaults otherwise:
clipping range 8, quantization 2^22, modulus 2^32) and `secaggplus_mod` on the
clients. A round's time is from the end of one centralized evaluation to the start
of the next (the anchor's measure: configure, every client's fit and its messages,
aggregation); the median leaves out round 1, as torchrelay's does. It prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from typing import Any

# Run by path in Flower's Python: the workload beside it is imported by its bare name.
import flower_digits as workload
import numpy as np
import torch
from torch import nn

OWNERS = 3


def _weights(model: nn.Module) -> list[np.ndarray]:
    return [v.detach().numpy().copy() for v in model.state_dict().values()]


def _load(model: nn.Module, weights: list[np.ndarray]) -> None:
    keys = list(model.state_dict())
    model.load_state_dict({k: torch.from_numpy(np.asarray(w, dtype=np.float32).copy())
                           for k, w in zip(keys, weights, strict=True)})


def _client_app(secure: bool) -> Any:
    from flwr.client import ClientApp, NumPyClient  # noqa: PLC0415
    from flwr.client.mod import secaggplus_mod  # noqa: PLC0415

    class Digits(NumPyClient):  # type: ignore[misc]
        def __init__(self, owner: int) -> None:
            torch.set_num_threads(1)
            self.owner = owner
            self.x, self.y = workload.share(owner, OWNERS)

        def fit(self, parameters: list[np.ndarray],
                config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            model = workload.model()
            _load(model, parameters)
            workload.train_epoch(model, self.x, self.y,
                                 1000 * int(config["server-round"]) + self.owner)
            return _weights(model), len(self.x), {}

    def client_fn(context: Any) -> Any:
        return Digits(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])


def _server_app(secure: bool, rounds: int, out: dict[str, Any]) -> Any:
    from flwr.common import ndarrays_to_parameters  # noqa: PLC0415
    from flwr.server import LegacyContext, ServerApp, ServerConfig  # noqa: PLC0415
    from flwr.server.strategy import FedAvg  # noqa: PLC0415
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow  # noqa: PLC0415

    model = workload.model()
    entered: dict[int, float] = {}
    left: dict[int, float] = {}
    accuracy: dict[int, float] = {}

    def evaluate(server_round: int, weights: list[np.ndarray],
                 config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        entered[server_round] = time.perf_counter()
        _load(model, weights)
        accuracy[server_round] = workload.accuracy(model)
        left[server_round] = time.perf_counter()
        return 0.0, {"accuracy": accuracy[server_round]}

    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=OWNERS,
                      min_available_clients=OWNERS, evaluate_fn=evaluate,
                      on_fit_config_fn=lambda server_round: {"server-round": server_round},
                      initial_parameters=ndarrays_to_parameters(_weights(workload.model())))
    app = ServerApp()

    @app.main()  # type: ignore[misc]
    def main(grid: Any, context: Any) -> None:
        torch.set_num_threads(1)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds),
                               strategy=strategy)
        fit = SecAggPlusWorkflow(num_shares=OWNERS, reconstruction_threshold=2) if secure \
            else None
        DefaultWorkflow(fit_workflow=fit)(grid, legacy)
        seconds = [entered[r] - left[r - 1] for r in range(1, rounds + 1)]
        out.update(round_s=seconds, median_s=statistics.median(seconds[1:]),
                   accuracy=accuracy[rounds])

    return app


def run(secure: bool, rounds: int) -> dict[str, Any]:
    from flwr.simulation import run_simulation  # noqa: PLC0415

    out: dict[str, Any] = {}
    started = time.perf_counter()
    run_simulation(server_app=_server_app(secure, rounds, out),
                   client_app=_client_app(secure), num_supernodes=OWNERS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    if "median_s" not in out:
        raise RuntimeError(f"the {'SecAgg+' if secure else 'plain'} simulation ended "
                           "without finishing its rounds (see its log above)")
    out["total_s"] = time.perf_counter() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    import flwr  # noqa: PLC0415

    result: dict[str, Any] = {"flwr": flwr.__version__, "torch": torch.__version__,
                              "rounds": args.rounds, "owners": OWNERS}
    result["plain"] = run(False, args.rounds)
    result["secaggplus"] = run(True, args.rounds)
    print("FLOWER_SECAGGPLUS " + json.dumps(result))


if __name__ == "__main__":
    main()
