"""What faults cost: a worker killed mid-command and mid-move, a broker restart, a load run.

Each scenario runs on daemons of its own, injects one fault and reports, as a
table row: how long after the fault the client had a clear error or its result
(the figure; the target is the client's timeout: no hang), and in the note what
the fault cost — objects lost and duplicated, wrong results, objects left on the
workers once the client closed — and the error the client got.

"Lost" counts objects that were somewhere before the fault and are nowhere
after it: a daemon killed outright loses what it held in memory (by design; its
executor crashing alone loses nothing). "Duplicated" counts objects found in two
places, or orphan copies left where nothing points.

Kills are timed from the start of the operation (a benchmark may depend on
timing, a test may not: `tests/test_move_faults.py` interrupts moves at exact
points instead). Broker restarts (`rabbitmqctl stop_app; start_app`) affect
everyone on the node, so they run only with `--restart-broker`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

import torchrelay as tr
from torchrelay.client import Fleet, PointerTensor, WorkerHandle
from torchrelay.worker import WorkerProcesses

from .load import run_load
from .report import MeasureResult, Row, at_most, failed
from .session import MIB, Session, send
from .stats import progress

CLIENT_TIMEOUT = 30.0
"""The client's reply timeout in every scenario: the error must come before it."""

MOVE_MIB = 256
KILL_AFTER = 0.3
"""Seconds into a 256 MiB move when a worker is killed: while the copy streams."""


@dataclass(slots=True)
class Outcome:
    """What one fault cost."""

    seconds: float
    """From the fault until the client had a clear error or its result."""
    ending: str
    """The error the client got ("resumed" if none)."""
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    left: int = 0
    extra: str = ""

    def row(self, measure: str) -> Row:
        settled = "resumed" if self.ending == "resumed" else "clear error"
        note = (f"lost {self.lost}, duplicated {self.duplicated}, wrong {self.wrong}, "
                f"left {self.left}; {self.ending}{'; ' + self.extra if self.extra else ''}")
        return Row(measure, f"{self.seconds:.1f} s to {settled}", ratio=None,
                   target=at_most(CLIENT_TIMEOUT, f"< {CLIENT_TIMEOUT:g} s timeout"),
                   checked=self.seconds, note=note)


class _Fault:
    """`action` after `delay` seconds, in the background; `at` is when it had happened
    (a kill at once; a broker restart once the broker serves again)."""

    def __init__(self, delay: float, action: Callable[[], None]) -> None:
        self.at: float | None = None
        self._action = action
        self._timer = threading.Timer(delay, self._fire)
        self._timer.start()

    def _fire(self) -> None:
        self._action()
        self.at = time.monotonic()

    def since(self, *, interrupting: bool = True) -> float:
        """Seconds from the fault until now. What ended before the fault was not
        interrupted by it: an error (so no row passes for a fault that hit nothing),
        unless the fault needs not interrupt (a broker restart: then 0)."""
        now = time.monotonic()
        self._timer.join()
        assert self.at is not None
        if now < self.at and interrupting:
            raise RuntimeError("the operation ended before the fault: nothing was interrupted "
                               "(a faster machine? make the operation longer)")
        return max(0.0, now - self.at)


