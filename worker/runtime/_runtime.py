"""A worker's behaviour: commands in, replies out, no I/O of its own.

The runtime is handed deliveries by whoever drives it (the daemon's loop on
RabbitMQ, the embedded broker's loop in-process) and answers through its
endpoint. It never blocks. It lets messages in (`_admission.py`), schedules
their commands fairly between senders (`_fairness.py`) and runs each through its
handler, in `_commands/` (one module per family, each handler registered with
`@handles(TheCommand)`). Most handlers are plain functions, answered at once
(`_answers.py`). One that needs another worker — an operation on pointers
forwarded down a chain, a transfer waiting for the destination to confirm —
returns a coroutine that awaits a `Request`; the scheduler (`_scheduler.py`)
sends it and resumes the coroutine with the reply, parking it where a crash of
the executor cannot lose it (`_parking.py`). Meanwhile the worker keeps serving,
so chains with cycles (alice -> bob -> alice) cannot deadlock. What the worker
says of itself, and who else is still there, is `_presence.py`'s.

A worker replies to a command only once everything it caused has happened,
down the whole chain. A caller that has all its replies therefore sees every
effect of its commands, on every worker.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from types import CoroutineType
from typing import Any

from torchrelay.broker import (
    BATCH,
    GONE_AFTER_SECONDS,
    Batched,
    Command,
    Delete,
    Delivery,
    Endpoint,
    Envelope,
    OperationRefused,
    ProtocolError,
    Status,
    TorchRelayError,
    Transfer,
    decode_batch,
    is_plain_ok,
    new_object_id,
    stamp,
    worker_queue,
)

from ..operations._config import WorkerConfig
from ._admission import Admission, read_command, unreadable
from ._answers import Answers
from ._commands import HANDLERS
from ._commands.datasets import add_dataset
from ._datasets import Dataset
from ._fairness import FairQueue, Strikes
from ._leases import DEFAULT_LEASE, DEFAULT_PRESENCE_INTERVAL, Leases
from ._limits import Limits
from ._oblivious import PrivateExecution
from ._pacing import Pacer
from ._parking import Parking
from ._presence import Presence
from ._privacy import PrivacyBudget, PrivacyPolicy
from ._records import Containment, Incoming, Job, Request, Task
from ._scheduler import Scheduler
from ._store import EVERYONE, ObjectStore

__all__ = ["WorkerRuntime"]


log = logging.getLogger("torchrelay.worker")


class WorkerRuntime:
    """The worker named `worker_id`, answering through `endpoint`."""

    def __init__(
        self,
        worker_id: str,
        endpoint: Endpoint,
        *,
        reply_timeout: float = 60.0,
        gone_after: float = GONE_AFTER_SECONDS,
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
        self.endpoint = endpoint
        self.limits = limits = limits or Limits()
        self.store = store if store is not None else ObjectStore(worker_id, limits.max_bytes)
        self.containment = containment
        self.fault_injection = fault_injection
        """Whether the test suite's fault-injection operations exist here (`_faults.py`)."""
        self.dataset_holders = EVERYONE if dataset_clients is None else frozenset(
            dataset_clients)
        """Who may use this worker's datasets (`clients` in its config; everyone)."""
        self.privacy = privacy or PrivacyPolicy()
        """This worker's rules for its private data (see `_privacy.py`)."""
        self.budget = PrivacyBudget(self.privacy, ledger)
        self.private_execution = PrivateExecution(limits, Pacer() if paced else None)
        """Runs operations on private-derived data so that only shapes show (and, `paced`,
        their time only a public schedule: a daemon's clients can time it; in process,
        the client shares the worker's memory and clock anyway)."""
        self.lost_graphs: set[int] = set()
        """Objects restored after a crash whose autograd graph died with the executor."""

        self.in_hand: tuple[str, str, float] | None = None
        """The command running: its sender, its name, since when (read by the thread that
        answers status while it runs)."""
        self.handled = 0
        self._origin: str | None = None  # whom the command running acts for
        self._random = random.Random()
        self.admission = Admission(worker_id, Strikes(sender_strikes, sender_penalty),
                                   sender_max_queued, limits.command_timeout)
        self.queue: FairQueue[tuple[Incoming, Batched]] = FairQueue()
        """Commands received and waiting to run, one queue per sender (`_fairness.py`)."""
        self.answers = Answers(worker_id, endpoint, containment)
        self.parking = None if containment is None else Parking(
            worker_id, containment, self.store, self.tell, self.answers.finish)
        self.scheduler = Scheduler(worker_id, endpoint, reply_timeout, self.answers,
                                   self.parking, gone_after=gone_after)
        self.presence = Presence(self, presence_interval, None if endpoint.in_process else Leases(
            lease, endpoint.queue_consumers,
            lambda identity: endpoint.queue_consumers(worker_queue(identity)) is not None),
            status_facts or {})
        endpoint.awaiting = lambda: bool(self.scheduler)
        endpoint.answer_now = self.presence.answer_now

    @classmethod
    def for_config(cls, config: WorkerConfig, endpoint: Endpoint,
                   **extra: Any) -> WorkerRuntime:
        """The runtime a daemon with `config` serves with (`extra`: what a supervised
        executor adds, its store and containment)."""
        return cls(config.id, endpoint, reply_timeout=config.reply_timeout,
                   gone_after=config.gone_after,
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
        if delivery.is_reply:
            self.scheduler.resume(delivery)
            if self.containment is not None:
                self.containment.commit()
            return
        if self.admission.misdirects(delivery):
            self.endpoint.ack(delivery)
            return
        reply_to = delivery.reply_to
        if delivery.type == Status.name and reply_to is not None:
            # As the connection's keeper answers it while a command runs: not behind
            # others' commands received but not begun (they may have come a moment before).
            answered = self.presence.answer_now(delivery)
            if answered is not None:
                kind, frame = answered
                self.endpoint.send_reply(reply_to, kind, frame, delivery.correlation_id)
                self.endpoint.ack(delivery)
                return
        replies: list[tuple[str, str, Any]] | None = None
        if delivery.refused is not None:  # the transport could not take it whole
            items = [unreadable(delivery, ProtocolError(delivery.refused))]
        elif delivery.type != BATCH:
            items = [read_command(delivery)]
            stamp("worker.decoded")
        else:
            try:
                items = decode_batch(delivery.body)
                stamp("worker.decoded")
                replies = []  # the answers to a batch's commands go back together
            except ProtocolError as e:
                log.warning("refused a malformed batch from %s: %s", delivery.sender, e)
                items = [unreadable(delivery, e)]
        incoming = Incoming(delivery, len(items), replies)
        sender = delivery.sender
        held = self.queue.held
        refusal = self.admission.refusal(delivery, held.get(sender, 0))
        if refusal is not None:  # every command of it answered so, none run
            self.answers.incoming = incoming
            try:
                for item in items:
                    self.answers.finish(Job(item.name, item.command, sender, reply_to,
                                            item.correlation_id), None, refusal)
            finally:
                self.answers.incoming = None
            incoming.left = 0
            self._complete(incoming, counted=False)
            return
        held[sender] = held.get(sender, 0) + 1
        for item in items:  # (in the order of whom it acts for: see Envelope.origin)
            self.queue.push(item.envelope.origin or sender, (incoming, item))
        stamp("worker.admitted")

    def step(self) -> bool:
        """Run the next command, the fairest sender's (`_fairness.py`); whether one ran."""
        if not self.queue:
            return False
        sender, (incoming, item) = self.queue.pop()
        self._run_job(sender, incoming, item)
        return True

    def _run_job(self, sender: str, incoming: Incoming, item: Batched) -> None:
        stamp("worker.started")
        incoming.started = True
        self.answers.incoming = incoming
        self._origin = sender  # (the queue's key: whom it acts for)
        started = time.monotonic()
        self.in_hand = (sender, item.name, started)
        try:
            self._handle_one(incoming, item)
        finally:
            self.answers.incoming = self.in_hand = self._origin = None
            self.queue.charge(sender, time.monotonic() - started)
            incoming.left -= 1
            if not incoming.left:
                self._complete(incoming)

    @property
    def queued(self) -> int:
        """Commands received and waiting to run."""
        return len(self.queue)

    @property
    def waiting(self) -> int:
        """Commands waiting on other workers."""
        return len(self.scheduler)

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

    def expire(self, now: float | None = None) -> None:
        """Fail the requests whose reply is overdue, or whose worker is gone; reclaim what
        participants gone past their lease held; say this worker is here."""
        now = time.monotonic() if now is None else now
        self.scheduler.expire(now)
        self.presence.tick(now)

    def fail_waiting(self, error: TorchRelayError) -> None:
        """Fail every request in flight (the connection that would carry replies is gone)."""
        self.scheduler.fail_all(error)

    def settle_interrupted(self, payloads: list[bytes]) -> None:
        """Answer and undo the commands a dead executor left waiting (`_parking.py`)."""
        if self.parking is not None:
            self.parking.settle(payloads)

    def _complete(self, incoming: Incoming, *, counted: bool = True) -> None:
        """All of a message's commands ran: its answers go out, it is acknowledged. A move
        of it still waiting on its destination holds both back (`Scheduler._ended` sends
        them with the move's answer: one message to the sender, not two)."""
        delivery = incoming.delivery
        if counted:  # (among its sender's messages waiting here)
            held = self.queue.held
            count = held.get(delivery.sender, 1) - 1
            if count:
                held[delivery.sender] = count
            else:
                held.pop(delivery.sender, None)
        if not incoming.held:
            self.answers.settle(incoming)
        stamp("worker.done")

    # -- one command ---------------------------------------------------------------

    def _handle_one(self, incoming: Incoming, item: Batched) -> None:
        delivery = incoming.delivery
        key = (delivery.sender, item.correlation_id)
        job = Job(item.name, item.command, delivery.sender, delivery.reply_to,
                  item.correlation_id)
        admission = self.admission
        poisoned = admission.poisoned.get(key)
        if poisoned is not None:
            self._refuse_poisoned(job, item, poisoned, redelivered=delivery.redelivered)
            return
        if delivery.redelivered and admission.ran(key):
            # Ran already; its acknowledgement was lost with a connection (or with an
            # executor that crashed later). Running it again could apply an in-place
            # operation twice.
            log.info("skipped %s %s from %s: it already ran", item.name, item.correlation_id,
                     delivery.sender)
            owed = admission.owed(key)
            if owed is not None:  # its answer, due with its batch's, died with the executor
                self.answers.finish(job, None, None if owed else OperationRefused(
                    f"this command ran, but worker {self.id!r} restarted before its answer "
                    "went out, and the answer was lost with it (what it did stands)"))
            return
        if self.presence.leases is not None:
            self.presence.leases.saw(delivery.sender, delivery.reply_to, time.monotonic())
        admission.running(key)
        self.handled += 1
        if item.command is None:
            log.warning("refused a malformed %r command from %s: %s", item.name[:64],
                        delivery.sender, item.error)
            self.answers.finish(job, None, item.error)
            return
        containment = self.containment
        if containment is None:
            self._run(job, item.envelope)
            return
        containment.begin(delivery.sender, item.correlation_id)
        try:
            self._run(job, item.envelope)
        finally:
            containment.commit()
            replies = incoming.replies
            if replies and replies[-1][0] == item.correlation_id:  # its answer waits
                incoming.owed.append(containment.ran(plain_ok=is_plain_ok(replies[-1][2])))
            else:
                containment.done()

    def _refuse_poisoned(self, job: Job, item: Batched, poisoned: str, *,
                         redelivered: bool) -> None:
        log.warning("refused %s %s from %s again: it %s", item.name, item.correlation_id,
                    job.sender, poisoned)
        settled = ""
        if type(item.command) is Transfer and redelivered:
            # It may have sent its copy before the crash: the restored object here is
            # the one, and the other goes. (Only the copy the broker delivers again:
            # anyone can send a new command under an old correlation id.)
            self.unsend(item.command)
            settled = (f"; object {item.command.id} is still here, and any copy "
                       f"that reached {item.command.destination!r} is deleted")
        self.answers.finish(job, None, OperationRefused(
            f"this command {poisoned}; the worker restarted with its objects and will "
            f"not run it again{settled}"
        ))
        if item.command is not None:  # to the dead-letter queue, for a person to see
            self.endpoint.dead_letter(item.name, item.command.encode(item.envelope),
                                      item.correlation_id, job.sender, poisoned)

    def _run(self, job: Job, envelope: Envelope) -> None:
        command = job.command
        assert command is not None
        # Garbage first; only its pointers' targets on other workers need waiting for.
        targets = self.store.delete_for(job.sender, envelope.garbage) if (
            envelope.garbage) else None
        try:
            if envelope.guard is not None:
                self.answers.check_guard(job, envelope.guard)
            outcome = HANDLERS[type(command)](self, command, job.sender)
        except Exception as e:
            for location, ids in (targets or {}).items():
                self.tell(location, Delete(ids))
            self.answers.finish(job, None, e)
            return
        if targets:
            outcome = self.then_delete(outcome, targets)
        if type(outcome) is CoroutineType:  # it waits for another worker
            self.scheduler.advance(Task(outcome, job, self._origin), None, None)
        else:
            self.answers.finish(job, outcome, None)

    # -- for handlers ----------------------------------------------------------------

    def new_id(self) -> int:
        return new_object_id(self._random)

    def ask(self, worker_id: str, command: Command, *, confirm: bool = False) -> Request:
        """What a handler's coroutine awaits for `command`'s reply from `worker_id`."""
        return Request(worker_id, command, confirm)

    def tell(self, worker_id: str, command: Command) -> None:
        """Send `command` without waiting for its reply (dropped as a late one)."""
        origin = self._origin
        try:
            self.endpoint.send_command(
                worker_id, command.name,
                command.encode(None if origin is None else Envelope(origin=origin)),
                self.scheduler.next_correlation_id())
        except TorchRelayError as e:
            log.warning("could not send %s to %s: %s", command.describe(), worker_id, e)

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
                except TorchRelayError as e:  # the worker down the chain is gone
                    log.warning("deleting objects on %s failed: %s", location, e)
        return outcome

    def unsend(self, transfer: Transfer) -> None:
        """Undo `transfer` at its destination, whether or not its copy arrived: the
        object stays here. (As `made_by` says of the copy's `Store`.)"""
        if not transfer.replaces_pointer:
            self.tell(transfer.destination, Delete([transfer.destination_id]))

    def add_dataset(self, dataset: Dataset, key: str) -> int:
        """Offer `dataset` (loaded from `key`, its path) here: its id."""
        return add_dataset(self, dataset, key)
