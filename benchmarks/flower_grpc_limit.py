"""Does Flower move a model of a given size with its default gRPC settings?

    python -m benchmarks.flower_grpc_limit run --bytes 400000000   # prints one JSON line

Flower 1.42's direct-gRPC API (`flwr.server.start_server` / `flwr.client.start_client`,
as `flower_legacy.py` runs it) caps every gRPC message at `grpc_max_message_length`,
whose default is `flwr.common.GRPC_MAX_MESSAGE_LENGTH` (536,870,912 bytes, 512 MiB),
on both ends. A model travels whole in one message (the server's `FitIns`, the
client's `FitRes`), so a model above the cap fails (gRPC's RESOURCE_EXHAUSTED, as
a user's 544 MB GPT-2 update did: flower#3006) unless both ends raise the setting.

One round of Flower's own `FedAvg`, one client, a model of one float32 array of
`--bytes` bytes, every setting left at its default. The result: whether the round
aggregated the client's model, the error that stopped it, the time, and each
process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .processes import free_port

ROUND_TIMEOUT_S = 120.0


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def serve(port: int, size: int, result: Path) -> None:
    import flwr  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flwr.common import ndarrays_to_parameters  # noqa: PLC0415
    from flwr.server.strategy import FedAvg  # noqa: PLC0415

    outcome: dict[str, Any] = {"results": 0, "failures": []}

    class Recording(FedAvg):  # type: ignore[misc]
        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            outcome["results"] = len(results)
            outcome["failures"] = [repr(f)[:300] for f in failures]
            return super().aggregate_fit(server_round, results, failures)

    weights = [np.zeros(size // 4, dtype=np.float32)]
    strategy = Recording(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=1,
                         min_evaluate_clients=0, min_available_clients=1,
                         initial_parameters=ndarrays_to_parameters(weights))
    del weights
    started = time.perf_counter()
    flwr.server.start_server(server_address=f"127.0.0.1:{port}",
                             config=flwr.server.ServerConfig(num_rounds=1,
                                                             round_timeout=ROUND_TIMEOUT_S),
                             strategy=strategy)
    outcome["seconds"] = time.perf_counter() - started
    outcome["peak_rss_bytes"] = _peak_rss()
    result.write_text(json.dumps(outcome))


def train(port: int, result: Path) -> None:
    import flwr  # noqa: PLC0415

    class Client(flwr.client.NumPyClient):  # type: ignore[misc]
        def fit(self, parameters: Any, config: Any) -> tuple[list[Any], int, dict[str, Any]]:
            return parameters, 1, {}

    try:
        flwr.client.start_client(server_address=f"127.0.0.1:{port}",
                                 client=Client().to_client(), insecure=True)
        error = None
    except Exception as e:  # the failure is the result
        error = f"{type(e).__name__}: {e}"[:500]
    result.write_text(json.dumps({"error": error, "peak_rss_bytes": _peak_rss()}))


def run(size: int, workdir: Path) -> dict[str, Any]:
    """One round at `size` bytes with the defaults; what happened."""
    from flwr.common import GRPC_MAX_MESSAGE_LENGTH  # noqa: PLC0415

    port = free_port()
    served, trained = workdir / "server.json", workdir / "client.json"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_HOME=str(workdir / "flwr-home"))
    me = [sys.executable, "-m", "benchmarks.flower_grpc_limit"]
    started = time.perf_counter()
    server = subprocess.Popen([*me, "serve", "--port", str(port), "--bytes", str(size),
                               "--result", str(served)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(3.0)  # (start_server takes a moment to listen)
    client = subprocess.Popen([*me, "train", "--port", str(port), "--result", str(trained)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    deadline = ROUND_TIMEOUT_S + 120.0
    try:
        _, client_log = client.communicate(timeout=deadline)
        _, server_log = server.communicate(timeout=deadline)
    finally:
        for process in (client, server):
            if process.poll() is None:
                process.kill()
                process.wait()
    seconds = time.perf_counter() - started
    ours = json.loads(served.read_text()) if served.exists() else {}
    theirs = json.loads(trained.read_text()) if trained.exists() else {}
    logs = f"{client_log}\n{server_log}"
    exhausted = [line.strip() for line in logs.splitlines() if "RESOURCE_EXHAUSTED" in line
                 or "larger than max" in line]
    return {
        "bytes": size, "setting": "grpc_max_message_length",
        "default": GRPC_MAX_MESSAGE_LENGTH,
        "aggregated": ours.get("results", 0) == 1 and not ours.get("failures"),
        "failures": ours.get("failures"), "client_error": theirs.get("error"),
        "resource_exhausted": exhausted[:3], "seconds": seconds,
        "server_peak_rss_bytes": ours.get("peak_rss_bytes"),
        "client_peak_rss_bytes": theirs.get("peak_rss_bytes"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["run", "serve", "train"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--bytes", type=int, default=400_000_000)
    parser.add_argument("--result", type=Path)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if args.role == "serve":
        serve(args.port, args.bytes, args.result)
    elif args.role == "train":
        train(args.port, args.result)
    else:
        import tempfile  # noqa: PLC0415

        with tempfile.TemporaryDirectory(prefix="flower-grpc-") as workdir:
            print(json.dumps(run(args.bytes, args.workdir or Path(workdir))), flush=True)


if __name__ == "__main__":
    main()
