"""The torch.distributed.rpc reference: `python -m benchmarks.torch_rpc_child ...`.

Two ranks on loopback with TensorPipe (as the anchors torch_rpc.py and
torch_rpc_pipe.py): rank 0 calls `torch.add` on rank 1, synchronously (latency)
and with `rpc_async` then one wait (throughput). It runs in its own process
group because `init_rpc` owns the process it runs in. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.distributed import rpc
from torch.multiprocessing.spawn import spawn


def _rank(rank: int, options: dict[str, Any], results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(options["port"]))
    backend = rpc.TensorPipeRpcBackendOptions(num_worker_threads=8, _transports=["uv"])
    rpc.init_rpc(  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        f"w{rank}", rank=rank, world_size=2, rpc_backend_options=backend
    )
    try:
        if rank == 0:
            results.put(_measure(options))
    finally:
        rpc.shutdown()


def _measure(options: dict[str, Any]) -> dict[str, Any]:
    x = torch.tensor([1, 2, 3, 4])
    for _ in range(options["warmup"]):
        rpc.rpc_sync("w1", torch.add, args=(x, x))
    latencies = []
    for _ in range(options["sync_iterations"]):
        start = time.perf_counter()
        rpc.rpc_sync("w1", torch.add, args=(x, x))
        latencies.append(time.perf_counter() - start)
    count = options["pipelined"]
    rates = []
    for _ in range(options["rounds"]):
        start = time.perf_counter()
        futures = [rpc.rpc_async("w1", torch.add, args=(x, x)) for _ in range(count)]
        torch.futures.wait_all(futures)
        rates.append(count / (time.perf_counter() - start))
    return {
        "sync_latency_s": latencies,
        "pipelined_ops_per_s": rates,
        "pipelined_ops_per_s_median": statistics.median(rates),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--sync-iterations", type=int, default=3000)
    parser.add_argument("--pipelined", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    options = vars(parser.parse_args())
    results = mp.get_context("spawn").SimpleQueue()
    spawn(_rank, args=(options, results), nprocs=2, join=True)  # type: ignore[no-untyped-call]
    print(json.dumps(results.get()))


if __name__ == "__main__":
    main()
