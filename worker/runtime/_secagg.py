"""Secure aggregation, an owner's side: one round's state, and its primitives.

Bonawitz et al. 2017 (with the consistency check of its active-adversary
version; SecAgg+ of Bell et al. 2020 keeps its shape). Each owner u of a round

1. joins it (the client's `secagg_join`, naming the round, the aggregator, the
   owners U, the threshold t and the weights): it clips and weighs its
   contribution, makes two X25519 key pairs (c, to encrypt the shares it sends;
   s, to agree pairwise masks) and a 32-byte self-mask seed b, and splits s and b
   in Shamir shares (`_shamir.py`), any t of n giving them back;
2. shares (the aggregator's `secagg_share`): it meets each other owner v *directly*,
   worker to worker, so each message's sender is the broker's validated user id
   (`Delivery.sender`), not something the aggregator says: they swap public keys
   and the digest of the round's terms (an owner told another list refuses), and
   u sends v v's shares of u's secrets, encrypted to v (ChaCha20-Poly1305 under
   HKDF of X25519(c_u, c_v)): neither the aggregator nor the broker reads them;
3. masks (`secagg_mask`, naming U2, the owners that shared): it sends
       y_u = encode(w_u clip(x_u) + noise_u) + PRG(b_u) + sum_{v in U2, u<v} PRG(s_uv)
                                                      - sum_{v in U2, v<u} PRG(s_uv)
   in the ring Z/2^64 (int64 arithmetic wraps), PRG ChaCha20 keyed by HKDF of the
   seed: the masks cancel in the sum of U2's inputs but for the self-masks;
4. confirms (`secagg_commit`, naming U3, the owners whose masked input the
   aggregator holds): it records U3, once;
5. unmasks (`secagg_unmask`): it asks every other owner of U3 what terms and lists
   it was told, refuses unless all that answer (and at least t with itself) were
   told the same, then reveals, for each v of U2, the share of b_v if v is in U3 and
   the share of s_v if it is not — never both for one v, whatever it is asked later.

The aggregator sums U3's masked inputs, rebuilds each survivor's b (t shares) and
each dropped owner's s (t shares, from which it recomputes that owner's pairwise
masks with the survivors) and removes those masks: what remains is the sum of
U3's encoded inputs (`unmask`). It learns the sum, and nothing of any one owner's
input, unless t owners collude with it.

DP without a trusted aggregator: an owner whose contribution derives from its
private data adds Gaussian noise of std sigma / sqrt(t), sigma the largest of U2's
owners' `noise_multiplier x w x clip` (each owner tells its own to the others, in
step 2): with at least t owners' noise in the sum, its std is at least sigma —
under the stated assumption that the owners whose noise counts do not collude with
the aggregator to remove it. Each owner charges its own budget before it masks.

A broker that is not trusted: with owners' long-term Ed25519 keys pinned in their
configs (`_signing.py`), an owner signs its introduction (its keys, bound to the
round, its name, the terms and its noise) and its view, and believes another's only
signed by that owner's pinned key; it joins no round with an owner whose key it
has not pinned. One key message that is unsigned or signed by another key is the
sign of an active attacker (the broker's user_id vouched for it): the owner
refuses the rest of the round (`tainted`) — no masked input, no shares revealed —
so the round releases nothing, as Bonawitz et al.'s owners abort on a signature
that does not verify.

Everything here is pure (no I/O): the handlers (`_commands/secure.py`) move its
messages.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import torch

from torchrelay.broker import PrivateDataError

from ._shamir import reconstruct, share_from_bytes, share_to_bytes, split
from ._signing import Pinning, signed_message

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

__all__ = ["FRACTION_BITS", "OwnerRound", "RoundRefused", "RoundTerms", "agree", "decode",
           "encode", "expand", "pairwise_mask", "unmask"]

FRACTION_BITS: Final = 32
"""Fixed point: x is encoded as round(x * 2^32) in Z/2^64. The sum of n inputs stays
exact while it is below 2^31 in magnitude: each input is clipped (its entries at
most the clip bound) and weighed (weights sum to 1), so the sum is below the
largest clip plus the noise, and `encode` refuses values past `HEADROOM`."""
HEADROOM: Final = float(1 << 26)
"""The largest magnitude one input's entry may have: 2^5 below the ring's range, so
32 of them at most fit in the sum without wrapping."""


class RoundRefused(PrivateDataError):
    """An owner refuses a step of a secure aggregation round (the message says why)."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    except ImportError:
        raise RuntimeError("secure aggregation needs the cryptography package: pip install "
                           "'torchrelay[secure]'") from None
    return hashes


