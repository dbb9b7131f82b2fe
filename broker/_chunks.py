"""Messages bigger than a broker accepts travel as a sequence of chunks.

RabbitMQ refuses messages over `max_message_size` (128 MiB on 3.x, 16 MiB on
4.x). A frame larger than the chunk size is cut into chunks that view the
frame's own buffers (no copy, except where a chunk straddles two buffers), sent
in order on one channel — so they arrive in order — and written by the receiver
into one preallocated buffer. Memory stays bounded on both ends: the tensor and
one chunk. A message is delivered only once complete; one whose sender stopped
half-way is dropped after a while, never seen half-written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ._codec import Frame, tensor_buffer
from ._errors import ProtocolError
from ._names import DEFAULT_CHUNK_SIZE

__all__ = ["DEFAULT_CHUNK_SIZE", "Dropped", "Reassembler", "split_frame"]



def split_frame(frame: Frame, chunk_size: int) -> Iterator[memoryview | bytes]:
    """The bodies of the chunks of `frame`, each at most `chunk_size` bytes."""
    pending: list[memoryview] = []
    pending_bytes = 0
    for part in frame.parts:
        view = memoryview(part)
        offset = 0
        while offset < view.nbytes:
            take = min(chunk_size - pending_bytes, view.nbytes - offset)
            pending.append(view[offset : offset + take])
            pending_bytes += take
            offset += take
            if pending_bytes == chunk_size:
                yield pending[0] if len(pending) == 1 else b"".join(pending)
                pending, pending_bytes = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else b"".join(pending)


def _uninitialised(size: int) -> torch.Tensor:
    # torch.empty, not bytearray: no zero-filling of memory about to be written.
    return torch.empty(size, dtype=torch.uint8)


@dataclass(slots=True)
class _Assembly:
    buffer: torch.Tensor
    view: memoryview
    count: int
    chunk_size: int
    origin: Any
    next_index: int = 0
    filled: int = 0
    touched: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class Dropped:
    """A message given up half-way: whose, what the caller attached to it, and why."""

    key: tuple[str, str]
    origin: Any
    reason: str


class Reassembler:
    """Collects chunks, keyed by (sender, correlation id), into whole messages.

    Memory for messages still arriving is bounded by `max_message_bytes` in all,
    shared fairly between senders: when a new message does not fit, the senders
    holding more than an equal share lose their messages in progress (newest
    first) until it does, and a sender asking for more than its share is refused.
    So one sender announcing a huge message — honestly or not — cannot keep
    another's transfers out. A message whose chunks stop coming for `stale_after`
    seconds is dropped. Dropped messages wait in `take_dropped` for the caller to
    tell their senders.
    """

    def __init__(
        self,
        max_message_bytes: int,
        stale_after: float = 60.0,
        allocate: Callable[[int], torch.Tensor] | None = None,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.stale_after = stale_after
        self.allocate = allocate or _uninitialised
        """Where messages are assembled: a uint8 tensor of the given size."""
        self._assemblies: dict[tuple[str, str], _Assembly] = {}
        self._dropped: list[Dropped] = []

    def __len__(self) -> int:
        return len(self._assemblies)

    @property
    def bytes_in_progress(self) -> int:
        return sum(len(a.view) for a in self._assemblies.values())

    def held_by(self, sender: str) -> int:
        return sum(len(a.view) for (s, _), a in self._assemblies.items() if s == sender)

    def add(
        self, key: tuple[str, str], index: int, count: int, total: int, body: bytes,
        *, origin: Any = None,
    ) -> torch.Tensor | None:
        """Add one chunk; the whole message (a uint8 tensor) once complete, else None.

        `origin` is kept with the message for `take_dropped`. Raises
        `ProtocolError` (and forgets the message) on chunks that do not fit.
        """
        assembly = self._assemblies.get(key)
        if assembly is None or index == 0:  # index 0 again: the sender started over
            if index != 0:
                raise ProtocolError(f"chunk {index} of a message whose first chunk never came")
            self._assemblies.pop(key, None)
            assembly = self._start(key, count, total, len(body), origin)
        end = assembly.filled + len(body)
        expected_size = assembly.chunk_size if index < count - 1 else len(assembly.view) - (
            assembly.filled)
        if (index != assembly.next_index or count != assembly.count
                or len(body) != expected_size or end > len(assembly.view)):
            del self._assemblies[key]
            raise ProtocolError(
                f"chunk {index}/{count} of {len(body)} bytes does not continue its message "
                f"(expected chunk {assembly.next_index}/{assembly.count} at byte "
                f"{assembly.filled} of {len(assembly.view)})"
            )
        assembly.view[assembly.filled : end] = body
        assembly.filled = end
        assembly.next_index += 1
        assembly.touched = time.monotonic()
        if assembly.next_index < count:
            return None
        del self._assemblies[key]
        return assembly.buffer

    def _start(
        self, key: tuple[str, str], count: int, total: int, chunk_size: int, origin: Any
    ) -> _Assembly:
        if not 0 < total <= self.max_message_bytes:
            raise ProtocolError(
                f"a message of {total} bytes is over this endpoint's limit of "
                f"{self.max_message_bytes}"
            )
        # Every chunk but the last has the first one's size: the count follows.
        if chunk_size < 1 or count != -(-total // chunk_size):
            raise ProtocolError(
                f"{count} chunks cannot make {total} bytes in chunks of {chunk_size}"
            )
        self._make_room(key[0], total)
        buffer = self.allocate(total)
        assembly = _Assembly(buffer, tensor_buffer(buffer), count, chunk_size, origin)
        self._assemblies[key] = assembly
        return assembly

    def _make_room(self, sender: str, size: int) -> None:
        """Make room for `size` more bytes from `sender`, at other senders' expense only
        if they hold more than their share; raise `ProtocolError` if it cannot."""
        free = self.max_message_bytes - self.bytes_in_progress
        if size <= free:
            return
        senders = {s for s, _ in self._assemblies} | {sender}
        share = self.max_message_bytes // len(senders)
        if self.held_by(sender) + size > share:
            raise ProtocolError(
                f"a message of {size} bytes is over sender {sender!r}'s share of this "
                f"endpoint's {self.max_message_bytes} bytes for messages still arriving "
                f"({share} while {len(senders)} senders send)"
            )
        for other in sorted(senders - {sender}, key=self.held_by, reverse=True):
            theirs = sorted((k for k in self._assemblies if k[0] == other),
                            key=lambda k: self._assemblies[k].touched, reverse=True)
            for key in theirs:
                if free >= size or self.held_by(other) <= share:
                    break
                assembly = self._assemblies.pop(key)
                free += len(assembly.view)
                self._dropped.append(Dropped(
                    key, assembly.origin,
                    f"dropped half-way: sender {other!r} held more than its share of the "
                    "memory for messages still arriving when another sender needed it",
                ))
            if free >= size:
                return
        raise ProtocolError(f"no room for a message of {size} bytes from {sender!r}")

    def drop_stale(self, now: float | None = None) -> list[Dropped]:
        """Forget messages whose sender went quiet half-way (also kept for `take_dropped`)."""
        now = time.monotonic() if now is None else now
        stale = [k for k, a in self._assemblies.items() if now - a.touched > self.stale_after]
        dropped = [
            Dropped(key, self._assemblies.pop(key).origin,
                    f"dropped half-way: no chunk came for {self.stale_after:g} s")
            for key in stale
        ]
        self._dropped += dropped
        return dropped

    def take_dropped(self) -> list[Dropped]:
        """The messages dropped since the last call, for their senders to be told."""
        dropped, self._dropped = self._dropped, []
        return dropped
