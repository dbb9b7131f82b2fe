"""FedAvg by secure aggregation on the digits (the Flower anchor's workload): the
aggregator, trusted by no one, learns only each round's sum. On public shares every
round's accuracy is the plain run's (the fixed point's error is far below what moves
a prediction); on private ones each owner adds its share of the noise, and accuracy
stays within the DP run's margin."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_fedavg import DP_ACCURACY_FLOOR, ROUNDS, _dataset_args, _reference_accuracies
from torch import nn

import torchrelay as tr
from torchrelay._federated import (
    AGGREGATOR,
    BATCH_SIZE,
    DEMO_PRIVACY,
    DIGIT_OWNERS,
    DP_LEARNING_RATE,
    accuracy,
    anchor_order,
    load_digits,
    make_model,
    record_privacy,
    write_shares,
)
from torchrelay.broker import Call, Delete, ObjectRef

tr.hook(torch)

RECORD_ROUNDS = 5
SECURE_PRIVACY: dict[str, Any] = {**DEMO_PRIVACY, "trusted": [], "secure_aggregation": True}


@pytest.fixture(scope="module")
def shares(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_shares(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module", params=["embedded", "rabbitmq"])
def digits_fleet(request: pytest.FixtureRequest, shares: dict[str, Path]) -> Iterator[tr.Fleet]:
    url = None
    if request.param == "rabbitmq":
        daemons = request.getfixturevalue("daemons_factory")(
            (*DIGIT_OWNERS, AGGREGATOR), "--torch-threads", "1",
            worker_args=_dataset_args(shares), request=request)
        url = daemons.url
    with tr.connect(url, datasets={o: [{"path": str(p), "tags": ["#digits"], "private": False}]
                                   for o, p in shares.items()}) as fleet:
        yield fleet


def _evaluate(model: nn.Module) -> dict[str, float]:
    digits = load_digits()
    return {"accuracy": accuracy(model, digits.test_data, digits.test_target)}


def test_secure_fedavg_reaches_the_plain_runs_accuracy(digits_fleet: tr.Fleet) -> None:
    fleet = digits_fleet
    datasets = [d for owner in DIGIT_OWNERS for d in fleet.worker(owner).search("#digits")]
    fedavg = tr.FedAvg(make_model(), F.cross_entropy, aggregator=fleet.worker(AGGREGATOR),
                       order=anchor_order, progress=False, secure=True)
    history = fedavg.fit(datasets, ROUNDS, _evaluate)
    plain = _reference_accuracies(ROUNDS)
    assert all(abs(r.metrics["accuracy"] - p) <= 0.005
               for r, p in zip(history, plain, strict=True))
    assert all(r.participants == sorted(DIGIT_OWNERS) and r.samples == 1437
               and not r.left_out for r in history)
    assert history[0].loss > history[-1].loss > 0
    assert fleet.worker(AGGREGATOR)._objects == {}  # each round's sum fetched, nothing kept


def test_secure_fedavg_with_private_shares_adds_the_owners_noise(
        shares: dict[str, Path]) -> None:
    datasets = {o: [f"{p}:#digits"] for o, p in shares.items()}  # private: the default
    with tr.connect(datasets=datasets,
                    privacy=dict.fromkeys(DIGIT_OWNERS, SECURE_PRIVACY)) as fleet:
        found = [d for owner in DIGIT_OWNERS for d in fleet.worker(owner).search("#digits")]
        fedavg = tr.FedAvg(make_model(), F.cross_entropy, aggregator=fleet.worker(AGGREGATOR),
                           batch_size=BATCH_SIZE, order=anchor_order, progress=False,
                           lr=DP_LEARNING_RATE, secure=True)
        history = fedavg.fit(found, ROUNDS, _evaluate)
    assert history[-1].metrics["accuracy"] >= DP_ACCURACY_FLOOR
    assert all(set(r.epsilon) == set(DIGIT_OWNERS) for r in history)
    assert 0 < history[-1].epsilon["bob"] <= DEMO_PRIVACY["epsilon"]
    assert all(math.isnan(r.loss) for r in history)  # the loss is private too


def test_secure_fedavg_of_record_private_owners_sums_their_dp_sgd_models(
        shares: dict[str, Path]) -> None:
    # Owners that protect records and let their data out only in secure aggregates:
    # each trains by DP-SGD, keeps its model, and only the sum of the models leaves.
    policy = {**record_privacy(epsilon=8.0, rounds=RECORD_ROUNDS + 1), "k": 2,
              "secure_aggregation": True}
    datasets = {o: [f"{p}:#digits"] for o, p in shares.items()}
    with tr.connect(datasets=datasets, privacy=dict.fromkeys(DIGIT_OWNERS, policy)) as fleet:
        found = [d for owner in DIGIT_OWNERS for d in fleet.worker(owner).search("#digits")]
        fedavg = tr.FedAvg(make_model(), F.cross_entropy, aggregator=fleet.worker(AGGREGATOR),
                           batch_size=BATCH_SIZE, progress=False, lr=DP_LEARNING_RATE,
                           secure=True)
        history = fedavg.fit(found, RECORD_ROUNDS, _evaluate)
        # one owner's DP-SGD model alone does not leave
        alone = tr.dp_train(make_model().send(fleet.worker("bob")), found[0],
                            F.cross_entropy, lr=DP_LEARNING_RATE, batch_size=BATCH_SIZE)
        with pytest.raises(tr.PrivateDataError):
            alone.get()
    assert all(r.participants == sorted(DIGIT_OWNERS) for r in history)
    assert all(set(r.epsilon) == set(DIGIT_OWNERS) for r in history)
    assert history[-1].epsilon["bob"] <= 8.0
    assert history[-1].metrics["accuracy"] >= 0.5  # it learns (at epsilon 8, few rounds)


def test_an_id_reused_for_other_data_is_no_dp_sgd_model(shares: dict[str, Path]) -> None:
    # A kept DP-SGD model joins as it is; an id that held one, deleted and reused for
    # data derived from the private share, joins as private data: clipped, noised,
    # charged.
    policy = {**record_privacy(epsilon=8.0, rounds=2), "noise_multiplier": 5.0, "k": 2,
              "secure_aggregation": True}
    datasets = {o: [f"{p}:#digits"] for o, p in shares.items()}
    with tr.connect(datasets=datasets, privacy=dict.fromkeys(DIGIT_OWNERS, policy)) as fleet:
        bob = fleet.worker("bob")
        (dataset,) = bob.search("#digits")
        model = tr.dp_train(make_model().send(bob), dataset, F.cross_entropy,
                            lr=DP_LEARNING_RATE, batch_size=BATCH_SIZE)
        kept = model.value.id_at_location
        fleet.request("bob", Delete([kept]))
        data = dataset["data"]
        fleet.request("bob", Call("Tensor.__getitem__", [ObjectRef(data.id_at_location), 0],
                                  {}, kept))  # one private record, under the model's id
        model.value.garbage_collect = False
        others = [torch.randn(64).send(fleet.worker(o)) for o in ("alice", "carol")]
        release = tr.aggregate([tr.PointerTensor(bob, kept), *others],
                               aggregator=fleet.worker(AGGREGATOR), secure=True)
        assert release.dropped == [] and "bob" in release.epsilon
        assert release.noise_std == pytest.approx(5.0 * 1.0 / 3)  # z x weight x clip
        release.get()
