"""The supervisor's copy of a worker's objects, so they outlive the executor.

After each command the executor appends to a ring in shared memory what the
command changed: new and changed storages, the objects that view them, deletions
(`_executor.py` writes; `MirrorCopy` reads). The supervisor drains the ring on
its regular tick, so keeping the copy costs the executor no system call and wakes
nobody. Storages larger than `SHARED_FROM` bytes are not copied at all: the
executor moves them into shared memory once and hands the supervisor their file
descriptor, so both map the same pages and in-place changes cost nothing more.

When an executor dies, the supervisor hands the next one a snapshot of the copy
(a memfd of records) and the descriptors of the shared storages; it rebuilds the
objects from them before serving.

One ring entry holds one command's records and is applied whole; the records'
format is `_mirror_codec.py`'s.

No torch here: the supervisor imports this module.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from ._mirror_codec import (
    DeleteRecord,
    ParkedRecord,
    ProvenanceRecord,
    StorageRecord,
    TensorRecord,
    ValueRecord,
    parked_record,
    read_records,
    storage_record,
)

__all__ = ["SHARED_FROM", "MirrorCopy", "Ring", "Snapshot"]

SHARED_FROM: Final = 64 << 10
"""Storages of more bytes than this are shared (mapped by both processes), not copied."""

KEY: Final = struct.Struct("<Q")
"""A shared storage's key, as the message that carries its descriptor holds it."""


class Ring:
    """A single-producer, single-consumer queue of byte strings in a shared memfd.

    Header: u64 head (bytes ever written, by the producer), u64 tail (bytes ever
    read, by the consumer). Entries are `<u32 length><payload>`, never split at
    the end: one that would be is preceded by a wrap marker (0xFFFFFFFF).
    """

    HEADER: Final = 64
    _U64: Final = struct.Struct("<Q")
    _LENGTH: Final = struct.Struct("<I")
    _WRAP: Final = 0xFFFFFFFF

    def __init__(self, fd: int, capacity: int) -> None:
        self.capacity = capacity
        self._map = mmap.mmap(fd, self.HEADER + capacity)
        self._head = self._U64.unpack_from(self._map, 0)[0]

    @classmethod
    def create(cls, capacity: int) -> int:
        fd = os.memfd_create("torchrelay-mirror", os.MFD_CLOEXEC)
        os.ftruncate(fd, cls.HEADER + capacity)
        return fd

    def append(self, payload: bytes) -> bool:
        """Queue `payload`; False if it does not fit now (the consumer is behind)."""
        page, capacity = self._map, self.capacity
        need = 4 + len(payload)
        head, tail = self._head, self._U64.unpack_from(page, 8)[0]
        position = head % capacity
        if position + need > capacity:  # no room before the end: wrap
            pad = capacity - position
            if head + pad + need - tail > capacity:
                return False
            if pad >= 4:
                self._LENGTH.pack_into(page, self.HEADER + position, self._WRAP)
            head += pad
            position = 0
        elif head + need - tail > capacity:
            return False
        start = self.HEADER + position
        self._LENGTH.pack_into(page, start, len(payload))
        page[start + 4 : start + need] = payload
        self._head = head + need
        self._U64.pack_into(page, 0, self._head)  # publish: x86 keeps the stores in order
        return True

    def drain(self) -> Iterator[bytes]:
        """Every entry queued so far, oldest first."""
        page, capacity = self._map, self.capacity
        head, tail = self._U64.unpack_from(page, 0)[0], self._U64.unpack_from(page, 8)[0]
        while tail < head:
            position = tail % capacity
            if capacity - position < 4:
                tail += capacity - position
                continue
            (length,) = self._LENGTH.unpack_from(page, self.HEADER + position)
            if length == self._WRAP:
                tail += capacity - position
                continue
            start = self.HEADER + position + 4
            entry = bytes(page[start : start + length])
            tail += 4 + length
            self._U64.pack_into(page, 8, tail)
            yield entry


@dataclass
class Snapshot:
    """What a new executor is given: a memfd of records, and shared storages' descriptors."""

    fd: int
    length: int
    shared: list[tuple[int, int, int]]  # (descriptor, storage key, bytes)


