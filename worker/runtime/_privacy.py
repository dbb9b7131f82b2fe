"""What a data owner's worker lets leave: nothing private, except releases with DP.

A worker's datasets are private to it unless its config says otherwise. Every
object records the set of data owners whose private data it derives from — its
*owners* — assigned by the worker, never taken from a client: the union over an
operation's inputs, and, for operations that change their inputs (in-place
operations, `backward` writing gradients, an optimizer's step), written into
what they changed. Owners are kept per tensor storage as well as per object, so
a view, a `.data` alias or a parameter updated in place carries them too.

An object with owners may be used by allow-listed operations (their results
have owners too), may move only to a worker every one of its owners trusts, and
never leaves otherwise: no `get`, no values in `_objects`, no values in error
messages. The one way out is `aggregate` on a trusted worker: contributions from
at least `k` distinct owners, each clipped to its owner's L2 bound, summed with
Gaussian noise calibrated to the largest of the owners' `clip x noise_multiplier`
(weighted), each release charged to every contributing owner's (ε, δ) budget,
which the owner's own worker keeps and accounts with Google's `dp-accounting`
RDP accountant. An owner whose budget would be exceeded refuses.

The unit the guarantee protects is the owner's choice. `unit = "owner"` (the
default): every release protects the owner's whole dataset, and aggregates are
the way out. `unit = "record"`: the budget protects each record of the owner's
datasets, and the way out is also `dp_train` — DP-SGD the owner's worker runs
itself (`_dpsgd.py`), every step a Poisson-sampled Gaussian mechanism on
per-example gradients clipped to `clip`, with noise at least `noise_multiplier`.
An aggregate's release, which bounds a whole owner's contribution, bounds each
of its records too: both kinds of release are composed in one ledger.

    [worker.privacy]
    unit = "owner"             # or "record": what epsilon protects (see above)
    k = 2                      # distinct data owners an aggregate needs, at least
    clip = 1.0                 # L2 bound of one contribution
    noise_multiplier = 1.0     # Gaussian noise std / clip
    epsilon = 10.0             # the (epsilon, delta) budget all releases share
    delta = 1e-5
    trusted = ["secure_worker"]  # workers private data may move to (to be aggregated)
    release_scalars = false    # let scalars (a loss) leave as they are: a channel that
                               # leaks data, off unless the owner opts in
    ledger = "bob.privacy.json"  # where releases are recorded, so a restart does not
                               # reset the budget (default: under $XDG_STATE_HOME)
    secure_aggregation = false # true: its data leaves only in secure aggregates (no
                               # aggregator sees its contribution; `_secagg.py`)
    threshold = 3              # the least Shamir threshold of a secure round it joins
                               # (default: a majority of the round's owners)
    signing_key = "bob.key"    # secure aggregation through a broker not trusted: its
                               # Ed25519 key (`torchrelay keygen`), signing its round keys
    [worker.privacy.peer_keys] # ... and the other owners' public keys: it joins rounds
    alice = "q0T5...base64="   # only with them, and believes only what they signed
                               # (`_signing.py`)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._signing import KeyFileError, Pinning

__all__ = ["UNITS", "BudgetSpent", "PrivacyBudget", "PrivacyError", "PrivacyPolicy",
           "default_ledger", "epsilon_of", "least_noise"]

UNITS = ("owner", "record")
"""What a budget protects: an owner's whole data, or each of its records."""


class PrivacyError(ValueError):
    """A `[worker.privacy]` table that is wrong; the message names the setting."""


