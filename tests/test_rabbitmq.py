"""What only RabbitMQ has: topology, message properties, the console's view, reconnects."""

from __future__ import annotations

import secrets
import select
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pika
import pytest
import torch
from conftest import vhost_of
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.io_services_utils import _AsyncTransportBase

import torchrelay as tr
from torchrelay.broker import (
    APP_ID,
    COMMAND_EXCHANGE,
    ManagementAPI,
    RabbitMQBroker,
    RabbitMQEndpoint,
    SharedConnection,
    worker_queue,
)
from torchrelay.broker._rabbitmq._coalescing import (
    coalesce_writes,
    publish_later,
    publish_now,
    unsent_bytes,
)
from torchrelay.broker._rabbitmq._consuming import Consumer, consume
from torchrelay.broker._rabbitmq._endpoint import _read
from torchrelay.broker._rabbitmq._framing import message_frames
from torchrelay.broker._rabbitmq._publishing import SmallMessageProperties
from torchrelay.broker._rabbitmq._reading import wait_for_input
from torchrelay.worker import WorkerProcesses

tr.hook(torch)


def test_commands_carry_properties_a_person_can_read_in_the_console(
    session_daemons: WorkerProcesses,
) -> None:
    url = session_daemons.url
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        spy = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(spy, COMMAND_EXCHANGE, routing_key="bob")  # a copy of bob's commands
        with tr.connect(url, name="reader") as fleet:
            pointer = torch.tensor([1.0]).send(fleet.worker("bob"))
            fleet.sync()
            method, props, body = channel.basic_get(spy, auto_ack=True)
            pointer.get()

    assert method is not None
    assert props.type == "store"
    assert props.app_id == "torchrelay"
    assert props.correlation_id.startswith("reader.")
    assert props.reply_to.startswith("torchrelay.reply.reader.")
    assert props.headers["sender"] == "reader"
    assert body.startswith(b"TRL")


def test_replies_come_back_typed_and_signed(session_daemons: WorkerProcesses) -> None:
    with tr.connect(session_daemons.url) as fleet:
        fleet.worker("bob")
        fleet.endpoint.send_command("bob", "describe", tr.broker.Describe().encode(), "c-1")
        delivery = fleet.endpoint.receive(10)
    assert delivery is not None
    assert (delivery.type, delivery.sender, delivery.correlation_id) == ("describe.reply", "bob",
                                                                         "c-1")


def test_topology_and_connection_names_as_the_console_shows_them(
    rabbitmq: ManagementAPI, session_daemons: WorkerProcesses
) -> None:
    vhost = vhost_of(session_daemons.url)
    quoted = urllib.parse.quote(vhost, safe="")
    with tr.connect(session_daemons.url, name="console-check"):
        names = {c["client_properties"].get("connection_name") for c in
                 rabbitmq.wait_for_connections(lambda cs: len(cs) >= 4, vhost)}
        queue = rabbitmq.get_when(f"/api/queues/{quoted}/{worker_queue('bob')}",
                                  lambda q: q.get("consumers") == 1)
        exchange = rabbitmq.call("GET", f"/api/exchanges/{quoted}/{COMMAND_EXCHANGE}")

    assert {"torchrelay worker bob", "torchrelay worker alice", "torchrelay worker carol",
            "torchrelay client console-check"} <= names
    assert queue["durable"] is True
    assert queue["consumers"] == 1
    assert exchange["type"] == "direct"
    assert exchange["durable"] is True


def test_a_handle_to_a_worker_nobody_serves_fails_fast_naming_it(
    session_daemons: WorkerProcesses,
) -> None:
    # A timeout no test would wait out: the answer must come from the broker's state.
    with tr.connect(session_daemons.url, timeout=600) as fleet:
        with pytest.raises(tr.UnknownWorker, match="torchrelay worker --id nobody"):
            fleet.worker("nobody")
        with pika.BlockingConnection(pika.URLParameters(session_daemons.url)) as connection:
            connection.channel().queue_declare(worker_queue("idle"))
            with pytest.raises(tr.UnknownWorker, match="no daemon consumes it"):
                fleet.worker("idle")
            connection.channel().queue_delete(worker_queue("idle"))


