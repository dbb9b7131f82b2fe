"""What a worker says of itself, and who else is still there.

Figures (objects, bytes, commands handled and failed, what waits) go out in
status replies and, every `presence_interval`, in heartbeats on the events
exchange. A status whose asker has nothing waiting or running here is answered
ahead of others' commands (`answer_now`). Leases (`_leases.py`) tell who is gone:
the objects of a participant gone past its lease are reclaimed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import torch

from torchrelay.broker import (
    Delete,
    Delivery,
    Frame,
    Reply,
    Status,
    TorchRelayError,
    is_reply_queue_of,
)

from ._commands.secure import secure_figures
from ._leases import Leases

if TYPE_CHECKING:
    from ._runtime import WorkerRuntime

__all__ = ["Presence"]

log = logging.getLogger("torchrelay.worker")


class Presence:
    """The presence of `worker`: its figures, heartbeats and leases."""

    def __init__(self, worker: WorkerRuntime, interval: float, leases: Leases | None,
                 facts: dict[str, Any]) -> None:
        self.worker = worker
        self.interval = interval
        self.leases = leases
        """Who is still there (None in process: a client there lives as long as we do)."""
        self._facts = facts  # fixed figures its starter adds (pids, restarts)
        self._started = time.time()
        self._next_heartbeat = 0.0
        self._holders: dict[str, dict[str, int]] = {}  # as the last status walked them

    def tick(self, now: float) -> None:
        """Reclaim what participants gone past their lease held; say this worker is here."""
        if self.leases is not None and self.leases.due(now):
            self._reclaim(now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.interval
            self.announce("heartbeat")

    def announce(self, what: str) -> None:
        """Say on the events exchange that this worker `what` ("started", "heartbeat",
        "stopped"), with its figures: presence for whoever listens."""
        figures = self.figures()  # (not per holder: that walks every object)
        figures.update(event=what, presence_interval=self.interval, time=time.time())
        worker = self.worker
        try:
            worker.endpoint.publish_event(f"worker.{worker.id}.{what}",
                                          json.dumps(figures, default=str).encode())
        except TorchRelayError as e:  # presence is best effort: the work goes on
            log.debug("could not announce %s: %s", what, e)

    def _reclaim(self, now: float) -> None:
        """Delete the objects of participants whose lease ran out."""
        assert self.leases is not None
        worker = self.worker
        held: dict[str, list[int]] = {}
        for object_id, entry in worker.store.entries():
            for identity in entry.holders:
                held.setdefault(identity, []).append(object_id)
        try:
            expired = self.leases.expired(set(held), now)
        except TorchRelayError as e:  # the broker is away: look again next time
            log.warning("could not check leases: %s", e)
            return
        for identity in expired:
            ids = held[identity]
            targets = worker.store.delete_for(identity, ids)
            for location, target_ids in targets.items():
                worker.tell(location, Delete(target_ids))
            log.info("reclaimed %d objects of %r: gone for longer than its lease (%g s)",
                     len(ids), identity, self.leases.lease)
        if expired and worker.containment is not None:
            worker.containment.commit()  # the deletions outlive a crash, as a command's do

    def answer_now(self, delivery: Delivery) -> tuple[str, Frame] | None:
        """A status request answered as it arrives, before the commands of others that
        wait or run: `torchrelay status` and presence answer whatever runs. Only when its
        asker has nothing waiting or running here (it sees the effects of what it sent
        before). Called from the thread that pumps the connection, maybe while the
        worker runs a command — it only reads, and what it cannot read consistently (who
        holds what) is as the last full status found it — and by the worker's `accept`,
        so a status that came right behind another's command does not wait for it."""
        if delivery.type != Status.name:
            return None
        worker = self.worker
        reply_to = delivery.reply_to
        sender = delivery.sender
        in_hand = worker.in_hand
        queue = worker.queue
        if in_hand is None and not queue:
            return None  # nothing runs or waits: the usual way is as quick, and exact
        if reply_to is None or not is_reply_queue_of(reply_to, sender) or (
                in_hand is not None and in_hand[0] == sender) or queue.has(sender):
            return None
        try:
            figures = self.figures()
            # Who holds what as the last full status found it: walking the store here
            # would cost the others' waiting commands that much per status asked for
            # (and from the keeper thread, the store is in use).
            figures.update(holders=dict(self._holders), queued=queue.waiting())
        except RuntimeError:  # changed under us after all: the usual way then
            return None
        if in_hand is not None:
            figures["busy"] = {"command": in_hand[1], "sender": in_hand[0],
                               "seconds": round(time.monotonic() - in_hand[2], 3)}
        return f"{Status.name}.reply", Reply(figures).encode()

    def figures(self) -> dict[str, Any]:
        """What the worker says of itself, in a status reply and in its heartbeats."""
        worker = self.worker
        status: dict[str, Any] = {
            "id": worker.id,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self._started, 3),
            "objects": len(worker.store),
            "tensor_bytes": worker.store.bytes,
            "max_bytes": worker.limits.max_bytes,
            "commands_handled": worker.handled,
            "commands_failed": worker.answers.failed,
            "requests_waiting": len(worker.scheduler),
        }
        status.update(worker.endpoint.stats())
        # Forged messages: dropped by the transport, or replies not from the worker asked.
        status["forged"] = (int(status.get("forged", 0))
                            + worker.scheduler.waits.forged_replies
                            + worker.admission.misdirected)
        status.update(self._facts)
        status.update(secure_figures(worker))
        if worker.admission.poisoned:
            status["commands_poisoned"] = len(worker.admission.poisoned)
        pacer = worker.private_execution.pacer
        if pacer is not None:
            status["timing_epochs"] = pacer.epochs
        return status

    def by_holder(self) -> dict[str, dict[str, int]]:
        """Objects and tensor bytes by who holds them (a storage viewed by several objects
        counts for each); kept for the status answered from another thread
        (`answer_now`), which cannot walk the store."""
        held: dict[str, dict[str, int]] = {}
        for _, entry in self.worker.store.entries():
            value = entry.value
            size = value.untyped_storage().nbytes() if isinstance(value, torch.Tensor) else 0
            for identity in entry.holders or ("everyone",):
                figures = held.setdefault(identity, {"objects": 0, "bytes": 0})
                figures["objects"] += 1
                figures["bytes"] += size
        self._holders = held
        return held
