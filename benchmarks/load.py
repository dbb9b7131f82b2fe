"""A load run: client processes, each with about 1,000 operations over three workers,
pointer chains across them and moves between them, every result checked.

Run by `tests/test_load.py` (which asserts on what it found) and by the faults
measure (which reports it). Each client prints one line, `result <operations>
<wrong>`; a client that hangs is killed at `timeout` and counted as such.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torchrelay as tr

__all__ = ["LoadResult", "run_load"]

_CLIENT = """
import sys, torch, torchrelay as tr
tr.hook(torch)
url, me, rounds, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
wrong = commands = 0
with tr.connect(url, name=me, timeout=120) as fleet:
    workers = [fleet.worker(w) for w in workers]
    for i in range(rounds):
        a, b, c = workers[i % 3], workers[(i + 1) % 3], workers[(i + 2) % 3]
        x = torch.tensor([float(i), 1.0]).send(a)
        chain = x.send(b).send(c)            # c -> b -> a
        y = (chain + 1) * 2                  # run on a, through c and b
        z = (x * 3).move(b)                  # a to b directly
        w = (z + x.clone().move(b)).move(c)  # both on b, then to c
        expected_y = [2.0 * (i + 1), 4.0]
        got_y = y.get().get().get().tolist()
        got_w = w.get().tolist()
        wrong += got_y != expected_y
        wrong += got_w != [4.0 * i, 4.0]
        commands += 20
    fleet.sync()
print("result", commands, wrong, flush=True)
"""


@dataclass(frozen=True, slots=True)
class LoadResult:
    seconds: float
    clients: int
    finished: int
    """Clients that ran to the end and reported (the others failed or hung)."""
    operations: int
    wrong: int
    left: dict[str, int]
    """Objects on each worker once every client had closed."""
    failures: list[str]
    """What the clients that did not finish printed."""


def run_load(url: str, worker_ids: Sequence[str], *, clients: int = 10, rounds: int = 50,
             timeout: float = 600.0, name: str = "load") -> LoadResult:
    """`clients` processes of `rounds` rounds (about 20 operations each) over the three
    workers `worker_ids` at `url`, at once; then how many objects each worker holds."""
    if len(worker_ids) != 3:
        raise ValueError(f"a load run needs three workers, not {len(worker_ids)}")
    started = time.monotonic()
    processes = [subprocess.Popen([sys.executable, "-c", _CLIENT, url, f"{name}{n}",
                                   str(rounds), *worker_ids],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for n in range(clients)]
    finished = operations = wrong = 0
    failures: list[str] = []
    for process in processes:
        try:
            output = process.communicate(timeout=max(1.0, started + timeout - time.monotonic()))[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = f"hung: killed after {timeout:g} s\n{process.communicate()[0]}"
        results = [line.split() for line in output.splitlines() if line.startswith("result ")]
        if process.returncode == 0 and len(results) == 1:
            finished += 1
            operations += int(results[0][1])
            wrong += int(results[0][2])
        else:
            failures.append(output[-2000:])
    seconds = time.monotonic() - started
    return LoadResult(seconds, clients, finished, operations, wrong,
                      _left_once_settled(url, worker_ids, name), failures)


def _left_once_settled(url: str, worker_ids: Sequence[str], name: str) -> dict[str, int]:
    """Objects on each worker, once the deletes down chains (which land a little after
    their clients closed) are through, or after a minute."""
    with tr.connect(url, name=f"{name}-auditor") as auditor:
        deadline = time.monotonic() + 60
        while True:
            left = {w: int(auditor.worker(w).status()["objects"]) for w in worker_ids}
            if not any(left.values()) or time.monotonic() > deadline:
                return left
            time.sleep(0.25)
