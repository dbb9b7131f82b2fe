"""Telling a worker that is slow from one that is gone, for whoever waits on it.

A wait on a worker would otherwise last its whole timeout when the daemon behind
the queue has died: the commands sit in the queue, unanswered, until someone
starts it again. Both a client and a worker waiting on another worker look at the
queue instead: a queue nobody has consumed for `gone_after` seconds (by default
`GONE_AFTER_SECONDS`; `tr.connect(gone_after=...)`, a worker's `gone_after`)
belongs to a worker that is gone. The grace covers an executor restarting after a
crash and a daemon reconnecting after a broker restart, which leave the queue
briefly without a consumer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from ._names import worker_queue

if TYPE_CHECKING:  # (a worker's config reads GONE_AFTER_SECONDS: not torch with it)
    from ._transport import Endpoint

__all__ = ["GONE_AFTER_SECONDS", "GONE_CHECK_SECONDS", "GoneWatch", "gone_message"]

GONE_CHECK_SECONDS: Final = 2.0
"""How long a wait goes without any reply before it checks that its workers still run."""
GONE_AFTER_SECONDS: Final = 15.0
"""How long, by default, a worker's queue may go without a daemon before a wait for it
fails. An executor's restart (python, torch, its connection) took over 6 s on a 2-core
AMD machine: the grace must outlast the slowest machine's, not this one's."""


class GoneWatch:
    """Remembers since when each awaited worker's queue has had no consumer; one that
    has had none for `after` seconds is gone."""

    __slots__ = ("_endpoint", "_missing_since", "after")

    def __init__(self, endpoint: Endpoint, after: float) -> None:
        if not after > 0:
            raise ValueError(f"gone_after must be a positive number of seconds, not {after!r}")
        self._endpoint = endpoint
        self.after = after
        self._missing_since: dict[str, float] = {}

    def gone(self, waited_for: Iterable[str], now: float) -> tuple[str, float] | None:
        """A worker among `waited_for` that is gone, with how long its queue has had no
        consumer; None if none is (yet). Asks the broker once per worker; an in-process
        broker's workers run while one waits, so none is ever gone there."""
        if self._endpoint.in_process:
            return None
        waited = set(waited_for)
        for worker_id in set(self._missing_since) - waited:
            del self._missing_since[worker_id]
        for worker_id in waited:
            if self._endpoint.queue_consumers(worker_queue(worker_id)):
                self._missing_since.pop(worker_id, None)
                continue
            since = self._missing_since.setdefault(worker_id, now)
            if now - since >= self.after:
                del self._missing_since[worker_id]
                return worker_id, now - since
        return None


def gone_message(seconds: float) -> str:
    """Why a wait on a gone worker failed (the reason of an `UnknownWorker`)."""
    return (f"no daemon has consumed its queue for {seconds:.0f} s: it is gone, and what "
            "was sent to it waits in its queue unanswered")
