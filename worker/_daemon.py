"""The worker daemon: one worker, served from its RabbitMQ queue until told to stop.

SIGTERM or SIGINT lets the command in hand finish and be acknowledged, waits a
little for requests still in flight down a chain, and exits 0. Commands that
were delivered but not started return to the queue when the connection closes,
for the next daemon with this id.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from torchrelay.broker import (
    BrokerError,
    BrokerUnavailable,
    ConnectionLost,
    RabbitMQBroker,
    RabbitMQEndpoint,
)

from ._config import WorkerConfig
from ._runtime import WorkerRuntime

__all__ = ["run_worker"]

log = logging.getLogger("torchrelay.worker")

_POLL_SECONDS = 0.5
_SHUTDOWN_GRACE_SECONDS = 10.0
_BROKER_RETRY_SECONDS = 5.0


def run_worker(config: WorkerConfig, stop: threading.Event | None = None) -> int:
    """Serve `config.id` until `stop` is set or a signal arrives; the exit status."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        _stop_on_signals(stop)
    broker = RabbitMQBroker(config.broker, heartbeat=config.heartbeat, prefetch=config.prefetch,
                            chunk_size=config.chunk_size)
    try:
        endpoint = broker.connect(config.id, serve_worker=config.id)
    except BrokerError as e:
        log.error("worker %s cannot start: %s", config.id, e)
        return 1
    runtime = WorkerRuntime(
        config.id,
        endpoint,
        reply_timeout=config.reply_timeout,
        status_extra=lambda: {
            "broker": broker.url,
            "connection": endpoint.connection_name,
            "reconnects": endpoint.reconnects,
        },
    )
    log.info("worker %s serving on %s", config.id, broker.url)
    try:
        _serve(endpoint, runtime, stop)
        _finish_in_flight(endpoint, runtime)
    except BrokerError as e:
        log.error("worker %s stopped: %s", config.id, e)
        return 1
    finally:
        endpoint.close()
    log.info("worker %s stopped", config.id)
    return 0


def _serve(endpoint: RabbitMQEndpoint, runtime: WorkerRuntime, stop: threading.Event) -> None:
    next_expiry = time.monotonic() + _POLL_SECONDS
    while not stop.is_set():
        try:
            delivery = endpoint.receive(_POLL_SECONDS)
            if delivery is not None:
                runtime.handle(delivery)
                if not delivery.is_reply:
                    endpoint.ack(delivery)
        except ConnectionLost as e:
            runtime.fail_waiting(e)
        except BrokerUnavailable as e:
            # Keep the objects in memory and keep trying: the broker may come back.
            log.error("%s; retrying in %g s", e, _BROKER_RETRY_SECONDS)
            stop.wait(_BROKER_RETRY_SECONDS)
        now = time.monotonic()
        if now >= next_expiry:
            runtime.expire(now)
            next_expiry = now + _POLL_SECONDS


def _finish_in_flight(endpoint: RabbitMQEndpoint, runtime: WorkerRuntime) -> None:
    """Give requests down a chain a moment to answer; start no new command."""
    deadline = time.monotonic() + _SHUTDOWN_GRACE_SECONDS
    while runtime.waiting and time.monotonic() < deadline:
        delivery = endpoint.receive(_POLL_SECONDS)
        if delivery is not None and delivery.is_reply:
            runtime.handle(delivery)
    if runtime.waiting:
        log.warning("stopping with %d requests still unanswered", runtime.waiting)


def _stop_on_signals(stop: threading.Event) -> None:
    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; finishing the command in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
