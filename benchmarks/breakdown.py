"""Where the time of one small operation goes, layer by layer, beside bare pika's.

`y = x + x; fleet.sync()` (and `(x + x).get()`, one command: the call, told to
fetch its result, which its "reply encoded, logged" segment holds) on a daemon
started for this measure with
`TORCHRELAY_TRACE` set, and the bare pika echo round trip on an echo server
traced the same way: every layer stamps the moment it is done with a command
(`torchrelay.broker._trace`; CLOCK_MONOTONIC, one clock for all processes of
the machine), so each segment below is the median over iterations of the time
between two consecutive stamps of one command, wherever they were made. The
broker's segments run from one process's last stamp before it hands the
message to pika to the other's first once pika handed it over: RabbitMQ, the
loopback socket and both pika clients' framing.

The medians of segments do not add up to the median of the total exactly
(each is the middle of its own distribution); their sum is shown beside it.

Beside the segments, the CPU each process spent per command over the same
iterations (`/proc/<pid>/stat`: user and system, every thread): the client (this
process), the worker daemon (supervisor and executor) or the echo server, and
RabbitMQ (`beam.smp`, when it runs on this machine). One command's round trip is
serial, so on a small machine their sum is about its wall time: what a command
costs anywhere, the broker included, it waits for.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import statistics
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

import torchrelay as tr
from torchrelay.broker import _trace
from torchrelay.worker import WorkerProcesses

from .baselines import EchoServer, PikaEcho
from .processes import cpu_seconds, processes_named, tree
from .report import MeasureResult, Row
from .session import Session, send
from .stats import micros, progress

__all__ = ["OURS", "PIKA", "measure"]

Segment = tuple[str, str, str]
"""(what runs in it, the stamp it starts at, the stamp it ends at)."""

OURS: tuple[Segment, ...] = (
    ("client: the script's `x + x` reaching torchrelay", "start", "client.call"),
    ("client: the command built (pointer, ids, pending)", "client.call", "client.queued"),
    ("client: sync, the command encoded", "client.queued", "client.publish"),
    ("client: pika publish", "client.publish", "client.published"),
    ("broker: to the worker (RabbitMQ, both pikas)", "client.published", "worker.received"),
    ("worker: delivery taken, command decoded", "worker.received", "worker.decoded"),
    ("worker: admission (sender, queue)", "worker.decoded", "worker.admitted"),
    ("worker: fair queue to the handler", "worker.admitted", "worker.started"),
    ("worker: garbage, dispatch, ownership, provenance", "worker.started", "worker.resolved"),
    ("worker: arguments validated", "worker.resolved", "worker.checked"),
    ("worker: the operation (torch)", "worker.checked", "worker.ran"),
    ("worker: result checked, stored", "worker.ran", "worker.stored"),
    ("worker: reply encoded, logged", "worker.stored", "worker.encoded"),
    ("worker: journal commit", "worker.encoded", "worker.publish"),
    ("worker: pika publish", "worker.publish", "worker.published"),
    ("broker: to the client (RabbitMQ, both pikas)", "worker.published", "client.received"),
    ("client: reply matched, settled", "client.received", "client.settled"),
    ("client: back in the script", "client.settled", "end"),
)

PIKA: tuple[Segment, ...] = (
    ("client: request made", "start", "client.publish"),
    ("client: pika publish", "client.publish", "client.published"),
    ("broker: to the server (RabbitMQ, both pikas)", "client.published", "worker.received"),
    ("server: reply made", "worker.received", "worker.publish"),
    ("server: pika publish", "worker.publish", "worker.published"),
    ("broker: to the client (RabbitMQ, both pikas)", "worker.published", "client.received"),
    ("client: reply taken", "client.received", "end"),
)

_SIDE_STAGES = {"publish", "published", "received"}

Roles = dict[str, list[int]]
"""The processes of one side of the measure, by what they are."""


def measure(session: Session) -> MeasureResult:
    iterations = 300 if session.settings.sync_iterations < 1000 else 2000
    folder = Path(session.log_dir())
    env = {**os.environ, _trace.ENVIRONMENT: str(folder / "traced")}
    suffix = secrets.token_hex(4)
    worker_id, queue = f"bench-traced-{suffix}", f"bench.echo.traced.{suffix}"
    session.known_queues.update({f"torchrelay.worker.{worker_id}", queue})

    broker = processes_named("beam.smp") if _local(session.url) else []
    with WorkerProcesses(session.url, [worker_id], env=env, log_dir=folder) as daemons:
        fleet = tr.connect(session.url, name=f"bench-tracer-{suffix}")
        roles = {"client": [os.getpid()], "worker": tree(daemons.processes[worker_id].pid),
                 "broker": broker}
        try:
            x = send(torch.ones(4), fleet.worker(worker_id))
            progress(f"breakdown: {iterations} traced `y = x + x; fleet.sync()`")
            ours, ours_cpu = _traced(lambda: _sync_add(fleet, x), iterations, roles)
            progress(f"breakdown: {iterations} traced `(x + x).get()`")
            got, got_cpu = _traced(lambda: _get_add(x), iterations, roles)
        finally:
            fleet.close()
    with EchoServer(session.url, queue, env=env) as server:
        echo = PikaEcho(session.url, queue)
        assert server.process is not None
        roles = {"client": [os.getpid()], "worker": [server.process.pid], "broker": broker}
        try:
            progress(f"breakdown: {iterations} traced bare pika round trips")
            bare, bare_cpu = _traced(lambda: echo.call(b"x" * 64), iterations, roles)
        finally:
            echo.close()
    remote = _remote_stamps(folder)
    ours_rows, ours_raw = _segments(OURS, ours, remote)
    get_rows, get_raw = _segments(OURS, got, remote)
    pika_rows, pika_raw = _segments(PIKA, bare, remote)
    ours_rows += _cpu_rows(ours_cpu, "worker daemon (supervisor, executor)")
    get_rows += _cpu_rows(got_cpu, "worker daemon (supervisor, executor)")
    pika_rows += _cpu_rows(bare_cpu, "echo server")
    rows = [Row(f"B sync  {label}", text, get_text)
            for (label, text), (_, get_text) in zip(ours_rows, get_rows, strict=True)]
    rows += [Row(f"B pika  {label}", text) for label, text in pika_rows]
    raw = {"sync": ours_raw, "get": get_raw, "pika": pika_raw, "iterations": iterations,
           "cpu_per_command": {"sync": ours_cpu, "get": got_cpu, "pika": bare_cpu}}
    return MeasureResult(rows=rows, raw=raw)


def _local(url: str) -> bool:
    """Whether the broker at `url` runs on this machine (its CPU can then be read)."""
    return (urllib.parse.urlsplit(url).hostname or "localhost") in ("localhost", "127.0.0.1",
                                                                    "::1")


def _cpu_rows(cpu: dict[str, float], worker: str) -> list[tuple[str, str]]:
    """Rows of CPU per command, by process, and their sum."""
    named = (("client", "client (this process, every thread)"), ("worker", worker),
             ("broker", "RabbitMQ (beam.smp)"))
    rows = [(f"CPU per command: {label}", micros(cpu[role]) if role in cpu else "-")
            for role, label in named]
    rows.append(("CPU per command: the three together", micros(sum(cpu.values()))))
    return rows


def _sync_add(fleet: tr.Fleet, x: Any) -> None:
    y = x + x  # noqa: F841 (dropped at return: garbage that rides with the next command)
    fleet.sync()


def _get_add(x: Any) -> None:
    (x + x).get()


def _traced(step: Any, iterations: int, roles: Roles
            ) -> tuple[list[list[_trace.Stamp]], dict[str, float]]:
    """Each iteration's stamps in this process, `start` and `end` added; and the CPU
    seconds each role's processes spent per iteration (a role without one: absent)."""
    for _ in range(50):  # warm
        step()
    before = {role: cpu_seconds(pids) for role, pids in roles.items() if pids}
    _trace.start()
    for _ in range(iterations):
        _trace.stamp("start")
        step()
        _trace.stamp("end")
    stamps = _trace.stop()
    cpu = {role: (cpu_seconds(roles[role]) - spent) / iterations
           for role, spent in before.items()}
    runs: list[list[_trace.Stamp]] = []
    for stage, key, at in stamps:
        if stage == "start":
            runs.append([])
        if runs:
            runs[-1].append((stage, key, at))
    return runs, cpu


