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
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ._codec import Frame, tensor_buffer
from ._errors import ProtocolError

__all__ = ["DEFAULT_CHUNK_SIZE", "Reassembler", "split_frame"]

DEFAULT_CHUNK_SIZE = 8 << 20
"""Half of RabbitMQ 4's 16 MiB limit: room for properties, and few messages per GiB."""


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


@dataclass(slots=True)
class _Assembly:
    buffer: torch.Tensor
    view: memoryview
    count: int
    next_index: int = 0
    filled: int = 0
    touched: float = field(default_factory=time.monotonic)


class Reassembler:
    """Collects chunks, keyed by (sender, correlation id), into whole messages."""

    def __init__(self, max_message_bytes: int, stale_after: float = 120.0) -> None:
        """`max_message_bytes` bounds every message, and all of them still arriving."""
        self.max_message_bytes = max_message_bytes
        self.stale_after = stale_after
        self._assemblies: dict[tuple[str, str], _Assembly] = {}

    def __len__(self) -> int:
        return len(self._assemblies)

    @property
    def bytes_in_progress(self) -> int:
        return sum(len(a.view) for a in self._assemblies.values())

    def add(
        self, key: tuple[str, str], index: int, count: int, total: int, body: bytes
    ) -> torch.Tensor | None:
        """Add one chunk; the whole message (a uint8 tensor) once complete, else None.

        Raises `ProtocolError` (and forgets the message) on chunks that do not fit.
        """
        assembly = self._assemblies.get(key)
        if assembly is None or index == 0:  # index 0 again: the sender started over
            if index != 0:
                raise ProtocolError(f"chunk {index} of a message whose first chunk never came")
            if key in self._assemblies:
                del self._assemblies[key]
            if not 0 < total <= self.max_message_bytes - self.bytes_in_progress:
                raise ProtocolError(
                    f"a message of {total} bytes is over this endpoint's limit of "
                    f"{self.max_message_bytes} (of which {self.bytes_in_progress} are taken "
                    "by messages still arriving)"
                )
            if count < 1:
                raise ProtocolError(f"a chunked message cannot have {count} chunks")
            # torch.empty, not bytearray: no zero-filling of memory about to be written.
            buffer = torch.empty(total, dtype=torch.uint8)
            assembly = _Assembly(buffer, tensor_buffer(buffer), count)
            self._assemblies[key] = assembly
        end = assembly.filled + len(body)
        if index != assembly.next_index or count != assembly.count or end > len(assembly.view):
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
        if end != len(assembly.view):
            raise ProtocolError(f"message ended after {end} of {len(assembly.view)} bytes")
        return assembly.buffer

    def drop_stale(self, now: float | None = None) -> list[tuple[str, str]]:
        """Forget messages whose sender went quiet half-way; their keys."""
        now = time.monotonic() if now is None else now
        stale = [k for k, a in self._assemblies.items() if now - a.touched > self.stale_after]
        for key in stale:
            del self._assemblies[key]
        return stale
