"""Data that lives on a worker: files it loads at start-up, which clients can find and use.

A worker's config lists the datasets it offers:

    [[worker.datasets]]
    path = "data/bob-digits.safetensors"   # relative to the config file
    tags = ["#digits", "#train"]
    description = "8x8 digits, bob's share"

(or `--dataset PATH:TAG[,TAG]` on the command line). A dataset file holds named
tensors, at least `data` and `target`, in one of three formats:

- `.safetensors` — pure data, read with the `safetensors` package;
- `.pt` — through `torch.load(..., weights_only=True)` only: a file holding
  anything but tensors (a pickled object) is refused, and nothing in it runs;
- `.csv` — numbers only; a header row names the columns, the one named `target`
  (or `label`, or else the last) is the target, the others the data.

A dataset belongs to its worker: it has an id derived from the worker and the
file (the same after a restart), clients find it with `search` and use it
through pointers, but none can fetch, move, delete or change it.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["Dataset", "DatasetError", "DatasetSpec", "dataset_id", "load_dataset"]

FORMATS = (".safetensors", ".pt", ".csv")


class DatasetError(ValueError):
    """A dataset file that is missing, malformed or not plain data; the message names it."""


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    """A dataset a worker offers: its file, its tags, what it is."""

    path: str
    tags: tuple[str, ...] = ()
    description: str = ""
    private: bool = True
    """Private to its worker (see `_privacy.py`): nothing derived from it leaves but an
    aggregate. `private = false` in the config (or `--public-dataset`) makes it public."""

    @classmethod
    def parse(cls, text: str, base: Path | None = None) -> DatasetSpec:
        """`PATH:TAG[,TAG]` (the command line's form); a relative path is from `base`."""
        path, _, tags = text.partition(":")
        return cls.of({"path": path, "tags": [t for t in tags.split(",") if t]}, base)

    @classmethod
    def of(cls, table: dict[str, Any], base: Path | None = None) -> DatasetSpec:
        """From a config's `[[worker.datasets]]` table (or its JSON form)."""
        unknown = sorted(set(table) - {"path", "tags", "description", "private"})
        if unknown:
            raise DatasetError(f"a dataset takes path, tags, description and private, not "
                               f"{unknown}")
        path, tags = table.get("path"), table.get("tags", [])
        description, private = table.get("description", ""), table.get("private", True)
        if type(private) is not bool:
            raise DatasetError(f"dataset {path}: private must be true or false")
        if not isinstance(path, str) or not path:
            raise DatasetError("a dataset needs a path")
        if not (isinstance(tags, list | tuple) and all(isinstance(t, str) and t for t in tags)):
            raise DatasetError(f"dataset {path}: tags must be a list of strings")
        if not isinstance(description, str):
            raise DatasetError(f"dataset {path}: description must be a string")
        resolved = Path(path)
        if base is not None and not resolved.is_absolute():
            resolved = base / resolved
        if resolved.suffix not in FORMATS:
            raise DatasetError(f"dataset file {resolved}: the format must be one of "
                               f"{', '.join(FORMATS)}")
        if not resolved.is_file():
            raise DatasetError(f"dataset file {resolved} does not exist")
        return cls(str(resolved.resolve()), tuple(tags), description, private)


@dataclass(slots=True)
class Dataset:
    """Named tensors a worker loaded from a file of its own."""

    tensors: dict[str, torch.Tensor]
    tags: tuple[str, ...]
    description: str
    name: str = field(default="")
    private: bool = True

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise KeyError(f"dataset {self.name} has {sorted(self.tensors)}, not {key!r}")
        return self.tensors[key]

    def summary(self) -> dict[str, Any]:
        """What a client sees of it without its values: tags, description, shapes, dtypes."""
        return {
            "name": self.name,
            "tags": list(self.tags),
            "description": self.description,
            "tensors": {k: [t.dtype, list(t.shape)] for k, t in self.tensors.items()},
        }

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k} {'x'.join(map(str, t.shape))} {str(t.dtype)[6:]}"
                           for k, t in self.tensors.items())
        return f"<Dataset {' '.join(self.tags)}: {shapes} — {self.description or self.name}>"


def dataset_id(worker_id: str, path: str) -> int:
    """A dataset's object id: the same every time its worker loads that file."""
    digest = hashlib.blake2b(f"{worker_id}\0{path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 53) - 1)


def load_dataset(spec: DatasetSpec) -> Dataset:
    """Read a dataset file (plain data only); raises `DatasetError` naming the file."""
    import torch  # noqa: PLC0415 - the supervisor reads specs without loading torch

    path = Path(spec.path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415 - only workers with data

            tensors = load_file(str(path))
        elif path.suffix == ".pt":
            loaded = torch.load(path, weights_only=True, map_location="cpu")
            if not (isinstance(loaded, dict) and all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
            )):
                raise DatasetError(f"dataset file {path} must hold a dict of named tensors, "
                                   f"not {type(loaded).__name__}")
            tensors = dict(loaded)
        else:
            tensors = _read_csv(path)
    except DatasetError:
        raise
    except Exception as e:  # a pickle, a truncated file, not numbers...
        raise DatasetError(f"dataset file {path} cannot be loaded as plain data: "
                           f"{type(e).__name__}: {e}") from None
    missing = sorted({"data", "target"} - set(tensors))
    if missing:
        raise DatasetError(f"dataset file {path} has no {missing} (it has {sorted(tensors)})")
    if tensors["data"].shape[:1] != tensors["target"].shape[:1]:
        raise DatasetError(f"dataset file {path}: data and target have different lengths")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return Dataset(tensors, spec.tags, spec.description, path.name, spec.private)


def _read_csv(path: Path) -> dict[str, torch.Tensor]:
    import torch  # noqa: PLC0415

    with path.open(newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        raise DatasetError(f"dataset file {path} is empty")
    header: list[str] | None = None
    if not all(_is_number(cell) for cell in rows[0]):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    width = len(header) if header else len(rows[0])
    if width < 2 or not rows or any(len(row) != width for row in rows):
        raise DatasetError(f"dataset file {path}: every row must have the same number (at "
                           "least two) of columns")
    try:
        values = torch.tensor([[float(cell) for cell in row] for row in rows],
                              dtype=torch.float64)
    except ValueError as e:
        raise DatasetError(f"dataset file {path} holds something that is not a number: "
                           f"{e}") from None
    names = header or []
    target = next((names.index(n) for n in ("target", "label") if n in names), width - 1)
    data = values[:, [i for i in range(width) if i != target]].to(torch.float32)
    labels = values[:, target]
    integral = bool(torch.all(labels == labels.round()))
    return {"data": data, "target": labels.to(torch.int64 if integral else torch.float32)}


def _is_number(text: str) -> bool:
    try:
        return not math.isnan(float(text)) or text.strip().lower() == "nan"
    except ValueError:
        return False
