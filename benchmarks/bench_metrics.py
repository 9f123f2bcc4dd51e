"""What the metrics path costs: one epoch of the tutorial's Mnist_CNN with and without metrics,
and the metrics alone per validation batch.

    python benchmarks/bench_metrics.py [--reps 9] [--metric-reps 200] [--clock wall|cpu]
                                       [--out benchmarks/metrics.md]

Data: in-memory random tensors of MNIST's shape (the work per step does not depend on values):
10,000 training samples in batches of 64, 10,000 validation samples in batches of 128.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import interleaved, machine, table
from models import MnistCNN, tutorial_epoch
from torch import Tensor, nn, optim
from torch.utils.data import TensorDataset

from trainkit import (
    Accuracy,
    BinaryAccuracy,
    ConfusionMatrix,
    PerClassAccuracy,
    accuracy,
    fit,
    get_data,
)


def cpu_interleaved(
    variants: Mapping[str, Callable[[], object]], reps: int
) -> dict[str, list[float]]:
    """As `common.interleaved`, timed in CPU time of this process (`time.process_time`): on a
    shared machine, time spent waiting for a core is nobody's cost (runs are single-threaded
    under OMP_NUM_THREADS=1)."""
    for run in variants.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.process_time()
            variants[name]()
            times[name].append(time.process_time() - start)
    return times


def metrics_alone(reps: int) -> str:
    """The metrics without a model: 79 validation batches of (128, 10) outputs (the epoch's
    validation pass), update then compute; the time per batch, including compute's share."""
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(128, 10, generator=g) for _ in range(79)]
    labels = [torch.randint(0, 10, (128,), generator=g) for _ in range(79)]
    voids = [torch.where(t == 9, 255, t).to(torch.uint8) for t in labels]
    logits = [o[:, :1] for o in outs]
    flags = [(t % 2).float()[:, None] for t in labels]

    def streaming(
        metrics: list[Any], targets: list[Tensor], preds: list[Tensor]
    ) -> Callable[[], None]:
        def run() -> None:
            for m in metrics:
                m.reset()
            for p, t in zip(preds, targets, strict=True):
                for m in metrics:
                    m.update(p, t)
            for m in metrics:
                m.compute()

        return run

    def batch_function() -> None:
        for p, t in zip(outs, labels, strict=True):
            accuracy(p, t)

    four = [Accuracy(), Accuracy(top_k=5), PerClassAccuracy(10), ConfusionMatrix(10)]
    variants = {
        "Accuracy + top-5 + PerClassAccuracy + ConfusionMatrix": streaming(four, labels, outs),
        "Accuracy": streaming([Accuracy()], labels, outs),
        "Accuracy(top_k=5)": streaming([Accuracy(top_k=5)], labels, outs),
        "accuracy (batch function, as in fit)": batch_function,
        "Accuracy(ignore_index=255), uint8 targets": streaming(
            [Accuracy(ignore_index=255)], voids, outs
        ),
        "BinaryAccuracy, (128, 1) logits": streaming([BinaryAccuracy()], flags, logits),
    }
    times = cpu_interleaved(variants, reps)
    lines = [
        "| metrics | n | median us per batch | min us per batch |",
        "|---|---|---|---|",
    ]
    for name, ts in times.items():
        per_batch = [t / 79 * 1e6 for t in ts]
        lines.append(
            f"| {name} | {len(ts)} | {statistics.median(per_batch):.0f} | {min(per_batch):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--metric-reps", type=int, default=200)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time the epochs in wall time, or in CPU time of the process (shared machines)",
    )
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
    times = (
        interleaved(variants, args.reps)
        if args.clock == "wall"
        else cpu_interleaved(variants, args.reps)
    )
    clock = "wall time" if args.clock == "wall" else "CPU time of the process"
    report = "\n\n".join(
        [
            "# Metrics path cost: one epoch of the tutorial's Mnist_CNN (CPU)",
            f"Measured {datetime.date.today()} on {machine()}. "
            "Command: `OMP_NUM_THREADS=1 python benchmarks/bench_metrics.py "
            f"--reps {args.reps} --metric-reps {args.metric_reps} --clock {args.clock}`.",
            "Epoch = 157 training steps (batch 64) + 79 validation batches (batch 128) on "
            "in-memory random MNIST-shaped tensors; progress off; fresh model per run; "
            f"timed in {clock}; variants interleaved, one warm-up run each.",
            "Against `fit, no metrics`:\n\n" + table(times, "fit, no metrics"),
            "Against the hand-written loop:\n\n" + table(times, "hand-written loop (tutorial fit)"),
            "## The metrics alone, per validation batch",
            "79 batches of (128, 10) random outputs (the epoch's validation pass) through the "
            "metrics, then `compute()`, without a model; the time per batch includes compute's "
            f"share; {args.metric_reps} interleaved repetitions, timed in CPU time of the "
            "process (`time.process_time`), so that waiting for a core on a shared machine does "
            "not count.",
            metrics_alone(args.metric_reps),
        ]
    )
    Path(args.out).write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
