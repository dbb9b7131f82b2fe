"""An in-process broker: the zero-setup default, like PySyft's VirtualWorker.

Everything runs in the caller's thread, one delivery at a time. Workers attach a
handler; their deliveries wait in a run queue and are handled whenever a client
waits for something (`receive`). Handlers never block and never re-enter the
loop, so pointer chains of any shape, cycles included, cannot deadlock, and when
the run queue is empty nothing more can happen: a client still waiting then is
told at once instead of after a timeout.

Messages are encoded to bytes exactly as for RabbitMQ, so the codec is exercised
on every path.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable

from ._codec import Frame
from ._errors import UnknownWorker
from ._names import RETURNED, worker_queue
from ._names import reply_queue as reply_queue_of
from ._transport import Broker, Delivery, Endpoint

__all__ = ["EmbeddedBroker", "EmbeddedEndpoint"]

DeliveryHandler = Callable[[Delivery], None]
WorkerStarter = Callable[["EmbeddedBroker", str], object]


class EmbeddedEndpoint(Endpoint):
    """An endpoint on the embedded broker: pulls with `receive`, or pushes to a handler."""

    in_process = True

    def __init__(self, broker: EmbeddedBroker, identity: str, reply_queue: str) -> None:
        self.identity = identity
        self.reply_queue = reply_queue
        self._broker = broker
        self._inbox: deque[Delivery] = deque()
        self.handler: DeliveryHandler | None = None
        self.closed = False

    def set_handler(self, handler: DeliveryHandler) -> None:
        """Have the broker call `handler` for every delivery, instead of `receive`."""
        self.handler = handler

    def send_command(
        self,
        worker_id: str,
        type: str,
        frame: Frame,
        correlation_id: str,
        *,
        confirm: bool = False,
    ) -> None:
        delivery = Delivery(
            False, type, correlation_id, self.identity, frame.tobytes(), self.reply_queue
        )
        if not self._broker.route(worker_queue(worker_id), delivery):
            if confirm:
                raise UnknownWorker(worker_id, "no worker consumes its queue")
            returned = Delivery(True, RETURNED, correlation_id, worker_id, b"", returned=True)
            self._broker.route(self.reply_queue, returned)

    def send_reply(self, reply_to: str, type: str, frame: Frame, correlation_id: str) -> None:
        # A reply to a requester that has gone away is dropped, as on RabbitMQ.
        self._broker.route(reply_to, Delivery(True, type, correlation_id, self.identity,
                                              frame.tobytes()))

    def receive(self, timeout: float) -> Delivery | None:
        if not self._inbox:
            self._broker.run_until(self._inbox.__len__)
        return self._inbox.popleft() if self._inbox else None

    def ack(self, delivery: Delivery) -> None:
        """Nothing to do: an in-process delivery cannot be lost."""

    def broadcast_command(self, type: str, frame: Frame, correlation_id: str) -> None:
        for worker_id in self._broker.worker_ids():
            self.send_command(worker_id, type, frame, correlation_id)

    def ensure_worker(self, worker_id: str) -> None:
        self._broker.ensure_worker(worker_id)

    def dead_letter(
        self, type: str, frame: Frame, correlation_id: str, sender: str, reason: str
    ) -> None:
        self._broker.dead_letters.append((type, frame.tobytes(), correlation_id, sender, reason))

    @property
    def quiescent(self) -> bool:
        return not self._inbox and self._broker.idle

    def close(self) -> None:
        self.closed = True
        self._broker.detach(self)

    def accept(self, delivery: Delivery) -> bool:
        """Called by the broker; False once closed."""
        if self.closed:
            return False
        if self.handler is None:
            self._inbox.append(delivery)
        else:
            self._broker.schedule(self.handler, delivery)
        return True


class EmbeddedBroker(Broker):
    """All queues in one process. `start_worker` is called to start a worker on first use."""

    def __init__(self, start_worker: WorkerStarter | None = None, name: str = "") -> None:
        self.url = f"memory://{name}"
        self._start_worker = start_worker
        self._queues: dict[str, EmbeddedEndpoint] = {}
        self._runnable: deque[tuple[DeliveryHandler, Delivery]] = deque()
        self._running = False
        self._reply_numbers = itertools.count(1)
        self.dead_letters: list[tuple[str, bytes, str, str, str]] = []
        """Commands refused for good: (type, body, correlation id, sender, why)."""
        # One thread at a time drives the loop; a second client thread waits its turn.
        self._lock = threading.RLock()

    def connect(self, identity: str, *, serve_worker: str | None = None) -> EmbeddedEndpoint:
        with self._lock:
            reply_queue = reply_queue_of(identity, str(next(self._reply_numbers)))
            endpoint = EmbeddedEndpoint(self, identity, reply_queue)
            self._queues[reply_queue] = endpoint
            if serve_worker is not None:
                queue = worker_queue(serve_worker)
                if queue in self._queues:
                    raise ValueError(f"worker {serve_worker!r} is already running on {self.url}")
                self._queues[queue] = endpoint
            return endpoint

    def detach(self, endpoint: EmbeddedEndpoint) -> None:
        with self._lock:
            for queue in [q for q, e in self._queues.items() if e is endpoint]:
                del self._queues[queue]

    def ensure_worker(self, worker_id: str) -> None:
        with self._lock:
            if worker_queue(worker_id) in self._queues:
                return
            if self._start_worker is None:
                raise UnknownWorker(worker_id, f"nothing serves it on {self.url}")
            self._start_worker(self, worker_id)

    def worker_ids(self) -> list[str]:
        """The workers running here."""
        with self._lock:
            prefix = worker_queue("")
            return [q[len(prefix):] for q in self._queues if q.startswith(prefix)]

    def route(self, queue: str, delivery: Delivery) -> bool:
        endpoint = self._queues.get(queue)
        return endpoint is not None and endpoint.accept(delivery)

    def schedule(self, handler: DeliveryHandler, delivery: Delivery) -> None:
        self._runnable.append((handler, delivery))

    @property
    def idle(self) -> bool:
        return not self._runnable

    def run_until(self, done: Callable[[], object]) -> None:
        """Handle queued deliveries until `done()` is true or nothing is left to run."""
        with self._lock:
            if self._running:
                raise RuntimeError("a worker handler must not wait on the embedded broker")
            self._running = True
            try:
                runnable = self._runnable
                while runnable and not done():
                    handler, delivery = runnable.popleft()
                    handler(delivery)
            finally:
                self._running = False

    def close(self) -> None:
        with self._lock:
            for endpoint in set(self._queues.values()):
                endpoint.closed = True
            self._queues.clear()
            self._runnable.clear()
