"""The runtime's records: a command to answer (`Job`), a message whose commands wait
or run (`Incoming`), a command parked on other workers (`Task`, `Waiting`, the
`Request` it awaits), and what a supervised executor does around each command
(`Containment`)."""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from torchrelay.broker import Call, Command, Delivery, Frame, Store

__all__ = ["Containment", "Gather", "GatherPart", "Incoming", "Job", "ParkedCommand",
           "Request", "Task", "Waiting", "log_fields", "made_by"]


class Request:
    """Awaited by a handler: send `command` to `worker_id`, resume with its reply's value."""

    __slots__ = ("command", "confirm", "worker_id")

    def __init__(self, worker_id: str, command: Command, confirm: bool) -> None:
        self.worker_id = worker_id
        self.command = command
        self.confirm = confirm

    def __await__(self) -> Generator[Request, Any, Any]:
        return (yield self)


class Gather:
    """Awaited by a handler: send every one of `requests` at once, and resume with their
    outcomes in order — each the reply's value, or the exception that ended its wait
    (returned, not raised: one worker's failure is the handler's to weigh). A round of
    secure aggregation asks every owner at once rather than one after another."""

    __slots__ = ("requests",)

    def __init__(self, requests: list[Request]) -> None:
        self.requests = requests

    def __await__(self) -> Generator[Gather, Any, list[Any]]:
        outcomes: list[Any] = yield self
        return outcomes


@dataclass(frozen=True, slots=True)
class Job:
    """A command to answer: what (None if it could not be decoded), from whom, and
    where the answer goes."""

    name: str
    command: Command | None
    sender: str
    reply_to: str | None
    correlation_id: str

    def describe(self) -> str:
        return self.command.describe() if self.command is not None else self.name

    def objects(self) -> list[int]:
        """The object ids the command names (for the log)."""
        command = self.command
        if command is None:
            return []
        ids = [getattr(command, f, None) for f in ("id", "result_id", "plan")]
        ids += getattr(command, "ids", None) or getattr(command, "result_ids", None) or []
        return [i for i in ids if type(i) is int][:8]


@dataclass(slots=True)
class Task:
    """A command in progress that waits for other workers."""

    coroutine: Coroutine[Any, Any, Any]
    job: Job
    origin: str | None = None
    """Whom it acts for: what it sends on says so (`Envelope.origin`)."""
    parked: bool = False
    holds: Incoming | None = None
    """The message whose acknowledgement waits for this task (a move: were the daemon to
    die before its destination answered, the broker must deliver it again)."""


@dataclass(slots=True)
class Incoming:
    """A message whose commands wait or run (one, or a batch's): answered and acknowledged
    once all have run."""

    delivery: Delivery
    left: int
    replies: list[tuple[str, str, Frame]] | None
    """A batch's answers, sent together."""
    owed: list[Any] = field(default_factory=list)
    """Containment's tokens for the commands that ran and whose answers wait in `replies`."""
    held: int = 0
    """Moves of it still waiting on their destination (see `Task.holds`)."""
    started: bool = False


@dataclass(slots=True)
class GatherPart:
    """One request of a `Gather`: where its outcome goes, and how many are still out."""

    task: Task
    outcomes: list[Any]
    index: int
    left: list[int]
    """Shared by the parts of one gather: [requests still waiting]."""

    def done(self, value: Any, error: BaseException | None) -> bool:
        """Record this part's outcome; whether it was the last."""
        self.outcomes[self.index] = error if error is not None else value
        self.left[0] -= 1
        return self.left[0] == 0


@dataclass(slots=True)
class Waiting:
    task: Task | GatherPart
    request: Request
    deadline: float


@dataclass(frozen=True, slots=True)
class ParkedCommand:
    """What a new executor must do for a command its dead predecessor left waiting on
    another worker: answer `message` (it did not complete) and undo what was made for
    it — `remote` ids on `location`, `local` ids here. Kept by the supervisor as bytes
    (`encode`), in the snapshot it hands the next executor."""

    sender: str
    correlation_id: str
    reply_to: str | None
    name: str
    message: str
    location: str
    remote: list[int]
    local: list[int]

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb([self.sender, self.correlation_id, self.reply_to, self.name,
                              self.message, self.location, self.remote, self.local])
        return packed

    @classmethod
    def decode(cls, payload: bytes) -> ParkedCommand:
        return cls(*msgpack.unpackb(payload))


class Containment(Protocol):
    """What a supervised executor does around each command (see `_executor.py`)."""

    def begin(self, sender: str, correlation_id: str) -> None:
        """A command is in hand (written to the journal the supervisor watches)."""

    def commit(self) -> None:
        """Make what the store's objects became so far outlive a crash."""

    def done(self) -> None:
        """The command in hand ran to the end and was answered."""

    def ran(self, *, plain_ok: bool) -> Any:
        """The command in hand ran to the end; its answer (`plain_ok`: the plain "done")
        goes out later, with its batch's. A token for `answered`."""

    def answered(self, tokens: list[Any]) -> None:
        """The answers of the commands `ran` gave these tokens for went out."""

    def parked(self, sender: str, correlation_id: str, payload: bytes) -> None:
        """A command waits on another worker; `payload` is what a new executor must
        answer and undo for it if this one dies first (`settle_interrupted`)."""

    def unparked(self, sender: str, correlation_id: str) -> None:
        """The command parked under that key was answered."""


def made_by(asked: Command) -> list[int]:
    """What `asked` makes on the worker it goes to, which deleting there undoes: a copy
    stored (not one that replaced a pointer there, which is not ours to delete), a
    call's result."""
    if type(asked) is Store and not asked.replaces_pointer:
        return [asked.id]
    if type(asked) is Call and asked.result_id is not None:
        return [asked.result_id]
    return []


def log_fields(job: Job) -> dict[str, Any]:
    """A command's facts as separate fields of a log record (for `--log-format json`)."""
    return {"command": job.name, "sender": job.sender, "correlation_id": job.correlation_id,
            "objects": job.objects()}


