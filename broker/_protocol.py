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

import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Final, TypeVar, dataclass_transform

from ._codec import Body, Frame, decode, encode
from ._errors import DecodeError, ProtocolError
from ._schema import Range, Schema, Text

__all__ = [
    "BATCH",
    "COMMANDS",
    "MAX_BATCH",
    "MAX_HOPS",
    "MAX_PLAN_CALLS",
    "Batched",
    "Call",
    "Command",
    "DefinePlan",
    "Delete",
    "Describe",
    "Envelope",
    "Fetch",
    "Grant",
    "Meta",
    "ObjectId",
    "Pull",
    "RunPlan",
    "Search",
    "Status",
    "Store",
    "Transfer",
    "WorkerId",
    "command",
    "decode_batch",
    "decode_command",
    "encode_batch",
]

# -- field types ---------------------------------------------------------------------


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
OptimizerName = Annotated[str, Text(16, r"[a-z]+", "lower-case letters")]
RoundId = Annotated[str, Text(32, r"[0-9a-f]{32}", "32 hexadecimal digits")]
HexText = Annotated[str, Text(1024, r"[0-9a-f]*", "hexadecimal digits")]
Signature = Annotated[str, Text(128, r"[0-9a-f]{128}", "hexadecimal digits of an Ed25519 "
                                                      "signature")]
Dimension = Annotated[int, Range(0, 1 << 40)]


# -- commands -------------------------------------------------------------------------------


class Command:
    """Base of every command. Subclasses are declared with `@command(name)`."""

    __slots__ = ()
    name: ClassVar[str]
    _schema: ClassVar[Schema]
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
        made._schema = Schema.of(name, made)
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
    order (`worker/runtime/_fairness.py`): what a client caused elsewhere does not overtake what
    it sent directly. Only scheduling reads it.
    """

    garbage: list[ObjectId] = field(default_factory=list)
    guard: SequenceNumber | None = None
    origin: Identity | None = None


_ENVELOPE: Final = Schema.of("envelope", Envelope)
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
    fetch: bool = False
    """Then `fetch` the result, as that command would, with every check of it: the
    answer is its value (`(x + x).get()` as one command; down a chain of pointers, the
    pointer to it). Never in a plan."""

    def describe(self) -> str:
        return f"call {self.op} and fetch its result" if self.fetch else f"call {self.op}"

    def fields(self, envelope: Envelope | None = None) -> dict[str, Any]:
        values = Command.fields(self, envelope)
        if not self.fetch:  # a call as it was before the field: a worker of then takes it
            del values["fetch"]
        return values


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


# The commands declared apart, registered in COMMANDS now (see that module's docstring).
from . import _protocol_private  # noqa: E402, F401
