"""A worker's behaviour: commands in, replies out, no I/O of its own.

The runtime is handed deliveries by whoever drives it (the daemon's loop on
RabbitMQ, the embedded broker's loop in-process) and answers through its
endpoint. It never blocks. Most commands are plain functions, answered at once.
One that needs another worker — an operation on pointers forwarded down a
chain, a transfer waiting for the destination to confirm — returns a coroutine
that awaits a `_Request`; the runtime publishes the request, parks the
coroutine under the request's correlation id and resumes it when the reply
arrives. Meanwhile it keeps serving, so chains with cycles (alice -> bob ->
alice) cannot deadlock.

A worker replies to a command only once everything it caused has happened,
down the whole chain. A caller that has all its replies therefore sees every
effect of its commands, on every worker.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, field
from pathlib import Path
from types import CoroutineType
from typing import Any, Protocol

import msgpack
import torch

from torchrelay.broker import (
    BATCH,
    COMMANDS,
    GONE_CHECK_SECONDS,
    MAX_HOPS,
    Aggregate,
    Batched,
    BrokerError,
    Call,
    ChargePrivacy,
    Command,
    DefinePlan,
    Delete,
    Delivery,
    Describe,
    EarlierFailure,
    EncodeError,
    Endpoint,
    Envelope,
    ErrorInfo,
    Fetch,
    Frame,
    GoneWatch,
    Grant,
    Meta,
    ObjectRef,
    OperationRefused,
    PointerRef,
    PrivateDataError,
    ProtocolError,
    Pull,
    Reply,
    ReplyTimeout,
    RunPlan,
    Search,
    Status,
    Store,
    TorchRelayError,
    Transfer,
    UnknownWorker,
    decode_batch,
    decode_command,
    decode_reply,
    encode_reply_batch,
    gone_message,
    is_inplace,
    is_plain_ok,
    is_reply_queue_of,
    new_object_id,
    resolve_op,
    session_and_number,
    worker_queue,
)

from ._aggregation import AggregationPlan
from ._checks import check_arguments, check_result
from ._config import WorkerConfig
from ._datasets import Dataset, dataset_id
from ._fairness import FairQueue, Strikes
from ._faults import FAULT_OPERATIONS
from ._faults import PREFIX as FAULT_PREFIX
from ._leases import DEFAULT_LEASE, Leases
from ._limits import BudgetExceeded, Limits
from ._oblivious import PrivateExecution
from ._pacing import Pacer
from ._plans import RecordedPlan, check_plan
from ._privacy import BudgetSpent, PrivacyBudget, PrivacyPolicy
from ._store import EVERYONE, ObjectStore, StoredObject, graph_leaves

__all__ = ["WorkerRuntime"]

DEFAULT_PRESENCE_INTERVAL = 10.0
"""Seconds between two heartbeats of a worker on the events exchange."""

log = logging.getLogger("torchrelay.worker")

_Handler = Callable[[Any, str], Any]  # a value, or a coroutine that awaits requests

_REMEMBERED_COMMANDS = 4096
"""Commands remembered by (sender, correlation id), so one redelivered after a
reconnect is not run twice; more than the prefetch window can hold unacknowledged."""

_BATCHED_REPLY_BYTES = 64 << 10
"""Replies to a batch's commands up to this size go back together; larger ones alone."""

_REMEMBERED_SESSIONS = 4096
"""Sessions whose last failure is remembered, for guarded commands (`Envelope.guard`)."""


class _Request:
    """Awaited by a handler: send `command` to `worker_id`, resume with its reply's value."""

    __slots__ = ("command", "confirm", "worker_id")

    def __init__(self, worker_id: str, command: Command, confirm: bool) -> None:
        self.worker_id = worker_id
        self.command = command
        self.confirm = confirm

    def __await__(self) -> Generator[_Request, Any, Any]:
        return (yield self)


@dataclass(frozen=True, slots=True)
class _Job:
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
class _Task:
    """A command in progress that waits for other workers."""

    coroutine: Coroutine[Any, Any, Any]
    job: _Job
    origin: str | None = None
    """Whom it acts for: what it sends on says so (`Envelope.origin`)."""
    parked: bool = False
    holds: _Incoming | None = None
    """The message whose acknowledgement waits for this task (a move: were the daemon to
    die before its destination answered, the broker must deliver it again)."""


@dataclass(slots=True)
class _Incoming:
    """A message whose commands wait or run (one, or a batch's): answered and acknowledged
    once all have run."""

    delivery: Delivery
    left: int
    replies: list[tuple[str, str, Frame]] | None
    """A batch's answers, sent together."""
    owed: list[Any] = field(default_factory=list)
    """Containment's tokens for the commands that ran and whose answers wait in `replies`."""
    held: int = 0
    """Moves of it still waiting on their destination (see `_Task.holds`)."""
    started: bool = False


@dataclass(slots=True)
class _Waiting:
    task: _Task
    request: _Request
    deadline: float


@dataclass(frozen=True, slots=True)
class _Encoded:
    """A reply value already encoded (so the handler can act once it surely travels)."""

    frame: Frame


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


