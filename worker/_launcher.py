"""Starting and stopping worker daemons as child processes (the demo, tests, benchmarks).

Each daemon is `python -m torchrelay worker --id <id> --broker <url>`, exactly
what a user runs; `start` returns once every one of them consumes its queue.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from torchrelay.broker import BrokerError, RabbitMQBroker, UnknownWorker

__all__ = ["WorkerProcesses"]


class WorkerProcesses:
    """Daemons for `worker_ids` on the RabbitMQ at `url`; a context manager."""

    def __init__(
        self,
        url: str,
        worker_ids: Sequence[str],
        *,
        extra_args: Sequence[str] = (),
        log_dir: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.worker_ids = list(worker_ids)
        self.extra_args = list(extra_args)
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="torchrelay-workers-"))
        self.env = env
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, timeout: float = 60.0) -> None:
        for worker_id in self.worker_ids:
            self.spawn(worker_id)
        self.wait_ready(self.worker_ids, timeout)

    def spawn(self, worker_id: str, *extra_args: str) -> subprocess.Popen[bytes]:
        """Start one daemon without waiting for it."""
        argv = [sys.executable, "-m", "torchrelay", "worker", "--id", worker_id,
                "--broker", self.url, *self.extra_args, *extra_args]
        env = dict(os.environ if self.env is None else self.env)
        env.pop("TORCHRELAY_BROKER", None)
        log = (self.log_dir / f"{worker_id}.log").open("ab")
        with log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.processes[worker_id] = process
        return process

    def wait_ready(self, worker_ids: Sequence[str], timeout: float = 60.0) -> None:
        """Return once every daemon in `worker_ids` consumes its queue."""
        endpoint = RabbitMQBroker(self.url).connect("launcher")
        try:
            deadline = time.monotonic() + timeout
            pending = list(worker_ids)
            while pending:
                worker_id = pending[0]
                process = self.processes[worker_id]
                if process.poll() is not None:
                    raise BrokerError(
                        f"worker daemon {worker_id!r} exited with status {process.returncode}:\n"
                        + self.log_tail(worker_id)
                    )
                try:
                    endpoint.ensure_worker(worker_id)
                    pending.pop(0)
                except UnknownWorker:
                    if time.monotonic() > deadline:
                        raise BrokerError(
                            f"worker daemon {worker_id!r} did not start within {timeout:g} s:\n"
                            + self.log_tail(worker_id)
                        ) from None
                    time.sleep(0.05)
        finally:
            endpoint.close()

    def stop(self, worker_id: str, timeout: float = 30.0) -> int:
        """SIGTERM one daemon and wait for it; its exit status (killed if it hangs)."""
        process = self.processes.pop(worker_id)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def stop_all(self) -> dict[str, int]:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        return {worker_id: self.stop(worker_id) for worker_id in list(self.processes)}

    def log_tail(self, worker_id: str, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            text = (self.log_dir / f"{worker_id}.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return "(no log)"

    def __enter__(self) -> WorkerProcesses:
        try:
            self.start()
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()
