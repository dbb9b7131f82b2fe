"""A worker's behaviour: commands in, replies out, no I/O of its own.

The runtime is handed deliveries by whoever drives it (the daemon's loop on
RabbitMQ, the embedded broker's loop in-process) and answers through its
endpoint. It never blocks. It schedules (`_fairness.py`), answers, parks and
recovers; what each command does is its handler's, in `_commands/` (one module
per family, each handler registered with `@handles(TheCommand)`). Most handlers
are plain functions, answered at once.
One that needs another worker — an operation on pointers forwarded down a
chain, a transfer waiting for the destination to confirm — returns a coroutine
that awaits a `Request`; the runtime publishes the request, parks the
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
import time
from pathlib import Path
from types import CoroutineType
from typing import Any

import torch

from torchrelay.broker import (
    BATCH,
    COMMANDS,
    Batched,
    Call,
    Command,
    Delete,
    Delivery,
    EarlierFailure,
    EncodeError,
    Endpoint,
    Envelope,
    ErrorInfo,
    Frame,
    OperationRefused,
    PointerRef,
    ProtocolError,
    Reply,
    Status,
    TorchRelayError,
    Transfer,
    decode_batch,
    decode_command,
    encode_reply_batch,
    is_plain_ok,
    is_reply_queue_of,
    new_object_id,
    session_and_number,
    worker_queue,
)

from ..operations._config import WorkerConfig
from ._commands import HANDLERS, Encoded
from ._commands.datasets import add_dataset
from ._datasets import Dataset
from ._fairness import FairQueue, Strikes
from ._leases import DEFAULT_LEASE, DEFAULT_PRESENCE_INTERVAL, Leases
from ._limits import Limits
from ._oblivious import PrivateExecution
from ._pacing import Pacer
from ._privacy import PrivacyBudget, PrivacyPolicy
from ._records import (
    Containment,
    Incoming,
    Job,
    ParkedCommand,
    Request,
    Task,
    log_fields,
    made_by,
)
from ._store import EVERYONE, ObjectStore
from ._waits import Waits

__all__ = ["WorkerRuntime"]


log = logging.getLogger("torchrelay.worker")

_REMEMBERED_COMMANDS = 4096
"""Commands remembered by (sender, correlation id), so one redelivered after a
reconnect is not run twice; more than the prefetch window can hold unacknowledged."""

_BATCHED_REPLY_BYTES = 64 << 10
"""Replies to a batch's commands up to this size go back together; larger ones alone."""

