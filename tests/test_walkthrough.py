"""The seed walkthrough, cell by cell, on the embedded broker and on RabbitMQ daemons."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import torchrelay as tr
from torchrelay._walkthrough import WalkthroughMismatch, run_walkthrough


def test_walkthrough_on_the_embedded_broker() -> None:
    lines: list[str] = []
    with tr.connect() as fleet:
        run_walkthrough(fleet, echo=lines.append)
    text = "\n".join(lines)
    assert "tensor([ 2,  4,  6,  8, 10])" in text
    assert text.count("._objects") == 15  # every store listing the notebook shows, and one more


def test_walkthrough_on_rabbitmq_with_daemon_processes(daemons_for_test: Any) -> None:
    daemons = daemons_for_test(("bob", "alice"))  # fresh daemons: the stores start empty
    lines: list[str] = []
    with tr.connect(daemons.url) as fleet:
        run_walkthrough(fleet, echo=lines.append)
        statuses = [fleet.worker(w).status() for w in ("bob", "alice")]
    assert {s["pid"] for s in statuses} == {p.pid for p in daemons.processes.values()}
    assert all(s["objects"] == 0 for s in statuses)


def test_walkthrough_notices_a_store_that_differs() -> None:
    with tr.connect() as fleet:
        leftover = tr.client.send(1, fleet.worker("bob"))
        with pytest.raises(WalkthroughMismatch, match="bob is not empty"):
            run_walkthrough(fleet, echo=lambda line: None)
        leftover.get()


def test_the_demo_on_rabbitmq_prints_the_walkthrough_and_nothing_from_pika(
    vhost_factory: Any,
) -> None:
    url = vhost_factory()  # the demo starts bob and alice itself
    result = subprocess.run([sys.executable, "-m", "torchrelay", "demo", "--broker", url],
                            capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "every store matched the notebook at every step" in output
    assert "pika" not in output.lower()
    assert "WARNING" not in output
    log_dir = re.search(r"\(daemon logs in (\S+)\)", output)
    assert log_dir is not None
    logs = [path.read_text() for path in Path(log_dir.group(1)).glob("*.log")]
    assert len(logs) == 2
    for log in logs:  # the daemons log at INFO: their own lines, not pika's
        assert "torchrelay.worker: worker" in log
        assert " pika." not in log
