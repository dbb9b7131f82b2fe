"""torchrelay.client: pointers, and the session that carries their commands."""

from __future__ import annotations

from ._fleet import Fleet, ObjectDescription, WorkerHandle
from ._hook import hook
from ._pointer import OPERATORS, PointerTensor, send

__all__ = [
    "OPERATORS",
    "Fleet",
    "ObjectDescription",
    "PointerTensor",
    "WorkerHandle",
    "hook",
    "send",
]
