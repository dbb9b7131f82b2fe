"""Secure aggregation with owners' long-term Ed25519 keys pinned in their configs: a
broker whose word for who sent a message is not believed.

Owners o1..o4 and an aggregator `agg`, on both brokers. Each owner signs its round
keys with its own key (`signing_key`) and pins the others' (`peer_keys`), except
that the key pinned for o4 is not the one o4 signs with: o4's key messages come
from o4's account (the right user id) under the wrong key, as an impostor's would.
A round of o1..o3 gives the sum; a round with o4 releases nothing, each honest
owner refusing (and counting) o4's keys; o2 pins no key for o4 and joins no round
with it. On RabbitMQ's shared account, where anyone may claim any name, a session
claiming to be o2 offers o1 keys of its own: refused, and that round releases
nothing either.
"""

from __future__ import annotations

import gc
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import torchrelay as tr
from torchrelay.broker import SecAggIntroduce, SecAggJoin, SecureAggregate
from torchrelay.worker import WorkerProcesses
from torchrelay.worker.operations._config import ConfigError, WorkerConfig
from torchrelay.worker.runtime._secagg import new_private_key, public_bytes
from torchrelay.worker.runtime._signing import (
    Pinning,
    SigningKey,
    new_key_file,
    public_key_text,
    signed_message,
)

tr.hook(torch)

OWNERS = ("o1", "o2", "o3", "o4")
WORKERS = (*OWNERS, "agg")


def _pinned(folder: Path) -> dict[str, dict[str, Any]]:
    """Each owner's `[worker.privacy]` table: its key file and the keys it pins."""
    public = {o: new_key_file(folder / f"{o}.key") for o in OWNERS}
    public["o4"] = new_key_file(folder / "decoy.key")  # not the key o4 signs with
    tables = {}
    for owner in OWNERS:
        pins = {o: k for o, k in public.items() if o != owner and (owner, o) != ("o2", "o4")}
        tables[owner] = {"signing_key": str(folder / f"{owner}.key"), "peer_keys": pins}
    return tables


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return _pinned(tmp_path_factory.mktemp("pinned"))


def _config(owner: str, table: dict[str, Any], folder: Path) -> Path:
    lines = ["[worker]", f'id = "{owner}"', 'broker = "amqp://set-by-flag/"', "",
             "[worker.privacy]", f'signing_key = "{Path(table["signing_key"]).name}"', "",
             "[worker.privacy.peer_keys]", *(f'{o} = "{k}"' for o, k in table["peer_keys"].items())]
    path = folder / f"{owner}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module", params=["embedded", "rabbitmq"])
def daemons(request: pytest.FixtureRequest, tables: dict[str, dict[str, Any]]) -> Any:
    if request.param == "embedded":
        return None
    folder = Path(tables["o1"]["signing_key"]).parent
    factory = request.getfixturevalue("daemons_factory")
    return factory(WORKERS, worker_args={
        o: ["--config", str(_config(o, t, folder))] for o, t in tables.items()}, request=request)


@pytest.fixture
def fleet(daemons: WorkerProcesses | None,
          tables: dict[str, dict[str, Any]]) -> Iterator[tr.Fleet]:
    with tr.connect(None if daemons is None else daemons.url, privacy=tables,
                    timeout=60) as session:
        workers = [session.worker(w) for w in WORKERS]
        before = {w.id: set(w._objects) for w in workers}
        yield session
        gc.collect()
        session.sync()
        assert {w.id: set(w._objects) for w in workers} == before  # nothing left behind


def _refusals(fleet: tr.Fleet, owner: str) -> int:
    return int(fleet.worker(owner).status().get("secagg_refused", 0))


def _aggregate(fleet: tr.Fleet, owners: tuple[str, ...], threshold: int) -> tuple[
        list[torch.Tensor], tr.Release]:
    values = [torch.randn(5) for _ in owners]
    pointers = [v.send(fleet.worker(o)) for v, o in zip(values, owners, strict=True)]
    return values, tr.aggregate(pointers, aggregator=fleet.worker("agg"), secure=True,
                                threshold=threshold)


def test_signed_owners_give_the_sum(fleet: tr.Fleet) -> None:
    before = {o: _refusals(fleet, o) for o in OWNERS[:3]}
    values, release = _aggregate(fleet, OWNERS[:3], 2)
    assert torch.allclose(release.get(), sum(values) / 3, atol=1e-6)
    assert release.dropped == []
    assert {o: _refusals(fleet, o) for o in OWNERS[:3]} == before


