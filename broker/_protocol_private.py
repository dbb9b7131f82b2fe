"""The commands by which private data leaves its owner: aggregates, DP training, secure
aggregation (their handlers: `worker/runtime/_commands/` privacy, training, secure).

Declared as every command is (`_protocol.py`): each class with `@command(name)`,
its fields the schema. `_protocol.py` imports this module once it has declared
its own, so every command is known to `decode_command` whichever is imported first.
"""

from __future__ import annotations

from typing import Annotated

from ._protocol import (
    Command,
    Dimension,
    HexText,
    ObjectId,
    OptimizerName,
    RoundId,
    Signature,
    WorkerId,
    command,
)
from ._schema import Range

__all__ = [
    "Aggregate",
    "ChargePrivacy",
    "DpTrain",
    "SecAggCommit",
    "SecAggIntroduce",
    "SecAggJoin",
    "SecAggMask",
    "SecAggShare",
    "SecAggShares",
    "SecAggUnmask",
    "SecAggView",
    "SecAggViewIs",
    "SecureAggregate",
]


@command("aggregate")
class Aggregate(Command):
    """Release the weighted average of `contributions` (each a list of tensor ids, all
    of the same shapes: a tensor, or a model's tensors) under `result_id`. If any
    derives from private data, each must derive from one data owner's, no two from
    the same, and the release is differentially private: each clipped to its owner's
    bound, Gaussian noise added, each owner's budget charged (`charge_privacy`).
    The contributions are spent. Returns what each owner's budget now shows."""

    contributions: list[list[ObjectId]]
    weights: list[float]
    result_id: ObjectId

    def describe(self) -> str:
        return f"aggregate {len(self.contributions)} contributions"


@command("charge_privacy")
class ChargePrivacy(Command):
    """From a worker about to release an aggregate holding one contribution of the
    receiver's private data among `contributors`: charge that release to the
    receiver's privacy budget (refused if it is not trusted, if `contributors` is
    fewer than the receiver's `k`, or if the budget would be exceeded), and answer
    the receiver's privacy policy and the epsilon spent."""

    contributors: Annotated[int, Range(1, 1 << 20)]

    def describe(self) -> str:
        return "charge a release to the privacy budget"


@command("dp_train")
class DpTrain(Command):
    """Train a model on the receiver's dataset `dataset` with DP-SGD run by the
    receiver (record-level privacy: Poisson sampling at `batch_size / n`, per-example
    gradients of the plan `loss` clipped to the owner's bound, Gaussian noise of
    `noise_multiplier` (the owner's least if nil) times it, each step charged to the
    owner's budget before any runs). `loss` is a plan of one example's loss: its
    parameters are the example's input and target, as a batch of one, then the
    model's `trained` tensors in the order given. `tensors` are every floating-point
    tensor of the model, in the order the release keeps them, under `result_id`; it
    is released by the owner. `seed` fixes the worker's randomness: accepted only by
    a worker started for the test suite. Returns the owner's ε spent and the run."""

    loss: ObjectId
    dataset: ObjectId
    tensors: list[ObjectId]
    trained: list[ObjectId]
    result_id: ObjectId
    optimizer: OptimizerName
    lr: float
    batch_size: Annotated[int, Range(1, 1 << 31)]
    epochs: Annotated[int, Range(1, 100_000)]
    noise_multiplier: float | None = None
    seed: Annotated[int, Range(0, (1 << 63) - 1)] | None = None

    def describe(self) -> str:
        return "train with DP-SGD"


# Secure aggregation (`worker/runtime/_secagg.py`): the client's join to each owner and
# its `secure_aggregate` to the aggregator, the aggregator's steps to each owner, and
# what owners say to each other directly (the broker vouches for who sent it).


@command("secure_aggregate")
class SecureAggregate(Command):
    """To the aggregator: run secure aggregation round `round_id` among `participants`
    (sorted; each joined it already, with the same terms), and keep the weighted
    average of the survivors' contributions — tensors of `shapes` — under
    `result_id`. Nothing is released if fewer than `threshold` survive. Returns who
    took part, who dropped out, and each owner's epsilon."""

    round_id: RoundId
    participants: list[WorkerId]
    threshold: Annotated[int, Range(1, 1 << 16)]
    weights: list[float]
    shapes: list[list[Dimension]]
    result_id: ObjectId

    def describe(self) -> str:
        return f"secure aggregate of {len(self.participants)} owners"


@command("secagg_join")
class SecAggJoin(Command):
    """To an owner: take part in round `round_id` with the tensors `contribution` (the
    sender's to use), on these terms (`secure_aggregate`'s): clip and weigh them, make
    this round's keys and secrets. Refused for a round already seen."""

    round_id: RoundId
    aggregator: WorkerId
    participants: list[WorkerId]
    threshold: Annotated[int, Range(1, 1 << 16)]
    weights: list[float]
    contribution: list[ObjectId]

    def describe(self) -> str:
        return "join a secure aggregation round"


@command("secagg_share")
class SecAggShare(Command):
    """From the round's aggregator: meet the round's other owners of `ready` (those
    the aggregator still counts on) and send each its shares of this owner's secrets.
    Returns the owners reached."""

    round_id: RoundId
    ready: list[WorkerId]


@command("secagg_introduce")
class SecAggIntroduce(Command):
    """From an owner of the round to another: its public keys, the noise it needs and
    the digest of the terms it was told, signed by its long-term key when owners pin
    theirs. Answered with the receiver's."""

    round_id: RoundId
    digest: HexText
    c_public: HexText
    s_public: HexText
    sigma: float
    signature: Signature | None = None


@command("secagg_shares")
class SecAggShares(Command):
    """From an owner of the round to another: the receiver's shares of the sender's
    secrets, encrypted to the receiver."""

    round_id: RoundId
    sealed: HexText


@command("secagg_mask")
class SecAggMask(Command):
    """From the round's aggregator: send the masked input, `shared` being the owners
    that shared their secrets. Charges the owner's budget first."""

    round_id: RoundId
    shared: list[WorkerId]


@command("secagg_commit")
class SecAggCommit(Command):
    """From the round's aggregator: `survivors` sent masked inputs (told once)."""

    round_id: RoundId
    survivors: list[WorkerId]


@command("secagg_view")
class SecAggView(Command):
    """From an owner of the round to another: the digest of what the receiver was told."""

    round_id: RoundId


@command("secagg_view_is")
class SecAggViewIs(Command):
    """From an owner of the round to another, once told the survivors: the digest of
    what it was told (so that the receiver, unmasking, need not ask), signed as an
    introduction is."""

    round_id: RoundId
    digest: HexText
    signature: Signature | None = None


@command("secagg_unmask")
class SecAggUnmask(Command):
    """From the round's aggregator: reveal the shares that unmask the survivors' sum,
    once the other survivors confirm they were told the same."""

    round_id: RoundId
