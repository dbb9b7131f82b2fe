"""torchrelay.worker: the object store, the command runtime and the daemon."""

from __future__ import annotations

from ._config import ConfigError, WorkerConfig
from ._daemon import run_worker
from ._embedded import start_embedded_worker
from ._launcher import WorkerProcesses
from ._runtime import WorkerRuntime
from ._store import ObjectStore, StoredObject

__all__ = [
    "ConfigError",
    "ObjectStore",
    "StoredObject",
    "WorkerConfig",
    "WorkerProcesses",
    "WorkerRuntime",
    "run_worker",
    "start_embedded_worker",
]
