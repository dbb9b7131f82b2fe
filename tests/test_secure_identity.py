"""Secure aggregation with one RabbitMQ user per participant: owners meet worker to
worker and trust who sent a key message only as the broker's validated `user_id`.

Three owners' workers and an aggregator, each its own user; ann a client, ben the
attacker. A forged key message — ben's own, or ben claiming an owner's name — is
refused and counted, and the round it tried to enter still gives the right sum.
"""

from __future__ import annotations

import secrets
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import torch

import torchrelay as tr
from torchrelay._cli import main
from torchrelay.broker import (
    COMMAND_EXCHANGE,
    SecAggIntroduce,
    SecAggJoin,
    SecAggMask,
    SecureAggregate,
)
from torchrelay.worker import WorkerProcesses

tr.hook(torch)

pytestmark = pytest.mark.rabbitmq_only


class Users:
    def __init__(self, admin_url: str) -> None:
        suffix = secrets.token_hex(3)
        self.admin_url = admin_url
        self.owners = [f"so{i}-{suffix}" for i in (1, 2, 3)]
        self.aggregator = f"sagg-{suffix}"
        self.ann, self.ben = f"sann-{suffix}", f"sben-{suffix}"
        self.passwords: dict[str, str] = {}

    def url(self, user: str) -> str:
        parts = urllib.parse.urlsplit(self.admin_url)
        netloc = f"{user}:{self.passwords[user]}@{parts.hostname}:{parts.port or 5672}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture(scope="module")
def users(vhost_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Users]:
    users = Users(vhost_factory())
    workers = [*users.owners, users.aggregator]
    for name, role in ((users.ann, "client"), (users.ben, "client"),
                       *((w, "worker") for w in workers)):
        users.passwords[name] = password = secrets.token_hex(8)
        assert main(["users", "add", name, "--role", role, "--password", password,
                     "--broker", users.admin_url]) == 0
    folder: Path = tmp_path_factory.mktemp("secure-identities")
    args = {}
    for worker_id in workers:
        config = folder / f"{worker_id}.toml"
        config.write_text(f'[worker]\nid = "{worker_id}"\nbroker = "amqp://set-by-flag/"\n'
                          "shared_accounts = []\n")
        args[worker_id] = ["--config", str(config), "--broker", users.url(worker_id)]
    daemons = WorkerProcesses(users.url(users.ann), workers, worker_args=args,
                              log_dir=folder / "logs")
    daemons.start()
    try:
        yield users
    finally:
        daemons.stop_all()
        for name in users.passwords:
            main(["users", "remove", name, "--broker", users.admin_url])


def test_forged_key_messages_are_refused_and_the_round_stands(users: Users) -> None:
    o1 = users.owners[0]
    with tr.connect(users.url(users.ann), timeout=60) as ann, \
            tr.connect(users.url(users.ben), timeout=60) as ben:
        values = [torch.randn(5) for _ in users.owners]
        pointers = [v.send(ann.worker(o)) for v, o in zip(values, users.owners, strict=True)]
        release = tr.aggregate(pointers, aggregator=ann.worker(users.aggregator), secure=True)
        assert torch.allclose(release.get(), sum(values) / 3, atol=1e-6)

        values = [torch.randn(5) for _ in users.owners]
        pointers = [v.send(ann.worker(o)) for v, o in zip(values, users.owners, strict=True)]
        round_id = secrets.token_hex(16)
        for owner, pointer in zip(users.owners, pointers, strict=True):
            ann.request(owner, SecAggJoin(round_id, users.aggregator, sorted(users.owners), 2,
                                          [1.0] * 3, [pointer.id_at_location]))
            pointer.garbage_collect = False
        status = ann.worker(o1).status()
        refused, forged = status.get("secagg_refused", 0), status["forged"]
        keys = {"digest": "00", "c_public": "11" * 32, "s_public": "22" * 32, "sigma": 0.0}
        # ben, as itself: not an owner of the round
        with pytest.raises(tr.PrivateDataError, match="not an other owner"):
            ben.request(o1, SecAggIntroduce(round_id, **keys))
        with pytest.raises(tr.PrivateDataError, match="not the aggregator"):
            ben.request(o1, SecAggMask(round_id, sorted(users.owners)))
        # ben, claiming to be the second owner: the broker's user_id says otherwise
        connection = pika.BlockingConnection(pika.URLParameters(users.url(users.ben)))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(
                COMMAND_EXCHANGE, o1, SecAggIntroduce(round_id, **keys).encode().tobytes(),
                pika.BasicProperties(type=SecAggIntroduce.name, user_id=users.ben,
                                     headers={"sender": users.owners[1]},
                                     correlation_id="forged-1",
                                     reply_to=f"torchrelay.reply.{users.ben}.x"))
        finally:
            connection.close()
        status = ann.worker(o1).status()
        assert status["secagg_refused"] == refused + 2
        assert status["forged"] == forged + 1  # dropped before it was read
        report = ann.request(users.aggregator, SecureAggregate(
            round_id, sorted(users.owners), 2, [1.0] * 3, [[5]], (result := ann.new_id())))
        assert report["dropped"] == []
        average = tr.PointerTensor(ann.worker(users.aggregator), result).get()
        assert torch.allclose(average, sum(values) / 3, atol=1e-6)
