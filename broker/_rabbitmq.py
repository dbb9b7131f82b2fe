"""RabbitMQ through pika.

Topology (what the management console shows):

- exchange `torchrelay.commands` (direct, durable): routing key = worker id;
- queue `torchrelay.worker.<id>` (durable), bound with the worker's id and
  consumed exclusively by its one daemon, with manual acks and a prefetch limit;
- queue `torchrelay.reply.<identity>.<token>`, one per endpoint, consumed
  exclusively; it outlives a dropped connection by a minute, so a reconnect
  loses no reply.

Every message carries `type` (the command, or `<command>.reply`), `app_id`,
`correlation_id`, `reply_to` on commands, and a `sender` header; every
connection is named `torchrelay <role> <identity>`.

Threading: a pika connection must not be used by two threads at once. The
owner thread does all the work; a keeper thread pumps the connection (which
sends heartbeats and queues incoming deliveries, nothing more) whenever the
owner is busy elsewhere — computing a long command, or a client script doing
local work — so the broker never takes a busy participant for a dead one. A
lock makes the two take turns; on the hot path it is uncontended.

Cost per message is pika's, and kept there: acknowledgements of executed
commands and of replies go out in batches (a command redelivered after a lost
acknowledgement is recognised and skipped by the worker), one properties object
is refilled for every publish, and one standing timer bounds every wait.
Messages over the chunk size travel in chunks (`_chunks.py`).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import pika
import pika.exceptions as pe
import tenacity
import torch

from ._chunks import DEFAULT_CHUNK_SIZE, Reassembler, split_frame
from ._codec import Frame
from ._errors import BrokerError, BrokerUnavailable, ConnectionLost, UnknownWorker
from ._transport import (
    APP_ID,
    COMMAND_EXCHANGE,
    RETURNED,
    Broker,
    Delivery,
    Endpoint,
    worker_queue,
)

__all__ = ["RabbitMQBroker", "RabbitMQEndpoint", "redact_url"]

log = logging.getLogger("torchrelay.broker")

_T = TypeVar("_T")

# Errors after which the connection is unusable and must be reopened.
_CONNECTION_ERRORS = (pe.AMQPConnectionError, pe.ChannelClosed, pe.ChannelWrongStateError)
# Transient even for transfers between workers: their safety comes from the
# destination's confirmation (the source keeps its copy until then), and a
# persistent 1 GiB message would be written to the broker's disk for nothing.
_TRANSIENT = 1
REPLY_QUEUE_EXPIRES_MS = 60_000
REPLY_PREFETCH = 1024
REPLY_ACK_BATCH = 128
ACK_BATCH = 16
ACK_DELAY = 0.05
_TICK_SECONDS = 0.1


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class RabbitMQBroker(Broker):
    """A RabbitMQ server at `url` (`amqp://` or `amqps://`)."""

    def __init__(
        self,
        url: str,
        *,
        heartbeat: int | None = None,
        prefetch: int = 64,
        connect_timeout: float = 15.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_message_bytes: int = 16 << 30,
    ) -> None:
        if chunk_size < 4096:
            raise ValueError(f"chunk_size must be at least 4096 bytes, not {chunk_size}")
        self._url = url
        self.url = redact_url(url)
        self.heartbeat = heartbeat
        self.prefetch = prefetch
        self.connect_timeout = connect_timeout
        self.chunk_size = chunk_size
        self.max_message_bytes = max_message_bytes

    def connect(self, identity: str, *, serve_worker: str | None = None) -> RabbitMQEndpoint:
        return RabbitMQEndpoint(self, identity, serve_worker)

    def parameters(self, connection_name: str) -> pika.URLParameters:
        params = pika.URLParameters(self._url)
        params.client_properties = {"connection_name": connection_name, "product": APP_ID}
        if self.heartbeat is not None:
            params.heartbeat = self.heartbeat
        # Without this a publish blocks forever while the broker is out of memory.
        params.blocked_connection_timeout = 60
        return params

    def open_connection(self, connection_name: str) -> pika.BlockingConnection:
        """Connect, retrying with backoff while the broker is unreachable."""
        params = self.parameters(connection_name)
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_delay(self.connect_timeout),
            wait=tenacity.wait_exponential(multiplier=0.1, max=2.0),
            retry=tenacity.retry_if_exception(_is_retryable),
            reraise=True,
        )
        try:
            return retrying(pika.BlockingConnection, params)
        except (pe.ProbableAuthenticationError, pe.AuthenticationError) as e:
            raise BrokerUnavailable(
                f"RabbitMQ at {self.url} refused the credentials: {e}"
            ) from None
        except pe.ProbableAccessDeniedError as e:
            raise BrokerUnavailable(f"RabbitMQ at {self.url} denied access: {e}") from None
        except pe.AMQPConnectionError as e:
            raise BrokerUnavailable(
                f"cannot reach RabbitMQ at {self.url} after {self.connect_timeout:g} s: "
                f"{type(e).__name__} {e}"
            ) from None


def _is_retryable(error: BaseException) -> bool:
    refused = (
        pe.ProbableAuthenticationError, pe.AuthenticationError, pe.ProbableAccessDeniedError
    )
    return isinstance(error, pe.AMQPConnectionError) and not isinstance(error, refused)


class RabbitMQEndpoint(Endpoint):
    """One participant's connection to RabbitMQ (see the module docstring)."""

    def __init__(self, broker: RabbitMQBroker, identity: str, serve_worker: str | None) -> None:
        self.identity = identity
        self._broker = broker
        self._serve_worker = serve_worker
        role = "worker" if serve_worker is not None else "client"
        self.connection_name = f"torchrelay {role} {identity}"
        self._lock = threading.Lock()
        self._inbox: deque[Delivery] = deque()
        self._headers: dict[str, Any] = {"sender": identity}
        self._properties = pika.BasicProperties(
            app_id=APP_ID, headers=self._headers, delivery_mode=_TRANSIENT
        )
        self._epoch = 0
        self._closed = False
        self.reconnects = 0
        # Named once: the queue outlives a dropped connection (it expires only after
        # REPLY_QUEUE_EXPIRES_MS unused), so replies in flight survive a reconnect.
        self.reply_queue = f"torchrelay.reply.{identity}.{secrets.token_hex(4)}"
        self._connection: Any = None
        self._channel: Any = None
        self._confirm_channel: Any = None
        self._reply_channel: Any = None
        self._unacked_reply = 0
        self._bytes_before = (0, 0)
        self._reassembler = Reassembler(broker.max_message_bytes)
        # Never hold back more of the prefetch window than a quarter.
        self._ack_batch = max(1, min(ACK_BATCH, broker.prefetch // 4))
        self._open()
        self._stop = threading.Event()
        self._keeper = threading.Thread(
            target=self._keep_alive, name=f"torchrelay-keepalive-{identity}", daemon=True
        )
        self._keeper.start()

    # -- connection ------------------------------------------------------------

    def _open(self, *, reconnecting: bool = False) -> bool:
        """Connect and declare; whether the reply queue survived from a previous connection."""
        connection = self._broker.open_connection(self.connection_name)
        try:
            survived = reconnecting and _queue_exists(connection, self.reply_queue)
            channel = connection.channel()
            channel.exchange_declare(COMMAND_EXCHANGE, "direct", durable=True)
            channel.add_on_return_callback(self._on_return)
            # Replies on a channel of their own, acknowledged in batches once queued
            # locally: one lost with a dropped connection is delivered again.
            replies = connection.channel()
            replies.basic_qos(prefetch_count=REPLY_PREFETCH)
            replies.queue_declare(self.reply_queue, arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS})
            replies.basic_consume(self.reply_queue, self._on_reply, exclusive=True)
            if self._serve_worker is not None:
                channel.basic_qos(prefetch_count=self._broker.prefetch)
                queue = worker_queue(self._serve_worker)
                channel.queue_declare(queue, durable=True)
                channel.queue_bind(queue, COMMAND_EXCHANGE, routing_key=self._serve_worker)
                try:
                    channel.basic_consume(queue, self._on_command, exclusive=True)
                except pe.ChannelClosedByBroker as e:
                    raise BrokerError(
                        f"worker {self._serve_worker!r} is already served by another daemon "
                        f"on {self._broker.url} ({e.reply_text})"
                    ) from None
        except pe.ChannelClosedByBroker as e:
            _close_quietly(connection)
            raise BrokerError(f"RabbitMQ at {self._broker.url} refused: {e.reply_text}") from None
        except BaseException:
            _close_quietly(connection)
            raise
        self._connection = connection
        self._channel = channel
        self._reply_channel = replies
        self._unacked_reply = 0
        self._replies_since_ack = 0
        self._unacked_command = 0
        self._commands_since_ack = 0
        self._oldest_unacked = 0.0
        self._confirm_channel = None
        self._epoch += 1
        self._tick()
        return survived

    def _tick(self) -> None:
        # A standing timer wakes `receive` to check its deadline, so waiting does not
        # create and cancel a timer for every message (pika's time_limit would).
        self._connection.call_later(_TICK_SECONDS, self._tick)

    @property
    def bytes_sent(self) -> int:
        """Bytes written to the broker by this endpoint, over all its connections."""
        return self._bytes_before[0] + getattr(self._connection_impl(), "bytes_sent", 0)

    @property
    def bytes_received(self) -> int:
        """Bytes read from the broker by this endpoint, over all its connections."""
        return self._bytes_before[1] + getattr(self._connection_impl(), "bytes_received", 0)

    def _connection_impl(self) -> Any:
        return getattr(self._connection, "_impl", None)

    def _reconnect(self) -> None:
        self._bytes_before = (self.bytes_sent, self.bytes_received)
        log.warning("%s lost its connection to %s; reconnecting", self.connection_name,
                    self._broker.url)
        _close_quietly(self._connection)
        # Commands not yet handled come again from the broker, except a chunked one
        # already whole here: only its last chunk would come again. Replies stay.
        kept = [d for d in self._inbox if d.is_reply or isinstance(d.body, torch.Tensor)]
        self._inbox.clear()
        self._inbox.extend(kept)
        # Until the broker notices our old connection is dead, it still holds our
        # exclusive consumers: retry for a few heartbeats.
        patience = max(30.0, 3.0 * (self._broker.heartbeat or 60))
        deadline = time.monotonic() + patience
        while True:
            try:
                survived = self._open(reconnecting=True)
                break
            except BrokerUnavailable:
                raise
            except BrokerError as e:
                if time.monotonic() > deadline:
                    raise BrokerError(f"{self.connection_name} cannot reconnect: {e}") from None
                log.info("reconnect refused (%s); retrying", e)
                time.sleep(1.0)
        self.reconnects += 1
        log.warning("%s reconnected to %s", self.connection_name, self._broker.url)
        if not survived:
            raise ConnectionLost(
                f"{self.connection_name} reconnected to {self._broker.url}, but its reply queue "
                "was gone: replies to commands sent before are lost"
            )

    def _guarded(self, action: Callable[[], _T]) -> _T:
        """Run `action` under the lock; on a dead connection reopen it and retry once.

        pika's errors do not leave this method: they become `BrokerError`s.
        """
        with self._lock:
            if self._closed:
                raise ConnectionLost(f"{self.connection_name} is closed")
            try:
                if self._connection.is_open:
                    try:
                        return action()
                    except _CONNECTION_ERRORS:
                        if self._closed:
                            raise ConnectionLost(f"{self.connection_name} is closed") from None
                # Dead: closed by the broker while we were away, or just now.
                self._reconnect()
                return action()
            except (pe.UnroutableError, pe.NackError):
                raise  # the caller names the worker
            except pe.AMQPError as e:
                raise BrokerError(f"{self.connection_name}: {type(e).__name__}: {e}") from None

    def _keep_alive(self) -> None:
        while not self._stop.wait(self._keepalive_interval()):
            if not self._lock.acquire(blocking=False):
                continue  # the owner is pumping the connection itself
            try:
                if not self._closed:
                    self._pump(blocking=False, ack_all=True)
            except Exception:
                log.debug("keepalive found the connection broken", exc_info=True)
            finally:
                self._lock.release()

    def _keepalive_interval(self) -> float:
        heartbeat = getattr(getattr(self._connection, "_impl", None), "params", None)
        seconds = getattr(heartbeat, "heartbeat", None) or 60
        return max(0.2, min(seconds / 4, 5.0))

    # -- pika callbacks (run in whichever thread pumps; they only queue) --------

    def _on_reply(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        self._unacked_reply = method.delivery_tag
        self._replies_since_ack += 1
        self._deliver(True, method, props, body)

    def _on_command(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        self._deliver(False, method, props, body)

    def _deliver(self, is_reply: bool, method: Any, props: Any, body: bytes) -> None:
        headers = props.headers or {}
        sender = str(headers.get("sender", ""))
        chunk = headers.get("chunk")
        whole: bytes | torch.Tensor = body
        if chunk is not None:
            assembled = self._add_chunk(sender, props.correlation_id or "", chunk, body)
            if assembled is None:
                if not is_reply:  # acked now, or the prefetch window would stall the rest
                    self._channel.basic_ack(method.delivery_tag)
                return
            whole = assembled
        self._inbox.append(Delivery(
            is_reply, props.type or "", props.correlation_id or "", sender, whole,
            None if is_reply else props.reply_to, method.delivery_tag, method.redelivered,
            self._epoch,
        ))

    def _add_chunk(
        self, sender: str, correlation_id: str, chunk: Any, body: bytes
    ) -> torch.Tensor | None:
        try:
            index, count, total = (int(n) for n in chunk)
            return self._reassembler.add((sender, correlation_id), index, count, total, body)
        except Exception as e:  # hostile headers, or a size this machine cannot hold
            log.warning("dropped a chunked message %s from %r: %s", correlation_id, sender, e)
            return None

    def _on_return(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        # A command nobody could receive: answer it ourselves, at once.
        self._inbox.append(Delivery(True, RETURNED, props.correlation_id or "",
                                    method.routing_key, b""))

    # -- Endpoint ----------------------------------------------------------------

    def send_command(
        self,
        worker_id: str,
        type: str,
        frame: Frame,
        correlation_id: str,
        *,
        confirm: bool = False,
    ) -> None:
        try:
            self._publish(COMMAND_EXCHANGE, worker_id, type, frame, correlation_id,
                          reply_to=self.reply_queue, confirm=confirm)
        except pe.UnroutableError:
            raise UnknownWorker(worker_id, f"no queue for it on {self._broker.url}") from None
        except pe.NackError:
            raise BrokerError(f"RabbitMQ refused a message for worker {worker_id!r}") from None

    def send_reply(self, reply_to: str, type: str, frame: Frame, correlation_id: str) -> None:
        self._publish("", reply_to, type, frame, correlation_id)

    def _publish(
        self,
        exchange: str,
        routing_key: str,
        type: str,
        frame: Frame,
        correlation_id: str,
        *,
        reply_to: str | None = None,
        confirm: bool = False,
    ) -> None:
        # Commands to a worker: mandatory, so one nobody can receive comes back at once.
        mandatory = exchange == COMMAND_EXCHANGE
        props = self._properties
        if frame.nbytes <= self._broker.chunk_size:
            body = frame.tobytes()

            def publish() -> None:
                # One properties object, refilled: pika encodes it during the call.
                props.type, props.correlation_id, props.reply_to = type, correlation_id, reply_to
                channel = self._confirming_channel() if confirm else self._channel
                channel.basic_publish(exchange, routing_key, body, props, mandatory=mandatory)

            self._guarded(publish)
            return
        chunks = list(split_frame(frame, self._broker.chunk_size))

        def publish_chunks() -> None:
            channel = self._confirming_channel() if confirm else self._channel
            for index, chunk in enumerate(chunks):
                headers = {**self._headers, "chunk": [index, len(chunks), frame.nbytes]}
                chunk_props = pika.BasicProperties(
                    type=type, app_id=APP_ID, correlation_id=correlation_id,
                    reply_to=reply_to, headers=headers, delivery_mode=_TRANSIENT,
                )
                # pika takes only bytes: one chunk is copied at a time, never the tensor.
                data = chunk if isinstance(chunk, bytes) else bytes(chunk)
                channel.basic_publish(exchange, routing_key, data, chunk_props,
                                      mandatory=mandatory)

        # A reconnect in the middle sends the whole message again, from chunk 0.
        self._guarded(publish_chunks)

    def _confirming_channel(self) -> Any:
        if self._confirm_channel is None or not self._confirm_channel.is_open:
            channel = self._connection.channel()
            channel.confirm_delivery()
            self._confirm_channel = channel
        return self._confirm_channel

    def receive(self, timeout: float) -> Delivery | None:
        if self._inbox:
            return self._inbox.popleft()
        deadline = time.monotonic() + timeout
        while True:
            self._guarded(self._pump)
            if self._inbox:
                return self._inbox.popleft()
            if time.monotonic() >= deadline:
                with self._lock:  # pika callbacks in the keeper thread add chunks
                    self._reassembler.drop_stale()
                return None

    def _pump(self, *, blocking: bool = True, ack_all: bool = False) -> None:
        """Process I/O: until something arrives or the next tick, or only what is ready."""
        if self._unacked_command and (
            ack_all or time.monotonic() - self._oldest_unacked >= ACK_DELAY
        ):
            self._ack_commands()
        self._connection.process_data_events(time_limit=None if blocking else 0)
        # Replies are acknowledged in batches: one lost with the connection comes
        # again, and a duplicate is ignored by whoever waits for it.
        if self._unacked_reply and (ack_all or self._replies_since_ack >= REPLY_ACK_BATCH):
            self._reply_channel.basic_ack(self._unacked_reply, multiple=True)
            self._unacked_reply = 0
            self._replies_since_ack = 0

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge an executed command, in a batch with the ones before it.

        The acknowledgement goes out with the next ACK_BATCH-th command or within
        ACK_DELAY seconds (at close at the latest): one frame for many commands.
        Commands run in delivery order, so acknowledging up to a tag acknowledges
        exactly the executed ones.
        """
        if delivery.epoch != self._epoch:
            return  # from a channel that is gone; the broker has requeued it already
        with self._lock:  # the keeper thread may be acknowledging right now
            if not self._unacked_command:
                self._oldest_unacked = time.monotonic()
            self._unacked_command = delivery.tag
            self._commands_since_ack += 1
            due = self._commands_since_ack >= self._ack_batch
        if due:
            self._guarded(self._ack_commands)

    def _ack_commands(self) -> None:
        if self._unacked_command:
            self._channel.basic_ack(self._unacked_command, multiple=True)
            self._unacked_command = 0
            self._commands_since_ack = 0

    def take_unreturnable(self) -> list[Delivery]:
        """Remove and return the commands that closing would lose.

        A command delivered but not handled goes back to its queue when the
        connection closes, except a chunked one: its first chunks were
        acknowledged on arrival, so only the last would come back.
        """
        lost = [d for d in self._inbox if not d.is_reply and isinstance(d.body, torch.Tensor)]
        for delivery in lost:
            self._inbox.remove(delivery)
        return lost

    def ensure_worker(self, worker_id: str) -> None:
        queue = worker_queue(worker_id)

        def declare() -> int:
            channel = self._connection.channel()
            try:
                ok = channel.queue_declare(queue, passive=True)
            except pe.ChannelClosedByBroker as e:
                if e.reply_code != 404:
                    raise BrokerError(f"cannot inspect queue {queue}: {e.reply_text}") from None
                return -1
            channel.close()
            return int(ok.method.consumer_count)

        consumers = self._guarded(declare)
        if consumers < 0:
            raise UnknownWorker(
                worker_id,
                f"there is no queue {queue} on {self._broker.url}; "
                f"start it with `torchrelay worker --id {worker_id}`",
            )
        if consumers == 0:
            raise UnknownWorker(
                worker_id, f"queue {queue} exists on {self._broker.url} but no daemon consumes it"
            )

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        with self._lock:
            try:
                if self._connection.is_open:
                    self._ack_commands()  # what ran is done: it must not come again
            except _CONNECTION_ERRORS:
                log.debug("could not acknowledge before closing", exc_info=True)
            self._closed = True
            _close_quietly(self._connection)
        self._keeper.join(timeout=5)


def _queue_exists(connection: Any, queue: str) -> bool:
    channel = connection.channel()
    try:
        channel.queue_declare(queue, passive=True)
    except pe.ChannelClosedByBroker as e:
        if e.reply_code != 404:
            raise
        return False
    channel.close()
    return True


def _close_quietly(connection: Any) -> None:
    try:
        if connection is not None and connection.is_open:
            connection.close()
    except Exception:
        log.debug("error while closing a connection", exc_info=True)
