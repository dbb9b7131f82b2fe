"""A client's session: one broker connection, handles to workers, replies in flight.

Commands that need no answer (operations on pointers, sends, deletes) are
pipelined: published at once, their replies collected later. A call that waits
(`get`, `move`, `_objects`, `.shape`...) returns only once every reply still
outstanding is in, so it observes all that was issued before it, and raises the
first error among them, naming the operation that failed. A worker replies only
once a command's effects have happened down the whole chain, so "all replies
in" means "every worker is up to date".

A wait costs one broker round trip. When every command still in flight went to
the same worker and settles there in order (no pointer chain to forward it down),
the awaited command is published right behind them: the worker runs its queue in
order, so it sees their effects. It carries a guard (`Envelope.guard`): should
one of them fail, the worker refuses it instead of running it behind a failure
the client has not heard of, so a `get` never destroys what it fetched. In every
other case the client first collects what is in flight, then publishes.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import random
import secrets
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torchrelay.broker import (
    RETURNED,
    Broker,
    Command,
    ConnectionLost,
    Delete,
    Delivery,
    Describe,
    Envelope,
    ProtocolError,
    ReplyTimeout,
    Status,
    TorchRelayError,
    UnknownWorker,
    decode_reply,
    new_object_id,
)

if TYPE_CHECKING:
    from ._pointer import PointerTensor

__all__ = ["Fleet", "ObjectDescription", "WorkerHandle"]

log = logging.getLogger("torchrelay.client")

class ObjectDescription(str):
    """A stored object's description; its repr is the text itself, as in a notebook."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


class WorkerHandle:
    """A worker as the client sees it: where pointers point and commands go."""

    __slots__ = ("fleet", "id")

    def __init__(self, fleet: Fleet, worker_id: str) -> None:
        self.fleet = fleet
        self.id = worker_id

    @property
    def _objects(self) -> dict[int, ObjectDescription]:
        """A snapshot of the worker's store: `{id: short description}`."""
        described = self.fleet.request(self.id, Describe(), show_garbage=True)
        return {int(k): ObjectDescription(v) for k, v in described.items()}

    def status(self) -> dict[str, Any]:
        """The worker's health and counters."""
        status: dict[str, Any] = self.fleet.request(self.id, Status(), show_garbage=True)
        return status

    def __repr__(self) -> str:
        return f"<Worker {self.id} on {self.fleet.broker.url}>"


@dataclass(slots=True)
class _Outstanding:
    worker_id: str
    command: Command
    number: int
    keep: bool
    """The caller will collect the value."""
    settles: bool
    """Its outcome is known on its worker before the worker starts the next command
    (it is not forwarded down a chain of pointers)."""


