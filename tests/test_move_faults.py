"""A move that a crash interrupts is settled: the object ends up in exactly one place,
the client is told which, and no orphan copy is left behind (RabbitMQ, daemons).

To interrupt a move at a chosen point without depending on timing, the destination's
executor is paused (SIGSTOP): the source has sent its copy and waits for the answer,
which is when the tests kill what they kill.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

import torchrelay as tr
from torchrelay.broker import GONE_AFTER_SECONDS
from torchrelay.worker import WorkerProcesses

tr.hook(torch)

VALUES = torch.arange(6.0)
T = TypeVar("T")


def executor_of(worker: tr.WorkerHandle) -> int:
    return int(worker.status()["executor_pid"])


@contextmanager
def paused(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def interrupted(url: str, waiter: str, other: tr.WorkerHandle, kill: Callable[[], None],
                action: Callable[[], T], *, waiting: int = 1) -> T:
    """`action()`, with `other` paused until `waiter` waits on it `waiting` times (what
    it sent is in `other`'s queue), and then `kill` done."""
    other_executor = executor_of(other)

    def watch() -> None:
        with tr.connect(url, name="watcher") as fleet:
            worker = fleet.worker(waiter)
            deadline = time.monotonic() + 60
            while worker.status()["requests_waiting"] < waiting:
                assert time.monotonic() < deadline, f"{waiter} never waited"
                time.sleep(0.05)
        kill()
        os.kill(other_executor, signal.SIGCONT)

    with paused(other_executor):
        killer = threading.Thread(target=watch, daemon=True)
        killer.start()
        try:
            return action()
        finally:
            killer.join()


def move_interrupted(url: str, x: Any, destination: tr.WorkerHandle,
                     kill: Callable[[], None]) -> Any:
    """`x.move(destination)`, with `kill` done once x's worker has sent its copy."""
    return interrupted(url, x.location.id, destination, kill, lambda: x.move(destination))


@pytest.fixture
def pair(request: pytest.FixtureRequest, vhost_factory: Any,
         tmp_path: Path) -> Iterator[tuple[str, WorkerProcesses, Any]]:
    """bob and alice, and a session; a test where nothing restarts may ask (an indirect
    parameter) for a `gone_after` shorter than the default, for all three."""
    url = vhost_factory()
    gone_after: float = getattr(request, "param", GONE_AFTER_SECONDS)
    flags = ["--gone-after", str(gone_after)]
    with WorkerProcesses(url, ["bob", "alice"], extra_args=flags, log_dir=tmp_path) as daemons, \
            tr.connect(url, timeout=600, gone_after=gone_after) as fleet:  # (a timeout no
        yield url, daemons, fleet                                          # test waits out)


@pytest.mark.parametrize("pair", [3.0], indirect=True)
def test_a_move_whose_destination_is_gone_leaves_the_object_on_its_source(pair: Any) -> None:
    _url, daemons, fleet = pair
    bob, alice = fleet.worker("bob"), fleet.worker("alice")
    x = VALUES.send(bob)
    fleet.sync()
    daemons.stop("alice")  # its queue stays, with nobody to answer
    with pytest.raises(tr.RemoteError, match=r"transfer to alice.*'alice'.*it is gone") as e:
        x.move(alice)
    assert any("still on worker 'bob'" in note for note in e.value.__notes__)
    daemons.restart("alice")  # it takes the copy waiting in its queue, and then its delete
    assert alice._objects == {}
    assert torch.equal(x.get(), VALUES)


def test_a_move_whose_source_executor_dies_meanwhile_leaves_it_on_the_source(pair: Any) -> None:
    url, _daemons, fleet = pair
    bob, alice = fleet.worker("bob"), fleet.worker("alice")
    x = VALUES.send(bob)
    bob_executor = executor_of(bob)
    with pytest.raises(tr.RemoteError, match=r"restarted .* while this command waited on "
                       r"worker 'alice'.*still on worker 'bob'.*deleted"):
        move_interrupted(url, x, alice, lambda: os.kill(bob_executor, signal.SIGKILL))
    assert alice._objects == {}  # its copy came, and the delete right behind it
    assert torch.equal(x.get(), VALUES)
    assert bob._objects == {}


def test_what_ran_before_a_move_its_executor_died_in_is_answered_and_stands(
    pair: Any,
) -> None:
    # The addition's answer waits with its batch for the move's (one message back); the
    # executor dies first. The new one answers both: the addition ran and stands (its
    # answer was owed), the move did not complete.
    url, _daemons, fleet = pair
    bob, alice = fleet.worker("bob"), fleet.worker("alice")
    x = VALUES.send(bob)
    fleet.sync()
    bob_executor = executor_of(bob)

    def add_then_move() -> None:
        x.add_(1)
        x.move(alice)

    with pytest.raises(tr.RemoteError, match=r"restarted .* while this command waited on "
                       r"worker 'alice'.*still on worker 'bob'"):
        interrupted(url, "bob", alice, lambda: os.kill(bob_executor, signal.SIGKILL),
                    add_then_move)
    assert alice._objects == {}
    assert torch.equal(x.get(), VALUES + 1)  # added once, not twice
    assert bob._objects == {}


@pytest.mark.parametrize("pair", [3.0], indirect=True)
def test_a_move_whose_source_daemon_dies_after_sending_stands(pair: Any) -> None:
    url, daemons, fleet = pair
    bob, alice = fleet.worker("bob"), fleet.worker("alice")
    x = VALUES.send(bob)
    pids = [daemons.processes["bob"].pid, executor_of(bob)]
    # bob is gone with everything it held; alice has the copy: the move stands.
    y = move_interrupted(url, x, alice, lambda: [os.kill(pid, signal.SIGKILL) for pid in pids])
    x.garbage_collect = False  # bob and everything it held are gone
    assert torch.equal(y.get(), VALUES)
    assert alice._objects == {}


def test_a_move_whose_source_daemon_is_replaced_at_once_stands(pair: Any) -> None:
    # Started again at once, before any client could notice it was gone: the move, not
    # acknowledged before it completed, comes to the new daemon, which has no such object;
    # the client asks the destination, where the copy is.
    url, daemons, fleet = pair
    bob, alice = fleet.worker("bob"), fleet.worker("alice")
    x = VALUES.send(bob)

    def replace_bob() -> None:
        old = daemons.processes.pop("bob")
        old.kill()  # its executor dies with it
        old.wait()
        daemons.spawn("bob")  # (not waited for: the move's answer is)

    y = move_interrupted(url, x, alice, replace_bob)
    x.garbage_collect = False  # bob and everything it held are gone
    assert torch.equal(y.get(), VALUES)
    assert alice._objects == {} and bob._objects == {}


@pytest.mark.parametrize("pair", [3.0], indirect=True)
def test_a_move_whose_source_died_before_sending_names_what_is_lost(pair: Any) -> None:
    _url, daemons, fleet = pair
    bob, alice = fleet.worker("bob"), fleet.worker("alice")
    x = VALUES.send(bob)
    for pid in (executor_of(bob), daemons.processes["bob"].pid):
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(tr.UnknownWorker, match=r"'bob'.*it is gone") as e:
        x.move(alice)
    assert any(f"object {x.id_at_location} did not reach worker 'alice': if the daemon of "
               "'bob' died, it is lost with it" in note for note in e.value.__notes__)
    x.garbage_collect = False
    assert alice._objects == {}


def test_calls_down_a_chain_whose_executor_dies_meanwhile_fail_and_leave_nothing(
    pair: Any,
) -> None:
    url, _daemons, fleet = pair
    bob, alice = fleet.worker("bob"), fleet.worker("alice")
    x = VALUES.send(alice).send(bob)  # bob holds a pointer to alice's tensor
    fleet.sync()
    bob_executor = executor_of(bob)
    calls = 400  # each waits on bob for alice: more than a command line could carry

    def add_ones() -> None:
        for _ in range(calls):
            y = x + 1  # bob forwards it to alice, and waits
            y.garbage_collect = False  # it is never made
        fleet.sync()

    with pytest.raises(tr.RemoteError, match=r"restarted .* waited on worker 'alice': it did "
                       rf"not complete\n{calls - 1} later operations failed too"):
        interrupted(url, "bob", alice, lambda: os.kill(bob_executor, signal.SIGKILL), add_ones,
                    waiting=calls)
    assert len(alice._objects) == 1  # x's target: every sum was deleted behind it
    assert bob.status()["requests_waiting"] == 0
    assert torch.equal(x.get().get(), VALUES)
