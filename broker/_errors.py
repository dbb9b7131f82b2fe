"""Every error torchrelay raises, under one root.

    TorchRelayError
    ├── BrokerError                 the message broker could not do what was asked
    │   ├── BrokerUnavailable       could not connect (or reconnect) to the broker
    │   ├── ConnectionLost          the connection dropped while a reply was awaited
    │   └── UnknownBrokerURL        a URL no transport understands
    ├── UnknownWorker               no worker consumes the addressed queue
    ├── ReplyTimeout                a worker did not answer in time (also a TimeoutError)
    ├── ProtocolError               bytes that are not a valid torchrelay message
    │   └── DecodeError             ... raised while decoding them
    ├── OperationRefused            an operation outside the allow-list
    │   └── PrivateDataError        private data would leave its owner's rules
    ├── EarlierFailure              not run: an earlier command of the session failed
    ├── ObjectNotFound              no object under that id on that worker
    └── RemoteError                 a worker failed; carries the remote type and traceback
        ├── RemotePrivateDataError  ... a PrivateDataError (catch it as either)
        └── RemoteObjectNotFound    ... an ObjectNotFound (catch it as either)

Errors raised on a worker travel back as `ErrorInfo` (`broker/_protocol.py`) and
are rebuilt by the caller as `RemoteError`, never as the original class: the
caller must not be able to make the client instantiate arbitrary types. The two
a caller may want to catch by kind are rebuilt as the subclasses above, which
are also the local class: `except tr.ObjectNotFound` catches a worker's.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "BrokerUnavailable",
    "ConnectionLost",
    "DecodeError",
    "EarlierFailure",
    "ObjectNotFound",
    "OperationRefused",
    "PrivateDataError",
    "ProtocolError",
    "RemoteError",
    "RemoteObjectNotFound",
    "RemotePrivateDataError",
    "ReplyTimeout",
    "TorchRelayError",
    "UnknownBrokerURL",
    "UnknownWorker",
]


class TorchRelayError(Exception):
    """Root of every error raised by torchrelay."""


class BrokerError(TorchRelayError):
    """The message broker could not do what was asked."""


class BrokerUnavailable(BrokerError):
    """No connection to the broker could be made, even after retrying."""


class ConnectionLost(BrokerError):
    """The broker connection dropped while replies were still awaited."""

    lost: list[tuple[str, str]]
    """(worker, operation) of each command in flight that was lost, when known."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.lost = []


class UnknownBrokerURL(BrokerError, ValueError):
    """The URL names a scheme no transport understands."""


class UnknownWorker(TorchRelayError, LookupError):
    """No worker consumes the queue a command was addressed to."""

    def __init__(self, worker_id: str, detail: str = "") -> None:
        self.worker_id = worker_id
        message = f"no worker {worker_id!r} is serving"
        super().__init__(f"{message}: {detail}" if detail else message)


class ReplyTimeout(TorchRelayError, TimeoutError):
    """A worker did not answer within the timeout."""

    def __init__(self, worker_id: str, waiting_for: str, timeout: float, reason: str = "") -> None:
        self.worker_id = worker_id
        self.waiting_for = waiting_for
        within = reason or f"within {timeout:g} s"
        super().__init__(f"no reply from worker {worker_id!r} ({within}) to {waiting_for}")


class ProtocolError(TorchRelayError):
    """A message that is not valid torchrelay protocol."""


class DecodeError(ProtocolError, ValueError):
    """Bytes that could not be decoded into a torchrelay message."""


class OperationRefused(TorchRelayError, PermissionError):
    """The operation is not on the worker's allow-list."""


class PrivateDataError(OperationRefused):
    """What was asked would let private data leave its owner's rules (see the README,
    "Privacy"): fetched, moved to an untrusted worker, released without aggregation,
    or past its owner's privacy budget. The data stays where it is."""


class EarlierFailure(TorchRelayError):
    """A command refused because an earlier one of the same session failed first.

    Workers refuse a command the client waits for (`Envelope.guard`) rather than
    run it behind a failure the client has not been told about yet.
    """


class ObjectNotFound(TorchRelayError, KeyError):
    """No object is stored under the given id."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "object not found"


class RemoteError(TorchRelayError):
    """An error raised on a worker, rebuilt at the call site.

    `remote_type` is the qualified name of the exception class on the worker,
    `remote_traceback` the worker's formatted traceback, `worker_id` the worker
    the caller asked and `operation` what it asked for. When the error happened
    further down a chain of pointers, `origin` says where ("call Tensor.view
    failed on worker 'bob'"); however long the chain, the message names only the
    worker asked and that origin.
    """

    def __init__(
        self,
        worker_id: str,
        operation: str,
        remote_type: str,
        message: str,
        *,
        remote_traceback: str = "",
        origin: str = "",
    ) -> None:
        self.worker_id = worker_id
        self.operation = operation
        self.origin = origin
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback
        where = f"{origin}: " if origin else ""
        super().__init__(
            f"{operation} failed on worker {worker_id!r}: {where}{remote_type}: {message}"
        )



class RemotePrivateDataError(RemoteError, PrivateDataError):
    """A `PrivateDataError` a worker raised, rebuilt at the call site: catch it as
    either."""


class RemoteObjectNotFound(RemoteError, ObjectNotFound):
    """An `ObjectNotFound` a worker raised (an id it does not hold, or no longer),
    rebuilt at the call site: catch it as either."""

    def __str__(self) -> str:  # RemoteError's message, not KeyError's repr
        return RemoteError.__str__(self)
