"""Starting and stopping worker daemons as child processes (the demo, tests, benchmarks).

Each daemon is `python -m torchrelay worker --id <id> --broker <url>`, exactly
what a user runs; `start` returns once every one of them answers. `spawn_host`
starts one process hosting several workers (`--unsupervised`, see
`containment/_host.py`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from torchrelay.broker import RETURNED, BrokerError, Status, open_broker

__all__ = ["WorkerProcesses"]


class WorkerProcesses:
    """Daemons for `worker_ids` on the RabbitMQ at `url`; a context manager.

    `extra_args` go to every daemon's command line, `worker_args[id]` to one's."""

    def __init__(
        self,
        url: str,
        worker_ids: Sequence[str],
        *,
        extra_args: Sequence[str] = (),
        worker_args: Mapping[str, Sequence[str]] | None = None,
        log_dir: str | Path | None = None,
        env: dict[str, str] | None = None,
        detach: bool = False,
    ) -> None:
        self.url = url
        self.worker_ids = list(worker_ids)
        self.extra_args = list(extra_args)
        self.worker_args = {w: list(a) for w, a in (worker_args or {}).items()}
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="torchrelay-workers-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.detach = detach
        """Start each daemon in a session of its own (it outlives this process's
        terminal), as `torchrelay fleet up` does."""
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        """Each daemon by its worker's id, or a host by the name `spawn_host` gave it."""
        self.hosted: dict[str, str] = {}
        """A hosted worker's id -> its host's name."""

    def start(self, timeout: float = 60.0) -> None:
        for worker_id in self.worker_ids:
            self.spawn(worker_id)
        self.wait_ready(self.worker_ids, timeout)

    def spawn(self, worker_id: str, *extra_args: str) -> subprocess.Popen[bytes]:
        """Start one daemon without waiting for it."""
        own = [*self.extra_args, *self.worker_args.get(worker_id, ()), *extra_args]
        # (A worker given a broker of its own, a user of its own say, connects there only:
        # `--broker` given twice would be two addresses of one cluster.)
        broker = [] if "--broker" in own else ["--broker", self.url]
        argv = [sys.executable, "-m", "torchrelay", "worker", "--id", worker_id, *broker, *own]
        process = self._popen(worker_id, argv)
        self.processes[worker_id] = process
        return process

    def spawn_host(self, name: str, worker_ids: Sequence[str],
                   *args: str) -> subprocess.Popen[bytes]:
        """Start one process hosting `worker_ids`, without waiting for it: `args` name
        them (`--config FILE` each, or `--id a,b,c`); stopped as one, by `name`."""
        broker = [] if "--broker" in (*self.extra_args, *args) else ["--broker", self.url]
        argv = [sys.executable, "-m", "torchrelay", "worker", "--unsupervised", *broker,
                *self.extra_args, *args]
        process = self._popen(name, argv)
        self.processes[name] = process
        self.hosted.update(dict.fromkeys(worker_ids, name))
        return process

    def _popen(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        env = dict(os.environ if self.env is None else self.env)
        env.pop("TORCHRELAY_BROKER", None)
        log = (self.log_dir / f"{name}.log").open("ab")
        with log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=self.detach)

    def restart(self, worker_id: str, timeout: float = 60.0) -> None:
        """Start a daemon again once it has ended (stopped, killed, crashed); return once
        it serves."""
        old = self.processes.pop(worker_id, None)
        if old is not None and old.poll() is None:
            self.processes[worker_id] = old
            raise BrokerError(f"worker daemon {worker_id!r} still runs (pid {old.pid}): "
                              "stop it first")
        if old is not None:
            old.wait()  # (reaped: no zombie, no warning)
        self.spawn(worker_id)
        self.wait_ready([worker_id], timeout)

    def wait_ready(self, worker_ids: Sequence[str], timeout: float = 60.0) -> None:
        """Return once every daemon in `worker_ids` has answered a status request.

        Asked with a command rather than by inspecting the worker's queue: to a
        queue that does not exist yet, the command comes back (and is sent again
        a little later), where a passive declaration would make the broker close
        a channel and pika log a warning each time.
        """
        broker = open_broker(self.url)
        endpoint = broker.connect(broker.verified_identity or f"launcher-{secrets.token_hex(2)}")
        try:
            deadline = time.monotonic() + timeout
            asked: dict[str, str] = {}  # correlation id -> worker id
            ask_at = dict.fromkeys(worker_ids, 0.0)  # worker id -> when to ask (again)
            ready: set[str] = set()
            number = 0
            while len(ready) < len(worker_ids):
                now = time.monotonic()
                for worker_id in [w for w, when in ask_at.items() if when <= now]:
                    number += 1
                    correlation_id = f"{endpoint.identity}.{number}"
                    endpoint.send_command(worker_id, Status.name, Status().encode(),
                                          correlation_id)
                    asked[correlation_id] = worker_id
                    del ask_at[worker_id]
                delivery = endpoint.receive(0.05)
                if delivery is not None and delivery.correlation_id in asked:
                    worker_id = asked.pop(delivery.correlation_id)
                    if delivery.type == RETURNED:  # no queue yet: the daemon is starting
                        ask_at[worker_id] = time.monotonic() + 0.1
                    else:
                        ready.add(worker_id)
                for worker_id in set(worker_ids) - ready:
                    self._check_alive(worker_id, deadline, timeout)
        finally:
            endpoint.close()

    def _check_alive(self, worker_id: str, deadline: float, timeout: float) -> None:
        name = self.hosted.get(worker_id, worker_id)
        process = self.processes[name]
        if process.poll() is not None:
            raise BrokerError(
                f"worker daemon {name!r} exited with status {process.returncode}:\n"
                + self.log_tail(name)
            )
        if time.monotonic() > deadline:
            raise BrokerError(
                f"worker daemon {name!r} did not start {worker_id!r} within {timeout:g} s:\n"
                + self.log_tail(name)
            )

    def stop(self, worker_id: str, timeout: float = 30.0, *, signalled: bool = False) -> int:
        """SIGTERM one daemon (unless `signalled` already) and wait for it; its exit
        status (killed if it hangs). One signal only: a second means "stop now". A host
        is stopped by its name, with every worker it hosts."""
        process = self.processes.pop(worker_id)
        self.hosted = {w: host for w, host in self.hosted.items() if host != worker_id}
        if process.poll() is None:
            if not signalled:
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
        return {worker_id: self.stop(worker_id, signalled=True)
                for worker_id in list(self.processes)}

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
