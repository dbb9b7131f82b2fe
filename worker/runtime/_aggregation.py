"""The one way private data leaves: a differentially private average of contributions.

`AggregationPlan.check` decides whether the contributions may be aggregated at
all; `release` (once every owner has charged its budget and answered its
policy) computes the average. DP-FedAvg's mechanism, at the trusted aggregator
(central DP):

    release = sum_o  w_o * clip(x_o, C_o)  +  N(0, sigma^2),
    sigma   = max_o  z_o * w_o * C_o

with `w_o` the weights normalised to sum to 1, `C_o` owner o's L2 bound (over
its whole contribution, every tensor of a model together) and `z_o` its noise
multiplier. Changing owner o's data moves the weighted sum by at most
`w_o * C_o`, and the noise is at least `z_o` times that: each owner's release is
a Gaussian mechanism with its own noise multiplier, which is what its budget is
charged for. The noise comes from a generator seeded from the operating system's
randomness, anew for each release.

The mechanism must be DP for *every* input, so nothing of it may depend on a
contribution's values but the noised sum: a contribution's entries that are not
finite (NaN, ±inf) count as 0 before clipping — a NaN would otherwise pass
through the sum, and the release's finiteness would tell one bit with certainty
—, its norm is computed without overflow, and whether it was clipped is not
reported.

Contributions that derive from no one's private data are averaged as they are.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import torch

from torchrelay.broker import PrivateDataError

__all__ = ["AggregationPlan", "clipped"]


@dataclass(frozen=True, slots=True)
class AggregationPlan:
    contributions: list[list[torch.Tensor]]
    weights: list[float]
    """Normalised: they sum to 1."""
    owners: list[str]
    """The owner of each contribution (none if the contributions are all public)."""

    @classmethod
    def check(cls, contributions: list[list[Any]], owners: list[frozenset[str]],
              weights: list[float]) -> AggregationPlan:
        if len(contributions) < 1:
            raise ValueError("aggregate needs at least one contribution")
        if len(weights) != len(contributions):
            raise ValueError(f"aggregate got {len(weights)} weights for "
                             f"{len(contributions)} contributions")
        if not all(w > 0 for w in weights):
            raise PrivateDataError("aggregate weights must be positive: a weight of 0 would "
                                   "release the other contributions alone")
        shapes = None
        for number, tensors in enumerate(contributions):
            if not tensors or not all(isinstance(t, torch.Tensor) and t.is_floating_point()
                                      for t in tensors):
                raise TypeError(f"contribution {number} must be floating-point tensors")
            these = [t.shape for t in tensors]
            if shapes is None:
                shapes = these
            elif these != shapes:
                raise ValueError(f"contribution {number} has shapes {these}, the first "
                                 f"{shapes}: contributions must have the same structure")
        total = sum(weights)
        normalised = [w / total for w in weights]
        if not any(owners):
            return cls(contributions, normalised, [])
        named: list[str] = []
        for number, owned in enumerate(owners):
            if len(owned) != 1:
                what = ("no one's private data: public and private contributions do not mix"
                        if not owned else f"private data of {', '.join(sorted(owned))}")
                raise PrivateDataError(
                    f"contribution {number} derives from {what}; each contribution must "
                    "derive from exactly one data owner's private data")
            (owner,) = owned
            if owner in named:
                raise PrivateDataError(f"{owner!r} contributes twice to one aggregate")
            named.append(owner)
        return cls(contributions, normalised, named)

    def release(self, policies: dict[str, dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
        """The aggregate (a tensor, or a tuple for several per contribution), and what to
        report: each owner's epsilon spent and delta, the noise's std."""
        flats = [torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
                 for tensors in self.contributions]
        total = torch.zeros_like(flats[0])
        report: dict[str, Any] = {"epsilon": {}, "delta": {}, "noise_std": 0.0}
        sigma = 0.0
        for index, (contribution, weight) in enumerate(zip(flats, self.weights, strict=True)):
            flat = contribution
            if self.owners:
                owner = self.owners[index]
                policy = policies[owner]
                bound = float(policy["clip"])
                flat = clipped(flat, bound)
                sigma = max(sigma, float(policy["noise_multiplier"]) * weight * bound)
                report["epsilon"][owner] = float(policy["epsilon_spent"])
                report["delta"][owner] = float(policy["delta"])
            total += flat * weight
        if sigma > 0:
            generator = torch.Generator().manual_seed(secrets.randbits(63))
            total += torch.randn(total.shape, generator=generator, dtype=torch.float64) * sigma
        report["noise_std"] = sigma if math.isfinite(sigma) else 0.0
        parts, offset = [], 0
        for tensor in self.contributions[0]:
            size = tensor.numel()
            parts.append(total[offset : offset + size].view(tensor.shape).to(tensor.dtype))
            offset += size
        return (parts[0] if len(parts) == 1 else tuple(parts)), report


def clipped(flat: torch.Tensor, bound: float) -> torch.Tensor:
    """`flat` (float64) with its non-finite entries 0, scaled to an L2 norm of at most
    `bound`; the same work whatever the values."""
    finite = torch.where(torch.isfinite(flat), flat, torch.zeros((), dtype=flat.dtype))
    largest = finite.abs().max() if finite.numel() else torch.zeros((), dtype=flat.dtype)
    # |x| / max|x| is at most 1: its squares cannot overflow, whatever the magnitudes.
    scale = torch.where(largest > 0, largest, torch.ones((), dtype=flat.dtype))
    norm = (finite / scale).norm() * scale
    factor = torch.clamp(bound / torch.clamp(norm, min=1e-300), max=1.0)
    return finite * factor
