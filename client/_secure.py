"""`tr.aggregate(..., secure=True)`: an aggregator that learns the sum and nothing else.

    release = tr.aggregate([bobs_model, alices_model, carols_model],
                           aggregator=any_worker, secure=True)

Each contribution stays on its owner's worker. The client joins each owner to a
fresh round (`secagg_join`: its contribution, the aggregator, the owners, the
threshold and the weights — the owner clips, weighs and spends its contribution),
then asks the aggregator to run it (`secure_aggregate`): the owners swap keys and
Shamir shares of their secrets directly, send masked inputs, and reveal the shares
that unmask the sum of those that did not drop out (see
`worker/runtime/_secagg.py`). The aggregator keeps the weighted average of the
survivors' contributions, with the owners' shares of the noise in it when their
data is private; no one trusts it. With fewer than `threshold` survivors the round
aborts, and nothing is released.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from torchrelay.broker import (
    PrivateDataError,
    SecAggJoin,
    SecureAggregate,
    TorchRelayError,
)

from ._handles import WorkerHandle
from ._module import ModulePointer
from ._pointer import PointerTensor
from ._release import Release, floating

if TYPE_CHECKING:
    pass

__all__ = ["secure_aggregate"]

log = logging.getLogger("torchrelay.client")


def secure_aggregate(contributions: Sequence[PointerTensor | ModulePointer],
                     weights: Sequence[float] | None, aggregator: WorkerHandle | None,
                     threshold: int | None = None, *,
                     shapes: list[list[int]] | None = None,
                     template: nn.Module | None = None) -> Release:
    """See the module docstring; `aggregate`'s arguments. `shapes` and `template`: of a
    contribution that is one pointer to a model's tensors together (`dp_train`'s)."""
    if aggregator is None:
        raise ValueError("secure aggregation needs an aggregator: aggregate(..., "
                         "aggregator=worker, secure=True)")
    by_owner: dict[str, tuple[list[PointerTensor], float]] = {}
    for number, contribution in enumerate(contributions):
        if isinstance(contribution, ModulePointer):
            template = template or contribution._module
            tensors = [p for p in contribution.pointers() if floating(p)]
        elif isinstance(contribution, PointerTensor):
            tensors = [contribution]
        else:
            raise TypeError("aggregate takes pointers to tensors or models, not "
                            f"{type(contribution).__name__}")
        where = {p.location.id for p in tensors}
        if len(where) != 1:
            raise ValueError(f"contribution {number} is on {', '.join(sorted(where))}: a "
                             "securely aggregated contribution is on its owner's worker")
        (owner,) = where
        if owner in by_owner:
            raise ValueError(f"two contributions are on {owner!r}: one per owner")
        by_owner[owner] = (tensors, float(weights[number]) if weights is not None else 1.0)
    owners = sorted(by_owner)
    n = len(owners)
    t = threshold if threshold is not None else n // 2 + 1
    fleet = aggregator.fleet
    round_id = secrets.token_hex(16)
    weighed = [by_owner[o][1] for o in owners]
    refused: dict[str, str] = {}
    joins = fleet.outcomes([(owner, SecAggJoin(round_id, aggregator.id, owners, t, weighed, [
        p.id_at_location for p in by_owner[owner][0]])) for owner in owners])
    for owner, joined in zip(owners, joins, strict=True):
        if isinstance(joined, TorchRelayError):  # gone, or refusing: it drops out
            refused[owner] = str(joined)
            log.warning("secure aggregation: %s did not join: %s", owner, joined)
        elif shapes is None:  # each owner says its contribution's, with its join
            shapes = [list(shape) for shape in joined["shapes"]]
        for pointer in by_owner[owner][0]:  # spent there (joined), or kept as it is (not)
            pointer.garbage_collect = owner in refused
    why = "".join(f"; {o} did not join: {m}" for o, m in refused.items())
    if shapes is None:
        raise PrivateDataError(f"secure aggregation round {round_id} aborted: no owner "
                               f"joined it; nothing is released{why}")
    result = fleet.new_id()
    try:
        report = fleet.request(aggregator.id, SecureAggregate(round_id, owners, t, weighed,
                                                              shapes, result))
    except PrivateDataError as e:
        raise PrivateDataError(f"{e}{why}") from None
    release = Release(PointerTensor(aggregator, result), report["epsilon"], report["delta"],
                      report["noise_std"], template, dropped=list(report["dropped"]))
    release.fetched = report["average"]
    return release

