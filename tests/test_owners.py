"""Many data owners on one machine: one daemon process hosting several workers.

Each hosted worker must be what a daemon of its own is — its own queue, store,
identity, privacy policy and ledger — with only the process shared
(`worker/containment/_host.py`). One host serves five digit owners, the
aggregator and two owners of private data; another is stopped by SIGTERM.
"""

from __future__ import annotations

import gc
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from conftest import vhost_of
from safetensors.torch import save_file

import torchrelay as tr
from torchrelay._cli import main
from torchrelay._federated import anchor_order, make_model, one_torch_thread, write_shares
from torchrelay.broker import Call, Fetch, ManagementAPI, ObjectRef, worker_queue
from torchrelay.worker import ConfigError, WorkerConfig, WorkerProcesses
from torchrelay.worker.containment._daemon import serve_workers
from torchrelay.worker.containment._host import _by_login, check_hosted, host_workers
from torchrelay.worker.runtime._runtime import WorkerRuntime

tr.hook(torch)

OWNERS = tuple(f"owner-{i}" for i in range(5))
AGGREGATOR = "aggregator"
POLICIES: dict[str, dict[str, Any]] = {
    "keeper": {"k": 2, "clip": 1.0, "noise_multiplier": 1.0, "epsilon": 50.0, "delta": 1e-5,
               "trusted": [AGGREGATOR]},
    "warden": {"k": 2, "clip": 1.0, "noise_multiplier": 2.0, "epsilon": 20.0, "delta": 1e-5,
               "trusted": [AGGREGATOR]},
}
PUBLIC = "open"  # the same kind of data as keeper's, offered as public
HOSTED = (*OWNERS, AGGREGATOR, *POLICIES, PUBLIC)
ROUNDS = 3


def _config(folder: Path, worker: str, dataset: str | None = None, *, tag: str = "#digits",
            private: bool = False, policy: dict[str, Any] | None = None) -> Path:
    lines = ["[worker]", f'id = "{worker}"', 'broker = "amqp://set-by-flag/"']
    if dataset is not None:
        lines += ["", "[[worker.datasets]]", f"path = {json.dumps(dataset)}",
                  f'tags = ["{tag}"]',
                  f"private = {'true' if private else 'false'}"]
    if policy is not None:
        lines += ["", "[worker.privacy]", *(f"{k} = {json.dumps(v)}" for k, v in policy.items()),
                  f'ledger = "{worker}.privacy.json"']
    path = folder / f"{worker}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("owners")


@pytest.fixture(scope="module")
def shares(folder: Path) -> dict[str, Path]:
    return write_shares(folder, OWNERS)


@pytest.fixture(scope="module")
def host(vhost_factory: Any, folder: Path, shares: dict[str, Path]) -> Iterator[WorkerProcesses]:
    secret = folder / "secret.safetensors"
    save_file({"data": torch.arange(12.0).view(6, 2) + 7919, "target": torch.arange(6)},
              str(secret))
    configs = [_config(folder, owner, str(shares[owner])) for owner in OWNERS]
    configs.append(_config(folder, AGGREGATOR))
    configs += [_config(folder, owner, str(secret), tag="#secret", private=True, policy=policy)
                for owner, policy in POLICIES.items()]
    configs.append(_config(folder, PUBLIC, str(secret), tag="#secret"))
    daemons = WorkerProcesses(vhost_factory(), [], extra_args=["--torch-threads", "1"],
                              log_dir=folder / "logs")
    try:
        daemons.spawn_host("host", HOSTED, *(a for c in configs for a in ("--config", str(c))))
        daemons.wait_ready(HOSTED)
        yield daemons
    finally:
        daemons.stop_all()


@pytest.fixture
def fleet(host: WorkerProcesses) -> Iterator[tr.Fleet]:
    with tr.connect(host.url, timeout=60) as session:
        before = {w: set(session.worker(w)._objects) for w in HOSTED}
        yield session
        gc.collect()
        session.sync()
        assert {w: set(session.worker(w)._objects) for w in HOSTED} == before  # nothing left


