"""What the metrics path costs: one epoch of the tutorial's Mnist_CNN with and without metrics.

    python benchmarks/bench_metrics.py [--reps 9] [--out benchmarks/metrics.md]

Data: in-memory random tensors of MNIST's shape (the work per step does not depend on values):
10,000 training samples in batches of 64, 10,000 validation samples in batches of 128.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from common import interleaved, machine, table
from models import MnistCNN, tutorial_epoch
from torch import nn, optim
from torch.utils.data import TensorDataset

from trainkit import Accuracy, ConfusionMatrix, PerClassAccuracy, fit, get_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--out", default=str(Path(__file__).with_name("metrics.md")))
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20_000, 784, generator=g), torch.randint(0, 10, (20_000,), generator=g)
    train_dl, valid_dl = get_data(
        TensorDataset(x[:10_000], y[:10_000]), TensorDataset(x[10_000:], y[10_000:]), 64
    )

    def model_and_opt() -> tuple[nn.Module, optim.Optimizer]:
        torch.manual_seed(0)
        model = MnistCNN()
        return model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def hand_written() -> None:  # the tutorial's fit, one epoch
        tutorial_epoch(*model_and_opt(), train_dl, valid_dl)

    def trainkit_fit(metrics: list[Accuracy | PerClassAccuracy | ConfusionMatrix]) -> None:
        model, opt = model_and_opt()
        fit(1, model, F.cross_entropy, opt, train_dl, valid_dl, metrics=metrics, progress=False)

    variants = {
        "hand-written loop (tutorial fit)": hand_written,
        "fit, no metrics": lambda: trainkit_fit([]),
        "fit, Accuracy + top-5 + PerClassAccuracy + ConfusionMatrix": lambda: trainkit_fit(
            [Accuracy(), Accuracy(top_k=5), PerClassAccuracy(10), ConfusionMatrix(10)]
        ),
    }
    times = interleaved(variants, args.reps)
    report = "\n\n".join(
        [
            "# Metrics path cost: one epoch of the tutorial's Mnist_CNN (CPU)",
            f"Measured {datetime.date.today()} on {machine()}. "
            f"Command: `python benchmarks/bench_metrics.py --reps {args.reps}`.",
            "Epoch = 157 training steps (batch 64) + 79 validation batches (batch 128) on "
            "in-memory random MNIST-shaped tensors; progress off; fresh model per run; variants "
            "interleaved, one warm-up run each.",
            "Against `fit, no metrics`:\n\n" + table(times, "fit, no metrics"),
            "Against the hand-written loop:\n\n" + table(times, "hand-written loop (tutorial fit)"),
        ]
    )
    Path(args.out).write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
