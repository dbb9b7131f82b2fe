"""What a worker answers: a `Reply` holding a value or an `ErrorInfo`, alone or in a
batch of replies, and the correlation ids they answer to."""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from ._codec import Body, Frame, decode, encode
from ._errors import ProtocolError, RemoteError, RemoteObjectNotFound, RemotePrivateDataError

__all__ = ["MAX_ERROR_MESSAGE", "MAX_ERROR_TRACEBACK", "ErrorInfo", "Reply", "decode_reply",
           "decode_reply_batch", "encode_reply_batch", "is_plain_ok", "session_and_number"]


def encode_reply_batch(replies: Sequence[tuple[str, str, Frame]]) -> Frame:
    """One message body for several replies: `(correlation id, command name, reply frame)`."""
    return encode({"replies": [[cid, name, frame.tobytes()] for cid, name, frame in replies]})


def decode_reply_batch(body: Body) -> list[tuple[str, str, bytes]]:
    values = decode(body)
    items = values.get("replies") if type(values) is dict and len(values) == 1 else None
    if type(items) is not list or not all(
        type(i) is list and len(i) == 3 and type(i[0]) is str and type(i[1]) is str
        and type(i[2]) is bytes for i in items
    ):
        raise ProtocolError("a batch of replies must be {'replies': [[id, name, reply]...]}")
    return [(cid, name, frame) for cid, name, frame in items]


def session_and_number(correlation_id: str) -> tuple[str, int] | None:
    """A correlation id `<session>.<number>` split in two; None if it is not of that form.

    Every participant numbers its commands within a session of its own, so a
    worker can tell how a command stands relative to others of the same session.
    """
    session, _, number = correlation_id.rpartition(".")
    if not session or not number.isdecimal() or len(number) > 18:
        return None
    return session, int(number)


# -- replies --------------------------------------------------------------------------------


MAX_ERROR_MESSAGE: Final = 2000
MAX_ERROR_TRACEBACK: Final = 8000


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An exception as it crosses the wire: its type name, message and traceback.

    Message and traceback are bounded (`MAX_ERROR_MESSAGE`, `MAX_ERROR_TRACEBACK`
    characters): an exception that quotes a huge value costs no more than another.
    """

    type: str
    message: str
    traceback: str = ""
    origin: str = ""
    """Where down a chain of pointers it happened, if not on the worker that answers."""

    @classmethod
    def from_exception(cls, error: BaseException, *, with_traceback: bool = True) -> ErrorInfo:
        if isinstance(error, RemoteError):  # relayed from further down a chain
            origin = error.origin or f"{error.operation} failed on worker {error.worker_id!r}"
            return cls(error.remote_type, error.remote_message, error.remote_traceback,
                       _bounded(origin, MAX_ERROR_MESSAGE))
        kind = type(error)
        name = kind.__qualname__ if kind.__module__ == "builtins" else (
            f"{kind.__module__}.{kind.__qualname__}"
        )
        try:
            message = str(error)
            text = "".join(traceback.format_exception(error)) if with_traceback else ""
        except Exception as e:  # a message that cannot even be formatted
            message, text = f"(the error's message could not be shown: {type(e).__name__})", ""
        if len(text) > MAX_ERROR_TRACEBACK:
            text = "…" + text[-(MAX_ERROR_TRACEBACK - 1):]  # the innermost frames matter
        return cls(name, _bounded(message, MAX_ERROR_MESSAGE), text)

    def to_exception(self, worker_id: str, operation: str) -> RemoteError:
        kind = {"PrivateDataError": RemotePrivateDataError,
                "ObjectNotFound": RemoteObjectNotFound}.get(self.type.rpartition(".")[2],
                                                            RemoteError)
        return kind(worker_id, operation, self.type, self.message,
                    remote_traceback=self.traceback, origin=self.origin)


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
        fields = [e.type, e.message, e.traceback, e.origin] if e.origin else [
            e.type, e.message, e.traceback]
        return encode({"error": fields})


_OK_NONE: Final = encode({"ok": None})
_OK_NONE_BYTES: Final = _OK_NONE.tobytes()
_NOTHING: Final = Reply()


def is_plain_ok(frame: Frame) -> bool:
    """Whether a reply frame is the plain `{"ok": None}` (a command that answers nothing)."""
    return frame is _OK_NONE or (frame.nbytes == len(_OK_NONE_BYTES)
                                 and frame.tobytes() == _OK_NONE_BYTES)


def decode_reply(body: Body) -> Reply:
    if type(body) is bytes and body == _OK_NONE_BYTES:
        return _NOTHING
    values = decode(body)
    if type(values) is dict and len(values) == 1:
        if "ok" in values:
            return Reply(values["ok"])
        error = values.get("error")
        if type(error) is list and len(error) in (3, 4) and all(type(s) is str for s in error):
            return Reply(error=ErrorInfo(*error))
    raise ProtocolError(
        "a reply must be {'ok': value} or {'error': [type, message, traceback, (origin)]}"
    )