def test_one_process_serves_every_hosted_worker_on_its_own_queue(
        host: WorkerProcesses, fleet: tr.Fleet, rabbitmq: ManagementAPI) -> None:
    statuses = [fleet.worker(w).status() for w in HOSTED]
    assert [s["id"] for s in statuses] == list(HOSTED)
    assert {s["pid"] for s in statuses} == {host.processes["host"].pid}
    # One connection for them all (they log in alike), as the console shows it: a
    # command and a reply channel of each worker's own on it.
    (name,) = {s["connection"] for s in statuses}
    assert name == "torchrelay host " + ", ".join(HOSTED)
    connections = rabbitmq.wait_for_connections(
        lambda cs: any(_named(c) == name and c.get("channels", 0) >= 2 * len(HOSTED)
                       for c in cs), vhost_of(host.url))
    assert [_named(c) for c in connections].count(name) == 1
    results = [(torch.tensor([float(i)]).send(fleet.worker(w)) * 2).get()
               for i, w in enumerate(HOSTED)]
    assert results == [torch.tensor([2.0 * i]) for i in range(len(HOSTED))]


def _named(connection: dict[str, Any]) -> str | None:
    name: str | None = connection["client_properties"].get("connection_name")
    return name


def test_one_hosted_worker_s_objects_are_unknown_to_another(fleet: tr.Fleet) -> None:
    first, second = fleet.worker(OWNERS[0]), fleet.worker(OWNERS[1])
    x = torch.tensor([1.0, 2.0]).send(first)
    fleet.sync()
    theirs = x.id_at_location
    assert theirs in first._objects and theirs not in second._objects
    with pytest.raises(tr.ObjectNotFound, match=f"no object {theirs} on worker '{OWNERS[1]}'"):
        fleet.request(OWNERS[1], Fetch(theirs))
    with pytest.raises(tr.RemoteError, match=f"no object {theirs}"):
        fleet.request(OWNERS[1], Call("Tensor.__add__", [ObjectRef(theirs), 1], {},
                                      fleet.new_id()))
    assert torch.equal(x.get(), torch.tensor([1.0, 2.0]))  # untouched on its own worker


def test_each_hosted_worker_keeps_its_own_privacy_policy_and_ledger(
        folder: Path, fleet: tr.Fleet) -> None:
    (kept,) = fleet.worker("keeper").search("#secret")
    (warded,) = fleet.worker("warden").search("#secret")
    (offered,) = fleet.worker(PUBLIC).search("#secret")
    assert kept.private and warded.private and not offered.private
    assert kept.privacy is not None and warded.privacy is not None
    assert (kept.privacy["epsilon"], warded.privacy["epsilon"]) == (50.0, 20.0)
    with pytest.raises(tr.PrivateDataError):
        kept["data"].sum().get()
    assert float(offered["data"].sum().get()) == float((torch.arange(12.0) + 7919).sum())
    release = tr.aggregate([kept["data"].sum(0), warded["data"].sum(0)], weights=[1, 1],
                           aggregator=fleet.worker(AGGREGATOR))
    assert release.get().shape == (2,)
    assert set(release.epsilon) == {"keeper", "warden"}
    # Each owner's release is charged to its own ledger file, beside its config, once.
    for owner in POLICIES:
        ledger = json.loads((folder / f"{owner}.privacy.json").read_text())
        assert sum(ledger["releases"].values()) == 1


def test_fedavg_across_hosted_owners_gives_the_embedded_model(
        shares: dict[str, Path], fleet: tr.Fleet) -> None:
    def trained(session: tr.Fleet) -> dict[str, torch.Tensor]:
        datasets = [d for o in OWNERS for d in session.worker(o).search("#digits")]
        assert [d.location.id for d in datasets] == list(OWNERS)
        fedavg = tr.FedAvg(make_model(), F.cross_entropy,
                           aggregator=session.worker(AGGREGATOR), order=anchor_order,
                           progress=False)
        history = fedavg.fit(datasets, ROUNDS)
        assert all(r.participants == sorted(OWNERS) and not r.left_out for r in history)
        state = {k: v.clone() for k, v in fedavg.model.state_dict().items()}
        del fedavg
        return state

    hosted = trained(fleet)
    offered = {o: [{"path": str(p), "tags": ["#digits"], "private": False}]
               for o, p in shares.items()}
    with one_torch_thread(), tr.connect(datasets=offered) as embedded:
        reference = trained(embedded)
    assert hosted.keys() == reference.keys()
    assert all(torch.equal(hosted[k], reference[k]) for k in hosted)