def _remote_stamps(folder: Path) -> dict[str, list[_trace.Stamp]]:
    """The traced processes' stamps (the daemon's executor, the echo server), each
    process's split into commands at its `received` stamps, by correlation id."""
    files = glob.glob(str(folder / "traced.*"))  # written at their exit, waited for
    commands: dict[str, list[_trace.Stamp]] = {}
    for path in files:
        current: list[_trace.Stamp] | None = None
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                stage, key, at = json.loads(line)
                if stage == "received":
                    current = commands.setdefault(key, [])
                if current is not None:
                    current.append((stage, key, at))
    return commands


def _timeline(local: list[_trace.Stamp], remote: dict[str, list[_trace.Stamp]]
              ) -> dict[str, int] | None:
    """One command's stamps by stage (the first of each), local ones `client.`-named."""
    keys = {key for stage, key, _ in local if stage == "publish"}
    if len(keys) != 1:
        return None  # not one message per iteration: not this measure's shape
    (key,) = keys
    if key not in remote:
        return None
    at: dict[str, int] = {}
    for stage, _, ns in local:
        at.setdefault(f"client.{stage}" if stage in _SIDE_STAGES else stage, ns)
    for stage, _, ns in remote[key]:
        at.setdefault(f"worker.{stage}" if stage in _SIDE_STAGES else stage, ns)
    return at


def _segments(segments: Iterable[Segment], runs: list[list[_trace.Stamp]],
              remote: dict[str, list[_trace.Stamp]]) -> tuple[list[tuple[str, str]],
                                                                 dict[str, Any]]:
    lines = [t for t in (_timeline(run, remote) for run in runs) if t is not None]
    if not lines:
        raise RuntimeError("no traced command found in the processes' stamps")
    rows: list[tuple[str, str]] = []
    raw: dict[str, Any] = {"commands": len(lines)}
    parts = 0.0
    for label, begin, end in segments:
        spans = [(t[end] - t[begin]) / 1e9 for t in lines if begin in t and end in t]
        if not spans:
            rows.append((label, "-"))
            continue
        middle = statistics.median(spans)
        parts += middle
        raw[label] = middle
        rows.append((label, micros(middle)))
    total = statistics.median((t["end"] - t["start"]) / 1e9 for t in lines)
    raw["total"], raw["sum_of_medians"] = total, parts
    rows.append(("total (median)", f"{micros(total)} (segments add to {micros(parts)})"))
    return rows, raw