_REMEMBERED_SESSIONS = 4096
"""Sessions whose last failure is remembered, for guarded commands (`Envelope.guard`)."""


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
        endpoint.awaiting = lambda: bool(self.waits)
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
        self._incoming: Incoming | None = None  # whose commands run now
        self.queue: FairQueue[tuple[Incoming, Batched]] = FairQueue()
        """Commands received and waiting to run, one queue per sender (`_fairness.py`)."""
        self.sender_max_queued = sender_max_queued
        self.strikes = Strikes(sender_strikes, sender_penalty)
        self._in_hand: tuple[str, str, float] | None = None  # sender, what, since
        self._origin: str | None = None  # whom the command running acts for
        self._holders: dict[str, dict[str, int]] = {}  # as the last status walked them
        self.waits = Waits(endpoint, reply_timeout)
        """Commands waiting on other workers (`_waits.py`)."""
        self._recent: dict[tuple[str, str], None] = {}  # insertion-ordered: oldest first
        self._owed: dict[tuple[str, str], bool] = {}  # ran, never answered (see above)
        # (sender, session) -> number and description of its last failed command.
        self._failures: dict[tuple[str, str], tuple[int, str]] = {}
        self._started = time.time()
        self._handled = 0
        self._failed = 0
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
        self._request_numbers = 0
        self._prefix = f"{worker_id}.{secrets.token_hex(4)}."  # unique per run, as a client's
        self._random = random.Random()

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
        if delivery.type == Status.name and reply_to is not None:
            # As the connection's keeper answers it while a command runs: not behind
            # others' commands received but not begun (they may have come a moment before).
            answered = self._answer_now(delivery)
            if answered is not None:
                kind, frame = answered
                self.endpoint.send_reply(reply_to, kind, frame, delivery.correlation_id)
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
        incoming = Incoming(delivery, len(items), replies)
        sender = delivery.sender
        refusal = self._sender_refusal(delivery)
        if refusal is not None:  # every command of it answered so, none run
            self._incoming = incoming
            try:
                for item in items:
                    self._finish(Job(item.name, item.command, sender, reply_to,
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

    def _run_job(self, sender: str, incoming: Incoming, item: Batched) -> None:
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
        kept: list[tuple[str, tuple[Incoming, Batched]]] = []
        while self.queue:
            sender, (incoming, item) = self.queue.pop()
            if incoming.started:
                self._run_job(sender, incoming, item)
            else:
                kept.append((sender, (incoming, item)))
        for sender, job in kept:
            self.queue.push(sender, job)

    def _complete(self, incoming: Incoming, *, counted: bool = True) -> None:
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

    def _release(self, task: Task) -> None:
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
        job = Job(item.name, item.command, delivery.sender, delivery.reply_to,
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
                self.unsend(item.command)
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

    def _run(self, job: Job, envelope: Envelope) -> None:
        command = job.command
        assert command is not None
        # Garbage first; only its pointers' targets on other workers need waiting for.
        targets = self.discard(envelope.garbage, job.sender) if envelope.garbage else None
        try:
            if envelope.guard is not None:
                self._check_guard(job, envelope.guard)
            outcome = HANDLERS[type(command)](self, command, job.sender)
        except Exception as e:
            for location, ids in (targets or {}).items():
                self.tell(location, Delete(ids))
            self._finish(job, None, e)
            return
        if targets:
            outcome = self.then_delete(outcome, targets)
        if type(outcome) is CoroutineType:  # it waits for another worker
            self._advance(Task(outcome, job, self._origin), None, None)
        else:
            self._finish(job, outcome, None)

    def _check_guard(self, job: Job, guard: int) -> None:
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

    def _remember_failure(self, job: Job) -> None:
        numbered = session_and_number(job.correlation_id)
        if numbered is None:
            return
        key = (job.sender, numbered[0])
        self._failures.pop(key, None)  # re-inserted last: the oldest go first
        self._failures[key] = (numbered[1], job.describe())
        if len(self._failures) > _REMEMBERED_SESSIONS:
            del self._failures[next(iter(self._failures))]

    def expire(self, now: float | None = None) -> None:
        """Fail the requests whose reply is overdue, or whose worker is gone; reclaim what
        participants gone past their lease held; say this worker is here."""
        now = time.monotonic() if now is None else now
        for task, value, error in self.waits.overdue(now):
            self._advance(task, value, error)
        if self.leases is not None and self.leases.due(now):
            self._reclaim(now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.presence_interval
            self.announce("heartbeat")

    def announce(self, what: str) -> None:
        """Say on the events exchange that this worker `what` ("started", "heartbeat",
        "stopped"), with its figures: presence for whoever listens."""
        figures = self.figures()  # (not per holder: that walks every object)
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
            targets = self.discard(ids, identity)
            for location, target_ids in targets.items():
                self.tell(location, Delete(target_ids))
            log.info("reclaimed %d objects of %r: gone for longer than its lease (%g s)",
                     len(ids), identity, self.leases.lease)
        if expired and self.containment is not None:
            self.containment.commit()  # the deletions outlive a crash, as a command's do

    def fail_waiting(self, error: TorchRelayError) -> None:
        """Fail every request in flight (the connection that would carry replies is gone)."""
        for task in self.waits.end_all():
            self._advance(task, None, error)

    @property
    def waiting(self) -> int:
        """Commands waiting on other workers."""
        return len(self.waits)

    def _advance(self, task: Task, value: Any, error: BaseException | None) -> None:
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
            self.waits.add(correlation_id, task, request)
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

    def _park(self, task: Task, request: Request) -> None:
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
            remote = made_by(asked)
            if remote and type(command) is Call and command.result_id is not None:
                local = [command.result_id]  # our pointer to that result
            message = (f"{restarted} while this command waited on worker "
                       f"{request.worker_id!r}: it did not complete")
            if type(command) is Transfer and remote:
                message += (f"; object {command.id} is still on worker {self.id!r}, and any "
                            f"copy that reached {request.worker_id!r} is deleted")
        assert self.containment is not None
        self.containment.parked(job.sender, job.correlation_id, ParkedCommand(
            job.sender, job.correlation_id, job.reply_to, job.name, message,
            request.worker_id, remote, local).encode())
        task.parked = True

    def _unpark(self, task: Task) -> None:
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
            parked = ParkedCommand.decode(payload)
            log.warning("%s %s from %s: %s", parked.name, parked.correlation_id,
                        parked.sender, parked.message)
            try:
                for object_id in parked.local:
                    self.store.discard(object_id)
                if parked.remote:
                    self.tell(parked.location, Delete(parked.remote))
                self._finish(Job(parked.name, None, parked.sender, parked.reply_to,
                                 parked.correlation_id), None, OperationRefused(parked.message))
            except TorchRelayError as e:  # the broker is away: its caller times out
                log.warning("could not answer %s %s: %s", parked.name, parked.correlation_id, e)
            if self.containment is not None:
                self.containment.unparked(parked.sender, parked.correlation_id)
                self.containment.commit()

    def _resume(self, delivery: Delivery) -> None:
        resumed = self.waits.answered(delivery)
        if resumed is not None:
            self._advance(*resumed)

    def _finish(self, job: Job, value: Any, error: Exception | None) -> None:
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
                        type(error).__name__, str(error)[:300], extra=log_fields(job))
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("%s from %s (correlation id %s, objects %s)", job.describe(), job.sender,
                      job.correlation_id, job.objects(), extra=log_fields(job))
        if job.reply_to is None:
            return
        if error is None:
            if type(value) is Encoded:
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

    def new_id(self) -> int:
        return new_object_id(self._random)

    # -- commands --------------------------------------------------------------


    def discard(self, ids: list[int], sender: str,
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
                self.store.delete_early(object_id, sender)
                if missing is not None:
                    missing.append(object_id)
            elif type(entry.value) is PointerRef:
                targets.setdefault(entry.value.location, []).append(entry.value.id_at_location)
        return targets

    async def then_delete(self, outcome: Any, targets: dict[str, list[int]]) -> Any:
        """Finish `outcome`, then (even if it failed) have pointed-at objects deleted
        down their chains."""
        try:
            if type(outcome) is CoroutineType:
                outcome = await outcome
        finally:
            for location, ids in targets.items():
                try:
                    await self.ask(location, Delete(ids))
                except TorchRelayError as e:  # the worker down the chain is gone, and its object
                    log.warning("deleting objects on %s failed: %s", location, e)
        return outcome


    def unsend(self, transfer: Transfer) -> None:
        """Undo `transfer` at its destination, whether or not its copy arrived: the
        object stays here. (As `made_by` says of the copy's `Store`.)"""
        if not transfer.replaces_pointer:
            self.tell(transfer.destination, Delete([transfer.destination_id]))


    def _answer_now(self, delivery: Delivery) -> tuple[str, Frame] | None:
        """A status request answered as it arrives, before the commands of others that
        wait or run: `torchrelay status` and presence answer whatever runs. Only when its
        asker has nothing waiting or running here (it sees the effects of what it sent
        before). Called from the thread that pumps the connection, maybe while this one
        runs a command — it only reads, and what it cannot read consistently (who holds
        what) is as the last full status found it — and by `accept` here, so a status
        that came right behind another's command does not wait for it either."""
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
            figures = self.figures()
            # Who holds what as the last full status found it: walking the store here
            # would cost the others' waiting commands that much per status asked for
            # (and from the keeper thread, the store is in use).
            figures.update(holders=dict(self._holders), queued=self.queue.waiting())
        except RuntimeError:  # changed under us after all: the usual way then
            return None
        if in_hand is not None:
            figures["busy"] = {"command": in_hand[1], "sender": in_hand[0],
                               "seconds": round(time.monotonic() - in_hand[2], 3)}
        return f"{Status.name}.reply", Reply(figures).encode()

    def figures(self) -> dict[str, Any]:
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
            "requests_waiting": len(self.waits),
        }
        status.update(self.endpoint.stats())
        # Forged messages: dropped by the transport, or replies not from the worker asked.
        status["forged"] = (int(status.get("forged", 0)) + self.waits.forged_replies
                            + self._misdirected)
        status.update(self._status_facts)
        if self.poisoned:
            status["commands_poisoned"] = len(self.poisoned)
        pacer = self.private_execution.pacer
        if pacer is not None:
            status["timing_epochs"] = pacer.epochs
        return status

    def by_holder(self) -> dict[str, dict[str, int]]:
        """Objects and tensor bytes by who holds them (a storage viewed by several objects
        counts for each); kept for the status answered from another thread (`_answer_now`),
        which cannot walk the store."""
        held: dict[str, dict[str, int]] = {}
        for _, entry in self.store.entries():
            value = entry.value
            size = value.untyped_storage().nbytes() if isinstance(value, torch.Tensor) else 0
            for identity in entry.holders or ("everyone",):
                figures = held.setdefault(identity, {"objects": 0, "bytes": 0})
                figures["objects"] += 1
                figures["bytes"] += size
        self._holders = held
        return held

    def add_dataset(self, dataset: Dataset, key: str) -> int:
        """Offer `dataset` (loaded from `key`, its path) here: its id."""
        return add_dataset(self, dataset, key)

    def ask(self, worker_id: str, command: Command, *, confirm: bool = False) -> Request:
        return Request(worker_id, command, confirm)

    def tell(self, worker_id: str, command: Command) -> None:
        """Send `command` without waiting for its reply (dropped as a late one)."""
        origin = self._origin
        try:
            self.endpoint.send_command(
                worker_id, command.name,
                command.encode(None if origin is None else Envelope(origin=origin)),
                self._next_correlation_id())
        except TorchRelayError as e:
            log.warning("could not send %s to %s: %s", command.describe(), worker_id, e)


_PLAIN = Envelope()