class WorkerRuntime:
    """The worker named `worker_id`, answering through `endpoint`."""

    def __init__(
        self,
        worker_id: str,
        endpoint: Endpoint,
        *,
        reply_timeout: float = 60.0,
        limits: Limits | None = None,
        store: ObjectStore | None = None,
        containment: Containment | None = None,
        status_facts: dict[str, Any] | None = None,
        privacy: PrivacyPolicy | None = None,
        ledger: Path | None = None,
        lease: float = DEFAULT_LEASE,
        dataset_clients: tuple[str, ...] | None = None,
        presence_interval: float = DEFAULT_PRESENCE_INTERVAL,
        fault_injection: bool = False,
        paced: bool = False,
        sender_max_queued: int | None = None,
        sender_strikes: int = 3,
        sender_penalty: float = 300.0,
    ) -> None:
        self.id = worker_id
        self.fault_injection = fault_injection
        """Whether the test suite's fault-injection operations exist here (`_faults.py`)."""
        self.dataset_holders = EVERYONE if dataset_clients is None else frozenset(
            dataset_clients)
        """Who may use this worker's datasets (`clients` in its config; everyone)."""
        self.endpoint = endpoint
        endpoint.awaiting = lambda: bool(self._waiting)
        endpoint.answer_now = self._answer_now
        self.limits = limits or Limits()
        self.store = (
            store if store is not None else ObjectStore(worker_id, self.limits.max_bytes)
        )
        self.containment = containment
        self.privacy = privacy or PrivacyPolicy()
        """This worker's rules for its private data (see `_privacy.py`)."""
        self.budget = PrivacyBudget(self.privacy, ledger)
        self.private_execution = PrivateExecution(self.limits, Pacer() if paced else None)
        """Runs operations on private-derived data so that only shapes show (and, `paced`,
        their time only a public schedule: a daemon's clients can time it; in process,
        the client shares the worker's memory and clock anyway)."""
        self._status_facts = status_facts or {}
        self.poisoned: dict[tuple[str, str], str] = {}
        """Commands (sender, correlation id) that crashed or overran an executor before,
        and how: refused and dead-lettered if they come again."""
        self.lost_graphs: set[int] = set()
        """Objects restored after a crash whose autograd graph died with the executor."""
        self.reply_timeout = reply_timeout
        self._incoming: _Incoming | None = None  # whose commands run now
        self.queue: FairQueue[tuple[_Incoming, Batched]] = FairQueue()
        """Commands received and waiting to run, one queue per sender (`_fairness.py`)."""
        self.sender_max_queued = sender_max_queued
        self.strikes = Strikes(sender_strikes, sender_penalty)
        self._in_hand: tuple[str, str, float] | None = None  # sender, what, since
        self._origin: str | None = None  # whom the command running acts for
        self._holders: dict[str, dict[str, int]] = {}  # as the last status walked them
        self._thread = threading.get_ident()  # the one that runs commands
        self._waiting: dict[str, _Waiting] = {}
        self._recent: dict[tuple[str, str], None] = {}  # insertion-ordered: oldest first
        self._owed: dict[tuple[str, str], bool] = {}  # ran, never answered (see above)
        # (sender, session) -> number and description of its last failed command.
        self._failures: dict[tuple[str, str], tuple[int, str]] = {}
        self._started = time.time()
        self._handled = 0
        self._failed = 0
        self._forged_replies = 0
        self._misdirected = 0
        self._misdirected_from: set[str] = set()
        self.leases = None if endpoint.in_process else Leases(
            lease, endpoint.queue_consumers,
            lambda identity: endpoint.queue_consumers(worker_queue(identity)) is not None)
        """Who is still there, so that the objects of who is not are reclaimed."""
        self.presence_interval = presence_interval
        # A daemon's operator reads its log; in-process, the caller gets the exception.
        self._failure_level = logging.DEBUG if endpoint.in_process else logging.WARNING
        self._next_heartbeat = 0.0
        self._gone = GoneWatch(endpoint)
        self._next_gone_check = 0.0
        self._request_numbers = 0
        self._prefix = f"{worker_id}.{secrets.token_hex(4)}."  # unique per run, as a client's
        self._random = random.Random()
        self._handlers: dict[type[Command], _Handler] = {
            Store: self._store,
            Fetch: self._fetch,
            Delete: self._delete,
            Call: self._call,
            Transfer: self._transfer,
            Pull: self._pull,
            Meta: self._meta,
            Describe: self._describe,
            Grant: self._grant,
            Status: self._status,
            Search: self._search,
            ChargePrivacy: self._charge_privacy,
            Aggregate: self._aggregate,
            DefinePlan: self._define_plan,
            RunPlan: self._run_plan,
        }

    @classmethod
    def for_config(cls, config: WorkerConfig, endpoint: Endpoint,
                   **extra: Any) -> WorkerRuntime:
        """The runtime a daemon with `config` serves with (`extra`: what a supervised
        executor adds, its store and containment)."""
        return cls(config.id, endpoint, reply_timeout=config.reply_timeout,
                   limits=config.limits, privacy=config.privacy, ledger=config.ledger,
                   lease=config.lease, dataset_clients=config.clients,
                   presence_interval=config.presence_interval,
                   fault_injection=config.fault_injection, paced=True,
                   sender_max_queued=config.sender_max_queued,
                   sender_strikes=config.sender_strikes, sender_penalty=config.sender_penalty,
                   **extra)

    # -- driving ---------------------------------------------------------------

    def handle(self, delivery: Delivery) -> None:
        """Take one delivery and run what it brought (the embedded broker's way: one
        delivery at a time, everything answered before the next)."""
        self.accept(delivery)
        while self.step():
            pass

    def accept(self, delivery: Delivery) -> None:
        """Take one delivery: a reply resumes what waited for it; a command (or a batch's)
        joins its sender's queue, to run when `step` picks it; a message refused for good
        is answered and acknowledged at once."""
        containment = self.containment
        if delivery.is_reply:
            self._resume(delivery)
            if containment is not None:
                containment.commit()
            return
        reply_to = delivery.reply_to
        if reply_to is not None and not is_reply_queue_of(reply_to, delivery.sender):
            # Answered, it would land in another's reply queue, under whatever correlation
            # id it carries: its asker would take it for the answer to its own command.
            self._misdirected += 1
            if delivery.sender not in self._misdirected_from and len(
                    self._misdirected_from) < 1000:
                self._misdirected_from.add(delivery.sender)
                log.warning("dropped a %s from %r whose answer was to go to %r, not one of its "
                            "own reply queues (further ones from it are only counted)",
                            delivery.type[:64], delivery.sender[:100], reply_to[:200])
            self.endpoint.ack(delivery)
            return
        replies: list[tuple[str, str, Frame]] | None = None
        if delivery.refused is not None:  # the transport could not take it whole
            items = [self._unreadable(delivery, ProtocolError(delivery.refused))]
        elif delivery.type != BATCH:
            items = [self._single(delivery)]
        else:
            try:
                items = decode_batch(delivery.body)
                replies = []  # the answers to a batch's commands go back together
            except ProtocolError as e:
                log.warning("refused a malformed batch from %s: %s", delivery.sender, e)
                items = [self._unreadable(delivery, e)]
        incoming = _Incoming(delivery, len(items), replies)
        sender = delivery.sender
        refusal = self._sender_refusal(delivery)
        if refusal is not None:  # every command of it answered so, none run
            self._incoming = incoming
            try:
                for item in items:
                    self._finish(_Job(item.name, item.command, sender, reply_to,
                                      item.correlation_id), None, refusal)
            finally:
                self._incoming = None
            incoming.left = 0
            self._complete(incoming, counted=False)
            return
        held = self.queue.held
        held[sender] = held.get(sender, 0) + 1
        for item in items:  # (in the order of whom it acts for: see Envelope.origin)
            self.queue.push(item.envelope.origin or sender, (incoming, item))

    def _sender_refusal(self, delivery: Delivery) -> TorchRelayError | None:
        """Why a message's commands are refused before any runs: its sender is past a
        limit (`_fairness.py`)."""
        sender = delivery.sender
        # (A command that struck comes again once: the poisoned commands' refusal says why.)
        until = None if delivery.redelivered else self.strikes.refused_until(sender)
        if until is not None:
            return OperationRefused(
                f"worker {self.id!r} refuses commands from {sender!r} for "
                f"{until - time.time():.0f} s more: {self.strikes.limit} of its commands ran "
                f"past its command_timeout ({self.limits.command_timeout:g} s) or crashed its "
                f"executor within {self.strikes.penalty:g} s (sender_strikes, sender_penalty)")
        limit = self.sender_max_queued
        if limit is not None and self.queue.held.get(sender, 0) >= limit and (
                delivery.type != Delete.name):  # (garbage is never refused: it would stay)
            return OperationRefused(
                f"worker {self.id!r} already holds {self.sender_max_queued} messages of "
                f"{sender!r} waiting to run (sender_max_queued): wait for their answers "
                "before sending more")
        return None

    def step(self) -> bool:
        """Run the next command, the fairest sender's (`_fairness.py`); whether one ran."""
        if not self.queue:
            return False
        sender, (incoming, item) = self.queue.pop()
        self._run_job(sender, incoming, item)
        return True

    def _run_job(self, sender: str, incoming: _Incoming, item: Batched) -> None:
        incoming.started = True
        self._incoming = incoming
        self._origin = sender  # (the queue's key: whom it acts for)
        started = time.monotonic()
        self._in_hand = (sender, item.name, started)
        try:
            self._handle_one(incoming.delivery, item)
        finally:
            self._incoming = self._in_hand = self._origin = None
            self.queue.charge(sender, time.monotonic() - started)
            incoming.left -= 1
            if not incoming.left:
                self._complete(incoming)

    @property
    def queued(self) -> int:
        """Commands received and waiting to run."""
        return len(self.queue)

    def finish_started(self) -> None:
        """Run what is left of the messages whose commands began to run (a stopping daemon
        does not cut a batch in two). The others stay unacknowledged: the broker delivers
        them again, to whoever serves the worker next."""
        kept: list[tuple[str, tuple[_Incoming, Batched]]] = []
        while self.queue:
            sender, (incoming, item) = self.queue.pop()
            if incoming.started:
                self._run_job(sender, incoming, item)
            else:
                kept.append((sender, (incoming, item)))
        for sender, job in kept:
            self.queue.push(sender, job)

    def _complete(self, incoming: _Incoming, *, counted: bool = True) -> None:
        """All of a message's commands ran: its answers go out, it is acknowledged (a move
        still waiting on its destination holds the acknowledgement back)."""
        sender = incoming.delivery.sender
        if counted:  # (among its sender's messages waiting here)
            held = self.queue.held
            count = held.get(sender, 1) - 1
            if count:
                held[sender] = count
            else:
                held.pop(sender, None)
        replies = incoming.replies
        delivery = incoming.delivery
        if replies and delivery.reply_to:
            self._send_replies(delivery.reply_to, delivery.correlation_id, replies,
                               incoming.owed)
        if not incoming.held:
            self.endpoint.ack(delivery)

    def _release(self, task: _Task) -> None:
        """A move's task ended: the message it held back may be acknowledged now."""
        incoming = task.holds
        if incoming is not None:
            task.holds = None
            incoming.held -= 1
            if not incoming.held and not incoming.left:
                self.endpoint.ack(incoming.delivery)

    def _unreadable(self, delivery: Delivery, error: ProtocolError) -> Batched:
        """A message that cannot be read, as a command that is answered `error` (in its
        turn among its sender's)."""
        # Never echo an unknown type: it is the sender's text, of any length.
        name = delivery.type if delivery.type in COMMANDS or delivery.type == BATCH else (
            "invalid")
        return Batched(name, delivery.correlation_id, None, _PLAIN, error)

    def _single(self, delivery: Delivery) -> Batched:
        try:
            command, envelope = decode_command(delivery.type, delivery.body)
        except ProtocolError as e:
            # Never echo an unknown type: it is the sender's text, of any length.
            name = delivery.type if delivery.type in COMMANDS else "invalid"
            return Batched(name, delivery.correlation_id, None, _PLAIN, e)
        return Batched(delivery.type, delivery.correlation_id, command, envelope)

    def _handle_one(self, delivery: Delivery, item: Batched) -> None:
        key = (delivery.sender, item.correlation_id)
        job = _Job(item.name, item.command, delivery.sender, delivery.reply_to,
                   item.correlation_id)
        poisoned = self.poisoned.get(key)
        if poisoned is not None:
            log.warning("refused %s %s from %s again: it %s", item.name, item.correlation_id,
                        delivery.sender, poisoned)
            settled = ""
            if type(item.command) is Transfer and delivery.redelivered:
                # It may have sent its copy before the crash: the restored object here
                # is the one, and the other goes. (Only the copy the broker delivers
                # again: anyone can send a new command under an old correlation id.)
                self._unsend(item.command)
                settled = (f"; object {item.command.id} is still here, and any copy "
                           f"that reached {item.command.destination!r} is deleted")
            self._finish(job, None, OperationRefused(
                f"this command {poisoned}; the worker restarted with its objects and will "
                f"not run it again{settled}"
            ))
            if item.command is not None:  # to the dead-letter queue, for a person to see
                self.endpoint.dead_letter(item.name, item.command.encode(item.envelope),
                                          item.correlation_id, delivery.sender, poisoned)
            return
        if delivery.redelivered and key in self._recent:
            # Ran already; its acknowledgement was lost with a connection (or with an
            # executor that crashed later). Running it again could apply an in-place
            # operation twice.
            log.info("skipped %s %s from %s: it already ran", item.name, item.correlation_id,
                     delivery.sender)
            owed = self._owed.pop(key, None)
            if owed is not None:  # its answer, due with its batch's, died with the executor
                self._finish(job, None, None if owed else OperationRefused(
                    f"this command ran, but worker {self.id!r} restarted before its answer "
                    "went out, and the answer was lost with it (what it did stands)"))
            return
        if self.leases is not None:
            self.leases.saw(delivery.sender, delivery.reply_to, time.monotonic())
        recent = self._recent
        recent[key] = None
        if len(recent) > _REMEMBERED_COMMANDS:
            del recent[next(iter(recent))]
        self._handled += 1
        if item.command is None:
            log.warning("refused a malformed %r command from %s: %s", item.name[:64],
                        delivery.sender, item.error)
            self._finish(job, None, item.error)
            return
        containment = self.containment
        if containment is None:
            self._run(job, item.envelope)
            return
        containment.begin(delivery.sender, item.correlation_id)
        incoming = self._incoming
        try:
            self._run(job, item.envelope)
        finally:
            containment.commit()
            replies = incoming.replies if incoming is not None else None
            if replies and replies[-1][0] == item.correlation_id:  # its answer waits
                assert incoming is not None
                incoming.owed.append(containment.ran(plain_ok=is_plain_ok(replies[-1][2])))
            else:
                containment.done()

    def remember_finished(self, keys: list[tuple[str, str]],
                          owed: dict[tuple[str, str], bool] | None = None) -> None:
        """Commands (sender, correlation id) that ran: a redelivered copy is skipped. Those
        in `owed` were never answered: a redelivered copy is, with the plain "done" (true)
        or an error saying its answer was lost (false)."""
        recent = self._recent
        self._owed.update(owed or {})
        for key in keys:
            recent[key] = None
        while len(recent) > _REMEMBERED_COMMANDS:
            del recent[next(iter(recent))]

    def _run(self, job: _Job, envelope: Envelope) -> None:
        command = job.command
        assert command is not None
        # Garbage first; only its pointers' targets on other workers need waiting for.
        targets = self._discard(envelope.garbage, job.sender) if envelope.garbage else None
        try:
            if envelope.guard is not None:
                self._check_guard(job, envelope.guard)
            outcome = self._handlers[type(command)](command, job.sender)
        except Exception as e:
            for location, ids in (targets or {}).items():
                self._tell(location, Delete(ids))
            self._finish(job, None, e)
            return
        if targets:
            outcome = self._then_delete(outcome, targets)
        if type(outcome) is CoroutineType:  # it waits for another worker
            self._advance(_Task(outcome, job, self._origin), None, None)
        else:
            self._finish(job, outcome, None)

    def _check_guard(self, job: _Job, guard: int) -> None:
        """Refuse to run a command behind a failure its sender has not heard of yet."""
        numbered = session_and_number(job.correlation_id)
        if numbered is None:
            return
        failure = self._failures.get((job.sender, numbered[0]))
        if failure is not None and failure[0] >= guard:
            raise EarlierFailure(
                f"not run: an earlier command of this session ({failure[1]}, number "
                f"{failure[0]}) failed on worker {self.id!r}"
            )

    def _remember_failure(self, job: _Job) -> None:
        numbered = session_and_number(job.correlation_id)
        if numbered is None:
            return
        key = (job.sender, numbered[0])
        self._failures.pop(key, None)  # re-inserted last: the oldest go first
        self._failures[key] = (numbered[1], job.describe())
        if len(self._failures) > _REMEMBERED_SESSIONS:
            del self._failures[next(iter(self._failures))]

    def expire(self, now: float | None = None) -> None:
        """Fail the requests whose reply is overdue."""
        now = time.monotonic() if now is None else now
        overdue = [cid for cid, w in self._waiting.items() if w.deadline <= now]
        for cid in overdue:
            waiting = self._waiting.pop(cid)
            error = ReplyTimeout(waiting.request.worker_id, waiting.request.command.describe(),
                                 self.reply_timeout)
            self._advance(waiting.task, None, error)
        if self._waiting and now >= self._next_gone_check:
            self._next_gone_check = now + GONE_CHECK_SECONDS
            self._fail_if_gone(now)
        if self.leases is not None and self.leases.due(now):
            self._reclaim(now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.presence_interval
            self.announce("heartbeat")

    def announce(self, what: str) -> None:
        """Say on the events exchange that this worker `what` ("started", "heartbeat",
        "stopped"), with its figures: presence for whoever listens."""
        figures = self._figures()  # (not per holder: that walks every object)
        figures.update(event=what, presence_interval=self.presence_interval, time=time.time())
        try:
            self.endpoint.publish_event(f"worker.{self.id}.{what}",
                                        json.dumps(figures, default=str).encode())
        except TorchRelayError as e:  # presence is best effort: the work goes on
            log.debug("could not announce %s: %s", what, e)

    def _reclaim(self, now: float) -> None:
        """Delete the objects of participants whose lease ran out (see `_leases.py`)."""
        assert self.leases is not None
        held: dict[str, list[int]] = {}
        for object_id, entry in self.store.entries():
            for identity in entry.holders:
                held.setdefault(identity, []).append(object_id)
        try:
            expired = self.leases.expired(set(held), now)
        except TorchRelayError as e:  # the broker is away: look again next time
            log.warning("could not check leases: %s", e)
            return

        for identity in expired:
            ids = held[identity]
            targets = self._discard(ids, identity)
            for location, target_ids in targets.items():
                self._tell(location, Delete(target_ids))
            log.info("reclaimed %d objects of %r: gone for longer than its lease (%g s)",
                     len(ids), identity, self.leases.lease)
        if expired and self.containment is not None:
            self.containment.commit()  # the deletions outlive a crash, as a command's do

    def _fail_if_gone(self, now: float) -> None:
        """Fail the requests to a worker whose daemon is gone, rather than after the
        whole reply timeout (a move's source then settles it: see `_transfer`)."""
        silent_since = now - GONE_CHECK_SECONDS
        try:
            gone = self._gone.gone({w.request.worker_id for w in self._waiting.values()
                                    if w.deadline - self.reply_timeout <= silent_since}, now)
        except TorchRelayError as e:  # the broker is away: receiving says so; look again later
            log.debug("could not look for gone workers: %s", e)
            return
        if gone is None:
            return
        worker_id, seconds = gone
        for cid in [cid for cid, w in self._waiting.items() if w.request.worker_id == worker_id]:
            waiting = self._waiting.pop(cid)
            self._advance(waiting.task, None, UnknownWorker(worker_id, gone_message(seconds)))

    def fail_waiting(self, error: TorchRelayError) -> None:
        """Fail every request in flight (the connection that would carry replies is gone)."""
        waiting, self._waiting = self._waiting, {}
        for w in waiting.values():
            self._advance(w.task, None, error)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _advance(self, task: _Task, value: Any, error: BaseException | None) -> None:
        while True:
            try:
                if error is None:
                    request = task.coroutine.send(value)
                else:
                    request = task.coroutine.throw(error)
            except StopIteration as done:
                self._unpark(task)
                self._finish(task.job, done.value, None)
                self._release(task)
                return
            except Exception as e:
                self._unpark(task)
                self._finish(task.job, None, e)
                self._release(task)
                return
            correlation_id = self._next_correlation_id()
            try:
                self.endpoint.send_command(
                    request.worker_id,
                    request.command.name,
                    request.command.encode(None if task.origin is None
                                           else Envelope(origin=task.origin)),
                    correlation_id,
                    confirm=request.confirm,
                )
            except Exception as e:  # unroutable, broker down: the handler decides
                value, error = None, e
                continue
            deadline = time.monotonic() + self.reply_timeout
            self._waiting[correlation_id] = _Waiting(task, request, deadline)
            incoming = self._incoming
            if incoming is not None and task.holds is None and type(task.job.command) is Transfer:
                # Acknowledged only once it completes: were the whole daemon to die first,
                # the broker delivers it again, and the client learns how it ended.
                task.holds = incoming
                incoming.held += 1
                self.endpoint.flush_acks()  # what ran before it is not to come again
            if self.containment is not None:
                self._park(task, request)
            return

    def _park(self, task: _Task, request: _Request) -> None:
        """Have what `task` answers and undoes outlive this executor while it waits on
        `request`: a new one tells its sender that it did not complete, and deletes what
        was made for it elsewhere, rather than leave both waiting and orphaned."""
        job = task.job
        command, asked = job.command, request.command
        remote: list[int] = []
        local: list[int] = []
        restarted = f"worker {self.id!r} restarted (its executor died)"
        if type(asked) is Delete:  # garbage down a chain, once the command itself ran
            message = (f"{restarted} after this command ran, while it deleted garbage on "
                       f"worker {request.worker_id!r}: what it made stands, its answer is lost")
        else:
            remote = _made_by(asked)
            if remote and type(command) is Call and command.result_id is not None:
                local = [command.result_id]  # our pointer to that result
            message = (f"{restarted} while this command waited on worker "
                       f"{request.worker_id!r}: it did not complete")
            if type(command) is Transfer and remote:
                message += (f"; object {command.id} is still on worker {self.id!r}, and any "
                            f"copy that reached {request.worker_id!r} is deleted")
        assert self.containment is not None
        self.containment.parked(job.sender, job.correlation_id, msgpack.packb(
            [job.sender, job.correlation_id, job.reply_to, job.name, message,
             request.worker_id, remote, local]))
        task.parked = True

    def _unpark(self, task: _Task) -> None:
        if task.parked:
            assert self.containment is not None
            self.containment.unparked(task.job.sender, task.job.correlation_id)
            # Now, with what it changed: were the executor to die before the next
            # commit, the next one would undo a command that completed.
            self.containment.commit()
            task.parked = False

    def settle_interrupted(self, payloads: list[bytes]) -> None:
        """Answer and undo the commands a dead executor left waiting (see `_park`); each
        is forgotten once settled (until then the supervisor's copy keeps it)."""
        for payload in payloads:
            sender, correlation_id, reply_to, name, message, location, remote, local = (
                msgpack.unpackb(payload))
            log.warning("%s %s from %s: %s", name, correlation_id, sender, message)
            try:
                for object_id in local:
                    self.store.discard(object_id)
                if remote:
                    self._tell(location, Delete(remote))
                self._finish(_Job(name, None, sender, reply_to, correlation_id), None,
                             OperationRefused(message))
            except TorchRelayError as e:  # the broker is away: its caller times out
                log.warning("could not answer %s %s: %s", name, correlation_id, e)
            if self.containment is not None:
                self.containment.unparked(sender, correlation_id)
                self.containment.commit()

    def _resume(self, delivery: Delivery) -> None:
        waiting = self._waiting.get(delivery.correlation_id)
        if waiting is None:
            log.debug("dropped a late reply %s", delivery.correlation_id)
            return
        worker_id = waiting.request.worker_id
        if delivery.sender != worker_id:  # anyone may write to our reply queue
            self._forged_replies += 1
            if self._forged_replies == 1:
                log.warning("dropped a reply for %r that came from %r (further ones are only "
                            "counted)", worker_id, delivery.sender[:100])
            return
        del self._waiting[delivery.correlation_id]
        if delivery.returned:
            self._advance(waiting.task, None, UnknownWorker(worker_id, "no worker consumes it"))
            return
        if delivery.refused is not None:
            self._advance(waiting.task, None, ProtocolError(delivery.refused))
            return
        try:
            reply = decode_reply(delivery.body)
        except ProtocolError as e:
            self._advance(waiting.task, None, e)
            return
        if reply.error is not None:
            error = reply.error.to_exception(worker_id, waiting.request.command.describe())
            self._advance(waiting.task, None, error)
        else:
            self._advance(waiting.task, reply.value, None)

    def _finish(self, job: _Job, value: Any, error: Exception | None) -> None:
        if error is not None:
            self._failed += 1
            self._remember_failure(job)
            if not isinstance(error, TorchRelayError | TypeError | ValueError | RuntimeError
                              | LookupError):
                log.exception("command %s failed unexpectedly", job.describe(), exc_info=error)
            else:  # one line per failed command, with what an operator needs to find it
                log.log(self._failure_level,
                        "%s from %s failed (correlation id %s, objects %s): %s: %s",
                        job.describe(), job.sender, job.correlation_id, job.objects(),
                        type(error).__name__, str(error)[:300], extra=_fields(job))
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("%s from %s (correlation id %s, objects %s)", job.describe(), job.sender,
                      job.correlation_id, job.objects(), extra=_fields(job))
        if job.reply_to is None:
            return
        if error is None:
            if type(value) is _Encoded:
                frame = value.frame
            else:
                try:
                    frame = Reply(value).encode()
                except EncodeError as e:
                    error = e
        if error is not None:
            # Our own refusals say all there is to say; torch's errors come with where.
            info = ErrorInfo.from_exception(
                error, with_traceback=not isinstance(error, TorchRelayError)
            )
            frame = Reply(error=info).encode()
        self._send_reply(job.reply_to, job.name, job.correlation_id, frame)

    def _send_reply(self, reply_to: str, name: str, correlation_id: str, frame: Frame) -> None:
        incoming = self._incoming
        replies = incoming.replies if incoming is not None else None
        if replies is not None:  # answering a batch: the replies go back together
            assert incoming is not None
            if frame.nbytes <= _BATCHED_REPLY_BYTES:
                replies.append((correlation_id, name, frame))
                return
            if replies:  # a large one goes alone, after those before it
                self._send_replies(reply_to, "", replies, incoming.owed)
                replies.clear()
        if self.containment is not None:
            self.containment.commit()  # what a reply reports outlives a crash after it
        self.endpoint.send_reply(reply_to, f"{name}.reply", frame, correlation_id)

    def _send_replies(self, reply_to: str, batch_id: str,
                      replies: list[tuple[str, str, Frame]], owed: list[Any]) -> None:
        if self.containment is not None:
            self.containment.commit()
        if len(replies) == 1:
            correlation_id, name, frame = replies[0]
            self.endpoint.send_reply(reply_to, f"{name}.reply", frame, correlation_id)
        else:
            self.endpoint.send_reply(reply_to, f"{BATCH}.reply", encode_reply_batch(replies),
                                     batch_id or replies[0][0])
        if self.containment is not None and owed:
            self.containment.answered(owed)
            owed.clear()

    def _next_correlation_id(self) -> str:
        self._request_numbers += 1
        return f"{self._prefix}{self._request_numbers}"

    def _new_id(self) -> int:
        return new_object_id(self._random)

    # -- commands --------------------------------------------------------------

    def _store(self, command: Store, sender: str) -> None:
        value = command.value
        if type(value) is PointerRef and value.location == self.id and (
            value.id_at_location == command.id
        ):
            raise ProtocolError(f"object {command.id} on worker {self.id!r} cannot point at itself")
        check_result("store", value, self.limits)
        # The owners a sending worker names are added to, never taken from: what a
        # client sends is its own, and carries no one's private data.
        provenance = frozenset(command.provenance)
        holders = _holders(command, sender)
        if not command.replaces_pointer:
            self.store.put(command.id, command.value, provenance, holders)
            return
        entry = self.store.get(command.id)  # whoever holds it: the check is the pointer's
        value = entry.value
        if not (type(value) is PointerRef and value.location == sender):
            raise ProtocolError(
                f"object {command.id} on worker {self.id!r} is not a pointer to {sender!r}; "
                "only the target of a pointer can replace it"
            )
        self.store.replace(command.id, command.value, provenance, entry.holders | holders)

    def _fetch(self, command: Fetch, sender: str) -> _Encoded:
        self._not_owned(command.id, "fetched")
        entry = self.store.use(command.id, sender)
        owners = self.store.owners(entry)
        if owners and not self._releasable(entry.value, owners):
            raise PrivateDataError(
                f"object {command.id} on worker {self.id!r} derives from private data of "
                f"{', '.join(sorted(owners))}: it cannot be fetched. Private data leaves "
                "only as an aggregate of several owners' contributions, with noise: "
                "tr.aggregate(...) on a worker they trust"
            )
        frame = Reply(entry.value).encode()  # before removing: nothing is lost if it cannot travel
        # A pointer leaves with its duty to delete the target: no delete down the chain.
        self.store.discard(command.id)
        return _Encoded(frame)

    def _delete(self, command: Delete, sender: str) -> Any:
        missing: list[int] = []
        targets = self._discard(command.ids, sender, missing)
        if targets:
            return self._then_delete(missing, targets)
        return missing

    def _discard(self, ids: list[int], sender: str,
                 missing: list[int] | None = None) -> dict[str, list[int]]:
        """Delete objects of `sender`'s here; the targets of the pointers among them, by
        worker.

        Deleting twice is harmless: ids not found go to `missing`, and so do those of
        others (to `sender` they do not exist)."""
        targets: dict[str, list[int]] = {}
        store = self.store
        owned = store.owned
        for object_id in ids:
            if object_id in owned:  # the worker's own: no client's garbage collection
                continue
            present = store.objects_get(object_id)
            if present is not None and not present.usable_by(sender):
                if missing is not None:
                    missing.append(object_id)
                continue
            entry = store.discard(object_id)
            if entry is None:
                self.store.delete_early(object_id)
                if missing is not None:
                    missing.append(object_id)
            elif type(entry.value) is PointerRef:
                targets.setdefault(entry.value.location, []).append(entry.value.id_at_location)
        return targets

    async def _then_delete(self, outcome: Any, targets: dict[str, list[int]]) -> Any:
        """Finish `outcome`, then (even if it failed) have pointed-at objects deleted
        down their chains."""
        try:
            if type(outcome) is CoroutineType:
                outcome = await outcome
        finally:
            for location, ids in targets.items():
                try:
                    await self._ask(location, Delete(ids))
                except TorchRelayError as e:  # the worker down the chain is gone, and its object
                    log.warning("deleting objects on %s failed: %s", location, e)
        return outcome

    def _resolve(self, name: str) -> Any:
        if self.fault_injection and name.startswith(FAULT_PREFIX):
            fault = FAULT_OPERATIONS.get(name)
            if fault is not None:
                return fault
        return resolve_op(name)

    def _call(self, command: Call, sender: str) -> Any:
        op = self._resolve(command.op)
        if "out" in command.kwargs:
            raise OperationRefused(
                f"{command.op} with out= is refused: results are new objects here (use the "
                "in-place method, such as add_, to change a tensor)"
            )
        resolver = _ArgumentResolver(self.store, sender)
        args = resolver.arguments(command.args)
        kwargs = resolver.resolve(command.kwargs) if command.kwargs else {}
        if resolver.location is None:
            owners = resolver.provenance
            result = self._execute(command, op, args, kwargs, owners)
            if command.result_id is not None:
                self.store.put(command.result_id, result, owners, _holders(command, sender))
            elif owners and command.args and type(command.args[0]) is ObjectRef:
                self.store.add_owners(command.args[0].id, owners)  # changed in place
            return None
        return self._forward_call(command, sender, resolver.location, args, kwargs)

    def _execute(self, call: Call, op: Any, args: list[Any], kwargs: dict[str, Any],
                 owners: frozenset[str] = frozenset()) -> Any:
        """Run one allow-listed operation on resolved arguments, with every check; with
        `owners` (its inputs derive from their private data), what it changes in place
        derives from them too, and its errors do not say what it saw."""
        if self.lost_graphs and call.op == "Tensor.backward":
            lost = {a.id for a in call.args if type(a) is ObjectRef} & self.lost_graphs
            if lost:
                raise OperationRefused(
                    f"the autograd graph of object {min(lost)} was lost when worker "
                    f"{self.id!r} restarted after a crash; compute it again from its leaves"
                )
        if (self.store.read_only and is_inplace(call.op) and args
                and isinstance(args[0], torch.Tensor)
                and args[0].untyped_storage()._cdata in self.store.read_only):
            raise OperationRefused(
                f"{call.op} would change a dataset of worker {self.id!r} in place: "
                "datasets are read-only (work on a copy, such as .clone())"
            )
        if not owners:
            check_arguments(call.op, args, kwargs, self.limits)
            result = op(*args, **kwargs)
            check_result(call.op, result, self.limits)
            return result
        touched = _changeable(call.op, args, kwargs)
        versions = [t._version for t in touched]
        try:
            # Whatever the values, the outcome shows only what shapes tell (_oblivious.py).
            result = self.private_execution.run(call.op, op, args, kwargs, owners)
        finally:  # what it changed, even if it failed half-way
            changed = [t for t, v in zip(touched, versions, strict=True)
                       if t._version != v or call.op in _UPDATES_ITS_ARGUMENTS]
            if is_inplace(call.op) and args and isinstance(args[0], torch.Tensor):
                changed.append(args[0])  # its target, changed or not: the values decide
            self.store.spread(changed, owners)
        if call.op == "Tensor.backward" and args and isinstance(args[0], torch.Tensor):
            self.store.spread(graph_leaves(args[0]), owners)  # their gradients now
        return result

    def _define_plan(self, command: DefinePlan, sender: str) -> None:
        self.store.put(command.id, check_plan(command), frozenset(), frozenset({sender}))

    def _run_plan(self, command: RunPlan, sender: str) -> None:
        plan = self.store.use(command.plan, sender).value
        if type(plan) is not RecordedPlan:
            raise OperationRefused(f"object {command.plan} is not a plan")
        if len(command.arguments) != len(plan.parameters):
            raise TypeError(f"the plan takes {len(plan.parameters)} arguments, not "
                            f"{len(command.arguments)}")
        if len(command.result_ids) != len(plan.returns):
            raise TypeError(f"the plan returns {len(plan.returns)} results, not "
                            f"{len(command.result_ids)}")
        resolver = _ArgumentResolver(self.store, sender)
        scope = dict(zip(plan.parameters, resolver.arguments(command.arguments), strict=True))
        resolver.scope = scope
        budget = self.store.max_bytes
        held = self.store.bytes
        for number, call in enumerate(plan.calls):
            op = resolve_op(call.op)
            args = resolver.arguments(call.args)
            kwargs = resolver.resolve(call.kwargs) if call.kwargs else {}
            if resolver.location is not None:
                raise OperationRefused(
                    f"plan call {number} ({call.op}) uses a pointer to worker "
                    f"{resolver.location!r}: a plan runs where all its data is"
                )
            result = self._execute(call, op, args, kwargs, resolver.provenance)
            if call.result_id is not None:
                scope[call.result_id] = result
                if budget is not None and type(result) is torch.Tensor:
                    held += result.untyped_storage().nbytes()  # intermediates count too
                    if held > budget:
                        raise BudgetExceeded(
                            f"the plan's results would take worker {self.id!r} past its "
                            f"max_bytes ({budget} bytes) at call {number} ({call.op})")
        for result_id, value in zip(command.result_ids, plan.returns, strict=True):
            self.store.put(result_id, scope[value], resolver.provenance, frozenset({sender}))

    async def _forward_call(self, command: Call, sender: str, location: str, args: list[Any],
                            kwargs: dict[str, Any]) -> None:
        """Every object argument is a pointer to `location`: the call runs there, its
        result usable by whom it is done for (so a pointer chain can be fetched from
        its end)."""
        _check_hops(command.hops, f"call {command.op}")
        remote_result = None if command.result_id is None else self._new_id()
        holders = _holders(command, sender)
        forwarded = Call(command.op, args, kwargs, remote_result, command.hops + 1,
                         sorted(holders))
        if command.result_id is not None:
            # Stored before the answer, so later commands on it queue up behind this one.
            assert remote_result is not None
            self.store.put(command.result_id, PointerRef(location, remote_result), frozenset(),
                           holders)
        try:
            await self._ask(location, forwarded)
        except BaseException:
            if command.result_id is not None:
                self.store.discard(command.result_id)
                # If the call does run there after all (we gave up waiting), its
                # result has no owner: have it deleted right behind it.
                assert remote_result is not None
                self._tell(location, Delete([remote_result]))
            raise

    async def _transfer(self, command: Transfer, sender: str) -> None:
        self._not_owned(command.id, "moved")
        entry = self.store.use(command.id, sender)
        owners = self.store.owners(entry)
        if owners:
            self._may_move(command.id, owners, command.destination)
        store = Store(command.destination_id, entry.value, sorted(owners),
                      command.replaces_pointer, sorted(entry.holders))
        try:
            await self._ask(command.destination, store, confirm=True)
        except (UnknownWorker, ReplyTimeout, BrokerError):
            # Whether the destination stored it is unknown (it is gone, or silent): ours
            # stays, and a delete right behind the store in its queue makes sure no
            # second copy appears there when it comes back.
            self._unsend(command)
            raise
        # The destination holds it now. Drop ours, unless a command replaced it meanwhile.
        if not self.store.discard_if(command.id, entry):
            return
        if command.keep_pointer:
            self.store.put(command.id, PointerRef(command.destination, command.destination_id),
                           frozenset(), entry.holders)

    def _unsend(self, transfer: Transfer) -> None:
        """Undo `transfer` at its destination, whether or not its copy arrived: the
        object stays here. (As `_made_by` says of the copy's `Store`.)"""
        if not transfer.replaces_pointer:
            self._tell(transfer.destination, Delete([transfer.destination_id]))

    async def _pull(self, command: Pull, sender: str) -> None:
        entry = self.store.use(command.id, sender)
        pointer = entry.value
        if type(pointer) is not PointerRef:
            raise ProtocolError(
                f"object {command.id} on worker {self.id!r} is not a pointer; nothing to pull"
            )
        await self._ask(
            pointer.location,
            Transfer(pointer.id_at_location, self.id, command.id, replaces_pointer=True),
        )

    def _meta(self, command: Meta, sender: str) -> Any:
        value = self.store.use(command.id, sender).value
        if type(value) is PointerRef:
            return self._forward_meta(value, command.hops)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"object {command.id} on worker {self.id!r} is a {type(value).__name__}, "
                "not a tensor: it has no shape or dtype"
            )
        return [value.dtype, list(value.shape), value.requires_grad]

    async def _forward_meta(self, pointer: PointerRef, hops: int) -> Any:
        _check_hops(hops, "meta")
        return await self._ask(pointer.location, Meta(pointer.id_at_location, hops + 1))

    def _search(self, command: Search, sender: str) -> list[dict[str, Any]]:
        wanted = set(command.tags)
        return [
            {"id": object_id, **dataset.summary(),
             "privacy": self.privacy.public() if dataset.private else None}
            for object_id in sorted(self.store.owned)
            if (entry := self.store.get(object_id)).usable_by(sender)
            and type(dataset := entry.value) is Dataset
            and wanted <= set(dataset.tags)
        ]

    def add_dataset(self, dataset: Dataset, key: str) -> int:
        """Offer `dataset` (found by `search`, used through pointers, never given away);
        its id derives from `key` (its file), so it is the same after a restart."""
        object_id = dataset_id(self.id, key)
        owners = frozenset({self.id}) if dataset.private else frozenset()
        self.store.put(object_id, dataset, owners, self.dataset_holders)
        if owners:
            self.store.spread(list(dataset.tensors.values()), owners)
        self.store.owned.add(object_id)
        self.store.read_only.update(t.untyped_storage()._cdata for t in dataset.tensors.values())
        log.info("worker %s offers dataset %s as %d: %s", self.id, dataset.name, object_id,
                 dataset.summary()["tensors"])
        return object_id

    def _releasable(self, value: Any, owners: frozenset[str]) -> bool:
        """Whether a value derived from private data may leave as it is: a scalar, of
        this worker's data only, whose owner opted in (`release_scalars`)."""
        scalar = (isinstance(value, torch.Tensor) and value.numel() <= 1) or type(value) in (
            int, float, bool)
        return scalar and owners == {self.id} and self.privacy.release_scalars

    def _may_move(self, object_id: int, owners: frozenset[str], destination: str) -> None:
        """Refuse to send private-derived data anywhere its owners do not trust."""
        if owners == {self.id}:
            if destination not in self.privacy.trusted:
                trusted = ", ".join(self.privacy.trusted) or "no worker"
                raise PrivateDataError(
                    f"object {object_id} on worker {self.id!r} derives from its private "
                    f"data: it may move only to workers {self.id!r} trusts ({trusted}), "
                    f"not to {destination!r}"
                )
            try:
                self.budget.check(self.id)  # no contribution it could not afford to release
            except BudgetSpent as e:
                raise PrivateDataError(f"{e}: it contributes no more") from None
        elif owners != {destination}:
            raise PrivateDataError(
                f"object {object_id} on worker {self.id!r} derives from private data of "
                f"{', '.join(sorted(owners))}: it may go back to its owner, or leave as an "
                f"aggregate, but not to {destination!r}"
            )

    def _charge_privacy(self, command: ChargePrivacy, sender: str) -> dict[str, Any]:
        if sender != self.id and sender not in self.privacy.trusted:
            raise PrivateDataError(
                f"worker {sender!r} is not trusted by {self.id!r}: it cannot release "
                f"{self.id!r}'s data"
            )
        if command.contributors < self.privacy.k:
            raise PrivateDataError(
                f"{self.id!r}'s data is released only in aggregates of at least "
                f"{self.privacy.k} data owners; this one has {command.contributors}"
            )
        try:
            spent = self.budget.charge(self.id)
        except BudgetSpent as e:
            raise PrivateDataError(str(e)) from None
        return {**self.privacy.public(), "epsilon_spent": spent}

    async def _aggregate(self, command: Aggregate, sender: str) -> dict[str, Any]:
        contributions = [[self.store.use(i, sender) for i in ids]
                         for ids in command.contributions]
        owners = [frozenset().union(*(self.store.owners(e) for e in entries))
                  for entries in contributions]
        plan = AggregationPlan.check(
            [[e.value for e in entries] for entries in contributions], owners,
            command.weights)
        policies: dict[str, dict[str, Any]] = {}
        for owner in plan.owners:  # each owner charges its own budget, or refuses
            charge = ChargePrivacy(len(contributions))
            policies[owner] = (self._charge_privacy(charge, self.id) if owner == self.id
                               else await self._ask(owner, charge))
        result, report = plan.release(policies)
        # An aggregate: no one's private data.
        self.store.put(command.result_id, result, frozenset(), frozenset({sender}))
        for ids in command.contributions if plan.owners else ():
            for object_id in ids:  # spent: the same contribution is not released twice
                self.store.discard(object_id)
        return report

    def _not_owned(self, object_id: int, what: str) -> None:
        if object_id in self.store.owned:
            raise OperationRefused(
                f"object {object_id} is a dataset of worker {self.id!r}: it is not {what}; use "
                "it where it is, through pointers"
            )

    def _describe(self, command: Describe, sender: str) -> dict[int, str]:
        return self.store.describe(sender)

    def _grant(self, command: Grant, sender: str) -> None:
        self.store.use(command.id, sender)  # only one who may use it may share it
        self.store.grant(command.id, command.to)

    def _status(self, command: Status, sender: str) -> dict[str, Any]:
        holders = self._holders = self._by_holder()
        return {**self._figures(), "holders": holders}

    def _answer_now(self, delivery: Delivery) -> tuple[str, Frame] | None:
        """A status request answered as it arrives, before the commands of others that
        wait or run: `torchrelay status` and presence answer whatever runs. Only when its
        asker has nothing waiting or running here (it sees the effects of what it sent
        before). Called from the thread that pumps the connection, maybe while this one
        runs a command: it only reads, and what it cannot read consistently — who holds
        what — is as the last full status found it."""
        if delivery.type != Status.name:
            return None
        reply_to = delivery.reply_to
        sender = delivery.sender
        in_hand = self._in_hand
        if in_hand is None and not self.queue:
            return None  # nothing runs or waits: the usual way is as quick, and exact
        if reply_to is None or not is_reply_queue_of(reply_to, sender) or (
                in_hand is not None and in_hand[0] == sender) or self.queue.has(sender):
            return None
        try:
            figures = self._figures()
            holders = (self._by_holder() if threading.get_ident() == self._thread
                       else dict(self._holders))  # (walking the store under its user: no)
            figures.update(holders=holders, queued=self.queue.waiting())
        except RuntimeError:  # changed under us after all: the usual way then
            return None
        if in_hand is not None:
            figures["busy"] = {"command": in_hand[1], "sender": in_hand[0],
                               "seconds": round(time.monotonic() - in_hand[2], 3)}
        return f"{Status.name}.reply", Reply(figures).encode()

    def _figures(self) -> dict[str, Any]:
        """What the worker says of itself, in a status reply and in its heartbeats."""
        status: dict[str, Any] = {
            "id": self.id,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self._started, 3),
            "objects": len(self.store),
            "tensor_bytes": self.store.bytes,
            "max_bytes": self.limits.max_bytes,
            "commands_handled": self._handled,
            "commands_failed": self._failed,
            "requests_waiting": len(self._waiting),
        }
        status.update(self.endpoint.stats())
        # Forged messages: dropped by the transport, or replies not from the worker asked.
        status["forged"] = (int(status.get("forged", 0)) + self._forged_replies
                            + self._misdirected)
        status.update(self._status_facts)
        if self.poisoned:
            status["commands_poisoned"] = len(self.poisoned)
        pacer = self.private_execution.pacer
        if pacer is not None:
            status["timing_epochs"] = pacer.epochs
        return status

    def _by_holder(self) -> dict[str, dict[str, int]]:
        """Objects and tensor bytes by who holds them (a storage viewed by several objects
        counts for each)."""
        held: dict[str, dict[str, int]] = {}
        for _, entry in self.store.entries():
            value = entry.value
            size = value.untyped_storage().nbytes() if isinstance(value, torch.Tensor) else 0
            for identity in entry.holders or ("everyone",):
                figures = held.setdefault(identity, {"objects": 0, "bytes": 0})
                figures["objects"] += 1
                figures["bytes"] += size
        return held

    def _ask(self, worker_id: str, command: Command, *, confirm: bool = False) -> _Request:
        return _Request(worker_id, command, confirm)

    def _tell(self, worker_id: str, command: Command) -> None:
        """Send `command` without waiting for its reply (dropped as a late one)."""
        origin = self._origin
        try:
            self.endpoint.send_command(
                worker_id, command.name,
                command.encode(None if origin is None else Envelope(origin=origin)),
                self._next_correlation_id())
        except TorchRelayError as e:
            log.warning("could not send %s to %s: %s", command.describe(), worker_id, e)