@dataclass
class MirrorCopy:
    """The supervisor's copy: storages by key (bytes, or a shared descriptor), and the
    records of the objects that view them."""

    storages: dict[int, bytes] = field(default_factory=dict)
    shared: dict[int, tuple[int, int]] = field(default_factory=dict)  # key -> (fd, bytes)
    objects: dict[int, tuple[bytes, int | None]] = field(default_factory=dict)
    provenances: dict[int, bytes] = field(default_factory=dict)
    users: dict[int, int] = field(default_factory=dict)  # storage key -> objects viewing it
    arriving: dict[int, list[int]] = field(default_factory=dict)  # key -> fds not yet recorded
    parked: dict[bytes, bytes] = field(default_factory=dict)  # command key -> payload
    largest_key: int = 0
    channel: socket.socket | None = None
    """Where the executor sends the descriptors of the storages it shares."""

    def __len__(self) -> int:
        return len(self.objects)

    def receive_descriptors(self) -> None:
        """Take the descriptors of newly shared storages waiting on the channel."""
        while self.channel is not None:
            try:
                message, fds, _, _ = socket.recv_fds(self.channel, 8 * 16, 16)
            except (BlockingIOError, InterruptedError):
                return
            if not message:
                return
            for index, fd in enumerate(fds):
                (key,) = KEY.unpack_from(message, 8 * index)
                self.arriving.setdefault(key, []).append(fd)

    def apply(self, entry: bytes) -> None:
        """Apply one command's records."""
        for record in read_records(memoryview(entry)):
            match record:
                case StorageRecord(key=key, shared=False):
                    self._drop_shared(key)
                    self.storages[key] = record.data
                    self.largest_key = max(self.largest_key, key)
                case StorageRecord(key=key):
                    if key not in self.arriving:  # sent before the entry: it is waiting
                        self.receive_descriptors()
                    fds = self.arriving.get(key)
                    if fds:
                        self.storages.pop(key, None)
                        self._drop_shared(key)
                        self.shared[key] = (fds.pop(0), record.size)
                        if not fds:
                            del self.arriving[key]
                    self.largest_key = max(self.largest_key, key)
                case TensorRecord():
                    self._set(record.object_id, record.record, record.key)
                case ValueRecord():
                    self._set(record.object_id, record.record, None)
                case ProvenanceRecord():
                    self.provenances[record.provenance_id] = record.record
                case DeleteRecord():
                    self._forget(record.object_id)
                case ParkedRecord(payload=None):
                    self.parked.pop(record.key, None)
                case ParkedRecord(payload=bytes() as payload):
                    self.parked[record.key] = payload

    def _set(self, object_id: int, record: bytes, key: int | None) -> None:
        if key is not None:  # counted before the old one is let go: it may be the same
            self.users[key] = self.users.get(key, 0) + 1
        self._forget(object_id)
        self.objects[object_id] = (record, key)

    def _forget(self, object_id: int) -> None:
        old = self.objects.pop(object_id, None)
        if old is None or old[1] is None:
            return
        key = old[1]
        left = self.users[key] - 1
        if left:
            self.users[key] = left
        else:  # no object views it any more
            del self.users[key]
            self.storages.pop(key, None)
            self._drop_shared(key)

    def _drop_shared(self, key: int) -> None:
        old = self.shared.pop(key, None)
        if old is not None:
            os.close(old[0])

    def forget_arriving(self) -> None:
        """Descriptors whose records never came (the executor died in between)."""
        for fds in self.arriving.values():
            for fd in fds:
                os.close(fd)
        self.arriving.clear()

    def snapshot(self) -> Snapshot:
        parts: list[bytes] = []
        for key, data in self.storages.items():
            parts += storage_record(key, data)
        parts += self.provenances.values()
        parts += [record for record, _ in self.objects.values()]
        for command, payload in self.parked.items():  # kept until an executor settles them
            parts += parked_record(command, payload)
        blob = b"".join(parts)
        fd = os.memfd_create("torchrelay-snapshot")
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view) :]
        return Snapshot(fd, len(blob), [(fd_, key, size)
                                        for key, (fd_, size) in self.shared.items()])

    def bytes_held(self) -> int:
        return sum(map(len, self.storages.values())) + sum(s for _, s in self.shared.values())
