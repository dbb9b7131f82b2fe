"""Starting a worker inside the caller's process, on the embedded broker."""

from __future__ import annotations

from collections.abc import Sequence

from torchrelay.broker import EmbeddedBroker

from ._datasets import DatasetSpec, load_dataset
from ._runtime import WorkerRuntime

__all__ = ["start_embedded_worker"]


def start_embedded_worker(
    broker: EmbeddedBroker, worker_id: str, datasets: Sequence[str | DatasetSpec] = ()
) -> WorkerRuntime:
    """Start `worker_id` on `broker`, offering `datasets` (`PATH:TAG[,TAG]` or specs);
    it lives as long as the broker does."""
    specs = [d if isinstance(d, DatasetSpec) else DatasetSpec.parse(d) for d in datasets]
    loaded = [(load_dataset(spec), spec.path) for spec in specs]  # before it serves
    endpoint = broker.connect(worker_id, serve_worker=worker_id)
    runtime = WorkerRuntime(worker_id, endpoint)
    for dataset, key in loaded:
        runtime.add_dataset(dataset, key)
    endpoint.set_handler(runtime.handle)
    return runtime
