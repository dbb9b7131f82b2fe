"""Secure aggregation's commands: an owner's steps of a round, and the aggregator's.

The protocol and an owner's state are `_secagg.py`'s; here its messages travel. The
client joins each owner to a round (`secagg_join`: the owner checks the client may
use the contribution, clips and weighs it, and spends it: it is never stored again
here, so it cannot be fetched, moved or joined to another round) and asks the
aggregator to run it (`secure_aggregate`). The aggregator drives the owners, one
step at a time (`secagg_share`, `secagg_mask`, `secagg_commit`, `secagg_unmask`);
owners meet each other directly (`secagg_introduce`, `secagg_shares`,
`secagg_view`), each trusting who sent a message only as the broker's validated
identity, the handler's `sender`. An owner answers a step only from its round's
aggregator, a peer's message only from an owner of the round, and a round id only
once. Every refusal is counted (`secagg_refused` in the worker's status).

The aggregator treats an owner that fails a step — gone, or refusing — as one
that dropped out: the round goes on while at least `threshold` owners remain, and
releases nothing otherwise.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Final, TypeVar

import torch

from torchrelay.broker import (
    Command,
    PrivateDataError,
    SecAggCommit,
    SecAggIntroduce,
    SecAggJoin,
    SecAggMask,
    SecAggShare,
    SecAggShares,
    SecAggUnmask,
    SecAggView,
    SecAggViewIs,
    SecureAggregate,
)

from .._aggregation import clipped
from .._privacy import BudgetSpent
from .._records import Gather
from .._secagg import OwnerRound, RoundRefused, RoundTerms, decode, unmask
from .._signing import KeyFileError, Pinning
from ._registry import handles

if TYPE_CHECKING:
    from .._runtime import WorkerRuntime

__all__ = ["secure_figures"]

log = logging.getLogger("torchrelay.worker")

MAX_OWNERS: Final = 1024
"""Owners one round may have (each step costs every owner a message per other)."""
KEPT_ROUNDS: Final = 64
"""Rounds an owner keeps the state of (older ones, unfinished, are dropped)."""
_NOTHING: Final = object()
MAX_ENTRIES: Final = 1 << 28
"""Entries a securely aggregated contribution may have (each costs 8 bytes a mask)."""


@dataclass(slots=True)
class _Rounds:
    """A worker's rounds: those under way, the ids seen, the refusals."""

    active: OrderedDict[str, tuple[OwnerRound, bool, bool]] = field(
        default_factory=OrderedDict)
    """Round id -> this owner's state, whether its contribution is charged to its budget
    (private, not DP already), and whether it derives from its private data at all."""
    seen: set[str] = field(default_factory=set)
    refused: int = 0
    pinning: Pinning | None = None
    """The worker's long-term key and its pinned peers' (`_signing.py`), once read."""
    trained: OrderedDict[int, Any] = field(default_factory=OrderedDict)
    """Models DP-SGD trained here and kept (unit record, secure aggregation only), by id:
    DP already, each joins a round as it is, neither clipped nor noised nor charged
    again. The value is kept beside its id: an id deleted and reused for other data is
    not the model any more (the last `KEPT_ROUNDS` are remembered)."""

    def get(self, round_id: str) -> tuple[OwnerRound, bool, bool]:
        found = self.active.get(round_id)
        if found is None:
            raise RoundRefused(f"no secure aggregation round {round_id} under way here")
        return found

    def as_aggregator(self, round_id: str, sender: str) -> tuple[OwnerRound, bool, bool]:
        found = self.get(round_id)
        if sender != found[0].terms.aggregator:
            raise RoundRefused(f"{sender!r} is not the aggregator of round {round_id}")
        return found

    def first_time(self, round_id: str) -> None:
        if round_id in self.seen:
            raise RoundRefused(f"round {round_id} was seen already: a replayed round")
        self.seen.add(round_id)


_ROUNDS: weakref.WeakKeyDictionary[WorkerRuntime, _Rounds] = weakref.WeakKeyDictionary()


def _rounds(worker: WorkerRuntime) -> _Rounds:
    rounds = _ROUNDS.get(worker)
    if rounds is None:
        rounds = _ROUNDS[worker] = _Rounds()
    return rounds