class Fleet:
    """A client session on `broker`. Use `torchrelay.connect` to make one."""

    def __init__(
        self,
        broker: Broker,
        *,
        name: str = "me",
        timeout: float = 30.0,
        pipelined: bool = True,
        owns_broker: bool = False,
    ) -> None:
        self.broker = broker
        self.name = name
        self.timeout = timeout
        self.pipelined = pipelined
        self._owns_broker = owns_broker
        self.endpoint = broker.connect(name)
        self._workers: dict[str, WorkerHandle] = {}
        self._outstanding: dict[str, _Outstanding] = {}  # in the order sent
        self._unsettled = 0  # outstanding commands that do not settle in order
        self._outstanding_to: dict[str, int] = {}  # worker id -> outstanding commands to it
        self._results: dict[str, Any] = {}
        self._errors: list[TorchRelayError] = []
        self._doomed: dict[str, list[int]] = {}
        self._live: weakref.WeakSet[PointerTensor] = weakref.WeakSet()
        self._numbers = itertools.count(1)
        # Unique per session: a worker remembers recent correlation ids to skip a
        # command redelivered after a reconnect, and two sessions named "me" must
        # not look alike.
        self._prefix = f"{name}.{secrets.token_hex(4)}."
        self._doomed_lock = threading.Lock()
        self._random = random.Random()
        self.meta_epoch = 0
        """Bumped by operations that may change a tensor's metadata: pointers' caches
        of it are valid for one epoch."""
        self.closed = False
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- public ----------------------------------------------------------------

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
            self.closed = True
            self.endpoint.close()
            if self._owns_broker:
                self.broker.close()

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
        self._send(worker_id, command, keep=False, settles=settles)
        if not self.pipelined:
            self._collect()

    def request(self, worker_id: str, command: Command, *, show_garbage: bool = False) -> Any:
        """Publish `command` and return its reply, once everything before it took effect.

        With `show_garbage`, every worker first deletes what dead pointers owned,
        for commands that show a store.
        """
        guard = None
        if show_garbage:
            self._flush_deletes()
            self._collect()  # deletes down chains finish after their own replies
        elif self._outstanding:
            if self._may_overtake(worker_id):
                guard = next(iter(self._outstanding.values())).number
            else:
                self._collect()
        correlation_id = self._send(worker_id, command, keep=True, settles=True, guard=guard)
        self._collect(raise_errors=False)
        result = self._results.pop(correlation_id)
        self._raise_errors()  # an earlier failure first: the reason this one was refused
        if isinstance(result, TorchRelayError):
            raise result
        return result

    def _may_overtake(self, worker_id: str) -> bool:
        """Whether a command to `worker_id` may be published behind those in flight."""
        return not self._unsettled and (
            self._outstanding_to.get(worker_id, 0) == len(self._outstanding)
        )

    def track(self, pointer: PointerTensor) -> None:
        self._live.add(pointer)

    def doom(self, worker_id: str, object_id: int) -> None:
        """Called when a pointer dies: its target is deleted with the next command to
        its worker (or by the next `sync`, `_objects`, or `close`)."""
        if not self.closed:
            with self._doomed_lock:  # __del__ may run in any thread
                self._doomed.setdefault(worker_id, []).append(object_id)

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
        number = next(self._numbers)
        correlation_id = f"{self._prefix}{number}"
        garbage: list[int] | tuple[()] = ()
        if self._doomed:  # read without the lock: garbage missed now rides with the next
            with self._doomed_lock:
                garbage = self._doomed.pop(worker_id, ())
        self._outstanding[correlation_id] = _Outstanding(worker_id, command, number, keep, settles)
        self._outstanding_to[worker_id] = self._outstanding_to.get(worker_id, 0) + 1
        if not settles:
            self._unsettled += 1
        try:
            envelope = _PLAIN if not garbage and guard is None else Envelope(list(garbage), guard)
            frame = command.encode(envelope)
            self.endpoint.send_command(worker_id, command.name, frame, correlation_id)
        except BaseException as e:
            self._forget(correlation_id)
            if garbage:  # not sent: it waits for the next ride
                with self._doomed_lock:
                    self._doomed.setdefault(worker_id, []).extend(garbage)
            if isinstance(e, ConnectionLost):  # raised now, for every reply it took
                self._fail_outstanding(e, report_later=False)
            raise
        return correlation_id

    def _forget(self, correlation_id: str) -> _Outstanding | None:
        entry = self._outstanding.pop(correlation_id, None)
        if entry is not None:
            self._outstanding_to[entry.worker_id] -= 1
            if not entry.settles:
                self._unsettled -= 1
        return entry

    def _flush_deletes(self) -> None:
        """Send every worker the garbage still waiting for a ride."""
        while self._doomed:
            with self._doomed_lock:
                worker_id, ids = self._doomed.popitem()
            self._send(worker_id, Delete(ids), keep=False, settles=False)

    def _collect(self, *, raise_errors: bool = True) -> None:
        """Receive replies until none is outstanding."""
        outstanding = self._outstanding
        endpoint = self.endpoint
        timeout = self.timeout
        while outstanding:
            try:
                delivery = endpoint.receive(timeout)
            except ConnectionLost as e:
                self._fail_outstanding(e)
                break
            if delivery is None:  # nothing at all arrived for `timeout` seconds
                self._time_out()
                break
            if not delivery.is_reply:
                continue
            entry = self._forget(delivery.correlation_id)
            if entry is None:
                continue  # a late reply to a request that already timed out
            self._record(delivery.correlation_id, entry, delivery)
        if raise_errors:
            self._raise_errors()

    def _record(self, correlation_id: str, entry: _Outstanding, delivery: Delivery) -> None:
        result: Any
        if delivery.type == RETURNED:
            result = UnknownWorker(entry.worker_id, "no worker consumes its queue")
        elif delivery.refused is not None:
            result = ProtocolError(f"the reply to {entry.command.describe()} from worker "
                                   f"{entry.worker_id!r} was {delivery.refused}")
        else:
            try:
                reply = decode_reply(delivery.body)
            except ProtocolError as e:
                result = e
            else:
                if reply.error is None:
                    result = reply.value
                else:
                    result = reply.error.to_exception(entry.worker_id, entry.command.describe())
        if entry.keep:
            self._results[correlation_id] = result
        elif isinstance(result, TorchRelayError):
            self._errors.append(result)

    def _time_out(self) -> None:
        first = next(iter(self._outstanding.values()))
        reason = f"nothing left to run on {self.broker.url}" if self.endpoint.quiescent else ""
        error = ReplyTimeout(first.worker_id, first.command.describe(), self.timeout, reason)
        self._fail_outstanding(error)

    def _fail_outstanding(self, error: TorchRelayError, *, report_later: bool = True) -> None:
        for correlation_id, entry in self._outstanding.items():
            if entry.keep:
                self._results[correlation_id] = error
        if report_later and not all(entry.keep for entry in self._outstanding.values()):
            self._errors.append(error)
        self._outstanding.clear()
        self._outstanding_to.clear()
        self._unsettled = 0

    def _raise_errors(self) -> None:
        if not self._errors:
            return
        first, *others = self._errors
        self._errors.clear()
        if others:
            first.add_note(
                f"{len(others)} later operation{'s' if len(others) > 1 else ''} failed too, "
                f"the first of them: {others[0]}"
            )
        raise first


_PLAIN = Envelope()


def _close_at_exit(ref: weakref.ref[Fleet]) -> None:
    fleet = ref()
    if fleet is not None and not fleet.closed:
        fleet.close()
