"""The two kinds of reference that travel inside messages."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["ObjectRef", "PointerRef", "format_pointer", "new_object_id"]

OBJECT_ID_BITS = 53
"""Ids are random: chosen by whoever creates the object, with no coordination.
53 bits stay exact as JSON/JavaScript numbers, so monitoring tools show them
faithfully; a store refuses a colliding id, and with a million live objects one
new id in ten billion would collide."""


def new_object_id(rng: random.Random) -> int:
    return rng.getrandbits(OBJECT_ID_BITS)


@dataclass(slots=True)  # not frozen: made for every argument of every call
class ObjectRef:
    """"The object stored under `id` on the worker that receives this message."

    Used for the arguments of remote calls: the caller already knows where the
    object lives, because that is where it sends the call.
    """

    id: int


@dataclass(frozen=True, slots=True)
class PointerRef:
    """A pointer as a value: the object stored under `id_at_location` on `location`.

    Sending a pointer hands over the duty to delete its target: whoever stores
    a `PointerRef` owns the remote object from then on.
    """

    location: str
    id_at_location: int


def format_pointer(owner: str, own_id: int, location: str, id_at_location: int) -> str:
    """The one spelling of a pointer, shared by the client and the workers' stores."""
    return f"[PointerTensor | {owner}:{own_id} -> {location}:{id_at_location}]"