def _pinning(worker: WorkerRuntime, rounds: _Rounds) -> Pinning | None:
    """The worker's keys, read once (a daemon's config checked them at start)."""
    policy = worker.privacy
    if rounds.pinning is None and (policy.signing_key, policy.peer_keys) != (None, None):
        try:
            rounds.pinning = policy.pinning(worker.id)
        except KeyFileError as e:
            raise RoundRefused(f"{worker.id!r} cannot take part: {e}") from None
    return rounds.pinning


def trained_by_dp_sgd(worker: WorkerRuntime, object_id: int) -> None:
    """`object_id` is a model `dp_train` trained here and kept (see `_Rounds.trained`)."""
    trained = _rounds(worker).trained
    trained[object_id] = worker.store.get(object_id).value
    while len(trained) > KEPT_ROUNDS:
        trained.popitem(last=False)


def secure_figures(worker: WorkerRuntime) -> dict[str, Any]:
    """What a worker's status says of secure aggregation (nothing until it took part)."""
    rounds = _ROUNDS.get(worker)
    return {} if rounds is None else {"secagg_refused": rounds.refused,
                                      "secagg_rounds": len(rounds.seen)}


H = TypeVar("H", bound=Callable[..., Any])


def _counted(handler: H) -> H:
    """Count the handler's refusals, and send them as `PrivateDataError`s (a client or
    an aggregator sees a refusal as such, whatever its class here)."""

    def refused(worker: WorkerRuntime, command: Command, sender: str,
                error: RoundRefused) -> PrivateDataError:
        _rounds(worker).refused += 1
        log.warning("secure aggregation: refused %s from %r: %s", command.describe(),
                    sender[:100], error)
        return PrivateDataError(str(error))

    async def waiting(worker: WorkerRuntime, command: Command, sender: str,
                      outcome: Any) -> Any:
        try:
            return await outcome
        except RoundRefused as e:
            raise refused(worker, command, sender, e) from None

    @functools.wraps(handler)
    def run(worker: WorkerRuntime, command: Command, sender: str) -> Any:
        try:
            outcome = handler(worker, command, sender)
        except RoundRefused as e:
            raise refused(worker, command, sender, e) from None
        if type(outcome) is CoroutineType:
            return waiting(worker, command, sender, outcome)
        return outcome

    return run  # type: ignore[return-value]


# -- an owner's steps -----------------------------------------------------------------


@handles(SecAggJoin)
@_counted
def join(worker: WorkerRuntime, command: SecAggJoin, sender: str) -> dict[str, Any]:
    rounds = _rounds(worker)
    if command.round_id in rounds.seen:  # before anything else is looked at
        raise RoundRefused(f"round {command.round_id} was seen already: a replayed round")
    if not 1 <= len(command.participants) <= MAX_OWNERS:
        raise RoundRefused(f"a round has 1 to {MAX_OWNERS} owners")
    if len(command.weights) != len(command.participants) or not all(
            w > 0 for w in command.weights):
        raise RoundRefused("a round needs a positive weight for each owner")
    entries = [worker.store.use(i, sender) for i in command.contribution]
    tensors = [t for e in entries for t in (e.value if type(e.value) is tuple else (e.value,))]
    if not tensors or not all(isinstance(t, torch.Tensor) and t.is_floating_point()
                              for t in tensors):
        raise RoundRefused("a contribution is floating-point tensors")
    owners = frozenset().union(*(worker.store.owners(e) for e in entries))
    if owners - {worker.id}:
        raise RoundRefused(f"the contribution derives from private data of "
                           f"{', '.join(sorted(owners - {worker.id}))}: an owner joins a "
                           "round with its own data only")
    owned = bool(owners)
    # A model DP-SGD trained here is DP already (unit record): summed as it is.
    private = owned and not all(
        rounds.trained.get(i, _NOTHING) is e.value
        for i, e in zip(command.contribution, entries, strict=True))
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    if flat.numel() > MAX_ENTRIES:
        raise RoundRefused(f"a contribution of more than {MAX_ENTRIES} entries")
    total = math.fsum(command.weights)
    terms = RoundTerms(command.round_id, command.aggregator, tuple(command.participants),
                       command.threshold, tuple(w / total for w in command.weights),
                       flat.numel())
    policy = worker.privacy
    terms.check(worker.id, policy.threshold if owned else None, policy.k if owned else 1)
    weight = terms.weights[terms.point(worker.id) - 1]
    sigma = 0.0
    if private:
        try:
            worker.budget.check(worker.id)  # no round it could not afford to finish
        except BudgetSpent as e:
            raise RoundRefused(f"{e}: it contributes no more") from None
        flat = clipped(flat, policy.clip)
        sigma = policy.noise_multiplier * weight * policy.clip
    rounds.first_time(command.round_id)
    state = OwnerRound(worker.id, terms, flat * weight, sigma, _pinning(worker, rounds))
    for object_id in command.contribution:  # spent: in this round and no other
        worker.store.discard(object_id)
        rounds.trained.pop(object_id, None)
    rounds.active[command.round_id] = (state, private, owned)
    while len(rounds.active) > KEPT_ROUNDS:
        rounds.active.popitem(last=False)
    # Its shapes, which the client needs for the aggregator: told here, not asked apart.
    return {"digest": terms.digest(), "shapes": [list(t.shape) for t in tensors]}


