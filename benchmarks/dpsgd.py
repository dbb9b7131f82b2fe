"""Record-level DP-SGD run by the owners' workers, beside Opacus on the same machine.

    PYTHONPATH=. python -m benchmarks --only dpsgd          # in the table, with RabbitMQ
    PYTHONPATH=. python -m benchmarks.dpsgd [--plot docs/dpsgd-vs-opacus.png] [--reps 3]

The Opacus anchor's workload (`../shared/anchors/flower/opacus_dpsgd.py`): the
digits in three shares of 479 records, the MLP 64-32-10, 20 rounds of one local
epoch, expected batch 32, clip 1.0, lr 0.5, FedAvg of the owners' DP-SGD models.
For ε 1, 3 and 8 (δ 1e-5), `--reps` runs each:

- **Opacus 1.6** in this process, as the anchor runs it (`make_private_with_epsilon`
  over the 20 epochs, RDP accountant, its own noise multiplier);
- **torchrelay**: `tr.FedAvg` over private shares whose owners protect records, on
  in-process workers: each owner's worker runs DP-SGD itself (`tr.dp_train`) with the
  least noise multiplier dp-accounting fits in ε over the 300 steps (printed), and
  charges its ledger for every step.

Then, at ε 3: the ε the workers charged against dp-accounting's own figure for the
same (sample rate, noise, steps); one DP-SGD step of the worker's mechanism against
Opacus's step on the same batch of 32 (locally, no broker); and a private FedAvg
round on RabbitMQ daemons against Opacus's one-process round. Accuracy is held-out
accuracy after the last round, median over the runs (the noise differs run to run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

import torchrelay as tr
from torchrelay._federated import (
    AGGREGATOR,
    BATCH_SIZE,
    DIGIT_OWNERS,
    DP_LEARNING_RATE,
    SHARE,
    accuracy,
    load_digits,
    make_model,
    one_torch_thread,
    permutation,
    record_privacy,
    write_shares,
)
from torchrelay.broker import Call, ObjectRef
from torchrelay.worker.runtime._commands.training import plan_loss
from torchrelay.worker.runtime._dpsgd import (
    DpSgd,
    DpSgdSettings,
    clipped_sum,
    sample_rate,
    steps_for,
)
from torchrelay.worker.runtime._plans import RecordedPlan

from . import plots
from .report import MeasureResult, Row, Target, at_most, not_measured
from .session import Session
from .stats import median, micros, millis, progress

EPSILONS = (1.0, 3.0, 8.0)
DELTA = 1e-5
ROUNDS = 20
CLIP = 1.0


@dataclass
class Run:
    accuracy: list[float]
    """Held-out accuracy after each round."""
    seconds: list[float]
    """Each round's time."""
    epsilon: float
    noise_multiplier: float
    extra: dict[str, Any] = field(default_factory=dict)


# -- Opacus, as the anchor runs it ---------------------------------------------------------


