"""torchrelay: privacy-preserving remote execution of PyTorch, through pointers.

    import torch, torchrelay as tr
    tr.hook(torch)
    fleet = tr.connect()                  # in-process workers; or tr.connect("amqp://...")
    bob = fleet.worker("bob")
    x = torch.tensor([1, 2, 3]).send(bob) # a PointerTensor; the data is on bob
    y = (x + x).get()                     # computed on bob, brought back

Data stays with the worker that holds it; clients hold pointers. Workers run
only allow-listed operations and exchange nothing but msgpack frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torchrelay.broker._gone import GONE_AFTER_SECONDS
from torchrelay.broker._lazy import lazy_exports

if TYPE_CHECKING:
    from torchrelay.broker import (
        BrokerError,
        BrokerUnavailable,
        ConnectionLost,
        DecodeError,
        ObjectNotFound,
        OperationRefused,
        PrivateDataError,
        ProtocolError,
        RemoteError,
        ReplyTimeout,
        TorchRelayError,
        UnknownBrokerURL,
        UnknownWorker,
    )
    from torchrelay.client import (
        DatasetPointer,
        FedAvg,
        FederatedDataLoader,
        Fleet,
        ModulePointer,
        ObjectDescription,
        Plan,
        PointerTensor,
        Release,
        RoundResult,
        WorkerHandle,
        aggregate,
        dp_train,
        hook,
        plan,
    )

    from . import optim

_exported, __getattr__ = lazy_exports(__name__, __file__)
__all__ = [*_exported, "__version__", "connect"]

__version__ = "0.1.0"


def connect(
    url: str | Sequence[str] | None = None,
    *,
    name: str | None = None,
    timeout: float = 30.0,
    pipelined: bool = True,
    gone_after: float = GONE_AFTER_SECONDS,
    datasets: dict[str, list[Any]] | None = None,
    privacy: dict[str, dict[str, Any]] | None = None,
    **broker_options: Any,
) -> Fleet:
    """Open a client session.

    With no `url`, an in-process broker whose workers start on first use (no
    server needed). With `amqp://user:password@host:port/vhost` (or `amqps://`),
    RabbitMQ and the worker daemons consuming from it; with several (a list, or
    comma-separated), the nodes of one RabbitMQ cluster, tried in turn.

    `timeout` bounds how long to wait with no reply at all; with `pipelined`
    false, every operation waits for its worker's answer. A wait on a worker whose
    queue has had no daemon for `gone_after` seconds fails, naming it
    (the grace must outlast a crashed executor's restart and a reconnect).
    `datasets` gives the in-process workers data of their own (`{"bob":
    ["bob.safetensors:#digits"]}`, as a daemon's `--dataset`, or
    `[[worker.datasets]]` tables as dicts), private
    unless a table says `"private": False`; `privacy` their owners' rules
    (`{"bob": {"trusted": ["secure_worker"], ...}}`, a `[worker.privacy]` table).
    `name` is who the session is: with a RabbitMQ user of its own, that user
    (and a different `name` is refused); on a shared account such as `guest`,
    `name` (default "me"). `broker_options` (`heartbeat`, `prefetch`,
    `connect_timeout`, `shared_accounts`) tune the RabbitMQ connection.
    """
    from torchrelay.broker import open_broker
    from torchrelay.client import Fleet
    from torchrelay.worker import start_embedded_worker

    offered, rules = datasets or {}, privacy or {}

    def start_worker(broker: Any, worker_id: str) -> object:
        return start_embedded_worker(broker, worker_id, offered.get(worker_id, []),
                                     rules.get(worker_id))

    broker = open_broker(url, start_worker=start_worker, **broker_options)
    try:
        name = name or broker.verified_identity or "me"
        return Fleet(broker, name=name, timeout=timeout, pipelined=pipelined,
                     gone_after=gone_after, owns_broker=True)
    except BaseException:
        broker.close()
        raise