@dataclass(frozen=True, slots=True)
class PrivacyPolicy:
    """A data owner's rules (see the module docstring)."""

    k: int = 2
    clip: float = 1.0
    """L2 bound of one contribution (unit owner) or of one example's gradient (record)."""
    noise_multiplier: float = 1.0
    epsilon: float = 10.0
    delta: float = 1e-5
    trusted: tuple[str, ...] = ()
    release_scalars: bool = False
    ledger: str | None = None
    unit: str = "owner"
    secure_aggregation: bool = False
    """Release only in secure aggregates: no aggregator, trusted or not, sees this
    owner's contribution (`_secagg.py`)."""
    threshold: int | None = None
    """The least threshold of a secure round this owner joins (None: a majority)."""
    signing_key: str | None = None
    """This owner's long-term Ed25519 private key, a PEM file: it signs its keys in every
    secure round (`_signing.py`)."""
    peer_keys: tuple[tuple[str, str], ...] | None = None
    """Other owners' pinned Ed25519 public keys (base64), by worker id: a secure round
    with an owner not listed is refused, and a key message is believed only signed by
    its sender's key (None: the broker's `user_id` is believed). Pairs, sorted: a
    frozen policy holds no dict."""

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise PrivacyError(f"privacy unit must be one of {', '.join(map(repr, UNITS))}, "
                               f"not {self.unit!r}")
        if not (type(self.k) is int and self.k >= 1):
            raise PrivacyError(f"privacy k must be a whole number from 1, not {self.k!r}")
        for name in ("clip", "epsilon"):
            value = getattr(self, name)
            if not (_number(value) and value > 0 and math.isfinite(value)):
                raise PrivacyError(f"privacy {name} must be a positive number, not {value!r}")
        if not (_number(self.noise_multiplier) and self.noise_multiplier >= 0
                and math.isfinite(self.noise_multiplier)):
            raise PrivacyError("privacy noise_multiplier must be a number from 0, not "
                               f"{self.noise_multiplier!r}")
        if not (_number(self.delta) and 0 < self.delta < 1):
            raise PrivacyError(f"privacy delta must be between 0 and 1, not {self.delta!r}")
        if not all(isinstance(t, str) and t for t in self.trusted):
            raise PrivacyError("privacy trusted must be a list of worker ids")
        if type(self.release_scalars) is not bool:
            raise PrivacyError("privacy release_scalars must be true or false")
        if self.ledger is not None and not (isinstance(self.ledger, str) and self.ledger):
            raise PrivacyError("privacy ledger must be a file path")
        if type(self.secure_aggregation) is not bool:
            raise PrivacyError("privacy secure_aggregation must be true or false")
        if self.threshold is not None and not (type(self.threshold) is int
                                               and self.threshold >= 2):
            raise PrivacyError("privacy threshold must be a whole number from 2, not "
                               f"{self.threshold!r}")
        if self.signing_key is not None and not (isinstance(self.signing_key, str)
                                                 and self.signing_key):
            raise PrivacyError("privacy signing_key must be a key file's path")
        if self.peer_keys is not None and not all(
                isinstance(name, str) and name for name, _ in self.peer_keys):
            raise PrivacyError("privacy peer_keys is a table of worker ids and public keys")
        if self.signing_key is not None or self.peer_keys is not None:
            try:  # a key that cannot be used is said at start, not at a round
                self.pinning(None)
            except KeyFileError as e:
                raise PrivacyError(f"privacy {e}") from None

    def pinning(self, me: str | None) -> Pinning:
        """The keys of `signing_key` and `peer_keys`, read (`me`: the worker's id, whose
        own entry in `peer_keys`, if any, must be its key's)."""
        return Pinning.of(me or "", self.signing_key,
                          None if self.peer_keys is None else dict(self.peer_keys))

    @classmethod
    def of(cls, table: dict[str, Any]) -> PrivacyPolicy:
        """From a config's `[worker.privacy]` table (or its JSON form)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(table) - known)
        if unknown:
            raise PrivacyError(f"[worker.privacy] takes {sorted(known)}, not {unknown}")
        values = dict(table)
        if "trusted" in values:
            trusted = values["trusted"]
            if not isinstance(trusted, list | tuple):
                raise PrivacyError("privacy trusted must be a list of worker ids")
            values["trusted"] = tuple(trusted)
        if values.get("peer_keys") is not None:
            # A TOML table (a dict), or its JSON form after `asdict` (a list of pairs).
            pinned = values["peer_keys"]
            pairs = pinned.items() if isinstance(pinned, dict) else pinned
            try:
                values["peer_keys"] = tuple(sorted((name, key) for name, key in pairs))
            except (TypeError, ValueError):
                raise PrivacyError("privacy peer_keys is a table of worker ids and public "
                                   "keys") from None
        return cls(**values)

    def public(self) -> dict[str, Any]:
        """What others may know of it (all of it: nothing here is secret)."""
        return {"k": self.k, "clip": self.clip, "noise_multiplier": self.noise_multiplier,
                "epsilon": self.epsilon, "delta": self.delta, "trusted": list(self.trusted),
                "release_scalars": self.release_scalars, "unit": self.unit,
                "secure_aggregation": self.secure_aggregation, "threshold": self.threshold}


def _number(value: object) -> bool:
    return type(value) in (int, float)


class BudgetSpent(PermissionError):
    """One more release would take an owner past its (ε, δ) budget."""


@dataclass(slots=True)
class PrivacyBudget:
    """An owner's releases so far, accounted as a composition of mechanisms: each
    aggregate's release one Gaussian mechanism on a sum in which the owner's
    contribution is clipped to `clip`, with noise std at least `noise_multiplier x
    clip`; each DP-SGD step (unit record) one Gaussian mechanism on a Poisson sample
    of the records. The events are kept, not their epsilons: RDP composes them, a sum
    of epsilons would overcharge.

    With a `ledger` file, every charge is written there before anything it pays for
    runs or is answered, and read back at start: restarting the worker does not give
    the budget back."""

    policy: PrivacyPolicy
    ledger: Path | None = None
    releases: dict[float, int] = field(default_factory=dict)
    """noise multiplier -> how many releases used it."""
    sampled: dict[tuple[float, float], int] = field(default_factory=dict)
    """(sample rate, noise multiplier) -> how many DP-SGD steps used them."""

    def __post_init__(self) -> None:
        if self.ledger is not None and self.ledger.exists():
            try:
                recorded = json.loads(self.ledger.read_text())
                self.releases = {float(z): int(n) for z, n in recorded["releases"].items()}
                self.sampled = {(float(q), float(z)): int(n)
                                for q, z, n in recorded.get("sampled", [])}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise PrivacyError(f"privacy ledger {self.ledger} cannot be read: {e}; "
                                   "restore it (or move it away to start from nothing "
                                   "spent)") from None

    def spent(self) -> float:
        """ε spent so far, at the policy's δ."""
        return epsilon_of(self.releases, self.sampled, self.policy.delta)

    def check(self, owner: str) -> float:
        """ε after one more release; raises `BudgetSpent` if that is over the budget."""
        after = dict(self.releases)
        z = self.policy.noise_multiplier
        after[z] = after.get(z, 0) + 1
        return self._within(owner, epsilon_of(after, self.sampled, self.policy.delta),
                            "one more release")

    def charge(self, owner: str) -> float:
        """Record one release (if the budget allows it); ε spent after it."""
        epsilon = self.check(owner)
        z = self.policy.noise_multiplier
        self.releases[z] = self.releases.get(z, 0) + 1
        self._write()
        return epsilon

    def charge_steps(self, owner: str, sample_rate: float, noise_multiplier: float,
                     steps: int) -> float:
        """Record `steps` DP-SGD steps (if the budget allows all of them); ε spent after
        them. Charged before the first runs: a run cut short has paid in full."""
        after = dict(self.sampled)
        key = (float(sample_rate), float(noise_multiplier))
        after[key] = after.get(key, 0) + steps
        epsilon = self._within(owner, epsilon_of(self.releases, after, self.policy.delta),
                               f"{steps} more DP-SGD steps (sample rate {sample_rate:.4g}, "
                               f"noise multiplier {noise_multiplier:.4g})")
        self.sampled = after
        self._write()
        return epsilon

    def _within(self, owner: str, epsilon: float, what: str) -> float:
        if epsilon > self.policy.epsilon:
            raise BudgetSpent(
                f"the privacy budget of {owner!r} is spent: epsilon {self.spent():.4g} of "
                f"{self.policy.epsilon:g} at delta {self.policy.delta:g}; {what} would make "
                f"it {epsilon:.4g}"
            )
        return epsilon

    def _write(self) -> None:
        if self.ledger is None:
            return
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.ledger.with_name(self.ledger.name + ".tmp")
        temporary.write_text(json.dumps({
            "releases": {str(z): n for z, n in self.releases.items()},
            "sampled": [[q, z, n] for (q, z), n in self.sampled.items()]}))
        os.replace(temporary, self.ledger)


