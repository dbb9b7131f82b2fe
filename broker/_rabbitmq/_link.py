"""A pika connection: opened with retries, reopened when it dies, used by one
thread at a time, and shared by the participants seated on it.

pika's `BlockingConnection` must never be used by two threads at once. The rule
is carried by the structure: each participant's channels live in a `Channels`
object that only its `Seat.run` hands out, under the link's lock. Code that has
no `Channels` in hand cannot touch pika; pika's callbacks run inside
`process_data_events`, hence also under the lock.

A participant usually has a link of its own. Workers hosted in one process by
one thread share one (`SharedConnection`): a seat each, with channels, queues
and consumers of its own, and one socket, one keeper and one reconnect for all.

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
from typing import Any, TypeVar, cast

import pika
import pika.exceptions as pe
import tenacity

from .._errors import BrokerError, BrokerUnavailable, ConnectionLost
from ._coalescing import coalesce_writes, unsent_bytes

__all__ = ["Channels", "Link", "LinkSettings", "Seat", "redact_url", "tls_context"]

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
    """A live connection and one participant's channels on it. Only ever in hand inside
    `Seat.run`."""

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
"""Called under the lock with a participant's fresh channels (the flag: a reconnect),
to declare and consume. It may raise `ConnectionLost` after setting up, to say that
something was lost with the old connection."""

OnKeepAlive = Callable[[Channels], None]
"""Called under the lock by the keeper thread while the owner is busy elsewhere, before
it pumps the connection: write what must not wait (acks)."""


@dataclass(eq=False, slots=True)
class _Member:
    on_open: OnOpen
    on_keepalive: OnKeepAlive
    channels: Channels
    lost: ConnectionLost | None = None
    """What the last reconnect lost for this participant, told at its next `run`."""


class Seat:
    """One participant's place on a `Link`: its channels, used under the link's lock."""

    def __init__(self, link: Link, member: _Member) -> None:
        self._link = link
        self._member = member

    def run(self, action: Callable[[Channels], _T]) -> _T:
        """Run `action` on this participant's channels under the lock; on a dead
        connection reopen it and retry once.

        pika's errors do not leave this method (but for `UnroutableError` and
        `NackError`, which name a message the caller knows): they become
        `BrokerError`s.
        """
        return self._link._run(self._member, action)

    def run_behind(self, action: Callable[[Channels], None]) -> None:
        """`run` an `action` that writes a message behind (`_coalescing.publish_later`):
        should the connection die before its buffer is sent, `action` runs again on the
        new connection's channels (the message, sent again, may then come twice: the
        receiver recognises a correlation id it has seen)."""
        self._link._run(self._member, action, behind=True)

    def leave(self, last: Callable[[Channels], None] | None = None) -> None:
        """Run `last` (if the connection is still open), then give up the seat: its
        channels close (what they delivered and nobody acknowledged goes back to its
        queue), unless the link closes next anyway."""
        self._link._leave(self._member, last)


class Link:
    """A connection that seated participants use under a lock, reopened when it has
    died (for them all)."""

    def __init__(self, settings: LinkSettings) -> None:
        self.settings = settings
        self.reconnects = 0
        self._lock = threading.Lock()
        self._closed = False
        self._epoch = 0
        self._address = 0  # which of the settings' addresses it is connected to
        self._members: list[_Member] = []
        self._behind: list[tuple[_Member, Callable[[Channels], None]]] = []
        """What was written behind since the connection's buffer was last seen empty."""
        self._connection = self._connect(reconnecting=False)
        self._stop = threading.Event()
        self._keeper = threading.Thread(
            target=self._keep_alive, name=f"torchrelay-keepalive {settings.connection_name}",
            daemon=True,
        )
        self._keeper.start()

    def seat(self, on_open: OnOpen, on_keepalive: OnKeepAlive) -> Seat:
        """A participant's seat: channels of its own, handed to `on_open` to declare
        and consume (now, and again on every reconnect)."""
        with self._lock:
            if self._closed:
                raise ConnectionLost(f"{self.settings.connection_name} is closed")
            if not self._connection.is_open:
                self._reconnect()
            channels = self._channels_on(self._connection)
            try:
                on_open(channels, False)
            except pe.ChannelClosedByBroker as e:
                _close_channels_quietly(channels)
                raise BrokerError(
                    f"RabbitMQ at {self.settings.shown(self._address)} refused: {e.reply_text}"
                ) from None
            except BaseException:
                _close_channels_quietly(channels)
                raise
            member = _Member(on_open, on_keepalive, channels)
            self._members.append(member)
        return Seat(self, member)

    def close(self) -> None:
        """Close for good (every seat with it)."""
        if self._closed:
            return
        self._stop.set()
        with self._lock:
            self._closed = True
            _close_quietly(self._connection)
        self._keeper.join(timeout=5)

    def pump(self, read: Callable[[Any], None]) -> None:
        """Run `read` on the connection itself under the lock, to read it for every seat;
        on a dead connection reopen it instead (what that lost, each seat is told at its
        next `run`)."""

        def attempt() -> None:
            read(self._connection)
            self._sent_behind()

        self._live(attempt, None)

    def _run(self, member: _Member, action: Callable[[Channels], _T], *,
             behind: bool = False) -> _T:
        def attempt() -> _T:
            result = action(member.channels)
            self._ran(member, action, behind)
            return result

        return cast(_T, self._live(attempt, member))

    def _live(self, attempt: Callable[[], _T], member: _Member | None) -> _T | None:
        """`attempt()` under the lock, on a live connection. A dead one is reopened; then,
        for a seat's `member` (told first, each time, what a reconnect lost for it),
        `attempt` runs again on the new connection, and for a pump it does not (None).

        pika's errors do not leave this method (but for `UnroutableError` and `NackError`,
        which name a message the caller knows): they become `BrokerError`s."""
        with self._lock:
            if self._closed or (member is not None and member not in self._members):
                raise ConnectionLost(f"{self.settings.connection_name} is closed")
            try:
                if member is not None:
                    self._tell_lost(member)
                if self._connection.is_open:
                    try:
                        return attempt()
                    except _CONNECTION_ERRORS:
                        if self._closed:
                            raise ConnectionLost(
                                f"{self.settings.connection_name} is closed"
                            ) from None
                # Dead: closed by the broker while we were away, or just now.
                self._reconnect()
                if member is None:
                    return None
                self._tell_lost(member)
                return attempt()
            except (pe.UnroutableError, pe.NackError):
                raise
            except pe.AMQPError as e:
                raise BrokerError(
                    f"{self.settings.connection_name}: {type(e).__name__}: {e}"
                ) from None

    def _ran(self, member: _Member, action: Callable[[Channels], Any], behind: bool) -> None:
        if behind:
            self._behind.append((member, action))
        elif self._behind:
            self._sent_behind()

    def _sent_behind(self) -> None:
        """Forget what was written behind once the connection's buffer is empty (sent)."""
        if self._behind and unsent_bytes(self._connection) == 0:
            self._behind.clear()

    @staticmethod
    def _tell_lost(member: _Member) -> None:
        lost, member.lost = member.lost, None
        if lost is not None:
            raise lost

    def _leave(self, member: _Member, last: Callable[[Channels], None] | None) -> None:
        with self._lock:
            if member not in self._members:
                return
            try:
                if last is not None and self._connection.is_open:
                    last(member.channels)
            except _CONNECTION_ERRORS:
                log.debug("could not finish before closing", exc_info=True)
            self._members.remove(member)
            if self._members and not self._closed:  # (else the connection closes next)
                _close_channels_quietly(member.channels)

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
                coalesce_writes(connection)
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

    def _channels_on(self, connection: Any) -> Channels:
        return Channels(connection, connection.channel(), connection.channel(), self._epoch)

    def _connect(self, *, reconnecting: bool) -> Any:
        """A new connection, every seat's channels opened on it and set up again."""
        connection = self._open_connection()
        try:
            self._epoch += 1
            self._tick(connection)
            self._connection = connection
            for member in self._members:
                member.channels = self._channels_on(connection)
                try:
                    member.on_open(member.channels, reconnecting)
                except ConnectionLost as e:  # set up, but something was lost with the old one
                    member.lost = e
                for writer, action in self._behind:  # what the old connection may not have sent
                    if writer is member:
                        action(member.channels)
        except pe.ChannelClosedByBroker as e:
            _close_quietly(connection)
            raise BrokerError(
                f"RabbitMQ at {self.settings.shown(self._address)} refused: {e.reply_text}"
            ) from None
        except BaseException:
            _close_quietly(connection)
            raise
        return connection

    def _reconnect(self) -> None:
        name, url = self.settings.connection_name, self.settings.shown(self._address)
        log.warning("%s lost its connection to %s; reconnecting", name, url)
        # To the next node of a cluster first: the one lost may be going down.
        self._address = (self._address + 1) % len(self.settings.urls)
        _close_quietly(self._connection)
        # Until the broker notices our old connection is dead, it still holds our
        # exclusive consumers: retry for a few heartbeats.
        deadline = time.monotonic() + max(30.0, 3.0 * self.settings.heartbeat_seconds)
        while True:
            try:
                self._connect(reconnecting=True)
                break
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
                if not self._closed and self._connection.is_open:
                    for member in self._members:
                        try:  # (one seat's broken channel is no reason to skip the others)
                            member.on_keepalive(member.channels)
                        except Exception:
                            log.debug("keepalive found a channel broken", exc_info=True)
                    self._connection.process_data_events(time_limit=0)  # (sends them too)
            except Exception:
                log.debug("keepalive found the connection broken", exc_info=True)
            finally:
                self._lock.release()


def _close_channels_quietly(channels: Channels) -> None:
    for channel in (channels.commands, channels.replies, channels._confirming):
        try:
            if channel is not None and channel.is_open:
                channel.close()
        except Exception:
            log.debug("error while closing a channel", exc_info=True)


def _close_quietly(connection: Any) -> None:
    try:
        if connection is not None and connection.is_open:
            connection.close()
    except Exception:
        log.debug("error while closing a connection", exc_info=True)
