"""Faults of a fleet: a worker that is gone fails a wait at once rather than after the
whole timeout, its queue expires, and quorum queues serve as classic ones do
(RabbitMQ, daemons)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import torch

import torchrelay as tr
from torchrelay.broker import GONE_AFTER_SECONDS, ManagementAPI, worker_queue
from torchrelay.worker import WorkerProcesses

tr.hook(torch)


def test_a_wait_on_a_worker_that_died_fails_naming_it_not_after_the_timeout(
    vhost_factory: Any, tmp_path: Path,
) -> None:
    url = vhost_factory()
    # (A timeout no test would wait out, and a grace shorter than the default 15 s.)
    with WorkerProcesses(url, ["dora"], log_dir=tmp_path) as daemons, \
            tr.connect(url, timeout=600, gone_after=3) as fleet:
        x = torch.ones(2).send(fleet.worker("dora"))
        fleet.sync()
        daemons.stop("dora")  # gone: its queue stays, with nobody to answer
        with pytest.raises(tr.UnknownWorker,
                           match=r"dora.*no daemon has consumed its queue for (\d+) s") as e:
            x.get()
        said = re.search(r"for (\d+) s", str(e.value))
        assert said is not None
        assert 3 <= int(said.group(1)) < GONE_AFTER_SECONDS  # the session's grace
        x.garbage_collect = False


def test_a_worker_killed_mid_command_fails_the_wait_and_serves_again_once_restarted(
    vhost_factory: Any, tmp_path: Path,
) -> None:
    url = vhost_factory()
    with WorkerProcesses(url, ["kim"], log_dir=tmp_path) as daemons, \
            tr.connect(url, timeout=600, gone_after=3) as fleet:
        kim = fleet.worker("kim")
        x = torch.ones(3).send(kim)
        fleet.sync()
        executor = int(kim.status()["executor_pid"])
        os.kill(executor, signal.SIGSTOP)  # the command below is taken, and never answered
        y = x * 2
        threading.Timer(0.5, lambda: [os.kill(pid, signal.SIGKILL) for pid in (
            executor, daemons.processes["kim"].pid)]).start()
        with pytest.raises(tr.UnknownWorker, match=r"kim.*it is gone"):
            fleet.sync()
        daemons.restart("kim")
        assert (torch.ones(2).send(kim) + 1).get().tolist() == [2.0, 2.0]
        # What the dead daemon had taken but not acknowledged comes again to the new
        # one (at least once), and may run there again; the pointers' deletes clear it.
        del x, y
        assert kim._objects == {}


def test_the_queue_of_a_worker_that_is_gone_expires_and_commands_then_fail_at_once(
    vhost_factory: Any, tmp_path: Path, rabbitmq: ManagementAPI,
) -> None:
    url = vhost_factory()
    vhost = url.rsplit("/", 1)[1]
    daemons = WorkerProcesses(url, ["brief"], log_dir=tmp_path,
                              worker_args={"brief": ["--queue-expires", "1"]})
    with daemons:
        queue = rabbitmq.queue(worker_queue("brief"), vhost)
        assert queue["arguments"]["x-expires"] == 1000
        assert queue["arguments"]["x-dead-letter-exchange"] == "torchrelay.dead"
    deadline = time.monotonic() + 60
    while any(q["name"] == worker_queue("brief") for q in rabbitmq.queues(vhost)):
        assert time.monotonic() < deadline, "the queue did not expire"
        time.sleep(0.25)
    with tr.connect(url) as fleet, pytest.raises(tr.UnknownWorker, match="no queue"):
        fleet.worker("brief")


def test_a_worker_on_a_quorum_queue_serves_as_on_a_classic_one(
    vhost_factory: Any, tmp_path: Path, rabbitmq: ManagementAPI,
) -> None:
    url = vhost_factory()
    vhost = url.rsplit("/", 1)[1]
    daemons = WorkerProcesses(url, ["quinn", "bob"], log_dir=tmp_path,
                              worker_args={"quinn": ["--queue-type", "quorum"]})
    with daemons, tr.connect(url) as fleet:
        queue = rabbitmq.queue(worker_queue("quinn"), vhost)
        assert queue["type"] == "quorum"
        assert queue["arguments"]["x-single-active-consumer"] is True
        y = torch.tensor([1.0, 2.0]).send(fleet.worker("quinn")) * 3
        assert y.move(fleet.worker("bob")).get().tolist() == [3.0, 6.0]
        assert fleet.worker("quinn")._objects == {}


def test_json_logs_have_a_line_per_command_and_per_failure(
    vhost_factory: Any, tmp_path: Path,
) -> None:
    url = vhost_factory()
    daemons = WorkerProcesses(url, ["logan"], log_dir=tmp_path,
                              worker_args={"logan": ["--log-format", "json",
                                                     "--log-level", "DEBUG"]})
    with daemons, tr.connect(url) as fleet:
        x = torch.ones(2).send(fleet.worker("logan"))
        with pytest.raises(tr.RemoteError):
            x.view(3).get()  # a failure: 2 elements into 3
        x.get()
    lines = (tmp_path / "logan.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert {r["worker"] for r in records} == {"logan"}
    assert {r["process"] for r in records} == {"supervisor", "executor"}
    stores = [r for r in records if r.get("command") == "store" and r["level"] == "DEBUG"]
    assert stores and stores[0]["objects"] == [x.id_at_location]
    assert stores[0]["sender"] == "me" and stores[0]["correlation_id"]
    (failed,) = [r for r in records if r["level"] == "WARNING" and r.get("command") == "call"]
    assert "Tensor.view" in failed["message"] and "RuntimeError" in failed["message"]


def _restart_the_broker(management: ManagementAPI,
                        stopped: threading.Event | None = None) -> None:
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        pytest.skip("no rabbitmqctl here to restart the broker with")
    for step in (["stop_app"], ["start_app"], ["await_startup", "--timeout", "120"]):
        subprocess.run([rabbitmqctl, *step], check=True, capture_output=True, timeout=180)
        if stopped is not None and step == ["stop_app"]:
            stopped.set()
    deadline = time.monotonic() + 120  # the console comes back a little after the node
    while not management.available():
        assert time.monotonic() < deadline, "the management API did not come back"
        time.sleep(0.5)


@pytest.mark.restarts_broker
def test_an_idle_broker_restart_costs_idle_participants_nothing(
    vhost_factory: Any, tmp_path: Path, rabbitmq: ManagementAPI,
) -> None:
    url = vhost_factory()
    with WorkerProcesses(url, ["bob", "alice"], log_dir=tmp_path) as daemons, \
            tr.connect(url) as fleet:
        x = torch.tensor([1.0, 2.0]).send(fleet.worker("bob"))
        fleet.sync()
        pids = {w: fleet.worker(w).status()["pid"] for w in ("bob", "alice")}
        _restart_the_broker(rabbitmq)  # stop_app / start_app: every connection dropped
        # The next call reconnects by itself; the daemons kept their objects.
        assert (x + 1).get().tolist() == [2.0, 3.0]
        moved = x.move(fleet.worker("alice"))
        assert moved.get().tolist() == [1.0, 2.0]
        assert {w: fleet.worker(w).status()["pid"] for w in ("bob", "alice")} == pids
        assert all(process.poll() is None for process in daemons.processes.values())


@pytest.mark.restarts_broker
def test_a_pipeline_in_flight_through_a_broker_restart_completes_or_says_what_was_lost(
    vhost_factory: Any, tmp_path: Path, rabbitmq: ManagementAPI,
) -> None:
    url = vhost_factory()
    # (A broker restarting takes its time on a slow machine, and the daemon's reconnect
    # with it: the session waits for as long as a restart may take, not 30 s.)
    with WorkerProcesses(url, ["bob"], log_dir=tmp_path), \
            tr.connect(url, timeout=180) as fleet:
        bob = fleet.worker("bob")
        y = torch.zeros(1).send(bob)
        fleet.sync()
        stopped = threading.Event()
        restart = threading.Thread(target=_restart_the_broker, args=(rabbitmq, stopped))
        restart.start()
        issued = 0
        outcome: Any
        try:
            while not stopped.is_set():  # ops go out, in batches, until the broker is down
                y = y + 1
                issued += 1
            outcome = y.get()
        except tr.ConnectionLost as e:
            outcome = e
        finally:
            restart.join()
        if isinstance(outcome, tr.ConnectionLost):  # never a silent loss: what, named
            assert "in flight lost, the first:" in str(outcome)
            assert outcome.lost and all(worker == "bob" for worker, _ in outcome.lost)
        else:
            assert outcome.tolist() == [float(issued)]  # or every operation ran
        del y  # (a Delete of something never made is harmless)
        # The session goes on, and what the lost operations made, if they ran, goes.
        assert (torch.ones(1).send(bob) * 2).get().tolist() == [2.0]
        assert bob._objects == {}


class _Proxy:
    """A TCP proxy to `host:port` on a port of its own, until `cut`: then every
    connection through it drops, and new ones are refused."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # cut
            if self._cut:  # (accepted as it was cut)
                client.close()
                return
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:  # (the ends are closed by `cut`)
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._cut = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # (wakes the accept: close would not)
        self._listener.close()
        for end in self._sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


def test_a_daemon_told_to_stop_while_the_broker_is_unreachable_stops_by_itself(
    vhost_factory: Any, tmp_path: Path,
) -> None:
    # It gives up reconnecting at once: not after its connect timeout, once per attempt,
    # by which time its supervisor had killed it (stop_grace).
    url = vhost_factory()
    parts = urllib.parse.urlsplit(url)
    proxy = _Proxy(parts.hostname or "localhost", parts.port or 5672)
    through = urllib.parse.urlunsplit(parts._replace(
        netloc=f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"))
    with WorkerProcesses(through, ["cut"], log_dir=tmp_path) as daemons:
        with tr.connect(url) as fleet:
            assert fleet.worker("cut").status()["id"] == "cut"
        proxy.cut()
        log = tmp_path / "cut.log"
        deadline = time.monotonic() + 120
        while "lost its connection" not in log.read_text():
            assert time.monotonic() < deadline, "the daemon never noticed"
            time.sleep(0.1)
        daemons.stop("cut", timeout=300)
    said = log.read_text()
    assert "gave up" in said and "stopping" in said
    assert "killing it" not in said  # its supervisor did not have to
