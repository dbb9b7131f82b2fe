"""torchrelay.worker: the object store, the command runtime and the daemon."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchrelay.broker._lazy import lazy_exports

if TYPE_CHECKING:
    from .containment._daemon import run_worker
    from .operations._config import ConfigError, WorkerConfig
    from .operations._launcher import WorkerProcesses
    from .runtime._embedded import start_embedded_worker
    from .runtime._runtime import WorkerRuntime
    from .runtime._store import ObjectStore, StoredObject

__all__, __getattr__ = lazy_exports(__name__, __file__)

