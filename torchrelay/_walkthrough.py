"""PySyft's "Advanced Remote Execution Tools" walkthrough, cell by cell, checked.

Every cell prints what the notebook printed, and after every cell the workers'
stores are compared with what the notebook showed (same objects, same pointer
structure; ids are random, so they are matched up, not compared literally).
`torchrelay demo` runs it; the test suite runs it on both brokers.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from torchrelay.client import Fleet, ObjectDescription, PointerTensor, WorkerHandle, hook

__all__ = ["WalkthroughMismatch", "run_walkthrough"]

_POINTER = re.compile(r"^\[PointerTensor \| (\w+):(\d+) -> (\w+):(\d+)\]$")


class WalkthroughMismatch(AssertionError):
    """A store or a value differs from what the walkthrough shows."""


def run_walkthrough(fleet: Fleet, echo: Callable[[str], None] = print) -> None:
    """Run the walkthrough on `fleet`'s workers `bob` and `alice` (both must start empty)."""
    hook(torch)
    bob = fleet.worker("bob")
    alice = fleet.worker("alice")
    me = fleet.name  # who the pointers say holds them: "me" unless the user says otherwise
    cell = _Cells(echo)

    cell.heading("Section 3.1 - Pointers to Pointers")
    _expect_empty(bob, alice)
    x = torch.tensor([1, 2, 3, 4])
    cell.show("x = torch.tensor([1,2,3,4])\nx", x)

    x_ptr: PointerTensor = x.send(bob)  # type: ignore[attr-defined]
    cell.show("x_ptr = x.send(bob)\nx_ptr", x_ptr)
    _expect(repr(x_ptr) == f"[PointerTensor | {me}:{x_ptr.id} -> bob:{x_ptr.id_at_location}]",
            f"x_ptr is {x_ptr!r}")

    pointer_to_x_ptr = x_ptr.send(alice)
    cell.show("pointer_to_x_ptr = x_ptr.send(alice)\npointer_to_x_ptr", pointer_to_x_ptr)
    _expect(pointer_to_x_ptr.location is alice and pointer_to_x_ptr.id_at_location == x_ptr.id,
            f"pointer_to_x_ptr is {pointer_to_x_ptr!r}")

    _check_store(cell, "bob", bob, {x_ptr.id_at_location: "tensor([1, 2, 3, 4])"})
    _check_store(cell, "alice", alice, {
        x_ptr.id: f"[PointerTensor | alice:{x_ptr.id} -> bob:{x_ptr.id_at_location}]",
    })

    bob_id = x_ptr.id_at_location
    x_ptr = pointer_to_x_ptr.get()
    cell.show("x_ptr = pointer_to_x_ptr.get()\nx_ptr", x_ptr)
    expected = f"[PointerTensor | {me}:{pointer_to_x_ptr.id_at_location} -> bob:{bob_id}]"
    _expect(repr(x_ptr) == expected, f"x_ptr is {x_ptr!r}")

    x = x_ptr.get()
    cell.show("x = x_ptr.get()\nx", x)
    _expect(torch.equal(x, torch.tensor([1, 2, 3, 4])), f"x is {x!r}")
    _check_store(cell, "bob", bob, {})
    _check_store(cell, "alice", alice, {})

    cell.heading("Arithmetic on Pointer -> Pointer -> Data Object")
    p2p2x = torch.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)  # type: ignore[attr-defined]
    y = p2p2x + p2p2x
    cell.note("p2p2x = torch.tensor([1,2,3,4,5]).send(bob).send(alice)\ny = p2p2x + p2p2x")
    bob_objects = _check_store(cell, "bob", bob, None)
    alice_objects = _check_store(cell, "alice", alice, None)
    x_at_bob = _target(alice_objects, p2p2x.id_at_location, "alice", "bob")
    y_at_bob = _target(alice_objects, y.id_at_location, "alice", "bob")
    _expect_same(bob_objects, {x_at_bob: "tensor([1, 2, 3, 4, 5])",
                               y_at_bob: "tensor([ 2,  4,  6,  8, 10])"}, "bob")
    _expect(len(alice_objects) == 2, f"alice holds {alice_objects}")

    y_value = y.get().get()
    cell.show("y.get().get()", y_value)
    _expect(torch.equal(y_value, torch.tensor([2, 4, 6, 8, 10])), f"y is {y_value!r}")
    _check_store(cell, "bob", bob, {x_at_bob: "tensor([1, 2, 3, 4, 5])"})
    _check_store(cell, "alice", alice, {
        p2p2x.id_at_location:
            f"[PointerTensor | alice:{p2p2x.id_at_location} -> bob:{x_at_bob}]",
    })

    x_value = p2p2x.get().get()
    cell.show("p2p2x.get().get()", x_value)
    _expect(torch.equal(x_value, torch.tensor([1, 2, 3, 4, 5])), f"p2p2x is {x_value!r}")
    _check_store(cell, "bob", bob, {})
    _check_store(cell, "alice", alice, {})

    cell.heading("Section 3.2 - Pointer Chain Operations")
    x_ptr = torch.tensor([1, 2, 3, 4, 5]).send(bob)  # type: ignore[attr-defined]
    cell.note("x = torch.tensor([1,2,3,4,5]).send(bob)")
    _check_store(cell, "bob", bob, {x_ptr.id_at_location: "tensor([1, 2, 3, 4, 5])"})
    _check_store(cell, "alice", alice, {})

    x_ptr = x_ptr.move(alice)
    cell.note("x = x.move(alice)")
    _check_store(cell, "bob", bob, {})
    _check_store(cell, "alice", alice, {x_ptr.id_at_location: "tensor([1, 2, 3, 4, 5])"})
    cell.show("x", x_ptr)
    _expect(repr(x_ptr) == f"[PointerTensor | {me}:{x_ptr.id} -> alice:{x_ptr.id_at_location}]",
            f"x is {x_ptr!r}")

    del x_ptr  # its last pointer gone, alice's copy is garbage collected
    fleet.sync()
    _check_store(cell, "alice", alice, {})


