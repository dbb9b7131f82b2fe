"""The commands a worker understands and the replies it sends.

Pure data and pure functions, no I/O. Each command is declared once, as a class
decorated with `@command(name)`: its annotated fields are at once the dataclass,
the wire schema and the validation. `encode` walks those fields, `decode_command`
checks every one of them against its annotation — type, and for the annotated
aliases below the range or length too — so a handler can trust what it gets, and
malformed or hostile input becomes one `ProtocolError` naming what was wrong.
Adding a command is its declaration plus its handler.

A command travels as a message whose type is the command's name and whose body
is the codec's encoding of a map: the command's fields, plus the `Envelope`
fields that may ride along with any command. A reply carries either
`{"ok": value}` or `{"error": [type, message, traceback]}`, with a fourth item,
the origin, for an error relayed from further down a chain of pointers.
"""

from __future__ import annotations

import dataclasses
import math
import re
import traceback
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Final, TypeVar, dataclass_transform

from ._codec import Body, Frame, decode, encode
from ._errors import DecodeError, ProtocolError, RemoteError, RemotePrivateDataError

__all__ = [
    "BATCH",
    "COMMANDS",
    "MAX_BATCH",
    "MAX_HOPS",
    "MAX_PLAN_CALLS",
    "Aggregate",
    "Batched",
    "Call",
    "ChargePrivacy",
    "Command",
    "DefinePlan",
    "Delete",
    "Describe",
    "Envelope",
    "ErrorInfo",
    "Fetch",
    "Grant",
    "Meta",
    "ObjectId",
    "Pull",
    "Reply",
    "RunPlan",
    "Search",
    "Status",
    "Store",
    "Transfer",
    "WorkerId",
    "command",
    "decode_batch",
    "decode_command",
    "decode_reply",
    "decode_reply_batch",
    "encode_batch",
    "encode_reply_batch",
    "is_plain_ok",
    "session_and_number",
]

# -- constrained field types ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Range:
    """An integer field's inclusive bounds."""

    low: int
    high: int


@dataclass(frozen=True, slots=True)
class Text:
    """A string field's length bounds, and optionally the pattern it must match."""

    max_length: int
    pattern: str | None = None
    meaning: str = ""


MAX_OBJECT_ID: Final = (1 << 53) - 1
"""Ids are 53-bit: exact as JSON numbers, so monitoring tools show them faithfully."""

MAX_HOPS: Final = 32
"""How often a call may be forwarded down a pointer chain before it is refused."""

ObjectId = Annotated[int, Range(0, MAX_OBJECT_ID)]
Hops = Annotated[int, Range(0, MAX_HOPS)]
SequenceNumber = Annotated[int, Range(0, (1 << 63) - 1)]
OpName = Annotated[str, Text(255)]
WorkerId = Annotated[
    str,
    Text(128, r"[A-Za-z0-9][A-Za-z0-9_.-]*", "letters, digits, '_', '.' or '-'"),
]
Identity = Annotated[str, Text(255)]
Tag = Annotated[str, Text(64)]


# -- validators derived from annotations --------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Validator:
    check: Callable[[Any], bool]
    expected: str


def _validator(annotation: Any) -> _Validator:
    """How to check a decoded value against a field's annotation."""
    if annotation is Any:
        return _Validator(lambda v: True, "any value")
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return _constrained(args[0], args[1:])
    if annotation is int:
        return _constrained(int, (Range(-(1 << 63), (1 << 63) - 1),))
    if annotation is str:
        return _constrained(str, (Text(255),))
    if annotation is bool:
        return _Validator(lambda v: type(v) is bool, "a boolean")
    if annotation is float:
        return _Validator(lambda v: type(v) in (int, float) and math.isfinite(v),
                          "a finite number")
    if origin is list:
        (item,) = args
        if item is Any:
            return _Validator(lambda v: type(v) is list, "a list")
        inner = _validator(item).check
        return _Validator(
            lambda v: type(v) is list and all(inner(i) for i in v),
            f"a list of {_validator(item).expected}",
        )
    if origin is dict and args == (str, Any):
        return _Validator(
            lambda v: type(v) is dict and all(type(k) is str for k in v), "a map with string keys"
        )
    if origin in (typing.Union, _UNION_TYPE) and len(args) == 2 and type(None) in args:
        (inner_type,) = [a for a in args if a is not type(None)]
        inner_validator = _validator(inner_type)
        check = inner_validator.check
        return _Validator(lambda v: v is None or check(v), f"{inner_validator.expected} or nil")
    raise TypeError(f"no wire validation for fields annotated {annotation!r}")


