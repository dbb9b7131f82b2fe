"""Secure aggregation's primitives and an owner's round, as pure code (no broker).

Shamir against Wikipedia's worked example and at random; X25519 agreement both
ways; the ChaCha20 PRG; fixed point in Z/2^64; then whole rounds of five owners
run by hand — the right sum with and without dropouts — and each refusal an
owner owes a hostile aggregator or peer; with owners' long-term keys pinned, each
key message its sender's key did not sign (a broker not trusted).
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from typing import Any

import pytest
import torch

from torchrelay.worker.runtime._secagg import (
    FRACTION_BITS,
    OwnerRound,
    RoundRefused,
    RoundTerms,
    agree,
    decode,
    encode,
    expand,
    new_private_key,
    private_bytes,
    public_bytes,
    unmask,
)
from torchrelay.worker.runtime._shamir import PRIME, reconstruct, split
from torchrelay.worker.runtime._signing import (
    KeyFileError,
    Pinning,
    SigningKey,
    new_key_file,
    public_key_text,
    read_public_key,
    signed_message,
)


def test_shamir_known_vector() -> None:
    # Wikipedia's example: f(x) = 1234 + 166x + 94x^2, shares at x = 1..6.
    shares = [(1, 1494), (2, 1942), (3, 2578), (4, 3402), (5, 4414), (6, 5614)]
    for chosen in (shares[:3], shares[3:], [shares[0], shares[2], shares[5]]):
        assert reconstruct(chosen, 2) == (1234).to_bytes(2, "big")
    assert PRIME == 2**521 - 1 and PRIME > 2**256


def test_shamir_threshold() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, 3, 5)
    assert [x for x, _ in shares] == [1, 2, 3, 4, 5]
    assert reconstruct(shares[1:4]) == secret
    assert reconstruct([shares[0], shares[4], shares[2]]) == secret
    assert reconstruct(shares) == secret
    with pytest.raises(ValueError, match="too few"):  # two points of a degree-2 polynomial
        reconstruct(shares[:2])
    with pytest.raises(ValueError, match="distinct"):
        reconstruct([shares[0], shares[0], shares[1]])
    with pytest.raises(ValueError, match="threshold"):
        split(secret, 6, 5)


def test_agreement_prg_and_fixed_point() -> None:
    a, b = new_private_key(), new_private_key()
    ab = agree(private_bytes(a), public_bytes(b), b"x")
    assert ab == agree(private_bytes(b), public_bytes(a), b"x") != agree(
        private_bytes(b), public_bytes(a), b"y")
    stream = expand(ab, 1000)
    assert stream.dtype == torch.int64 and torch.equal(stream, expand(ab, 1000))
    assert not torch.equal(stream, expand(bytes(32), 1000))
    assert (stream < 0).float().mean().item() == pytest.approx(0.5, abs=0.1)
    # RFC 8439 2.4.2's ChaCha20 block with a zero key and nonce starts 76 b8 e0 ad.
    assert expand(bytes(32), 1)[0].item() == int.from_bytes(bytes.fromhex(
        "76b8e0ada0f13d90"), "little", signed=True)
    x = torch.tensor([0.25, -1.5, 3e-6, 1000.0], dtype=torch.float64)
    assert torch.allclose(decode(encode(x) + encode(-2 * x)), -x, atol=2.0**-FRACTION_BITS)
    masked = encode(x) + stream[:4]  # wraps around in Z/2^64
    assert torch.allclose(decode(masked - stream[:4]), x, atol=2.0**-FRACTION_BITS)


OWNERS = ("o1", "o2", "o3", "o4", "o5")


def _round(t: int = 3, sigma: float = 0.0, **changes: Any) -> tuple[RoundTerms, dict[
        str, OwnerRound], dict[str, torch.Tensor]]:
    terms = RoundTerms(secrets.token_hex(16), "agg", OWNERS, t, (0.2,) * 5, 6)
    values = {o: torch.randn(6, dtype=torch.float64) for o in OWNERS}
    rounds = {o: OwnerRound(o, changes.get(o, terms), values[o] * 0.2, sigma)
              for o in OWNERS}
    return terms, rounds, values


def _share(rounds: dict[str, OwnerRound], among: tuple[str, ...] = OWNERS) -> None:
    for u in among:
        for v in among:
            if u != v:
                rounds[v].meet(u, **rounds[u].introduction())
    for u in among:
        for v in among:
            if u != v:
                rounds[v].receive(u, rounds[u].sealed_for(v))


def _run(rounds: dict[str, OwnerRound], terms: RoundTerms, shared: tuple[str, ...],
         masked: tuple[str, ...], answering: tuple[str, ...]) -> torch.Tensor:
    inputs = {u: rounds[u].masked(list(shared)) for u in masked}
    total = torch.stack(list(inputs.values())).sum(0)
    for u in masked:
        if u in answering:
            rounds[u].commit(list(masked))
    views = {u: rounds[u].view() for u in answering}
    revealed = [rounds[u].reveal({v: d for v, d in views.items() if v != u})
                for u in answering]
    publics = {u: rounds[u].peers[u].s_public for u in masked}
    return decode(unmask(total, terms, shared=list(shared), survivors=list(masked),
                         s_publics=publics, revealed=revealed))


def test_a_round_gives_the_sum_and_only_it() -> None:
    terms, rounds, values = _round()
    _share(rounds)
    result = _run(rounds, terms, OWNERS, OWNERS, OWNERS)
    assert torch.allclose(result, sum(v * 0.2 for v in values.values()), atol=1e-8)


def test_dropouts_after_masking_and_before() -> None:
    terms, rounds, values = _round()
    _share(rounds, OWNERS[:4])  # o5 is lost before sharing: left out
    # o4 is lost after sending its masked input: unmasked from the others' shares
    result = _run(rounds, terms, OWNERS[:4], OWNERS[:4], OWNERS[:3])
    assert torch.allclose(result, sum(values[o] * 0.2 for o in OWNERS[:4]), atol=1e-8)
    terms, rounds, values = _round()
    _share(rounds)
    # o2 and o5 lost after sharing, before masking: their pairwise masks are removed
    result = _run(rounds, terms, OWNERS, ("o1", "o3", "o4"), ("o1", "o3", "o4"))
    assert torch.allclose(result, sum(values[o] * 0.2 for o in ("o1", "o3", "o4")), atol=1e-8)


def test_too_few_survivors_release_nothing() -> None:
    _, rounds, _ = _round()
    _share(rounds)
    for u in ("o1", "o2"):
        rounds[u].masked(list(OWNERS))
    with pytest.raises(RoundRefused, match="fewer than the threshold"):
        rounds["o1"].commit(["o1", "o2"])
    with pytest.raises(RoundRefused, match="fewer than the threshold"):
        rounds["o3"].masked(["o2", "o3"])


def test_an_owner_never_reveals_both_shares_of_a_peer() -> None:
    _, rounds, _ = _round()
    _share(rounds)
    for u in OWNERS:
        rounds[u].masked(list(OWNERS))
    survivors = ["o1", "o2", "o3", "o4"]
    for u in survivors:
        rounds[u].commit(survivors)
    views = {u: rounds[u].view() for u in survivors}
    first = rounds["o1"].reveal({v: views[v] for v in survivors[1:]})
    assert first["o5"][0] == "s" and first["o2"][0] == "b"
    # asked again with o5 among the survivors: its self-mask share would unmask it
    with pytest.raises(RoundRefused, match="named other survivors"):
        rounds["o1"].commit(list(OWNERS))
    rounds["o1"].survivors = tuple(OWNERS)  # even were the list changed underneath
    with pytest.raises(RoundRefused, match="both shares"):
        rounds["o1"].reveal(dict.fromkeys(("o2", "o3"), rounds["o1"].view()))


def test_inconsistent_lists_are_refused() -> None:
    terms, rounds, _ = _round()
    other = RoundTerms(terms.round_id, "agg", OWNERS, 3, (0.6, 0.1, 0.1, 0.1, 0.1), 6)
    bent = OwnerRound("o2", other, torch.zeros(6, dtype=torch.float64), 0.0)
    with pytest.raises(RoundRefused, match="inconsistent participant lists"):
        rounds["o1"].meet("o2", **bent.introduction())
    _share(rounds)
    for u in OWNERS:
        rounds[u].masked(list(OWNERS))
    rounds["o1"].commit(["o1", "o2", "o3"])  # o4 and o5 "dropped", to o1 only
    for u in ("o2", "o3", "o4", "o5"):
        rounds[u].commit(list(OWNERS))
    with pytest.raises(RoundRefused, match="inconsistent participant lists"):
        rounds["o1"].reveal({"o2": rounds["o2"].view(), "o3": rounds["o3"].view()})
    with pytest.raises(RoundRefused, match="inconsistent participant lists"):
        rounds["o2"].reveal({"o1": rounds["o1"].view(), "o3": rounds["o3"].view()})


def test_replays_forgeries_and_terms_refused() -> None:
    _, rounds, _ = _round()
    _share(rounds)
    with pytest.raises(RoundRefused, match="other keys"):  # another identity's keys
        rounds["o1"].meet("o2", **rounds["o3"].introduction())
    with pytest.raises(RoundRefused, match="do not open"):  # o3's shares claimed as o2's
        rounds["o1"].receive("o2", rounds["o3"].sealed_for("o1"))
    with pytest.raises(RoundRefused, match="not an other owner"):
        rounds["o1"].meet("mallory", **rounds["o3"].introduction())
    rounds["o1"].masked(list(OWNERS))
    with pytest.raises(RoundRefused, match="replay"):
        rounds["o1"].masked(list(OWNERS))
    with pytest.raises(RoundRefused, match="threshold from 3"):
        RoundTerms("r", "agg", OWNERS, 2, (0.2,) * 5, 6).check("o1", None, 2)
    with pytest.raises(RoundRefused, match="none of its owners"):
        RoundTerms("r", "o1", OWNERS, 3, (0.2,) * 5, 6).check("o1", None, 2)
    with pytest.raises(RoundRefused, match="at least 6"):
        RoundTerms("r", "agg", OWNERS, 3, (0.2,) * 5, 6).check("o1", None, 6)


def test_noise_shares_sum_to_the_noise() -> None:
    sums = []
    for _ in range(40):
        terms = RoundTerms(secrets.token_hex(16), "agg", OWNERS, 3, (0.2,) * 5, 500)
        rounds = {o: OwnerRound(o, terms, torch.zeros(500, dtype=torch.float64), 1.0)
                  for o in OWNERS}
        _share(rounds, OWNERS[:3])
        sums.append(_run(rounds, terms, OWNERS[:3], OWNERS[:3], OWNERS[:3]))
    # three survivors' shares of std 1/sqrt(3): the sum's std is 1
    assert torch.cat(sums).std().item() == pytest.approx(1.0, abs=0.05)


# -- pinned long-term keys: a broker that is not trusted ------------------------------


def _signing_key() -> SigningKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )
    return SigningKey(Ed25519PrivateKey.generate())


def _pinned_round(keys: dict[str, SigningKey], pinned: dict[str, bytes],
                  t: int = 3) -> tuple[RoundTerms, dict[str, OwnerRound],
                                       dict[str, torch.Tensor]]:
    terms = RoundTerms(secrets.token_hex(16), "agg", OWNERS, t, (0.2,) * 5, 6)
    values = {o: torch.randn(6, dtype=torch.float64) for o in OWNERS}
    rounds = {o: OwnerRound(o, terms, values[o] * 0.2, 0.0, Pinning(keys[o], pinned))
              for o in OWNERS}
    return terms, rounds, values


def _pinned() -> tuple[dict[str, SigningKey], dict[str, bytes]]:
    keys = {o: _signing_key() for o in OWNERS}
    return keys, {o: k.public for o, k in keys.items()}


def test_pinned_keys_a_signed_round_gives_the_sum() -> None:
    keys, pinned = _pinned()
    terms, rounds, values = _pinned_round(keys, pinned)
    _share(rounds)
    inputs = {u: rounds[u].masked(list(OWNERS)) for u in OWNERS}
    survivors = list(OWNERS[:4])  # o5 "lost" after masking
    for u in survivors:
        rounds[u].commit(survivors)
    for u in survivors:  # each tells the others what it was told, signed
        for v in survivors:
            if u != v:
                rounds[v].hear(u, *rounds[u].signed_view())
    revealed = [rounds[u].reveal(rounds[u].views) for u in survivors]
    total = torch.stack([inputs[u] for u in survivors]).sum(0)
    publics = {u: rounds[u].peers[u].s_public for u in survivors}
    result = decode(unmask(total, terms, shared=list(OWNERS), survivors=survivors,
                           s_publics=publics, revealed=revealed))
    assert torch.allclose(result, sum(values[o] * 0.2 for o in survivors), atol=1e-8)
    assert all(rounds[u].tainted is None for u in OWNERS)


def test_pinned_keys_refuse_a_forged_introduction_and_release_nothing() -> None:
    keys, pinned = _pinned()
    terms, rounds, _ = _pinned_round(keys, pinned)
    # The broker's word says o2 sent it, o2's round keys, but another key signed them:
    # "the right user_id, the wrong signing key".
    forger = OwnerRound("o2", terms, torch.zeros(6, dtype=torch.float64), 0.0,
                        Pinning(_signing_key(), pinned))
    with pytest.raises(RoundRefused, match="not signed by its pinned key"):
        rounds["o1"].meet("o2", **forger.introduction())
    assert rounds["o1"].tainted is not None
    # Tainted: the rest of the round is refused, whatever is asked, so nothing is released.
    with pytest.raises(RoundRefused, match="releases nothing"):
        rounds["o1"].meet("o2", **rounds["o2"].introduction())
    with pytest.raises(RoundRefused, match="releases nothing"):
        rounds["o1"].sealed_for("o3")
    with pytest.raises(RoundRefused, match="releases nothing"):
        rounds["o1"].masked(list(OWNERS))
    with pytest.raises(RoundRefused, match="releases nothing"):
        rounds["o1"].reveal({})


@pytest.mark.parametrize("forgery", ["unsigned", "another owner's", "another round's",
                                     "sigma changed"])
def test_pinned_keys_refuse_what_the_sender_did_not_sign(forgery: str) -> None:
    keys, pinned = _pinned()
    terms, rounds, _ = _pinned_round(keys, pinned)
    introduction = rounds["o2"].introduction()
    if forgery == "unsigned":
        introduction["signature"] = None
    elif forgery == "another owner's":  # o3's keys, rightly signed by o3, told as o2's
        introduction = rounds["o3"].introduction()
    elif forgery == "another round's":  # o2's signed keys of an earlier round, replayed
        earlier = RoundTerms(secrets.token_hex(16), *dataclasses.astuple(terms)[1:])
        introduction = OwnerRound("o2", earlier, torch.zeros(6, dtype=torch.float64), 0.0,
                                  Pinning(keys["o2"], pinned)).introduction()
        introduction["digest"] = terms.digest()
    else:  # a smaller noise than o2 needs, to thin the sum's
        introduction["sigma"] = 1.0
    with pytest.raises(RoundRefused, match="unsigned" if forgery == "unsigned"
                       else "not signed by its pinned key"):
        rounds["o1"].meet("o2", **introduction)
    assert rounds["o1"].tainted is not None


def test_pinned_keys_refuse_unknown_owners_and_forged_views() -> None:
    keys, pinned = _pinned()
    terms = RoundTerms(secrets.token_hex(16), "agg", OWNERS, 3, (0.2,) * 5, 6)
    without_o5 = {o: k for o, k in pinned.items() if o != "o5"}
    with pytest.raises(RoundRefused, match="o5: no key pinned"):
        OwnerRound("o1", terms, torch.zeros(6, dtype=torch.float64), 0.0,
                   Pinning(keys["o1"], without_o5))
    _, rounds, _ = _pinned_round(keys, pinned)
    _share(rounds)
    for u in OWNERS:
        rounds[u].masked(list(OWNERS))
        rounds[u].commit(list(OWNERS))
    view, _ = rounds["o2"].signed_view()
    forged = Pinning(_signing_key(), pinned).sign(
        signed_message("view", rounds["o2"].terms.round_id, "o2", [view]))
    with pytest.raises(RoundRefused, match=r"view .* not signed by its pinned key"):
        rounds["o1"].hear("o2", view, forged)
    with pytest.raises(RoundRefused, match="releases nothing"):
        rounds["o1"].reveal({v: rounds[v].view() for v in OWNERS[1:]})
    # Unpinned owners (the broker believed) sign nothing and check nothing, as before.
    assert Pinning(None, None).sign(b"x") is None
    assert Pinning(None, None).doubts("o2", b"x", None) is None


def test_key_files_and_pinned_key_text(tmp_path: Path) -> None:
    public = new_key_file(tmp_path / "o1.key")
    assert (tmp_path / "o1.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "o1.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    key = SigningKey.load(tmp_path / "o1.key")
    assert public_key_text(key.public) == public and read_public_key(public) == key.public
    with pytest.raises(FileExistsError):  # a key is never overwritten
        new_key_file(tmp_path / "o1.key")
    for wrong in ("", "not base64!", public[:-4], 12):
        with pytest.raises(KeyFileError, match="public key"):
            read_public_key(wrong)
    (tmp_path / "x25519.key").write_bytes(_x25519_pem())
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        SigningKey.load(tmp_path / "x25519.key")
    with pytest.raises(KeyFileError, match="keygen"):
        SigningKey.load(tmp_path / "missing.key")
    other = new_key_file(tmp_path / "o2.key")
    key_file = str(tmp_path / "o1.key")
    assert Pinning.of("o1", key_file, {"o1": public, "o2": other}).peers == {
        "o1": key.public, "o2": read_public_key(other)}
    with pytest.raises(KeyFileError, match="another key"):  # a shared table, a wrong entry
        Pinning.of("o1", key_file, {"o1": other})


def _x25519_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.x25519 import (  # noqa: PLC0415
        X25519PrivateKey,
    )
    return X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
