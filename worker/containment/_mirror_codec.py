"""The mirror's record format, written by the executor and read by both sides.

The executor appends one ring entry per command (`_executor.py` writes them with
the functions here); the supervisor applies entries to its copy and writes
snapshots of it (`_mirror.py`); a new executor rebuilds its objects from a
snapshot (`_executor.py`'s `restore`). All three read with `read_records`.

Records, little endian (a record's payload follows its header):

    STORAGE  <B Q Q>            kind, storage key, bytes              + the bytes
    SHARED   <B Q Q>            kind, storage key, bytes  (its descriptor came first,
                                on the socket, in a message holding the 8-byte key)
    TENSOR   <B Q Q Q B B B q>  kind, object id, storage key, provenance id, dtype code,
                                dimensions, flags (1: requires grad, 2: has a graph),
                                storage offset                        + shape + strides
    VALUE    <B Q Q I>          kind, object id, provenance id, length + a codec frame
    PROVENANCE <B Q I>          kind, provenance id, length           + msgpack list
    DELETE   <B Q>              kind, object id
    PARKED   <B H I>            kind, key length, length   + key + what to answer and undo
    UNPARKED <B H I>            kind, key length, 0        + key

PARKED and UNPARKED are about commands, not objects: a command waiting on another
worker (keyed as the journal keys it) and what a new executor must answer and undo
for it if this one dies before it is answered (`runtime/_records.py`'s
`ParkedCommand` is the payload).

No torch here: the supervisor imports this module.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DeleteRecord",
    "ParkedRecord",
    "ProvenanceRecord",
    "Record",
    "StorageRecord",
    "TensorRecord",
    "ValueRecord",
    "delete_record",
    "parked_record",
    "provenance_record",
    "read_records",
    "shared_record",
    "storage_record",
    "tensor_record",
    "unparked_record",
    "value_record",
]

_STORAGE, _SHARED, _TENSOR, _VALUE, _PROVENANCE, _DELETE, _PARKED, _UNPARKED = range(1, 9)
_STORAGE_HEADER: Final = struct.Struct("<BQQ")
_TENSOR_HEADER: Final = struct.Struct("<BQQQBBBq")
_VALUE_HEADER: Final = struct.Struct("<BQQI")
_PROVENANCE_HEADER: Final = struct.Struct("<BQI")
_DELETE_HEADER: Final = struct.Struct("<BQ")
_PARKED_HEADER: Final = struct.Struct("<BHI")
_DIMENSIONS: Final = tuple(struct.Struct(f"<{2 * n}q") for n in range(65))


# -- reading ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StorageRecord:
    """A storage's bytes (`data`), or, `shared`, only its size: both sides map it."""

    key: int
    size: int
    data: bytes
    shared: bool


@dataclass(frozen=True, slots=True)
class TensorRecord:
    """A stored tensor: a view of storage `key`. `record` is the whole record, as it
    goes into a snapshot unchanged."""

    object_id: int
    key: int
    provenance_id: int
    dtype_code: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool
    has_graph: bool
    record: bytes


@dataclass(frozen=True, slots=True)
class ValueRecord:
    """A stored value other than a tensor, as a codec frame."""

    object_id: int
    provenance_id: int
    frame: bytes
    record: bytes


@dataclass(frozen=True, slots=True)
class ProvenanceRecord:
    """What objects derive from and who may use them (a msgpack list of two lists),
    numbered: the objects' records name it by `provenance_id`."""

    provenance_id: int
    body: bytes
    record: bytes


@dataclass(frozen=True, slots=True)
class DeleteRecord:
    object_id: int


@dataclass(frozen=True, slots=True)
class ParkedRecord:
    """A command parked under `key` with what to answer and undo (`payload`), or, with
    None, settled."""

    key: bytes
    payload: bytes | None


Record = (StorageRecord | TensorRecord | ValueRecord | ProvenanceRecord | DeleteRecord
          | ParkedRecord)


