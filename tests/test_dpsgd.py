"""The DP-SGD mechanism the owner's worker runs (`worker/runtime/_dpsgd.py`), against a
plain reference written the textbook way: a Python loop over the sampled examples,
each one's gradient by autograd on a module, clipped, summed, noised, stepped.

Both draw from one seeded generator in the same order (the batch's Bernoulli draws,
then each parameter's noise), so with the same seed they must agree step for step."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from noninterference import CLIENT, OWNER, _Capture
from torch import nn

from torchrelay.broker import DefinePlan, Delivery, DpTrain, Store, decode_reply
from torchrelay.broker import ObjectRef as R
from torchrelay.worker import WorkerRuntime
from torchrelay.worker.runtime._datasets import Dataset
from torchrelay.worker.runtime._dpsgd import (
    DpSgd,
    DpSgdSettings,
    clipped_sum,
    sample_rate,
    steps_for,
)
from torchrelay.worker.runtime._privacy import (
    BudgetSpent,
    PrivacyBudget,
    PrivacyError,
    PrivacyPolicy,
    epsilon_of,
    least_noise,
)


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return (torch.randn(40, 6, generator=generator) * 3,
            torch.randint(0, 3, (40,), generator=generator))


def reference_step(model: nn.Module, data: torch.Tensor, target: torch.Tensor,
                   settings: DpSgdSettings, generator: torch.Generator) -> None:
    """One DP-SGD step, by hand."""
    q = settings.batch_size / len(data)
    chosen = [i for i, r in enumerate(torch.rand(len(data), generator=generator)) if r < q]
    parameters = list(model.parameters())
    total = [torch.zeros_like(p) for p in parameters]
    for i in chosen:
        model.zero_grad()
        nn.functional.cross_entropy(model(data[i : i + 1]), target[i : i + 1]).backward()
        grads = [p.grad.detach().clone() for p in parameters]  # type: ignore[union-attr]
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        factor = min(1.0, settings.clip / (norm + 1e-6))
        total = [t + g * factor for t, g in zip(total, grads, strict=True)]
    std = settings.noise_multiplier * settings.clip
    noise = torch.normal(0.0, std, (sum(p.numel() for p in parameters),), generator=generator)
    with torch.no_grad():
        offset = 0
        for parameter, t in zip(parameters, total, strict=True):
            part = noise[offset : offset + parameter.numel()].view_as(parameter)
            parameter.sub_(settings.lr * (t + part) / settings.batch_size)
            offset += parameter.numel()


def _functional_loss(model: nn.Module) -> tuple[dict[int, torch.Tensor], object]:
    names = [name for name, _ in model.named_parameters()]
    parameters = {i: p.detach().clone() for i, (_, p) in enumerate(model.named_parameters())}

    def loss(values: dict[int, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bound = {names[i]: v for i, v in values.items()}
        return nn.functional.cross_entropy(torch.func.functional_call(model, bound, (x,)), y)

    return parameters, loss


@pytest.mark.parametrize("noise", [0.0, 1.3])
def test_mechanism_equals_the_reference_step_for_step(noise: float) -> None:
    data, target = _data()
    settings = DpSgdSettings(clip=0.7, noise_multiplier=noise, lr=0.5, batch_size=8)
    reference = _model()
    parameters, loss = _functional_loss(_model())
    mechanism = DpSgd(loss, parameters, settings,  # type: ignore[arg-type]
                      torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    for _ in range(6):
        mechanism.step(data, target)
        reference_step(reference, data, target, settings, generator)
        for p, q in zip(reference.parameters(), mechanism.parameters.values(), strict=True):
            torch.testing.assert_close(p.detach(), q, atol=1e-5, rtol=1e-5)


def test_clipping_bounds_each_example_and_zeroes_what_is_not_finite() -> None:
    gradients = torch.tensor([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0], [math.nan, 1.0, 0.0],
                              [math.inf, 0.0, 2.0]])
    summed = clipped_sum(gradients, 1.0)
    # [3, 4, 0] -> norm 1; [0.3, 0.4, 0] as it is; [nan, 1, 0] -> [0, 1, 0]; [inf, 0, 2] ->
    # [0, 0, 1]
    torch.testing.assert_close(summed, torch.tensor([0.6 + 0.3, 0.8 + 0.4 + 1.0, 1.0]),
                               atol=1e-5, rtol=0)


def test_an_example_whose_loss_fails_contributes_nothing_and_others_count() -> None:
    parameters = {0: torch.tensor([1.0, 2.0])}

    def loss(values: dict[int, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # cholesky fails on a matrix that is not positive definite: a value decides
        matrix = torch.diag(x[0]) * 1.0
        return (torch.linalg.cholesky(matrix).sum() * values[0]).sum() + 0 * y.sum()

    mechanism = DpSgd(loss, parameters, DpSgdSettings(clip=100.0, noise_multiplier=0.0, lr=1.0,
                                                      batch_size=1),
                      torch.Generator().manual_seed(0))
    gradients = mechanism.per_example_gradients(torch.tensor([[4.0, 9.0], [-1.0, 1.0]]),
                                                torch.zeros(2))
    assert torch.equal(gradients[0], torch.tensor([5.0, 5.0]))
    assert torch.isnan(gradients[1]).all()


def test_each_example_is_seen_alone() -> None:
    """A loss that would mix examples if it saw the batch (`mean` over dim 0) gets the
    same gradients as when each example is given on its own."""
    parameters, _ = _functional_loss(_model())
    model = _model()
    names = [name for name, _ in model.named_parameters()]

    def mixing(values: dict[int, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bound = {names[i]: v for i, v in values.items()}
        out = torch.func.functional_call(model, bound, (x,))
        return nn.functional.cross_entropy(out - out.mean(0) + x.mean(0)[:3], y)

    mechanism = DpSgd(mixing, parameters, DpSgdSettings(clip=1.0, noise_multiplier=1.0, lr=1.0,
                                                        batch_size=4),
                      torch.Generator().manual_seed(0))
    data, target = _data()
    together = mechanism.per_example_gradients(data[:5], target[:5])
    alone = torch.cat([mechanism.per_example_gradients(data[i : i + 1], target[i : i + 1])
                       for i in range(5)])
    torch.testing.assert_close(together, alone)


def test_steps_and_rates() -> None:
    assert steps_for(479, 32, 1) == 15 and steps_for(479, 32, 20) == 300
    assert sample_rate(479, 32) == 32 / 479 and sample_rate(10, 32) == 1.0


def test_the_ledger_composes_dp_sgd_steps_with_rdp_and_refuses_past_the_budget(
        tmp_path: object) -> None:
    import dp_accounting  # noqa: PLC0415
    from dp_accounting import rdp  # noqa: PLC0415

    policy = PrivacyPolicy(unit="record", epsilon=3.0, noise_multiplier=1.0)
    q, z = 32 / 479, least_noise(3.0, 1e-5, 32 / 479, 300)
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
                       300)
    expected = accountant.get_epsilon(1e-5)
    assert 2.97 < expected <= 3.0
    ledger = tmp_path / "bob.json"  # type: ignore[operator]
    budget = PrivacyBudget(policy, ledger)
    spent = 0.0
    for _ in range(20):  # training again charges again: 20 rounds of 15 steps
        spent = budget.charge_steps("bob", q, z, 15)
    assert spent == pytest.approx(expected, rel=1e-9)
    with pytest.raises(BudgetSpent, match="budget of 'bob' is spent"):
        budget.charge_steps("bob", q, z, 15)
    again = PrivacyBudget(policy, ledger)  # a restart gives nothing back
    assert again.spent() == pytest.approx(expected, rel=1e-9)
    assert epsilon_of({}, {(q, z): 300}, 1e-5) == pytest.approx(expected, rel=1e-9)


def test_the_unit_is_owner_unless_said() -> None:
    assert PrivacyPolicy().unit == "owner"
    assert PrivacyPolicy.of({"unit": "record"}).public()["unit"] == "record"
    with pytest.raises(PrivacyError, match="unit must be one of"):
        PrivacyPolicy.of({"unit": "person"})


def test_a_batch_computed_in_chunks_gives_the_same_steps() -> None:
    """Per-example gradients of a large model's batch are computed in chunks of
    examples (bounded memory): the steps are the same."""
    data, target = _data()
    trained = []
    for chunk in (None, 3):
        parameters, loss = _functional_loss(_model())
        mechanism = DpSgd(loss, parameters,  # type: ignore[arg-type]
                          DpSgdSettings(clip=0.7, noise_multiplier=1.0, lr=0.5, batch_size=8),
                          torch.Generator().manual_seed(5))
        mechanism.chunk = chunk or mechanism.chunk
        for _ in range(4):
            mechanism.step(data, target)
        trained.append(torch.cat([p.flatten() for p in mechanism.parameters.values()]))
    torch.testing.assert_close(trained[0], trained[1])


class _RecordingPacer:
    """Stands for a daemon's pacer: records the schedules a run asks for."""

    def __init__(self) -> None:
        self.calibrated_keys: list[Any] = []
        self.paced: list[Any] = []

    def known(self, key: Any) -> bool:
        return key in self.calibrated_keys

    def calibrated(self, key: Any, benign_seconds: float, slack: float = 3.0) -> None:
        del benign_seconds, slack  # (how long it took is the machine's, not the test's)
        self.calibrated_keys.append(key)

    def pace(self, key: Any, started: float) -> None:
        self.paced.append(key)


