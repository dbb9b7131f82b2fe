"""One size of the send+get measure, in a fresh process: `python -m benchmarks.transfer_child`.

A fresh process per size (and per side) because the figure that matters for
large tensors is the client's peak memory, and a process's peak never goes
down: earlier, smaller sizes must not be the ones it reports. Both sides import
torch, so their peaks compare like with like.

- `torchrelay`: `p = t.send(worker); back = p.get()` of a float32 tensor;
- `pika`: the same number of bytes through the bare pika echo server.

Prints one JSON line: the timed round trips, the peak RSS, and the error that
stopped it, if any (a failure is a result here, not a crash).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

import torchrelay as tr

from .baselines import PikaEcho
from .processes import peak_rss_self, rss_bytes
from .session import send


def _torchrelay(args: argparse.Namespace, result: dict[str, Any]) -> None:
    tr.hook(torch)
    tensor = torch.rand(args.mib << 18)  # float32: 4 bytes an element
    result["rss_before_bytes"] = rss_bytes(os.getpid())
    with tr.connect(args.url, name=args.name, timeout=args.timeout) as fleet:
        worker = fleet.worker(args.target)
        for i in range(args.warmup + args.reps):
            start = time.perf_counter()
            pointer = send(tensor, worker)
            back = pointer.get()
            elapsed = time.perf_counter() - start
            if i == 0 and not torch.equal(back, tensor):
                raise ValueError("the tensor came back different")
            del back, pointer
            if i >= args.warmup:
                result["seconds"].append(elapsed)


def _pika(args: argparse.Namespace, result: dict[str, Any]) -> None:
    body = os.urandom(args.mib << 20)
    result["rss_before_bytes"] = rss_bytes(os.getpid())
    echo = PikaEcho(args.url, args.target)
    try:
        for i in range(args.warmup + args.reps):
            start = time.perf_counter()
            back = echo.call(body)
            elapsed = time.perf_counter() - start
            if i == 0 and back != body:
                raise ValueError("the body came back different")
            del back
            if i >= args.warmup:
                result["seconds"].append(elapsed)
    finally:
        echo.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=["torchrelay", "pika"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--target", required=True, help="worker id, or the echo queue")
    parser.add_argument("--name", default="bench-transfer", help="the client's name")
    parser.add_argument("--mib", type=int, required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    result: dict[str, Any] = {"side": args.side, "mib": args.mib, "seconds": [], "error": None}
    try:
        (_torchrelay if args.side == "torchrelay" else _pika)(args, result)
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    result["peak_rss_bytes"] = peak_rss_self()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
