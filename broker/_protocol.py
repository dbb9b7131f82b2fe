"""The commands a worker understands and the replies it sends, as frozen dataclasses.

Pure data and pure functions, no I/O. A command travels as a message whose type
is the command's name and whose body is the codec's encoding of its fields; a
reply carries either `{"ok": value}` or `{"error": [type, message, traceback]}`.

`decode_command` validates every field, so a handler can trust what it gets:
malformed or hostile input becomes one `ProtocolError` naming what was wrong.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._codec import Body, Frame, decode, encode
from ._errors import DecodeError, ProtocolError, RemoteError

__all__ = [
    "COMMANDS",
    "Call",
    "Command",
    "Delete",
    "Describe",
    "ErrorInfo",
    "Fetch",
    "Pull",
    "Reply",
    "Status",
    "Store",
    "Transfer",
    "decode_command",
    "decode_reply",
]

_Check = Callable[[Any], bool]

GARBAGE = "garbage"
"""Optional field of every command: ids of dead pointers' targets, deleted first.
Garbage collection rides along with the next command to the same worker instead
of costing a message of its own."""


def _int(v: Any) -> bool:
    return type(v) is int


def _opt_int(v: Any) -> bool:
    return v is None or type(v) is int


def _str(v: Any) -> bool:
    return type(v) is str and 0 < len(v) <= 255


def _bool(v: Any) -> bool:
    return type(v) is bool


def _any(v: Any) -> bool:
    return True


def _ints(v: Any) -> bool:
    return type(v) is list and all(type(i) is int for i in v)


def _strs(v: Any) -> bool:
    return type(v) is list and all(_str(s) for s in v)


def _list(v: Any) -> bool:
    return type(v) is list


def _kwargs(v: Any) -> bool:
    return type(v) is dict and all(type(k) is str for k in v)


_CHECK_NAMES: dict[_Check, str] = {
    _int: "an integer",
    _opt_int: "an integer or nil",
    _str: "a non-empty string of at most 255 characters",
    _bool: "a boolean",
    _ints: "a list of integers",
    _strs: "a list of strings",
    _list: "a list",
    _kwargs: "a map with string keys",
}


class Command:
    """Base of every command; subclasses are frozen dataclasses."""

    name: ClassVar[str]
    schema: ClassVar[Mapping[str, _Check]]

    def encode(self, garbage: Sequence[int] = ()) -> Frame:
        """The message body; `garbage` lists objects to delete before the command runs."""
        fields = {key: getattr(self, key) for key in self.schema}
        if garbage:
            fields[GARBAGE] = list(garbage)
        return encode(fields)

    def describe(self) -> str:
        """A short human-readable description, for error messages."""
        return self.name


@dataclass(frozen=True, slots=True)
class Store(Command):
    """Store `value` under `id`. With `replaces_pointer`, the id must hold a pointer
    to the sender's object (the end of a `Pull`), which the value replaces."""

    name: ClassVar[str] = "store"
    schema: ClassVar[Mapping[str, _Check]] = {
        "id": _int,
        "value": _any,
        "provenance": _strs,
        "replaces_pointer": _bool,
    }
    id: int
    value: Any
    provenance: list[str] = field(default_factory=list)
    replaces_pointer: bool = False


@dataclass(frozen=True, slots=True)
class Fetch(Command):
    """Return the object under `id` and remove it (`.get()`)."""

    name: ClassVar[str] = "fetch"
    schema: ClassVar[Mapping[str, _Check]] = {"id": _int}
    id: int


@dataclass(frozen=True, slots=True)
class Delete(Command):
    """Delete objects; pointers among them delete their targets too."""

    name: ClassVar[str] = "delete"
    schema: ClassVar[Mapping[str, _Check]] = {"ids": _ints}
    ids: list[int]


@dataclass(frozen=True, slots=True)
class Call(Command):
    """Run the allow-listed operation `op` and store its result under `result_id`.

    Arguments may hold `ObjectRef`s to objects on the receiving worker.
    """

    name: ClassVar[str] = "call"
    schema: ClassVar[Mapping[str, _Check]] = {
        "op": _str,
        "args": _list,
        "kwargs": _kwargs,
        "result_id": _opt_int,
        "hops": _int,
    }
    op: str
    args: list[Any]
    kwargs: dict[str, Any]
    result_id: int | None
    hops: int = 0
    """How many workers forwarded it so far (a bound on cycles of pointers)."""

    def describe(self) -> str:
        return f"call {self.op}"