def _observed_run(data: torch.Tensor, loss_ops: list[dict[str, Any]]) -> tuple[Any, ...]:
    """What a client sees of a dp_train on a worker whose private dataset is `data`:
    its reply (what it reports, or the error's type and text), and the schedules the
    worker's pacer was asked for."""
    endpoint = _Capture()
    runtime = WorkerRuntime(OWNER, endpoint, privacy=PrivacyPolicy(unit="record", epsilon=50.0))
    pacer = _RecordingPacer()
    runtime.private_execution.pacer = pacer  # type: ignore[assignment]
    dataset = runtime.add_dataset(Dataset({"data": data, "target": torch.arange(len(data)) % 3},
                                          ("#x",), ""), "records")
    weight, bias = torch.zeros(3, 6), torch.zeros(3)
    replies = []
    for number, command in enumerate([
            Store(1, weight), Store(2, bias),
            DefinePlan(3, [10, 11, 1, 2], loss_ops, [14]),
            DpTrain(3, dataset, [1, 2], [1, 2], 4, "sgd", 0.5, 8, 1)]):
        runtime.handle(Delivery(False, command.name, f"t.{number}", CLIENT,
                                command.encode().tobytes(), endpoint.reply_queue))
        (frame,) = endpoint.replies
        endpoint.replies.clear()
        reply = decode_reply(frame)
        replies.append(("error", reply.error.type, reply.error.message)
                       if reply.error is not None else ("ok", repr(reply.value)))
    return (*replies, tuple(pacer.calibrated_keys), tuple(pacer.paced))


