"""`tr.aggregate`: the one way data derived from private data leaves its owners.

    release = tr.aggregate([bobs_model, alices_model], aggregator=secure_worker)
    model = release.get()          # the average, as a module
    release.epsilon                # {"bob": 0.84, "alice": 0.84}: each budget, now

Contributions (pointers to tensors, or model pointers of one structure) are
averaged on one worker, the aggregator: those elsewhere are moved there first
when `aggregator` is given. If they derive from data owners' private data, the
aggregator must be trusted by every owner, each contribution must come from one
owner, at least `k` owners must take part, and the average is differentially
private (each contribution clipped, Gaussian noise added, every owner's (ε, δ)
budget charged by the owner's own worker; see the README, "Privacy"). The
contributions are spent: each is averaged once. On data nobody owns (what the
client sent itself), it is a plain weighted average.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchrelay.broker import Aggregate

from ._handles import WorkerHandle
from ._module import ModulePointer, _tensors
from ._pointer import PointerTensor

__all__ = ["Release", "aggregate", "floating"]

Contribution = PointerTensor | ModulePointer


@dataclass
class Release:
    """What `aggregate` (or `dp_train`) released: the average on the aggregator (or the
    trained model on its owner's worker) and what it cost."""

    value: PointerTensor
    """The average, on the aggregator: a tensor, or a tuple of a model's tensors (for
    `dp_train`, the trained model's)."""
    epsilon: dict[str, float] = field(default_factory=dict)
    """Each contributing owner's ε spent so far (this release included)."""
    delta: dict[str, float] = field(default_factory=dict)
    noise_std: float = 0.0
    """The std of the Gaussian noise added to the weighted sum."""
    template: nn.Module | None = field(default=None, repr=False)
    noise_multiplier: float | None = None
    """`dp_train`: the noise multiplier its steps used."""
    steps: int = 0
    """`dp_train`: how many DP-SGD steps it ran (each charged)."""
    sample_rate: float | None = None
    """`dp_train`: each record's chance to be in a step's batch."""
    dropped: list[str] = field(default_factory=list)
    """A secure aggregate's owners that dropped out of its round (left out of it)."""
    fetched: Any = field(default=None, repr=False, compare=False)
    """The value, when it came with the release (a secure aggregate's): `get` returns
    it rather than fetch it, and deletes the aggregator's copy as a fetch would."""

    def get(self) -> Any:
        """The average: a tensor, or for models a module of the contributions' structure
        (parameters and floating-point buffers averaged; other buffers zero). For
        `dp_train`, the trained module."""
        if self.fetched is not None:  # the aggregator's copy goes, as a fetch takes it
            value, self.fetched = self.fetched, None
            if self.value.garbage_collect:
                self.value.garbage_collect = False
                self.value.fleet.doom(self.value.location.id, self.value.id_at_location)
            return self.assemble(value)
        return self.assemble(self.value.get())

    def assemble(self, value: Any) -> Any:
        """What `get` returns, from the value fetched (for callers that fetch several
        releases at once)."""
        if self.template is None:
            return value
        module = copy.deepcopy(self.template, memo={
            id(p): p for _, _, _, p in _tensors(self.template)})
        averaged = iter(value if isinstance(value, tuple) else (value,))
        done: dict[int, Any] = {}
        for is_parameter, table, name, pointer in _tensors(module):
            if id(pointer) not in done:
                if floating(pointer):
                    tensor = next(averaged)
                    done[id(pointer)] = (nn.Parameter(tensor, requires_grad=True)
                                         if is_parameter else tensor)
                else:
                    dtype, shape, _ = pointer._metadata()
                    done[id(pointer)] = torch.zeros(shape, dtype=dtype)
            table[name] = done[id(pointer)]
        return module


def aggregate(
    contributions: Sequence[Contribution],
    weights: Sequence[float] | None = None,
    *,
    aggregator: WorkerHandle | None = None,
    secure: bool = False,
    threshold: int | None = None,
) -> Release:
    """Average `contributions` on `aggregator` (default: where they are); see the module
    docstring. `weights` (positive; default equal) weigh them. With `secure`, the
    aggregator learns the sum and nothing else (`_secure.py`); `threshold`: the owners
    that must survive the round (default: a majority)."""
    if not contributions:
        raise ValueError("aggregate needs at least one contribution")
    if weights is not None and len(weights) != len(contributions):
        raise ValueError(f"{len(weights)} weights for {len(contributions)} contributions")
    if secure:
        from ._secure import secure_aggregate  # noqa: PLC0415 (it imports this module)

        return secure_aggregate(contributions, weights, aggregator, threshold)
    if threshold is not None:
        raise ValueError("a threshold is for secure aggregation (secure=True)")
    template = None
    parts: list[list[PointerTensor]] = []
    for contribution in contributions:
        if isinstance(contribution, ModulePointer):
            if aggregator is not None:
                contribution.move(aggregator)
            template = template or contribution._module
            parts.append([p for p in contribution.pointers() if floating(p)])
        elif isinstance(contribution, PointerTensor):
            moved = contribution if aggregator is None else contribution.move(aggregator)
            parts.append([moved])
        else:
            raise TypeError("aggregate takes pointers to tensors or models, not "
                            f"{type(contribution).__name__}")
    where = {p.location.id for tensors in parts for p in tensors}
    if len(where) != 1:
        raise ValueError(f"the contributions are on {', '.join(sorted(where))}: give "
                         "aggregator= to have them moved to one worker")
    location = parts[0][0].location
    fleet = location.fleet
    result = fleet.new_id()
    report = fleet.request(location.id, Aggregate(
        [[p.id_at_location for p in tensors] for tensors in parts],
        [float(w) for w in (weights or [1.0] * len(parts))], result))
    for tensors in parts:  # spent there when they were private; deleted with ours if not
        for pointer in tensors:
            pointer.garbage_collect = bool(not report["epsilon"])
    return Release(PointerTensor(location, result), report["epsilon"], report["delta"],
                   report["noise_std"], template)


def floating(pointer: PointerTensor) -> bool:
    return pointer._metadata()[0].is_floating_point