@dataclass(frozen=True, slots=True)
class Transfer(Command):
    """Send the object under `id` to `destination` (stored there as `destination_id`).

    The holder removes its copy only once the destination confirmed storing it;
    with `keep_pointer` it keeps a pointer to the new location instead (`remote_send`).
    `replaces_pointer` is passed on to the destination's `Store`.
    """

    name: ClassVar[str] = "transfer"
    schema: ClassVar[Mapping[str, _Check]] = {
        "id": _int,
        "destination": _str,
        "destination_id": _int,
        "keep_pointer": _bool,
        "replaces_pointer": _bool,
    }
    id: int
    destination: str
    destination_id: int
    keep_pointer: bool = False
    replaces_pointer: bool = False

    def describe(self) -> str:
        return f"transfer to {self.destination}"


@dataclass(frozen=True, slots=True)
class Pull(Command):
    """The object under `id` is a pointer: fetch its target here (`remote_get`)."""

    name: ClassVar[str] = "pull"
    schema: ClassVar[Mapping[str, _Check]] = {"id": _int}
    id: int


@dataclass(frozen=True, slots=True)
class Describe(Command):
    """Return `{id: short description}` of every stored object."""

    name: ClassVar[str] = "describe"
    schema: ClassVar[Mapping[str, _Check]] = {}


@dataclass(frozen=True, slots=True)
class Status(Command):
    """Return the worker's health and counters."""

    name: ClassVar[str] = "status"
    schema: ClassVar[Mapping[str, _Check]] = {}


COMMANDS: dict[str, type[Command]] = {
    cls.name: cls for cls in (Store, Fetch, Delete, Call, Transfer, Pull, Describe, Status)
}


def decode_command(name: str, body: Body) -> tuple[Command, list[int]]:
    """Decode and validate a command and the garbage sent with it.

    Raises `ProtocolError` naming what was wrong.
    """
    cls = COMMANDS.get(name)
    if cls is None:
        raise ProtocolError(f"unknown command {name!r}; known commands: {', '.join(COMMANDS)}")
    fields = decode(body)
    if type(fields) is not dict:
        raise DecodeError(f"{name}: the body must be a map of fields, not {type(fields).__name__}")
    garbage = fields.pop(GARBAGE, [])
    if not _ints(garbage):
        raise ProtocolError(f"{name}: field {GARBAGE!r} must be {_CHECK_NAMES[_ints]}")
    schema = cls.schema
    if fields.keys() != schema.keys():
        unknown = sorted(map(str, fields.keys() - schema.keys()))
        missing = sorted(schema.keys() - fields.keys())
        raise ProtocolError(f"{name}: unknown fields {unknown}, missing fields {missing}")
    for key, check in schema.items():
        if not check(fields[key]):
            raise ProtocolError(
                f"{name}: field {key!r} must be {_CHECK_NAMES[check]}, "
                f"got {type(fields[key]).__name__}"
            )
    return cls(**fields), garbage


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An exception as it crosses the wire: its type name, message and traceback."""

    type: str
    message: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, error: BaseException, *, with_traceback: bool = True) -> ErrorInfo:
        if isinstance(error, RemoteError):  # relayed from further down a chain
            return cls(error.remote_type, str(error), error.remote_traceback)
        kind = type(error)
        name = kind.__qualname__ if kind.__module__ == "builtins" else (
            f"{kind.__module__}.{kind.__qualname__}"
        )
        text = "".join(traceback.format_exception(error)) if with_traceback else ""
        return cls(name, str(error), text)

    def to_exception(self, worker_id: str, operation: str) -> RemoteError:
        return RemoteError(worker_id, operation, self.type, self.message, self.traceback)


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to one command: a value, or an error."""

    value: Any = None
    error: ErrorInfo | None = None

    def encode(self) -> Frame:
        if self.error is None:
            if self.value is None:
                return _OK_NONE  # the commonest reply, encoded once
            return encode({"ok": self.value})
        e = self.error
        return encode({"error": [e.type, e.message, e.traceback]})


_OK_NONE = encode({"ok": None})
_OK_NONE_BYTES = _OK_NONE.tobytes()
_NOTHING = Reply()


def decode_reply(body: Body) -> Reply:
    if type(body) is bytes and body == _OK_NONE_BYTES:
        return _NOTHING
    fields = decode(body)
    if type(fields) is dict and len(fields) == 1:
        if "ok" in fields:
            return Reply(fields["ok"])
        error = fields.get("error")
        if type(error) is list and len(error) == 3 and all(type(s) is str for s in error):
            return Reply(error=ErrorInfo(*error))
    raise ProtocolError("a reply must be {'ok': value} or {'error': [type, message, traceback]}")
