"""Handlers that wait on other workers, run as coroutines without blocking the worker.

A handler that needs another worker returns a coroutine that awaits `Request`s (or a
`Gather` of several, sent at once and resumed when all have ended).
The scheduler sends each request, files the coroutine under the request's
correlation id (`_waits.py`) and resumes it with the reply, or with the error
that ended the wait; meanwhile the worker serves others, so chains with cycles
(alice -> bob -> alice) cannot deadlock. When the coroutine returns, its command
is answered. A move's task holds its message's acknowledgement until it ends, and
with it the answers of the rest of its batch, which go back with the move's.
"""

from __future__ import annotations

import secrets
from typing import Any

from torchrelay.broker import Delivery, Endpoint, Envelope, TorchRelayError, Transfer

from ._answers import Answers
from ._parking import Parking
from ._records import Gather, GatherPart, Incoming, Request, Task
from ._waits import Waits

__all__ = ["Scheduler"]


class Scheduler:
    """The coroutines of worker `worker_id` waiting on others, and their requests."""

    def __init__(self, worker_id: str, endpoint: Endpoint, reply_timeout: float,
                 answers: Answers, parking: Parking | None, *, gone_after: float) -> None:
        self.endpoint = endpoint
        self.answers = answers
        self.parking = parking
        self.waits = Waits(endpoint, reply_timeout, gone_after)
        """The requests in flight, by correlation id."""
        self._prefix = f"{worker_id}.{secrets.token_hex(4)}."  # unique per run, as a client's
        self._numbers = 0
        self._gathered: list[Any] = []

    def __len__(self) -> int:
        """Commands waiting on other workers."""
        return len(self.waits)

    def next_correlation_id(self) -> str:
        self._numbers += 1
        return f"{self._prefix}{self._numbers}"

    def advance(self, task: Task, value: Any, error: BaseException | None) -> None:
        """Resume `task` with `value` (or `error`) until it waits again or ends."""
        while True:
            try:
                if error is None:
                    request = task.coroutine.send(value)
                else:
                    request = task.coroutine.throw(error)
            except StopIteration as done:
                self._ended(task, done.value, None)
                return
            except Exception as e:
                self._ended(task, None, e)
                return
            if type(request) is Gather:
                if not self._gather(task, request):
                    return  # waits for them
                value, error = self._gathered, None
                continue
            correlation_id = self.next_correlation_id()
            holds = self._held_by(task)
            try:
                if holds is not None:
                    # What ran before it is not to come again: acknowledged now, to go in
                    # the transfer's send.
                    self.endpoint.flush_acks()
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
            if holds is not None:
                # Acknowledged only once it completes: were the whole daemon to die first,
                # the broker delivers it again, and the client learns how it ended.
                task.holds = holds
                holds.held += 1
            if self.parking is not None:
                self.parking.park(task, request)
            return

    def _held_by(self, task: Task) -> Incoming | None:
        """The message in hand, if `task` is a transfer about to be sent: it holds the
        message unacknowledged until it completes."""
        incoming = self.answers.incoming
        if incoming is None or task.holds is not None or type(task.job.command) is not Transfer:
            return None
        return incoming

    def _gather(self, task: Task, gather: Gather) -> bool:
        """Send every request of `gather` for `task`; whether all ended at once (then
        their outcomes are `_gathered`)."""
        requests = gather.requests
        outcomes: list[Any] = [None] * len(requests)
        left = [len(requests)]
        parts = [GatherPart(task, outcomes, index, left) for index in range(len(requests))]
        waiting: Request | None = None
        for part, request in zip(parts, requests, strict=True):
            if type(request) is not Request:
                part.done(None, TypeError("a gather holds requests only"))
                continue
            correlation_id = self.next_correlation_id()
            try:
                self.endpoint.send_command(
                    request.worker_id, request.command.name,
                    request.command.encode(None if task.origin is None
                                           else Envelope(origin=task.origin)),
                    correlation_id, confirm=request.confirm)
            except Exception as e:  # unroutable, broker down: that request's outcome
                part.done(None, e)
                continue
            self.waits.add(correlation_id, part, request)
            waiting = waiting or request
        if left[0] == 0:
            self._gathered = outcomes
            return True
        if self.parking is not None and waiting is not None:
            self.parking.park(task, waiting)
        return False

    def _resume(self, task: Task | GatherPart, value: Any,
                error: BaseException | None) -> None:
        if type(task) is GatherPart:
            if task.done(value, error):
                self.advance(task.task, task.outcomes, None)
        else:
            assert type(task) is Task
            self.advance(task, value, error)

    def resume(self, delivery: Delivery) -> None:
        """A reply came: resume whoever waited for it (late and forged ones are dropped)."""
        resumed = self.waits.answered(delivery)
        if resumed is not None:
            self._resume(*resumed)

    def expire(self, now: float) -> None:
        """Fail the waits whose reply is overdue, or whose worker is gone."""
        for task, value, error in self.waits.overdue(now):
            self._resume(task, value, error)

    def fail_all(self, error: TorchRelayError) -> None:
        """Fail every wait (the connection that would carry replies is gone)."""
        for task in self.waits.end_all():
            self._resume(task, None, error)

    def _ended(self, task: Task, value: Any, error: Exception | None) -> None:
        if self.parking is not None:
            self.parking.unpark(task)
        incoming = task.holds
        answers = self.answers
        if incoming is None:
            answers.finish(task.job, value, error)
            return
        # A move's: the message it held back may go now, its batch's answers with this one
        # — gathered only if it is the last of them, and sent at once: an answer gathered
        # here has no journal token, and is never left waiting for a crash to lose.
        task.holds = None
        incoming.held -= 1
        last = not incoming.held and not incoming.left
        outer, answers.incoming = answers.incoming, incoming if last else None
        try:
            answers.finish(task.job, value, error)
        finally:
            answers.incoming = outer
        if last:
            answers.settle(incoming)