def test_what_a_run_shows_and_how_it_is_paced_depend_on_no_value() -> None:
    """A run on different private values shows the same reply and asks for the same
    schedule, even when the loss fails on some of the values (a Cholesky factor of a
    matrix made from the example: not positive definite for entries below -1)."""
    plain = [{"op": "F.linear", "args": [R(10), R(1), R(2)], "kwargs": {}, "result_id": 12},
             {"op": "F.cross_entropy", "args": [R(12), R(11)], "kwargs": {}, "result_id": 14}]
    failing = [{"op": "F.linear", "args": [R(10), R(1), R(2)], "kwargs": {}, "result_id": 12},
               {"op": "Tensor.__add__", "args": [R(10), 1.0], "kwargs": {}, "result_id": 18},
               {"op": "torch.diag_embed", "args": [R(18)], "kwargs": {}, "result_id": 15},
               {"op": "linalg.cholesky", "args": [R(15)], "kwargs": {}, "result_id": 16},
               {"op": "Tensor.sum", "args": [R(16)], "kwargs": {}, "result_id": 17},
               {"op": "F.cross_entropy", "args": [R(12), R(11)], "kwargs": {}, "result_id": 13},
               {"op": "Tensor.__add__", "args": [R(13), R(17)], "kwargs": {}, "result_id": 14}]
    generator = torch.Generator().manual_seed(0)
    for loss in (plain, failing):
        seen = {_observed_run(values, loss) for values in (
            torch.rand(40, 6, generator=generator) + 1,  # every example positive
            -torch.rand(40, 6, generator=generator) - 1,  # every example fails the factor
            torch.randn(40, 6, generator=generator) * 1e30)}
        assert len(seen) == 1, seen
        (*replies, calibrated, paced) = next(iter(seen))
        assert replies[-1][0] == "ok", replies
        assert len(paced) == 1 and calibrated == paced


def test_aggregate_releases_and_dp_sgd_steps_share_one_ledger() -> None:
    """An owner protecting records may still contribute to aggregates: a release that
    bounds its whole contribution bounds each record too, and both compose in RDP."""
    import dp_accounting  # noqa: PLC0415
    from dp_accounting import rdp  # noqa: PLC0415

    budget = PrivacyBudget(PrivacyPolicy(unit="record", epsilon=100.0, noise_multiplier=2.0))
    budget.charge("bob")
    budget.charge_steps("bob", 0.1, 1.5, 40)
    spent = budget.charge("bob")
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(2.0), 2)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(
        1.5)), 40)
    assert spent == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_adam_steps_on_the_noised_gradient_too() -> None:
    data, target = _data()
    parameters, loss = _functional_loss(_model())
    before = {k: v.clone() for k, v in parameters.items()}
    mechanism = DpSgd(loss, parameters,  # type: ignore[arg-type]
                      DpSgdSettings(clip=1.0, noise_multiplier=1.0, lr=0.01, batch_size=8,
                                    optimizer="adam"),
                      torch.Generator().manual_seed(0))
    assert mechanism.run(data, target) == 5
    assert all(not torch.equal(before[k], v) for k, v in mechanism.parameters.items())
    with pytest.raises(ValueError, match="optimizer must be one of"):
        DpSgdSettings(clip=1.0, noise_multiplier=1.0, lr=0.1, batch_size=8, optimizer="lbfgs")