@handles(SecAggShare)
@_counted
async def share(worker: WorkerRuntime, command: SecAggShare, sender: str) -> list[str]:
    state, *_ = _rounds(worker).as_aggregator(command.round_id, sender)
    if worker.id not in command.ready or not set(command.ready) <= set(
            state.terms.participants):
        raise RoundRefused("the owners ready must be of the round, this owner among them")
    if len(set(command.ready)) < state.terms.threshold:
        raise RoundRefused(f"only {len(set(command.ready))} owners are ready, fewer than "
                           f"the threshold {state.terms.threshold}: nothing is released")
    # Every peer the aggregator still counts on, at once: introductions first (each
    # answer carries the peer's shares for this owner), then this owner's shares to
    # those that did not get them in an introduction of their own.
    peers = [p for p in state.terms.participants if p != worker.id and p in command.ready]
    strangers = [p for p in peers if not state.knows(p)]
    answers = await _each(worker, strangers, lambda _: SecAggIntroduce(
        command.round_id, **state.introduction()))
    for peer, answer in answers.items():
        if not isinstance(answer, dict) or set(answer) != {
                "digest", "c_public", "s_public", "sigma", "signature", "sealed"}:
            raise RoundRefused(f"{peer!r} answered its introduction with something else")
        sealed = str(answer.pop("sealed"))
        state.meet(peer, **answer)
        state.receive(peer, sealed)
    unsent = [p for p in peers if state.knows(p) and p not in state.sent]
    delivered = await _each(worker, unsent, lambda peer: SecAggShares(
        command.round_id, state.sealed_for(peer)))
    return [p for p in peers if state.knows(p) and (p in delivered or p not in unsent)]


@handles(SecAggIntroduce)
@_counted
def introduce(worker: WorkerRuntime, command: SecAggIntroduce, sender: str) -> dict[str, Any]:
    state, *_ = _rounds(worker).get(command.round_id)
    state.meet(sender, command.digest, command.c_public, command.s_public, command.sigma,
               signature=command.signature)
    return {**state.introduction(), "sealed": state.sealed_for(sender)}


@handles(SecAggShares)
@_counted
def receive_shares(worker: WorkerRuntime, command: SecAggShares, sender: str) -> None:
    state, *_ = _rounds(worker).get(command.round_id)
    state.receive(sender, command.sealed)


@handles(SecAggMask)
@_counted
def mask(worker: WorkerRuntime, command: SecAggMask, sender: str) -> dict[str, Any]:
    state, private, owned = _rounds(worker).as_aggregator(command.round_id, sender)
    if owned and len(command.shared) < worker.privacy.k:
        raise RoundRefused(f"{worker.id!r}'s data is released only in aggregates of at "
                           f"least {worker.privacy.k} data owners; {len(command.shared)} "
                           "shared")
    masked = state.masked(command.shared)
    report: dict[str, Any] = {"masked": masked,
                              "s_public": state.peers[worker.id].s_public.hex(),
                              "noise_std": state.noise_std * math.sqrt(
                                  state.terms.threshold)}
    if private:  # charged before the masked input leaves
        policy = worker.privacy
        try:
            report["epsilon"] = worker.budget.charge(worker.id)
        except BudgetSpent as e:
            raise RoundRefused(str(e)) from None
        report["delta"] = policy.delta
    return report