def epsilon_of(releases: dict[float, int], sampled: dict[tuple[float, float], int],
               delta: float) -> float:
    """ε at `delta` of `releases` Gaussian mechanisms (noise multiplier -> count) and
    `sampled` Poisson-sampled ones ((sample rate, noise multiplier) -> steps), composed
    by dp-accounting's RDP accountant."""
    if not releases and not sampled:
        return 0.0
    if any(z == 0 for z in releases) or any(z == 0 for _, z in sampled):
        return math.inf  # a release without noise: no guarantee at all
    try:
        from dp_accounting.rdp import rdp_privacy_accountant  # noqa: PLC0415
    except ImportError:
        raise RuntimeError("accounting privacy needs dp-accounting: pip install "
                           "'torchrelay[privacy]'") from None
    # RDP composes by adding each event's curve times its count: each kind of event's
    # curve is computed once (tens of milliseconds, the accountant's whole cost), so a
    # charge per training round stays cheap however long the ledger.
    events = [((0.0, z), n) for z, n in releases.items()] + list(sampled.items())
    total = None
    for key, count in events:
        orders, curve = _curve(*key)
        total = [t + count * c for t, c in zip(total or [0.0] * len(curve), curve,
                                               strict=True)]
    epsilon, _ = rdp_privacy_accountant.compute_epsilon(orders, total, delta)
    return float(epsilon)


