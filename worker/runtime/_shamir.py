"""Shamir's secret sharing over the prime field of p = 2^521 - 1.

Secure aggregation (`_secagg.py`) shares two 32-byte secrets of each owner among
the round's owners, with a threshold `t`: any `t` shares give the secret back,
fewer tell nothing of it. A 32-byte secret is a number below 2^256, so the field
must be larger; the Mersenne prime 2^521 - 1 is, and it is a known prime (no
prime to generate or to trust). The polynomial's coefficients come from the
operating system's randomness (`secrets`), each uniform in the field.

Shares travel as fixed-width big-endian bytes (`SHARE_BYTES`), the x coordinate
beside them: it is public (the owner's place in the round's list, from 1).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Final

__all__ = ["PRIME", "SHARE_BYTES", "reconstruct", "share_from_bytes", "share_to_bytes", "split"]

PRIME: Final = (1 << 521) - 1
SHARE_BYTES: Final = 66
"""Bytes of one share's value (521 bits, rounded up)."""


def split(secret: bytes, threshold: int, count: int) -> list[tuple[int, int]]:
    """`count` shares of `secret` (at most 65 bytes), any `threshold` of which give it
    back: the points (x, f(x)) for x = 1..count of a random polynomial f of degree
    `threshold - 1` with f(0) the secret."""
    if not 1 <= threshold <= count:
        raise ValueError(f"a threshold of {threshold} for {count} shares")
    if len(secret) >= SHARE_BYTES:
        raise ValueError("the secret must be shorter than 66 bytes")
    coefficients = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [(x, _evaluate(coefficients, x)) for x in range(1, count + 1)]


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):  # Horner
        value = (value * x + coefficient) % PRIME
    return value


def reconstruct(shares: Sequence[tuple[int, int]], length: int = 32) -> bytes:
    """The secret (`length` bytes) from shares (x, y) by Lagrange interpolation at 0.
    With fewer than the threshold's shares the result is a random number, not the
    secret: the caller must know it holds enough (secure aggregation counts them)."""
    xs = [x for x, _ in shares]
    if not shares or len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise ValueError("reconstructing needs shares at distinct, nonzero points")
    secret = 0
    for i, (xi, yi) in enumerate(shares):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(shares):
            if i != j:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >> (8 * length):
        raise ValueError("the shares do not give a secret of that length: too few of "
                         "them, or not shares of one secret")
    return secret.to_bytes(length, "big")


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, not {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ValueError("a share must be below the field's prime")
    return y