def test_a_second_daemon_with_the_same_id_is_refused(session_daemons: WorkerProcesses) -> None:
    twin = WorkerProcesses(session_daemons.url, [], log_dir=session_daemons.log_dir / "twin")
    process = twin.spawn("bob")
    assert process.wait(timeout=60) == 1
    assert "already served by another daemon" in twin.log_tail("bob")


def test_a_worker_reconnects_and_keeps_its_objects(
    rabbitmq: ManagementAPI, daemons_for_test: Any
) -> None:
    daemons = daemons_for_test(("dave",))
    vhost = vhost_of(daemons.url)
    with tr.connect(daemons.url) as fleet:
        dave = fleet.worker("dave")
        pointer = torch.tensor([1.0, 2.0]).send(dave)
        fleet.sync()
        connections = rabbitmq.wait_for_connections(
            lambda cs: any(c["client_properties"].get("connection_name") ==
                           "torchrelay worker dave" for c in cs), vhost)
        (worker_connection,) = [c["name"] for c in connections if
                                c["client_properties"].get("connection_name") ==
                                "torchrelay worker dave"]

        rabbitmq.close_connection(worker_connection)

        deadline = time.monotonic() + 30
        while True:  # the daemon notices within one poll and reconnects
            try:
                status = dave.status()
                if status["reconnects"] >= 1:
                    break
            except tr.TorchRelayError:
                pass
            assert time.monotonic() < deadline, "the worker did not reconnect"
            time.sleep(0.2)
        assert torch.equal((pointer * 2).get(), torch.tensor([2.0, 4.0]))
        assert torch.equal(pointer.get(), torch.tensor([1.0, 2.0]))


def test_a_client_reconnects_without_losing_replies(
    rabbitmq: ManagementAPI, session_daemons: WorkerProcesses
) -> None:
    vhost = vhost_of(session_daemons.url)
    with tr.connect(session_daemons.url, name="fragile") as fleet:
        pointer = torch.tensor([3.0]).send(fleet.worker("bob"))
        doubled = pointer * 2  # its reply may arrive while the connection is down
        connections = rabbitmq.wait_for_connections(
            lambda cs: any(c["client_properties"].get("connection_name") ==
                           "torchrelay client fragile" for c in cs), vhost)
        (name,) = [c["name"] for c in connections
                   if c["client_properties"].get("connection_name") == "torchrelay client fragile"]

        rabbitmq.close_connection(name)
        time.sleep(0.5)

        assert torch.equal(doubled.get(), torch.tensor([6.0]))
        assert torch.equal(pointer.get(), torch.tensor([3.0]))
        assert fleet.endpoint.reconnects == 1  # type: ignore[attr-defined]


def test_a_command_posted_while_another_thread_reconnects_is_not_counted_lost(
    rabbitmq: ManagementAPI, session_daemons: WorkerProcesses
) -> None:
    """A broker restart takes the reply queue with it; the first publish after it
    reconnects. What was published before is lost, what was only posted is not. The
    background publisher may be reconnecting while the script posts its next command
    (CI saw `(x + 1).get()` fail so after a broker restart): played here in order."""
    vhost = vhost_of(session_daemons.url)
    with tr.connect(session_daemons.url, name="restarted") as fleet:
        pointer = torch.tensor([3.0]).send(fleet.worker("bob"))
        fleet.sync()
        ours = "torchrelay client restarted"
        connections = rabbitmq.wait_for_connections(
            lambda cs: any(c["client_properties"].get("connection_name") == ours for c in cs),
            vhost)
        (name,) = [c["name"] for c in connections
                   if c["client_properties"].get("connection_name") == ours]
        rabbitmq.close_connection(name)  # and the queue goes, as in a restart:
        reply_queue = fleet.endpoint.reply_queue  # type: ignore[attr-defined]
        rabbitmq.call("DELETE", f"/api/queues/{rabbitmq.quote(vhost)}/"
                                f"{rabbitmq.quote(reply_queue)}")
        send = fleet.endpoint.send_command
        posted = threading.Thread(target=lambda: results.append(pointer * 3))
        results: list[Any] = []

        def send_while_another_posts(*args: Any, **kwargs: Any) -> None:
            fleet.endpoint.send_command = send  # type: ignore[method-assign]
            posted.start()  # pending at once, then waits for the publisher's lock we hold
            deadline = time.monotonic() + 10
            while len(fleet.pending) < 2:
                assert time.monotonic() < deadline, "the other thread posted nothing"
                time.sleep(0.01)
            send(*args, **kwargs)  # reconnects: the reply queue is new

        fleet.endpoint.send_command = send_while_another_posts  # type: ignore[method-assign]
        doubled = pointer * 2
        fleet.flush()
        posted.join(timeout=10)
        assert torch.equal(doubled.get(), torch.tensor([6.0]))
        assert torch.equal(results[0].get(), torch.tensor([9.0]))
        assert fleet.endpoint.reconnects == 1  # type: ignore[attr-defined]


