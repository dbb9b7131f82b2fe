"""Starting a worker inside the caller's process, on the embedded broker."""

from __future__ import annotations

from torchrelay.broker import EmbeddedBroker

from ._runtime import WorkerRuntime

__all__ = ["start_embedded_worker"]


def start_embedded_worker(broker: EmbeddedBroker, worker_id: str) -> WorkerRuntime:
    """Start `worker_id` on `broker`; it lives as long as the broker does."""
    endpoint = broker.connect(worker_id, serve_worker=worker_id)
    runtime = WorkerRuntime(worker_id, endpoint)
    endpoint.set_handler(runtime.handle)
    return runtime
