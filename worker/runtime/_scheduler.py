"""Handlers that wait on other workers, run as coroutines without blocking the worker.

A handler that needs another worker returns a coroutine that awaits `Request`s.
The scheduler sends each request, files the coroutine under the request's
correlation id (`_waits.py`) and resumes it with the reply, or with the error
that ended the wait; meanwhile the worker serves others, so chains with cycles
(alice -> bob -> alice) cannot deadlock. When the coroutine returns, its command
is answered. A move's task holds its message's acknowledgement until it ends.
"""

from __future__ import annotations

import secrets
from typing import Any

from torchrelay.broker import Delivery, Endpoint, Envelope, TorchRelayError, Transfer

from ._answers import Answers
from ._parking import Parking
from ._records import Task
from ._waits import Waits

__all__ = ["Scheduler"]


class Scheduler:
    """The coroutines of worker `worker_id` waiting on others, and their requests."""

    def __init__(self, worker_id: str, endpoint: Endpoint, reply_timeout: float,
                 answers: Answers, parking: Parking | None) -> None:
        self.endpoint = endpoint
        self.answers = answers
        self.parking = parking
        self.waits = Waits(endpoint, reply_timeout)
        """The requests in flight, by correlation id."""
        self._prefix = f"{worker_id}.{secrets.token_hex(4)}."  # unique per run, as a client's
        self._numbers = 0

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
            correlation_id = self.next_correlation_id()
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
            incoming = self.answers.incoming
            if incoming is not None and task.holds is None and type(task.job.command) is Transfer:
                # Acknowledged only once it completes: were the whole daemon to die first,
                # the broker delivers it again, and the client learns how it ended.
                task.holds = incoming
                incoming.held += 1
                self.endpoint.flush_acks()  # what ran before it is not to come again
            if self.parking is not None:
                self.parking.park(task, request)
            return

    def resume(self, delivery: Delivery) -> None:
        """A reply came: resume whoever waited for it (late and forged ones are dropped)."""
        resumed = self.waits.answered(delivery)
        if resumed is not None:
            self.advance(*resumed)

    def expire(self, now: float) -> None:
        """Fail the waits whose reply is overdue, or whose worker is gone."""
        for task, value, error in self.waits.overdue(now):
            self.advance(task, value, error)

    def fail_all(self, error: TorchRelayError) -> None:
        """Fail every wait (the connection that would carry replies is gone)."""
        for task in self.waits.end_all():
            self.advance(task, None, error)

    def _ended(self, task: Task, value: Any, error: Exception | None) -> None:
        if self.parking is not None:
            self.parking.unpark(task)
        self.answers.finish(task.job, value, error)
        incoming = task.holds
        if incoming is not None:  # a move's: the message it held back may go now
            task.holds = None
            incoming.held -= 1
            if not incoming.held and not incoming.left:
                self.endpoint.ack(incoming.delivery)
