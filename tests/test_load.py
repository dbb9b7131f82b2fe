"""A load run: 10 client processes, each with about 1,000 operations over 3 workers
with pointer chains across them and moves between them, every result checked; then
nothing is left on any worker (RabbitMQ, daemons). The run itself is
`benchmarks/load.py`, which the faults benchmark reports on too."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from torchrelay.worker import WorkerProcesses


def _load_module() -> Any:
    """benchmarks/load.py, by its path: the checkout's folders are not on sys.path (the
    package imports one way only), and it needs nothing but torchrelay."""
    spec = importlib.util.spec_from_file_location(
        "torchrelay_load_run", Path(__file__).parents[1] / "benchmarks" / "load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look themselves up there)
    spec.loader.exec_module(module)
    return module


run_load = _load_module().run_load


def test_ten_clients_with_chains_over_three_workers_get_every_result_right_and_leave_nothing(
    vhost_factory: Any, tmp_path: Path,
) -> None:
    url = vhost_factory()
    with WorkerProcesses(url, ["w0", "w1", "w2"], log_dir=tmp_path) as daemons:
        result = run_load(url, daemons.worker_ids, clients=10, rounds=50)
    assert result.failures == []  # every client finished: none failed, none hung
    assert result.finished == 10 and result.operations == 10 * 50 * 20
    assert result.wrong == 0  # no wrong result
    assert result.left == {"w0": 0, "w1": 0, "w2": 0}  # nothing left over
    print(f"load run: {result.operations} operations in {result.seconds:.1f} s")
