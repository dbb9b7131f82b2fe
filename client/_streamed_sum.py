"""A weighted sum of the owners' models on the aggregator, streamed piece by piece.

A model of hundreds of megabytes must not be held once per owner anywhere. So a
public FedAvg round never flattens a model into one new tensor: each owner's
trained tensors stay where training left them (views of its model's parameters,
no copy), cut into pieces of at most `WAVE_BYTES` (views again), and the pieces
move to the aggregator in waves of about `WAVE_BYTES` per owner. The aggregator
folds each wave into a running sum at once — the first owner's pieces, scaled in
place, become the sum; the others are scaled in place, added, and deleted in the
same batch — so it holds the sum and about two waves of each owner, never an
owner's whole model (nor a whole layer of it) beside the sum. The client waits for
a wave to land before it sends the next one's additions (`Fleet.post` waits for
what a command uses to arrive), which paces the owners' transfers by the
aggregator's progress; the sum comes back wave by wave too, each piece written
straight into its place in the caller's tensors.

The arithmetic is the one a local loop does, `0 + x_1 * w_1 + x_2 * w_2 + ...`
in float32, operation by operation and element by element: the sum is the same
to the bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import torch

from torchrelay.broker import Delete, Fetch

from ._handles import WorkerHandle
from ._pointer import PointerTensor

__all__ = ["WAVE_BYTES", "Piece", "Sum", "pieces", "streamed_sum", "waves"]

WAVE_BYTES: Final = 16 << 20
"""About how much of each owner's model is on its way to the aggregator at once (and
the largest piece): two chunks of the broker's, a few percent of a wave's time lost
between waves to the client's round trip."""


@dataclass(frozen=True, slots=True)
class Piece:
    """Elements `start:stop` of the flattened tensor at `tensor`."""

    tensor: int
    start: int
    stop: int


def pieces(numels: Sequence[int], most: int) -> list[Piece]:
    """The tensors of `numels` elements cut, in order, into pieces of at most `most`."""
    return [Piece(position, start, min(start + most, numel))
            for position, numel in enumerate(numels)
            for start in range(0, max(numel, 1), most)]


def waves(sizes: Sequence[int], wave_bytes: int | None = None) -> list[list[int]]:
    """Positions in `sizes` (bytes) grouped in order, each group `wave_bytes` or more
    in all but the last (default `WAVE_BYTES`)."""
    wave_bytes = WAVE_BYTES if wave_bytes is None else wave_bytes
    groups: list[list[int]] = [[]]
    held = 0
    for position, size in enumerate(sizes):
        if held >= wave_bytes:
            groups.append([])
            held = 0
        groups[-1].append(position)
        held += size
    return [g for g in groups if g]


@dataclass(frozen=True, slots=True)
class Sum:
    """A sum on the aggregator: each piece's pointer there."""

    cut: list[Piece]
    total: list[PointerTensor]

    def fetch_into(self, into: Sequence[torch.Tensor]) -> None:
        """Bring the sum back wave by wave, each piece written into its place in `into`
        (the tensors `streamed_sum` was given the sizes of)."""
        if not self.total:
            return
        fleet = self.total[0].fleet
        aggregator = self.total[0].location.id
        for wave in waves([4 * (p.stop - p.start) for p in self.cut]):
            values = fleet.request_many([(aggregator, Fetch(self.total[i].id_at_location))
                                         for i in wave])
            for position, value in zip(wave, values, strict=True):
                self.total[position].garbage_collect = False  # fetched: gone from there
                piece = self.cut[position]
                with torch.no_grad():
                    into[piece.tensor].view(-1)[piece.start : piece.stop].copy_(value)


def streamed_sum(
    aggregator: WorkerHandle,
    contributions: dict[str, list[PointerTensor]],
    weights: dict[str, float],
    numels: Sequence[int],
) -> Sum:
    """`sum_w weights[w] * contributions[w][i]` for every i, computed on `aggregator`
    and left there. Contributions are one-dimensional float32 pointers of `numels[i]`
    elements; they are moved piece by piece and deleted once added. Raises the first
    `TorchRelayError` (a move that failed): nothing of the sum is returned then."""
    fleet = aggregator.fleet
    cut = pieces(numels, WAVE_BYTES // 4)
    whole = {p.tensor for p in cut if p.start == 0 and p.stop == numels[p.tensor]}
    total: list[PointerTensor] = []
    for wave in waves([4 * (p.stop - p.start) for p in cut]):
        arriving = {}
        for worker, tensors in contributions.items():
            parts = [tensors[cut[i].tensor] if cut[i].tensor in whole
                     else tensors[cut[i].tensor][cut[i].start : cut[i].stop] for i in wave]
            arriving[worker] = [part.move_later(aggregator) for part in parts]
        for worker, moved in arriving.items():
            done: list[int] = []
            for position, update in zip(wave, moved, strict=True):
                update.mul_(weights[worker])  # (a separate product: the local loop's rounding)
                if position == len(total):
                    total.append(update)  # the first owner's, scaled: the sum so far
                else:
                    total[position].add_(update)
                    update.garbage_collect = False
                    done.append(update.id_at_location)
            if done:  # deleted in the same batch as the additions, not a wave later
                fleet.post(aggregator.id, Delete(done))
    fleet.sync()  # every addition done: the sum is whole
    return Sum(cut, total)
