"""A load run: 10 client processes, each with about 1,000 operations over 3 workers
with pointer chains across them and moves between them, every result checked; then
nothing is left on any worker (RabbitMQ, daemons)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torchrelay as tr
from torchrelay.worker import WorkerProcesses

CLIENTS = 10
ROUNDS = 50  # ~20 commands each: ~1,000 operations per client

_CLIENT = """
import sys, torch, torchrelay as tr
tr.hook(torch)
url, me, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
wrong = commands = 0
with tr.connect(url, name=me, timeout=120) as fleet:
    workers = [fleet.worker(w) for w in ("w0", "w1", "w2")]
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


def test_ten_clients_with_chains_over_three_workers_get_every_result_right_and_leave_nothing(
    vhost_factory: Any, tmp_path: Path,
) -> None:
    url = vhost_factory()
    with WorkerProcesses(url, ["w0", "w1", "w2"], log_dir=tmp_path) as daemons:
        started = time.monotonic()
        clients = [subprocess.Popen([sys.executable, "-c", _CLIENT, url, f"load{n}",
                                     str(ROUNDS)], stdout=subprocess.PIPE, text=True)
                   for n in range(CLIENTS)]
        outputs = [client.communicate(timeout=600)[0] for client in clients]
        elapsed = time.monotonic() - started
        assert all(client.returncode == 0 for client in clients), outputs
        results = [line.split() for out in outputs for line in out.splitlines()
                   if line.startswith("result")]
        assert len(results) == CLIENTS
        assert sum(int(wrong) for _, _, wrong in results) == 0  # no wrong result
        operations = sum(int(commands) for _, commands, _ in results)
        with tr.connect(url, name="auditor") as auditor:
            deadline = time.monotonic() + 60
            while True:  # deletes down chains land a little after their clients closed
                left = {w: auditor.worker(w).status()["objects"] for w in daemons.worker_ids}
                if not any(left.values()) or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
        assert left == {"w0": 0, "w1": 0, "w2": 0}  # nothing left over
        print(f"load run: {CLIENTS} clients, {operations} operations in {elapsed:.1f} s")
