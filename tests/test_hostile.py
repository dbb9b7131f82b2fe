"""A worker no command can take down, wedge or poison: what an attacker would send."""

from __future__ import annotations

import secrets
import time
from typing import Any

import pika
import pytest
import torch
import torch.nn.functional as F

import torchrelay as tr
from torchrelay.broker import (
    COMMAND_EXCHANGE,
    Call,
    Frame,
    ManagementAPI,
    ObjectRef,
    PointerRef,
    Reply,
    Store,
    decode_reply,
    encode,
    worker_queue,
)
from torchrelay.worker import WorkerProcesses

tr.hook(torch)

MIB = 1 << 20


def raw_request(fleet: tr.Fleet, worker_id: str, kind: str, body: bytes) -> Reply:
    """Send `body` as a `kind` command, bypassing the client; the decoded reply."""
    fleet.sync()
    correlation_id = f"raw.{secrets.token_hex(4)}.1"
    fleet.endpoint.send_command(worker_id, kind, Frame((body,), len(body)), correlation_id)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        delivery = fleet.endpoint.receive(1.0)
        if delivery is not None and delivery.correlation_id == correlation_id:
            return decode_reply(delivery.body)
    raise AssertionError("no reply")


@pytest.fixture
def precious(bob: tr.WorkerHandle) -> Any:
    """Objects that must survive every bad command around them."""
    pointer = torch.tensor([42.0, 43.0]).send(bob)
    yield pointer
    assert bob._objects[pointer.id_at_location] == "tensor([42., 43.])"
    assert torch.equal(pointer.get(), torch.tensor([42.0, 43.0]))


def test_a_lapack_crash_on_nan_is_an_error_not_a_dead_worker(
    bob: tr.WorkerHandle, precious: tr.PointerTensor
) -> None:
    matrix = torch.tensor([[float("nan"), 1.0], [2.0, 3.0]]).send(bob)
    with pytest.raises(tr.RemoteError, match="NaN or infinite entries is refused"):
        torch.linalg.eigvals(matrix).get()
    assert torch.equal((precious + 1).get(), torch.tensor([43.0, 44.0]))  # serving still
    matrix.get()


NEVER_ENDING: dict[str, tuple[Any, str]] = {
    "binomial of NaN": (lambda x: torch.binomial(x, torch.tensor([0.5])), "NaN"),
    "max_pool1d with a 2**32 kernel": (lambda x: F.max_pool1d(x.view(1, 1, 1), 2**32), "kernel"),
    "expand to 2**50 elements": (lambda x: x.expand(2**50).sum(), "max_elements"),
}


@pytest.mark.parametrize("case", list(NEVER_ENDING))
def test_work_that_never_ends_is_refused(
    bob: tr.WorkerHandle, precious: tr.PointerTensor, case: str
) -> None:
    x = torch.tensor([float("nan")]).send(bob)
    work, message = NEVER_ENDING[case]
    with pytest.raises(tr.RemoteError, match=message):
        work(x).get()
    x.get()


def test_tolist_of_millions_is_refused_and_the_tensor_stays(
    bob: tr.WorkerHandle, precious: tr.PointerTensor
) -> None:
    big = torch.zeros(1).send(bob).expand(2_000_000).contiguous()
    with pytest.raises(tr.RemoteError, match="max_list_elements"):
        big.tolist().get()
    assert big.shape == torch.Size([2_000_000])
    big.get()


def test_a_value_nested_a_thousand_deep_leaves_the_listing_working(
    fleet: tr.Fleet, bob: tr.WorkerHandle, precious: tr.PointerTensor
) -> None:
    deep = tr.client.send([0], bob)
    for _ in range(1000):  # nested on the worker, deeper than any message may carry
        outer = tr.client.send([0], bob)
        outer[0] = deep
        deep = outer

    listing = bob._objects

    assert listing[deep.id_at_location].startswith("[[[[")
    assert len(listing[deep.id_at_location]) < 400
    assert listing[precious.id_at_location] == "tensor([42., 43.])"
    value = deep.get()
    for _ in range(1000):
        (value,) = value
    assert value == [0]


def test_a_value_that_contains_itself_is_shown_and_stays_when_it_cannot_travel(
    fleet: tr.Fleet, bob: tr.WorkerHandle, precious: tr.PointerTensor
) -> None:
    loop = tr.client.send([0], bob)
    loop[0] = loop  # the list now holds itself: nested without end

    assert bob._objects[loop.id_at_location].startswith("[[")
    with pytest.raises(tr.RemoteError, match="cannot encode"):
        loop.get()
    assert loop.id_at_location in bob._objects  # it could not travel, so it stays
    del loop  # deleted by garbage collection


def test_a_negative_hop_count_is_refused(fleet: tr.Fleet, bob: tr.WorkerHandle) -> None:
    body = encode({"op": "Tensor.__add__", "args": [], "kwargs": {}, "result_id": None,
                   "hops": -5}).tobytes()
    reply = raw_request(fleet, "bob", "call", body)
    assert reply.error is not None
    assert "field 'hops' must be an integer from 0 to 32" in reply.error.message


