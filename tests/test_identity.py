"""One RabbitMQ user per participant: the broker refuses what a participant has no
right to, and every message a participant forges under another's name is dropped
and counted, with nothing lost (on the real RabbitMQ, with worker daemons).

The users are made with `torchrelay users add` in a virtual host of this module;
bob, alice and secure_worker are workers, ann and ben clients (ben is the
attacker).
"""

from __future__ import annotations

import os
import random
import re
import secrets
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions as pe
import pytest
import torch
from safetensors.torch import save_file

import torchrelay as tr
from torchrelay._cli import main
from torchrelay._walkthrough import run_walkthrough
from torchrelay.broker import (
    COMMAND_EXCHANGE,
    Call,
    Delete,
    Fetch,
    Grant,
    ManagementAPI,
    Meta,
    ObjectRef,
    Pull,
    Reply,
    Store,
    Transfer,
    worker_queue,
)
from torchrelay.broker._rabbitmq._users import list_users, permissions
from torchrelay.worker import WorkerProcesses
from torchrelay.worker.operations._config import ConfigError, WorkerConfig

tr.hook(torch)

README = Path(__file__).resolve().parent.parent / "README.md"
WORKER_IDS = ("bob", "alice", "secure_worker")


class Fleet:
    """The virtual host, its administrator and each participant's URL."""

    def __init__(self, admin_url: str, suffix: str) -> None:
        self.admin_url = admin_url
        self.api = ManagementAPI(admin_url)
        self.ann, self.ben = f"ann-{suffix}", f"ben-{suffix}"
        self.passwords: dict[str, str] = {}
        self.connections: list[Any] = []
        self.daemons: WorkerProcesses | None = None

    def logs(self, worker_id: str) -> str:
        assert self.daemons is not None
        return self.daemons.log_tail(worker_id)

    def url(self, user: str) -> str:
        parts = urllib.parse.urlsplit(self.admin_url)
        netloc = f"{user}:{self.passwords[user]}@{parts.hostname}:{parts.port or 5672}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def channel(self, user: str) -> Any:
        """A raw pika channel as `user`, in confirm mode (a refusal raises at once)."""
        connection = pika.BlockingConnection(pika.URLParameters(self.url(user)))
        self.connections.append(connection)
        channel = connection.channel()
        channel.confirm_delivery()
        return channel


def _users(*argv: str) -> int:
    return main(["users", *argv])


