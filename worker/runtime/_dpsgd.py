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
import time
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

CHUNK_BYTES = 64 << 20
"""About the most memory per-example gradients take at once: a batch whose gradients
would take more is computed in chunks of examples (the same sum, bounded memory)."""


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
        self.size = sum(t.numel() for t in tensors)
        self.dtype = tensors[0].dtype if tensors else torch.float32
        # per example: its copy of the parameters, their gradient, the flat gradient
        self.chunk = max(1, CHUNK_BYTES // max(1, 3 * self.size * self.dtype.itemsize))
        # Each example's loss under vmap, with parameters of its own: vmap keeps examples
        # apart in the forward, and the backward of the losses' sum gives each copy of the
        # parameters its example's gradient alone. (The same as vmap of torch.func.grad,
        # with fewer operations in the backward: this is the step's main cost.)
        self._losses = torch.func.vmap(self._one, in_dims=(0, 0, 0))
        self._one_gradient = torch.func.grad(self._one)

    def _one(self, parameters: dict[int, torch.Tensor], x: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
        return self.loss(parameters, x.unsqueeze(0), y.unsqueeze(0))

    def check(self, data: torch.Tensor, target: torch.Tensor) -> None:
        """Compute per-example gradients of `data` (public examples), letting any failure
        through: whether the loss can run at all, asked before anything is spent."""
        self._per_example(data, target)

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
        index = chosen.nonzero().squeeze(1)
        summed: torch.Tensor | None = None
        for start in range(0, len(index), self.chunk):
            part = index[start : start + self.chunk]
            partial = clipped_sum(self.per_example_gradients(data.index_select(0, part),
                                                             target.index_select(0, part)),
                                  settings.clip)
            summed = partial if summed is None else summed + partial
        if summed is None:  # nobody sampled: the noise alone
            summed = torch.zeros(self.size, dtype=self.dtype)
        # One draw for every coordinate, drawn even at std 0: the same order whatever
        # the settings, which the reference in the tests repeats.
        noise = torch.normal(0.0, settings.noise_multiplier * settings.clip, (self.size,),
                             generator=self.generator, dtype=summed.dtype)
        gradient = (summed + noise) / settings.batch_size
        offset = 0
        for parameter in self.parameters.values():
            size = parameter.numel()
            parameter.grad = gradient[offset : offset + size].view_as(parameter)
            offset += size
        self.optimizer.step()

    def benign_seconds(self, data: torch.Tensor, target: torch.Tensor) -> float:
        """How long a whole run takes on public data (zeros of `data`'s and `target`'s
        shapes), on a copy of the parameters and a generator of its own: what a
        pacer's schedule for a run starts from."""
        copy = DpSgd(self.loss, {k: v.clone() for k, v in self.parameters.items()},
                     self.settings, torch.Generator().manual_seed(0))
        copy.chunk = self.chunk
        zeros = torch.zeros_like(data), torch.zeros_like(target)
        copy.step(*zeros)  # warms the kernels up
        started = time.perf_counter()
        copy.run(*zeros)
        return time.perf_counter() - started

    def per_example_gradients(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each example's gradient, every parameter's flattened in order (`[batch,
        size]`); an example whose gradient fails to compute gets NaN (then 0 when
        clipped)."""
        if len(data) == 0:
            return torch.zeros((0, self.size), dtype=self.dtype)
        try:
            return self._per_example(data, target)
        except Exception:  # values made it fail: one example at a time, then
            return self._one_by_one(data, target)

    def _per_example(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        count = len(data)
        copies = {key: p.unsqueeze(0).expand(count, *p.shape).clone().requires_grad_()
                  for key, p in self.parameters.items()}
        with torch.enable_grad():
            losses = self._losses(copies, data, target)
            if losses.shape != (count,):
                raise ValueError("the loss must be one number per example, not of shape "
                                 f"{list(losses.shape[1:])}")
            gradients = torch.autograd.grad(losses.sum(), list(copies.values()),
                                            allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(c)).reshape(count, -1)
                          for g, c in zip(gradients, copies.values(), strict=True)], 1)

    def _one_by_one(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rows: list[torch.Tensor] = []
        for x, y in zip(data, target, strict=True):
            try:
                gradient = self._one_gradient(self.parameters, x, y)
                rows.append(torch.cat([gradient[k].reshape(-1) for k in self.parameters]))
            except Exception:  # this example contributes nothing (NaN: then 0)
                rows.append(torch.full((self.size,), math.nan))
        return torch.stack(rows)


def clipped_sum(gradients: torch.Tensor, clip: float) -> torch.Tensor:
    """The sum over examples (rows) of each example's gradient with non-finite entries 0,
    then scaled to an L2 norm of at most `clip`. A norm too large for the dtype is inf,
    and its example contributes 0: bounded either way."""
    finite = torch.nan_to_num(gradients, nan=0.0, posinf=0.0, neginf=0.0)
    norms = torch.linalg.vector_norm(finite, dim=1)
    factor = (clip / (norms + CLIP_EPSILON)).clamp(max=1.0)
    summed: torch.Tensor = factor @ finite
    return summed
