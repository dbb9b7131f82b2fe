"""Starting a worker inside the caller's process, on the embedded broker."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchrelay.broker import EmbeddedBroker

from ._datasets import DatasetSpec, load_dataset
from ._privacy import PrivacyPolicy
from ._runtime import WorkerRuntime

__all__ = ["start_embedded_worker"]


def start_embedded_worker(
    broker: EmbeddedBroker,
    worker_id: str,
    datasets: Sequence[str | dict[str, Any] | DatasetSpec] = (),
    privacy: PrivacyPolicy | dict[str, Any] | None = None,
) -> WorkerRuntime:
    """Start `worker_id` on `broker`, offering `datasets` (`PATH:TAG[,TAG]`, a config's
    `[[worker.datasets]]` table as a dict, or specs) under `privacy` (a policy, or a
    `[worker.privacy]` table as a dict); it lives as long as the broker does. Its
    privacy ledger is kept in memory only."""
    specs = [d if isinstance(d, DatasetSpec) else DatasetSpec.of(d) if isinstance(d, dict)
             else DatasetSpec.parse(d) for d in datasets]
    policy = PrivacyPolicy.of(privacy) if isinstance(privacy, dict) else privacy
    loaded = [(load_dataset(spec), spec.path) for spec in specs]  # before it serves
    endpoint = broker.connect(worker_id, serve_worker=worker_id)
    runtime = WorkerRuntime(worker_id, endpoint, privacy=policy)
    for dataset, key in loaded:
        runtime.add_dataset(dataset, key)
    endpoint.set_handler(runtime.handle)
    return runtime
