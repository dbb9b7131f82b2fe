"""Values to bytes and back, without pickle.

A frame is a small msgpack header followed by the raw bytes of every tensor in
the value, each aligned to 64 bytes::

    b"TRL" | version (u8) | header length (u32, little endian) | header | pad | tensor bytes...

Tensors appear in the header as an extension type carrying dtype, shape and the
offset of their bytes, so tensor data is never copied into the msgpack encoding
(the split torch.distributed.rpc makes between a message and its tensor table).
`encode` returns the frame as a list of buffers that views the tensors' memory;
the transport writes them out (or cuts them into chunks) without joining them.
`decode` builds tensors straight on a writable body (no copy) and copies once out
of a read-only one.

Only the types below travel; anything else is refused at encode time, and any
malformed input raises `DecodeError` naming what was wrong.
"""

from __future__ import annotations

import ctypes
import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from ._errors import DecodeError, ProtocolError
from ._refs import ObjectRef, PointerRef

__all__ = ["TENSOR_DTYPES", "Body", "EncodeError", "Frame", "decode", "encode", "tensor_buffer"]

Body = bytes | bytearray | memoryview | torch.Tensor
"""A received message: bytes from the transport, or a uint8 tensor it assembled."""

MAGIC = b"TRL"
VERSION = 1
_PREFIX = struct.Struct("<3sBI")
_ID = struct.Struct("<q")
_pack_id = _ID.pack
_unpack_id = _ID.unpack


def _ext(code: int, data: bytes) -> msgpack.ExtType:
    # ExtType's constructor re-validates its (already valid) arguments; this is the
    # hot path of every command, so build the named tuple directly.
    return tuple.__new__(msgpack.ExtType, (code, data))
ALIGN = 64
MAX_NESTING = 32
MAX_DIMS = 64

# Extension type codes; part of the wire format, never renumber.
_EXT_TENSOR = 1
_EXT_TUPLE = 2
_EXT_OBJECT_REF = 3
_EXT_POINTER_REF = 4
_EXT_DTYPE = 5
_EXT_SLICE = 6
_EXT_ELLIPSIS = 7
_EXT_COMPLEX = 8

_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}
TENSOR_DTYPES: tuple[torch.dtype, ...] = tuple(_DTYPES.values())
"""The dtypes a tensor can travel with, in a fixed order (a dtype's index is a code)."""


