"""`tr.dp_train`: DP-SGD the owner's worker runs, tried as an attacker would, on both brokers.

bob, frank and dave protect records (`unit = "record"`): bob with a large budget
for the hostile cases, frank for the accounting, dave with a budget of one run.
carol protects its data as a whole (`unit = "owner"`); secure_worker holds nothing
and is trusted by no one. On RabbitMQ, erin is a daemon started for the test suite
(`--fault-injection`): it accepts a seed, so its DP-SGD is compared step for step
with the reference of `test_dpsgd.py`.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from test_dpsgd import reference_step
from torch import nn

import torchrelay as tr
from torchrelay.broker import DefinePlan, DpTrain
from torchrelay.client._dp_train import _train, request_for
from torchrelay.worker import WorkerProcesses
from torchrelay.worker.runtime._dpsgd import DpSgdSettings, sample_rate, steps_for
from torchrelay.worker.runtime._privacy import epsilon_of

tr.hook(torch)

F = nn.functional
RECORD: dict[str, Any] = {"unit": "record", "clip": 1.0, "noise_multiplier": 1.0,
                          "epsilon": 1000.0, "delta": 1e-5}
OWNERS: dict[str, dict[str, Any]] = {
    "bob": RECORD, "frank": RECORD, "erin": RECORD,
    "dave": {**RECORD, "epsilon": 5.0},  # one run of 5 steps at q 0.2 costs 4.54, two 5.76
    "carol": {**RECORD, "unit": "owner", "epsilon": 50.0},
}
WORKERS = (*OWNERS, "secure_worker")
SAMPLES, LR, BATCH = 40, 0.5, 8


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _records() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return (torch.randn(SAMPLES, 6, generator=generator) * 3,
            torch.randint(0, 3, (SAMPLES,), generator=generator))


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dp-train")
    data, target = _records()
    paths = {}
    for owner, policy in OWNERS.items():
        save_file({"data": data, "target": target}, str(folder / f"{owner}.safetensors"))
        lines = ["[worker]", f'id = "{owner}"', 'broker = "amqp://set-by-flag/"', "",
                 "[[worker.datasets]]", f'path = "{owner}.safetensors"', 'tags = ["#records"]',
                 "", "[worker.privacy]", *(f"{k} = {json.dumps(v)}" for k, v in policy.items()),
                 f'ledger = "{owner}.privacy.json"']
        paths[owner] = folder / f"{owner}.toml"
        paths[owner].write_text("\n".join(lines) + "\n")
    return paths


@pytest.fixture(scope="module", params=["embedded", "rabbitmq"])
def private_url(request: pytest.FixtureRequest, configs: dict[str, Path]) -> Iterator[Any]:
    if request.param == "embedded":
        yield None
        return
    arguments = {owner: ["--config", str(path)] for owner, path in configs.items()}
    arguments["erin"].append("--fault-injection")
    daemons: WorkerProcesses = request.getfixturevalue("daemons_factory")(
        WORKERS, worker_args=arguments, request=request)
    yield daemons


@pytest.fixture
def fleet(private_url: Any, configs: dict[str, Path]) -> Iterator[tr.Fleet]:
    url = None if private_url is None else private_url.url
    datasets = {o: [f"{configs[o].parent / o}.safetensors:#records"] for o in OWNERS}
    with tr.connect(url, datasets=datasets, privacy=OWNERS, timeout=120) as session:
        workers = [session.worker(w) for w in WORKERS]
        before = {w.id: set(w._objects) for w in workers}
        yield session
        gc.collect()
        session.sync()
        after = {w.id: set(w._objects) for w in workers}
        assert after == before  # nothing of a run left behind, nothing lost


def _refused(rule: str) -> Any:
    """The worker refused (an `OperationRefused` there, relayed as a `RemoteError`)."""
    return pytest.raises(tr.RemoteError, match=f"OperationRefused: .*{rule}")


def _dataset(fleet: tr.Fleet, owner: str) -> tr.DatasetPointer:
    (found,) = fleet.worker(owner).search("#records")
    assert found.private
    return found


def _train_on(fleet: tr.Fleet, owner: str, loss: Any = F.cross_entropy,
              model: nn.Module | None = None, **options: Any) -> tr.Release:
    pointer = (model or _model()).send(fleet.worker(owner))
    return tr.dp_train(pointer, _dataset(fleet, owner), loss,
                       **{"lr": LR, "batch_size": BATCH, **options})


def test_the_released_model_leaves_and_the_worker_charged_what_dp_accounting_says(
        fleet: tr.Fleet) -> None:
    rate, steps = sample_rate(SAMPLES, BATCH), steps_for(SAMPLES, BATCH, 2)
    release = _train_on(fleet, "frank", epochs=2)
    expected = epsilon_of({}, {(rate, 1.0): steps}, 1e-5)
    assert release.epsilon["frank"] == pytest.approx(expected, rel=0.01)
    assert (release.steps, release.sample_rate, release.noise_multiplier) == (steps, rate, 1.0)
    assert release.delta == {"frank": 1e-5}
    # released by its owner: it may go anywhere, even to a worker nobody trusts
    trained = tr.Release(release.value.move(fleet.worker("secure_worker")), {}, {}, 0.0,
                         release.template).get()
    assert isinstance(trained, nn.Sequential)
    assert not torch.equal(trained[0].weight, _model()[0].weight)  # it did train
    again = _train_on(fleet, "frank", epochs=2)  # training again charges again
    assert again.epsilon["frank"] == pytest.approx(
        epsilon_of({}, {(rate, 1.0): 2 * steps}, 1e-5), rel=0.01)
    assert again.epsilon["frank"] > release.epsilon["frank"]
    again.get()


def test_past_the_budget_the_owner_refuses_before_training(fleet: tr.Fleet) -> None:
    first = _train_on(fleet, "dave")
    assert 4.5 < first.epsilon["dave"] < 5.0
    first.get()
    with pytest.raises(tr.PrivateDataError, match=r"budget of 'dave' is spent.*would make"):
        _train_on(fleet, "dave")


def test_a_loss_may_not_read_private_data_beyond_its_example(fleet: tr.Fleet) -> None:
    data, _target = _dataset(fleet, "bob")
    for hostile in (lambda out, y: F.cross_entropy(out, y) + 0 * data.mean(),  # whole dataset
                    lambda out, y: F.cross_entropy(out + data[0:1, 0:3], y)):  # another record
        with pytest.raises(tr.PrivateDataError, match=r"reads object .* private data of bob"):
            _train_on(fleet, "bob", hostile)
    public = torch.tensor([0.5, -0.5, 0.0]).send(fleet.worker("bob"))  # a public constant: fine
    _train_on(fleet, "bob", lambda out, y: F.cross_entropy(out + public, y)).get()


def test_a_loss_cannot_cross_examples(fleet: tr.Fleet) -> None:
    normed = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    with pytest.raises(tr.OperationRefused, match="statistics over the batch"):
        _train_on(fleet, "bob", model=normed)  # batch norm in training mode (said locally)
    _train_on(fleet, "bob", model=normed.eval()).get()  # its public running statistics: fine
    # a mean "over the batch" is computed per example, on a batch of one: it trains
    _train_on(fleet, "bob", lambda out, y: F.cross_entropy(out - out.mean(0), y)).get()
    with _refused("in place"):
        _train_on(fleet, "bob", lambda out, y: F.cross_entropy(out.add_(1), y))


def test_less_noise_than_the_owner_accepts_is_refused(fleet: tr.Fleet) -> None:
    with pytest.raises(tr.PrivateDataError, match="noise multiplier of at least 1"):
        _train_on(fleet, "bob", noise_multiplier=0.5)
    _train_on(fleet, "bob", noise_multiplier=2.0).get()  # more is fine


def test_a_model_derived_from_private_data_is_refused(fleet: tr.Fleet) -> None:
    bob = fleet.worker("bob")
    data, _ = _dataset(fleet, "bob")
    model = _model().send(bob)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(data), _dataset(fleet, "bob")["target"]).backward()
    optimizer.step()  # trained outside DP-SGD: the client could release it by dp_train
    with pytest.raises(tr.PrivateDataError, match="derives from private data of bob"):
        tr.dp_train(model, _dataset(fleet, "bob"), F.cross_entropy, lr=LR, batch_size=BATCH)


def test_only_the_datasets_as_loaded_and_only_record_owners(fleet: tr.Fleet) -> None:
    data, _target = _dataset(fleet, "bob")
    model = _model().send(fleet.worker("bob"))
    command, _plan, _result = request_for(model, _dataset(fleet, "bob"), F.cross_entropy,
                                          lr=LR, batch_size=BATCH)
    derived = data.cumsum(0)  # each row mixes records: not a dataset
    forged = DpTrain(**{**{k: getattr(command, k) for k in command._names},
                        "dataset": derived.id_at_location})
    with _refused("not a dataset"):
        fleet.request("bob", forged)
    with pytest.raises(tr.PrivateDataError, match="privacy unit 'owner'"):
        _train_on(fleet, "carol")


def test_the_worker_keeps_its_randomness_unless_started_for_tests(fleet: tr.Fleet) -> None:
    model = _model().send(fleet.worker("bob"))
    with _refused("seed is refused"):
        _train(model, _dataset(fleet, "bob"), F.cross_entropy, seed=1, lr=LR,
               batch_size=BATCH)


def test_a_forged_loss_plan_updating_in_place_is_refused(fleet: tr.Fleet) -> None:
    bob = fleet.worker("bob")
    model = _model().send(bob)
    command, plan, _result = request_for(model, _dataset(fleet, "bob"), F.cross_entropy,
                                         lr=LR, batch_size=BATCH)
    x, y = plan.location.fleet.new_id(), plan.location.fleet.new_id()
    weights = [p.id_at_location for p in model.parameters()]
    forged = tr.PointerTensor(bob, fleet.new_id())
    fleet.post("bob", DefinePlan(forged.id_at_location, [x, y, *weights], [
        {"op": "Tensor.mul_", "args": [tr.broker.ObjectRef(x), 2.0], "kwargs": {},
         "result_id": None},
        {"op": "Tensor.sum", "args": [tr.broker.ObjectRef(x)], "kwargs": {},
         "result_id": 17}], [17]))
    with _refused("in place"):
        fleet.request("bob", DpTrain(**{**{k: getattr(command, k) for k in command._names},
                                        "loss": forged.id_at_location}))
    normed = tr.PointerTensor(bob, fleet.new_id())  # batch norm, training, forged
    fleet.post("bob", DefinePlan(normed.id_at_location, [x, y, *weights], [
        {"op": "F.batch_norm", "args": [tr.broker.ObjectRef(x), None, None, None, None, True,
                                        0.1, 1e-5], "kwargs": {}, "result_id": 18},
        {"op": "Tensor.sum", "args": [tr.broker.ObjectRef(18)], "kwargs": {},
         "result_id": 19}], [19]))
    with _refused("statistics over the batch"):
        fleet.request("bob", DpTrain(**{**{k: getattr(command, k) for k in command._names},
                                        "loss": normed.id_at_location}))
    huge = tr.PointerTensor(bob, fleet.new_id())  # checked as calls are, before it runs
    fleet.post("bob", DefinePlan(huge.id_at_location, [x, y, *weights], [
        {"op": "torch.ones", "args": [1 << 40], "kwargs": {}, "result_id": 20},
        {"op": "Tensor.sum", "args": [tr.broker.ObjectRef(20)], "kwargs": {},
         "result_id": 21}], [21]))
    with pytest.raises(tr.RemoteError, match="max_elements"):
        fleet.request("bob", DpTrain(**{**{k: getattr(command, k) for k in command._names},
                                        "loss": huge.id_at_location}))


def test_with_a_test_seed_the_worker_equals_the_reference_step_for_step(
        fleet: tr.Fleet, private_url: Any) -> None:
    if private_url is None:
        pytest.skip("a seed needs a worker started with --fault-injection (a daemon)")
    data, target = _records()
    settings = DpSgdSettings(clip=1.0, noise_multiplier=1.0, lr=LR, batch_size=BATCH)
    for epochs in (1, 2):
        model = _model().send(fleet.worker("erin"))
        trained = _train(model, _dataset(fleet, "erin"), F.cross_entropy, seed=21,
                         lr=LR, batch_size=BATCH, epochs=epochs).get()
        reference = _model()
        generator = torch.Generator().manual_seed(21)
        for _ in range(steps_for(SAMPLES, BATCH, epochs)):
            reference_step(reference, data, target, settings, generator)
        for ours, theirs in zip(trained.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-5, rtol=1e-5)


def test_fedavg_trains_by_dp_train_when_owners_protect_records(fleet: tr.Fleet) -> None:
    datasets = [_dataset(fleet, "bob"), _dataset(fleet, "erin")]
    # secure_worker is trusted by no one: the released models need no trust
    fedavg = tr.FedAvg(_model(), F.cross_entropy, aggregator=fleet.worker("secure_worker"),
                       batch_size=BATCH, lr=LR, progress=False)
    before = [p.detach().clone() for p in fedavg.model.parameters()]
    history = fedavg.fit(datasets, 2)
    one_run = epsilon_of({}, {(sample_rate(SAMPLES, BATCH), 1.0): steps_for(SAMPLES, BATCH, 1)},
                         1e-5)
    for result in history:
        assert result.participants == ["bob", "erin"] and not result.left_out
        assert result.samples == 2 * SAMPLES and result.delta == {"bob": 1e-5, "erin": 1e-5}
        assert result.epsilon["bob"] >= one_run * 0.999  # a local epoch at least, charged
    assert history[1].epsilon["erin"] > history[0].epsilon["erin"]
    assert all(not torch.equal(a, b) for a, b in zip(before, fedavg.model.parameters(),
                                                     strict=True))


def test_a_fedavg_round_an_owner_cannot_afford_leaves_the_model_as_it_was(
        fleet: tr.Fleet) -> None:
    fedavg = tr.FedAvg(_model(), F.cross_entropy, aggregator=fleet.worker("secure_worker"),
                       batch_size=BATCH, lr=LR, progress=False)
    history = fedavg.fit([_dataset(fleet, "dave")], 2)  # dave affords one run at most
    before = [p.detach().clone() for p in fedavg.model.parameters()]
    refused = fedavg.fit([_dataset(fleet, "dave")], 1)[-1]
    assert not refused.updated and refused.epsilon == {}
    assert "budget of 'dave' is spent" in refused.left_out["dave"]
    assert all(torch.equal(a, b) for a, b in zip(before, fedavg.model.parameters(),
                                                 strict=True))
    assert not history[-1].updated  # the second round already could not be afforded
