"""Garbage collection: a remote object lives exactly as long as the pointer that owns it."""

from __future__ import annotations

import gc

import torch
from conftest import Recorder

import torchrelay as tr
from torchrelay.broker import Delete, Store
from torchrelay.worker import WorkerProcesses

tr.hook(torch)


def test_dropping_the_last_pointer_deletes_the_remote_object(
    fleet: tr.Fleet, bob: tr.WorkerHandle
) -> None:
    pointer = torch.tensor([1, 2]).send(bob)
    remote_id = pointer.id_at_location
    assert remote_id in bob._objects

    del pointer
    gc.collect()

    assert remote_id not in bob._objects


def test_dropping_a_chain_deletes_every_hop(
    fleet: tr.Fleet, bob: tr.WorkerHandle, alice: tr.WorkerHandle, carol: tr.WorkerHandle
) -> None:
    data = torch.tensor([1.0]).send(bob)
    data_id = data.id_at_location
    chain = data.send(alice).send(carol)
    result = chain + chain  # a result pointer on carol and alice, data on bob
    del data

    del chain, result
    gc.collect()

    assert bob._objects == {} and alice._objects == {} and carol._objects == {}
    assert data_id not in bob._objects


def test_a_pointer_sent_on_hands_over_its_duty(
    fleet: tr.Fleet, bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    x_ptr = torch.tensor([3]).send(bob)
    remote_id = x_ptr.id_at_location
    to_ptr = x_ptr.send(alice)

    del x_ptr  # no longer the owner: the data must stay
    gc.collect()
    assert remote_id in bob._objects

    del to_ptr  # the owner: alice's pointer goes, and with it bob's data
    gc.collect()
    assert remote_id not in bob._objects
    assert alice._objects == {}


def test_get_removes_the_remote_object_and_the_duty(
    fleet: tr.Fleet, bob: tr.WorkerHandle, recorder: Recorder
) -> None:
    pointer = torch.tensor([4]).send(bob)
    remote_id = pointer.id_at_location
    pointer.get()
    assert pointer.garbage_collect is False
    recorder.clear()

    del pointer
    gc.collect()
    bob._objects  # sends every delete still waiting, alone or riding along

    assert recorder.events == ["send describe to bob", "receive describe.reply"]
    assert remote_id not in recorder.garbage


def test_move_leaves_the_old_pointer_without_a_duty(
    fleet: tr.Fleet, bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    x = torch.tensor([5]).send(bob)
    moved = x.move(alice)
    del x
    gc.collect()
    assert list(alice._objects) == [moved.id_at_location]
    del moved
    gc.collect()
    assert alice._objects == {}


def test_closing_a_session_deletes_what_its_pointers_own(session_daemons: WorkerProcesses) -> None:
    # Needs a second, independent session to look: RabbitMQ only.
    with tr.connect(session_daemons.url) as observer:
        bob = observer.worker("bob")
        before = set(bob._objects)
        session = tr.connect(session_daemons.url)
        kept = torch.tensor([1]).send(session.worker("bob"))
        session.sync()  # stored before the other session looks
        assert kept.id_at_location in set(bob._objects) - before

        session.close()

        assert set(bob._objects) == before


def test_what_arrives_after_its_delete_is_dropped(fleet: tr.Fleet, bob: tr.WorkerHandle) -> None:
    # A transfer given up on (a straggler left out of a round) may land after its
    # pointer died and the delete went out: the delete overtook it.
    late = fleet.new_id()
    fleet.request("bob", Delete([late]))
    fleet.request("bob", Store(late, torch.ones(3)))
    assert late not in bob._objects
    fleet.request("bob", Store(late, torch.ones(3)))  # only once: the id is not taboo
    tr.PointerTensor(bob, late).get()