@handles(SecAggCommit)
@_counted
def commit(worker: WorkerRuntime, command: SecAggCommit, sender: str) -> None:
    state, _, owned = _rounds(worker).as_aggregator(command.round_id, sender)
    if owned and len(command.survivors) < worker.privacy.k:  # the sum covers only them
        raise RoundRefused(f"{worker.id!r}'s data is released only in aggregates of at "
                           f"least {worker.privacy.k} data owners; {len(command.survivors)} "
                           "survived")
    state.commit(command.survivors)
    view = SecAggViewIs(command.round_id, *state.signed_view())
    for peer in command.survivors:  # told now, so that unmasking need not ask
        if peer != worker.id:
            worker.tell(peer, view)


@handles(SecAggViewIs)
@_counted
def view_is(worker: WorkerRuntime, command: SecAggViewIs, sender: str) -> None:
    state, *_ = _rounds(worker).get(command.round_id)
    state.hear(sender, command.digest, command.signature)


@handles(SecAggView)
@_counted
def view(worker: WorkerRuntime, command: SecAggView, sender: str) -> dict[str, str | None]:
    state, *_ = _rounds(worker).get(command.round_id)
    # Any other owner may ask: one told other survivors than this one must hear the
    # difference, not a refusal it could take for a dropout.
    if sender == worker.id or sender not in state.terms.participants:
        raise RoundRefused(f"{sender!r} is not an other owner of round {command.round_id}")
    digest, signature = state.signed_view()
    return {"view": digest, "signature": signature}


@handles(SecAggUnmask)
@_counted
async def reveal(worker: WorkerRuntime, command: SecAggUnmask,
                 sender: str) -> dict[str, list[Any]]:
    rounds = _rounds(worker)
    state, *_ = rounds.as_aggregator(command.round_id, sender)
    if state.survivors is None:
        raise RoundRefused(f"round {command.round_id}: no survivors named yet")
    # What the others were told: pushed by each when told (`view_is`); asked of those
    # whose word has not come yet.
    asked = await _each(worker, [p for p in state.survivors
                                 if p != worker.id and p not in state.views],
                        lambda _: SecAggView(command.round_id))
    for peer, answer in asked.items():
        if isinstance(answer, dict) and set(answer) == {"view", "signature"}:
            signature = answer["signature"]
            state.hear(peer, str(answer["view"]), None if signature is None else str(signature))
    return state.reveal({p: d for p, d in state.views.items() if p in state.survivors})


# -- the aggregator's --------------------------------------------------------------------