@functools.lru_cache(maxsize=256)
def _curve(sample_rate: float, noise_multiplier: float,
           ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The RDP orders and one event's RDP at each: a Gaussian mechanism (`sample_rate`
    0), or one step Poisson-sampled at `sample_rate` (dp-accounting's own composition
    of that one event)."""
    import dp_accounting  # noqa: PLC0415
    from dp_accounting import rdp  # noqa: PLC0415

    _quiet_accountant()
    accountant = rdp.RdpAccountant()
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier=noise_multiplier)
    accountant.compose(gaussian if sample_rate == 0 else dp_accounting.PoissonSampledDpEvent(
        sample_rate, gaussian), 1)
    # The accountant keeps its curve in `_rdp` (dp-accounting 0.4 to 0.6 alike).
    return tuple(accountant._orders), tuple(accountant._rdp)


class _NotConverged(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


def _quiet_accountant() -> None:
    """dp-accounting logs a warning for each RDP order whose series does not converge
    (low orders, at sampled noise near 1) and leaves that order out: the bound stays
    an upper bound, and an owner's log or a client's terminal need not hear of it."""
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _NotConverged) for f in absl.filters):
        absl.addFilter(_NotConverged())


def least_noise(epsilon: float, delta: float, sample_rate: float, steps: int,
                precision: float = 1e-4) -> float:
    """The least noise multiplier with which `steps` DP-SGD steps at `sample_rate`
    spend at most `epsilon` at `delta` (a bisection over dp-accounting's RDP
    accountant): what an owner puts in its config, or a client asks for."""
    if not (epsilon > 0 and 0 < delta < 1 and 0 < sample_rate <= 1 and steps >= 1):
        raise ValueError("least_noise needs a positive epsilon, steps, and delta and a "
                         "sample rate in (0, 1]")

    def spends(z: float) -> float:
        return epsilon_of({}, {(sample_rate, z): steps}, delta)

    low, high = 0.0, 1.0
    while spends(high) > epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier fits epsilon {epsilon:g}")
    while high - low > precision * high:
        middle = (low + high) / 2
        if spends(middle) > epsilon:
            low = middle
        else:
            high = middle
    return high


def default_ledger(worker_id: str, broker_url: str) -> Path:
    """Where a daemon records its releases when its config names no ledger: one file
    per worker and broker, under `$XDG_STATE_HOME` (or `~/.local/state`)."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    where = hashlib.blake2b(broker_url.encode(), digest_size=6).hexdigest()
    return base / "torchrelay" / f"{worker_id}-{where}.privacy.json"
