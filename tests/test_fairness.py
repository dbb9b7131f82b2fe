"""A fair share of a shared worker (RabbitMQ, daemons): one participant's heavy work
cannot keep another waiting beyond the command in hand, status answers throughout, a
participant whose commands keep overrunning is refused for a while, and a flood of
messages can be capped. Heavy commands are `testing.stall` (a daemon started with
`--fault-injection`): how long they last does not depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_daemon import stall

import torchrelay as tr
from torchrelay.worker import WorkerProcesses

tr.hook(torch)


@pytest.fixture
def shared(vhost_factory: Any, tmp_path: Any) -> Iterator[tuple[str, WorkerProcesses]]:
    url = vhost_factory()
    daemons = WorkerProcesses(url, ["fay"], log_dir=tmp_path, extra_args=[
        "--fault-injection", "--command-timeout", "120", "--stop-grace", "1"])
    with daemons:
        yield url, daemons


def _busy(fleet: tr.Fleet, worker: str) -> dict[str, Any]:
    """The worker's status once it is busy with a command (answered beside it)."""
    deadline = time.monotonic() + 60
    while True:
        status = fleet.worker(worker).status()
        if "busy" in status:
            return status
        assert time.monotonic() < deadline, "the worker never got busy"
        time.sleep(0.05)


def test_a_light_participant_waits_at_most_for_the_heavy_command_in_hand(
    shared: tuple[str, WorkerProcesses],
) -> None:
    url, _ = shared
    with tr.connect(url, name="heavy", timeout=120) as heavy, \
            tr.connect(url, name="light", timeout=120) as light:
        mine = torch.tensor([1.0, 2.0]).send(light.worker("fay"))
        light.sync()
        for _ in range(3):  # back to back, in one message: three heavy commands
            stall(heavy, "fay", 4.0)
        heavy._publish()
        status = _busy(light, "fay")  # answered while the first runs
        assert status["busy"]["sender"] == "heavy"
        assert status["busy"]["command"] == "call"

        assert mine.get().tolist() == [1.0, 2.0]
        # The light participant's get went before the heavy one's next command: when it
        # came back, at least one of the three was still waiting to run.
        waiting = light.worker("fay").status()
        assert waiting.get("queued", {}).get("heavy", 0) >= 1 or (
            waiting.get("busy", {}).get("sender") == "heavy")
        heavy.sync()


def test_status_answers_while_a_command_runs_and_the_command_line_shows_it(
    shared: tuple[str, WorkerProcesses],
) -> None:
    url, _ = shared
    with tr.connect(url, name="heavy", timeout=120) as heavy, \
            tr.connect(url, name="watcher", timeout=10) as watcher:
        stall(heavy, "fay", 30.0)
        heavy._publish()
        status = _busy(watcher, "fay")  # within the watcher's 10 s, while 30 s of stall run
        assert status["busy"]["command"] == "call"
        assert status["id"] == "fay"
        (alive,) = [w for w in watcher.workers() if w["id"] == "fay"]  # presence too
        assert "busy" in alive
        result = subprocess.run(
            [sys.executable, "-m", "torchrelay", "status", "fay", "--broker", url],
            capture_output=True, text=True, timeout=60, check=False)
        assert json.loads(result.stdout)["busy"]["sender"] == "heavy"
        heavy.timeout = 1  # (closing would wait for the stall's answer)


def test_a_participant_whose_commands_overrun_is_refused_for_a_while(
    vhost_factory: Any, tmp_path: Any,
) -> None:
    url = vhost_factory()
    with WorkerProcesses(url, ["gil"], log_dir=tmp_path, extra_args=[
            "--fault-injection", "--command-timeout", "2", "--sender-strikes", "2",
            "--sender-penalty", "600"]) as daemons, \
            tr.connect(url, name="greedy", timeout=60) as greedy, \
            tr.connect(url, name="other", timeout=60) as other:
        for _ in range(2):
            stall(greedy, "gil", 3600.0)
            with pytest.raises(tr.RemoteError, match="past the worker's command_timeout"):
                greedy.sync()
            daemons.wait_ready(["gil"])  # its new executor serves
        with pytest.raises(tr.RemoteError, match=r"refuses commands from 'greedy' for .* "
                                                 r"\(sender_strikes, sender_penalty\)"):
            torch.ones(2).send(greedy.worker("gil")).get()
        # Everyone else is served as before.
        assert torch.ones(2).send(other.worker("gil")).get().tolist() == [1.0, 1.0]


def test_a_flood_of_messages_can_be_capped_per_sender(
    vhost_factory: Any, tmp_path: Any,
) -> None:
    url = vhost_factory()
    with WorkerProcesses(url, ["hal"], log_dir=tmp_path, extra_args=[
            "--fault-injection", "--sender-max-queued", "2"]), \
            tr.connect(url, name="flood", timeout=60) as flood, \
            tr.connect(url, name="watcher", timeout=60) as watcher:
        stall(flood, "hal", 3.0)
        flood._publish()
        _busy(watcher, "hal")
        for _ in range(4):  # each its own message
            stall(flood, "hal", 0.0)
            flood._publish()
        with pytest.raises(tr.RemoteError, match=r"already holds 2 messages of 'flood' "
                                                 r"waiting to run \(sender_max_queued\)"):
            flood.sync()


def test_what_a_participant_caused_elsewhere_keeps_its_place_among_its_own_commands(
    vhost_factory: Any, tmp_path: Any,
) -> None:
    """A heavy participant's call down a chain (gus forwards it to fay) must not overtake
    what the participant sent fay directly before it (the grant that lets gus use its
    tensor), though gus, as a sender, has kept fay busy less."""
    url = vhost_factory()
    with WorkerProcesses(url, ["fay", "gus"], log_dir=tmp_path, extra_args=[
            "--fault-injection"]), tr.connect(url, name="heavy", timeout=60) as heavy:
        fay, gus = heavy.worker("fay"), heavy.worker("gus")
        stall(heavy, "fay", 2.0)  # now the busier sender on fay
        heavy.sync()
        stall(heavy, "fay", 2.0)  # and fay busy while what follows queues up behind
        heavy._publish()
        chained = torch.tensor([1.0, 2.0]).send(fay).send(gus)  # a grant to fay, then gus
        doubled = chained * 2  # gus forwards it to fay, on heavy's behalf
        assert doubled.get().get().tolist() == [2.0, 4.0]