def test_the_memory_budget_refuses_what_does_not_fit(vhost_factory: Any) -> None:
    url = vhost_factory()
    with WorkerProcesses(url, ["tight"], extra_args=["--max-bytes", str(64 * MIB)]), \
            tr.connect(url) as fleet:
        tight = fleet.worker("tight")
        kept = torch.ones(8 * MIB).send(tight)  # 32 MiB
        with pytest.raises(tr.RemoteError, match="max_bytes"):
            (kept * 2).get()  # another 32 MiB would not fit, with kept alive
        view = kept[: 4 * MIB]  # a view takes no memory of its own
        status = tight.status()
        # 32 MiB, and the few bytes of the message the tensor arrived in (it views them)
        assert 32 * MIB <= status["tensor_bytes"] < 33 * MIB
        assert status["max_bytes"] == 64 * MIB
        with pytest.raises(tr.RemoteError, match="max_bytes"):
            torch.ones(9 * MIB).send(tight).get()
        view.get(), kept.get()
        # Python lists count too: tolist of a million numbers builds some 56 MiB of them.
        numbers = torch.zeros(1 << 20).send(tight)
        listed = numbers.tolist()
        held = tight.status()["tensor_bytes"]
        assert held >= 4 * MIB + (1 << 20) * 48  # the tensor, and the list's numbers
        with pytest.raises(tr.RemoteError, match="max_bytes"):
            fleet.request("tight", Call("Tensor.tolist", [ObjectRef(numbers.id_at_location)],
                                        {}, fleet.new_id()))  # a second one would not fit
        listed.get()
        assert tight.status()["tensor_bytes"] < held - 32 * MIB  # fetched: counted out
        numbers.get()


def forge_first_chunk(url: str, worker_id: str, total: int) -> tuple[Any, Any, str]:
    """Publish one 8 MiB chunk announcing a `total`-byte store from "mallory"; return the
    connection, channel and the queue where mallory's replies arrive."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    replies = channel.queue_declare(f"torchrelay.reply.mallory.{secrets.token_hex(4)}",
                                    exclusive=True).method.queue
    chunk = 8 * MIB
    forged = pika.BasicProperties(
        type="store", correlation_id=f"mallory.{secrets.token_hex(2)}.1", reply_to=replies,
        user_id="guest",
        headers={"sender": "mallory", "chunk": [0, -(-total // chunk), total]},
    )
    channel.basic_publish(COMMAND_EXCHANGE, worker_id, b"\0" * chunk, forged)
    return connection, channel, replies


def reply_to_mallory(channel: Any, replies: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        method, _, body = channel.basic_get(replies, auto_ack=True)
        if method is not None:
            error = decode_reply(body).error
            assert error is not None
            return error.message
        time.sleep(0.1)
    raise AssertionError("mallory was not told")


@pytest.mark.parametrize("announced", ["16 GiB", "the whole budget"])
def test_a_forged_huge_chunk_does_not_keep_another_senders_transfer_out(
    vhost_factory: Any, announced: str
) -> None:
    url = vhost_factory()
    with WorkerProcesses(url, ["vera"], extra_args=["--max-bytes", str(1 << 30)]), \
            tr.connect(url) as fleet:
        vera = fleet.worker("vera")
        total = 16 << 30 if announced == "16 GiB" else 1 << 30
        connection, channel, replies = forge_first_chunk(url, "vera", total)
        tensor = torch.rand(16 * MIB)  # 64 MiB, in eight chunks

        back = tensor.send(vera).get()

        assert torch.equal(back, tensor)
        told = reply_to_mallory(channel, replies)
        assert ("over this endpoint's limit" if announced == "16 GiB" else "its share") in told
        connection.close()


def test_a_deleted_queue_is_declared_again(
    rabbitmq: ManagementAPI, daemons_for_test: Any
) -> None:
    daemons = daemons_for_test(("gina",))
    with pika.BlockingConnection(pika.URLParameters(daemons.url)) as connection:
        connection.channel().queue_delete(worker_queue("gina"))
    with tr.connect(daemons.url) as fleet:
        deadline = time.monotonic() + 20
        while True:
            try:
                gina = fleet.worker("gina")
                break
            except tr.UnknownWorker:
                assert time.monotonic() < deadline, "the queue did not come back in 20 s"
                time.sleep(0.2)
        assert torch.equal((torch.ones(2).send(gina) * 3).get(), torch.full((2,), 3.0))
    assert "declaring it again" in daemons.log_tail("gina")


def test_a_store_claiming_a_pointer_to_itself_is_refused(
    fleet: tr.Fleet, bob: tr.WorkerHandle
) -> None:
    body = Store(7, PointerRef("bob", 7)).encode().tobytes()
    reply = raw_request(fleet, "bob", "store", body)
    assert reply.error is not None and "cannot point at itself" in reply.error.message


def test_a_call_told_to_fetch_without_a_result_is_refused(
    fleet: tr.Fleet, bob: tr.WorkerHandle
) -> None:
    # `fetch` is the client's `(x + x).get()` in one command; sent by hand on an in-place
    # call, it has nothing of its own to fetch, and the call does not run.
    x = torch.tensor([1.0, 2.0]).send(bob)
    reply = raw_request(fleet, "bob", "call", Call(
        "Tensor.add_", [ObjectRef(x.id_at_location), 1], {}, None, fetch=True).encode().tobytes())
    assert reply.error is not None and "no result to fetch" in reply.error.message
    assert list(bob._objects) == [x.id_at_location]
    assert torch.equal(x.get(), torch.tensor([1.0, 2.0]))
