"""Bad input gets a clear error, the worker keeps serving, and nothing is lost."""

from __future__ import annotations

import secrets
import time

import msgpack
import pika
import pytest
import torch
from tls import pika_parameters

import torchrelay as tr
from torchrelay.broker import (
    COMMAND_EXCHANGE,
    RETURNED,
    Frame,
    ObjectRef,
    PointerRef,
    Reply,
    decode_reply,
    encode,
    worker_queue,
)
from torchrelay.client import WorkerHandle

tr.hook(torch)

# pickle.dumps of os.system("echo pwned"): what an attacker would send.
PICKLE_PAYLOAD = (
    b"\x80\x04\x95\x22\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93"
    b"\x94\x8c\x0aecho pwned\x94\x85\x94R\x94."
)


def raw_request(fleet: tr.Fleet, worker_id: str, kind: str, body: bytes) -> Reply:
    """Send `body` as a `kind` command, bypassing the client; return the decoded reply."""
    fleet.sync()
    correlation_id = f"raw.{secrets.token_hex(4)}"
    fleet.endpoint.send_command(worker_id, kind, Frame((body,), len(body)), correlation_id)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        delivery = fleet.endpoint.receive(1.0)
        if delivery is not None and delivery.correlation_id == correlation_id:
            assert delivery.type != RETURNED
            return decode_reply(delivery.body)
    raise AssertionError("no reply")


def fields(**values: object) -> bytes:
    return encode(values).tobytes()


@pytest.fixture
def precious(bob: tr.WorkerHandle) -> tr.PointerTensor:
    """An object that must survive every bad command around it."""
    return torch.tensor([42.0, 43.0]).send(bob)


def assert_intact(bob: tr.WorkerHandle, precious: tr.PointerTensor) -> None:
    assert bob._objects[precious.id_at_location] == "tensor([42., 43.])"
    assert torch.equal((precious + 0).get(), torch.tensor([42.0, 43.0]))


BAD_COMMANDS = {
    "pickle": ("store", PICKLE_PAYLOAD, "never pickle"),
    "garbage": ("store", b"\x00\x01not a frame at all", "not a torchrelay frame"),
    "empty": ("call", b"", "too short"),
    "truncated": ("store", fields(id=1, value=torch.ones(4), provenance=[],
                                  replaces_pointer=False)[:-8], "needs 16 bytes"),
    "wrong version": ("describe", b"TRL\x09" + fields()[4:], "version 9"),
    "not a map": ("fetch", encode([1, 2, 3]).tobytes(), "must be a map"),
    "unknown command": ("eval", fields(source="__import__('os')"), "unknown command 'eval'"),
    "unknown field": ("fetch", fields(id=1, path="/etc/passwd"), "unknown fields ['path']"),
    "missing field": ("call", fields(op="torch.add", args=[]), "missing fields"),
    "self pointer": ("store", fields(id=5, value=PointerRef("bob", 5), provenance=[],
                                     replaces_pointer=False), "cannot point at itself"),
    "wrong type": ("fetch", fields(id="1"), "field 'id' must be an integer"),
    "unknown id": ("fetch", fields(id=123456789), "no object 123456789 on worker 'bob'"),
    "os.system": ("call", fields(op="os.system", args=["echo pwned"], kwargs={},
                                 result_id=None, hops=0), "'os.system' is not on the allow-list"),
    "eval": ("call", fields(op="builtins.eval", args=["1"], kwargs={}, result_id=None, hops=0),
             "not on the allow-list"),
    "torch.load": ("call", fields(op="torch.load", args=["/etc/passwd"], kwargs={},
                                  result_id=None, hops=0), "not on the allow-list"),
    "dunder": ("call", fields(op="Tensor.__reduce_ex__", args=[ObjectRef(1), 2], kwargs={},
                              result_id=None, hops=0), "not on the allow-list"),
    "attribute chain": ("call", fields(op="Tensor.__class__.__subclasses__", args=[],
                                       kwargs={}, result_id=None, hops=0), "not on the allow-list"),
    "fault injection": ("call", fields(op="testing.stall", args=[3600], kwargs={},
                                       result_id=None, hops=0), "not on the allow-list"),
    "raw memory": ("call", fields(op="Tensor.data_ptr", args=[ObjectRef(1)], kwargs={},
                                  result_id=7, hops=0), "not on the allow-list"),
    "shape lies": ("store", b"TRL\x01" + bytes(4), "malformed"),
    "huge shape": ("store", b"", "needs"),  # filled in below
    "deep nesting": ("store", b"", "nest"),  # filled in below
}


