"""The worker daemon: one worker, served from its RabbitMQ queue until told to stop.

SIGTERM or SIGINT lets the command in hand finish and be acknowledged, serves a
little longer while commands wait on other workers down a chain, and exits 0.
Commands that were delivered but not started return to the queue when the
connection closes, for the next daemon with this id. A message whose handling
fails unexpectedly is logged and acknowledged: it cannot take the worker down,
nor come back to do it again.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from types import FrameType
from typing import Any

import torch

from torchrelay.broker import (
    BrokerError,
    ConnectionLost,
    Endpoint,
    RabbitMQBroker,
    RabbitMQEndpoint,
    SharedConnection,
    open_broker,
)

from ..operations._config import WorkerConfig
from ..runtime._datasets import DatasetError, load_dataset
from ..runtime._privacy import PrivacyError
from ..runtime._runtime import WorkerRuntime

__all__ = ["broker_settings", "run_worker", "serve_workers", "stop_on_signals"]

log = logging.getLogger("torchrelay.worker")

_POLL_SECONDS = 0.5
_SHUTDOWN_GRACE_SECONDS = 10.0
_BROKER_RETRY_SECONDS = 5.0


RuntimeFactory = Callable[[Endpoint], WorkerRuntime]

Served = list[tuple[RabbitMQEndpoint, WorkerRuntime]]
"""The workers one thread serves, each an endpoint on one shared connection and the
runtime that handles what it receives."""


def run_worker(
    config: WorkerConfig,
    stop: threading.Event | None = None,
    *,
    make_runtime: RuntimeFactory | None = None,
    keep_going: Callable[[], bool] = lambda: True,
    broker_options: dict[str, Any] | None = None,
) -> int:
    """Serve `config.id` in this process until `stop` is set, a signal arrives or
    `keep_going()` is false; the exit status.

    `make_runtime` builds the runtime on the endpoint (a supervised executor's
    keeps a journal and a mirror); by default a plain one.
    """
    return serve_workers([config], stop, make_runtime=make_runtime, keep_going=keep_going,
                         broker_options=broker_options, name=f"torchrelay worker {config.id}")


def serve_workers(
    configs: Sequence[WorkerConfig],
    stop: threading.Event | None = None,
    *,
    name: str,
    make_runtime: RuntimeFactory | None = None,
    keep_going: Callable[[], bool] = lambda: True,
    broker_options: dict[str, Any] | None = None,
    turn: AbstractContextManager[object] | None = None,
) -> int:
    """Serve every worker of `configs` from this thread, on one RabbitMQ connection
    named `name` (their broker settings are the first's: `_host.py` groups them so), until
    `stop` is set, a signal arrives or `keep_going()` is false; the exit status.

    `turn` is held while the workers handle what they received (the threads of one host
    share one). All or none: one worker that cannot start stops the others.
    """
    if make_runtime is not None and len(configs) != 1:
        # A journaled worker's answers must leave before its next command runs: only a
        # connection serving one worker sends them at once (`SharedConnection`).
        raise ValueError("a runtime of the caller's making (an executor's) serves one "
                         f"worker alone, not {len(configs)}")
    stop = stop or threading.Event()
    config = configs[0]
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    # Arithmetic on subnormal numbers is several times slower on these CPUs: a client
    # timing an operation on private data would learn whether a value was tiny. Flushed
    # to zero, every value takes the same time (ML loses nothing below 1e-38).
    if not torch.set_flush_denormal(True):
        log.warning("this CPU cannot flush subnormal numbers to zero: operations on them "
                    "take longer, which a client can time")
    if threading.current_thread() is threading.main_thread():
        stop_on_signals(stop)
    broker = open_broker(config.broker, give_up=stop, **broker_settings(config),
                         **(broker_options or {}))
    assert isinstance(broker, RabbitMQBroker)  # (a worker's config takes amqp[s]:// only)
    try:
        shared = broker.share(name)
    except BrokerError as e:
        log.error("%s cannot start: %s", "worker " + config.id if len(configs) == 1
                  else "the workers " + ", ".join(c.id for c in configs), e)
        return 1
    served: Served = []
    try:
        status = _start(shared, configs, served, make_runtime)
        if status == 0:
            # Everything made so far (torch's modules, the datasets) lives as long as the
            # daemon: kept out of the collector's full passes, which would otherwise walk
            # all of it, 70-350 ms with torch loaded, in the middle of whatever command
            # runs then (a DP-SGD run paused so grew its public schedule eightfold, for the
            # rest of a FedAvg).
            gc.freeze()
            for endpoint, runtime in served:
                log.info("worker %s serving on %s", endpoint.identity, broker.url)
                runtime.presence.announce("started")
            _serve(shared, served, stop, until=lambda: not keep_going(), turn=turn)
        _finish_in_flight(shared, served)
        for _, runtime in served:
            runtime.presence.announce("stopped")
    except BrokerError as e:
        log.error("%s stopped: %s", shared.name, e)
        return 1
    finally:
        shared.close()
    for endpoint, _ in served:
        log.info("worker %s stopped", endpoint.identity)
    return status


def broker_settings(config: WorkerConfig) -> dict[str, Any]:
    """How `config`'s worker connects to its broker (`config.broker`): workers whose
    addresses and settings are equal can share a connection (`_host.py`)."""
    return dict(heartbeat=config.heartbeat, prefetch=config.prefetch,
                chunk_size=config.chunk_size, max_message_bytes=min(16 << 30, config.max_bytes),
                shared_accounts=config.shared_accounts, tls_ca_file=config.tls_ca_file,
                tls_cert_file=config.tls_cert_file, tls_key_file=config.tls_key_file,
                queue_type=config.queue_type, queue_expires=config.queue_expires)


def _start(shared: SharedConnection, configs: Sequence[WorkerConfig], served: Served,
           make_runtime: RuntimeFactory | None) -> int:
    """Start serving each of `configs` on `shared`, into `served`; 0, or the status of
    the first that could not start."""
    for config in configs:
        try:
            endpoint = shared.serve(config.id)
        except BrokerError as e:
            log.error("worker %s cannot start: %s", config.id, e)
            return 1
        try:
            runtime = (make_runtime(endpoint) if make_runtime is not None
                       else WorkerRuntime.for_config(config, endpoint))
            for spec in config.datasets:  # (an executor's own after a restart too: not mirrored)
                runtime.add_dataset(load_dataset(spec), spec.path)
        except (DatasetError, PrivacyError) as e:
            log.error("worker %s cannot start: %s", config.id, e)
            endpoint.close()
            return 2
        except BaseException:
            endpoint.close()
            raise
        served.append((endpoint, runtime))
    return 0


def _serve(
    shared: SharedConnection,
    served: Served,
    stop: threading.Event,
    until: Callable[[], bool] = lambda: False,
    turn: AbstractContextManager[object] | None = None,
) -> None:
    """Handle deliveries until `stop` is set (or `until()` is true), each round of them
    holding `turn`.

    Everything read from the connection is taken before each command runs, so that
    the next command is the fairest sender's (`_fairness.py`), not merely the oldest;
    then each worker runs one command, in turn. The connection is read once per round
    (a wait, or a look when commands are queued): not again to see that nothing else
    came meanwhile."""
    turn = turn or nullcontext()
    next_expiry = time.monotonic() + _POLL_SECONDS
    while not stop.is_set() and not until():
        try:
            shared.wait(0 if any(r.queued for _, r in served) else _POLL_SECONDS)
        except BrokerError as e:
            _broker_down(e, stop)  # (not once per worker: nothing to handle meanwhile)
            continue
        now = time.monotonic()
        expire = now >= next_expiry
        if expire:
            next_expiry = now + _POLL_SECONDS
        failure: BrokerError | None = None
        with turn:
            for endpoint, runtime in served:
                try:
                    _handle(endpoint, runtime)
                    if expire:
                        runtime.expire(now)
                except ConnectionLost as e:
                    runtime.fail_waiting(e)
                except BrokerError as e:
                    failure = e
                    break  # the connection is the others' too
        if failure is not None:
            _broker_down(failure, stop)


def _broker_down(error: BrokerError, stop: threading.Event) -> None:
    # Keep the objects in memory and keep trying: the broker may come back.
    log.error("%s; retrying in %g s", error, _BROKER_RETRY_SECONDS)
    stop.wait(_BROKER_RETRY_SECONDS)


def _handle(endpoint: RabbitMQEndpoint, runtime: WorkerRuntime) -> None:
    """What `endpoint` received, accepted; then one command run."""
    delivery = endpoint.take_received()
    while delivery is not None:
        _guarded(runtime.accept, delivery)
        delivery = endpoint.take_received()
    if runtime.queued:
        _guarded(runtime.step)


def _guarded(run: Callable[..., object], *args: object) -> None:
    try:
        run(*args)
    except (ConnectionLost, BrokerError):
        raise
    except Exception:
        # A bug, or input nothing anticipated: this message must not take the worker (and
        # every object it holds) down. (Its delivery is acknowledged all the same: see
        # `WorkerRuntime.step`, so it cannot come back to do it again.)
        log.exception("handling a message failed")


def _finish_in_flight(shared: SharedConnection, served: Served) -> None:
    """Finish what was begun, and let the commands parked on other workers finish, for a
    little while. What was received but not begun goes back to the queue (unacknowledged).

    Deliveries keep being handled meanwhile: a chain through these workers (a cycle, a
    `remote_get`) needs them to answer their parts.
    """
    for _, runtime in served:
        _guarded(runtime.finish_started)
    deadline = time.monotonic() + _SHUTDOWN_GRACE_SECONDS

    def waiting() -> int:
        return sum(runtime.waiting for _, runtime in served)

    if waiting():
        _serve(shared, served, threading.Event(),
               until=lambda: not waiting() or time.monotonic() > deadline)
    if waiting():
        log.warning("stopping with %d requests still unanswered", waiting())
    for endpoint, runtime in served:
        for delivery in endpoint.take_unreturnable():
            _guarded(runtime.handle, delivery)


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set `stop` (from the main thread only, as Python allows)."""

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; finishing the command in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
