"""Which function answers which command: `@handles(Fetch)` above the function.

A handler takes the runtime, the command and its sender, and returns the reply's
value — or a coroutine, when it must wait for other workers (it awaits
`worker.ask(...)`; see `_runtime.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from torchrelay.broker import Command, Frame

if TYPE_CHECKING:
    from .._runtime import WorkerRuntime


__all__ = ["HANDLERS", "Encoded", "Handler", "handles"]

Handler = Callable[["WorkerRuntime", Any, str], Any]

HANDLERS: dict[type[Command], Handler] = {}
"""Every command's handler, filled as the modules of this package are imported."""

F = TypeVar("F", bound=Handler)


def handles(command: type[Command]) -> Callable[[F], F]:
    """Register the decorated function as what answers `command`."""

    def register(handler: F) -> F:
        if command in HANDLERS:
            raise RuntimeError(f"{command.__name__} has a handler already: "
                               f"{HANDLERS[command].__module__}")
        HANDLERS[command] = handler
        return handler

    return register


@dataclass(frozen=True, slots=True)
class Encoded:
    """A reply value already encoded (so the handler can act once it surely travels)."""

    frame: Frame
