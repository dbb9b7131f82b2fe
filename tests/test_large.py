"""Tensors of any size: chunked past the chunk size, reassembled whole or not at all."""

from __future__ import annotations

import io
import secrets
import time

import pika
import pytest
import torch

import torchrelay as tr
from torchrelay.broker import (
    COMMAND_EXCHANGE,
    ProtocolError,
    Reassembler,
    Store,
    decode,
    encode,
    split_frame,
)
from torchrelay.client._progress import TerminalProgress
from torchrelay.worker import WorkerProcesses

tr.hook(torch)

MIB = 1 << 20


def test_a_tensor_larger_than_a_chunk_goes_there_and_back(
    fleet: tr.Fleet, bob: tr.WorkerHandle
) -> None:
    tensor = torch.randn(20 * MIB // 4)  # 20 MiB: three of the workers' 8 MiB chunks
    pointer = tensor.send(bob)
    assert torch.equal((pointer * 2).get(), tensor * 2)
    assert torch.equal(pointer.get(), tensor)


def test_a_large_tensor_moves_between_workers(
    fleet: tr.Fleet, bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    tensor = torch.arange(5 * MIB, dtype=torch.int32)
    moved = tensor.send(bob).move(alice)
    assert moved.location is alice
    assert torch.equal(moved.get(), tensor)


def test_many_small_chunks_from_a_client_that_asks_for_them(
    session_daemons: WorkerProcesses,
) -> None:
    tensor = torch.randn(3 * MIB)  # 12 MiB in 1 MiB chunks: 13 messages
    with tr.connect(session_daemons.url, chunk_size=MIB) as fleet:
        pointer = tensor.send(fleet.worker("bob"))
        assert torch.equal(pointer.get(), tensor)


def test_a_transfer_cut_short_is_never_seen(session_daemons: WorkerProcesses) -> None:
    object_id = secrets.randbits(53)
    # 4 MiB, for the session below to see (a store is its sender's, and whom it names)
    frame = Store(object_id, torch.ones(MIB), [], holders=["me"]).encode()
    chunks = list(split_frame(frame, MIB))

    def publish(indexes: range) -> None:
        with pika.BlockingConnection(pika.URLParameters(session_daemons.url)) as connection:
            channel = connection.channel()
            for index in indexes:
                headers = {"sender": "crasher", "chunk": [index, len(chunks), frame.nbytes]}
                channel.basic_publish(COMMAND_EXCHANGE, "bob", bytes(chunks[index]),
                                      pika.BasicProperties(type="store", correlation_id="cut",
                                                           user_id="guest", headers=headers))

    with tr.connect(session_daemons.url) as fleet:
        bob = fleet.worker("bob")
        publish(range(2))  # the sender "dies" after two of five chunks
        time.sleep(0.2)
        assert object_id not in bob._objects  # nothing half-written, and bob still answers

        publish(range(len(chunks)))  # the sender starts over and finishes
        deadline = time.monotonic() + 10
        while object_id not in bob._objects:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert torch.equal(tr.PointerTensor(bob, object_id).get(), torch.ones(MIB))


def test_split_frame_views_the_tensor_and_rejoins_exactly() -> None:
    tensor = torch.arange(10_000, dtype=torch.float64)
    frame = encode({"t": tensor})
    chunks = list(split_frame(frame, 4096))
    assert b"".join(chunks) == frame.tobytes()
    assert all(len(c) == 4096 for c in chunks[:-1])
    assert sum(isinstance(c, memoryview) for c in chunks) >= len(chunks) - 2  # views, not copies

    reassembler = Reassembler(max_message_bytes=frame.nbytes)
    whole = None
    for index, chunk in enumerate(chunks):
        assert whole is None
        whole = reassembler.add(("me", "c"), index, len(chunks), frame.nbytes, bytes(chunk))
    assert whole is not None
    assert torch.equal(decode(whole)["t"], tensor)
    assert len(reassembler) == 0


def test_the_reassembler_refuses_what_does_not_fit() -> None:
    reassembler = Reassembler(max_message_bytes=1000)
    with pytest.raises(ProtocolError, match="over this endpoint's limit"):
        reassembler.add(("x", "1"), 0, 2, 10**12, b"a" * 10)
    with pytest.raises(ProtocolError, match="first chunk never came"):
        reassembler.add(("x", "2"), 1, 2, 100, b"a" * 10)
    with pytest.raises(ProtocolError, match="1000000000 chunks cannot make 100 bytes"):
        reassembler.add(("x", "2"), 0, 10**9, 100, b"a" * 10)
    reassembler.add(("x", "3"), 0, 3, 100, b"a" * 40)
    with pytest.raises(ProtocolError, match="does not continue its message"):
        reassembler.add(("x", "3"), 2, 3, 100, b"a" * 40)
    reassembler.add(("x", "4"), 0, 2, 100, b"a" * 50)
    assert reassembler.add(("x", "4"), 0, 2, 100, b"b" * 50) is None  # started over
    whole = reassembler.add(("x", "4"), 1, 2, 100, b"c" * 50)
    assert whole is not None
    assert bytes(whole.tolist()) == b"b" * 50 + b"c" * 50
    reassembler.add(("x", "5"), 0, 3, 100, b"a" * 40, origin="five")
    (dropped,) = reassembler.drop_stale(now=time.monotonic() + 1e6)
    assert (dropped.key, dropped.origin) == (("x", "5"), "five")
    assert "no chunk came" in dropped.reason
    assert reassembler.take_dropped() == [dropped]
    assert reassembler.take_dropped() == []


def test_one_sender_cannot_keep_another_out_of_the_reassembly_budget() -> None:
    reassembler = Reassembler(max_message_bytes=1000)
    # mallory announces the whole budget and sends one chunk of it
    assert reassembler.add(("mallory", "1"), 0, 10, 1000, b"m" * 100, origin="m1") is None
    # bob's message does not fit: mallory holds more than half, so hers goes
    assert reassembler.add(("bob", "1"), 0, 2, 400, b"b" * 200) is None
    (dropped,) = reassembler.take_dropped()
    assert dropped.key == ("mallory", "1") and dropped.origin == "m1"
    assert "more than its share" in dropped.reason
    # mallory starting over cannot take more than her half back
    with pytest.raises(ProtocolError, match="over sender 'mallory''s share"):
        reassembler.add(("mallory", "2"), 0, 10, 1000, b"m" * 100)
    assert reassembler.add(("mallory", "3"), 0, 5, 500, b"m" * 100) is None
    whole = reassembler.add(("bob", "1"), 1, 2, 400, b"c" * 200)
    assert whole is not None and bytes(whole[:2].tolist()) == b"bb"
    assert reassembler.held_by("mallory") == 500


def test_a_large_transfer_reports_its_progress_both_ways(
    session_daemons: WorkerProcesses,
) -> None:
    reports: list[tuple[str, int, int]] = []
    tensor = torch.randn(3 * MIB)  # 12 MiB
    with tr.connect(session_daemons.url, chunk_size=MIB) as fleet:
        fleet.endpoint.progress = lambda what, done, total: reports.append((what, done, total))
        fleet.endpoint.progress_from = 8 * MIB  # (a terminal's bar starts at 256 MiB)
        pointer = tensor.send(fleet.worker("bob"))
        assert torch.equal(pointer.get(), tensor)
        assert not [r for r in reports if r[2] < 8 * MIB]  # small messages say nothing
    sent = [r for r in reports if r[0].endswith(" to bob")]  # (the store, in a batch)
    came = [r for r in reports if r[0] == "fetch from bob"]
    assert len(sent) >= 12  # our 1 MiB chunks; the worker answers in its own 8 MiB ones
    assert len(came) >= 2
    for steps in (sent, came):
        assert [done for _, done, _ in steps] == sorted(done for _, done, _ in steps)
        assert steps[-1][1] == steps[-1][2] >= 12 * MIB  # ends at the whole message


def test_the_terminal_progress_bar_draws_one_line_and_ends_it() -> None:
    stream = io.StringIO()
    bar = TerminalProgress(stream)
    for done in range(0, 513, 64):
        bar("store to bob", done << 20, 512 << 20)
    text = stream.getvalue()
    assert text.startswith("\rstore to bob [")
    assert text.endswith("100%  512/512 MiB  " + text.rsplit("MiB  ", 1)[1])
    assert text.count("\n") == 1
