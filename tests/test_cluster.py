"""A three-node RabbitMQ cluster: daemons and clients fail over between its nodes.

`scripts/rabbitmq-cluster.sh` starts the cluster on this host (nodes hare1..3 on
ports 5681..5683, beside the machine's own RabbitMQ) and stops it at the end.
Worker queues are quorum queues, replicated on the three nodes. Each test stops a
node in the middle of work — the one a worker daemon is connected to, or the one
leading a worker's queue — and checks that the work completes with exactly the
right result: nothing confirmed lost, nothing run twice.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import IN_CI
from test_fedavg import _reference_accuracies
from torch import nn

import torchrelay as tr
from torchrelay._federated import (
    AGGREGATOR,
    DIGIT_OWNERS,
    accuracy,
    anchor_order,
    load_digits,
    make_model,
    write_shares,
)
from torchrelay.broker import broker_addresses, open_broker
from torchrelay.worker import WorkerProcesses
from torchrelay.worker.operations._config import (
    ConfigError,
    WorkerConfig,
    add_flags,
    flags_given,
)

tr.hook(torch)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rabbitmq-cluster.sh"
PORTS = (5681, 5682, 5683)
RABBITMQCTL = shutil.which("rabbitmqctl") or "rabbitmqctl"


def node_url(port: int) -> str:
    return f"amqp://guest:guest@localhost:{port}/"


def addresses(*order: int) -> str:
    """The cluster's addresses, nodes (1..3) in this order first."""
    ports = [PORTS[n - 1] for n in order] + [p for p in PORTS if p not in
                                               [PORTS[n - 1] for n in order]]
    return ",".join(node_url(port) for port in ports)