def test_hostile_envelopes_do_not_take_a_daemon_down(session_daemons: WorkerProcesses) -> None:
    url = session_daemons.url
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        # The sender's own reply queue: a worker answers nowhere else.
        reply_queue = channel.queue_declare(f"torchrelay.reply.evil.{secrets.token_hex(4)}",
                                            exclusive=True).method.queue
        hostile = [
            ("x" * 250, {"sender": "evil"}),  # an error reply "<type>.reply" would not fit
            ("store", {"sender": "evil", "chunk": "nonsense"}),
            ("store", {"sender": "evil", "chunk": 5}),  # not a list: refused all the same
            ("store", {"sender": "evil", "chunk": [0, 1000, 1 << 60]}),  # 1 EiB, announced
        ]
        for kind, headers in hostile:
            channel.basic_publish(COMMAND_EXCHANGE, "bob", b"TRL\x01\x00\x00\x00\x00",
                                  pika.BasicProperties(type=kind, correlation_id="evil",
                                                       user_id="guest", reply_to=reply_queue,
                                                       headers=headers))
        method, props, _ = None, None, None
        deadline = time.monotonic() + 10
        while method is None and time.monotonic() < deadline:
            method, props, _ = channel.basic_get(reply_queue, auto_ack=True)
            time.sleep(0.05)
        assert props is not None
        assert props.type == "invalid.reply"
    assert session_daemons.processes["bob"].poll() is None
    with tr.connect(url) as fleet:
        assert torch.equal(torch.tensor([1.0]).send(fleet.worker("bob")).get(),
                           torch.tensor([1.0]))


@pytest.mark.parametrize(("type_", "correlation_id", "reply_to"), [
    ("call", "me.1a2b.1", "torchrelay.reply.me.1a2b"),
    ("call.reply", "x" * 200, None),
    ("batch", "é.7+3", "q"),
])
def test_small_message_properties_encode_as_pika_does(
    type_: str, correlation_id: str, reply_to: str | None
) -> None:
    """The publisher's pre-encoded properties are byte for byte pika's own encoding."""
    headers = {"sender": "bob-ünï"}
    ours = SmallMessageProperties("guest", headers)
    ours.type, ours.correlation_id, ours.reply_to = type_, correlation_id, reply_to
    pikas = pika.BasicProperties(app_id=APP_ID, user_id="guest", headers=headers,
                                 delivery_mode=1, type=type_, correlation_id=correlation_id,
                                 reply_to=reply_to)
    assert b"".join(ours.encode()) == b"".join(pikas.encode())
    ours.correlation_id = "x" * 256
    with pytest.raises(pika.exceptions.ShortStringTooLong):
        ours.encode()


