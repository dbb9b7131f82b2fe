"""torchrelay.client: pointers, and the session that carries their commands."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchrelay.broker._lazy import lazy_exports

if TYPE_CHECKING:
    from ._data import DatasetPointer, FederatedDataLoader
    from ._dp_train import dp_train
    from ._fedavg import FedAvg, RoundResult
    from ._handles import ObjectDescription, WorkerHandle
    from ._hook import hook
    from ._module import ModulePointer
    from ._optim import SGD, Adam, RemoteOptimizer
    from ._plan_recording import Plan, plan
    from ._pointer import OPERATORS, PointerTensor, send
    from ._release import Release, aggregate
    from ._session import Fleet

__all__, __getattr__ = lazy_exports(__name__, __file__)