class EncodeError(ProtocolError, TypeError):
    """A value that cannot travel (an unsupported type, a sparse tensor...)."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy).

    The view does not keep the tensor alive: the caller must.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    array = (ctypes.c_char * nbytes).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


@dataclass(frozen=True, slots=True)
class Frame:
    """An encoded value: buffers to be written one after the other.

    `keepalive` holds the tensors whose memory `parts` view.
    """

    parts: tuple[memoryview | bytes, ...]
    nbytes: int
    keepalive: tuple[torch.Tensor, ...] = ()

    def tobytes(self) -> bytes:
        return b"".join(self.parts)


class _Encoder:
    __slots__ = ("blobs", "keepalive", "offset")

    def __init__(self) -> None:
        self.blobs: list[tuple[int, memoryview]] = []
        self.keepalive: list[torch.Tensor] = []
        self.offset = 0

    def pack(self, value: Any) -> bytes:
        try:
            # strict_types sends tuples (and subclasses of builtins) through
            # `default`, so tuples come back as tuples rather than lists.
            packed: bytes = msgpack.packb(
                value, default=self.default, use_bin_type=True, strict_types=True
            )
        except (TypeError, ValueError, OverflowError, struct.error) as e:
            if isinstance(e, EncodeError):
                raise
            raise EncodeError(f"cannot encode value: {e}") from None
        return packed

    def default(self, value: Any) -> Any:
        if type(value) is ObjectRef:  # the commonest extension, packed directly
            return _ext(_EXT_OBJECT_REF, _pack_id(value.id))
        if isinstance(value, torch.Tensor):
            return _ext(_EXT_TENSOR, self._tensor(value))
        if isinstance(value, tuple):  # also torch.Size and named tuples
            return msgpack.ExtType(_EXT_TUPLE, self.pack(list(value)))
        if isinstance(value, PointerRef):
            return msgpack.ExtType(
                _EXT_POINTER_REF, self.pack([value.location, value.id_at_location])
            )
        if isinstance(value, torch.dtype):
            if value not in _DTYPE_NAMES:
                raise EncodeError(f"dtype {value} cannot travel")
            return msgpack.ExtType(_EXT_DTYPE, _DTYPE_NAMES[value].encode())
        if isinstance(value, slice):
            return msgpack.ExtType(_EXT_SLICE, self.pack([value.start, value.stop, value.step]))
        if value is Ellipsis:
            return msgpack.ExtType(_EXT_ELLIPSIS, b"")
        if isinstance(value, complex):
            return msgpack.ExtType(_EXT_COMPLEX, self.pack([value.real, value.imag]))
        # Subclasses of builtins (IntEnum, OrderedDict...) travel as the builtin.
        if isinstance(value, bool | int):
            return int(value) if not isinstance(value, bool) else bool(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, str):
            return str(value)
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        if isinstance(value, list):
            return list(value)
        if isinstance(value, dict):
            return dict(value)
        raise EncodeError(f"values of type {type(value).__qualname__} cannot travel")

    def _tensor(self, tensor: torch.Tensor) -> bytes:
        if tensor.layout != torch.strided:
            raise EncodeError(f"only dense tensors can travel, not {tensor.layout}")
        dtype_name = _DTYPE_NAMES.get(tensor.dtype)
        if dtype_name is None:
            raise EncodeError(f"tensors of dtype {tensor.dtype} cannot travel")
        # Each torch call costs microseconds cold, as between two commands: none without need.
        requires_grad = tensor.requires_grad
        data = tensor.detach() if requires_grad else tensor
        if not data.is_cpu:
            data = data.cpu()
        if data.dtype.is_complex:
            data = data.resolve_conj()
        data = data.resolve_neg().contiguous()  # (a real view of a conjugate may be negated)
        self.keepalive.append(data)
        offset = self.offset
        buffer = tensor_buffer(data)
        self.blobs.append((offset, buffer))
        self.offset = _align(offset + buffer.nbytes)
        return self.pack([dtype_name, list(data.shape), offset, requires_grad])


def encode(value: Any) -> Frame:
    """Encode `value`; raises `EncodeError` if it holds a type that cannot travel."""
    encoder = _Encoder()
    header = encoder.pack(value)
    head = _PREFIX.pack(MAGIC, VERSION, len(header))
    if not encoder.blobs:  # no tensors: one buffer
        whole = head + header
        return Frame((whole,), len(whole))
    data_start = _align(len(head) + len(header))
    parts: list[memoryview | bytes] = [head, header]
    position = len(head) + len(header)
    for offset, buffer in encoder.blobs:
        pad = data_start + offset - position
        if pad:
            parts.append(bytes(pad))
        parts.append(buffer)
        position = data_start + offset + buffer.nbytes
    return Frame(tuple(parts), position, tuple(encoder.keepalive))


class _Decoder:
    # No attribute may hold a bound method of the decoder: that cycle would keep
    # the message (maybe a GiB) alive until the cycle collector happened to run.
    __slots__ = ("backing", "body", "data_start", "depth", "writable")

    def __init__(self, body: memoryview, data_start: int, backing: torch.Tensor | None) -> None:
        self.body = body
        self.data_start = data_start
        self.backing = backing
        self.writable = not body.readonly
        self.depth = 0

    def unpack(self, data: bytes | memoryview) -> Any:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise DecodeError(f"values nested deeper than {MAX_NESTING} levels")
        try:
            return msgpack.unpackb(
                data, ext_hook=self._ext, raw=False, strict_map_key=False, use_list=True
            )
        finally:
            self.depth -= 1

    def _ext(self, code: int, data: bytes) -> Any:
        if code == _EXT_TENSOR:
            return self._tensor(self.unpack(data))
        if code == _EXT_TUPLE:
            items = self.unpack(data)
            _expect(isinstance(items, list), "a tuple must hold a list of items")
            return tuple(items)
        if code == _EXT_OBJECT_REF:
            _expect(len(data) == 8, "an object reference must be an 8-byte id")
            return ObjectRef(_unpack_id(data)[0])
        if code == _EXT_POINTER_REF:
            fields = self.unpack(data)
            _expect(
                isinstance(fields, list)
                and len(fields) == 2
                and isinstance(fields[0], str)
                and _is_int(fields[1]),
                "a pointer must be [location, id]",
            )
            return PointerRef(fields[0], fields[1])
        if code == _EXT_DTYPE:
            name = bytes(data).decode("ascii", "replace")
            _expect(name in _DTYPES, f"unknown dtype {name!r}")
            return _DTYPES[name]
        if code == _EXT_SLICE:
            bounds = self.unpack(data)
            _expect(
                isinstance(bounds, list)
                and len(bounds) == 3
                and all(b is None or _is_int(b) for b in bounds),
                "a slice must be [start, stop, step] of integers or nil",
            )
            return slice(*bounds)
        if code == _EXT_ELLIPSIS:
            return Ellipsis
        if code == _EXT_COMPLEX:
            parts = self.unpack(data)
            _expect(
                isinstance(parts, list)
                and len(parts) == 2
                and all(isinstance(p, float | int) and not isinstance(p, bool) for p in parts),
                "a complex number must be [real, imag]",
            )
            return complex(parts[0], parts[1])
        raise DecodeError(f"unknown extension type {code}")

    def _tensor(self, fields: Any) -> torch.Tensor:
        # Hot path: validate with plain ifs, build messages only on failure.
        if not (isinstance(fields, list) and len(fields) == 4):
            raise DecodeError("a tensor must be [dtype, shape, offset, requires_grad]")
        dtype_name, shape, offset, requires_grad = fields
        dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise DecodeError(f"unknown dtype {dtype_name!r}")
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_DIMS
            and all(type(d) is int and d >= 0 for d in shape)
        ):
            raise DecodeError(
                f"a tensor shape must be at most {MAX_DIMS} non-negative integers, got {shape!r}"
            )
        if not (type(offset) is int and offset >= 0):
            raise DecodeError("a tensor offset must be a non-negative integer")
        if type(requires_grad) is not bool:
            raise DecodeError("requires_grad must be a boolean")
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        start = self.data_start + offset
        if start + nbytes > len(self.body):
            raise DecodeError(
                f"tensor of shape {shape} and dtype {dtype_name} needs {nbytes} bytes at "
                f"offset {offset}, but the message holds only "
                f"{max(0, len(self.body) - start)} there"
            )
        if numel == 0:
            tensor = torch.empty(shape, dtype=dtype)
        elif self.backing is not None:  # a view that keeps the assembled message alive
            tensor = self.backing[start : start + nbytes].view(dtype).view(shape)
        elif self.writable:
            tensor = torch.frombuffer(self.body, dtype=dtype, count=numel, offset=start)
            tensor = tensor.view(shape)
        else:
            tensor = torch.empty(shape, dtype=dtype)
            tensor_buffer(tensor)[:] = self.body[start : start + nbytes]
        if requires_grad:
            if not (dtype.is_floating_point or dtype.is_complex):
                raise DecodeError("only floating point and complex tensors can require gradients")
            tensor.requires_grad_(True)
        return tensor


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise DecodeError(message)


def decode(body: Body) -> Any:
    """Decode a frame. Tensors view `body` directly when it is writable."""
    backing = None
    if isinstance(body, torch.Tensor):
        if body.dtype != torch.uint8 or body.dim() != 1 or not body.is_contiguous():
            raise DecodeError("a message tensor must be contiguous one-dimensional uint8")
        backing = body
        view = tensor_buffer(body)
    else:
        view = memoryview(body)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
    if len(view) < _PREFIX.size:
        raise DecodeError(f"message of {len(view)} bytes is too short to be a torchrelay frame")
    magic, version, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise DecodeError(
            f"not a torchrelay frame (starts with {bytes(view[:8])!r}); "
            "only msgpack frames are accepted, never pickle"
        )
    if version != VERSION:
        raise DecodeError(f"frame version {version} is not supported (expected {VERSION})")
    header_end = _PREFIX.size + header_len
    if header_end > len(view):
        raise DecodeError(f"header of {header_len} bytes runs past the end of the message")
    decoder = _Decoder(view, _align(header_end), backing)
    try:
        return decoder.unpack(view[_PREFIX.size : header_end])
    except DecodeError:
        raise
    except RecursionError:
        raise DecodeError("message nests too deeply") from None
    except Exception as e:  # msgpack raises a zoo of types for malformed data
        raise DecodeError(f"malformed message: {type(e).__name__}: {e}") from None