def cluster(*args: str) -> str:
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          check=False)
    if done.returncode:
        raise RuntimeError(f"rabbitmq-cluster.sh {' '.join(args)} failed: "
                           f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def queue_leader(queue: str) -> int:
    """The node (1..3) leading `queue`, as the cluster says."""
    return int(cluster("leader", queue))


def settled() -> None:
    """Wait until every quorum queue has its three members online again (a restarted
    node catches up): a test starts on a whole cluster."""
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run([RABBITMQCTL, "-q", "-n", "hare1@localhost", "list_queues",
                               "name", "type", "online", "--formatter", "json"],
                              capture_output=True, text=True, timeout=60, check=False)
        rows = json.loads(done.stdout) if done.returncode == 0 else None
        if rows is not None and all(len(row["online"]) == len(PORTS) for row in rows
                                    if row["type"] == "quorum"):
            return
        assert time.monotonic() < deadline, f"the cluster did not settle: {rows}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def three_nodes() -> Iterator[None]:
    usable = shutil.which("rabbitmq-server") is not None and (
        os.geteuid() == 0 or shutil.which("sudo") is not None)
    if not usable:
        if IN_CI:
            pytest.fail("under CI=true the cluster tests must run: rabbitmq-server and root "
                        "(or sudo) are needed to start the cluster")
        pytest.skip("no rabbitmq-server here, or no root, to start a cluster with")
    cluster("start")
    try:
        yield
    finally:
        cluster("stop")


@pytest.fixture
def stopped_node(three_nodes: None) -> Iterator[list[int]]:
    """Stop nodes by appending them here (the test's `stop`); they start again after."""
    stopped: list[int] = []
    yield stopped
    for node in stopped:
        cluster("start-node", str(node))
    cluster("start")  # (rejoined, all three running)
    settled()


def stop(stopped: list[int], node: int) -> None:
    cluster("stop-node", str(node))
    stopped.append(node)


def test_a_pipeline_completes_when_the_node_its_worker_is_connected_to_stops(
    stopped_node: list[int], tmp_path: Path,
) -> None:
    # bob's daemon on node 1; the client on node 2. Node 1 stops with in-place additions in
    # flight: the daemon goes on through another node, the commands not acknowledged come
    # again from the replicated queue, and those that ran already are not run again.
    with WorkerProcesses(addresses(1), ["bob"], extra_args=["--queue-type", "quorum"],
                         log_dir=tmp_path) as daemons, tr.connect(addresses(2)) as fleet:
        bob = fleet.worker("bob")
        x = torch.zeros(1).send(bob)
        total = 0
        for step in range(600):
            x.add_(1)
            total += 1
            if step == 200:
                stop(stopped_node, 1)
        assert x.get().item() == total
        log = daemons.log_tail("bob")
        assert "lost its connection to amqp://guest:***@localhost:5681" in log
        assert "reconnected to amqp://guest:***@localhost:568" in log
        assert bob.status()["commands_failed"] == 0


def test_fedavg_completes_round_for_round_when_the_node_leading_a_worker_queue_stops(
    stopped_node: list[int], tmp_path: Path,
) -> None:
    shares = write_shares(tmp_path / "digits")
    workers = (*DIGIT_OWNERS, AGGREGATOR)
    worker_args = {owner: ["--public-dataset", f"{path}:#digits"]
                   for owner, path in shares.items()}
    digits = load_digits()
    rounds = 6
    with WorkerProcesses(addresses(1), workers, extra_args=["--queue-type", "quorum",
                                                            "--torch-threads", "1"],
                         worker_args=worker_args, log_dir=tmp_path / "logs"):
        leader = queue_leader("torchrelay.worker.bob")
        # The client on another node than the one that stops (losing the client's own
        # node is the next test's); the daemons on node 1, which may be the leader's.
        client_node = next(n for n in (2, 3, 1) if n != leader)
        with tr.connect(addresses(client_node)) as fleet:
            datasets = [d for owner in DIGIT_OWNERS
                        for d in fleet.worker(owner).search("#digits")]
            fedavg = tr.FedAvg(make_model(), F.cross_entropy,
                               aggregator=fleet.worker(AGGREGATOR), order=anchor_order,
                               progress=False)

            def evaluate(model: nn.Module) -> dict[str, float]:
                if len(fedavg.history) == 2:  # after the third round: the leader stops
                    stop(stopped_node, leader)
                return {"accuracy": accuracy(model, digits.test_data, digits.test_target)}

            history = fedavg.fit(datasets, rounds, evaluate)
    assert stopped_node == [leader]
    assert [r.left_out for r in history] == [{}] * rounds
    assert [r.metrics["accuracy"] for r in history] == _reference_accuracies(rounds)


def test_a_client_whose_node_stops_is_told_what_was_in_flight_and_goes_on(
    stopped_node: list[int], tmp_path: Path,
) -> None:
    # Its reply queue (classic: a client's own) goes with its node: the replies to what
    # it sent are lost, and it is told which operations, then goes on through another.
    with WorkerProcesses(addresses(1), ["bob"], extra_args=["--queue-type", "quorum"],
                         log_dir=tmp_path):
        # The client's node is not the one leading bob's queue (where the tests before
        # left it): losing both at once meets a RabbitMQ 3.10 fault, in which a channel
        # opened on the failover can lose every message it publishes to that queue (a
        # fresh channel's do arrive). Losing the leader is the FedAvg test's.
        client_node = next(n for n in (2, 3) if n != queue_leader("torchrelay.worker.bob"))
        with tr.connect(addresses(client_node)) as fleet:
            bob = fleet.worker("bob")
            x = torch.zeros(1).send(bob)
            fleet.sync()

            def add_while_the_node_stops() -> None:
                for step in range(600):
                    x.add_(1)
                    if step == 200:
                        stop(stopped_node, client_node)
                fleet.sync()

            with pytest.raises(tr.ConnectionLost, match=r"operations? in flight lost") as lost:
                add_while_the_node_stops()
            assert lost.value.lost and all(what == ("bob", "call Tensor.add_")
                                           for what in lost.value.lost)
            ran = x.get().item()  # those that reached bob ran, once: at most all of them
            assert 0 < ran <= 600
            assert (torch.ones(2).send(bob) * 2).get().tolist() == [2.0, 2.0]


def test_several_addresses_are_one_broker_in_every_form(three_nodes: None) -> None:
    listed = [node_url(port) for port in PORTS]
    assert broker_addresses(listed) == broker_addresses(",".join(listed)) == tuple(listed)
    broker = open_broker(listed)
    try:
        assert broker.url == ",".join(f"amqp://guest:***@localhost:{p}/" for p in PORTS)
    finally:
        broker.close()
    with pytest.raises(ValueError, match="share their scheme and user"):
        open_broker([listed[0], "amqp://other:secret@localhost:5682/"])
    with tr.connect(listed) as fleet:  # a list works wherever a URL does
        assert fleet.broker.url.count("amqp://") == 3


def test_a_worker_config_takes_a_cluster_from_the_file_the_flags_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TORCHRELAY_BROKER", raising=False)
    listed = [node_url(port) for port in PORTS]
    path = tmp_path / "w.toml"
    path.write_text(f'[worker]\nid = "bob"\nbroker = {json.dumps(listed)}\n'
                    'queue_type = "quorum"\n')
    config = WorkerConfig.resolve(path)
    assert broker_addresses(config.broker) == tuple(listed)
    # One ledger for the cluster, whatever order its nodes are listed in.
    reordered = WorkerConfig.resolve(path, broker=",".join(reversed(listed)))
    assert reordered.ledger == config.ledger
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--broker", listed[0], "--broker", listed[1]])
    assert flags_given(args)["broker"] == f"{listed[0]},{listed[1]}"
    monkeypatch.setenv("TORCHRELAY_BROKER", ",".join(listed))
    assert WorkerConfig.resolve(path).broker == ",".join(listed)
    path.write_text('[worker]\nid = "bob"\nbroker = ["amqp://x/", "redis://y/"]\n')
    monkeypatch.delenv("TORCHRELAY_BROKER")
    with pytest.raises(ConfigError, match=r"amqp:// or amqps:// URL.*'redis://y/'"):
        WorkerConfig.resolve(path)