def _kill(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _executor(worker: WorkerHandle) -> int:
    return int(worker.status()["executor_pid"])


def _ending(error: BaseException | None) -> str:
    if error is None:
        return "resumed"
    text = " ".join(str(error).split()).replace("torchrelay.broker._errors.", "")
    text = f"{text[:220]}{'...' if len(text) > 220 else ''}"
    notes = "".join(f" [{note}]" for note in getattr(error, "__notes__", ()))
    return f"{type(error).__name__}: {text}{notes}"


def _objects(worker: WorkerHandle) -> int:
    return int(worker.status()["objects"])


def _restart(processes: WorkerProcesses, worker_id: str) -> float:
    """Start a killed daemon again; seconds until it serves."""
    started = time.monotonic()
    processes.restart(worker_id)
    return time.monotonic() - started


def _long_command(fleet: Fleet, worker: WorkerHandle) -> PointerTensor:
    """A command that runs for many seconds: 61 squarings of a 3,000² matrix (about
    3 TFLOP; 2**62 and more are refused)."""
    matrix = send(torch.eye(3000) * 0.5 + torch.rand(3000, 3000) * 1e-4, worker)
    fleet.sync()
    result = torch.linalg.matrix_power(matrix, 1 << 61)
    del matrix
    return result  # type: ignore[no-any-return]


def killed_mid_command(session: Session, *, whole_daemon: bool) -> Outcome:
    """A long command in hand; the daemon (or only its executor) is SIGKILLed."""
    role = "kill-daemon" if whole_daemon else "kill-executor"
    processes, (bob_id,) = session.workers([role])
    with tr.connect(session.url, name=session.name(f"{role}-client"),
                    timeout=CLIENT_TIMEOUT) as fleet:
        bob = fleet.worker(bob_id)
        kept = send(torch.arange(4.0), bob)
        pids = [processes.processes[bob_id].pid, _executor(bob)] if whole_daemon else [
            _executor(bob)]
        long = _long_command(fleet, bob)
        fault = _Fault(1.0, lambda: _kill(*pids))
        error: BaseException | None = None
        try:
            fleet.sync()
        except tr.TorchRelayError as e:
            error = e
        seconds = fault.since()
        long.garbage_collect = False  # it was never made
        extra = ""
        if whole_daemon:
            extra = f"daemon back in {_restart(processes, bob_id):.1f} s"
            lost = 1 - _objects(bob)  # `kept` went with the daemon's memory
            kept.garbage_collect = False
        else:
            lost = 0 if torch.equal(kept.get(), torch.arange(4.0)) else 1
        probe = send(torch.ones(2), bob)
        wrong = int((probe + 1).get().tolist() != [2.0, 2.0])
    with tr.connect(session.url, name=session.name(f"{role}-auditor")) as auditor:
        left = _objects(auditor.worker(bob_id))
    return Outcome(seconds, _ending(error), lost=lost, wrong=wrong, left=left, extra=extra)


def killed_mid_move(session: Session, victim: str) -> Outcome:
    """A 256 MiB move from bob to alice; `victim` ("destination", "source" or
    "source executor") is SIGKILLed while the copy streams."""
    role = "move-" + victim.replace(" ", "-")
    processes, (bob_id, alice_id) = session.workers([f"{role}-bob", f"{role}-alice"])
    values = torch.arange(MOVE_MIB * MIB // 4, dtype=torch.float32)
    with tr.connect(session.url, name=session.name(f"{role}-client"),
                    timeout=CLIENT_TIMEOUT) as fleet:
        bob, alice = fleet.worker(bob_id), fleet.worker(alice_id)
        x = send(values, bob)
        fleet.sync()
        pids = {
            "destination": [processes.processes[alice_id].pid, _executor(alice)],
            "source": [processes.processes[bob_id].pid, _executor(bob)],
            "source executor": [_executor(bob)],
        }[victim]
        fault = _Fault(KILL_AFTER, lambda: _kill(*pids))
        error: BaseException | None = None
        moved: PointerTensor | None = None
        try:
            moved = x.move(alice)
        except tr.TorchRelayError as e:
            error = e
        seconds = fault.since()
        extra = ""
        if victim == "destination":
            extra = f"alice back in {_restart(processes, alice_id):.1f} s"
        source_alive = victim != "source"
        on_alice = _objects(alice)  # (after alice took what waited in her queue)
        on_bob = _objects(bob) if source_alive else 0
        copies = on_alice + on_bob
        lost = int(copies == 0)
        duplicated = max(0, copies - 1)
        wrong = 0
        if moved is not None:
            wrong = int(not torch.equal(moved.get(), values))
            x.garbage_collect = False
        elif on_bob:
            wrong = int(not torch.equal(x.get(), values))
        else:
            x.garbage_collect = False
    with tr.connect(session.url, name=session.name(f"{role}-auditor")) as auditor:
        live = [alice_id] + ([bob_id] if source_alive else [])
        left = sum(_objects(auditor.worker(w)) for w in live)
    where = "moved" if moved is not None else ("on bob" if on_bob else "nowhere")
    extra = f"object {where}" + (f"; {extra}" if extra else "")
    return Outcome(seconds, _ending(error), lost=lost, duplicated=duplicated, wrong=wrong,
                   left=left, extra=extra)


def restart_broker(stopped: threading.Event | None = None) -> None:
    """`rabbitmqctl stop_app; start_app` on the local node; back once it serves.
    `stopped` is set in between."""
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        raise RuntimeError("no rabbitmqctl here to restart the broker with")
    for step in (["stop_app"], ["start_app"], ["await_startup", "--timeout", "120"]):
        subprocess.run([rabbitmqctl, *step], check=True, capture_output=True, timeout=180)
        if stopped is not None and step == ["stop_app"]:
            stopped.set()


def broker_restart_idle(session: Session) -> Outcome:
    """A client and two workers with objects, idle through a broker restart; then
    the client goes on."""
    _, (bob_id, alice_id) = session.workers(["idle-bob", "idle-alice"])
    with tr.connect(session.url, name=session.name("idle-client"),
                    timeout=CLIENT_TIMEOUT) as fleet:
        bob, alice = fleet.worker(bob_id), fleet.worker(alice_id)
        x = send(torch.arange(4.0), bob)
        chain = send(torch.ones(2), alice).send(bob)
        fleet.sync()
        before = _objects(bob) + _objects(alice)
        restart_broker()
        started = time.monotonic()
        error: BaseException | None = None
        try:
            wrong = int((x + 1).get().tolist() != [1.0, 2.0, 3.0, 4.0])
        except tr.TorchRelayError as e:
            error, wrong = e, 0
        seconds = time.monotonic() - started
        after = _objects(bob) + _objects(alice)
        wrong += int(chain.get().get().tolist() != [1.0, 1.0])
        wrong += int(x.move(alice).get().tolist() != [0.0, 1.0, 2.0, 3.0])
    with tr.connect(session.url, name=session.name("idle-auditor")) as auditor:
        left = sum(_objects(auditor.worker(w)) for w in (bob_id, alice_id))
    return Outcome(seconds, _ending(error), lost=max(0, before - after), wrong=wrong,
                   left=left, extra="figure: from the broker serving again to the first result")


def broker_restart_pipeline(session: Session) -> Outcome:
    """Small ops issued without waiting, one after another, until the broker has
    stopped: everything not yet answered is in flight when it goes."""
    _, (bob_id,) = session.workers(["pipeline-bob"])
    with tr.connect(session.url, name=session.name("pipeline-client"),
                    timeout=CLIENT_TIMEOUT) as fleet:
        bob = fleet.worker(bob_id)
        y = send(torch.zeros(1), bob)
        fleet.sync()
        stopped = threading.Event()
        fault = _Fault(0.0, lambda: restart_broker(stopped))
        error: BaseException | None = None
        issued = wrong = lost = 0
        try:
            while not stopped.is_set() and issued < 1_000_000:
                y = y + 1
                issued += 1
            wrong = int(y.get().tolist() != [float(issued)])
        except tr.ConnectionLost as e:
            error, lost = e, len(e.lost)
        seconds = fault.since(interrupting=False)
        del y  # if the last op ran after all, its result goes too
        wrong += int((send(torch.ones(1), bob) * 2).get().tolist() != [2.0])  # it goes on
    with tr.connect(session.url, name=session.name("pipeline-auditor")) as auditor:
        left = _objects(auditor.worker(bob_id))
    named = "named in the error" if error is not None else "none"
    return Outcome(seconds, _ending(error), wrong=wrong, left=left,
                   extra=f"{issued} ops issued until the broker stopped, {lost} lost "
                         f"({named}); figure: from the broker serving again")


def load_run(session: Session) -> Row:
    s = session.settings
    _, ids = session.workers(["load-0", "load-1", "load-2"])
    result = run_load(session.url, ids, clients=s.load_clients, rounds=s.load_rounds,
                      name=session.name("load"))
    hung = sum("hung" in failure for failure in result.failures)
    note = (f"{result.clients} clients x ~{result.operations // max(result.finished, 1)} "
            f"operations, {result.finished} finished, {hung} hung; wrong {result.wrong}, "
            f"left {sum(result.left.values())}")
    return Row("11 load run, 3 workers, chains and moves", f"{result.seconds:.1f} s",
               note=note)


SCENARIOS: Sequence[tuple[str, Callable[[Session], Outcome]]] = (
    ("11 SIGKILL worker daemon mid-command", lambda s: killed_mid_command(s, whole_daemon=True)),
    ("11 SIGKILL worker executor mid-command",
     lambda s: killed_mid_command(s, whole_daemon=False)),
    ("11 SIGKILL destination mid-256 MiB move", lambda s: killed_mid_move(s, "destination")),
    ("11 SIGKILL source daemon mid-256 MiB move", lambda s: killed_mid_move(s, "source")),
    ("11 SIGKILL source executor mid-256 MiB move",
     lambda s: killed_mid_move(s, "source executor")),
)
BROKER_SCENARIOS: Sequence[tuple[str, Callable[[Session], Outcome]]] = (
    ("11 broker restart, participants idle", broker_restart_idle),
    ("11 broker restart, pipeline in flight", broker_restart_pipeline),
)


def faults(session: Session) -> MeasureResult:
    result = MeasureResult()
    scenarios = list(SCENARIOS)
    if session.settings.restart_broker:
        scenarios += BROKER_SCENARIOS
    for measure, scenario in scenarios:
        progress(f"faults: {measure[3:]}")
        try:
            outcome = scenario(session)
        except Exception as e:
            result.rows.append(failed(measure, e))
            continue
        result.raw[measure] = asdict(outcome)
        result.rows.append(outcome.row(measure))
    if not session.settings.restart_broker:
        result.rows.append(Row("11 broker restarts", "not run",
                               note="pass --restart-broker: it restarts the RabbitMQ node"))
    progress("faults: load run")
    try:
        result.rows.append(load_run(session))
    except Exception as e:
        result.rows.append(failed("11 load run", e))
    return result