def _huge_shape() -> bytes:
    tensor = msgpack.ExtType(1, msgpack.packb(["float32", [2**20, 2**20], 0, False]))
    header = msgpack.packb({"id": 5, "value": tensor, "provenance": [],
                            "replaces_pointer": False})
    return b"TRL\x01" + len(header).to_bytes(4, "little") + header


def _deep() -> bytes:
    value: object = 1
    for _ in range(100):
        value = msgpack.ExtType(2, msgpack.packb([value]))
    header = msgpack.packb({"id": 5, "value": value, "provenance": [],
                            "replaces_pointer": False})
    return b"TRL\x01" + len(header).to_bytes(4, "little") + header


BAD_COMMANDS["huge shape"] = ("store", _huge_shape(), "needs 4398046511104 bytes")
BAD_COMMANDS["deep nesting"] = ("store", _deep(), "nested deeper than 32")


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_bad_commands_get_a_clear_error_and_lose_nothing(
    fleet: tr.Fleet, bob: tr.WorkerHandle, precious: tr.PointerTensor, case: str
) -> None:
    kind, body, message = BAD_COMMANDS[case]

    reply = raw_request(fleet, "bob", kind, body)

    assert reply.error is not None, f"{case} was accepted"
    assert message in reply.error.message
    assert_intact(bob, precious)
    precious.get()


def test_errors_inside_torch_are_remote_errors_with_the_remote_traceback(
    bob: tr.WorkerHandle, precious: tr.PointerTensor
) -> None:
    with pytest.raises(tr.RemoteError) as caught:
        precious.view(3, 3).get()
    error = caught.value
    assert error.worker_id == "bob"
    assert error.remote_type == "RuntimeError"
    assert "shape '[3, 3]' is invalid" in error.remote_message
    assert "call Tensor.view failed on worker 'bob'" in str(error)
    assert "Traceback" in error.remote_traceback
    assert isinstance(error, tr.TorchRelayError)
    assert_intact(bob, precious)
    precious.get()


def test_pipelined_errors_surface_at_the_next_wait_naming_the_operation(
    bob: tr.WorkerHandle, precious: tr.PointerTensor
) -> None:
    broken = precious.view(5, 5)  # returns at once: nothing waits for the answer
    fine = precious * 2
    with pytest.raises(tr.RemoteError, match=r"call Tensor\.view failed on worker 'bob'"):
        bob._objects
    assert torch.equal(fine.get(), torch.tensor([84.0, 86.0]))
    with pytest.raises(tr.RemoteError, match="no object") as raised:
        broken.get()  # it was never created
    assert isinstance(raised.value, tr.ObjectNotFound)  # a worker's, caught by its kind
    assert str(raised.value).startswith("fetch failed on worker 'bob'")
    precious.get()


def test_an_error_down_a_chain_reaches_the_caller(
    bob: tr.WorkerHandle, alice: tr.WorkerHandle, precious: tr.PointerTensor
) -> None:
    chain = precious.send(alice)
    with pytest.raises(tr.RemoteError) as caught:
        chain.view(7).get()
    assert caught.value.worker_id == "alice"
    assert "failed on worker 'bob'" in str(caught.value)
    assert chain.get().get().tolist() == [42.0, 43.0]


def test_client_refuses_what_is_not_allow_listed(bob: tr.WorkerHandle) -> None:
    pointer = torch.tensor([1.0]).send(bob)
    with pytest.raises(AttributeError, match="not an allow-listed tensor method"):
        pointer.data_ptr()
    with pytest.raises(tr.OperationRefused):
        torch.empty_like(pointer)
    with pytest.raises(TypeError, match="no truth value"):
        bool(pointer)
    pointer.get()


