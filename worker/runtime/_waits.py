"""Commands waiting on other workers: the requests they sent, by correlation id.

A handler that needs another worker (a call forwarded down a chain, a move
waiting for its destination) awaits a request; the runtime sends it and files
it here until one of three things ends the wait: its reply (only from the
worker asked: anyone may write to a reply queue), its deadline (`reply_timeout`),
or the worker asked being gone (no daemon consumes its queue: failed at once
rather than after the whole timeout). `Waits` only keeps the books; the runtime
resumes the waiting coroutine with what it returns.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from torchrelay.broker import (
    GONE_CHECK_SECONDS,
    Delivery,
    Endpoint,
    GoneWatch,
    ProtocolError,
    ReplyTimeout,
    TorchRelayError,
    UnknownWorker,
    decode_reply,
    gone_message,
)

from ._records import GatherPart, Request, Task, Waiting

__all__ = ["Waits"]

log = logging.getLogger("torchrelay.worker")

Resumed = tuple[Task | GatherPart, Any, BaseException | None]
"""A waiting task, and the value or the error to resume it with."""


class Waits:
    """The requests in flight, and how each wait ends (see the module docstring)."""

    __slots__ = ("_gone", "_next_gone_check", "_waiting", "forged_replies", "reply_timeout")

    def __init__(self, endpoint: Endpoint, reply_timeout: float, gone_after: float) -> None:
        self.reply_timeout = reply_timeout
        self.forged_replies = 0
        """Replies dropped because they did not come from the worker asked."""
        self._waiting: dict[str, Waiting] = {}
        self._gone = GoneWatch(endpoint, gone_after)
        self._next_gone_check = 0.0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, correlation_id: str, task: Task | GatherPart, request: Request) -> None:
        """`task` sent `request` under `correlation_id` and waits for its reply."""
        self._waiting[correlation_id] = Waiting(task, request,
                                                time.monotonic() + self.reply_timeout)

    def answered(self, delivery: Delivery) -> Resumed | None:
        """The wait a reply ends, and with what (None: a late reply, or a forged one)."""
        waiting = self._waiting.get(delivery.correlation_id)
        if waiting is None:
            log.debug("dropped a late reply %s", delivery.correlation_id)
            return None
        worker_id = waiting.request.worker_id
        if delivery.sender != worker_id:  # anyone may write to our reply queue
            self.forged_replies += 1
            if self.forged_replies == 1:
                log.warning("dropped a reply for %r that came from %r (further ones are only "
                            "counted)", worker_id, delivery.sender[:100])
            return None
        del self._waiting[delivery.correlation_id]
        task = waiting.task
        if delivery.returned:
            return task, None, UnknownWorker(worker_id, "no worker consumes it")
        if delivery.refused is not None:
            return task, None, ProtocolError(delivery.refused)
        try:
            reply = decode_reply(delivery.body)
        except ProtocolError as e:
            return task, None, e
        if reply.error is not None:
            return task, None, reply.error.to_exception(worker_id,
                                                        waiting.request.command.describe())
        return task, reply.value, None

    def overdue(self, now: float) -> list[Resumed]:
        """The waits that end now: past their deadline, or on a worker that is gone."""
        ended: list[Resumed] = []
        for cid in [cid for cid, w in self._waiting.items() if w.deadline <= now]:
            waiting = self._waiting.pop(cid)
            ended.append((waiting.task, None, ReplyTimeout(
                waiting.request.worker_id, waiting.request.command.describe(),
                self.reply_timeout)))
        if self._waiting and now >= self._next_gone_check:
            self._next_gone_check = now + GONE_CHECK_SECONDS
            ended += self._on_gone_workers(now)
        return ended

    def _on_gone_workers(self, now: float) -> list[Resumed]:
        """The waits on a worker whose daemon is gone (a move's source then settles it:
        see `_commands/transfers.py`)."""
        silent_since = now - GONE_CHECK_SECONDS
        try:
            gone = self._gone.gone({w.request.worker_id for w in self._waiting.values()
                                    if w.deadline - self.reply_timeout <= silent_since}, now)
        except TorchRelayError as e:  # the broker is away: receiving says so; look again later
            log.debug("could not look for gone workers: %s", e)
            return []
        if gone is None:
            return []
        worker_id, seconds = gone
        error = UnknownWorker(worker_id, gone_message(seconds))
        return [(self._waiting.pop(cid).task, None, error)
                for cid in [cid for cid, w in self._waiting.items()
                            if w.request.worker_id == worker_id]]

    def end_all(self) -> list[Task | GatherPart]:
        """Every waiting task, no longer waiting (the connection replies would take is
        gone)."""
        waiting, self._waiting = self._waiting, {}
        return [w.task for w in waiting.values()]
