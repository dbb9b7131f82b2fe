"""Owners' long-term Ed25519 keys, pinned in configs: secure aggregation through a
broker that is not trusted.

Without them an owner knows who sent a round's key message only as the broker
says (RabbitMQ's validated `user_id`). A broker that lies — compromised, or run by
the aggregator's operator — could then play the other owners of a round: sit in
the middle of each pair's key agreement, or stand in for every owner but one with
owners of its own making whose inputs it knows, so that the "sum" is one honest
input. With pinning, each owner holds an Ed25519 private key (`signing_key` in its
`[worker.privacy]`, a PEM file `torchrelay keygen` writes) and the other owners'
public keys (`peer_keys`). It signs what it says of itself in a round — its two
X25519 public keys with the round id, its name, the digest of the terms it was
told and the noise it needs; later the digest of the survivors it was told (the
consistency check, which keeps the aggregator from collecting both shares of one
owner) — and accepts another owner's word only signed by that owner's pinned key.
This is Bonawitz et al. 2017's PKI. The X25519 keys stay fresh each round; the
long-term key only vouches for them, and reveals nothing of them.

Signatures are over a canonical JSON list (kind, round, signer, fields), so a
signature for one thing, round or owner is no signature for another. The keys'
text form is the base64 of the raw 32 bytes (as WireGuard's); a key file is
PKCS#8 PEM, so `openssl genpkey -algorithm ed25519` makes one too.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["KeyFileError", "Pinning", "SigningKey", "new_key_file", "public_key_text",
           "read_public_key", "signed_message"]


class KeyFileError(ValueError):
    """A signing key file or a pinned public key that cannot be used (the message says
    why)."""


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: PLC0415
    except ImportError:
        raise KeyFileError("signed secure aggregation needs the cryptography package: pip "
                           "install 'torchrelay[secure]'") from None
    return ed25519


class SigningKey:
    """An owner's long-term Ed25519 private key, read from its PEM file."""

    __slots__ = ("_key", "public")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public: bytes = key.public_key().public_bytes_raw()

    @classmethod
    def load(cls, path: str | Path) -> SigningKey:
        ed25519 = _ed25519()
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise KeyFileError(f"signing_key {path} cannot be read: {e.strerror} (make one "
                               "with `torchrelay keygen --out FILE`)") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise KeyFileError(f"signing_key {path} is not an unencrypted PEM private "
                               f"key: {e}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyFileError(f"signing_key {path} is a {type(key).__name__}, not an "
                               "Ed25519 key")
        return cls(key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def new_key_file(path: str | Path) -> str:
    """Write a new Ed25519 private key to `path` (PKCS#8 PEM, readable by its owner
    only; an existing file is never overwritten) and return its public key's text."""
    ed25519 = _ed25519()
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(pem)
    return public_key_text(key.public_key().public_bytes_raw())


def public_key_text(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def read_public_key(text: object) -> bytes:
    """The 32 raw bytes of a pinned public key given as base64 text."""
    if not isinstance(text, str):
        raise KeyFileError(f"a pinned public key is base64 text, not {text!r}")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise KeyFileError(f"{text[:60]!r} is not an Ed25519 public key (32 bytes in "
                           "base64, as `torchrelay keygen` prints it)")
    return raw


def signed_message(kind: str, round_id: str, signer: str, fields: list[str]) -> bytes:
    """What is signed: unambiguous (JSON), and naming what, which round and who."""
    return json.dumps(["torchrelay secagg " + kind, round_id, signer, *fields]).encode()


@dataclass(frozen=True, slots=True)
class Pinning:
    """A worker's keys for secure rounds: its own (None: it signs nothing) and the
    other owners' pinned public keys (None: it trusts the broker's word for who sent
    a message, and checks no signature)."""

    key: SigningKey | None
    peers: Mapping[str, bytes] | None

    @classmethod
    def of(cls, me: str, signing_key: str | None,
           peer_keys: Mapping[str, str] | None) -> Pinning:
        """From a `[worker.privacy]`'s settings (`signing_key`, `peer_keys`) of worker
        `me`. A shared table of every owner's key may list `me` too: then it must be
        its own key's (a mismatch is a deployment error, said now, not at a round)."""
        key = None if signing_key is None else SigningKey.load(signing_key)
        peers = None if peer_keys is None else {
            name: read_public_key(text) for name, text in peer_keys.items()}
        if peers is not None and me in peers and (key is None or peers[me] != key.public):
            raise KeyFileError(f"peer_keys pins {me}'s key, but its signing_key is "
                               f"{'missing' if key is None else 'another key'}")
        return cls(key, peers)

    def sign(self, message: bytes) -> str | None:
        """The signature's hex (None when this worker has no signing key)."""
        return None if self.key is None else self.key.sign(message).hex()

    def doubts(self, signer: str, message: bytes, signature: str | None) -> str | None:
        """Why `message` is not taken as `signer`'s (None: it is, or nothing is pinned)."""
        if self.peers is None:
            return None
        public = self.peers.get(signer)
        if public is None:
            return "from an owner whose key is not pinned"
        if not signature:
            return "unsigned"
        ed25519 = _ed25519()
        from cryptography.exceptions import InvalidSignature  # noqa: PLC0415
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(public).verify(
                bytes.fromhex(signature), message)
        except (InvalidSignature, ValueError):
            return "not signed by its pinned key"
        return None