def test_a_key_advertisement_under_the_wrong_key_is_refused_and_nothing_released(
        fleet: tr.Fleet) -> None:
    before = {o: _refusals(fleet, o) for o in OWNERS}
    held = set(fleet.worker("agg")._objects)
    # o4's keys come from o4 (the broker says so, rightly) but are signed by a key that
    # is not the one o1 and o3 pinned for o4: both refuse the round, so whatever the
    # threshold, nothing is released.
    with pytest.raises(tr.PrivateDataError, match=r"aborted.*nothing is released"):
        _aggregate(fleet, ("o1", "o3", "o4"), 2)
    assert _refusals(fleet, "o1") > before["o1"] and _refusals(fleet, "o3") > before["o3"]
    assert set(fleet.worker("agg")._objects) == held
    # o2 pins no key for o4: it does not even join.
    pointer = torch.randn(5).send(fleet.worker("o2"))
    with pytest.raises(tr.PrivateDataError, match="o4: no key pinned"):
        fleet.request("o2", SecAggJoin(secrets.token_hex(16), "agg", ["o2", "o3", "o4"], 2,
                                       [1.0] * 3, [pointer.id_at_location]))
    del pointer
    # The next round, among owners whose keys verify, is whole again.
    values, release = _aggregate(fleet, OWNERS[:3], 3)
    assert torch.allclose(release.get(), sum(values) / 3, atol=1e-6)


def test_an_impostor_on_the_shared_account_is_refused(daemons: WorkerProcesses | None,
                                                      fleet: tr.Fleet) -> None:
    if daemons is None:
        pytest.skip("the impostor is a second session claiming an owner's name: RabbitMQ's "
                    "shared account")
    round_id = secrets.token_hex(16)
    pointers = [torch.randn(5).send(fleet.worker(o)) for o in OWNERS[:3]]
    digests = set()
    for pointer in pointers:
        digests.add(fleet.request(pointer.location.id, SecAggJoin(
            round_id, "agg", list(OWNERS[:3]), 3, [1.0] * 3,
            [pointer.id_at_location]))["digest"])
        pointer.garbage_collect = False
    (digest,) = digests
    before = _refusals(fleet, "o1")
    # On guest, a message's sender is whom it claims: "o2" here, with round keys and a
    # long-term key of its own. Without pinning o1 would take them as o2's.
    impostor_key = Pinning(_fresh_key(), None)
    c_public, s_public = (public_bytes(new_private_key()).hex() for _ in range(2))
    fields = [digest, c_public, s_public, (0.0).hex()]
    signature = impostor_key.sign(signed_message("keys", round_id, "o2", fields))
    with tr.connect(daemons.url, name="o2", timeout=60) as impostor, \
            pytest.raises(tr.PrivateDataError, match="not signed by its pinned key"):
        impostor.request("o1", SecAggIntroduce(round_id, digest, c_public, s_public, 0.0,
                                               signature))
    assert _refusals(fleet, "o1") == before + 1
    with pytest.raises(tr.PrivateDataError, match="nothing is released"):
        fleet.request("agg", SecureAggregate(round_id, list(OWNERS[:3]), 3, [1.0] * 3,
                                             [[5]], fleet.new_id()))


def _fresh_key() -> SigningKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )
    return SigningKey(Ed25519PrivateKey.generate())


def test_a_config_pins_keys_relative_to_itself(tmp_path: Path) -> None:
    tables = _pinned(tmp_path)
    config = WorkerConfig.resolve(_config("o1", tables["o1"], tmp_path), broker="amqp://x/")
    assert config.privacy.signing_key == str(tmp_path / "o1.key")
    assert dict(config.privacy.peer_keys or ()) == tables["o1"]["peer_keys"]
    # A fleet's shared table may list the owner itself: then with its own key.
    wrong = {**tables["o4"], "peer_keys": {**tables["o4"]["peer_keys"],
                                           "o4": tables["o1"]["peer_keys"]["o4"]}}
    with pytest.raises(ConfigError, match="pins o4's key, but its signing_key is another"):
        WorkerConfig.resolve(_config("o4", wrong, tmp_path), broker="amqp://x/")
    (tmp_path / "bad.toml").write_text('[worker]\nid = "o1"\n[worker.privacy.peer_keys]\n'
                                       'o2 = "not a key"\n')
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        WorkerConfig.resolve(tmp_path / "bad.toml", broker="amqp://x/")


def test_keygen_makes_a_key_pair_and_prints_the_line_to_pin(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchrelay._cli import main  # noqa: PLC0415

    key = tmp_path / "alice.key"
    assert main(["keygen", "--out", str(key)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == f'alice = "{public_key_text(SigningKey.load(key).public)}"'
    assert main(["keygen", "--out", str(key)]) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err
    assert main(["keygen", "--out", str(key), "--id", "a1", "--show"]) == 0
    assert capsys.readouterr().out.strip() == line.replace("alice", "a1", 1)