@pytest.mark.parametrize(("exchange", "routing_key", "mandatory", "body"), [
    ("torchrelay.commands", "bob", True, b"x" * 100),
    ("", "torchrelay.reply.zoë", False, b""),
    ("", "q", False, bytes(range(256)) * 9),  # over the body frame's size: in three
])
def test_a_small_message_s_frames_are_pika_s_own(
    exchange: str, routing_key: str, mandatory: bool, body: bytes
) -> None:
    properties = pika.BasicProperties(correlation_id="c-1", headers={"sender": "ünï"})
    written: list[bytes] = []
    connection = SimpleNamespace(_body_max_length=1000, _output_marshaled_frames=written.extend)
    pika.connection.Connection._send_message(  # (what pika marshals, as it writes it)
        connection, 7, pika.spec.Basic.Publish(exchange=exchange, routing_key=routing_key,
                                               mandatory=mandatory), (properties, body))
    assert message_frames(7, exchange, routing_key, mandatory=mandatory,
                          properties=properties, body=body, body_max=1000) == b"".join(written)
    with pytest.raises(pika.exceptions.ShortStringTooLong):
        message_frames(7, "", "q" * 256, mandatory=False, properties=properties, body=body,
                       body_max=1000)


def test_a_transfer_waits_for_the_broker_s_confirm_only_where_it_may_refuse() -> None:
    # A single node takes every routable transient message into a classic queue; a
    # quorum queue electing a leader, or a cluster's node going down, may refuse one.
    one = "amqp://guest:guest@localhost:5672/%2F"
    assert not RabbitMQBroker(one).may_refuse
    assert RabbitMQBroker(one, queue_type="quorum").may_refuse
    assert RabbitMQBroker([one, one.replace("5672", "5673")]).may_refuse


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every `send` pika makes from now on, in order."""
    sent: list[int] = []
    send = _AsyncTransportBase._sigint_safe_send

    def counted(sock: Any, data: bytes) -> int:
        sent.append(len(data))
        return int(send(sock, data))

    monkeypatch.setattr(_AsyncTransportBase, "_sigint_safe_send", staticmethod(counted))
    return sent


def test_a_message_s_frames_leave_in_one_send_and_acknowledgements_with_the_next(
    vhost_factory: Any, sends: list[int]
) -> None:
    # pika sends each frame with a system call of its own (a message is three: method,
    # header, body); on loopback each wakes the broker for a piece of a message.
    url = vhost_factory()
    broker = RabbitMQBroker(url)
    sender, receiver = broker.connect("sender"), broker.connect("receiver")
    try:
        sends.clear()
        sender.send_reply(receiver.reply_queue, "echo", tr.broker.Describe().encode(), "c-1")
        assert len(sends) == 1
        delivery = receiver.receive(10)
        assert delivery is not None and delivery.correlation_id == "c-1"
        # Its acknowledgement, asked for now, goes with the next message sent.
        sends.clear()
        receiver.flush_acks()
        receiver.send_reply(sender.reply_queue, "echo", tr.broker.Describe().encode(), "c-2")
        assert len(sends) == 1
    finally:
        sender.close()
        receiver.close()
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        method, _, _ = connection.channel().basic_get(receiver.reply_queue)
    assert method is None  # acknowledged: not back in its queue once the receiver left


def test_a_small_message_is_sent_at_once_without_pika_s_loop_and_a_large_one_whole(
    vhost_factory: Any
) -> None:
    # pika's basic_publish writes the frames to a buffer, watches the socket for
    # writability (a system call), polls it and dispatches the event to what sends, and
    # unwatches it (another): where a loopback socket takes a small message at once.
    # publish_now sends it itself; pika's buffer and loop get only what is left.
    with pika.BlockingConnection(pika.URLParameters(vhost_factory())) as connection:
        coalesce_writes(connection)
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        ioloop, transport = connection._impl.ioloop, connection._impl._transport
        polls: list[None] = []
        watched: list[int] = []
        poll, set_writer = ioloop.poll, transport._nbio.set_writer
        ioloop.poll = lambda: (polls.append(None), poll())[1]
        transport._nbio.set_writer = lambda fd, on: (watched.append(fd), set_writer(fd, on))[1]
        small, large = b"s" * 100, bytes(range(256)) * (64 << 10)  # 16 MiB: over a socket's buffer
        publish_now(channel, "", queue, small, pika.BasicProperties(), mandatory=False)
        assert (polls, watched, unsent_bytes(connection)) == ([], [], 0)
        # Behind a message written behind, in order, and sent with it.
        publish_later(channel, "", queue, b"behind", pika.BasicProperties(), mandatory=False)
        publish_now(channel, "", queue, small, pika.BasicProperties(), mandatory=False)
        assert (polls, unsent_bytes(connection)) == ([], 0)
        publish_now(channel, "", queue, large, pika.BasicProperties(), mandatory=False)
        assert unsent_bytes(connection) == 0
        # Nothing is left watched for writability: a read would otherwise fail (pika
        # asserts it has something to send when the socket says it may).
        connection.process_data_events(time_limit=0.1)
        got = [channel.basic_get(queue, auto_ack=True)[2] for _ in range(4)]
    assert got == [small, b"behind", small, large]


def test_deliveries_are_handed_over_as_pika_reads_them(
    vhost_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pika's blocking channel queues each delivery as an event, dispatched once its read
    # loop is done; `consume` takes them as read (as pika's own consume() generator
    # does), and a wait for a delivery ends with it.
    queued: list[str] = []
    add_pending_event = BlockingChannel._add_pending_event

    def counted(channel: Any, event: Any) -> None:
        queued.append(type(event).__name__)
        add_pending_event(channel, event)

    monkeypatch.setattr(BlockingChannel, "_add_pending_event", counted)
    with pika.BlockingConnection(pika.URLParameters(vhost_factory())) as connection:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        got: list[bytes] = []
        consume(channel, queue, lambda _channel, _method, _props, body: got.append(body))
        publisher = connection.channel()
        for number in range(3):
            publisher.basic_publish("", queue, b"%d" % number)
        waited_out: list[None] = []
        connection.call_later(60, lambda: waited_out.append(None))
        while len(got) < 3 and not waited_out:
            connection.process_data_events(time_limit=None)  # ends with a delivery
    assert (got, waited_out, queued) == ([b"0", b"1", b"2"], [], [])


@contextmanager
def _consuming(url: str, on_message: Any) -> Iterator[tuple[Any, Any, str]]:
    """A connection, a channel of it consuming (`consume`) a queue of its own, the queue."""
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        consume(channel, queue, on_message)
        yield connection, channel, queue


@contextmanager
def _consuming_bodies(url: str) -> Iterator[tuple[Any, Any, str, list[bytes]]]:
    """`_consuming`, the bodies it receives collected in the list it yields last."""
    got: list[bytes] = []
    with _consuming(url, lambda _channel, _method, _props, body: got.append(body)) as (
            connection, channel, queue):
        yield connection, channel, queue, got


def test_whole_deliveries_are_read_without_pika_s_frame_decoding(
    vhost_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pika turns each of a delivery's three frames into an object and passes it through
    # its callback manager and content assembler; `consume` reads whole ones in one pass.
    decoded: list[None] = []
    decode_frame = pika.frame.decode_frame
    monkeypatch.setattr(pika.frame, "decode_frame",
                        lambda data: (decoded.append(None), decode_frame(data))[1])
    got: list[tuple[Any, Any, bytes]] = []
    url = vhost_factory()
    with _consuming(url, lambda _channel, method, props, body: got.append(
            (method, props, body))) as (connection, _channel, queue):
        props = pika.BasicProperties(type="call", correlation_id="c-1", reply_to="back",
                                     user_id="guest", headers={"sender": "zoë"})
        # Published on a connection of their own: the consuming one reads in the loop only.
        with pika.BlockingConnection(pika.URLParameters(url)) as publisher:
            sending = publisher.channel()
            sending.basic_publish("", queue, b"one", props)
            sending.basic_publish("", queue, b"", props)  # (no body frame: pika's to read)
        decoded.clear()
        while len(got) < 2:
            connection.process_data_events(time_limit=None)
        decoded_for_them = len(decoded)
    (method, props, body), (_, _, empty) = got
    assert (body, empty) == (b"one", b"")
    assert (method.routing_key, method.exchange, method.redelivered) == (queue, "", False)
    assert (props.type, props.correlation_id, props.reply_to, props.user_id,
            props.headers) == ("call", "c-1", "back", "guest", {"sender": "zoë"})
    assert decoded_for_them == 2  # the empty message's method and header frames only


def test_a_short_read_ends_the_reading_and_what_comes_later_wakes_the_next_poll(
    vhost_factory: Any
) -> None:
    # pika reads until recv raises that it would block: an exception, a log call and a
    # system call after every message. Its polls are level-triggered: a read shorter
    # than asked for may end the reading, and whatever comes after wakes the next poll.
    url = vhost_factory()
    with _consuming_bodies(url) as (connection, _channel, queue, got):
        transport = connection._impl._transport
        recv, blocked = transport._sigint_safe_recv, []

        def counted(sock: Any, size: int) -> bytes:
            try:
                return bytes(recv(sock, size))
            except BlockingIOError:
                blocked.append(None)
                raise

        transport._sigint_safe_recv = counted
        with pika.BlockingConnection(pika.URLParameters(url)) as publisher:
            sending = publisher.channel()
            for body in (b"one", bytes(9000), b"three"):  # (the second over a read)
                sending.basic_publish("", queue, body)
                while body not in got:
                    connection.process_data_events(time_limit=None)
    assert (got, blocked) == ([b"one", bytes(9000), b"three"], [])


def test_a_look_runs_pika_s_loop_only_for_what_is_not_input(vhost_factory: Any) -> None:
    # Between two commands it holds, a worker looks for new ones (the next command is the
    # fairest sender's): pika's loop, for nothing or around one read, cost more than a
    # small command's work. A look finds input without it; output or a callback due,
    # which only pika's loop runs, still get it.
    url = vhost_factory()
    with _consuming_bodies(url) as (connection, channel, queue, got):
        loops: list[None] = []
        process = connection.process_data_events
        connection.process_data_events = lambda **limit: (loops.append(None), process(**limit))
        _read(connection, [], wait=False)
        assert (got, loops) == ([], [])
        with pika.BlockingConnection(pika.URLParameters(url)) as publisher:
            publisher.channel().basic_publish("", queue, b"new")
        assert select.select([connection._impl._transport._sock], [], [], 10)[0]
        _read(connection, [], wait=False)
        assert (got, loops) == ([b"new"], [])
        publish_later(channel, "", queue, b"behind", pika.BasicProperties(), mandatory=False)
        assert unsent_bytes(connection)
        _read(connection, [], wait=False)
        assert (unsent_bytes(connection), len(loops)) == (0, 1)
        called: list[None] = []
        connection.add_callback_threadsafe(lambda: called.append(None))
        _read(connection, [], wait=False)
        assert (called, len(loops)) == ([None], 2)


def test_a_wait_for_input_reads_without_pika_s_loop_and_leaves_it_the_rest(
    vhost_factory: Any
) -> None:
    # pika's loop around a poll (its dispatch guard, a timer for the time limit, its
    # checks) cost more than reading a small message; a wait in the state torchrelay
    # waits in polls and reads, and leaves whatever else is due to pika's loop.
    url = vhost_factory()
    with _consuming_bodies(url) as (connection, _channel, queue, got):
        loops: list[Any] = []
        process = connection.process_data_events
        connection.process_data_events = lambda **limit: (loops.append(limit), process(**limit))
        wait_for_input(connection, 0.01)  # nothing comes: one poll, and back
        assert (got, loops) == ([], [])
        with pika.BlockingConnection(pika.URLParameters(url)) as publisher:
            publisher.channel().basic_publish("", queue, b"new")
        while not got:
            wait_for_input(connection, 10)
        assert (got, loops) == ([b"new"], [])
        called: list[None] = []
        connection.add_callback_threadsafe(lambda: called.append(None))
        wait_for_input(connection, 10)  # a callback due: pika's loop runs it
        assert called == [None] and loops


def test_a_delivery_read_in_pieces_or_among_other_frames_reaches_its_consumer_whole(
    vhost_factory: Any
) -> None:
    # What a read brings may end in the middle of a frame, and deliveries come between
    # heartbeats and messages too large for one body frame, which pika reads: whatever
    # the cut, each delivery reaches its consumer once, whole and in order.
    got: list[tuple[int, str, bytes]] = []
    with _consuming(vhost_factory(), lambda _channel, method, props, body: got.append(
            (method.delivery_tag, props.correlation_id, body))) as (connection, channel, queue):
        (tag,) = channel._impl._consumers
        number, impl = channel.channel_number, connection._impl

        def delivery(delivery_tag: int, *bodies: bytes) -> bytes:
            method = pika.spec.Basic.Deliver(tag, delivery_tag, False, "", queue)
            header = pika.frame.Header(number, sum(map(len, bodies)), pika.BasicProperties(
                correlation_id=f"c-{delivery_tag}", headers={"sender": "ünïcode"}))
            return b"".join([pika.frame.Method(number, method).marshal(), header.marshal(),
                             *(pika.frame.Body(number, body).marshal() for body in bodies)])

        stream = b"".join([delivery(1, b"first"), pika.frame.Heartbeat().marshal(),
                           delivery(2, b"second"), delivery(3, b"thi", b"rd"), delivery(4),
                           delivery(5, b"fifth")])
        expected = [(1, "c-1", b"first"), (2, "c-2", b"second"), (3, "c-3", b"third"),
                    (4, "c-4", b""), (5, "c-5", b"fifth")]
        for cut in range(len(stream) + 1):
            got.clear()
            impl._on_data_available(stream[:cut])
            impl._on_data_available(stream[cut:])
            assert (cut, got) == (cut, expected)
            assert impl._frame_buffer == b""
        # A consumer that reads the connection again (none of ours does) reads what
        # follows its delivery, in order.
        first, rest = delivery(1, b"first"), delivery(2, b"second") + delivery(3, b"third")
        nested = [rest[len(rest) // 2:]]
        sinks = impl._on_data_available.sinks
        sink = sinks[(number, tag)]

        def reading_again(*args: Any) -> None:
            sink(*args)
            if nested:
                impl._on_data_available(nested.pop())

        sinks[(number, tag)] = reading_again
        got.clear()
        impl._on_data_available(first + rest[:len(rest) // 2])
        assert [body for _, _, body in got] == [b"first", b"second", b"third"]


def test_an_error_handling_a_delivery_is_raised_after_the_read_and_the_connection_stays(
    vhost_factory: Any
) -> None:
    # Raised inside pika's read, it would abort the connection: a message whose handling
    # always fails would bring it down again each time it came back.
    def refuse(_channel: Any, _method: Any, _props: Any, body: bytes) -> None:
        raise ValueError(f"cannot handle {body!r}")

    with _consuming(vhost_factory(), refuse) as (connection, channel, queue):
        channel.basic_publish("", queue, b"hostile")
        with pytest.raises(ValueError, match="cannot handle b'hostile'"):
            connection.process_data_events(time_limit=None)  # (a delivery ends the wait)
        assert connection.is_open and channel.is_open


def test_a_message_that_cannot_be_taken_in_is_dropped_said_and_acknowledged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Whatever a sender puts in a message, a worker must not stop over it (nor meet it
    # again at each restart): what its consumer cannot take in is logged and dropped.
    consumer = Consumer(1 << 20, prefetch=64)

    def cannot(*args: Any) -> None:
        raise TypeError("a header no one foresaw")

    monkeypatch.setattr(consumer, "_deliver", cannot)
    acked: list[int] = []

    class Channel:  # (a pika channel as far as acknowledging goes)
        def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
            acked.append(delivery_tag)

    method = SimpleNamespace(delivery_tag=7)
    props = SimpleNamespace(type="store", correlation_id="evil.1")
    consumer.on_command(Channel(), method, props, b"")
    assert acked == [7] and not consumer.inbox
    assert "dropped a message (store, correlation id 'evil.1')" in caplog.text
    consumer.on_reply(Channel(), SimpleNamespace(delivery_tag=8), props, b"")
    assert acked == [7] and not consumer.inbox  # a reply's goes with its batch, as ever


@contextmanager
def _shared_and_client(url: str, name: str) -> Iterator[tuple[SharedConnection, RabbitMQEndpoint]]:
    """A worker connection named `name` (serving no worker yet) and a client, closed after."""
    broker = RabbitMQBroker(url)
    shared, client = broker.share(name), broker.connect("client")
    try:
        yield shared, client
    finally:
        client.close()
        shared.close()


def test_what_served_workers_publish_goes_together_with_the_next_read(
    vhost_factory: Any, sends: list[int]
) -> None:
    with _shared_and_client(vhost_factory(), "torchrelay host a, b") as (shared, client):
        a, b = shared.serve("a"), shared.serve("b")
        sends.clear()
        for number, worker in enumerate((a, b, a)):
            worker.send_reply(client.reply_queue, "echo", tr.broker.Describe().encode(),
                              f"c-{number}")
        assert sends == []  # written, not sent: the serving loop reads after its round
        shared.wait(0)
        assert len(sends) == 1  # the three in one send
        received = [client.receive(10) for _ in range(3)]
        got = [(d.sender, d.correlation_id) for d in received if d is not None]
        # (In order per worker: one channel each. Across channels RabbitMQ may reorder.)
        assert [c for w, c in got if w == "a"] == ["c-0", "c-2"]
        assert [c for w, c in got if w == "b"] == ["c-1"]


def test_a_connection_serving_one_worker_sends_each_message_at_once(
    vhost_factory: Any, sends: list[int]
) -> None:
    with _shared_and_client(vhost_factory(), "torchrelay worker a") as (shared, client):
        # Nothing to go with: waiting for the serving loop's read would only delay it.
        # (And a journaled worker's answers must not wait in the process's buffer: a
        # crash in its next command would take them along.)
        a = shared.serve("a")
        sends.clear()
        a.send_reply(client.reply_queue, "echo", tr.broker.Describe().encode(), "c-1")
        assert len(sends) == 1
        delivery = client.receive(10)
        assert delivery is not None and (delivery.sender, delivery.correlation_id) == (
            "a", "c-1")
        # A second worker served: from now on both write behind.
        b = shared.serve("b")
        sends.clear()
        for worker in (a, b):
            worker.send_reply(client.reply_queue, "echo", tr.broker.Describe().encode(), "c-2")
        assert sends == []
        shared.wait(0)
        assert len(sends) == 1


def test_what_a_worker_wrote_behind_is_sent_again_if_its_connection_dies_first(
    vhost_factory: Any, rabbitmq: ManagementAPI
) -> None:
    url = vhost_factory()
    vhost, name = vhost_of(url), "torchrelay host behind"
    with _shared_and_client(url, name) as (shared, client):
        worker, _ = shared.serve("a"), shared.serve("b")  # (several: they write behind)
        (connection,) = [c["name"] for c in rabbitmq.wait_for_connections(
            lambda cs: any(c["client_properties"].get("connection_name") == name for c in cs),
            vhost) if c["client_properties"].get("connection_name") == name]
        worker.send_reply(client.reply_queue, "echo", tr.broker.Describe().encode(), "c-1")
        with shared._link._lock:  # (the keeper thread would send it meanwhile)
            rabbitmq.close_connection(connection)  # before the reply written behind is sent
            # Once the broker's Close has arrived, it discards whatever we send.
            sock = shared._link._connection._impl._transport._sock
            assert select.select([sock], [], [], 30)[0], "the broker did not close it"

        shared.wait(1)  # finds it dead, reconnects, writes the reply again

        delivery = client.receive(10)
        assert delivery is not None and (delivery.sender, delivery.correlation_id) == (
            "a", "c-1")
        assert worker.reconnects == 1
