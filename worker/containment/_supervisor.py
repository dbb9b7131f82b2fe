"""The supervisor: what `torchrelay worker` runs, so that no command can take the worker down.

A worker daemon is two processes. The executor (`_executor.py`) serves the
worker: it consumes its queue, holds its objects and runs the commands. This
process, the supervisor, starts it and watches it; it never computes and never
imports torch (about 20 MiB). Every tick (`TICK` seconds) it:

- takes what the last commands changed into its copy of the objects (`_mirror.py`);
- looks at the journal (`_journal.py`): a command in hand for longer than the
  worker's `command_timeout` is stopped the only way a loop inside torch can be
  stopped, by killing the executor;
- notices an executor that died (a native crash, a signal, an exit).

Either way it starts a new executor with the objects, the commands that ran to
the end (so a copy the broker delivers again is skipped) and the command that
was in hand, which the new executor refuses with an error naming what it did,
and dead-letters: it never runs again. Executors that keep dying young are
restarted with growing pauses; one that cannot start at all ends the daemon.

SIGTERM or SIGINT is passed on: the executor finishes the command in hand, has it
acknowledged, and exits; the supervisor then exits 0. An executor still busy
after the worker's `stop_grace` seconds (or at a second signal) is killed.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from types import FrameType
from typing import Final

from ..operations._config import WorkerConfig
from ._journal import Journal, create_journal
from ._mirror import MirrorCopy, Ring

__all__ = ["supervise"]

log = logging.getLogger("torchrelay.worker")

TICK: Final = 0.01
RING_CAPACITY: Final = 64 << 20
POISONS_KEPT: Final = 1000
_YOUNG: Final = 5.0  # seconds: an executor that dies before this is restarted after a pause
_EXECUTOR_ENV = "TORCHRELAY_EXECUTOR"  # (_executor.EXECUTOR_ENV: that module loads torch)


def supervise(config: WorkerConfig) -> int:
    """Run the worker `config.id` as a supervised executor until told to stop; the
    exit status."""
    return _Supervisor(config).run()


class _Supervisor:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.journal_fd = create_journal()
        self.journal = Journal(self.journal_fd)
        self.ring_fd = Ring.create(RING_CAPACITY)
        self.ring = Ring(self.ring_fd, RING_CAPACITY)
        self.copy = MirrorCopy()
        self.poisoned: dict[tuple[str, str], tuple[str, float]] = {}
        """(sender, correlation id) -> what the command did, and when (wall clock)."""
        self.restarts = 0
        self.signals = 0
        self.executor: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        young_deaths = 0
        while True:
            started = time.monotonic()
            outcome = self._run_one_executor()
            if outcome is not None:
                return outcome
            self.restarts += 1
            young_deaths = young_deaths + 1 if time.monotonic() - started < _YOUNG else 0
            if young_deaths >= 2:  # dying as soon as it starts: do not spin
                pause = min(0.25 * 2 ** (young_deaths - 2), 10.0)
                log.warning("the executor keeps dying young; next start in %.2f s", pause)
                time.sleep(pause)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        log.info("received %s; %s", signal.Signals(signum).name,
                 "the executor finishes the command in hand" if self.signals == 1
                 else "stopping now")
        executor = self.executor
        if executor is not None and executor.poll() is None:
            executor.send_signal(signal.SIGTERM if self.signals == 1 else signal.SIGKILL)

    def _run_one_executor(self) -> int | None:
        """Start an executor and watch it until it ends; None if it must be replaced."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.copy.channel = ours
        snapshot = self.copy.snapshot()
        setup = {
            "config": asdict(self.config), "journal": self.journal_fd, "ring": self.ring_fd,
            "ring_capacity": RING_CAPACITY, "channel": theirs.fileno(),
            "snapshot": snapshot.fd, "snapshot_length": snapshot.length,
            "shared": snapshot.shared, "next_key": self.copy.largest_key + 1,
            "poisoned": [[s, c, what, when] for (s, c), (what, when) in self.poisoned.items()],
            "restarts": self.restarts, "supervisor": os.getpid(),
        }
        handed = [self.journal_fd, self.ring_fd, theirs.fileno(), snapshot.fd,
                  *(fd for fd, _, _ in snapshot.shared)]
        try:
            executor = self.executor = subprocess.Popen(
                [sys.executable, "-m", "torchrelay.worker.containment._executor"],
                env={**os.environ, _EXECUTOR_ENV: json.dumps(setup)}, pass_fds=handed,
            )
        finally:
            theirs.close()
            os.close(snapshot.fd)
        if self.signals:  # a signal came while it started
            executor.send_signal(signal.SIGTERM)
        stopped_for_overrun = self._watch(executor)
        status = executor.wait()
        self.executor = None
        self._take_changes()
        self.copy.forget_arriving()
        self.copy.channel = None
        ours.close()
        # torch names its shared memory /dev/shm/torch_<pid>_... (not a temporary file of ours)
        for leaked in glob.glob(f"/dev/shm/torch_{executor.pid}_*"):  # noqa: S108
            os.unlink(leaked)  # a kill during share_memory_() leaves its file behind
        if self.signals:
            if status != 0:
                log.warning("the executor ended with status %d while stopping", status)
            log.info("worker %s stopped", self.config.id)
            return 0
        if status in (0, 1, 2) and stopped_for_overrun is None and not self.journal.poison():
            # It chose to exit (its broker is gone for good, a dataset file is broken):
            # so does the daemon.
            return status
        self._bury(executor, status, stopped_for_overrun)
        return None

    def _watch(self, executor: subprocess.Popen[bytes]) -> float | None:
        """Until the executor ends: keep the copy up to date and stop an overrun.

        Returns how long the command it stopped had run, if it stopped one."""
        pidfd = os.pidfd_open(executor.pid)
        overrun: float | None = None
        stop_deadline: float | None = None
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while not poller.poll(TICK * 1000):
                self._take_changes()
                if overrun is None:
                    in_hand = self.journal.seconds_in_hand()
                    if in_hand > self.config.command_timeout:
                        overrun = in_hand
                        log.error("a command has run %.1f s, past command_timeout (%g s): "
                                  "stopping the executor", in_hand, self.config.command_timeout)
                        executor.kill()
                if self.signals and stop_deadline is None:
                    stop_deadline = time.monotonic() + self.config.stop_grace
                if stop_deadline is not None and time.monotonic() > stop_deadline:
                    log.warning("the executor is still busy %g s after the signal: killing it",
                                self.config.stop_grace)
                    executor.kill()
                    stop_deadline = float("inf")
        finally:
            os.close(pidfd)
        return overrun

    def _take_changes(self) -> None:
        self.copy.receive_descriptors()
        for entry in self.ring.drain():
            self.copy.apply(entry)

    def _bury(self, executor: subprocess.Popen[bytes], status: int,
              overrun: float | None) -> None:
        """Record why the executor died and which command did it; clear the journal."""
        if overrun is not None:
            what = (f"ran {overrun:.0f} s, past the worker's command_timeout of "
                    f"{self.config.command_timeout:g} s, and was stopped")
        elif status < 0:
            what = f"crashed the worker's executor ({signal.Signals(-status).name})"
        else:
            what = f"made the worker's executor exit with status {status}"
        poison = self.journal.poison()
        self.journal.clear_in_hand()
        if poison is not None:
            sender, _, correlation_id = poison.decode(errors="replace").partition("\0")
            self.poisoned[(sender, correlation_id)] = (what, time.time())
            while len(self.poisoned) > POISONS_KEPT:
                del self.poisoned[next(iter(self.poisoned))]
            log.error("command %s from %s %s; starting a new executor with %d objects",
                      correlation_id, sender, what, len(self.copy))
        else:
            log.error("the executor (pid %d) died with no command in hand (%s); starting a "
                      "new one with %d objects", executor.pid, what, len(self.copy))