@pytest.fixture(scope="module")
def fleet(vhost_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(vhost_factory(), secrets.token_hex(3))
    for name, role in ((fleet.ann, "client"), (fleet.ben, "client"),
                       *((w, "worker") for w in WORKER_IDS)):
        password = secrets.token_hex(8)
        assert _users("add", name, "--role", role, "--password", password,
                      "--broker", fleet.admin_url) == 0
        fleet.passwords[name] = password
    folder = tmp_path_factory.mktemp("identities")
    worker_args = {}
    save_file({"data": torch.arange(6.0).view(3, 2), "target": torch.arange(3)},
              str(folder / "shared.safetensors"))
    for worker_id in WORKER_IDS:
        config = folder / f"{worker_id}.toml"
        config.write_text(f'[worker]\nid = "{worker_id}"\nbroker = "amqp://set-by-flag/"\n'
                          "shared_accounts = []\n" + (
                              f'clients = ["{fleet.ann}"]\n\n[[worker.datasets]]\n'
                              'path = "shared.safetensors"\ntags = ["#shared"]\n'
                              "private = false\n" if worker_id == "secure_worker" else ""))
        worker_args[worker_id] = ["--config", str(config), "--broker", fleet.url(worker_id)]
    daemons = WorkerProcesses(fleet.url(fleet.ann), WORKER_IDS, worker_args=worker_args,
                              log_dir=folder / "logs")
    daemons.start()
    fleet.daemons = daemons
    try:
        yield fleet
    finally:
        daemons.stop_all()
        for name in fleet.passwords:
            _users("remove", name, "--broker", fleet.admin_url)


@pytest.fixture(autouse=True)
def _raw_connections_closed(fleet: Fleet) -> Iterator[None]:
    yield
    for connection in fleet.connections:
        if connection.is_open:
            connection.close()
    fleet.connections.clear()


@pytest.fixture
def ann(fleet: Fleet) -> Iterator[tr.Fleet]:
    with tr.connect(fleet.url(fleet.ann), timeout=30) as session:
        yield session


@pytest.fixture
def ben(fleet: Fleet) -> Iterator[tr.Fleet]:
    with tr.connect(fleet.url(fleet.ben), timeout=30) as session:
        yield session


def _refused(code: int, action: Callable[[], object]) -> None:
    with pytest.raises(pe.ChannelClosedByBroker) as raised:
        action()
    assert raised.value.reply_code == code, raised.value.reply_text


def _forged_count(session: tr.Fleet, worker_id: str) -> int:
    return int(session.worker(worker_id).status()["forged"])


# -- the users command ----------------------------------------------------------------


def test_users_are_added_with_their_role_s_permissions_listed_and_removed(
    fleet: Fleet, capsys: pytest.CaptureFixture[str],
) -> None:
    name = f"carl-{secrets.token_hex(3)}"
    assert _users("add", name, "--role", "client", "--broker", fleet.admin_url) == 0
    printed = capsys.readouterr().out
    assert "with password " in printed  # a new random one, said once
    try:
        granted = fleet.api.call("GET", f"/api/permissions/{fleet.api.quote(fleet.api.vhost)}/"
                                        f"{name}")
        assert {k: granted[k] for k in ("configure", "write", "read")} == permissions(
            name, "client")
        assert (name, "client") in {(u.name, u.role) for u in list_users(fleet.api)}
        assert _users("list", "--broker", fleet.admin_url) == 0
        assert f"{name}\tclient" in capsys.readouterr().out
    finally:
        assert _users("remove", name, "--broker", fleet.admin_url) == 0
    assert name not in {u.name for u in list_users(fleet.api)}
    assert _users("remove", name, "--broker", fleet.admin_url) == 1
    assert f"there is no user {name!r}" in capsys.readouterr().err
    assert _users("add", "no/slashes", "--role", "client", "--broker", fleet.admin_url) == 1
    assert _users("add", name, "--broker", fleet.admin_url) == 2  # no role


def test_users_says_which_broker_and_changes_none_it_was_not_given(
    fleet: Fleet, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TORCHRELAY_BROKER", raising=False)
    name = f"dora-{secrets.token_hex(3)}"
    assert _users("add", name, "--role", "client") == 2
    assert "which broker? Pass --broker" in capsys.readouterr().err
    assert name not in {u.name for u in list_users(fleet.api)}
    assert _users("list", "--broker", fleet.admin_url) == 0
    said = capsys.readouterr().err
    assert f"virtual host {fleet.api.vhost!r}" in said and "***" in said
    assert f":{urllib.parse.urlsplit(fleet.admin_url).password}@" not in said


def test_users_takes_the_management_api_s_credentials_from_its_url(
    fleet: Fleet, capsys: pytest.CaptureFixture[str],
) -> None:
    """As curl and the console take them: http://user:password@host:15672."""
    admin = urllib.parse.urlsplit(fleet.admin_url)
    api_url = f"http://{admin.username}:{admin.password}@{admin.hostname}:15672"
    # The AMQP URL's own credentials are wrong: only the API URL's can work.
    wrong = admin._replace(netloc=f"nobody:wrong@{admin.hostname}:{admin.port or 5672}")
    name = f"emil-{secrets.token_hex(3)}"
    assert _users("add", name, "--role", "client", "--broker", wrong.geturl(),
                  "--management-url", api_url) == 0
    try:
        assert name in {u.name for u in list_users(fleet.api)}
    finally:
        assert _users("remove", name, "--broker", fleet.admin_url) == 0
    assert _users("list", "--broker", fleet.admin_url, "--management-url",
                  "ftp://x:secret@host") == 2
    err = capsys.readouterr().err
    assert "http(s)://host[:port]" in err and "secret" not in err


def test_a_worker_user_s_queue_may_be_a_quorum_queue_and_its_daemon_serves_it(
    fleet: Fleet, ann: tr.Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    password = secrets.token_hex(8)
    assert _users("add", "quinn", "--role", "worker", "--password", password, "--queue-type",
                  "quorum", "--queue-expires", "3600", "--broker", fleet.admin_url) == 0
    fleet.passwords["quinn"] = password
    try:
        queue = fleet.api.queue(worker_queue("quinn"))
        assert queue["type"] == "quorum"
        assert queue["arguments"]["x-single-active-consumer"] is True
        assert queue["arguments"]["x-expires"] == 3_600_000
        # Its kind cannot change in place: said, naming what to do.
        assert _users("add", "quinn", "--role", "worker", "--password", password,
                      "--broker", fleet.admin_url) == 1
        assert "exists with other arguments" in capsys.readouterr().err
        with WorkerProcesses(fleet.url("quinn"), ["quinn"], log_dir=tmp_path):
            x = torch.tensor([1.0, 2.0]).send(ann.worker("quinn")) * 3
            assert x.move(ann.worker("bob")).get().tolist() == [3.0, 6.0]
    finally:
        assert _users("remove", "quinn", "--broker", fleet.admin_url) == 0
        fleet.api.call("DELETE", f"/api/queues/{fleet.api.quote(fleet.api.vhost)}/"
                                 f"{fleet.api.quote(worker_queue('quinn'))}")


# -- what works with identities on ------------------------------------------------------


def test_the_walkthrough_runs_unchanged_with_a_user_per_participant(ann: tr.Fleet) -> None:
    assert ann.name.startswith("ann-")  # the user in the URL
    assert {w["id"] for w in ann.workers()} == set(WORKER_IDS)  # presence, with rights
    run_walkthrough(ann, echo=lambda line: None)
    for worker_id in ("bob", "alice"):  # (secure_worker holds a dataset of its own)
        status = ann.worker(worker_id).status()
        assert status["objects"] == 0
        assert status["forged"] == 0


def test_the_federated_flow_runs_unchanged_with_a_user_per_participant(ann: tr.Fleet) -> None:
    flow = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)[1]
    namespace: dict[str, object] = {"fleet": ann, "torch": torch}
    exec(compile(flow, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    model = namespace["model"]
    assert isinstance(model, torch.nn.Linear) and torch.isfinite(model.weight).all()


def test_a_name_other_than_the_user_is_refused(fleet: Fleet) -> None:
    with pytest.raises(tr.BrokerError, match=f"cannot connect as RabbitMQ user '{fleet.ann}'"):
        tr.connect(fleet.url(fleet.ann), name="bob")


def test_a_worker_whose_id_is_not_its_user_does_not_start(fleet: Fleet) -> None:
    with pytest.raises(ConfigError, match="a worker's id is its user's name"):
        WorkerConfig(id="alice", broker=fleet.url("bob"), shared_accounts=())
    # On a shared account the id is the worker's to choose, as before.
    WorkerConfig(id="alice", broker="amqp://guest:guest@localhost/")


# -- what the broker refuses ------------------------------------------------------------


def test_the_broker_refuses_what_a_participant_has_no_right_to(
    fleet: Fleet, ann: tr.Fleet,
) -> None:
    ben = fleet.ben
    # Nobody can copy another's commands: no queue of one's choosing, no binding to
    # the command exchange, no consuming a worker's queue or someone's replies.
    _refused(403, lambda: fleet.channel(ben).queue_declare("sniffer"))
    _refused(403, lambda: fleet.channel(ben).queue_declare(f"torchrelay.reply.{fleet.ann}.x"))
    own = f"torchrelay.reply.{ben}.{secrets.token_hex(3)}"
    channel = fleet.channel(ben)
    channel.queue_declare(own, auto_delete=True)  # its own reply queue: allowed
    _refused(403, lambda: channel.queue_bind(own, COMMAND_EXCHANGE, routing_key="bob"))
    _refused(403, lambda: fleet.channel(ben).basic_consume(
        "torchrelay.worker.bob", lambda *a: None))
    _refused(403, lambda: fleet.channel(ben).basic_consume(
        ann.endpoint.reply_queue, lambda *a: None))
    # A client publishes commands, and nowhere else; under its own name only.
    _refused(403, lambda: fleet.channel(ben).basic_publish("amq.topic", "x", b""))
    _refused(403, lambda: fleet.channel(ben).basic_publish("", ann.endpoint.reply_queue, b""))
    _refused(406, lambda: fleet.channel(ben).basic_publish(
        COMMAND_EXCHANGE, "bob", b"", pika.BasicProperties(user_id=fleet.ann)))
    # A worker cannot take another's queue or routing key either.
    _refused(403, lambda: fleet.channel("alice").queue_declare("torchrelay.worker.bob",
                                                               passive=False, durable=True))
    _refused(403, lambda: fleet.channel("alice").queue_bind(
        "torchrelay.worker.alice", COMMAND_EXCHANGE, routing_key="bob"))
    _refused(403, lambda: fleet.channel("alice").basic_consume(
        "torchrelay.worker.bob", lambda *a: None))


# -- each participant's objects are its own ---------------------------------------------


def test_another_client_s_objects_do_not_exist_for_a_client(ann: tr.Fleet, ben: tr.Fleet) -> None:
    bob = ann.worker("bob")
    x = torch.tensor([1.0, 2.0]).send(bob)
    mine = torch.tensor([5.0]).send(ben.worker("bob"))
    ann.sync()
    theirs = x.id_at_location
    assert theirs in bob._objects
    assert theirs not in ben.worker("bob")._objects  # not listed
    assert set(ben.worker("bob")._objects) == {mine.id_at_location}
    missing = f"no object {theirs} on worker 'bob'"
    attempts: list[Any] = [
        Fetch(theirs),
        Call("Tensor.__add__", [ObjectRef(theirs), 1], {}, ben.new_id()),  # as an argument
        Call("Tensor.add_", [ObjectRef(theirs), 1], {}, None),  # changed in place
        Transfer(theirs, "alice", ben.new_id()),  # moved
        Meta(theirs),
        Grant(theirs, ben.name),  # given to itself
        Pull(theirs),
    ]
    for command in attempts:
        with pytest.raises(tr.RemoteError, match=re.escape(missing)):
            ben.request("bob", command)
    # Deleting it is deleting nothing; its holder's object is untouched throughout.
    assert ben.request("bob", Delete([theirs])) == [theirs]
    assert x.get().tolist() == [1.0, 2.0]
    assert mine.get().tolist() == [5.0]


def test_a_pointer_sent_on_lets_the_next_worker_use_its_target_and_no_one_else(
    ann: tr.Fleet, ben: tr.Fleet,
) -> None:
    bob, alice = ann.worker("bob"), ann.worker("alice")
    x = torch.tensor([1.0, 2.0]).send(bob)
    chain = x.send(alice)  # alice holds a pointer to bob's x: alice may use x now
    y = chain + chain  # runs on bob, through alice; its result is ann's as well as alice's
    assert ben.worker("alice")._objects == {}  # ben sees nothing of it, anywhere
    assert ben.worker("bob")._objects == {}
    assert y.get().get().tolist() == [2.0, 4.0]  # alice's pointer, then bob's result
    chain.remote_get()  # alice pulls x from bob
    assert chain.get().tolist() == [1.0, 2.0]


def test_a_worker_s_datasets_are_for_the_clients_its_config_names(
    ann: tr.Fleet, ben: tr.Fleet,
) -> None:
    (found,) = ann.worker("secure_worker").search("#shared")
    data, _ = found
    assert (data + 1).get().tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert ben.worker("secure_worker").search("#shared") == []  # clients = [ann]
    with pytest.raises(tr.RemoteError, match=f"no object {found.id_at_location} on worker"):
        ben.request("secure_worker", Call("Tensor.__add__", [ObjectRef(found.id_at_location), 1],
                                          {}, ben.new_id()))


# -- forgeries: dropped, counted, nothing lost ------------------------------------------


def test_commands_under_another_s_name_are_dropped_and_counted(
    fleet: Fleet, ann: tr.Fleet,
) -> None:
    x = torch.tensor([1.0, 2.0]).send(ann.worker("bob"))
    before, forged = set(ann.worker("bob")._objects), _forged_count(ann, "bob")
    forgeries = [  # (user_id property, sender header): each a way to claim to be ann
        (None, fleet.ann), (None, None), (fleet.ben, fleet.ann), (fleet.ben, "bob"),
        (fleet.ben, "x" * 10_000),
    ]
    channel = fleet.channel(fleet.ben)
    for number, (user_id, claimed) in enumerate(forgeries):
        # What would overwrite ann's tensor, were it run.
        body = Store(x.id_at_location, torch.tensor([666.0])).encode().tobytes()
        headers = {} if claimed is None else {"sender": claimed}
        channel.basic_publish(COMMAND_EXCHANGE, "bob", body, pika.BasicProperties(
            type="store", user_id=user_id, headers=headers, correlation_id=f"f{number}",
            reply_to=f"torchrelay.reply.{fleet.ben}.x"))
    # A chunk of a transfer claimed for bob, into alice.
    channel.basic_publish(COMMAND_EXCHANGE, "alice", b"\0" * 64, pika.BasicProperties(
        type="store", user_id=fleet.ben, correlation_id="bob.1.1",
        headers={"sender": "bob", "chunk": [0, 2, 128]}))
    # Everything above is queued before the status requests (the channel confirms).
    assert _forged_count(ann, "bob") == forged + len(forgeries)
    assert _forged_count(ann, "alice") >= 1
    assert set(ann.worker("bob")._objects) == before
    assert x.get().tolist() == [1.0, 2.0]


def test_replies_from_anyone_but_the_worker_asked_are_dropped(
    fleet: Fleet, ann: tr.Fleet,
) -> None:
    bob = ann.worker("bob")
    x = torch.tensor([1.0, 2.0]).send(bob)
    ann.sync()
    # alice (a worker: it may publish replies) answers ann's next commands first.
    prefix = ann._prefix  # correlation ids are `<prefix><number>`, numbered in order
    channel = fleet.channel("alice")
    fake = Reply(torch.tensor([666.0, 666.0])).encode().tobytes()
    next_number = next(ann._numbers)
    for number in range(next_number, next_number + 20):
        for claimed in ("bob", "alice"):  # claiming bob's name, or honestly alice's
            channel.basic_publish("", ann.endpoint.reply_queue, fake, pika.BasicProperties(
                type="fetch.reply", user_id="alice", correlation_id=f"{prefix}{number}",
                headers={"sender": claimed}))
    assert x.get().tolist() == [1.0, 2.0]
    assert ann.forged >= 2  # the fetch's two forged answers, at least


def test_a_status_request_still_reaches_a_worker_after_forgeries(ann: tr.Fleet) -> None:
    # The daemons are still up and serving after every test above.
    assert {ann.worker(w).status()["id"] for w in WORKER_IDS} == set(WORKER_IDS)


def test_shared_accounts_in_a_config_file_is_a_list(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text('[worker]\nid = "w"\nbroker = "amqp://w:p@localhost/"\n'
                      'shared_accounts = "guest"\n')
    with pytest.raises(ConfigError, match="shared_accounts must be list"):
        WorkerConfig.resolve(config)


def test_a_campaign_of_forged_identities_is_dropped_and_counted_with_nothing_lost(
    fleet: Fleet, ann: tr.Fleet,
) -> None:
    """Hundreds of messages claiming someone else's name, with or without a `user_id`,
    replaying ann's correlation ids, as commands, chunks and replies: every one dropped
    before it is read and counted where it arrived, and ann's work goes on untouched."""
    seed = int(os.environ.get("TORCHRELAY_FUZZ_SEED", secrets.randbits(32)))
    rng = random.Random(seed)
    bob = ann.worker("bob")
    x = torch.tensor([1.0, 2.0]).send(bob)
    ann.sync()
    listing = bob._objects
    before = {w: _forged_count(ann, w) for w in WORKER_IDS}
    replies_before = ann.forged
    numbers = next(ann._numbers)
    replayed = [f"{ann._prefix}{n}" for n in range(max(1, numbers - 20), numbers + 20)]
    ben_channel, alice_channel = fleet.channel(fleet.ben), fleet.channel("alice")
    sent = dict.fromkeys(WORKER_IDS, 0)
    fake_replies = 0
    dangerous = Store(x.id_at_location, torch.tensor([666.0])).encode().tobytes()
    for _ in range(300):
        correlation_id = rng.choice([*replayed, f"{fleet.ben}.x.{rng.randrange(99)}"])
        body = rng.choice([dangerous, b"", rng.randbytes(rng.randrange(1, 200))])
        headers: dict[str, Any] = {}
        if rng.random() < 0.3:
            headers["chunk"] = [rng.randrange(3), 3, 3 * 4096]
        if rng.random() < 0.2:  # a reply, from a worker's account, claiming bob
            headers["sender"] = rng.choice(["bob", "secure_worker", fleet.ann])
            alice_channel.basic_publish("", ann.endpoint.reply_queue, body, pika.BasicProperties(
                type="fetch.reply", correlation_id=correlation_id, headers=headers,
                user_id=rng.choice([None, "alice"])))
            fake_replies += 1
            continue
        # A command claiming another's name; without a user_id, any name at all.
        user_id = rng.choice([None, fleet.ben])
        names = [fleet.ann, "bob", "alice", "x" * rng.randrange(1, 300)]
        claimed = rng.choice([*names, fleet.ben, ""] if user_id is None else names)
        if claimed:
            headers["sender"] = claimed
        worker_id = rng.choice(WORKER_IDS)
        ben_channel.basic_publish(COMMAND_EXCHANGE, worker_id, body, pika.BasicProperties(
            type=rng.choice(["store", "fetch", "delete", "grant", "batch", "call"]),
            correlation_id=correlation_id, user_id=user_id, headers=headers,
            reply_to=f"torchrelay.reply.{fleet.ben}.x"))
        sent[worker_id] += 1
    # Every forgery is in its queue before these requests (the channels confirm).
    after = {w: _forged_count(ann, w) for w in WORKER_IDS}
    assert {w: after[w] - before[w] for w in WORKER_IDS} == sent, f"seed {seed}"
    assert ann.forged - replies_before == fake_replies, f"seed {seed}"
    assert bob._objects == listing, f"seed {seed}"
    assert x.get().tolist() == [1.0, 2.0], f"seed {seed}"


# -- replies go only where the asker may receive (the confused deputy) ---------------------


def test_a_worker_answers_only_on_the_asker_s_own_reply_queues(
    fleet: Fleet, ann: tr.Fleet, ben: tr.Fleet,
) -> None:
    """ben, who shares bob with ann, sends bob a fetch of his own tensor naming ann's
    reply queue and ann's next correlation id: were bob to answer it there, ann's next
    `get` would return ben's tensor, and ann's own would be lost."""
    bob = ann.worker("bob")
    mine = torch.tensor([1.0, 2.0]).send(bob)
    bait = torch.tensor([666.0, 666.0]).send(ben.worker("bob"))
    ann.sync()
    ben.sync()
    forged = _forged_count(ann, "bob")
    next_number = next(ann._numbers)  # ann's commands are numbered in order
    channel = fleet.channel(fleet.ben)
    for number in range(next_number + 1, next_number + 4):
        channel.basic_publish(COMMAND_EXCHANGE, "bob", Fetch(bait.id_at_location).encode()
                              .tobytes(), pika.BasicProperties(
            type="fetch", user_id=fleet.ben, correlation_id=f"{ann._prefix}{number}",
            reply_to=ann.endpoint.reply_queue))
    # A reply queue whose owner's name merely starts with ben's is not ben's either.
    channel.basic_publish(COMMAND_EXCHANGE, "bob", Fetch(bait.id_at_location).encode()
                          .tobytes(), pika.BasicProperties(
        type="fetch", user_id=fleet.ben, correlation_id="x.1",
        reply_to=f"torchrelay.reply.{fleet.ben}.other.{secrets.token_hex(4)}"))

    assert mine.get().tolist() == [1.0, 2.0]  # ann's own, from her own fetch
    assert _forged_count(ann, "bob") == forged + 4  # each counted where it arrived
    assert bait.get().tolist() == [666.0, 666.0]  # never fetched: still ben's
    assert "not one of its own reply queues" in fleet.logs("bob")


def test_a_forged_returned_notice_fails_nothing(fleet: Fleet, ann: tr.Fleet) -> None:
    """A notice that a batch was returned unroutable settles every command of the batch:
    one sent by anyone (alice, a worker, may publish to reply queues) is dropped."""
    bob = ann.worker("bob")
    x = torch.tensor([1.0, 2.0]).send(bob)
    ann.sync()
    first = next(ann._numbers) + 1
    channel = fleet.channel("alice")
    for claimed in ("bob", "alice"):
        channel.basic_publish("", ann.endpoint.reply_queue, b"", pika.BasicProperties(
            type="returned", user_id="alice", correlation_id=f"{ann._prefix}{first}+64",
            headers={"sender": claimed}))
    for _ in range(5):
        x += 1  # one batch, whose id the notice names
    assert x.get().tolist() == [6.0, 7.0]


def test_another_s_delete_of_an_id_before_it_is_stored_drops_nothing(
    ann: tr.Fleet, ben: tr.Fleet,
) -> None:
    """A delete of an id nothing holds yet is remembered (a late copy for it is dropped
    when it comes), but only for whoever deleted it: ben's delete of the id ann is about
    to store under must not make ann's tensor vanish behind an "ok"."""
    target = ann.new_id()
    assert ben.request("bob", Delete([target])) == [target]  # (to ben: it does not exist)
    ann.request("bob", Store(target, torch.tensor([1.0, 2.0])))
    assert ann.request("bob", Fetch(target)).tolist() == [1.0, 2.0]
    # Ann's own early delete still drops what comes for it later.
    late = ann.new_id()
    ann.request("bob", Delete([late]))
    ann.request("bob", Store(late, torch.tensor([3.0])))
    assert late not in ann.worker("bob")._objects
