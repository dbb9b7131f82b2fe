"""How a worker answers: each command's reply, a batch's replies together, a log line
per failure, and the memory of failures that guarded commands check.

A command's answer is its value or its error, encoded as a `Reply`. The answers
to the commands of one batch go back in one message (those over
`_BATCHED_REPLY_BYTES` alone, in order). Before a reply leaves, what the command
changed is committed to the containment's mirror: what a reply reports outlives a
crash of the executor right after it.
"""

from __future__ import annotations

import logging
from typing import Any

from torchrelay.broker import (
    BATCH,
    EarlierFailure,
    EncodeError,
    Endpoint,
    ErrorInfo,
    Frame,
    Reply,
    TorchRelayError,
    encode_reply_batch,
    session_and_number,
    stamp,
)

from ._commands import Encoded
from ._records import Containment, Incoming, Job, log_fields

__all__ = ["Answers"]

log = logging.getLogger("torchrelay.worker")

_BATCHED_REPLY_BYTES = 64 << 10
"""Replies to a batch's commands up to this size go back together; larger ones alone."""

_REMEMBERED_SESSIONS = 4096
"""Sessions whose last failure is remembered, for guarded commands (`Envelope.guard`)."""


class Answers:
    """The answers of worker `worker_id`, through `endpoint`."""

    def __init__(self, worker_id: str, endpoint: Endpoint,
                 containment: Containment | None) -> None:
        self.worker_id = worker_id
        self.endpoint = endpoint
        self.containment = containment
        self.incoming: Incoming | None = None
        """The message whose commands run now: a batch's replies gather in it."""
        self.failed = 0
        # (sender, session) -> number and description of its last failed command.
        self._failures: dict[tuple[str, str], tuple[int, str]] = {}
        # A daemon's operator reads its log; in-process, the caller gets the exception.
        self._failure_level = logging.DEBUG if endpoint.in_process else logging.WARNING

    def finish(self, job: Job, value: Any, error: Exception | None) -> None:
        """`job` ended with `value` or `error`: log it, and answer it if it asked."""
        if error is not None:
            self.failed += 1
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
        stamp("worker.encoded")
        self._send(job.reply_to, job.name, job.correlation_id, frame)

    def _send(self, reply_to: str, name: str, correlation_id: str, frame: Frame) -> None:
        incoming = self.incoming
        replies = incoming.replies if incoming is not None else None
        if replies is not None:  # answering a batch: the replies go back together
            assert incoming is not None
            if frame.nbytes <= _BATCHED_REPLY_BYTES:
                replies.append((correlation_id, name, frame))
                return
            if replies:  # a large one goes alone, after those before it
                self.send_together(reply_to, "", replies, incoming.owed)
                replies.clear()
        if self.containment is not None:
            self.containment.commit()  # what a reply reports outlives a crash after it
        self.endpoint.send_reply(reply_to, f"{name}.reply", frame, correlation_id)

    def settle(self, incoming: Incoming) -> None:
        """`incoming` is done with: send the answers gathered for it (a batch's), if its
        sender asked, and acknowledge it."""
        delivery = incoming.delivery
        if incoming.replies and delivery.reply_to:
            self.send_together(delivery.reply_to, delivery.correlation_id, incoming.replies,
                               incoming.owed)
        self.endpoint.ack(delivery)

    def send_together(self, reply_to: str, batch_id: str,
                      replies: list[tuple[str, str, Frame]], owed: list[Any]) -> None:
        """Send a batch's gathered `replies` (one alone as itself); the journal tokens
        in `owed` are answered with them."""
        if self.containment is not None:
            self.containment.commit()
        if len(replies) == 1:
            correlation_id, name, frame = replies[0]
            self.endpoint.send_reply(reply_to, f"{name}.reply", frame, correlation_id)
        else:
            self.endpoint.send_reply(reply_to, f"{BATCH}.reply", encode_reply_batch(replies),
                                     batch_id or replies[0][0])
        if self.containment is not None and owed:
            # Sent, not written behind: a journaled worker has its connection to itself
            # (`SharedConnection` writes behind only for several), so a crash in its next
            # command cannot take these answers along with the process's buffer.
            self.containment.answered(owed)
            owed.clear()

    def check_guard(self, job: Job, guard: int) -> None:
        """Refuse to run a command behind a failure its sender has not heard of yet."""
        numbered = session_and_number(job.correlation_id)
        if numbered is None:
            return
        failure = self._failures.get((job.sender, numbered[0]))
        if failure is not None and failure[0] >= guard:
            raise EarlierFailure(
                f"not run: an earlier command of this session ({failure[1]}, number "
                f"{failure[0]}) failed on worker {self.worker_id!r}"
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
