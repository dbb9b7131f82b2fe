"""Privacy the data owner's worker enforces, tried as an attacker would, on both brokers.

bob and alice hold private data (k = 2, trusted = secure_worker); dave and erin
the same with a budget of one release each; frank opts in to releasing scalars;
carol holds nothing and is trusted by no one. Every way out is tried — fetching,
arithmetic tricks, moves, chains, forged stores, error messages, listings,
models and their gradients — and must be refused with the data left in place;
the one way out, `tr.aggregate`, must hold to its rules and its budgets.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchrelay as tr
from torchrelay.broker import ChargePrivacy, Fetch, Grant, PointerRef, Pull, Store
from torchrelay.worker import WorkerProcesses

tr.hook(torch)

POLICY: dict[str, Any] = {"k": 2, "clip": 1.0, "noise_multiplier": 1.0, "epsilon": 50.0,
                          "delta": 1e-5, "trusted": ["secure_worker"]}
OWNERS: dict[str, dict[str, Any]] = {
    "bob": POLICY, "alice": POLICY,
    "dave": {**POLICY, "epsilon": 5.0}, "erin": {**POLICY, "epsilon": 5.0},  # one release
    "frank": {**POLICY, "release_scalars": True},
}
WORKERS = (*OWNERS, "carol", "secure_worker")
SECRET = 7919.0  # a value that must never appear anywhere the client can read


def _data(owner: str) -> torch.Tensor:
    return torch.arange(12, dtype=torch.float32).view(6, 2) + SECRET * (1 + list(OWNERS).index(
        owner))


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("private")
    paths = {}
    for owner, policy in OWNERS.items():
        save_file({"data": _data(owner), "target": torch.arange(6)},
                  str(folder / f"{owner}.safetensors"))
        lines = ["[worker]", f'id = "{owner}"', 'broker = "amqp://set-by-flag/"', "",
                 "[[worker.datasets]]", f'path = "{owner}.safetensors"', 'tags = ["#secret"]',
                 "", "[worker.privacy]",
                 *(f"{k} = {json.dumps(v)}" for k, v in policy.items()),
                 f'ledger = "{owner}.privacy.json"']
        paths[owner] = folder / f"{owner}.toml"
        paths[owner].write_text("\n".join(lines) + "\n")
    return paths


@pytest.fixture(scope="module", params=["embedded", "rabbitmq"])
def private_url(request: pytest.FixtureRequest, configs: dict[str, Path]) -> Iterator[Any]:
    if request.param == "embedded":
        yield None
        return
    daemons: WorkerProcesses = request.getfixturevalue("daemons_factory")(
        WORKERS, worker_args={owner: ["--config", str(path)] for owner, path in configs.items()},
        request=request)
    yield daemons


@pytest.fixture
def fleet(private_url: Any, configs: dict[str, Path]) -> Iterator[tr.Fleet]:
    url = None if private_url is None else private_url.url
    datasets = {o: [f"{configs[o].parent / o}.safetensors:#secret"] for o in OWNERS}
    with tr.connect(url, datasets=datasets, privacy=OWNERS, timeout=60) as session:
        workers = [session.worker(w) for w in WORKERS]
        before = {w.id: set(w._objects) for w in workers}
        yield session
        gc.collect()
        session.sync()
        after = {w.id: set(w._objects) for w in workers}
        assert after == before  # nothing left, nothing lost


def _secret(fleet: tr.Fleet, owner: str) -> tr.PointerTensor:
    (found,) = fleet.worker(owner).search("#secret")
    assert found.private and found.privacy is not None and found.privacy["k"] == 2
    return found["data"]


def _refused(pointer: Any, rule: str = "cannot be fetched") -> None:
    with pytest.raises(tr.PrivateDataError, match=rule):
        pointer.get()


def _no_secret_in(text: str) -> None:
    # Object ids are random 53-bit integers: one may hold the digits 7919 by chance.
    text = re.sub(r"(?<![\d.])\d{10,}(?![\d.])", "<id>", text)
    assert "7919" not in text and "7,919" not in text and "7.919" not in text


def test_nothing_derived_from_private_data_comes_back(fleet: tr.Fleet) -> None:
    bob = fleet.worker("bob")
    data = _secret(fleet, "bob")
    assert (data.shape, data.dtype) == (torch.Size([6, 2]), torch.float32)  # shape is fine
    for derived in (data, data[3, 1], data.sum(), data.sum() * 0, data.mean(0),
                    (data > 0).any()):
        _refused(derived)
    for python_values in (data.tolist, data.sum().item):  # their size would tell values
        with pytest.raises(tr.PrivateDataError, match="no shape-only form"):
            python_values().get()
    mine = torch.ones(2).send(bob)
    _refused(mine + 0 * data[0])  # an arithmetic trick: still derived from it
    assert torch.equal(mine.get(), torch.ones(2))  # used as an input, still the client's
    changed = torch.zeros(2).send(bob)
    changed.add_(data[0])  # changed in place by private data: private now
    _refused(changed)
    copied = torch.zeros(6, 2).send(bob)
    copied.copy_(data)
    _refused(copied)
    assigned = torch.zeros(2).send(bob)
    assigned[0] = data[0, 0]
    _refused(assigned)
    view = torch.zeros(2).send(bob)
    alias = view[0:1]
    alias.add_(data[0, 0])  # through a view: the memory is what counts
    _refused(view)
    listed = bob._objects
    _no_secret_in(repr(listed))
    assert any("private to bob" in str(d) for d in listed.values())


def test_models_and_their_gradients_trained_on_private_data_stay(fleet: tr.Fleet) -> None:
    bob = fleet.worker("bob")
    data = _secret(fleet, "bob")
    model = nn.Linear(2, 1).send(bob)
    untouched = model.copy()
    assert untouched.get().weight.shape == (1, 2)  # the client's own model: fine
    model(data).sum().backward()
    _refused(model.weight.grad)
    _refused(model.weight)  # its gradients came from the data
    _refused(model.weight.data)
    _refused(model.state_dict()["bias"])
    with pytest.raises(tr.PrivateDataError):
        model.copy().get()
    with pytest.raises(tr.PrivateDataError):
        model.get()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.step()
    _refused(model.bias)
    norm = nn.BatchNorm1d(2).send(bob)
    norm.train()
    norm(data)  # running statistics updated in place from the data
    _refused(norm.running_mean)
    with pytest.raises(tr.PrivateDataError):
        ((model.weight.data + model.weight.data) / 2).get()  # the seed's average
    with pytest.raises(tr.PrivateDataError, match=r"tr\.aggregate"):
        model.bias.get()


def test_errors_about_private_data_do_not_say_what_it_holds(fleet: tr.Fleet) -> None:
    bob = fleet.worker("bob")
    data = _secret(fleet, "bob")
    data[100]  # out of range for its shape: refused from the shapes alone, saying so
    with pytest.raises(tr.PrivateDataError, match="fails on arguments of these shapes") as e:
        fleet.sync()
    assert "size 6" in str(e.value) and not e.value.remote_traceback
    _no_secret_in(str(e.value))
    torch.ones(3).send(bob)[100]  # on the client's own data, the error says it all
    with pytest.raises(tr.RemoteError, match="100"):
        fleet.sync()
    # Singular: on the client's data an error, on private data not even that (whether
    # it failed would tell the values): a result of its shape, NaN, private.
    inverse = torch.linalg.inv(data[0:2] - data[0:2])
    fleet.sync()
    assert inverse.shape == (2, 2)
    _refused(inverse)


def test_private_data_moves_only_where_its_owner_trusts(fleet: tr.Fleet) -> None:
    carol, secure = fleet.worker("carol"), fleet.worker("secure_worker")
    data = _secret(fleet, "bob")
    for attempt in (lambda: data.clone().move(carol),
                    lambda: data.clone().remote_send(carol)):
        with pytest.raises(tr.PrivateDataError, match="may move only to workers 'bob' trusts"):
            attempt()
    held = data.sum(0).move(secure)  # trusted: allowed, and still private there
    _refused(held)
    with pytest.raises(tr.PrivateDataError, match="may go back to its owner"):
        held.clone().move(carol)
    chained = data.clone().send(carol)  # carol holds a pointer, not the data
    with pytest.raises(tr.PrivateDataError, match="may move only"):
        chained.remote_get()  # carol pulling it from bob
    far = chained * 2  # runs on bob, down the chain
    _refused(far.get())
    _refused(chained.get())
    back = held.move(fleet.worker("bob"))  # back to its owner: allowed
    _refused(back)


def test_a_result_fetched_by_its_own_call_is_refused_and_kept(fleet: tr.Fleet) -> None:
    # `(data + 1).get()` goes as one command, the call told to fetch its result: the
    # fetch's checks hold, and a refused fetch leaves the result, as a `fetch` does.
    bob = fleet.worker("bob")
    data = _secret(fleet, "bob")
    fleet.sync()
    before = set(bob._objects)
    sent: list[str] = []
    endpoint_send = fleet.endpoint.send_command
    fleet.endpoint.send_command = lambda *a, **k: (sent.append(a[1]), endpoint_send(*a, **k))
    try:
        doubled = data * 2
        with pytest.raises(tr.PrivateDataError, match="cannot be fetched") as refused:
            doubled.get()
    finally:
        del fleet.endpoint.send_command
    assert sent == ["call"]  # one command
    assert refused.value.operation == "call Tensor.__mul__ and fetch its result"
    assert set(bob._objects) == before | {doubled.id_at_location}
    del doubled, refused  # collected: deleted


def test_forged_stores_do_not_launder_private_data(fleet: tr.Fleet) -> None:
    secure = fleet.worker("secure_worker")
    data = _secret(fleet, "bob")
    target = data.clone()
    # A pointer to bob's data stored on secure_worker, claiming no provenance at all...
    laundered = fleet.new_id()
    fleet.request("bob", Grant(target.id_at_location, "secure_worker"))  # as a send does
    fleet.request("secure_worker", Store(laundered, PointerRef("bob", target.id_at_location),
                                         provenance=[]))
    fleet.request("secure_worker", Pull(laundered))  # ...made to pull the data there
    target.garbage_collect = False
    with pytest.raises(tr.PrivateDataError, match="derives from private data of bob"):
        fleet.request("secure_worker", Fetch(laundered))
    tr.PointerTensor(secure, laundered)  # collected: deleted
    # A client's own data claiming an owner only makes it private, never the reverse.
    claimed = fleet.new_id()
    fleet.request("carol", Store(claimed, torch.ones(2), provenance=["bob"]))
    with pytest.raises(tr.PrivateDataError):
        fleet.request("carol", Fetch(claimed))
    tr.PointerTensor(fleet.worker("carol"), claimed)
    # A release charged in the name of an untrusted sender (this client) is refused.
    with pytest.raises(tr.PrivateDataError, match="is not trusted by 'bob'"):
        fleet.request("bob", ChargePrivacy(5))


def test_aggregation_is_the_way_out_and_holds_to_its_rules(fleet: tr.Fleet) -> None:
    bob, alice, secure = (fleet.worker(w) for w in ("bob", "alice", "secure_worker"))
    b, a = _secret(fleet, "bob"), _secret(fleet, "alice")

    def contribution(data: tr.PointerTensor) -> tr.PointerTensor:
        return data.mean(0).move(secure)

    release = tr.aggregate([contribution(b), contribution(a)])
    average = release.get()
    assert average.shape == (2,) and torch.isfinite(average).all()
    assert set(release.epsilon) == {"bob", "alice"} and all(e > 0 for e in
                                                            release.epsilon.values())
    assert release.delta == {"bob": 1e-5, "alice": 1e-5} and release.noise_std > 0
    assert not hasattr(release, "clipped")  # whether a contribution was long tells its data
    assert float(average.norm()) < 50  # clipped to 1 each, then noise: no row of data

    spent = [contribution(b), contribution(a)]
    tr.aggregate(spent)
    with pytest.raises(tr.RemoteError, match="no object"):  # each is averaged once
        tr.aggregate(spent)
    with pytest.raises(tr.PrivateDataError, match="at least 2 data owners"):
        tr.aggregate([contribution(b)])
    with pytest.raises(tr.PrivateDataError, match="weights must be positive"):
        tr.aggregate([contribution(b), contribution(a)], [1.0, 0.0])
    with pytest.raises(tr.PrivateDataError, match="'bob' contributes twice"):
        tr.aggregate([contribution(b), contribution(b)])
    with pytest.raises(tr.PrivateDataError, match="public and private contributions do not"):
        tr.aggregate([contribution(b), torch.ones(2).send(secure)])
    both = torch.cat([contribution(b), contribution(a)])  # two owners in one
    _refused(both)
    with pytest.raises(tr.PrivateDataError, match="exactly one data owner"):
        tr.aggregate([both[0:2], contribution(a)])
    mine = tr.aggregate([torch.ones(2).send(secure), torch.zeros(2).send(secure)], [3, 1])
    assert torch.equal(mine.get(), torch.full((2,), 0.75)) and mine.epsilon == {}
    moved = tr.aggregate([b.mean(0), a.mean(0)], aggregator=secure)  # moved there first
    assert moved.get().shape == (2,)
    assert all(bob.search("#secret")) and all(alice.search("#secret"))


def test_an_owner_whose_budget_is_spent_refuses_to_contribute(fleet: tr.Fleet) -> None:
    secure = fleet.worker("secure_worker")
    d, e = _secret(fleet, "dave"), _secret(fleet, "erin")
    first = tr.aggregate([d.mean(0), e.mean(0)], aggregator=secure)
    assert 4 < first.epsilon["dave"] <= 5.0
    first.get()
    with pytest.raises(tr.PrivateDataError, match=r"privacy budget of 'dave' is spent"):
        d.mean(0).move(secure)  # no more contributions
    with pytest.raises(tr.PrivateDataError, match=r"budget of 'dave' is spent"):
        tr.aggregate([d.sum(0), e.sum(0)], aggregator=secure)


def test_an_owner_may_opt_in_to_releasing_scalars(fleet: tr.Fleet) -> None:
    data = _secret(fleet, "frank")
    assert data.sum().get().item() == pytest.approx(float(_data("frank").sum()))
    _refused(data[0])  # not a scalar
    _refused(_secret(fleet, "bob").sum())  # bob did not opt in


def test_private_data_stays_private_across_an_executor_crash_and_a_restart(
    fleet: tr.Fleet, private_url: Any
) -> None:
    if private_url is None:
        pytest.skip("daemons only: the embedded broker has no executor or ledger file")
    daemons: WorkerProcesses = private_url
    bob = fleet.worker("bob")
    data = _secret(fleet, "bob")
    summed = data.sum(0)
    changed = torch.zeros(2).send(bob)
    changed.add_(data[0])
    fleet.sync()
    os.kill(int(bob.status()["executor_pid"]), signal.SIGKILL)
    assert bob.status()["executor_restarts"] >= 1
    _refused(summed)
    _refused(changed)
    # The ledger outlives the daemon: restarted, erin has still spent her release.
    secure = fleet.worker("secure_worker")
    ledger = private_url_ledger(daemons, "erin")
    if not ledger.exists():
        tr.aggregate([_secret(fleet, "dave").mean(0), _secret(fleet, "erin").mean(0)],
                     aggregator=secure).get()
    assert json.loads(ledger.read_text())["releases"] == {"1.0": 1}
    assert daemons.stop("erin") == 0
    daemons.restart("erin")
    with pytest.raises(tr.PrivateDataError, match=r"budget of 'erin' is spent"):
        _secret(fleet, "erin").mean(0).move(secure)


def private_url_ledger(daemons: WorkerProcesses, owner: str) -> Path:
    """Where `owner`'s daemon keeps its ledger: next to its config."""
    config = Path(daemons.worker_args[owner][1])
    return config.parent / f"{owner}.privacy.json"
