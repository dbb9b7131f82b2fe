"""A client's session: one broker connection, handles to workers, replies in flight.

The session's rooms: commands in flight (`_pending.py`), their replies
(`_replies.py`), queueing and publishing (`_publishing.py`), dead pointers'
garbage (`_garbage.py`), workers as the client sees them (`_handles.py`).

Commands that need no answer (operations on pointers, sends, deletes) are
pipelined: published at once, their replies collected later. A call that waits
(`get`, `move`, `_objects`, `.shape`...) returns only once every reply still
outstanding is in, so it observes all that was issued before it, and raises the
first error among them, naming the operation that failed. A worker replies only
once a command's effects have happened down the whole chain, so "all replies
in" means "every worker is up to date".

Commands to one worker travel together (`_publishing.py`): posted commands wait
in the client until it waits for something, addresses another worker, has
`MAX_QUEUED` of them, or `QUEUE_DELAY` has passed (`IDLE_LOOK`, when the script has
been waiting promptly), and then go as one message,
a batch, which the worker runs in order and answers with one message. A
training step of a dozen operations and the loss it fetches is one message each
way.

A wait costs one broker round trip. When every command still in flight went to
the same worker and settles there in order (no pointer chain to forward it down),
the awaited command goes right behind them, in the same batch: the worker runs
them in order, so it sees their effects. It carries a guard (`Envelope.guard`):
should one of them fail, the worker refuses it instead of running it behind a
failure the client has not heard of, so a `get` never destroys what it fetched.
In every other case the client first collects what is in flight, then sends.
A fetch of what the one command in flight makes, still waiting to go, replaces
that command: the call, told to fetch its result (`fetch`, `Call.fetch`).
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import random
import secrets
import sys
import time
import weakref
from typing import TYPE_CHECKING, Any

from torchrelay.broker import (
    GONE_AFTER_SECONDS,
    GONE_CHECK_SECONDS,
    Broker,
    Call,
    Command,
    ConnectionLost,
    Delete,
    Endpoint,
    Envelope,
    Fetch,
    GoneWatch,
    ReplyTimeout,
    Status,
    TorchRelayError,
    UnknownWorker,
    gone_message,
    new_object_id,
    stamp,
)

from ._data import search
from ._garbage import Garbage
from ._handles import WorkerHandle
from ._pending import Outstanding, Pending
from ._progress import TerminalProgress
from ._publishing import Publisher, Queued, Unsent
from ._replies import Replies

if TYPE_CHECKING:
    from ._plan_recording import Capture
    from ._pointer import PointerTensor

__all__ = ["Fleet"]

log = logging.getLogger("torchrelay.client")


class Fleet:
    """A client session on `broker`. Use `torchrelay.connect` to make one."""

    def __init__(
        self,
        broker: Broker,
        *,
        name: str = "me",
        timeout: float = 30.0,
        pipelined: bool = True,
        gone_after: float = GONE_AFTER_SECONDS,
        owns_broker: bool = False,
    ) -> None:
        self.broker = broker
        self.name = name
        self.timeout = timeout
        self.pipelined = pipelined
        self._owns_broker = owns_broker
        self._endpoint = broker.connect(name)
        if not self.endpoint.in_process and sys.stderr.isatty():
            # Transfers of hundreds of MiB take seconds: show them going, in a terminal.
            self.endpoint.progress = TerminalProgress(sys.stderr)
        self.endpoint.awaiting = self._awaiting
        self._workers: dict[str, WorkerHandle] = {}
        self.pending = Pending()
        """Commands sent and not answered yet, in the order sent (`_pending.py`)."""
        self.capture: Capture | None = None
        """The recording of a plan under way (`_plan_recording.py`), which sees every command."""
        self.replies = Replies(self.pending)
        """What the commands sent were answered (`_replies.py`)."""
        self.garbage = Garbage()
        """What dead pointers owned, waiting for a ride (`_garbage.py`)."""
        self._live: weakref.WeakSet[PointerTensor] = weakref.WeakSet()
        self._numbers = itertools.count(1)
        # Unique per session: a worker remembers recent correlation ids to skip a
        # command redelivered after a reconnect, and two sessions named "me" must
        # not look alike.
        self._prefix = f"{name}.{secrets.token_hex(4)}."
        self._random = random.Random()
        self.meta_epoch = 0
        """Bumped by operations that may change a tensor's metadata: pointers' caches
        of it are valid for one epoch."""
        self.closed = False
        self._gone = GoneWatch(self.endpoint, gone_after)
        atexit.register(_close_at_exit, weakref.ref(self))
        self.publisher = Publisher(self.endpoint, background=None if self.endpoint.in_process
                                   else f"torchrelay-publisher {name}")
        """Posted commands waiting to be published, and their publication."""
        self.publisher.on_published = self._published

    # -- public ----------------------------------------------------------------

    @property
    def forged(self) -> int:
        """Messages dropped as forged: ones claiming a sender their broker user is not,
        and replies that did not come from the worker asked."""
        return int(self.endpoint.stats().get("forged", 0)) + self.replies.forged

    def workers(self, wait: float = 1.0) -> list[dict[str, Any]]:
        """The workers that are there: each one's status (id, pid, objects, bytes, commands
        served and failed, uptime...), by id. One command goes to every worker queue at
        once (through `torchrelay.events`); the live ones answer. Waits for answers up to
        `wait` seconds, and no longer than a quarter of a second after the last."""
        self._publish()
        correlation_id = f"{self._prefix}presence.{next(self._numbers)}"
        answers = self.replies.presence[correlation_id] = {}
        try:
            self.endpoint.broadcast_command(Status.name, Status().encode(), correlation_id)
            deadline = time.monotonic() + wait
            last: float | None = None  # when the latest answer came
            while (now := time.monotonic()) < deadline and (last is None or now - last < 0.25):
                count = len(answers)
                if not self._receive(min(deadline - now, 0.05)):
                    if self.endpoint.in_process:
                        break  # in-process, nothing left to run: all have answered
                elif len(answers) > count:
                    last = time.monotonic()
        finally:
            del self.replies.presence[correlation_id]
        return [answers[w] for w in sorted(answers)]

    def worker(self, worker_id: str) -> WorkerHandle:
        """A handle to `worker_id`; raises `UnknownWorker` if nothing serves it."""
        handle = self._workers.get(worker_id)
        if handle is None:
            self.endpoint.ensure_worker(worker_id)
            handle = self._workers[worker_id] = WorkerHandle(self, worker_id)
        return handle

    def sync(self) -> None:
        """Wait until every command issued so far has taken effect; raise the first error.

        Garbage (targets of dead pointers) is not waited for: it travels with the
        next command to its worker, and before anything that shows a store.
        """
        self._collect()

    def flush(self) -> None:
        """Publish every command queued so far now, without waiting for anything (a
        message of their own: a large one, received and run before what comes next)."""
        self._publish()

    def close(self) -> None:
        """Delete what this session's pointers own, wait for it, and disconnect."""
        if self.closed:
            return
        try:
            for pointer in list(self._live):
                if pointer.garbage_collect:
                    pointer.garbage_collect = False
                    self.doom(pointer.location.id, pointer.id_at_location)
            self._flush_deletes()
            self.sync()
        except TorchRelayError as e:
            log.warning("while closing: %s", e)
        finally:
            self.closed = self.publisher.closed = True  # (its background thread ends)
            self.endpoint.close()
            if self._owns_broker:
                self.broker.close()

    @property
    def endpoint(self) -> Endpoint:
        """This session's connection to the broker."""
        return self._endpoint

    @endpoint.setter
    def endpoint(self, endpoint: Endpoint) -> None:
        """(Wrapped, to record or meter what goes through it: everything then does.)"""
        self._endpoint = self.publisher.endpoint = endpoint

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Fleet {self.name} on {self.broker.url}>"

    # -- used by pointers and handles -------------------------------------------

    def new_id(self) -> int:
        return new_object_id(self._random)

    def post(self, worker_id: str, command: Command, *, settles: bool = True) -> None:
        """Publish `command`; its reply is collected by the next call that waits.

        `settles`: its outcome is known on `worker_id` before the worker starts its
        next command (false for a call forwarded down a chain of pointers).
        """
        if self.pending.arriving(worker_id):
            self._collect()  # what it may use is still on its way there
        self._send(worker_id, command, keep=False, settles=settles)
        if not self.pipelined:
            self._collect()

    def request(self, worker_id: str, command: Command, *, show_garbage: bool = False) -> Any:
        """Publish `command` and return its reply, once everything before it took effect.

        With `show_garbage`, every worker first deletes what dead pointers owned,
        for commands that show a store.
        """
        self.replies.raise_errors()  # one already in: a `get` behind it must not even go
        guard = None
        if show_garbage:
            self._flush_deletes()
            self._collect()  # deletes down chains finish after their own replies
        elif self.pending:
            if self.pending.may_overtake(worker_id):
                guard = self.pending.first().number
            else:
                self._collect()
        return self._answer(self._send(worker_id, command, keep=True, settles=True,
                                       guard=guard))

    def fetch(self, worker_id: str, object_id: int) -> Any:
        """`request(worker_id, Fetch(object_id))`; but when the call that makes the object
        is the one command in flight, still waiting to go, it goes instead as that call
        fetching its result (`Call.fetch`): one command, with every check of both."""
        self.replies.raise_errors()  # (as `request`)
        making = self._call_making(worker_id, object_id)
        if making is not None:
            correlation_id, entry, call = making
            # With the call's own envelope: what died since it was posted may be its
            # arguments, and garbage is deleted before a command runs; it waits.
            fused = dataclasses.replace(call, fetch=True)
            if self.publisher.replace(correlation_id, fused):
                entry.command, entry.keep = fused, True
                return self._answer(correlation_id)
        return self.request(worker_id, Fetch(object_id))

    def _call_making(self, worker_id: str,
                     object_id: int) -> tuple[str, Outstanding, Call] | None:
        """The call that makes `object_id` on `worker_id`, if it is the one command in
        flight, posted (not waited for) and settling there; with its correlation id and
        its entry."""
        if self.capture is not None or len(self.pending) != 1:
            return None
        correlation_id, entry = next(iter(self.pending))
        call = entry.command
        if (type(call) is Call and call.result_id == object_id and not call.fetch
                and entry.worker_id == worker_id and entry.settles and not entry.keep):
            return correlation_id, entry, call
        return None

    def _answer(self, correlation_id: str) -> Any:
        """Wait for everything in flight; the reply to `correlation_id` (a command kept)."""
        self._collect(raise_errors=False)
        result = self.replies.results.pop(correlation_id)
        self.replies.raise_errors()  # an earlier failure first: the reason this one was refused
        if isinstance(result, TorchRelayError):
            raise result
        return result

    def request_many(self, requests: list[tuple[str, Command]]) -> list[Any]:
        """`request` for several commands at once: sent together (one batch per worker
        when they follow one another), waited for together; their replies in order.
        Raises the first error, once all are in."""
        self.replies.raise_errors()  # (as `request`)
        if self.pending and not (
            len({worker_id for worker_id, _ in requests}) == 1
            and self.pending.may_overtake(requests[0][0])
        ):
            self._collect()
        guard = self.pending.first().number if self.pending else None
        correlation_ids = [self._send(worker_id, command, keep=True, settles=True, guard=guard)
                           for worker_id, command in requests]
        self._collect(raise_errors=False)
        results = [self.replies.results.pop(correlation_id)
                   for correlation_id in correlation_ids]
        self.replies.raise_errors()
        for result in results:
            if isinstance(result, TorchRelayError):
                raise result
        return results

    def outcomes(self, requests: list[tuple[str, Command]]) -> list[Any]:
        """Each command's reply or its error (a `TorchRelayError`, returned, not raised):
        sent together once everything before them took effect, and waited for together.
        For rounds in which one worker's failure is its own (it drops out), not the
        caller's. Raises an earlier command's error, before sending anything."""
        self._collect()  # nothing of ours still in flight: none of these is held behind it
        correlation_ids = [self._send(worker_id, command, keep=True, settles=True)
                           for worker_id, command in requests]
        self._collect(raise_errors=False)
        return [self.replies.results.pop(correlation_id) for correlation_id in correlation_ids]

    def track(self, pointer: PointerTensor) -> None:
        self._live.add(pointer)

    def doom(self, worker_id: str, object_id: int) -> None:
        """Called when a pointer dies: its target is deleted with the next command to
        its worker (or by the next `sync`, `_objects`, or `close`)."""
        if not self.closed:
            self.garbage.add(worker_id, (object_id,))

    # -- internals ---------------------------------------------------------------

    def _send(
        self,
        worker_id: str,
        command: Command,
        *,
        keep: bool,
        settles: bool,
        guard: int | None = None,
    ) -> str:
        if self.closed:
            raise TorchRelayError(f"{self!r} is closed")
        if self.capture is not None:
            self.capture.saw(worker_id, command, settles)
        number = next(self._numbers)
        correlation_id = f"{self._prefix}{number}"
        garbage = self.garbage.take(worker_id)
        deletes = [*garbage, *command.ids] if type(command) is Delete else garbage
        self.pending.add(correlation_id, Outstanding(worker_id, command, number, keep, settles,
                                                     deletes))
        envelope = None if not garbage and guard is None else Envelope(list(garbage), guard)
        try:
            self._settle_unsent(self.publisher.add(worker_id, (command, correlation_id,
                                                               envelope)))
        except ConnectionLost as e:
            self._fail_outstanding(self.replies.lost(e))
        stamp("client.queued", correlation_id)
        return correlation_id

    def _publish(self) -> None:
        try:
            self._settle_unsent(self.publisher.publish())
        except ConnectionLost as e:
            self._fail_outstanding(self.replies.lost(e))

    def _settle_unsent(self, unsent: list[Unsent]) -> None:
        """Commands that could not be published failed; the garbage that rode with them
        waits for the next ride."""
        for failed in unsent:
            for _, correlation_id, envelope in failed.queued:
                entry = self.pending.forget(correlation_id)
                if entry is not None:
                    self.replies.record(correlation_id, entry, failed.error)
                if envelope is not None and envelope.garbage:
                    self.garbage.add(failed.worker_id, envelope.garbage)

    def _published(self, queued: list[Queued]) -> None:
        for _, correlation_id, _ in queued:
            entry = self.pending.get(correlation_id)
            if entry is not None:  # (unless already answered)
                entry.published = True

    def _awaiting(self) -> bool:
        """Whether replies to what was published are still due (see `Endpoint.awaiting`).
        Not a count of pending less unpublished: a command posted by one thread while
        another publishes (and reconnects) is pending and in neither count yet."""
        return any(entry.published for _, entry in self.pending)

    def _flush_deletes(self) -> None:
        """Send every worker the garbage still waiting for a ride."""
        while (doomed := self.garbage.take_any()) is not None:
            worker_id, ids = doomed
            self._send(worker_id, Delete(ids), keep=False, settles=False)

    def _collect(self, *, raise_errors: bool = True) -> None:
        """Publish what is queued, then receive replies until none is outstanding."""
        self._publish()
        idle_since = time.monotonic()
        while self.pending:
            try:
                if self._receive(min(self.timeout, GONE_CHECK_SECONDS)):
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= self.timeout:  # nothing came for that long
                    self._time_out()
                else:
                    self._fail_if_gone()
            except ConnectionLost as e:
                self._fail_outstanding(self.replies.lost(e))
        stamp("client.settled")
        if raise_errors:
            self.replies.raise_errors()

    def _fail_if_gone(self) -> None:
        """While waiting in silence: fail at once if a worker we wait for has no daemon
        consuming its queue any more, rather than after the whole timeout."""
        gone = self._gone.gone(self.pending.workers(), time.monotonic())
        if gone is not None:
            self._fail_outstanding(UnknownWorker(gone[0], gone_message(gone[1])))

    def _receive(self, timeout: float) -> bool:
        """Take one delivery, if one comes within `timeout`; whether one came."""
        delivery = self.endpoint.receive(timeout)
        if delivery is None:
            return False
        if delivery.is_reply:
            self.replies.take(delivery)
        return True

    def settle(self, timeout: float) -> dict[str, TorchRelayError]:
        """Wait at most `timeout` seconds for everything in flight, and raise nothing:
        say, for each worker that failed, what went wrong (its first error, or a
        `ReplyTimeout` for what it had not answered in time: that is given up, and
        its late replies are dropped). For rounds that go on without a slow worker."""
        self._publish()
        deadline = time.monotonic() + timeout
        while self.pending and (left := deadline - time.monotonic()) > 0:
            try:
                self._receive(min(left, self.timeout))
            except ConnectionLost as e:
                self._fail_outstanding(self.replies.lost(e))
        return self.replies.give_up(timeout)

    def search(self, *tags: str) -> list[Any]:
        """The datasets, on every worker this session knows, holding all of `tags`."""
        return search(list(self._workers.values()), tags)

    def _time_out(self) -> None:
        first = self.pending.first()
        reason = f"nothing left to run on {self.broker.url}" if self.endpoint.quiescent else ""
        error = ReplyTimeout(first.worker_id, first.command.describe(), self.timeout, reason)
        self._fail_outstanding(error)

    def _fail_outstanding(self, error: TorchRelayError) -> None:
        """Everything in flight failed with `error`; the garbage that rode with it waits
        for the next ride (whether it was carried out is unknown)."""
        regathered = self.replies.fail_all(error)
        self.publisher.drop()  # (each is outstanding: its garbage is regathered)
        for worker_id, ids in regathered.items():
            self.garbage.add(worker_id, ids)


def _close_at_exit(ref: weakref.ref[Fleet]) -> None:
    fleet = ref()
    if fleet is not None and not fleet.closed:
        fleet.close()
