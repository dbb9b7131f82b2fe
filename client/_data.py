"""Datasets that live on workers, and batches of them formed where they are.

`bob.search("#digits")` (or `fleet.search(...)` over every worker the session
knows) returns `DatasetPointer`s to the datasets those workers offer. A dataset
pointer shows the tags, description, shapes and dtypes without fetching
anything; `data, target = ptr` (or `ptr["data"]`) gives pointers to its
tensors. The dataset stays its worker's: no garbage collection of ours deletes
it, and the worker refuses to let it be fetched, moved or changed.

`FederatedDataLoader` yields `(data_ptr, target_ptr)` batches over several
such datasets, worker by worker; each batch is cut on its worker (an index
operation), so a training loop over it reads like a local one and no data moves.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from torchrelay.broker import Search

from ._pointer import PointerTensor

if TYPE_CHECKING:  # (the session imports datasets, not the other way round)
    from ._handles import WorkerHandle

__all__ = ["DatasetPointer", "FederatedDataLoader", "search"]


class DatasetPointer:
    """Points at a dataset its worker offers (see the module docstring)."""

    __slots__ = ("_pointer", "description", "name", "privacy", "tags", "tensors")

    def __init__(self, location: WorkerHandle, summary: dict[str, Any]) -> None:
        self.name: str = summary["name"]
        self.tags: tuple[str, ...] = tuple(summary["tags"])
        self.description: str = summary["description"]
        self.privacy: dict[str, Any] | None = summary.get("privacy")
        """Its owner's privacy policy (`k`, `clip`, `noise_multiplier`, `epsilon`,
        `delta`, `trusted`...) if it is private, else None."""
        self.tensors: dict[str, tuple[torch.dtype, torch.Size]] = {
            key: (dtype, torch.Size(shape)) for key, (dtype, shape) in summary["tensors"].items()
        }
        # The worker's: never deleted by us.
        self._pointer = PointerTensor(location, summary["id"], garbage_collect=False)

    @property
    def location(self) -> WorkerHandle:
        return self._pointer.location

    @property
    def private(self) -> bool:
        """Whether its worker keeps it private (nothing derived from it leaves but an
        aggregate with noise; see `tr.aggregate`)."""
        return self.privacy is not None

    @property
    def id_at_location(self) -> int:
        return self._pointer.id_at_location

    def __getitem__(self, key: str) -> PointerTensor:
        """A pointer to one of its tensors (`"data"`, `"target"`...), on its worker."""
        if key not in self.tensors:
            raise KeyError(f"dataset {self.name} on {self.location.id} has "
                           f"{sorted(self.tensors)}, not {key!r}")
        pointer = self._pointer[key]
        dtype, shape = self.tensors[key]
        pointer._meta, pointer._meta_epoch = (dtype, shape, False), self.location.fleet.meta_epoch
        return pointer

    def __iter__(self) -> Iterator[PointerTensor]:
        """`data, target = dataset`."""
        yield self["data"]
        yield self["target"]

    def __len__(self) -> int:
        """How many samples it has."""
        return self.tensors["data"][1][0]

    @property
    def shape(self) -> torch.Size:
        return self.tensors["data"][1]

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors["data"][0]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{key} {'x'.join(map(str, shape))} {str(dtype)[6:]}"
                           for key, (dtype, shape) in self.tensors.items())
        private = ", private" if self.private else ""
        return (f"[DatasetPointer | {self.location.id}:{self.id_at_location} "
                f"{' '.join(self.tags)}: {shapes}{private} — {self.description or self.name}]")


def search(workers: Sequence[WorkerHandle], tags: Sequence[str]) -> list[DatasetPointer]:
    """The datasets of `workers` holding every one of `tags`, worker by worker."""
    if not workers:
        return []
    fleet = workers[0].fleet
    answers = fleet.request_many([(w.id, Search(list(tags))) for w in workers])
    return [DatasetPointer(worker, summary)
            for worker, found in zip(workers, answers, strict=True) for summary in found]


class FederatedDataLoader:
    """`(data_ptr, target_ptr)` batches of worker-owned datasets, worker by worker.

    Each batch is cut on its dataset's worker. With `shuffle`, each pass takes the
    samples in a new order drawn from `seed` (the same seeds give the same batches);
    `drop_last` leaves out a dataset's last, smaller batch.
    """

    def __init__(
        self,
        datasets: Sequence[DatasetPointer],
        batch_size: int = 32,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.datasets = list(datasets)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._generator = torch.Generator().manual_seed(seed)
        # Made on first use: a loader made for each `fit` call of a FedAvg that already
        # holds its workers' pointers then sends no command.
        self._tensors: dict[int, tuple[PointerTensor, PointerTensor]] = {}

    def batches_of(self, dataset: DatasetPointer) -> int:
        whole, rest = divmod(len(dataset), self.batch_size)
        return whole + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        return sum(self.batches_of(d) for d in self.datasets)

    def __iter__(self) -> Iterator[tuple[PointerTensor, PointerTensor]]:
        for dataset in self.datasets:
            yield from self.batches(dataset)

    def tensors(self, dataset: DatasetPointer) -> tuple[PointerTensor, PointerTensor]:
        """Pointers to `dataset`'s data and target (made once, kept by the loader)."""
        position = self.datasets.index(dataset)
        if position not in self._tensors:
            self._tensors[position] = (dataset["data"], dataset["target"])
        return self._tensors[position]

    def order(self, samples: int) -> torch.Tensor:
        """The sample order of a pass over `samples` samples: shuffled (the loader's
        next permutation) or in sequence."""
        if self.shuffle:
            return torch.randperm(samples, generator=self._generator)
        return torch.arange(samples)

    def batches(self, dataset: DatasetPointer, order: torch.Tensor | None = None,
                ) -> Iterator[tuple[PointerTensor, PointerTensor]]:
        """One pass over one dataset; `order` (a permutation of its sample indices)
        overrides the loader's own."""
        data, target = self.tensors(dataset)
        samples = len(dataset)
        if order is None and self.shuffle:
            order = torch.randperm(samples, generator=self._generator)
        for start in range(0, samples, self.batch_size):
            stop = min(start + self.batch_size, samples)
            if self.drop_last and stop - start < self.batch_size:
                break
            if order is None:
                yield data[start:stop], target[start:stop]
            else:
                index = order[start:stop]
                yield data[index], target[index]
