"""One participant's pika connection: opened with retries, reopened when it dies,
used by one thread at a time.

pika's `BlockingConnection` must never be used by two threads at once. The rule
is carried by the structure: the connection and its channels live in a
`Channels` object that only `Link.run` hands out, under the link's lock. Code
that has no `Channels` in hand cannot touch pika; pika's callbacks run inside
`process_data_events`, hence also under the lock.

Two threads take turns on it. The owner thread does all the work. A keeper
thread pumps the connection (which sends heartbeats and lets callbacks queue
deliveries, nothing more) whenever the owner is busy elsewhere — computing a
long command, or a client script doing local work — so the broker never takes a
busy participant for a dead one. On the hot path the lock is uncontended.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pika
import pika.exceptions as pe
import tenacity

from .._errors import BrokerError, BrokerUnavailable, ConnectionLost

__all__ = ["Channels", "Link", "LinkSettings", "redact_url", "tls_context"]

log = logging.getLogger("torchrelay.broker")

_T = TypeVar("_T")

# Errors after which the connection is unusable and must be reopened.
_CONNECTION_ERRORS = (pe.AMQPConnectionError, pe.ChannelClosed, pe.ChannelWrongStateError)
_REFUSED = (pe.ProbableAuthenticationError, pe.AuthenticationError, pe.ProbableAccessDeniedError)
_TICK_SECONDS = 0.1
_DEFAULT_HEARTBEAT = 60  # RabbitMQ's, when we do not ask for one


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs (each of several,
    comma-separated)."""
    if "," in url:
        return ",".join(redact_url(part.strip()) for part in url.split(","))
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def tls_context(
    ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A client context that verifies the broker's certificate and host name against
    `ca_file` (default: the system's CAs), presenting `cert_file` if given."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    elif key_file is not None:
        raise ValueError("a TLS key file needs its certificate file (tls_cert_file)")
    return context


def _tls_failure(error: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a failed connection, if that is what failed (no retry
    helps: a certificate does not become valid by waiting)."""
    seen: set[int] = set()
    pending: list[Any] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        if isinstance(current, BaseException):
            pending.extend([*current.args, current.__cause__, current.__context__])
    return None


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """How to connect: the broker's addresses (with credentials; several are the nodes
    of one cluster) and the connection's tuning."""

    urls: tuple[str, ...]
    connection_name: str
    heartbeat: int | None = None
    connect_timeout: float = 15.0
    tls: ssl.SSLContext | None = None
    """For `amqps://`: verifies the broker's certificate against the CA given (and may
    present a client certificate); None: the system's CAs."""
    give_up: threading.Event = field(default_factory=threading.Event)
    """Once set, (re)connecting stops retrying: a daemon told to stop while the broker is
    unreachable stops, rather than retry until it is killed."""

    def parameters(self, index: int) -> pika.URLParameters:
        """How to connect to address `index`."""
        params = pika.URLParameters(self.urls[index])
        if params.ssl_options is not None and self.tls is not None:
            params.ssl_options = pika.SSLOptions(self.tls, params.host)
        params.client_properties = {"connection_name": self.connection_name,
                                    "product": "torchrelay"}
        if self.heartbeat is not None:
            params.heartbeat = self.heartbeat
        # Without this a publish blocks forever while the broker is out of memory.
        params.blocked_connection_timeout = 60
        if len(self.urls) > 1:  # a node that does not answer: on to the next soon
            params.socket_timeout = min(params.socket_timeout or 10.0, 5.0)
        return params

    def shown(self, index: int | None = None) -> str:
        """Address `index` (None: every one) without passwords, for messages and logs."""
        urls = self.urls if index is None else self.urls[index:index + 1]
        return ",".join(map(redact_url, urls))

    @property
    def heartbeat_seconds(self) -> int:
        return self.heartbeat or _DEFAULT_HEARTBEAT


@dataclass(slots=True)
class Channels:
    """A live connection and its channels. Only ever in hand inside `Link.run`."""

    connection: Any
    commands: Any
    """Publishes commands and replies; consumes the worker queue, if any."""
    replies: Any
    """Consumes the reply queue, with a prefetch of its own."""
    epoch: int
    """How many times the link has connected: deliveries carry it, acks check it."""
    _confirming: Any = field(default=None)

    def confirming(self) -> Any:
        """A channel in confirm mode, for publishes that must be confirmed (opened lazily)."""
        if self._confirming is None or not self._confirming.is_open:
            channel = self.connection.channel()
            channel.confirm_delivery()
            self._confirming = channel
        return self._confirming


OnOpen = Callable[[Channels, bool], None]
"""Called under the lock on a fresh connection (the flag: a reconnect), to declare
and consume. It may raise `ConnectionLost` after setting up, to say that
something was lost with the old connection."""

OnKeepAlive = Callable[[Channels], None]
"""Called under the lock by the keeper thread while the owner is busy elsewhere:
pump the connection without blocking, and send what must not wait (acks)."""


class Link:
    """A connection that `run` uses under a lock, reopening it when it has died."""

    def __init__(self, settings: LinkSettings, on_open: OnOpen, on_keepalive: OnKeepAlive) -> None:
        self.settings = settings
        self.reconnects = 0
        self._on_open = on_open
        self._on_keepalive = on_keepalive
        self._lock = threading.Lock()
        self._closed = False
        self._epoch = 0
        self._address = 0  # which of the settings' addresses it is connected to
        self._channels = self._connect(reconnecting=False)
        self._stop = threading.Event()
        self._keeper = threading.Thread(
            target=self._keep_alive, name=f"torchrelay-keepalive {settings.connection_name}",
            daemon=True,
        )
        self._keeper.start()

    def run(self, action: Callable[[Channels], _T]) -> _T:
        """Run `action` under the lock; on a dead connection reopen it and retry once.

        pika's errors do not leave this method (but for `UnroutableError` and
        `NackError`, which name a message the caller knows): they become
        `BrokerError`s.
        """
        with self._lock:
            if self._closed:
                raise ConnectionLost(f"{self.settings.connection_name} is closed")
            try:
                if self._channels.connection.is_open:
                    try:
                        return action(self._channels)
                    except _CONNECTION_ERRORS:
                        if self._closed:
                            raise ConnectionLost(
                                f"{self.settings.connection_name} is closed"
                            ) from None
                # Dead: closed by the broker while we were away, or just now.
                self._reconnect()
                return action(self._channels)
            except (pe.UnroutableError, pe.NackError):
                raise
            except pe.AMQPError as e:
                raise BrokerError(
                    f"{self.settings.connection_name}: {type(e).__name__}: {e}"
                ) from None

    def close(self, last: Callable[[Channels], None] | None = None) -> None:
        """Run `last` (if the connection is still open), then close for good."""
        if self._closed:
            return
        self._stop.set()
        with self._lock:
            try:
                if last is not None and self._channels.connection.is_open:
                    last(self._channels)
            except _CONNECTION_ERRORS:
                log.debug("could not finish before closing", exc_info=True)
            self._closed = True
            _close_quietly(self._channels.connection)
        self._keeper.join(timeout=5)

    # -- connecting -----------------------------------------------------------------

    def _open_connection(self) -> Any:
        """Connect, retrying with backoff while the broker is unreachable."""
        settings = self.settings
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_delay(settings.connect_timeout)
            | tenacity.stop_when_event_set(settings.give_up),
            wait=tenacity.wait_exponential(multiplier=0.1, max=2.0),
            sleep=self._pause,
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, pe.AMQPConnectionError) and not isinstance(e, _REFUSED)
                and _tls_failure(e) is None
            ),
            reraise=True,
        )
        try:
            return retrying(self._connect_to_any)
        except (pe.ProbableAuthenticationError, pe.AuthenticationError) as e:
            raise BrokerUnavailable(
                f"RabbitMQ at {settings.shown(self._address)} refused the credentials: {e}"
            ) from None
        except pe.ProbableAccessDeniedError as e:
            raise BrokerUnavailable(
                f"RabbitMQ at {settings.shown(self._address)} denied access: {e}"
            ) from None
        except (pe.AMQPConnectionError, ssl.SSLError) as e:
            if settings.give_up.is_set():
                raise BrokerUnavailable(f"gave up reaching RabbitMQ at {settings.shown()}: "
                                        "stopping") from None
            failure = _tls_failure(e)
            if failure is not None:
                raise BrokerUnavailable(
                    f"TLS with RabbitMQ at {settings.shown(self._address)} failed: {failure} "
                    "(is the CA "
                    "file the one that signed the broker's certificate?)"
                ) from None
            raise BrokerUnavailable(
                f"cannot reach RabbitMQ at {settings.shown()} after "
                f"{settings.connect_timeout:g} s: {type(e).__name__} {e}"
            ) from None

    def _connect_to_any(self) -> Any:
        """A connection to the first address that takes one, from the current one on
        (a cluster's nodes in turn)."""
        urls = self.settings.urls
        failure: pe.AMQPConnectionError | None = None
        for step in range(len(urls)):
            index = (self._address + step) % len(urls)
            try:
                connection = pika.BlockingConnection(self.settings.parameters(index))
            except pe.AMQPConnectionError as e:
                self._address = index  # (what the error names)
                if isinstance(e, _REFUSED) or _tls_failure(e) is not None:
                    raise  # a node of the cluster says no: the others would too
                failure = e
                continue
            self._address = index
            return connection
        assert failure is not None
        raise failure

    def _connect(self, *, reconnecting: bool) -> Channels:
        connection = self._open_connection()
        try:
            self._epoch += 1
            channels = Channels(connection, connection.channel(), connection.channel(),
                                self._epoch)
            self._tick(connection)
            self._channels = channels
            self._on_open(channels, reconnecting)
        except ConnectionLost:
            raise  # set up, but something was lost with the old connection
        except pe.ChannelClosedByBroker as e:
            _close_quietly(connection)
            raise BrokerError(
                f"RabbitMQ at {self.settings.shown(self._address)} refused: {e.reply_text}"
            ) from None
        except BaseException:
            _close_quietly(connection)
            raise
        return channels

    def _reconnect(self) -> None:
        name, url = self.settings.connection_name, self.settings.shown(self._address)
        log.warning("%s lost its connection to %s; reconnecting", name, url)
        # To the next node of a cluster first: the one lost may be going down.
        self._address = (self._address + 1) % len(self.settings.urls)
        _close_quietly(self._channels.connection)
        # Until the broker notices our old connection is dead, it still holds our
        # exclusive consumers: retry for a few heartbeats.
        deadline = time.monotonic() + max(30.0, 3.0 * self.settings.heartbeat_seconds)
        while True:
            try:
                self._connect(reconnecting=True)
                break
            except ConnectionLost:
                self.reconnects += 1
                raise
            except BrokerUnavailable:
                raise
            except BrokerError as e:
                if time.monotonic() > deadline:
                    raise BrokerError(f"{name} cannot reconnect: {e}") from None
                log.info("reconnect refused (%s); retrying", e)
                self._pause(1.0)
                if self.settings.give_up.is_set():
                    raise BrokerError(f"{name} gave up reconnecting: stopping") from None
        self.reconnects += 1
        log.warning("%s reconnected to %s", name, self.settings.shown(self._address))

    def _pause(self, seconds: float) -> None:
        """Wait between two attempts to connect; no longer once giving up."""
        self.settings.give_up.wait(seconds)

    def _tick(self, connection: Any) -> None:
        # A standing timer wakes `process_data_events(time_limit=None)` so its caller
        # can check a deadline, without a timer created and cancelled per message
        # (pika's own time_limit would do that).
        connection.call_later(_TICK_SECONDS, lambda: self._tick(connection))

    # -- the keeper thread ------------------------------------------------------------

    def _keep_alive(self) -> None:
        # Often: while the owner runs a long command, this thread is what answers status
        # requests (see `Consumer.urgent`), as well as what keeps the heartbeats going.
        interval = max(0.1, min(self.settings.heartbeat_seconds / 4, 0.25))
        while not self._stop.wait(interval):
            if not self._lock.acquire(blocking=False):
                continue  # the owner is pumping the connection itself
            try:
                if not self._closed and self._channels.connection.is_open:
                    self._on_keepalive(self._channels)
            except Exception:
                log.debug("keepalive found the connection broken", exc_info=True)
            finally:
                self._lock.release()


def _close_quietly(connection: Any) -> None:
    try:
        if connection is not None and connection.is_open:
            connection.close()
    except Exception:
        log.debug("error while closing a connection", exc_info=True)
