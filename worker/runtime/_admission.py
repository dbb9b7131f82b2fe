"""What a worker lets in, before anything runs.

Dropped: a message whose answer would go to a reply queue not its sender's (its
asker would take the answer for its own). Refused whole, each command answered
so: a sender's messages while it is struck out, or past `sender_max_queued`
(`_fairness.py`). Not run again: a command that ran already (redelivered after a
lost acknowledgement: an in-place operation must not apply twice), or that
crashed or overran an executor before (poisoned).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from torchrelay.broker import (
    BATCH,
    COMMANDS,
    Batched,
    Delete,
    Delivery,
    Envelope,
    OperationRefused,
    ProtocolError,
    TorchRelayError,
    decode_command,
    is_reply_queue_of,
)

from ._fairness import Strikes

__all__ = ["Admission", "read_command", "unreadable"]

log = logging.getLogger("torchrelay.worker")

_REMEMBERED_COMMANDS = 4096
"""Commands remembered by (sender, correlation id), so one redelivered after a
reconnect is not run twice; more than the prefetch window can hold unacknowledged."""

CommandKey = tuple[str, str]
"""A command as a worker remembers it: (sender, correlation id)."""


class Admission:
    """The doors of worker `worker_id` (see the module docstring)."""

    def __init__(self, worker_id: str, strikes: Strikes, sender_max_queued: int | None,
                 command_timeout: float) -> None:
        self.worker_id = worker_id
        self.strikes = strikes
        self.sender_max_queued = sender_max_queued
        self.command_timeout = command_timeout
        self.misdirected = 0
        """Messages dropped for naming another's reply queue."""
        self._misdirected_from: set[str] = set()
        self.poisoned: dict[CommandKey, str] = {}
        """Commands that crashed or overran an executor before, and how: refused and
        dead-lettered if they come again."""
        # Oldest first. Not a dict: taking a dict's first key steps over every key deleted
        # before it until the dict is next resized (4 us a command at 4,096 remembered).
        self._recent: OrderedDict[CommandKey, None] = OrderedDict()
        self._owed: dict[CommandKey, bool] = {}  # ran, never answered (`remember_finished`)

    def misdirects(self, delivery: Delivery) -> bool:
        """Whether `delivery`'s answer would land in another's reply queue (counted,
        and logged once per sender): it is dropped unanswered."""
        reply_to = delivery.reply_to
        if reply_to is None or is_reply_queue_of(reply_to, delivery.sender):
            return False
        self.misdirected += 1
        if delivery.sender not in self._misdirected_from and len(
                self._misdirected_from) < 1000:
            self._misdirected_from.add(delivery.sender)
            log.warning("dropped a %s from %r whose answer was to go to %r, not one of its "
                        "own reply queues (further ones from it are only counted)",
                        delivery.type[:64], delivery.sender[:100], reply_to[:200])
        return True

    def refusal(self, delivery: Delivery, held: int) -> TorchRelayError | None:
        """Why a message's commands are refused before any runs, its sender holding
        `held` messages here already; None: they are not."""
        sender = delivery.sender
        # (A command that struck comes again once: the poisoned commands' refusal says why.)
        until = None if delivery.redelivered else self.strikes.refused_until(sender)
        if until is not None:
            return OperationRefused(
                f"worker {self.worker_id!r} refuses commands from {sender!r} for "
                f"{until - time.time():.0f} s more: {self.strikes.limit} of its commands ran "
                f"past its command_timeout ({self.command_timeout:g} s) or crashed its "
                f"executor within {self.strikes.penalty:g} s (sender_strikes, sender_penalty)")
        limit = self.sender_max_queued
        if limit is not None and held >= limit and (
                delivery.type != Delete.name):  # (garbage is never refused: it would stay)
            return OperationRefused(
                f"worker {self.worker_id!r} already holds {limit} messages of "
                f"{sender!r} waiting to run (sender_max_queued): wait for their answers "
                "before sending more")
        return None

    def ran(self, key: CommandKey) -> bool:
        """Whether the command ran here already (among the last ones)."""
        return key in self._recent

    def owed(self, key: CommandKey) -> bool | None:
        """Whether a command that ran is owed its answer (lost with an executor): True
        if it was a plain "done", False if not, None if it was answered."""
        return self._owed.pop(key, None)

    def running(self, key: CommandKey) -> None:
        """The command runs now: a redelivered copy is not to run again."""
        self.remember_finished([key])

    def remember_finished(self, keys: list[CommandKey],
                          owed: dict[CommandKey, bool] | None = None) -> None:
        """Commands that ran: a redelivered copy is skipped. Those in `owed` were never
        answered: a redelivered copy is, with the plain "done" (true) or an error saying
        its answer was lost (false)."""
        recent = self._recent
        self._owed.update(owed or {})
        for key in keys:
            recent[key] = None
        while len(recent) > _REMEMBERED_COMMANDS:
            recent.popitem(last=False)


def read_command(delivery: Delivery) -> Batched:
    """A message holding one command, read (or to be answered with why it cannot be)."""
    try:
        command, envelope = decode_command(delivery.type, delivery.body)
    except ProtocolError as e:
        return unreadable(delivery, e)
    return Batched(delivery.type, delivery.correlation_id, command, envelope)


def unreadable(delivery: Delivery, error: ProtocolError) -> Batched:
    """A message that cannot be read, as a command that is answered `error` (in its
    turn among its sender's)."""
    # Never echo an unknown type: it is the sender's text, of any length.
    name = delivery.type if delivery.type in COMMANDS or delivery.type == BATCH else (
        "invalid")
    return Batched(name, delivery.correlation_id, None, _PLAIN, error)


_PLAIN = Envelope()
