"""A fleet of worker daemons on one machine: `torchrelay fleet up | down | status`.

A fleet file names the workers' config files and where their pid and log files
go:

    [fleet]
    broker = "amqp://guest:guest@localhost:5672/"  # every worker's (the flag wins)
    run_dir = "../.torchrelay/run"                  # pid and log files; relative to
    workers = ["bob.toml", "alice.toml"]            # this file, as the configs are

`up` starts each worker as a background daemon (its own session: it outlives the
shell) and returns once every one answers; it refuses to start a worker whose
pid file names a live process. `down` sends SIGTERM (the command in hand
finishes and is acknowledged), then SIGKILL to a daemon still there after the
timeout. `status` says, for each worker, whether it runs, and what it holds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchrelay.broker import BROKER_ENV

from ._config import ConfigError, WorkerConfig
from ._launcher import WorkerProcesses

__all__ = ["FleetFile", "WorkerState", "fleet_down", "fleet_status", "fleet_up"]


@dataclass(frozen=True, slots=True)
class FleetFile:
    path: Path
    broker: str
    run_dir: Path
    workers: dict[str, Path]
    """Worker id -> its config file."""

    @classmethod
    def read(cls, path: str | Path, broker: str | None = None) -> FleetFile:
        path = Path(path)
        try:
            with path.open("rb") as f:
                table = tomllib.load(f).get("fleet")
        except FileNotFoundError:
            raise ConfigError(f"fleet file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"fleet file {path} is not valid TOML: {e}") from None
        if not isinstance(table, dict):
            raise ConfigError(f"fleet file {path} has no [fleet] table")
        broker = broker or os.environ.get(BROKER_ENV) or table.get("broker")
        if not isinstance(broker, str):
            raise ConfigError(f"fleet file {path}: no broker (set broker, {BROKER_ENV} or "
                              "--broker)")
        names = table.get("workers")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"fleet file {path}: workers is a list of worker config files")
        run_dir = table.get("run_dir", ".torchrelay/run")
        if not isinstance(run_dir, str):
            raise ConfigError(f"fleet file {path}: run_dir is a folder's path")
        workers: dict[str, Path] = {}
        for name in names:
            config_path = path.parent / name
            worker_id = WorkerConfig.resolve(config_path, broker=broker).id
            if worker_id in workers:
                raise ConfigError(f"fleet file {path}: worker {worker_id!r} is listed twice")
            workers[worker_id] = config_path
        return cls(path, broker, Path(os.path.normpath(path.parent / run_dir)), workers)

    def pid_file(self, worker_id: str) -> Path:
        return self.run_dir / f"{worker_id}.pid"

    def log_file(self, worker_id: str) -> Path:
        return self.run_dir / f"{worker_id}.log"

    def running(self, worker_id: str) -> int | None:
        """The pid of `worker_id`'s daemon, if its pid file names a live process."""
        try:
            pid = int(self.pid_file(worker_id).read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid  # alive, someone else's
        return pid if _not_a_zombie(pid) else None


def _not_a_zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def fleet_up(fleet: FleetFile, timeout: float = 120.0) -> dict[str, int]:
    """Start every worker of `fleet`; their pids. Raises `ConfigError` if one runs."""
    for worker_id in fleet.workers:
        pid = fleet.running(worker_id)
        if pid is not None:
            raise ConfigError(f"worker {worker_id!r} already runs (pid {pid}, "
                              f"{fleet.pid_file(worker_id)}): `torchrelay fleet down` first")
    fleet.run_dir.mkdir(parents=True, exist_ok=True)
    daemons = WorkerProcesses(
        fleet.broker, list(fleet.workers), log_dir=fleet.run_dir, detach=True,
        worker_args={w: ["--config", str(path.resolve())] for w, path in fleet.workers.items()},
    )
    for worker_id in fleet.workers:
        process = daemons.spawn(worker_id)
        fleet.pid_file(worker_id).write_text(f"{process.pid}\n")
    try:
        daemons.wait_ready(list(fleet.workers), timeout)
    except BaseException:
        fleet_down(fleet)
        raise
    pids = {w: p.pid for w, p in daemons.processes.items()}
    for process in daemons.processes.values():
        # The daemons outlive this command on purpose (their pid files say where they
        # are): tell `Popen` not to warn, when it is collected, that they still run.
        process.returncode = 0
    return pids


def fleet_down(fleet: FleetFile, timeout: float = 40.0) -> dict[str, str]:
    """Stop every worker of `fleet` (SIGTERM, then SIGKILL after `timeout`); how each
    ended."""
    pids = {w: pid for w in fleet.workers if (pid := fleet.running(w)) is not None}
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    outcome: dict[str, str] = {}
    for worker_id in fleet.workers:
        pid = pids.get(worker_id)
        if pid is None:
            outcome[worker_id] = "was not running"
        else:
            while time.monotonic() < deadline and fleet.running(worker_id) is not None:
                time.sleep(0.1)
            if fleet.running(worker_id) is None:
                outcome[worker_id] = f"stopped (pid {pid})"
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                outcome[worker_id] = f"killed after {timeout:g} s (pid {pid})"
        fleet.pid_file(worker_id).unlink(missing_ok=True)
    return outcome


@dataclass(frozen=True, slots=True)
class WorkerState:
    worker_id: str
    state: str
    """"running", "stopped", or "dead" (a pid file whose process is gone)."""
    pid: int | None
    status: dict[str, Any] | None
    """What the worker says of itself, when it runs and answers."""


def fleet_status(fleet: FleetFile, timeout: float = 5.0) -> list[WorkerState]:
    import torchrelay as tr  # noqa: PLC0415 - the client, only for this command

    states: list[WorkerState] = []
    running = {w: fleet.running(w) for w in fleet.workers}
    statuses: dict[str, dict[str, Any]] = {}
    if any(pid is not None for pid in running.values()):
        with tr.connect(fleet.broker, name=None, timeout=timeout) as session:
            for worker_id, pid in running.items():
                if pid is not None:
                    with contextlib.suppress(tr.TorchRelayError):
                        statuses[worker_id] = session.worker(worker_id).status()
    for worker_id, pid in running.items():
        if pid is not None:
            states.append(WorkerState(worker_id, "running", pid, statuses.get(worker_id)))
        elif fleet.pid_file(worker_id).exists():
            states.append(WorkerState(worker_id, "dead", None, None))
        else:
            states.append(WorkerState(worker_id, "stopped", None, None))
    return states
