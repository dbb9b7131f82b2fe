"""Presence: workers announce start, heartbeats and stop on `torchrelay.events`;
`fleet.workers()` and `torchrelay status` list the live ones with their figures and
queues; a worker that died is gone from the list."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pika
import pytest
import torch

import torchrelay as tr
from torchrelay._cli import main
from torchrelay.broker import EVENTS_EXCHANGE
from torchrelay.worker import WorkerProcesses

tr.hook(torch)


def test_workers_lists_the_live_workers_with_their_figures(fleet: tr.Fleet) -> None:
    for worker_id in ("bob", "alice", "carol"):
        fleet.worker(worker_id)
    x = torch.ones(3).send(fleet.worker("bob"))
    fleet.sync()
    listed = {w["id"]: w for w in fleet.workers()}
    assert {"bob", "alice", "carol"} <= set(listed)
    assert listed["bob"]["objects"] >= 1
    for figures in listed.values():
        assert {"pid", "objects", "tensor_bytes", "commands_handled", "commands_failed",
                "uptime_s"} <= set(figures)
    del x


def test_a_worker_announces_its_start_heartbeats_and_stop(
    vhost_factory: Any, tmp_path: Any,
) -> None:
    url = vhost_factory()
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.exchange_declare(EVENTS_EXCHANGE, "topic", durable=True)
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, EVENTS_EXCHANGE, routing_key="worker.#")
        daemons = WorkerProcesses(url, ["eve"], log_dir=tmp_path,
                                  worker_args={"eve": ["--presence-interval", "0.5"]})
        with daemons:
            events = _take(channel, queue, until=lambda seen: sum(
                e["event"] == "heartbeat" for _, e in seen) >= 2)
        events += _take(channel, queue, until=lambda seen: any(
            e["event"] == "stopped" for _, e in seen))
    keys = [key for key, _ in events]
    assert keys[0] == "worker.eve.started"
    assert "worker.eve.heartbeat" in keys
    assert keys[-1] == "worker.eve.stopped"
    heartbeat = next(e for k, e in events if k == "worker.eve.heartbeat")
    assert heartbeat["id"] == "eve" and heartbeat["presence_interval"] == 0.5
    assert {"objects", "tensor_bytes", "commands_handled", "commands_failed",
            "uptime_s"} <= set(heartbeat)


def _take(channel: Any, queue: str, until: Any, timeout: float = 60.0) -> list[Any]:
    seen: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    while not until(seen):
        assert time.monotonic() < deadline, f"events so far: {seen}"
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        assert props.content_type == "application/json"
        seen.append((method.routing_key, json.loads(body)))
    return seen


def test_a_worker_that_died_is_gone_from_the_list_and_the_status_table(
    vhost_factory: Any, tmp_path: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    url = vhost_factory()
    with WorkerProcesses(url, ["dora", "dave"], log_dir=tmp_path) as daemons, \
            tr.connect(url) as session:
        assert [w["id"] for w in session.workers()] == ["dave", "dora"]
        assert main(["status", "--broker", url, "--json"]) == 0
        rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows["dora"]["state"] == "live" and rows["dora"]["pid"] > 0
        assert rows["dora"]["queue"] is not None  # from the management API
        os.kill(daemons.processes["dora"].pid, signal.SIGKILL)
        daemons.processes["dora"].wait()
        # Its executor notices its supervisor is gone and stops serving, too.
        deadline = time.monotonic() + 30
        while [w["id"] for w in session.workers()] != ["dave"]:
            assert time.monotonic() < deadline, "dora still answers"
        assert main(["status", "--broker", url]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[:3] == ["worker", "state", "pid"]
        states = {line.split()[0]: line.split()[1] for line in table[1:]}
        assert states["dave"] == "live"
        assert states["dora"] in ("gone", "silent")  # its queue stays; nobody answers
