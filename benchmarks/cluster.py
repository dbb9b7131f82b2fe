"""What losing a RabbitMQ cluster node costs: time to recover, operations lost, duplicates.

A three-node cluster is started on this host (`scripts/rabbitmq-cluster.sh`, nodes
on ports 5681..5683, beside the machine's own RabbitMQ) and stopped at the end.
Each scenario runs a worker daemon on a quorum queue and a client on different
nodes, sends in-place additions to one tensor, stops one node in the middle and
sends as many again: the tensor's final value tells how many additions ran — fewer
is operations lost, more is operations run twice. The figure is the time from the
node's stop (once `rabbitmqctl stop` returned) to the client's result.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import torchrelay as tr
from torchrelay.worker import WorkerProcesses

from .report import MeasureResult, Row, failed
from .session import Session
from .stats import progress

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rabbitmq-cluster.sh"
PORTS = (5681, 5682, 5683)
ADDITIONS = 2000
"""In-place additions per scenario, half of them before the node stops."""


def _addresses(first: int) -> str:
    ports = [PORTS[first - 1], *(p for p in PORTS if p != PORTS[first - 1])]
    return ",".join(f"amqp://guest:guest@localhost:{port}/" for port in ports)


def _cluster(*args: str) -> str:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          check=True).stdout


def _leader(queue: str) -> int:
    return int(_cluster("leader", queue))


def _scenario(measure: str, which: Callable[[], int], log_dir: Path) -> Row:
    """The daemon on node 1, the client on node 2; `which()` names the node to stop."""
    with WorkerProcesses(_addresses(1), ["bob"], extra_args=["--queue-type", "quorum"],
                         log_dir=log_dir) as daemons, tr.connect(_addresses(2)) as fleet:
        del daemons
        x = torch.zeros(1, dtype=torch.float64).send(fleet.worker("bob"))
        for _ in range(ADDITIONS // 2):
            x.add_(1)
        node = which()
        _cluster("stop-node", str(node))
        stopped = time.monotonic()
        try:
            for _ in range(ADDITIONS // 2):
                x.add_(1)
            value = int(x.get().item())
            ending = "completed"
        except tr.TorchRelayError as e:
            value, ending = -1, f"{type(e).__name__}: {str(e)[:120]}"
        seconds = time.monotonic() - stopped
    _cluster("start-node", str(node))
    _cluster("start")
    lost = max(0, ADDITIONS - value) if value >= 0 else "unknown"
    twice = max(0, value - ADDITIONS) if value >= 0 else "unknown"
    return Row(measure, f"{seconds * 1e3:,.0f} ms", note=(
        f"node {node} stopped after {ADDITIONS // 2} of {ADDITIONS} additions; {ending}; "
        f"lost {lost}, run twice {twice}"))


def cluster(session: Session) -> MeasureResult:
    del session  # (its daemons are on the machine's own RabbitMQ; these on the cluster)
    result = MeasureResult()
    if shutil.which("rabbitmq-server") is None:
        result.rows.append(Row("12 cluster", "not run", note="no rabbitmq-server here"))
        return result
    progress("cluster: starting three nodes")
    _cluster("start")
    work = Path(tempfile.mkdtemp(prefix="torchrelay-cluster-bench-"))
    try:
        for measure, which in (
            ("12 cluster: worker's node stops", lambda: 1),
            ("12 cluster: queue leader stops", lambda: _leader("torchrelay.worker.bob")),
        ):
            progress(f"cluster: {measure[12:]}")
            try:
                result.rows.append(_scenario(measure, which, work / measure[12:17]))
            except Exception as e:
                result.rows.append(failed(measure, e))
    finally:
        _cluster("stop")
    return result

