"""Replies as a session receives them: matched to the commands they answer.

A reply counts only if it comes from the worker its command went to (the broker
vouches for the sender: anyone who can publish can write to our reply queue, but
not under another's name); others are counted as forged and dropped. A batch's
replies come in one message; a batch nobody took comes back whole, "returned".
What a command's reply says is kept for whoever waits on it (`keep`), or, an
error of a pipelined command, raised at the session's next wait.
"""

from __future__ import annotations

import logging
from typing import Any

from torchrelay.broker import (
    BATCH,
    ConnectionLost,
    Delivery,
    ProtocolError,
    ReplyTimeout,
    TorchRelayError,
    UnknownWorker,
    decode_reply,
    decode_reply_batch,
    session_and_number,
)

from ._pending import Outstanding, Pending

__all__ = ["Replies"]

log = logging.getLogger("torchrelay.client")

_BATCH_REPLY = f"{BATCH}.reply"


class Replies:
    """What the commands in `pending` were answered."""

    def __init__(self, pending: Pending) -> None:
        self.pending = pending
        self.results: dict[str, Any] = {}
        """Answers kept for whoever waits on them, by correlation id."""
        self.errors: list[TorchRelayError] = []
        """Errors of pipelined commands, raised at the next wait (`raise_errors`)."""
        self.presence: dict[str, dict[str, Any]] = {}
        """Status broadcasts in flight: correlation id -> answers by worker."""
        self.forged = 0
        """Replies dropped because they did not come from the worker asked."""

    def take(self, delivery: Delivery) -> None:
        """Take a reply: what it answers is answered."""
        if delivery.correlation_id in self.presence:
            self._presence_answer(delivery)
        elif delivery.type == _BATCH_REPLY:
            self._take_batch(delivery)
        elif delivery.returned and "+" in delivery.correlation_id:
            for member in _members(delivery.correlation_id):  # a batch nobody took
                entry = self.pending.get(member)
                if entry is not None and self._from_addressee(delivery, entry.worker_id):
                    self.pending.forget(member)
                    self.record(member, entry, self._result(entry, delivery))
        else:
            entry = self.pending.get(delivery.correlation_id)
            if entry is not None and self._from_addressee(delivery, entry.worker_id):
                self.pending.forget(delivery.correlation_id)
                self.record(delivery.correlation_id, entry, self._result(entry, delivery))
            # else: a late reply to a request that timed out, or a forgery

    def record(self, correlation_id: str, entry: Outstanding, result: Any) -> None:
        """`entry`'s command (sent under `correlation_id`) ended with `result`."""
        if entry.keep:
            self.results[correlation_id] = result
        elif isinstance(result, TorchRelayError):
            self.errors.append(result)

    def raise_errors(self) -> None:
        """Raise the first error of a pipelined command, noting how many more there were."""
        if not self.errors:
            return
        first, *others = self.errors
        self.errors.clear()
        if others:
            first.add_note(
                f"{len(others)} later operation{'s' if len(others) > 1 else ''} failed too, "
                f"the first of them: {others[0]}"
            )
        raise first

    def lost(self, error: ConnectionLost) -> ConnectionLost:
        """`error`, naming what was in flight when the connection went: the first
        operation and how many, so a script knows what to redo. (`lost` lists them.)"""
        entries = [entry for _, entry in self.pending]
        if not entries:
            return error
        first = entries[0]
        lost = ConnectionLost(
            f"{error}; {len(entries)} operation{'s' if len(entries) > 1 else ''} in flight "
            f"lost, the first: {first.command.describe()} on worker {first.worker_id!r} "
            "(whether they ran is unknown: redo them)")
        lost.lost = [(entry.worker_id, entry.command.describe()) for entry in entries]
        return lost

    def fail_all(self, error: TorchRelayError) -> dict[str, list[int]]:
        """Every command in flight failed with `error` (reported to whoever waits on one,
        else at the next wait); the garbage that rode with them, by worker."""
        regathered: dict[str, list[int]] = {}
        for correlation_id, entry in self.pending:
            if entry.keep:
                self.results[correlation_id] = error
            if entry.garbage:
                regathered.setdefault(entry.worker_id, []).extend(entry.garbage)
        if not all(entry.keep for _, entry in self.pending):
            self.errors.append(error)
        self.pending.clear()
        return regathered

    def give_up(self, timeout: float) -> dict[str, TorchRelayError]:
        """For each worker that failed, what went wrong: its first error, or a
        `ReplyTimeout` for what it has not answered within `timeout` (given up: its
        late replies are dropped). Nothing is left to raise or to wait for."""
        failures: dict[str, TorchRelayError] = {}
        for error in self.errors:
            failures.setdefault(getattr(error, "worker_id", ""), error)
        self.errors.clear()
        for correlation_id, entry in self.pending:
            failures.setdefault(entry.worker_id, ReplyTimeout(
                entry.worker_id, entry.command.describe(), timeout))
            self.pending.forget(correlation_id)
        return failures

    def _presence_answer(self, delivery: Delivery) -> None:
        """A worker's answer to a status broadcast: kept if it is a status of the worker
        it came from (the sender is the broker's word)."""
        try:
            reply = decode_reply(delivery.body)
        except ProtocolError:
            return
        value = reply.value
        if reply.error is None and type(value) is dict and value.get("id") == delivery.sender:
            self.presence[delivery.correlation_id][delivery.sender] = value

    def _take_batch(self, delivery: Delivery) -> None:
        try:
            replies = decode_reply_batch(delivery.body)
        except ProtocolError as e:
            self.errors.append(e)
            return
        for correlation_id, _, body in replies:
            entry = self.pending.get(correlation_id)
            if entry is not None and self._from_addressee(delivery, entry.worker_id):
                self.pending.forget(correlation_id)
                self.record(correlation_id, entry, _decoded(entry, body))

    def _from_addressee(self, delivery: Delivery, worker_id: str) -> bool:
        """Whether a reply comes from the worker its command went to."""
        if delivery.sender == worker_id:
            return True
        self.forged += 1
        if self.forged == 1:
            log.warning("dropped a reply to a command for %r that came from %r (further "
                        "ones are only counted)", worker_id, delivery.sender[:100])
        return False

    @staticmethod
    def _result(entry: Outstanding, delivery: Delivery) -> Any:
        """What a reply delivery says: the value, or the error to raise."""
        if delivery.returned:
            return UnknownWorker(entry.worker_id, "no worker consumes its queue")
        if delivery.refused is not None:
            return ProtocolError(f"the reply to {entry.command.describe()} from worker "
                                 f"{entry.worker_id!r} was {delivery.refused}")
        return _decoded(entry, delivery.body)


def _decoded(entry: Outstanding, body: Any) -> Any:
    try:
        reply = decode_reply(body)
    except ProtocolError as e:
        return e
    if reply.error is None:
        return reply.value
    return reply.error.to_exception(entry.worker_id, entry.command.describe())


def _members(batch_id: str) -> list[str]:
    """The correlation ids of a batch's commands, from the batch's own: `<first>+<count>`
    (a batch's commands are numbered one after the other)."""
    first, _, count = batch_id.rpartition("+")
    numbered = session_and_number(first)
    if numbered is None or not count.isdecimal():
        return []
    session, number = numbered
    return [f"{session}.{n}" for n in range(number, number + min(int(count), 4096))]
