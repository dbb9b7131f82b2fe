"""Datasets: what a worker offers (`add_dataset`, loaded from its config) and how
clients find them (`search` by tag, only those its config lets them use)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from torchrelay.broker import (
    Search,
)

from .._datasets import Dataset, dataset_id
from ._registry import handles

if TYPE_CHECKING:
    from .._runtime import WorkerRuntime


log = logging.getLogger("torchrelay.worker")


@handles(Search)
def search(worker: WorkerRuntime, command: Search, sender: str) -> list[dict[str, Any]]:
    wanted = set(command.tags)
    return [
        {"id": object_id, **dataset.summary(),
         "privacy": worker.privacy.public() if dataset.private else None}
        for object_id in sorted(worker.store.owned)
        if (entry := worker.store.get(object_id)).usable_by(sender)
        and type(dataset := entry.value) is Dataset
        and wanted <= set(dataset.tags)
    ]


def add_dataset(worker: WorkerRuntime, dataset: Dataset, key: str) -> int:
    """Offer `dataset` (found by `search`, used through pointers, never given away);
    its id derives from `key` (its file), so it is the same after a restart."""
    object_id = dataset_id(worker.id, key)
    owners = frozenset({worker.id}) if dataset.private else frozenset()
    worker.store.put(object_id, dataset, owners, worker.dataset_holders)
    if owners:
        worker.store.spread(list(dataset.tensors.values()), owners)
    worker.store.owned.add(object_id)
    worker.store.read_only.update(t.untyped_storage()._cdata for t in dataset.tensors.values())
    log.info("worker %s offers dataset %s as %d: %s", worker.id, dataset.name, object_id,
             dataset.summary()["tensors"])
    return object_id
