"""DP-SGD with record-level privacy, as the data owner's worker runs it.

In Opacus the training code is trusted to clip and add noise; here a client's
script is not, so the mechanism is the worker's own and the client chooses
only its public knobs (learning rate, expected batch size, epochs, a noise
multiplier no lower than the owner's). Each step:

1. **Poisson sampling**: every record joins the batch independently with
   probability `q = batch_size / n`, drawn from a generator the worker seeds
   from the operating system (`secrets`), never from anything the client sends;
2. **per-example gradients** of the client's per-example loss, by
   `torch.func.vmap` over `torch.func.grad`: each example is seen alone, as a
   batch of one, so no operation can combine two records;
3. **clipping**: an example's gradient (all parameters together) has its
   non-finite entries set to 0, then is scaled to an L2 norm of at most `clip`
   (Opacus's factor, `min(1, clip / (norm + 1e-6))`);
4. **noise**: the sum of the clipped gradients gets Gaussian noise of std
   `noise_multiplier x clip` on every coordinate, and is divided by the expected
   batch size (Opacus's mean over a Poisson batch);
5. the optimizer's step on the noised gradient.

Adding or removing one record changes the noise-free sum by at most `clip`,
whatever the other records and the loss: each step is a Poisson-sampled Gaussian
mechanism, which the owner's ledger charges (`_privacy.PrivacyBudget`). Nothing
in a step depends on a value for its shape or its failure: an example whose
gradient cannot be computed (a loss that fails on some values) contributes 0, as
a NaN does — one failing example must not change the others' contributions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["OPTIMIZERS", "DpSgd", "DpSgdSettings", "PerExampleLoss", "clipped_sum",
           "sample_rate", "steps_for"]

PerExampleLoss = Callable[[dict[int, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]
"""`loss(parameters, x, y)`: the loss of one example given as a batch of one
(`x[None]`, `y[None]`), a scalar."""

OPTIMIZERS = ("sgd", "adam")

CLIP_EPSILON = 1e-6
"""Opacus's guard against a zero norm in the clipping factor."""


@dataclass(frozen=True, slots=True)
class DpSgdSettings:
    clip: float
    noise_multiplier: float
    lr: float
    batch_size: int
    """The expected batch size: records are sampled at `batch_size / n`."""
    epochs: int = 1
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"clip must be a positive number, not {self.clip!r}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a number from 0, not "
                             f"{self.noise_multiplier!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, not {self.lr!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be at least 1")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not "
                             f"{self.optimizer!r}")


def sample_rate(samples: int, batch_size: int) -> float:
    """Each record's chance to be in a batch."""
    return min(1.0, batch_size / samples)


def steps_for(samples: int, batch_size: int, epochs: int) -> int:
    """Steps in `epochs` passes: an epoch is as many steps as batches of `batch_size`
    cover the data (Opacus's count)."""
    return epochs * math.ceil(samples / batch_size)


class DpSgd:
    """The mechanism over one model's `parameters` (id -> tensor; they are trained in
    place) and one dataset (see the module docstring)."""

    def __init__(self, loss: PerExampleLoss, parameters: dict[int, torch.Tensor],
                 settings: DpSgdSettings, generator: torch.Generator) -> None:
        self.loss = loss
        self.settings = settings
        self.generator = generator
        self.parameters = {key: value.detach() for key, value in parameters.items()}
        tensors = list(self.parameters.values())
        self.optimizer: torch.optim.Optimizer = (
            torch.optim.SGD(tensors, lr=settings.lr) if settings.optimizer == "sgd"
            else torch.optim.Adam(tensors, lr=settings.lr))
        # vmap over examples of grad over the parameters: one gradient per example.
        self._per_example = torch.func.vmap(torch.func.grad(self._one), in_dims=(None, 0, 0))
        self._one_gradient = torch.func.grad(self._one)

    def _one(self, parameters: dict[int, torch.Tensor], x: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
        return self.loss(parameters, x.unsqueeze(0), y.unsqueeze(0))

    def check(self, data: torch.Tensor, target: torch.Tensor) -> None:
        """Compute per-example gradients of `data` (public examples), letting any failure
        through: whether the loss can run at all, asked before anything is spent."""
        self._per_example(self.parameters, data, target)

    def run(self, data: torch.Tensor, target: torch.Tensor) -> int:
        """Every step of `settings.epochs` epochs over `data`; how many ran."""
        steps = steps_for(len(data), self.settings.batch_size, self.settings.epochs)
        for _ in range(steps):
            self.step(data, target)
        return steps

    def step(self, data: torch.Tensor, target: torch.Tensor) -> None:
        settings = self.settings
        q = sample_rate(len(data), settings.batch_size)
        chosen = torch.rand(len(data), generator=self.generator) < q
        index = chosen.nonzero().flatten()
        gradients = self.per_example_gradients(data[index], target[index])
        summed = clipped_sum(gradients, settings.clip)
        std = settings.noise_multiplier * settings.clip
        for key, parameter in self.parameters.items():
            # Drawn even at std 0: the draws' order is the same whatever the settings.
            noise = torch.normal(0.0, std, parameter.shape, generator=self.generator,
                                 dtype=parameter.dtype)
            parameter.grad = (summed[key] + noise) / settings.batch_size
        self.optimizer.step()

    def per_example_gradients(self, data: torch.Tensor,
                              target: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each example's gradient (`[batch, *parameter.shape]` per parameter); an
        example whose gradient fails to compute gets NaN (then 0 when clipped)."""
        if len(data) == 0:
            return {k: p.new_zeros((0, *p.shape)) for k, p in self.parameters.items()}
        try:
            gradients: dict[int, torch.Tensor] = self._per_example(self.parameters, data,
                                                                    target)
        except Exception:  # values made it fail: one example at a time, then
            return self._one_by_one(data, target)
        return gradients

    def _one_by_one(self, data: torch.Tensor, target: torch.Tensor,
                    ) -> dict[int, torch.Tensor]:
        rows: list[dict[int, torch.Tensor]] = []
        for x, y in zip(data, target, strict=True):
            try:
                rows.append(self._one_gradient(self.parameters, x, y))
            except Exception:  # this example contributes nothing (NaN: then 0)
                rows.append({k: torch.full_like(p, math.nan)
                             for k, p in self.parameters.items()})
        return {k: torch.stack([row[k] for row in rows]) for k in self.parameters}


def clipped_sum(gradients: dict[int, torch.Tensor], clip: float) -> dict[int, torch.Tensor]:
    """The sum over examples of each example's gradient with non-finite entries 0, then
    scaled to an L2 norm (over all parameters together) of at most `clip`."""
    finite = {k: torch.where(torch.isfinite(g), g, torch.zeros((), dtype=g.dtype))
              for k, g in gradients.items()}
    if not finite:
        return {}
    squares = sum(g.reshape(len(g), -1).to(torch.float64).square().sum(1)
                  for g in finite.values())
    norms = torch.as_tensor(squares).sqrt()
    factor = (clip / (norms + CLIP_EPSILON)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", factor.to(g.dtype), g) for k, g in finite.items()}
