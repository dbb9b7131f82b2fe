"""What a call that waits costs, and what it sees: one round trip, every earlier effect,
earlier failures first, metadata answered locally."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from conftest import Recorder

import torchrelay as tr
from torchrelay.broker import Status, Transfer

tr.hook(torch)


def test_get_behind_an_operation_costs_one_round_trip(
    fleet: tr.Fleet, bob: tr.WorkerHandle, recorder: Recorder
) -> None:
    x = torch.tensor([1.0, 2.0]).send(bob)
    y = x * 3
    fleet.sync()
    recorder.clear()

    y += 1
    assert torch.equal(y.get(), torch.tensor([4.0, 7.0]))

    # One message each way: the fetch goes with the operation, the replies together.
    assert recorder.messages == ["send call + fetch to bob", "receive call.reply + fetch.reply"]
    x.get()


def test_get_of_the_operation_just_posted_is_one_command(
    fleet: tr.Fleet, bob: tr.WorkerHandle, recorder: Recorder
) -> None:
    x = _sent(torch.tensor([1.0, 2.0]), bob, recorder)

    assert torch.equal((x + x).get(), torch.tensor([2.0, 4.0]))

    # The call that makes the result, still waiting to go, goes as that call fetching
    # it: one command, and nothing left on bob but x.
    assert recorder.messages == ["send call to bob", "receive call.reply"]
    assert list(bob._objects) == [x.id_at_location]
    recorder.clear()
    y = x * 2
    fleet.sync()  # gone already: fetched as a fetch
    assert torch.equal(y.get(), torch.tensor([2.0, 4.0]))
    assert recorder.messages == ["send call to bob", "receive call.reply", "send fetch to bob",
                                 "receive fetch.reply"]
    x.get()


def test_a_get_whose_operation_fails_raises_its_error_and_leaves_nothing(
    fleet: tr.Fleet, bob: tr.WorkerHandle, recorder: Recorder
) -> None:
    x = _sent(torch.tensor([1.0, 2.0]), bob, recorder)

    with pytest.raises(tr.RemoteError, match=r"call Tensor\.view and fetch its result failed "
                       r"on worker 'bob': RuntimeError: shape '\[5, 5\]' is invalid") as caught:
        x.view(5, 5).get()

    assert caught.value.operation == "call Tensor.view and fetch its result"
    assert recorder.messages == ["send call to bob", "receive call.reply"]
    assert list(bob._objects) == [x.id_at_location]
    assert torch.equal(x.get(), torch.tensor([1.0, 2.0]))


def test_a_get_of_an_operation_on_pointers_dead_since_finds_them(
    fleet: tr.Fleet, bob: tr.WorkerHandle, recorder: Recorder
) -> None:
    x = torch.tensor([1.0, 2.0]).send(bob)
    parts = [x * 2, x * 3]
    fleet.sync()
    joined = torch.cat(parts)
    del parts  # its pointers die after the call was posted: they are its arguments
    recorder.clear()

    assert torch.equal(joined.get(), torch.tensor([2.0, 4.0, 3.0, 6.0]))

    # Garbage is deleted before the command it rides with: theirs waits for the next.
    assert (recorder.messages, recorder.garbage) == (
        ["send call to bob", "receive call.reply"], [])
    assert list(bob._objects) == [x.id_at_location]  # (a listing deletes garbage first)
    x.get()


def test_a_get_behind_a_failure_already_in_raises_it_and_destroys_nothing(
    fleet: tr.Fleet, bob: tr.WorkerHandle
) -> None:
    x = torch.tensor([1.0, 2.0]).send(bob)
    y = x * 10
    x.view(5, 5)  # fails on bob, nobody waits for it
    fleet.workers()  # takes its reply, and raises nothing

    with pytest.raises(tr.RemoteError, match=r"call Tensor\.view failed"):
        y.get()  # not sent: it would fetch, and lose, y behind the failure

    assert torch.equal(y.get(), torch.tensor([10.0, 20.0]))
    x.get()


def test_a_get_of_an_operation_down_a_chain_the_client_did_not_know_of_gets_a_pointer(
    fleet: tr.Fleet, bob: tr.WorkerHandle, alice: tr.WorkerHandle, recorder: Recorder
) -> None:
    chain = torch.tensor([1.0]).send(bob).send(alice)
    fleet.sync()
    found = tr.PointerTensor(alice, chain.id_at_location)  # as if found, not sent on
    found.garbage_collect = False  # (chain's)
    recorder.clear()

    got = (found + 1).get()  # one command: alice forwards the call, then fetches its result

    assert recorder.messages == ["send call to alice", "receive call.reply"]
    assert isinstance(got, tr.PointerTensor) and got.location is bob
    assert torch.equal(got.get(), torch.tensor([2.0]))
    assert torch.equal(chain.get().get(), torch.tensor([1.0]))


def test_a_wait_behind_a_chain_or_another_worker_collects_first(
    fleet: tr.Fleet, bob: tr.WorkerHandle, alice: tr.WorkerHandle, recorder: Recorder
) -> None:
    chain = torch.tensor([1.0]).send(bob).send(alice)
    other = torch.tensor([5.0]).send(bob)
    fleet.sync()
    recorder.clear()

    doubled = chain * 2  # forwarded by alice to bob: it does not settle in order on alice
    on_alice = doubled.get()
    assert recorder.messages == ["send call to alice", "receive call.reply",
                                 "send fetch to alice", "receive fetch.reply"]
    recorder.clear()

    other += 1  # to bob; the fetch goes to alice
    data = chain.get()
    assert recorder.messages == ["send call to bob", "receive call.reply", "send fetch to alice",
                                 "receive fetch.reply"]
    assert torch.equal(on_alice.get(), torch.tensor([2.0]))
    assert torch.equal(other.get(), torch.tensor([6.0]))
    assert torch.equal(data.get(), torch.tensor([1.0]))


def test_a_get_behind_a_failure_raises_it_and_destroys_nothing(
    fleet: tr.Fleet, bob: tr.WorkerHandle, recorder: Recorder
) -> None:
    x = _sent(torch.tensor([1.0, 2.0]), bob, recorder)

    x.view(5, 5)  # fails on bob, nobody waits for it
    with pytest.raises(tr.RemoteError, match=r"call Tensor\.view failed") as caught:
        x.get()  # published right behind it: bob refuses to run it

    assert caught.value.operation == "call Tensor.view"
    assert recorder.messages[0] == "send call + fetch to bob"
    assert x.garbage_collect
    assert bob._objects[x.id_at_location] == "tensor([1., 2.])"
    assert torch.equal(x.get(), torch.tensor([1.0, 2.0]))


def test_a_move_behind_a_failure_moves_nothing(
    fleet: tr.Fleet, bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    x = torch.tensor([3.0]).send(bob)
    x.view(3, 3)  # fails: one element is no 3x3 matrix
    with pytest.raises(tr.RemoteError, match=r"call Tensor\.view"):
        x.move(alice)
    assert list(bob._objects) == [x.id_at_location]
    assert alice._objects == {}
    assert torch.equal(x.move(alice).get(), torch.tensor([3.0]))


def test_a_thousand_failures_name_the_first_and_count_the_rest(
    fleet: tr.Fleet, bob: tr.WorkerHandle
) -> None:
    x = torch.tensor([1.0, 2.0]).send(bob)
    for size in range(3, 1003):
        x.view(size)
    with pytest.raises(tr.RemoteError, match=r"shape '\[3\]' is invalid") as caught:
        fleet.sync()
    notes = "\n".join(caught.value.__notes__)
    assert notes.startswith("999 later operations failed too, the first of them: ")
    assert "shape '[4]'" in notes
    assert len(notes) < 1000
    x.get()


def test_metadata_answers_locally_and_is_asked_for_once(
    fleet: tr.Fleet, bob: tr.WorkerHandle, recorder: Recorder
) -> None:
    sent = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True).send(bob)
    fleet.sync()
    recorder.clear()
    assert (sent.shape, sent.dtype) == (torch.Size([2, 3]), torch.float64)
    assert recorder.events == []  # what was sent is known without asking

    x = sent * 1  # a result: asked for once
    fleet.sync()
    recorder.clear()
    assert x.shape == torch.Size([2, 3])
    assert x.dtype is torch.float64
    assert (x.ndim, x.dim(), x.size(), x.size(1), x.numel(), len(x)) == (
        2, 2, torch.Size([2, 3]), 3, 6, 2)
    assert x.requires_grad is True
    assert x.device == torch.device("cpu")
    assert x.element_size() == 8 and x.is_floating_point() and not x.is_complex()
    assert recorder.events == ["send meta to bob", "receive meta.reply"]

    x.detach_().t_()  # changes requires_grad and shape: asked for again
    assert (x.shape, x.requires_grad) == (torch.Size([3, 2]), False)
    assert recorder.events.count("send meta to bob") == 2
    x.get(), sent.get()


def test_metadata_follows_a_chain_and_refuses_what_is_no_tensor(
    bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    chain = torch.ones(4, 1, dtype=torch.int8).send(bob).send(alice)
    assert (chain.shape, chain.dtype) == (torch.Size([4, 1]), torch.int8)
    pair = tr.client.send((1, 2), bob)
    with pytest.raises(tr.RemoteError, match="is a tuple, not a tensor"):
        pair.shape
    with pytest.raises(TypeError, match="0-d"):
        len(torch.tensor(1.0).send(bob))
    assert [row.get().tolist() for row in torch.tensor([[1], [2]]).send(bob)] == [[1], [2]]
    chain.get().get(), pair.get()


def test_posted_commands_travel_in_batches(
    fleet: tr.Fleet, bob: tr.WorkerHandle, alice: tr.WorkerHandle, recorder: Recorder
) -> None:
    x = torch.zeros(1).send(bob)
    y = torch.zeros(1).send(alice)
    fleet.sync()
    recorder.clear()

    for _ in range(300):
        x += 1
    y += 1  # to another worker: what is queued for bob goes first
    x += 1
    fleet.sync()

    sent = [m for m in recorder.messages if m.startswith("send")]
    to_alice = sent.index("send call to alice")
    before, after = sent[:to_alice], sent[to_alice + 1:]
    assert all(m.endswith("to bob") for m in before + after)
    # (A background publisher may send part of a burst early: how the 300 are cut
    # depends on the machine's speed; that they travel together does not.)
    counts = [m.count("call") for m in before]
    assert sum(counts) == 300 and max(counts) > 1 and max(counts) <= 256
    assert after == ["send call to bob"]
    assert len(recorder.events) == 2 * 302  # every command answered
    assert x.get().item() == 301 and y.get().item() == 1


def test_a_posted_command_goes_without_a_wait_even_after_a_run_of_prompt_waits(
    fleet: tr.Fleet, bob: tr.WorkerHandle, recorder: Recorder
) -> None:
    if fleet.endpoint.in_process:
        pytest.skip("in-process workers run only while the script waits anyway")
    x = torch.zeros(1).send(bob)
    for _ in range(50):  # the background publisher finds nothing late: it looks less often
        x += 1
        fleet.sync()
    recorder.clear()

    x += 1  # and the script computes locally, never waiting: the command goes all the same
    deadline = time.monotonic() + 20  # (a bound on a hang, not a speed)
    while not recorder.messages and time.monotonic() < deadline:
        time.sleep(0.001)
    assert recorder.messages == ["send call to bob"]
    assert x.get().item() == 51


def test_a_batch_s_answers_wait_for_its_move_and_come_back_with_its_answer(
    fleet: tr.Fleet, bob: tr.WorkerHandle, alice: tr.WorkerHandle, recorder: Recorder
) -> None:
    x = torch.zeros(3).send(bob)
    fleet.sync()
    recorder.clear()

    # (Sent as one batch whatever the machine's speed: posted commands could leave in
    # two messages, were the background publisher to look between them.)
    moved_id = fleet.new_id()
    status, _ = fleet.request_many([(bob.id, Status()),
                                    (bob.id, Transfer(x.id_at_location, alice.id, moved_id))])

    # One message each way: bob holds the answer to the status until alice has the copy,
    # and sends both together (not two messages, one per moment).
    assert recorder.messages == ["send status + transfer to bob",
                                 "receive status.reply + transfer.reply"]
    assert status["id"] == "bob"
    x.garbage_collect = False  # (moved: alice has it now)
    assert tr.PointerTensor(alice, moved_id).get().tolist() == [0.0, 0.0, 0.0]


def _sent(tensor: torch.Tensor, worker: tr.WorkerHandle, recorder: Recorder) -> Any:
    """`tensor` sent to `worker`, stored there, and the traffic so far forgotten."""
    pointer = tensor.send(worker)
    worker.fleet.sync()
    recorder.clear()
    return pointer