class _Cells:
    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.number = 0

    def heading(self, title: str) -> None:
        self.echo(f"\n# {title}\n")

    def note(self, source: str) -> None:
        self.number += 1
        self.echo(f"In [{self.number}]:\n{source}\n")

    def show(self, source: str, value: object) -> None:
        self.note(source)
        self.echo(f"{value!r}\n")


def _check_store(
    cell: _Cells, name: str, worker: WorkerHandle, expected: dict[int, str] | None
) -> dict[int, str]:
    snapshot = _session_objects(worker)
    cell.show(f"{name}._objects", snapshot)
    objects = {k: str(v) for k, v in snapshot.items()}
    if expected is not None:
        _expect_same(objects, expected, name)
    return objects


def _target(objects: dict[int, str], key: int, owner: str, location: str) -> int:
    match = _POINTER.match(objects.get(key, ""))
    _expect(match is not None and match.group(1) == owner and match.group(3) == location
            and int(match.group(2)) == key, f"{owner} holds no pointer {key} to {location}")
    assert match is not None
    return int(match.group(4))


def _expect_same(actual: dict[int, str], expected: dict[int, str], name: str) -> None:
    _expect(actual == expected, f"{name}._objects is {actual}, expected {expected}")


def _expect_empty(*workers: WorkerHandle) -> None:
    for worker in workers:
        objects = _session_objects(worker)
        _expect(not objects, f"{worker.id} is not empty: {objects}")


def _session_objects(worker: WorkerHandle) -> dict[int, ObjectDescription]:
    """`worker._objects` without the datasets the worker offers itself (a fleet started
    from configs/ has some): what the notebook's cells put there."""
    return {k: v for k, v in worker._objects.items() if not v.startswith("<Dataset ")}


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise WalkthroughMismatch(message)