@handles(SecureAggregate)
@_counted
async def secure_aggregate(worker: WorkerRuntime, command: SecureAggregate,
                           sender: str) -> dict[str, Any]:
    owners = command.participants
    t = command.threshold
    if not 1 <= len(owners) <= MAX_OWNERS or list(owners) != sorted(set(owners)):
        raise RoundRefused(f"a round's owners are 1 to {MAX_OWNERS} distinct names, sorted")
    if worker.id in owners:
        raise RoundRefused("the aggregator of a secure round is none of its owners")
    if len(command.weights) != len(owners) or not all(w > 0 for w in command.weights):
        raise RoundRefused("a round needs a positive weight for each owner")
    if not 1 <= t <= len(owners):
        raise RoundRefused(f"a threshold of {t} for {len(owners)} owners")
    length = sum(math.prod(shape) for shape in command.shapes)
    if not 0 < length <= MAX_ENTRIES:
        raise RoundRefused(f"a contribution has 1 to {MAX_ENTRIES} entries")
    _rounds(worker).first_time(command.round_id)
    round_id = command.round_id

    def abort(step: str, left: list[str]) -> RoundRefused:
        return RoundRefused(f"secure aggregation round {round_id} aborted: only {len(left)} "
                            f"owners {step}, fewer than the threshold {t}; nothing is "
                            "released")

    # Every owner shares at once; one gone costs each a wait for it at the same time.
    ready = list(owners)
    reached = {u: set(answer) for u, answer in (await _each(
        worker, ready, lambda _: SecAggShare(round_id, ready))).items()
        if isinstance(answer, list)}
    shared = sorted(_complete(reached))
    if len(shared) < t:
        raise abort("shared their keys", shared)
    inputs: dict[str, torch.Tensor] = {}
    publics: dict[str, bytes] = {}
    report: dict[str, Any] = {"epsilon": {}, "delta": {}, "noise_std": 0.0}
    answers = await _each(worker, shared, lambda _: SecAggMask(round_id, shared))
    for u, answer in answers.items():
        masked = answer.get("masked") if isinstance(answer, dict) else None
        if not (isinstance(masked, torch.Tensor) and masked.dtype == torch.int64
                and masked.shape == (length,)):
            continue
        assert isinstance(answer, dict)
        try:
            publics[u] = bytes.fromhex(str(answer["s_public"]))
        except (KeyError, ValueError):
            continue
        inputs[u] = masked
        if "epsilon" in answer:
            report["epsilon"][u] = float(answer["epsilon"])
            report["delta"][u] = float(answer["delta"])
        report["noise_std"] = max(report["noise_std"], float(answer.get("noise_std", 0.0)))
    survivors = sorted(inputs)
    if len(survivors) < t:
        raise abort("sent masked inputs", survivors)
    await _each(worker, survivors, lambda _: SecAggCommit(round_id, survivors))
    revealed = [answer for answer in (await _each(
        worker, survivors, lambda _: SecAggUnmask(round_id))).values()
        if isinstance(answer, dict)]
    total = torch.stack([inputs[u] for u in survivors]).sum(0)
    try:
        encoded = unmask(total, _terms(command), shared=shared, survivors=survivors,
                         s_publics=publics, revealed=revealed)
    except (ValueError, KeyError, TypeError) as e:
        raise RoundRefused(f"secure aggregation round {round_id} aborted: the shares "
                           f"revealed do not unmask the sum ({e}); nothing is released"
                           ) from None
    weights = dict(zip(owners, command.weights, strict=True))
    total_weight = math.fsum(command.weights)
    kept = math.fsum(weights[u] for u in survivors) / total_weight
    average = decode(encoded) / kept
    parts, offset = [], 0
    for shape in command.shapes:
        size = math.prod(shape)
        parts.append(average[offset: offset + size].view(*shape).to(torch.float32))
        offset += size
    value = parts[0] if len(parts) == 1 else tuple(parts)
    worker.store.put(command.result_id, value, frozenset(), frozenset({sender}))
    # The average is public, and the asker's: it comes back with the report (no fetch
    # after), and stays here under `result_id` for whoever holds the pointer.
    return {**report, "survivors": survivors, "average": value,
            "dropped": sorted(set(owners) - set(survivors))}


def _terms(command: SecureAggregate) -> RoundTerms:
    total = math.fsum(command.weights)
    return RoundTerms(command.round_id, "", tuple(command.participants), command.threshold,
                      tuple(w / total for w in command.weights),
                      sum(math.prod(shape) for shape in command.shapes))


def _complete(reached: dict[str, set[str]]) -> set[str]:
    """The owners that swapped shares with every other one kept (each says whom it
    reached): the owner that reached fewest of the others goes first — one told other
    terms (that every other refused) costs only itself its place."""
    kept = set(reached)
    while True:
        lacking = [u for u in kept if not kept - {u} <= reached[u]]
        if not lacking:
            return kept
        kept.discard(min(lacking, key=lambda u: (len(reached[u] & kept), u)))


async def _each(worker: WorkerRuntime, owners: list[str],
                make: Callable[[str], Command]) -> dict[str, Any]:
    """Each owner's answer to its command, all asked at once; those gone or refusing
    are left out (they drop out of the round)."""
    outcomes = await Gather([worker.ask(owner, make(owner)) for owner in owners])
    answers = {}
    for owner, outcome in zip(owners, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            log.info("secure aggregation: %s left out: %s", owner, outcome)
        else:
            answers[owner] = outcome
    return answers