def _check_hops(hops: int, what: str) -> None:
    if hops >= MAX_HOPS:
        raise OperationRefused(
            f"{what} has been forwarded {hops} times: a pointer chain that long is a "
            "cycle of pointers with no data at its end"
        )


_PLAIN = Envelope()


class _ArgumentResolver:
    """Replaces `ObjectRef`s in call arguments by the stored values.

    Either every referenced object is local data, or every one is a pointer to
    the same other worker (then `location` names it and the refs are rewritten
    to that worker's ids, ready to forward).
    """

    __slots__ = ("_local", "_pointers", "location", "provenance", "scope", "sender", "store")

    def __init__(self, store: ObjectStore, sender: str,
                 scope: dict[int, Any] | None = None) -> None:
        self.store = store
        self.sender = sender
        self.scope = scope
        """A plan run's own values by id, looked up before the store's."""
        self.location: str | None = None
        self.provenance: frozenset[str] = frozenset()
        self._local = False
        self._pointers = False

    def arguments(self, args: list[Any]) -> list[Any]:
        """`resolve` of a call's argument list: the usual flat one without recursion."""
        resolved = []
        for value in args:
            kind = type(value)
            if kind is ObjectRef:
                resolved.append(self._object(value.id))
            elif kind is list or kind is tuple or kind is dict:
                resolved.append(self.resolve(value))
            else:
                resolved.append(value)
        return resolved

    def resolve(self, value: Any) -> Any:
        kind = type(value)
        if kind is ObjectRef:
            return self._object(value.id)
        if kind is list:
            return [self.resolve(v) for v in value]
        if kind is tuple:
            return tuple(self.resolve(v) for v in value)
        if kind is dict:
            return {k: self.resolve(v) for k, v in value.items()}
        return value

    def _object(self, object_id: int) -> Any:
        scope = self.scope
        if scope is not None and object_id in scope:
            return scope[object_id]
        return self._reference(self.store.use(object_id, self.sender))

    def _reference(self, entry: StoredObject) -> Any:
        value = entry.value
        if type(value) is PointerRef:
            if self._local or (self.location is not None and self.location != value.location):
                self._refuse_mix(value.location)
            self.location = value.location
            self._pointers = True
            return ObjectRef(value.id_at_location)
        if self._pointers:
            self._refuse_mix(None)
        self._local = True
        owners = self.store.owners(entry)
        if owners:
            self.provenance |= owners
        return value

    def _refuse_mix(self, location: str | None) -> None:
        where = sorted({self.location or "here", location or "here"})
        raise OperationRefused(
            f"the arguments live on different workers ({' and '.join(where)}) on worker "
            f"{self.store.owner!r}; move them to one worker first"
        )