_UNION_TYPE = type(int | None)


def _constrained(base: type, constraints: tuple[Any, ...]) -> _Validator:
    (constraint,) = constraints
    if base is int and isinstance(constraint, Range):
        low, high = constraint.low, constraint.high
        return _Validator(
            lambda v: type(v) is int and low <= v <= high, f"an integer from {low} to {high}"
        )
    if base is str and isinstance(constraint, Text):
        longest = constraint.max_length
        if constraint.pattern is None:
            return _Validator(
                lambda v: type(v) is str and 0 < len(v) <= longest,
                f"a non-empty string of at most {longest} characters",
            )
        matches = re.compile(constraint.pattern).fullmatch
        return _Validator(
            lambda v: type(v) is str and 0 < len(v) <= longest and matches(v) is not None,
            f"1 to {longest} {constraint.meaning}",
        )
    raise TypeError(f"no wire validation for {base.__name__} with {constraint!r}")


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    validator: _Validator
    required: bool


@dataclass(frozen=True, slots=True)
class _Schema:
    """The wire form of one declared class: its fields, in declaration order."""

    owner: str
    fields: tuple[_Field, ...]
    names: frozenset[str]
    checks: dict[str, Callable[[Any], bool]]
    """name -> check of every field, for the hot path of `validate`."""
    required: int
    """How many fields must be given."""

    @classmethod
    def of(cls, owner: str, declared: type) -> _Schema:
        hints = typing.get_type_hints(declared, include_extras=True)
        fields = tuple(
            _Field(
                f.name,
                _validator(hints[f.name]),
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(declared)
        )
        checks = {f.name: f.validator.check for f in fields}
        return cls(owner, fields, frozenset(checks), checks, sum(f.required for f in fields))

    def validate(self, values: dict[Any, Any]) -> None:
        """Raise `ProtocolError` unless `values` holds exactly valid fields of this schema."""
        checks = self.checks
        for key, value in values.items():
            check = checks.get(key)
            if check is None or not check(value):
                self._explain(values)
        if len(values) < len(checks) and len(values) - sum(
            1 for f in self.fields if not f.required and f.name in values
        ) < self.required:
            self._explain(values)

    def _explain(self, values: dict[Any, Any]) -> None:
        """Raise the `ProtocolError` that says what is wrong with `values`, if anything."""
        if not values.keys() <= self.names:
            unknown = sorted(str(k) for k in values.keys() - self.names)
            raise ProtocolError(f"{self.owner}: unknown fields {unknown}")
        missing = sorted(f.name for f in self.fields if f.required and f.name not in values)
        if missing:
            raise ProtocolError(f"{self.owner}: missing fields {missing}")
        for f in self.fields:
            if f.name in values and not f.validator.check(values[f.name]):
                raise ProtocolError(
                    f"{self.owner}: field {f.name!r} must be {f.validator.expected}, "
                    f"got {_shown(values[f.name])}"
                )


def _shown(value: Any) -> str:
    """A value named in an error: its type, and short scalars themselves."""
    if type(value) in (int, bool) or (type(value) is str and len(value) <= 40):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


# -- commands -------------------------------------------------------------------------------


class Command:
    """Base of every command. Subclasses are declared with `@command(name)`."""

    __slots__ = ()
    name: ClassVar[str]
    _schema: ClassVar[_Schema]
    _names: ClassVar[tuple[str, ...]]

    def encode(self, envelope: Envelope | None = None) -> Frame:
        """The message body, with `envelope` riding along."""
        return encode(self.fields(envelope))

    def fields(self, envelope: Envelope | None = None) -> dict[str, Any]:
        """The map a message body encodes: the fields, and those of `envelope`."""
        values = {key: getattr(self, key) for key in self._names}
        if envelope is not None:
            if envelope.garbage:
                values["garbage"] = envelope.garbage
            if envelope.guard is not None:
                values["guard"] = envelope.guard
            if envelope.origin is not None:
                values["origin"] = envelope.origin
        return values

    def describe(self) -> str:
        """A short human-readable description, for error messages."""
        return self.name


COMMANDS: dict[str, type[Command]] = {}
"""Every command by its wire name."""

_C = TypeVar("_C", bound=type[Command])


@dataclass_transform(frozen_default=True)
def command(name: str) -> Callable[[_C], _C]:
    """Declare a command: a frozen dataclass whose annotations are its wire schema."""

    def declare(cls: _C) -> _C:
        if name in COMMANDS:
            raise TypeError(f"command {name!r} is declared twice")
        cls.name = name
        made = typing.cast(_C, dataclass(frozen=True, slots=True)(cls))
        made._schema = _Schema.of(name, made)
        made._names = tuple(f.name for f in made._schema.fields)
        clash = made._schema.names & _ENVELOPE.names
        if clash:
            raise TypeError(f"command {name!r} uses the envelope's field names {sorted(clash)}")
        COMMANDS[name] = made
        return made

    return declare


@dataclass(frozen=True, slots=True)
class Envelope:
    """What may ride along with any command.

    `garbage`: ids of dead pointers' targets, deleted before the command runs, so
    garbage collection costs no message of its own.

    `guard`: set on a command the client waits for when it was published right
    behind commands whose replies have not come back yet. It is the sequence
    number (see `session_and_number`) of the oldest of them: if any command of
    the same session from that one on failed on this worker, the guarded command
    is refused instead of run, so that a destructive call (a `get`, a move) never
    runs behind a failure its caller has not yet been told about.

    `origin`: set by a worker on what it sends on behalf of a command it runs (a call
    forwarded down a chain, deletes behind it): the participant that command came from,
    or its own origin. A worker schedules it with that participant's commands, in their
    order (`worker/_fairness.py`): what a client caused elsewhere does not overtake what
    it sent directly. Only scheduling reads it.
    """

    garbage: list[ObjectId] = field(default_factory=list)
    guard: SequenceNumber | None = None
    origin: Identity | None = None


_ENVELOPE: Final = _Schema.of("envelope", Envelope)
_NO_ENVELOPE: Final = Envelope()


@command("store")
class Store(Command):
    """Store `value` under `id`. With `replaces_pointer`, the id must hold a pointer
    to the sender's object (the end of a `Pull`), which the value replaces."""

    id: ObjectId
    value: Any
    provenance: list[Identity] = field(default_factory=list)
    replaces_pointer: bool = False
    holders: list[Identity] = field(default_factory=list)
    """Who else may use it (a move keeps the moved object's holders)."""


@command("grant")
class Grant(Command):
    """Let `to` use object `id` too (a pointer to it was sent on to `to`)."""

    id: ObjectId
    to: Identity


@command("fetch")
class Fetch(Command):
    """Return the object under `id` and remove it (`.get()`)."""

    id: ObjectId


@command("delete")
class Delete(Command):
    """Delete objects; pointers among them delete their targets too."""

    ids: list[ObjectId]


@command("call")
class Call(Command):
    """Run the allow-listed operation `op` and store its result under `result_id`.

    Arguments may hold `ObjectRef`s to objects on the receiving worker. `hops`
    counts the workers that forwarded it so far (a bound on cycles of pointers).
    """

    op: OpName
    args: list[Any]
    kwargs: dict[str, Any]
    result_id: ObjectId | None
    hops: Hops = 0
    holders: list[Identity] = field(default_factory=list)
    """Who else may use the result: the participants a forwarded call acts for."""

    def describe(self) -> str:
        return f"call {self.op}"


MAX_PLAN_CALLS: Final = 4096
"""The most operations one plan may hold."""


@command("define_plan")
class DefinePlan(Command):
    """Keep under `id` a plan: `calls` (each the fields of a `call`) to run in order
    each time `run_plan` binds values to its `parameters`, the ids its calls take as
    inputs. The calls' results are the plan's own, not stored; of them, `returns`
    are kept by each run. A plan holds allow-listed operations only, and each runs
    with the same checks as a `call` of its own."""

    id: ObjectId
    parameters: list[ObjectId]
    calls: list[dict[str, Any]]
    returns: list[ObjectId]

    def describe(self) -> str:
        return f"define a plan of {len(self.calls)} operations"

    def call_commands(self) -> list[Call]:
        """The plan's calls, each validated as a `call` is; `ProtocolError` names a bad one."""
        if len(self.calls) > MAX_PLAN_CALLS:
            raise ProtocolError(f"define_plan: {len(self.calls)} calls, more than the "
                                f"{MAX_PLAN_CALLS} a plan may hold")
        calls = []
        for number, fields in enumerate(self.calls):
            if fields.keys() & _ENVELOPE.names:
                raise ProtocolError(f"define_plan: call {number} carries envelope fields")
            try:
                call, _ = _command(Call, dict(fields))
            except ProtocolError as e:
                raise ProtocolError(f"define_plan: call {number}: {e}") from None
            calls.append(typing.cast(Call, call))
        return calls


@command("run_plan")
class RunPlan(Command):
    """Run the plan under `plan` with `arguments` (values, or `ObjectRef`s to objects
    here) bound to its parameters, and store what it returns under `result_ids`."""

    plan: ObjectId
    arguments: list[Any]
    result_ids: list[ObjectId]

    def describe(self) -> str:
        return "run a plan"


@command("aggregate")
class Aggregate(Command):
    """Release the weighted average of `contributions` (each a list of tensor ids, all
    of the same shapes: a tensor, or a model's tensors) under `result_id`. If any
    derives from private data, each must derive from one data owner's, no two from
    the same, and the release is differentially private: each clipped to its owner's
    bound, Gaussian noise added, each owner's budget charged (`charge_privacy`).
    The contributions are spent. Returns what each owner's budget now shows."""

    contributions: list[list[ObjectId]]
    weights: list[float]
    result_id: ObjectId

    def describe(self) -> str:
        return f"aggregate {len(self.contributions)} contributions"


@command("charge_privacy")
class ChargePrivacy(Command):
    """From a worker about to release an aggregate holding one contribution of the
    receiver's private data among `contributors`: charge that release to the
    receiver's privacy budget (refused if it is not trusted, if `contributors` is
    fewer than the receiver's `k`, or if the budget would be exceeded), and answer
    the receiver's privacy policy and the epsilon spent."""

    contributors: Annotated[int, Range(1, 1 << 20)]

    def describe(self) -> str:
        return "charge a release to the privacy budget"


@command("transfer")
class Transfer(Command):
    """Send the object under `id` to `destination` (stored there as `destination_id`).

    The holder removes its copy only once the destination confirmed storing it;
    with `keep_pointer` it keeps a pointer to the new location instead (`remote_send`).
    `replaces_pointer` is passed on to the destination's `Store`.
    """

    id: ObjectId
    destination: WorkerId
    destination_id: ObjectId
    keep_pointer: bool = False
    replaces_pointer: bool = False

    def describe(self) -> str:
        return f"transfer to {self.destination}"


@command("pull")
class Pull(Command):
    """The object under `id` is a pointer: fetch its target here (`remote_get`)."""

    id: ObjectId


@command("meta")
class Meta(Command):
    """Return `[dtype, shape, requires_grad]` of the tensor under `id`, wherever
    down a chain of pointers it is: what a tensor shows without its values."""

    id: ObjectId
    hops: Hops = 0


@command("search")
class Search(Command):
    """Return what the worker's datasets holding every one of `tags` are: for each, its
    id, name, tags, description, and its tensors' dtypes and shapes (no values)."""

    tags: list[Tag]


@command("describe")
class Describe(Command):
    """Return `{id: short description}` of every stored object."""


@command("status")
class Status(Command):
    """Return the worker's health and counters."""


def decode_command(name: str, body: Body) -> tuple[Command, Envelope]:
    """Decode and validate a command and its envelope.

    Raises `ProtocolError` naming what was wrong.
    """
    cls = COMMANDS.get(name)
    if cls is None:
        raise ProtocolError(f"unknown command {name!r}; known commands: {', '.join(COMMANDS)}")
    return _command(cls, decode(body))


def _command(cls: type[Command], values: Any) -> tuple[Command, Envelope]:
    name = cls.name
    if type(values) is not dict:
        raise DecodeError(f"{name}: the body must be a map of fields, not {type(values).__name__}")
    envelope = _NO_ENVELOPE
    garbage = values.pop("garbage", None)
    guard = values.pop("guard", None)
    origin = values.pop("origin", None)
    if garbage is not None or guard is not None or origin is not None:
        if not ((garbage is None or (type(garbage) is list and all(
            type(i) is int and 0 <= i <= MAX_OBJECT_ID for i in garbage
        ))) and (guard is None or (type(guard) is int and 0 <= guard < 1 << 63)) and (
            origin is None or (type(origin) is str and 0 < len(origin) <= 255))):
            carried = {"garbage": garbage} if garbage is not None else {}
            if guard is not None:
                carried["guard"] = guard
            if origin is not None:
                carried["origin"] = origin
            _ENVELOPE.validate(carried)  # raises, naming what is wrong
        envelope = Envelope(garbage if garbage is not None else [], guard, origin)
    cls._schema.validate(values)
    return cls(**values), envelope


BATCH: Final = "batch"
"""The type of a message carrying several commands to one worker, run in their order."""

MAX_BATCH: Final = 1024
"""Commands one batch may carry."""


@dataclass(frozen=True, slots=True)
class Batched:
    """One command of a batch: its correlation id, and the command or why it is invalid."""

    name: str
    correlation_id: str
    command: Command | None
    envelope: Envelope
    error: ProtocolError | None = None


def encode_batch(items: Sequence[tuple[Command, str, Envelope | None]]) -> Frame:
    """One message body for `(command, correlation id, envelope)`s, in order."""
    return encode({"commands": [[command.name, correlation_id, command.fields(envelope)]
                                for command, correlation_id, envelope in items]})


def decode_batch(body: Body) -> list[Batched]:
    """The commands of a batch, each decoded and validated on its own: one that is
    invalid comes with its error, and the others are not lost with it.

    Raises `ProtocolError` if the batch itself is malformed.
    """
    values = decode(body)
    items = values.get("commands") if type(values) is dict and len(values) == 1 else None
    if type(items) is not list or not 0 < len(items) <= MAX_BATCH:
        raise ProtocolError(f"a batch must be {{'commands': [1 to {MAX_BATCH} commands]}}")
    batch = []
    for item in items:
        if not (type(item) is list and len(item) == 3 and type(item[0]) is str
                and type(item[1]) is str and 0 < len(item[1]) <= 255):
            raise ProtocolError("a batched command must be [name, correlation id, fields]")
        name, correlation_id, fields = item
        cls = COMMANDS.get(name)
        try:
            if cls is None:
                raise ProtocolError(f"unknown command {name[:64]!r}")
            command, envelope = _command(cls, fields)
        except ProtocolError as e:
            batch.append(Batched(name if cls else "invalid", correlation_id, None,
                                 _NO_ENVELOPE, e))
        else:
            batch.append(Batched(name, correlation_id, command, envelope))
    return batch


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
        kind = (RemotePrivateDataError if self.type.endswith(".PrivateDataError")
                else RemoteError)
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