def test_pointers_to_different_workers_do_not_mix(
    bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    a, b = torch.tensor([1]).send(bob), torch.tensor([2]).send(alice)
    with pytest.raises(tr.OperationRefused, match="different workers"):
        a + b
    a.get(), b.get()


def test_a_chain_and_local_data_do_not_mix_on_the_worker(
    bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    local = torch.tensor([1.0]).send(alice)
    chain = torch.tensor([2.0]).send(bob).send(alice)
    with pytest.raises(tr.RemoteError, match="different workers"):
        (local + chain).get()
    local.get(), chain.get().get()


def test_sending_to_a_worker_nobody_serves_fails_and_loses_nothing(
    fleet: tr.Fleet, bob: tr.WorkerHandle, precious: tr.PointerTensor
) -> None:
    nobody = WorkerHandle(fleet, f"nobody-{secrets.token_hex(2)}")
    with pytest.raises(tr.RemoteError, match="nobody"):
        precious.move(nobody)
    assert_intact(bob, precious)
    stray = torch.tensor([1]).send(nobody)
    stray.garbage_collect = False
    with pytest.raises(tr.UnknownWorker, match="nobody"):
        fleet.sync()
    precious.get()


def test_a_worker_that_never_answers_times_out_naming_it(broker_url: str | None) -> None:
    ghost = f"ghost-{secrets.token_hex(2)}"
    with tr.connect(broker_url, timeout=1.0) as fleet:
        if broker_url is None:  # a queue that is consumed by nobody who answers
            fleet.broker.connect(ghost, serve_worker=ghost)
        else:
            with pika.BlockingConnection(pika_parameters(broker_url)) as connection:
                channel = connection.channel()
                channel.queue_declare(worker_queue(ghost), auto_delete=False)
                channel.queue_bind(worker_queue(ghost), COMMAND_EXCHANGE, routing_key=ghost)
        handle = WorkerHandle(fleet, ghost)
        with pytest.raises(tr.ReplyTimeout, match=ghost):  # after the session's timeout
            handle._objects
        if broker_url is not None:
            with pika.BlockingConnection(pika_parameters(broker_url)) as connection:
                connection.channel().queue_delete(worker_queue(ghost))


def test_a_cycle_of_pointers_is_refused_not_followed_forever(
    fleet: tr.Fleet, bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    at_alice, at_bob = secrets.randbits(53), secrets.randbits(53)
    # alice's object points at bob's, which points back at alice's: no data anywhere.
    raw_request(fleet, "alice", "store", fields(id=at_alice, value=PointerRef("bob", at_bob),
                                                provenance=[], replaces_pointer=False))
    raw_request(fleet, "bob", "store", fields(id=at_bob, value=PointerRef("alice", at_alice),
                                              provenance=[], replaces_pointer=False))
    # Each may use the other's (as sending a pointer on grants).
    raw_request(fleet, "alice", "grant", fields(id=at_alice, to="bob"))
    raw_request(fleet, "bob", "grant", fields(id=at_bob, to="alice"))
    cycle = tr.PointerTensor(alice, at_alice)
    with pytest.raises(tr.RemoteError, match="forwarded 32 times"):
        (cycle + 1).get()
    del cycle  # deleting it follows the cycle once round, then stops
    assert at_alice not in alice._objects
    assert at_bob not in bob._objects


def test_garbage_riding_on_a_failing_command_is_still_collected(
    fleet: tr.Fleet, bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    data = torch.tensor([42.0]).send(bob)
    data_id = data.id_at_location
    chain = data.send(alice)
    del data, chain  # garbage for alice, which rides with the next command to alice
    broken = torch.ones(2).send(alice)
    with pytest.raises(tr.RemoteError):
        (broken + torch.ones(3)).get()
    fleet.sync()
    assert data_id not in bob._objects
    broken.get()


def test_sessions_never_share_correlation_ids(broker_url: str | None) -> None:
    # A worker skips a redelivered command it remembers by (sender, correlation
    # id): two sessions both named "me" must not be taken for one another.
    with tr.connect(broker_url) as one, tr.connect(broker_url) as other:
        assert one.name == other.name == "me"
        assert one._prefix != other._prefix
