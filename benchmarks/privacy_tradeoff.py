"""Accuracy against privacy spent, for a few noise multipliers: the README's plot.

    PYTHONPATH=. python -m benchmarks.privacy_tradeoff [--plot docs/privacy-tradeoff.png]

The digits demo with its shares private (in-process workers): DP-FedAvg through
secure_worker, clip 0.5, 20 rounds, for each noise multiplier three runs (the
noise differs run to run); the final held-out accuracy against the epsilon each
owner spent, at delta 1e-5. The non-private run and central training are
drawn for reference.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

import torchrelay as tr
from torchrelay._federated import DEMO_PRIVACY, DIGIT_OWNERS, run_federated, write_shares

NOISE_MULTIPLIERS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
RUNS = 3
ROUNDS = 20


def measure(noise_multiplier: float | None, shares: dict[str, Path]) -> tuple[float, float]:
    """Final accuracy and epsilon of one run (None: the shares public, no DP)."""
    private = noise_multiplier is not None
    datasets = {o: [{"path": str(p), "tags": ["#digits"], "private": private}]
                for o, p in shares.items()}
    policy = {**DEMO_PRIVACY, "noise_multiplier": noise_multiplier or 0.0,
              "epsilon": 1e9}  # the budget is what is measured here, not enforced
    with tr.connect(datasets=datasets,
                    privacy=dict.fromkeys(DIGIT_OWNERS, policy) if private else None) as fleet:
        run = run_federated(fleet, ROUNDS, echo=lambda line: None)
    epsilon = max(run.history[-1].epsilon.values(), default=float("inf"))
    return run.accuracy, epsilon


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy_tradeoff")
    parser.add_argument("--plot", type=Path, default=Path("docs/privacy-tradeoff.png"))
    args = parser.parse_args()
    tr.hook(torch)
    shares = write_shares(Path(tempfile.mkdtemp(prefix="torchrelay-tradeoff-")))
    public, _ = measure(None, shares)
    rows = []
    print("noise multiplier | epsilon (delta 1e-5) | accuracy: median [min, max] of 3 runs")
    for z in NOISE_MULTIPLIERS:
        runs = [measure(z, shares) for _ in range(RUNS)]
        accuracies = [a for a, _ in runs]
        epsilon = runs[0][1]
        rows.append((z, epsilon, accuracies))
        print(f"{z:16g} | {epsilon:20.1f} | {statistics.median(accuracies):.4f} "
              f"[{min(accuracies):.4f}, {max(accuracies):.4f}]")
    print(f"public (no DP)   | {'-':>20} | {public:.4f}")

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415

    figure, axes = pyplot.subplots(figsize=(7, 4.2))
    epsilons = [e for _, e, _ in rows]
    medians = [statistics.median(a) for _, _, a in rows]
    axes.errorbar(epsilons, medians,
                  yerr=[[m - min(a) for m, (_, _, a) in zip(medians, rows, strict=True)],
                        [max(a) - m for m, (_, _, a) in zip(medians, rows, strict=True)]],
                  marker="o", capsize=3, label="DP-FedAvg (median, min-max of 3 runs)")
    for z, epsilon, median_ in zip(NOISE_MULTIPLIERS, epsilons, medians, strict=True):
        axes.annotate(f"z={z:g}", (epsilon, median_), textcoords="offset points",
                      xytext=(5, -12), fontsize=8)
    axes.axhline(public, color="grey", linestyle="--", label="no DP (shares public)")
    axes.set(xscale="log", xlabel="epsilon spent by each owner after 20 rounds (delta 1e-5)",
             ylabel="held-out accuracy", ylim=(0, 1),
             title="Digits, 3 owners, clip 0.5: accuracy against privacy")
    axes.legend(loc="lower right")
    figure.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.plot, dpi=100)
    print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
