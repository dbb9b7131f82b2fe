"""The executor: the process of a worker daemon that runs the commands.

Started by the supervisor (`_supervisor.py`), never by hand. It is the worker as
`run_worker` serves it — broker connection, object store, autograd — with three
additions that let its supervisor contain what a command can do to it:

- the journal (`_journal.py`): which command is in hand and since when, and
  which ran to the end;
- the mirror (`_mirror.py`): after each command, what it changed in the store
  goes to the supervisor's copy (small storages by value through a ring in
  shared memory, large ones moved into shared memory once and mapped by both);
  a reply is sent only after what it reports is in the copy;
- on start, the objects of a predecessor that died are rebuilt from the copy,
  commands it finished are skipped if they come again, and the command that
  killed it (or ran past `command_timeout`) is refused and dead-lettered.

A command parked on another worker when the executor dies is answered by the
next one: it did not complete, and what was made for it elsewhere (a move's copy,
a forwarded call's result) is deleted there, so the object stays where it was.

What does not survive an executor's death: autograd graphs (a `backward`
through a tensor whose graph died is refused, naming it; its leaves keep their
values), gradients accumulated in `.grad`, and the random number generator's
state. Views keep
sharing storage; a tensor that reached the store through `.data` may lose an
in-place change made through that alias alone.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from torchrelay.broker import TENSOR_DTYPES, EncodeError, Endpoint, decode, encode

from ..operations._config import WorkerConfig
from ..operations._logs import configure_logging
from ..runtime._datasets import Dataset
from ..runtime._runtime import WorkerRuntime
from ..runtime._store import ObjectStore, StoredObject
from ._daemon import run_worker
from ._journal import RAN_OK, RAN_OTHER, Journal, command_key
from ._mirror import KEY, SHARED_FROM, Ring
from ._mirror_codec import (
    ParkedRecord,
    ProvenanceRecord,
    StorageRecord,
    TensorRecord,
    ValueRecord,
    delete_record,
    parked_record,
    provenance_record,
    read_records,
    shared_record,
    storage_record,
    tensor_record,
    unparked_record,
    value_record,
)

__all__ = ["EXECUTOR_ENV", "ExecutorSetup", "main"]

log = logging.getLogger("torchrelay.worker")

EXECUTOR_ENV = "TORCHRELAY_EXECUTOR"
"""How the supervisor tells an executor what it needs (JSON, see `ExecutorSetup`)."""

_DTYPE_CODES = {dtype: code for code, dtype in enumerate(TENSOR_DTYPES)}
_string_at = ctypes.string_at


@dataclass(frozen=True, slots=True)
class ExecutorSetup:
    """Everything an executor is handed by its supervisor."""

    config: dict[str, Any]
    journal: int
    ring: int
    ring_capacity: int
    channel: int
    snapshot: int
    snapshot_length: int
    shared: list[tuple[int, int, int]]  # (descriptor, storage key, bytes)
    next_key: int
    poisoned: list[tuple[str, str, str, float]]  # (sender, correlation id, what, when)
    restarts: int
    supervisor: int

    def to_json(self) -> str:
        return json.dumps({name: getattr(self, name) for name in self.__slots__})

    @classmethod
    def from_json(cls, text: str) -> ExecutorSetup:
        fields = json.loads(text)
        fields["shared"] = [tuple(s) for s in fields["shared"]]
        fields["poisoned"] = [tuple(p) for p in fields["poisoned"]]
        return cls(**fields)


class Mirror:
    """Journals each command and sends what it changed to the supervisor's copy.

    Storages are tracked by identity (`StorageImpl`), counting the stored objects
    that view each; an object is sent again when it is new or its tensor's
    `_version` moved (views share their base's counter).
    """

    def __init__(self, journal: Journal, ring: Ring, channel: socket.socket, next_key: int) -> None:
        self.journal = journal
        self.ring = ring
        self.channel = channel
        self.next_key = next_key
        self.store: MirroredStore | None = None
        self.keys: dict[int, int] = {}  # storage identity -> key
        self.users: dict[int, int] = {}  # storage identity -> stored objects viewing it
        self.storage_of: dict[int, int] = {}  # object id -> storage identity
        self.versions: dict[int, int] = {}  # object id -> the _version last sent
        self.sent_shared: set[int] = set()  # keys whose descriptor the supervisor holds
        self.provenance_ids: dict[tuple[frozenset[str], frozenset[str]], int] = {}
        self.changed: dict[int, bool] = {}  # object id -> new (or replaced)
        self.deleted: list[int] = []
        self.notes: list[bytes] = []  # records of commands parked and answered

    # -- Containment ------------------------------------------------------------------

    def begin(self, sender: str, correlation_id: str) -> None:
        self.journal.begin(command_key(sender, correlation_id))

    def done(self) -> None:
        self.journal.done()

    def ran(self, *, plain_ok: bool) -> tuple[int, int]:
        return self.journal.ran(plain_ok=plain_ok)

    def answered(self, tokens: list[Any]) -> None:
        self.journal.answered(tokens)

    def parked(self, sender: str, correlation_id: str, payload: bytes) -> None:
        key = command_key(sender, correlation_id)
        self.notes += parked_record(key, payload)

    def unparked(self, sender: str, correlation_id: str) -> None:
        key = command_key(sender, correlation_id)
        self.notes += unparked_record(key)

    def commit(self) -> None:
        if not (self.changed or self.deleted or self.notes):
            return
        assert self.store is not None
        parts: list[bytes] = self.notes
        self.notes = []
        for object_id in self.deleted:
            parts.append(delete_record(object_id))
            self.versions.pop(object_id, None)
            self._let_go(self.storage_of.pop(object_id, None))
        objects = self.store.objects
        for object_id, new in self.changed.items():
            entry = objects.get(object_id)
            if entry is not None:
                self._record(parts, object_id, entry, new)
        self.changed.clear()
        self.deleted.clear()
        if parts:
            entry_bytes = b"".join(parts)
            while not self.ring.append(entry_bytes):  # the supervisor is behind: wait
                time.sleep(0.001)

    # -- what a command changed ----------------------------------------------------------

    def _record(self, parts: list[bytes], object_id: int, entry: StoredObject, new: bool) -> None:
        value = entry.value
        if not (isinstance(value, torch.Tensor) and value.layout == torch.strided):
            if new:  # anything else is immutable to operations: sent once
                try:
                    frame = encode(value).tobytes()
                except EncodeError:  # an optimizer, a dataset: not kept across a crash
                    return
                parts += value_record(object_id, self._provenance(parts, entry), frame)
            return
        version = value._version
        if not new and self.versions.get(object_id) == version:
            return
        storage = value.untyped_storage()
        identity = storage._cdata
        key = self._storage(parts, storage, identity, changed=True)
        if new and self.storage_of.get(object_id) != identity:
            self._let_go(self.storage_of.get(object_id))
            self.storage_of[object_id] = identity
            self.users[identity] = self.users.get(identity, 0) + 1
        self.versions[object_id] = version
        parts += tensor_record(object_id, key, self._provenance(parts, entry),
                               dtype_code=_DTYPE_CODES[value.dtype],
                               offset=int(value.storage_offset()), shape=value.shape,
                               stride=value.stride(), requires_grad=value.requires_grad,
                               has_graph=value.grad_fn is not None)

    def _storage(self, parts: list[bytes], storage: Any, identity: int, changed: bool) -> int:
        key = self.keys.get(identity)
        if key is None:
            key = self.keys[identity] = self.next_key
            self.next_key += 1
        if storage.is_shared():
            if key not in self.sent_shared:  # both map its pages: sent once
                fd, size = storage._share_fd_cpu_()
                socket.send_fds(self.channel, [KEY.pack(key)], [fd])
                parts.append(shared_record(key, size))
                self.sent_shared.add(key)
        elif changed:
            size = storage.nbytes()
            parts += storage_record(key, _string_at(storage.data_ptr(), size) if size else b"")
        return key

    def _provenance(self, parts: list[bytes], entry: StoredObject) -> int:
        # What it derives from as of now, the memory it shares included (after a crash
        # its tensors come back in memory of their own, carrying this), and who may use
        # it: one record for each pair seen.
        assert self.store is not None
        key = (self.store.owners(entry), entry.holders)
        provenance_id = self.provenance_ids.get(key)
        if provenance_id is None:
            provenance_id = len(self.provenance_ids) + 1
            self.provenance_ids[key] = provenance_id
            body = msgpack.packb([sorted(key[0]), sorted(key[1])])
            parts += provenance_record(provenance_id, body)
        return provenance_id

    def _let_go(self, identity: int | None) -> None:
        if identity is None:
            return
        left = self.users[identity] - 1
        if left:
            self.users[identity] = left
        else:  # no stored object views it: its identity may be reused by another storage
            del self.users[identity]
            key = self.keys.pop(identity, None)
            if key is not None:
                self.sent_shared.discard(key)


class MirroredStore(ObjectStore):
    """An `ObjectStore` that tells the mirror what changes, and shares large storages."""

    def __init__(self, owner: str, max_bytes: int | None, mirror: Mirror) -> None:
        super().__init__(owner, max_bytes)
        self.mirror = mirror
        mirror.store = self

    @property
    def objects(self) -> dict[int, StoredObject]:
        return self._objects

    def put(self, object_id: int, value: Any, provenance: frozenset[str],
            holders: frozenset[str], *, by: str | None = None) -> None:
        _share_large(value)  # before it is counted: sharing moves the storage
        super().put(object_id, value, provenance, holders, by=by)
        self.mirror.changed[object_id] = True

    def replace(self, object_id: int, value: Any, provenance: frozenset[str],
                holders: frozenset[str]) -> None:
        _share_large(value)
        super().replace(object_id, value, provenance, holders)
        self.mirror.changed[object_id] = True

    def grant(self, object_id: int, identity: str) -> None:
        super().grant(object_id, identity)
        self.mirror.changed[object_id] = True  # recorded anew, with its holders

    def get(self, object_id: int) -> StoredObject:
        entry = super().get(object_id)
        self.mirror.changed.setdefault(object_id, False)  # it may be changed in place
        return entry

    def pop(self, object_id: int) -> StoredObject:
        entry = super().pop(object_id)
        self._gone(object_id)
        return entry

    def discard(self, object_id: int) -> StoredObject | None:
        entry = super().discard(object_id)
        if entry is not None:
            self._gone(object_id)
        return entry

    def discard_if(self, object_id: int, entry: StoredObject) -> bool:
        gone = super().discard_if(object_id, entry)
        if gone:
            self._gone(object_id)
        return gone

    def _gone(self, object_id: int) -> None:
        self.mirror.changed.pop(object_id, None)
        self.mirror.deleted.append(object_id)


def _share_large(value: Any, depth: int = 0) -> None:
    """Move the storages of large tensors into shared memory, in place (autograd and
    views keep working): the supervisor maps them instead of copying them."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if storage.nbytes() > SHARED_FROM and not storage.is_shared():
            try:
                storage.share_memory_()
            except RuntimeError as e:  # /dev/shm full (64 MiB in a default container)
                log.warning("a %d-byte storage stays unshared (it would not survive a crash "
                            "of the executor): %s", storage.nbytes(), e)
    elif type(value) in (tuple, list) and depth < 8:
        for item in value:
            _share_large(item, depth + 1)
    elif type(value) is Dataset:  # what clients take of it is then shared already
        for tensor in value.tensors.values():
            _share_large(tensor, depth + 1)


def restore(store: MirroredStore, setup: ExecutorSetup) -> tuple[set[int], list[bytes]]:
    """Rebuild a dead predecessor's objects from the supervisor's copy; the ids of the
    tensors whose autograd graph died with it, and the commands it left waiting (see
    `WorkerRuntime.settle_interrupted`)."""
    mirror = store.mirror
    storages: dict[int, Any] = {}
    for fd, key, size in setup.shared:
        # Maps a copy of fd. (torch's private API for this, as torch.multiprocessing uses.)
        storages[key] = torch.UntypedStorage._new_shared_fd_cpu(fd, size)  # type: ignore[attr-defined]
        mirror.sent_shared.add(key)
        os.close(fd)
    lost: set[int] = set()
    parked: list[bytes] = []
    if not setup.snapshot_length:
        return lost, parked
    provenances: dict[int, tuple[frozenset[str], frozenset[str]]] = {}
    objects: list[TensorRecord | ValueRecord] = []
    with mmap.mmap(setup.snapshot, setup.snapshot_length, mmap.MAP_PRIVATE) as page:
        view = memoryview(page)
        for record in read_records(view):
            match record:
                case StorageRecord(key=key, size=size, data=data):
                    storage = torch.UntypedStorage(size)  # type: ignore[no-untyped-call]
                    if size:
                        ctypes.memmove(storage.data_ptr(), data, size)
                    storages[key] = storage
                case ProvenanceRecord():
                    owners, holders = msgpack.unpackb(record.body)
                    provenance = (frozenset(owners), frozenset(holders))
                    provenances[record.provenance_id] = provenance
                    mirror.provenance_ids[provenance] = record.provenance_id
                case TensorRecord() | ValueRecord():
                    objects.append(record)
                case ParkedRecord(payload=bytes() as payload):
                    parked.append(payload)
                case _:
                    raise ValueError(f"a snapshot holds no {type(record).__name__}")
        del view
    for record in objects:
        object_id = record.object_id
        if type(record) is ValueRecord:
            value = decode(bytearray(record.frame))
        else:
            assert type(record) is TensorRecord
            storage = storages[record.key]
            value = torch.empty(0, dtype=TENSOR_DTYPES[record.dtype_code]).set_(
                storage, record.offset, record.shape, record.stride)
            if record.has_graph:
                lost.add(object_id)  # made by operations whose graph died with the process
            elif record.requires_grad:
                value.requires_grad_(True)  # a leaf comes back a leaf (its .grad does not)
            identity = storage._cdata
            mirror.keys[identity] = record.key
            mirror.storage_of[object_id] = identity
            mirror.users[identity] = mirror.users.get(identity, 0) + 1
            mirror.versions[object_id] = value._version
        ObjectStore.put(store, object_id, value, *provenances[record.provenance_id])
    return lost, parked


def _die_with(supervisor: int) -> None:
    """Be killed the moment the supervisor dies (Linux): an executor left alone would go
    on running its command, and holding the worker's queue, for nobody."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the check between commands remains
        return
    if os.getppid() != supervisor:  # it died before we asked
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def main() -> int:
    setup = ExecutorSetup.from_json(os.environ[EXECUTOR_ENV])
    _die_with(setup.supervisor)
    config = WorkerConfig(**setup.config)
    configure_logging(config.log_level, config.log_format, config.id, "executor")
    journal = Journal(setup.journal)
    finished = journal.finished()
    mirror = Mirror(journal, Ring(setup.ring, setup.ring_capacity),
                    socket.socket(fileno=setup.channel), setup.next_key)

    def make_runtime(endpoint: Endpoint) -> WorkerRuntime:
        store = MirroredStore(config.id, config.max_bytes, mirror)
        runtime = WorkerRuntime.for_config(
            config, endpoint, store=store, containment=mirror,
            status_facts={"pid": setup.supervisor, "executor_pid": os.getpid(),
                          "executor_restarts": setup.restarts})
        started = time.monotonic()
        runtime.lost_graphs, parked = restore(store, setup)
        ran = {tuple(key.decode(errors="replace").split("\0", 1)): state
               for key, state in finished if b"\0" in key}
        runtime.admission.remember_finished(
            list(ran),  # type: ignore[arg-type]
            {key: state == RAN_OK for key, state in ran.items()  # type: ignore[misc]
             if state in (RAN_OK, RAN_OTHER)})
        admission = runtime.admission
        admission.poisoned = {(sender, cid): what for sender, cid, what, _ in setup.poisoned}
        for sender, _, _, when in setup.poisoned:  # (a sender too often is refused a while)
            admission.strikes.add(sender, when)
        runtime.settle_interrupted(parked)
        if setup.restarts:
            log.warning("executor restarted (restart %d): %d objects back in %.1f ms, %d of "
                        "them without their autograd graph; %d finished commands remembered",
                        setup.restarts, len(store), (time.monotonic() - started) * 1e3,
                        len(runtime.lost_graphs), len(finished))
        return runtime

    supervisor = setup.supervisor
    return run_worker(config, make_runtime=make_runtime,
                      keep_going=lambda: os.getppid() == supervisor,
                      broker_options={"allocate": _shared_buffer})


def _shared_buffer(size: int) -> torch.Tensor:
    """Where large messages are received: shared memory, so that what is stored from
    them is already where the supervisor can map it (no second copy)."""
    fd = os.memfd_create("torchrelay-message", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)  # pages come as they are written: no zero-filling first
        storage = torch.UntypedStorage._new_shared_fd_cpu(fd, size)  # type: ignore[attr-defined]
    finally:
        os.close(fd)  # the storage holds a copy of it
    return torch.empty(0, dtype=torch.uint8).set_(storage)


if __name__ == "__main__":
    sys.exit(main())