def new_private_key() -> X25519PrivateKey:
    _crypto()
    from cryptography.hazmat.primitives.asymmetric.x25519 import (  # noqa: PLC0415
        X25519PrivateKey,
    )
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def agree(private: bytes | X25519PrivateKey, public: bytes, info: bytes) -> bytes:
    """A 32-byte key two parties share: HKDF-SHA256 of their X25519 agreement, bound
    to `info` (what it is for, the round, the pair). `private` as a key object where
    one is at hand: reading one from its bytes costs as much as the agreement."""
    hashes = _crypto()
    from cryptography.hazmat.primitives.asymmetric.x25519 import (  # noqa: PLC0415
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: PLC0415
    try:
        key = X25519PrivateKey.from_private_bytes(private) if isinstance(
            private, bytes) else private
        shared = key.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as e:
        raise RoundRefused(f"a public key that is not an X25519 key: {e}") from None
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(shared)


def expand(seed: bytes, length: int) -> torch.Tensor:
    """`length` int64s (uniform in Z/2^64) from a 32-byte seed: ChaCha20's key stream.
    The seed is the whole key (256 bits): no search over seeds finds it."""
    _crypto()
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms  # noqa: PLC0415
    if len(seed) != 32:
        raise ValueError("a mask seed is 32 bytes")
    # A fresh key per seed: the nonce may be fixed (each key stream is used once).
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    data = bytearray(stream.update(bytes(8 * length)))
    if not data:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(data, dtype=torch.int64)


def encode(values: torch.Tensor) -> torch.Tensor:
    """float64 values in fixed point, in Z/2^64 (as int64)."""
    finite = torch.where(torch.isfinite(values), values, torch.zeros((), dtype=values.dtype))
    if finite.numel() and float(finite.abs().max()) > HEADROOM:
        raise RoundRefused(f"a value past {HEADROOM:g} in magnitude cannot be summed in "
                           "the ring without wrapping")
    return torch.round(finite.to(torch.float64) * (1 << FRACTION_BITS)).to(torch.int64)


def decode(ring: torch.Tensor) -> torch.Tensor:
    """The float64 values of a sum in fixed point (its two's complement reading)."""
    return ring.to(torch.float64) / (1 << FRACTION_BITS)


def _seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    _crypto()
    from cryptography.hazmat.primitives.ciphers.aead import (  # noqa: PLC0415
        ChaCha20Poly1305,
    )
    nonce = secrets.token_bytes(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def _open(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    _crypto()
    from cryptography.exceptions import InvalidTag  # noqa: PLC0415
    from cryptography.hazmat.primitives.ciphers.aead import (  # noqa: PLC0415
        ChaCha20Poly1305,
    )
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], associated)
    except (InvalidTag, ValueError):
        raise RoundRefused("shares that do not open with the sender's key: forged, or "
                           "for another round") from None


def pairwise_mask(private: bytes | X25519PrivateKey, public: bytes, round_id: str, *,
                  me: str, peer: str, length: int) -> torch.Tensor:
    """What `me` adds for the pair (me, peer): +PRG(s) if me sorts first, -PRG(s) if
    not, s agreed by X25519 (either side's private key, the other's public key)."""
    first, second = sorted((me, peer))
    seed = agree(private, public, f"torchrelay secagg mask|{round_id}|{first}|{second}".encode())
    mask = expand(seed, length)
    return mask if me == first else -mask


@dataclass(frozen=True, slots=True)
class RoundTerms:
    """What every owner of a round must be told alike (the client's join)."""

    round_id: str
    aggregator: str
    participants: tuple[str, ...]
    """Sorted: an owner's Shamir point is its place here, from 1."""
    threshold: int
    weights: tuple[float, ...]
    """Normalised over the participants, in their order."""
    length: int
    """Entries of a contribution."""

    def check(self, me: str, least_threshold: int | None, k: int) -> None:
        n = len(self.participants)
        if list(self.participants) != sorted(set(self.participants)):
            raise RoundRefused("a round's owners must be distinct and sorted")
        if me not in self.participants:
            raise RoundRefused(f"{me!r} is not among the round's owners")
        if me == self.aggregator or self.aggregator in self.participants:
            raise RoundRefused("the aggregator of a secure round is none of its owners")
        if len(self.weights) != n or not all(w > 0 and math.isfinite(w)
                                             for w in self.weights):
            raise RoundRefused("a round needs a positive weight for each owner")
        if abs(sum(self.weights) - 1) > 1e-9:
            raise RoundRefused("a round's weights must be normalised (sum to 1)")
        least = least_threshold if least_threshold is not None else n // 2 + 1
        if not max(least, 1) <= self.threshold <= n:
            raise RoundRefused(f"{me!r} takes part only with a threshold from {least} to "
                               f"{n} owners, not {self.threshold}")
        if n < k:
            raise RoundRefused(f"{me!r}'s data is released only in aggregates of at least "
                               f"{k} data owners; this round has {n}")

    def digest(self) -> str:
        return _digest({"round": self.round_id, "aggregator": self.aggregator,
                        "owners": list(self.participants), "t": self.threshold,
                        "weights": list(self.weights), "length": self.length})

    def point(self, owner: str) -> int:
        return self.participants.index(owner) + 1


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@dataclass(slots=True)
class _Peer:
    c_public: bytes
    s_public: bytes
    sigma: float
    shares: tuple[int, int] | None = None
    """Its b's and s's shares at my point, once it sent them."""


@dataclass
class OwnerRound:
    """One owner's round (see the module docstring); each method is one step, and
    refuses (`RoundRefused`) anything out of order or inconsistent."""

    me: str
    terms: RoundTerms
    contribution: torch.Tensor
    """Clipped and weighed, float64, flat."""
    sigma: float
    """The noise std this owner's contribution needs in the sum (0: not private)."""
    pinning: Pinning | None = None
    """Its long-term key and the other owners' pinned ones (None: neither)."""
    peers: dict[str, _Peer] = field(default_factory=dict)
    shared: tuple[str, ...] | None = None
    survivors: tuple[str, ...] | None = None
    revealed: dict[str, str] = field(default_factory=dict)
    """Owner -> which of its secrets' shares this owner revealed ("b" or "s")."""
    noise_std: float = 0.0
    sent: set[str] = field(default_factory=set)
    """The owners this owner sent their shares of its secrets."""
    views: dict[str, str] = field(default_factory=dict)
    """What the other survivors said they were told (`view`), as they told it."""
    tainted: str | None = None
    """Why this owner refuses the rest of the round: a key message that its sender's
    pinned key did not sign (None: no such message came)."""

    def __post_init__(self) -> None:
        if self.contribution.numel() != self.terms.length:
            raise RoundRefused(f"the contribution has {self.contribution.numel()} entries, "
                               f"the round {self.terms.length}")
        pinned = None if self.pinning is None else self.pinning.peers
        unknown = [] if pinned is None else [
            p for p in self.terms.participants if p != self.me and p not in pinned]
        if unknown:
            raise RoundRefused(f"{', '.join(unknown)}: no key pinned in {self.me}'s "
                               "[worker.privacy] peer_keys; it joins secure rounds only with "
                               "owners it can authenticate")
        self._c = new_private_key()
        self._s = new_private_key()
        self._b = secrets.token_bytes(32)
        self._channels: dict[str, bytes] = {}
        n, t = len(self.terms.participants), self.terms.threshold
        self._outgoing = list(zip(split(self._b, t, n),
                                  split(private_bytes(self._s), t, n), strict=True))
        point = self.terms.point(self.me)
        mine = self._outgoing[point - 1]
        self.peers[self.me] = _Peer(public_bytes(self._c), public_bytes(self._s), self.sigma,
                                    (mine[0][1], mine[1][1]))

    # -- step 2: meeting the others, worker to worker ------------------------------

    def _sign(self, kind: str, fields: list[str]) -> str | None:
        if self.pinning is None:
            return None
        return self.pinning.sign(signed_message(kind, self.terms.round_id, self.me, fields))

    def _believe(self, peer: str, kind: str, fields: list[str],
                 signature: str | None) -> None:
        """Refuse, and taint the round, unless `peer`'s pinned key signed `fields` (when
        keys are pinned)."""
        if self.pinning is None:
            return
        doubt = self.pinning.doubts(
            peer, signed_message(kind, self.terms.round_id, peer, fields), signature)
        if doubt is not None:
            self.tainted = (f"{peer}'s {kind} for round {self.terms.round_id} came "
                            f"{doubt}: a forged key message (the broker's word for its "
                            f"sender is not to be believed); {self.me!r} releases nothing "
                            "in this round")
            raise RoundRefused(self.tainted)

    def _untainted(self) -> None:
        if self.tainted is not None:
            raise RoundRefused(self.tainted)

    def introduction(self) -> dict[str, Any]:
        """What this owner tells another of itself (`meet`'s arguments)."""
        me = self.peers[self.me]
        fields = [self.terms.digest(), me.c_public.hex(), me.s_public.hex(),
                  float(self.sigma).hex()]
        return {"digest": fields[0], "c_public": fields[1], "s_public": fields[2],
                "sigma": self.sigma, "signature": self._sign("keys", fields)}

    def meet(self, peer: str, digest: str, c_public: str, s_public: str,
             sigma: float, *, signature: str | None = None) -> None:
        """`peer` (the broker's word for who sent it) introduced itself; with keys pinned,
        believed only with `peer`'s signature."""
        self._untainted()
        if self.shared is not None:
            raise RoundRefused(f"round {self.terms.round_id}: keys come before the masked "
                               "inputs")
        if peer == self.me or peer not in self.terms.participants:
            raise RoundRefused(f"{peer!r} is not an other owner of round "
                               f"{self.terms.round_id}")
        if not (type(sigma) in (int, float) and math.isfinite(sigma)):
            raise RoundRefused("sigma is a number")
        self._believe(peer, "keys", [digest, c_public, s_public, float(sigma).hex()],
                      signature)
        if digest != self.terms.digest():
            raise RoundRefused(f"{peer!r} was told other terms for round "
                               f"{self.terms.round_id} (owners, threshold or weights): "
                               "inconsistent participant lists")
        try:
            keys = bytes.fromhex(c_public), bytes.fromhex(s_public)
        except ValueError:
            raise RoundRefused("public keys are 32 bytes in hex") from None
        if not all(len(k) == 32 for k in keys) or not (
                type(sigma) in (int, float) and math.isfinite(sigma) and sigma >= 0):
            raise RoundRefused("public keys are 32 bytes in hex, sigma a number from 0")
        known = self.peers.get(peer)
        if known is not None:
            if (known.c_public, known.s_public, known.sigma) != (*keys, sigma):
                raise RoundRefused(f"{peer!r} sent other keys for round "
                                   f"{self.terms.round_id}")
            return
        self.peers[peer] = _Peer(*keys, sigma)

    def knows(self, peer: str) -> bool:
        return peer in self.peers

    def _channel(self, sender: str, recipient: str, peer: str) -> tuple[bytes, bytes]:
        # One key per pair and round, both ways (the direction is in the associated
        # data): agreed once, not again for each message.
        key = self._channels.get(peer)
        if key is None:
            key = self._channels[peer] = agree(
                self._c, self.peers[peer].c_public,
                f"torchrelay secagg shares|{self.terms.round_id}".encode())
        return key, f"{self.terms.round_id}|{sender}|{recipient}".encode()

    def sealed_for(self, peer: str) -> str:
        """`peer`'s shares of this owner's b and s, encrypted to it (hex)."""
        self._untainted()
        if peer not in self.peers or peer == self.me:
            raise RoundRefused(f"{peer!r}'s keys are not known in round {self.terms.round_id}")
        (_, b_share), (_, s_share) = self._outgoing[self.terms.point(peer) - 1]
        key, associated = self._channel(self.me, peer, peer)
        self.sent.add(peer)
        return _seal(key, share_to_bytes(b_share) + share_to_bytes(s_share),
                     associated).hex()

    def receive(self, peer: str, sealed: str) -> None:
        """`peer` (the broker's word) sent this owner its shares."""
        self._untainted()
        if self.shared is not None:
            raise RoundRefused(f"round {self.terms.round_id}: shares come before the masked "
                               "inputs")
        if peer not in self.peers or peer == self.me:
            raise RoundRefused(f"{peer!r} sent shares before its keys")
        try:
            data = bytes.fromhex(sealed)
        except ValueError:
            raise RoundRefused("shares travel in hex") from None
        key, associated = self._channel(peer, self.me, peer)
        plain = _open(key, data, associated)
        if len(plain) != 132:
            raise RoundRefused("shares of two secrets are 132 bytes")
        try:
            shares = share_from_bytes(plain[:66]), share_from_bytes(plain[66:])
        except ValueError as e:
            raise RoundRefused(str(e)) from None
        held = self.peers[peer]
        if held.shares is not None and held.shares != shares:
            raise RoundRefused(f"{peer!r} sent other shares for round {self.terms.round_id}")
        held.shares = shares

    # -- step 3: the masked input --------------------------------------------------

    def masked(self, shared: list[str]) -> torch.Tensor:
        """y_u over U2 = `shared` (see the module docstring)."""
        self._untainted()
        if self.shared is not None:
            raise RoundRefused(f"round {self.terms.round_id}: this owner's masked input was "
                               "sent already (a replay)")
        t = self.terms.threshold
        if sorted(set(shared)) != list(shared) or not set(shared) <= set(
                self.terms.participants) or self.me not in shared:
            raise RoundRefused("the owners that shared must be distinct, sorted, of the "
                               "round, this owner among them")
        if len(shared) < t:
            raise RoundRefused(f"only {len(shared)} owners shared their keys, fewer than the "
                               f"threshold {t}: nothing is released")
        missing = [v for v in shared if v not in self.peers or self.peers[v].shares is None]
        if missing:
            raise RoundRefused(f"{', '.join(missing)} did not share with {self.me!r}: the "
                               "aggregator's list of owners that shared is wrong")
        self.shared = tuple(shared)
        length = self.terms.length
        sigma = max(self.peers[v].sigma for v in shared)
        value = self.contribution
        if sigma > 0 and self.sigma > 0:
            self.noise_std = sigma / math.sqrt(t)
            generator = torch.Generator().manual_seed(secrets.randbits(63))
            value = value + torch.randn(length, generator=generator,
                                        dtype=torch.float64) * self.noise_std
        y = encode(value) + expand(self._b, length)
        s_private = self._s
        for v in shared:
            if v != self.me:
                y += pairwise_mask(s_private, self.peers[v].s_public, self.terms.round_id,
                                   me=self.me, peer=v, length=length)
        self.contribution = torch.zeros(0, dtype=torch.float64)  # spent
        return y

    # -- steps 4 and 5: the survivors, and the shares that unmask them -----------------

    def commit(self, survivors: list[str]) -> None:
        self._untainted()
        if self.shared is None:
            raise RoundRefused(f"round {self.terms.round_id}: no masked input was sent yet")
        if self.survivors is not None:
            if tuple(survivors) != self.survivors:
                raise RoundRefused(f"round {self.terms.round_id}: the aggregator named other "
                                   "survivors before; an owner is told them once")
            return
        if sorted(set(survivors)) != list(survivors) or not set(survivors) <= set(
                self.shared) or self.me not in survivors:
            raise RoundRefused("the survivors must be distinct, sorted, owners that shared, "
                               "this owner among them")
        if len(survivors) < self.terms.threshold:
            raise RoundRefused(f"only {len(survivors)} owners sent masked inputs, fewer than "
                               f"the threshold {self.terms.threshold}: nothing is released")
        self.survivors = tuple(survivors)

    def view(self) -> str:
        """The digest of everything this owner was told of the round."""
        if self.survivors is None:
            raise RoundRefused(f"round {self.terms.round_id}: no survivors named yet")
        return _digest({"terms": self.terms.digest(), "shared": list(self.shared or ()),
                        "survivors": list(self.survivors)})

    def signed_view(self) -> tuple[str, str | None]:
        """`view`, and this owner's signature of it (None with no signing key)."""
        view = self.view()
        return view, self._sign("view", [view])

    def hear(self, peer: str, view: str, signature: str | None = None) -> None:
        """Another survivor `peer` said what it was told (its first word counts); with
        keys pinned, believed only with its signature."""
        self._untainted()
        if peer == self.me or peer not in self.terms.participants:
            raise RoundRefused(f"{peer!r} is not an other owner of round "
                               f"{self.terms.round_id}")
        self._believe(peer, "view", [view], signature)
        self.views.setdefault(peer, view)

    def reveal(self, views: dict[str, str]) -> dict[str, list[Any]]:
        """The shares that unmask the sum, given the other survivors' `views` (those that
        answered): {owner: [kind, point, share hex]}."""
        self._untainted()
        mine = self.view()
        differing = sorted(v for v, d in views.items() if d != mine)
        if differing:
            raise RoundRefused(f"{', '.join(differing)} were told other lists of round "
                               f"{self.terms.round_id}: inconsistent participant lists, "
                               "nothing revealed")
        if len(views) + 1 < self.terms.threshold:
            raise RoundRefused(f"only {len(views) + 1} survivors confirm round "
                               f"{self.terms.round_id}, fewer than its threshold")
        assert self.shared is not None
        assert self.survivors is not None
        answer: dict[str, list[Any]] = {}
        point = self.terms.point(self.me)
        for v in self.shared:
            kind = "b" if v in self.survivors else "s"
            if self.revealed.get(v, kind) != kind:
                raise RoundRefused(f"both shares of {v!r} asked for: refused")
            shares = self.peers[v].shares
            assert shares is not None
            self.revealed[v] = kind
            answer[v] = [kind, point, share_to_bytes(shares[0 if kind == "b" else 1]).hex()]
        return answer


def unmask(total: torch.Tensor, terms: RoundTerms, *, shared: list[str], survivors: list[str],
           s_publics: dict[str, bytes], revealed: list[dict[str, list[Any]]]) -> torch.Tensor:
    """The aggregator's last step: the sum of the survivors' encoded inputs, from the sum
    of their masked inputs `total` and the shares they revealed."""
    t = terms.threshold
    points: dict[str, dict[int, int]] = {v: {} for v in shared}
    for answer in revealed:
        for v, (kind, point, share) in answer.items():
            if v in points and kind == ("b" if v in survivors else "s"):
                points[v][int(point)] = share_from_bytes(bytes.fromhex(share))
    total = total.clone()
    for v in shared:
        if len(points[v]) < t:
            raise RoundRefused(f"only {len(points[v])} shares of {v!r}'s secret came back, "
                               f"fewer than the threshold {t}: nothing is released")
        secret = reconstruct(list(points[v].items())[:t])
        if v in survivors:
            total -= expand(secret, terms.length)
        else:  # v masked nobody's input: its pairs with the survivors do not cancel
            for u in survivors:
                total -= pairwise_mask(secret, s_publics[u], terms.round_id, me=u, peer=v,
                                       length=terms.length)
    return total