def test_sigterm_stops_every_hosted_worker_cleanly(vhost_factory: Any, tmp_path: Path) -> None:
    ids = ("stop-a", "stop-b", "stop-c")
    daemons = WorkerProcesses(vhost_factory(), [], log_dir=tmp_path)
    try:
        process = daemons.spawn_host("host", ids, "--id", ",".join(ids))
        daemons.wait_ready(ids)
        with tr.connect(daemons.url) as session:
            kept = [torch.ones(2).send(session.worker(w)) for w in ids]
            session.sync()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
            for pointer in kept:
                pointer.garbage_collect = False  # (they went with the process)
            # Every queue is left with no consumer (and its commands for the next daemon).
            assert [session.endpoint.queue_consumers(worker_queue(w)) for w in ids] == [0] * 3
        log = daemons.log_tail("host", 100)
        assert "received SIGTERM" in log
        assert all(f"worker {w} stopped" in log for w in ids)
    finally:
        daemons.stop_all()


def test_hosted_workers_take_turns_handling_commands(vhost_factory: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Hosted in this process (threads), so that the runtime's steps can be watched: while
    # one worker runs a command, no other worker of the host runs one, though both have
    # commands waiting (each matmul lets go of the GIL: without turns they overlap).
    running, most, steps, guard = 0, 0, 0, threading.Lock()
    step = WorkerRuntime.step

    def watched(runtime: WorkerRuntime) -> None:
        nonlocal running, most, steps
        with guard:
            running += 1
            most, steps = max(most, running), steps + 1
        try:
            step(runtime)
        finally:
            with guard:
                running -= 1

    monkeypatch.setattr(WorkerRuntime, "step", watched)
    url, ids = vhost_factory(), ("turn-a", "turn-b")
    stop = threading.Event()
    host = threading.Thread(target=host_workers,
                            args=([WorkerConfig(id=w, broker=url) for w in ids], stop))
    host.start()
    try:
        with tr.connect(url, timeout=60) as session:
            for _ in range(60):  # until both serve (their queues exist)
                if set(ids) <= {status["id"] for status in session.workers()}:
                    break
            matrices = [torch.rand(300, 300).send(session.worker(w)) for w in ids]
            products = [m @ m for _ in range(15) for m in matrices]  # both queues filled
            session.sync()
            del products, matrices
    finally:
        stop.set()
        host.join(timeout=60)
    assert not host.is_alive()
    assert steps >= 30 and most == 1


def test_hosted_workers_reconnect_together_and_keep_their_objects(
        vhost_factory: Any, rabbitmq: ManagementAPI, tmp_path: Path) -> None:
    ids = ("again-a", "again-b")
    daemons = WorkerProcesses(vhost_factory(), [], log_dir=tmp_path)
    try:
        daemons.spawn_host("host", ids, "--id", ",".join(ids))
        daemons.wait_ready(ids)
        with tr.connect(daemons.url, timeout=60) as session:
            kept = [torch.tensor([float(i)]).send(session.worker(w)) for i, w in enumerate(ids)]
            session.sync()
            name = "torchrelay host " + ", ".join(ids)
            (shared,) = [c["name"] for c in rabbitmq.wait_for_connections(
                lambda cs: name in map(_named, cs), vhost_of(daemons.url)) if _named(c) == name]

            rabbitmq.close_connection(shared)

            deadline = time.monotonic() + 30
            # Each notices, as the connection was theirs too.
            while min(_reconnects(session, w) for w in ids) < 1:
                assert time.monotonic() < deadline, "the host did not reconnect"
                time.sleep(0.2)
            assert [float(p.get()) for p in kept] == [0.0, 1.0]
    finally:
        daemons.stop_all()


def test_a_hosted_worker_flooded_with_work_does_not_hold_up_another(
        vhost_factory: Any, tmp_path: Path) -> None:
    # One thread serves both, a command of each in turn: the other worker's command is
    # answered while the flood runs, not after it.
    ids = ("busy", "idle")
    daemons = WorkerProcesses(vhost_factory(), [], extra_args=["--torch-threads", "1"],
                              log_dir=tmp_path)
    try:
        daemons.spawn_host("host", ids, "--id", ",".join(ids))
        daemons.wait_ready(ids)
        with tr.connect(daemons.url, timeout=120) as flooder, \
                tr.connect(daemons.url, timeout=120, name="other") as other:
            matrix = torch.rand(400, 400).send(flooder.worker("busy"))
            flooder.sync()
            before = other.worker("busy").status()["commands_handled"]
            products = [matrix @ matrix for _ in range(100)]  # a second or more of work
            deadline = time.monotonic() + 30
            while True:  # until the flood has begun
                status = other.worker("busy").status()
                if "busy" in status or status["commands_handled"] > before:
                    break
                assert time.monotonic() < deadline, "the flood never started"

            assert float((torch.ones(1).send(other.worker("idle")) + 1).get()) == 2.0
            handled = other.worker("busy").status()["commands_handled"] - before
            assert handled < 100, "the other worker's command waited for the whole flood"
            flooder.sync()
            del products, matrix
    finally:
        daemons.stop_all()


def _reconnects(session: tr.Fleet, worker: str) -> int:
    try:
        return int(session.worker(worker).status()["reconnects"])
    except tr.TorchRelayError:  # (asked while it reconnects)
        return 0


def test_workers_that_log_in_differently_get_connections_of_their_own() -> None:
    configs = [WorkerConfig(id="a", broker="amqp://guest:guest@localhost/"),
               WorkerConfig(id="a-user", broker="amqp://a-user:pw@localhost/"),
               WorkerConfig(id="b", broker="amqp://guest:guest@localhost/"),
               WorkerConfig(id="c", broker="amqp://guest:guest@localhost/", prefetch=8)]
    assert [[c.id for c in group] for group in _by_login(configs)] == [
        ["a", "b"], ["a-user"], ["c"]]


def test_a_journaled_runtime_is_never_hosted_with_other_workers() -> None:
    # A connection serving several workers writes their answers behind; an executor's
    # journal counts an answer sent once published, so its worker is served alone.
    configs = [WorkerConfig(id=w, broker="amqp://guest:guest@localhost/") for w in "ab"]
    with pytest.raises(ValueError, match="serves one worker alone, not 2"):
        serve_workers(configs, name="host", make_runtime=lambda endpoint: cast(Any, None))


def test_a_hosted_worker_that_cannot_start_stops_the_others(vhost_factory: Any,
                                                            tmp_path: Path) -> None:
    (tmp_path / "broken.csv").write_text("a,b\nx,y\n")  # refused when the worker loads it
    good = _config(tmp_path, "starts")
    bad = _config(tmp_path, "cannot", "broken.csv")
    daemons = WorkerProcesses(vhost_factory(), [], log_dir=tmp_path)
    try:
        process = daemons.spawn_host("host", ["starts", "cannot"], "--config", str(good),
                                     "--config", str(bad))
        assert process.wait(timeout=60) == 2  # the failure's status, not half a host
        log = daemons.log_tail("host", 100)
        assert "worker cannot cannot start" in log
        assert "worker starts stopped" in log
    finally:
        daemons.stop_all()


# -- what a host refuses, before it connects anywhere -------------------------------------


def test_several_workers_in_one_process_only_when_told_unsupervised(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--id", "a,b", "--broker", "amqp://nowhere.invalid/"]) == 2
    assert "--unsupervised" in capsys.readouterr().err


def test_a_host_refuses_twice_the_same_worker_or_a_shared_ledger(tmp_path: Path) -> None:
    def config(worker: str, **settings: Any) -> WorkerConfig:
        return WorkerConfig(id=worker, broker="amqp://nowhere.invalid/", **settings)

    with pytest.raises(ConfigError, match="listed twice"):
        check_hosted([config("a"), config("a")])
    shared = {"ledger": str(tmp_path / "one.json")}
    with pytest.raises(ConfigError, match="would share the privacy ledger"):
        check_hosted([config("a", privacy=shared), config("b", privacy=shared)])
    with pytest.raises(ConfigError, match="torch_threads"):
        check_hosted([config("a", torch_threads=1), config("b", torch_threads=2)])
    check_hosted([config("a"), config("b")])  # each its own default ledger