def opacus_run(epsilon: float, seed: int, rounds: int = ROUNDS) -> Run:
    """The anchor's federated DP-SGD with Opacus, in this process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's notes on secure_mode, backward hooks
        return _opacus_run(epsilon, seed, rounds)


def _opacus_run(epsilon: float, seed: int, rounds: int) -> Run:
    from opacus import PrivacyEngine  # noqa: PLC0415 - the dev extra's
    from torch.utils.data import DataLoader, TensorDataset  # noqa: PLC0415

    digits = load_digits()
    parts = torch.tensor_split(permutation(len(digits.train_data), seed=0), len(DIGIT_OWNERS))
    owners = []
    for index, part in enumerate(parts):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=DP_LEARNING_RATE)
        loader = DataLoader(TensorDataset(digits.train_data[part], digits.train_target[part]),
                            batch_size=BATCH_SIZE)
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        generator = torch.Generator().manual_seed(seed * 10 + index)
        owners.append((*engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=epsilon,
            target_delta=DELTA, epochs=rounds, max_grad_norm=CLIP,
            noise_generator=generator), engine))
    global_model = make_model()
    loss = nn.CrossEntropyLoss()
    accuracies, seconds, step_seconds = [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        states = []
        for model, optimizer, loader, _ in owners:
            model._module.load_state_dict(global_model.state_dict())
            model.train()
            for data, target in loader:
                if len(data) == 0:
                    continue
                step = time.perf_counter()
                optimizer.zero_grad()
                loss(model(data), target).backward()
                optimizer.step()
                step_seconds.append(time.perf_counter() - step)
            states.append({k: v.detach().clone() for k, v in model._module.state_dict().items()})
        global_model.load_state_dict({key: sum(s[key] for s in states) / len(states)
                                      for key in global_model.state_dict()})
        seconds.append(time.perf_counter() - started)
        accuracies.append(accuracy(global_model, digits.test_data, digits.test_target))
    spent = max(engine.get_epsilon(DELTA) for *_, engine in owners)
    return Run(accuracies, seconds, spent, float(owners[0][1].noise_multiplier),
               {"step_s": median(step_seconds)})


# -- torchrelay: the owners' workers run DP-SGD -----------------------------------------------


def torchrelay_run(epsilon: float, shares: dict[str, Path], *, url: str | None = None,
                   owners: dict[str, str] | None = None, aggregator: str = AGGREGATOR,
                   rounds: int = ROUNDS) -> Run:
    """FedAvg over record-private shares: in-process workers, or (`url`) the daemons named
    `owners` (owner -> worker id) already serving there with record privacy."""
    digits = load_digits()
    policy = record_privacy(epsilon, rounds)
    offered = None if url is not None else {
        owner: [{"path": str(path), "tags": ["#digits"], "private": True}]
        for owner, path in shares.items()}
    names = owners or {o: o for o in DIGIT_OWNERS}
    with tr.connect(url, datasets=offered, timeout=120,
                    privacy=None if url else dict.fromkeys(DIGIT_OWNERS, policy)) as fleet:
        datasets = [d for w in names.values() for d in fleet.worker(w).search("#digits")]
        fedavg = tr.FedAvg(make_model(), F.cross_entropy, aggregator=fleet.worker(aggregator),
                           batch_size=BATCH_SIZE, lr=DP_LEARNING_RATE, progress=False)
        history = fedavg.fit(datasets, rounds, lambda model: {
            "accuracy": accuracy(model, digits.test_data, digits.test_target)})
    left_out = [r.left_out for r in history if r.left_out]
    if left_out:
        raise RuntimeError(f"rounds went without some owners: {left_out[0]}")
    return Run([r.metrics["accuracy"] for r in history], [r.seconds for r in history],
               max(history[-1].epsilon.values()), float(policy["noise_multiplier"]))


def dp_accounting_epsilon(noise_multiplier: float, rounds: int = ROUNDS) -> float:
    """dp-accounting's own ε for the workers' (sample rate, noise, steps), asked directly."""
    import dp_accounting  # noqa: PLC0415
    from dp_accounting import rdp  # noqa: PLC0415

    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(
        sample_rate(SHARE, BATCH_SIZE), dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, steps_for(SHARE, BATCH_SIZE, rounds))
    return float(accountant.get_epsilon(DELTA))


# -- one step, locally -----------------------------------------------------------------------


def step_seconds(steps: int = 2000, blocks: int = 4) -> tuple[list[float], list[float]]:
    """One DP-SGD step of the worker's mechanism (the loss as the worker runs it: a plan
    of the MLP's forward and cross_entropy) and one of Opacus, on the same batch of 32,
    interleaved in blocks; each one's per-step times."""
    from opacus import PrivacyEngine  # noqa: PLC0415
    from torch.utils.data import DataLoader, TensorDataset  # noqa: PLC0415

    digits = load_digits()
    data, target = digits.train_data[:BATCH_SIZE], digits.train_target[:BATCH_SIZE]
    model = make_model()
    ref = ObjectRef
    calls = (Call("F.linear", [ref(1), ref(3), ref(4)], {}, 7),
             Call("F.relu", [ref(7)], {"inplace": False}, 8),
             Call("F.linear", [ref(8), ref(5), ref(6)], {}, 9),
             Call("F.cross_entropy", [ref(9), ref(2)], {}, 10))
    loss = plan_loss(cast(Any, None), RecordedPlan((1, 2, 3, 4, 5, 6), calls, (10,)),
                     "bench")  # no constants: the worker is not asked for any
    mechanism = DpSgd(loss, {3 + i: p.detach().clone() for i, p in
                             enumerate(model.parameters())},
                      DpSgdSettings(CLIP, 1.0, DP_LEARNING_RATE, BATCH_SIZE),
                      torch.Generator().manual_seed(0))

    def ours() -> None:  # Mechanism.step but on this batch rather than a Poisson sample
        summed = clipped_sum(mechanism.per_example_gradients(data, target), CLIP)
        noise = torch.normal(0.0, CLIP, (mechanism.size,), generator=mechanism.generator)
        gradient = (summed + noise) / BATCH_SIZE
        offset = 0
        for parameter in mechanism.parameters.values():
            parameter.grad = gradient[offset : offset + parameter.numel()].view_as(parameter)
            offset += parameter.numel()
        mechanism.optimizer.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_model = make_model()
        optimizer = torch.optim.SGD(theirs_model.parameters(), lr=DP_LEARNING_RATE)
        private, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
            module=theirs_model, optimizer=optimizer, noise_multiplier=1.0, max_grad_norm=CLIP,
            data_loader=DataLoader(TensorDataset(data, target), batch_size=BATCH_SIZE))
    criterion = nn.CrossEntropyLoss()

    def opacus() -> None:
        optimizer.zero_grad()
        criterion(private(data), target).backward()
        optimizer.step()

    timings: dict[str, list[float]] = {"ours": [], "opacus": []}
    ways: dict[str, Callable[[], None]] = {"ours": ours, "opacus": opacus}
    for way in ways.values():
        for _ in range(100):
            way()
    for _ in range(blocks):
        for name, way in ways.items():
            for _ in range(steps // blocks):
                started = time.perf_counter()
                way()
                timings[name].append(time.perf_counter() - started)
    return timings["ours"], timings["opacus"]


# -- the measure in `python -m benchmarks` ------------------------------------------------------


def measure(session: Session) -> MeasureResult:
    with one_torch_thread():
        return _measure(session)


def _measure(session: Session) -> MeasureResult:
    reps = session.settings.dpsgd_reps
    rounds = session.settings.dpsgd_rounds
    shares = write_shares(Path(session.log_dir()))
    raw: dict[str, Any] = {"reps": reps, "rounds": rounds}
    result = MeasureResult(raw=raw)
    runs: dict[float, tuple[list[Run], list[Run]]] = {}
    for epsilon in EPSILONS:
        progress(f"dpsgd: epsilon {epsilon:g}, Opacus and torchrelay, {reps} runs each")
        theirs = [opacus_run(epsilon, seed, rounds) for seed in range(reps)]
        ours = [torchrelay_run(epsilon, shares, rounds=rounds) for _ in range(reps)]
        runs[epsilon] = (ours, theirs)
        raw[f"epsilon_{epsilon:g}"] = {"ours": [vars(r) for r in ours],
                                       "opacus": [vars(r) for r in theirs]}
        ours_final = [r.accuracy[-1] for r in ours]
        theirs_final = [r.accuracy[-1] for r in theirs]
        gap = round(statistics.median(ours_final) - statistics.median(theirs_final), 6)
        allowed = 0.01 if epsilon == 3.0 else 0.02
        result.rows.append(Row(
            f"9 DP-SGD accuracy at epsilon {epsilon:g} (delta 1e-5)",
            f"{statistics.median(ours_final):.4f} [{min(ours_final):.4f}, "
            f"{max(ours_final):.4f}]",
            f"opacus {statistics.median(theirs_final):.4f} [{min(theirs_final):.4f}, "
            f"{max(theirs_final):.4f}]",
            target=Target(-allowed, False, f">= opacus - {allowed:g}"), checked=gap,
            note=f"median [min, max] of {reps} runs, {rounds} rounds; noise multiplier ours "
                 f"{ours[0].noise_multiplier:.4g} (least that fits, dp-accounting), opacus "
                 f"{theirs[0].noise_multiplier:.4g}; epsilon spent ours "
                 f"{max(r.epsilon for r in ours):.3f}, opacus "
                 f"{max(r.epsilon for r in theirs):.3f}"))
        if epsilon == 3.0:
            result.rows.append(Row(
                "9 DP-SGD accuracy at epsilon 3, absolute",
                f"{statistics.median(ours_final):.4f}", target=Target(0.90, False, ">= 0.90"),
                # accuracy is a float32 mean: 324/360 is 0.89999998
                checked=round(statistics.median(ours_final), 6)))
    if 3.0 in runs:
        ours = runs[3.0][0][0]
        expected = dp_accounting_epsilon(ours.noise_multiplier, rounds)
        result.rows.append(Row(
            "9 DP-SGD epsilon charged = dp-accounting's", f"{ours.epsilon:.5f}",
            f"dp-accounting {expected:.5f}", ours.epsilon / expected,
            Target(0.01, True, "within 1%"), checked=abs(ours.epsilon / expected - 1),
            note=f"sample rate {sample_rate(SHARE, BATCH_SIZE):.5f}, noise "
                 f"{ours.noise_multiplier:.6g}, {steps_for(SHARE, BATCH_SIZE, rounds)} steps: "
                 "the sum of the workers' charges round by round, against one call"))
    progress("dpsgd: one step, the worker's mechanism and Opacus, same batch")
    ours_steps, their_steps = step_seconds()
    raw["step_s"] = {"ours": median(ours_steps), "opacus": median(their_steps)}
    result.rows.append(Row(
        "9 DP-SGD step, local, same batch of 32: median", micros(median(ours_steps)),
        f"opacus {micros(median(their_steps))}", median(ours_steps) / median(their_steps),
        at_most(1), note="per-example gradients (vmap), clipping, noise, SGD step; "
                         "interleaved blocks, one thread"))
    try:
        result.rows.append(_rabbitmq_round(session, shares, runs, rounds))
    except Exception as e:
        result.rows.append(not_measured("9 private FedAvg round, RabbitMQ", e))
    return result


def _rabbitmq_round(session: Session, shares: dict[str, Path],
                    runs: dict[float, tuple[list[Run], list[Run]]], rounds: int) -> Row:
    progress("dpsgd: a private FedAvg on RabbitMQ daemons, epsilon 3")
    folder = Path(session.log_dir())
    policy = record_privacy(3.0, rounds)
    roles = [f"dp-{owner}" for owner in DIGIT_OWNERS] + [f"dp-{AGGREGATOR}"]
    role_args = {}
    for owner, path in shares.items():
        config = folder / f"{owner}.toml"
        config.write_text("\n".join([
            "[worker]", f'id = "{session.name(f"dp-{owner}")}"', f'broker = "{session.url}"',
            "torch_threads = 1", "", "[[worker.datasets]]", f'path = "{path}"',
            'tags = ["#digits"]', "", "[worker.privacy]",
            *(f"{k} = {json.dumps(v)}" for k, v in policy.items()),
            f'ledger = "{folder / (owner + ".privacy.json")}"']) + "\n")
        role_args[f"dp-{owner}"] = ["--config", str(config)]
    _, ids = session.workers(roles, ("--torch-threads", "1"), role_args)
    ours = torchrelay_run(3.0, shares, url=session.url, aggregator=ids[3], rounds=rounds,
                          owners=dict(zip(DIGIT_OWNERS, ids[:3], strict=True)))
    theirs = runs[3.0][1] if 3.0 in runs else [opacus_run(3.0, 0, rounds)]
    their_round = statistics.median(s for r in theirs for s in r.seconds)
    our_round = median(ours.seconds)
    return Row(
        "9 private FedAvg round, RabbitMQ daemons: median", millis(our_round),
        f"opacus one process {millis(their_round)}", our_round / their_round, at_most(2),
        note=f"3 owners' workers run DP-SGD at once (2 cores); round 1 "
             f"{ours.seconds[0]:.2f} s (records the loss); accuracy {ours.accuracy[-1]:.4f}, "
             f"epsilon {ours.epsilon:.3f}")


# -- the README's table and plot ------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dpsgd")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tr.hook(torch)
    shares = write_shares(Path(tempfile.mkdtemp(prefix="torchrelay-dpsgd-")))
    print("epsilon | noise ours / opacus | torchrelay: median [min, max] | opacus | spent ours")
    table = []
    for epsilon in EPSILONS:
        ours = [torchrelay_run(epsilon, shares) for _ in range(args.reps)]
        theirs = [opacus_run(epsilon, seed) for seed in range(args.reps)]
        table.append((epsilon, ours, theirs))
        a, b = [r.accuracy[-1] for r in ours], [r.accuracy[-1] for r in theirs]
        print(f"{epsilon:7g} | {ours[0].noise_multiplier:.4g} / {theirs[0].noise_multiplier:.4g} "
              f"| {statistics.median(a):.4f} [{min(a):.4f}, {max(a):.4f}] | "
              f"{statistics.median(b):.4f} [{min(b):.4f}, {max(b):.4f}] | "
              f"{max(r.epsilon for r in ours):.4f}")
    if args.plot is not None:
        _plot(table, args.plot)
        print(f"plot written to {args.plot}")


def _plot(table: list[tuple[float, list[Run], list[Run]]], path: Path) -> None:
    pyplot = plots.pyplot()
    figure, (curve, final) = pyplot.subplots(1, 2, figsize=(11, 4))
    for epsilon, ours, theirs in table:
        middle = sorted(ours, key=lambda r: r.accuracy[-1])[len(ours) // 2]
        line = curve.plot(range(1, len(middle.accuracy) + 1), middle.accuracy, marker="o",
                          markersize=3, label=f"torchrelay, epsilon {epsilon:g}")[0]
        middle = sorted(theirs, key=lambda r: r.accuracy[-1])[len(theirs) // 2]
        curve.plot(range(1, len(middle.accuracy) + 1), middle.accuracy, linestyle="--",
                   color=line.get_color(), label=f"Opacus, epsilon {epsilon:g}")
    curve.set(xlabel="round (epsilon spent grows to the budget)",
              ylabel="held-out accuracy", title="Median run, per round")
    curve.legend(fontsize=7, loc="lower right")
    epsilons = [e for e, _, _ in table]
    for name, index, style in (("torchrelay (owners' workers)", 1, "o-"),
                               ("Opacus 1.6 (trusted script)", 2, "s--")):
        finals = [[r.accuracy[-1] for r in row[index]] for row in table]
        middles = [statistics.median(f) for f in finals]
        errors = [[m - min(f) for m, f in zip(middles, finals, strict=True)],
                  [max(f) - m for m, f in zip(middles, finals, strict=True)]]
        final.errorbar(epsilons, middles, yerr=errors, fmt=style, capsize=3, label=name)
    final.set(xscale="log", xlabel="epsilon per record (delta 1e-5)",
              ylabel="held-out accuracy after 20 rounds", title="Record-level DP-SGD, FedAvg")
    final.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
    final.set_xticks([], minor=True)  # no 2x10^0 and the like between them
    final.legend(loc="lower right")
    plots.save(figure, path)


if __name__ == "__main__":
    main()