def read_records(view: memoryview) -> Iterator[Record]:
    """The records in `view`, in order (every payload copied out of it)."""
    position = 0
    end = len(view)
    while position < end:
        kind = view[position]
        if kind in (_STORAGE, _SHARED):
            _, key, size = _STORAGE_HEADER.unpack_from(view, position)
            position += _STORAGE_HEADER.size
            if kind == _SHARED:
                yield StorageRecord(key, size, b"", shared=True)
                continue
            yield StorageRecord(key, size, bytes(view[position : position + size]),
                                shared=False)
            position += size
        elif kind == _TENSOR:
            (_, object_id, key, provenance_id, dtype_code, dimensions, flags,
             offset) = _TENSOR_HEADER.unpack_from(view, position)
            sizes = _DIMENSIONS[dimensions].unpack_from(view, position + _TENSOR_HEADER.size)
            stop = position + _TENSOR_HEADER.size + _DIMENSIONS[dimensions].size
            yield TensorRecord(object_id, key, provenance_id, dtype_code, offset,
                               sizes[:dimensions], sizes[dimensions:], bool(flags & 1),
                               bool(flags & 2), bytes(view[position:stop]))
            position = stop
        elif kind == _VALUE:
            _, object_id, provenance_id, length = _VALUE_HEADER.unpack_from(view, position)
            start = position + _VALUE_HEADER.size
            yield ValueRecord(object_id, provenance_id, bytes(view[start : start + length]),
                              bytes(view[position : start + length]))
            position = start + length
        elif kind == _PROVENANCE:
            _, provenance_id, length = _PROVENANCE_HEADER.unpack_from(view, position)
            start = position + _PROVENANCE_HEADER.size
            yield ProvenanceRecord(provenance_id, bytes(view[start : start + length]),
                                   bytes(view[position : start + length]))
            position = start + length
        elif kind == _DELETE:
            _, object_id = _DELETE_HEADER.unpack_from(view, position)
            position += _DELETE_HEADER.size
            yield DeleteRecord(object_id)
        elif kind in (_PARKED, _UNPARKED):
            _, key_length, length = _PARKED_HEADER.unpack_from(view, position)
            position += _PARKED_HEADER.size
            key = bytes(view[position : position + key_length])
            position += key_length
            if kind == _UNPARKED:
                yield ParkedRecord(key, None)
                continue
            yield ParkedRecord(key, bytes(view[position : position + length]))
            position += length
        else:
            raise ValueError(f"mirror record of unknown kind {kind} at byte {position}")


# -- writing (each returns the parts of one record, to be joined) -----------------------


def storage_record(key: int, data: bytes) -> list[bytes]:
    return [_STORAGE_HEADER.pack(_STORAGE, key, len(data)), data]


def shared_record(key: int, size: int) -> bytes:
    return _STORAGE_HEADER.pack(_SHARED, key, size)


def tensor_record(object_id: int, key: int, provenance_id: int, *, dtype_code: int,
                  offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
                  requires_grad: bool, has_graph: bool) -> list[bytes]:
    dimensions = len(shape)
    return [_TENSOR_HEADER.pack(_TENSOR, object_id, key, provenance_id, dtype_code,
                                dimensions, requires_grad | (has_graph << 1), offset),
            _DIMENSIONS[dimensions].pack(*shape, *stride)]


def value_record(object_id: int, provenance_id: int, frame: bytes) -> list[bytes]:
    return [_VALUE_HEADER.pack(_VALUE, object_id, provenance_id, len(frame)), frame]


def provenance_record(provenance_id: int, body: bytes) -> list[bytes]:
    return [_PROVENANCE_HEADER.pack(_PROVENANCE, provenance_id, len(body)), body]


def delete_record(object_id: int) -> bytes:
    return _DELETE_HEADER.pack(_DELETE, object_id)


def parked_record(key: bytes, payload: bytes) -> list[bytes]:
    return [_PARKED_HEADER.pack(_PARKED, len(key), len(payload)), key, payload]


def unparked_record(key: bytes) -> list[bytes]:
    return [_PARKED_HEADER.pack(_UNPARKED, len(key), 0), key]