_UPDATES_ITS_ARGUMENTS = frozenset({"F.batch_norm", "F.instance_norm"})
"""Operations that write into arguments without bumping their version (running statistics
updated inside the kernel): all their tensor arguments count as changed."""


def _made_by(asked: Command) -> list[int]:
    """What `asked` makes on the worker it goes to, which deleting there undoes: a copy
    stored (not one that replaced a pointer there, which is not ours to delete), a
    call's result."""
    if type(asked) is Store and not asked.replaces_pointer:
        return [asked.id]
    if type(asked) is Call and asked.result_id is not None:
        return [asked.result_id]
    return []


def _holders(command: Store | Call, sender: str) -> frozenset[str]:
    """Who may use what `command` makes: its sender, and whom it names (the client a
    forwarded call or a move acts for)."""
    return frozenset(command.holders) | {sender}


def _fields(job: _Job) -> dict[str, Any]:
    """A command's facts as separate fields of a log record (for `--log-format json`)."""
    return {"command": job.name, "sender": job.sender, "correlation_id": job.correlation_id,
            "objects": job.objects()}


def _changeable(op: str, args: list[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors an operation could change in place: its tensor arguments (an
    optimizer's parameters and state for its methods), to compare versions after."""
    if op.startswith("Optimizer.") and args and isinstance(args[0], torch.optim.Optimizer):
        optimizer = args[0]
        state = [t for s in optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor)]
        return [p for g in optimizer.param_groups for p in g["params"]] + state
    found: list[torch.Tensor] = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif type(value) in (list, tuple):
            found += [v for v in value if isinstance(v, torch.Tensor)]
    return found
