"""trainkit's `fit` against the tutorial's hand-written loop, on the seeds' models.

    OMP_NUM_THREADS=1 python benchmarks/bench_fit.py [--reps 11] [--seconds 30] [--features]

Each run is one epoch of training plus validation, on in-memory random data of the real shapes
(the work per step does not depend on the values). The hand-written loop is the tutorial's own
`fit` with `loss_batch`; trainkit's `fit` runs with its defaults on: a progress bar (drawn to
the null device), the streaming `Accuracy` metric and the NaN check, and `fast_loaders=False`:
both loops iterate the same `DataLoader`s, as with loaders that do not qualify for the fast
path (workers, transforms), so the tables measure `fit`'s own cost per step. The fast path on
the tutorial's loaders is measured by bench_tutorial.py. Variants run interleaved;
every run starts from the same model and data order. Besides times, each run's minor page faults
are counted: a loop that keeps many small tensors alive fragments the heap and pays for fresh
pages every step. Run with `OMP_NUM_THREADS=1` on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import interleaved, machine, table
from models import BlitzNet, MnistCNN, QuickstartMLP, tutorial_epoch
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

from trainkit import Accuracy, Amp, fit

Workload = tuple[str, Callable[[], nn.Module], tuple[int, ...], int, float, float]
WORKLOADS: list[Workload] = [
    # name, model, input shape, batch size, lr, momentum
    ("W1 logistic regression", lambda: nn.Linear(784, 10), (784,), 64, 0.5, 0.0),
    ("W2 Mnist_CNN", MnistCNN, (784,), 64, 0.1, 0.9),
    ("W3 Quickstart MLP", QuickstartMLP, (1, 28, 28), 64, 1e-3, 0.0),
    ("W4 blitz CIFAR Net, batch 4", BlitzNet, (3, 32, 32), 4, 1e-3, 0.9),
    ("W4 blitz CIFAR Net, batch 64", BlitzNet, (3, 32, 32), 64, 1e-3, 0.9),
]


def loaders(
    shape: tuple[int, ...], bs: int, n_train: int
) -> tuple[DataLoader[tuple[torch.Tensor, ...]], ...]:
    g = torch.Generator().manual_seed(0)
    n_valid = n_train // 5
    x = torch.randn(n_train + n_valid, *shape, generator=g)
    y = torch.randint(0, 10, (n_train + n_valid,), generator=g)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=bs, shuffle=True)
    valid = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=bs * 2)
    return train, valid


def bench(workload: Workload, reps: int, seconds: float, n_train: int, features: bool) -> str:
    """Time one workload's variants; return its markdown section."""
    name, make, shape, bs, lr, momentum = workload
    train_dl, valid_dl = loaders(shape, bs, n_train)
    # Output goes to the null device, as a terminal's would leave the process. Collected in a
    # StringIO instead, its ever-growing buffer fragmented the heap and cost the variants that
    # print the most (the bar) up to a thousand page faults per epoch.
    sink = open(os.devnull, "w")  # noqa: SIM115 - used by every run below

    def fresh() -> tuple[nn.Module, optim.Optimizer]:
        torch.manual_seed(0)  # same weights and same shuffle order in every run
        model = make()
        return model, optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def hand_written() -> None:
        print(tutorial_epoch(*fresh(), train_dl, valid_dl), file=sink)

    def trainkit_fit(
        clip: float | None = None,
        accumulate: int = 1,
        amp: Amp | None = None,
        channels_last: bool = False,
    ) -> Callable[[], None]:
        def run() -> None:
            model, opt = fresh()
            with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
                fit(1, model, F.cross_entropy, opt, train_dl, valid_dl, metrics=[Accuracy()],
                    progress=True, clip_grad_norm=clip, accumulate=accumulate, amp=amp,
                    channels_last=channels_last, fast_loaders=False)  # fmt: skip

        return run

    variants = {"hand-written loop": hand_written, "trainkit fit (defaults)": trainkit_fit()}
    if features:
        variants |= {
            "fit, clip_grad_norm=1.0": trainkit_fit(clip=1.0),
            "fit, accumulate=2": trainkit_fit(accumulate=2),
            "fit, amp='bf16'": trainkit_fit(amp="bf16"),
            "fit, channels_last=True": trainkit_fit(channels_last=True),
            # compile=True: bench_compile.py, which compiles once per variant; here every run
            # builds a new model and optimizer, and so compiles the step again
        }
    # at least `seconds` of runs per table: the short epochs need many repetitions before the
    # medians settle (early runs also pay the heap's first page faults)
    start = time.perf_counter()
    for run in variants.values():
        run()
    reps = max(reps, math.ceil(seconds / (time.perf_counter() - start)))
    faults: dict[str, list[int]] = {}
    times = interleaved(variants, reps, faults)
    title = f"## {name}{', options' if features else ''}"
    steps = f"{len(train_dl)} steps + {len(valid_dl)} validation batches per epoch."
    return f"{title}\n\n{steps}\n\n{table(times, 'hand-written loop', faults)}"


def allocator() -> str:
    """The malloc in use: the C library's, or one preloaded (jemalloc, tcmalloc)."""
    preload = os.environ.get("LD_PRELOAD", "")
    return Path(preload).name if preload else "the C library's malloc"


# (workload, with fit's options): the options get their own table, after the defaults' one
SECTIONS = [(w, False) for w in WORKLOADS] + [(WORKLOADS[1], True)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=11, help="repetitions, at least")
    parser.add_argument("--seconds", type=float, default=30, help="time per table, at least")
    parser.add_argument("--train", type=int, default=10_000, help="training samples per epoch")
    parser.add_argument("--features", action="store_true", help="also time fit's options on W2")
    parser.add_argument("--only", default="", help="run only workloads whose name contains this")
    parser.add_argument("--out", default=str(Path(__file__).with_name("fit.md")))
    parser.add_argument("--section", type=int, help=argparse.SUPPRESS)  # one table, for main
    args = parser.parse_args()
    if args.section is not None:
        workload, features = SECTIONS[args.section]
        print(bench(workload, args.reps, args.seconds, args.train, features))
        return
    sections = []
    for index, (workload, features) in enumerate(SECTIONS):
        if args.only in workload[0] and (args.features or not features):
            # A fresh process per table: the variants of one table share the process's heap,
            # and what earlier tables left in it (compile, bf16) changed later ones' page faults.
            command = [sys.executable, __file__, "--section", str(index), "--reps", str(args.reps)]
            command += ["--seconds", str(args.seconds), "--train", str(args.train)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            sections.append(done.stdout.strip())
            print(sections[-1], flush=True)
    report = "\n\n".join(
        [
            "# trainkit `fit` vs the hand-written loop (CPU)",
            f"Measured {datetime.date.today()} on {machine()}; memory allocator: {allocator()}.",
            f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_fit.py --reps {args.reps} "
            f"--seconds {args.seconds:g} --train {args.train}"
            + (" --features`." if args.features else "`."),
            "One epoch = training plus validation (validation batches twice the training batch). "
            "Each table runs in a fresh process. Ratio = trainkit / hand-written; the paired "
            "ratio is the median over repetitions of the ratio within the same repetition. Page "
            "faults: median minor page faults per run (fresh memory pages the run touched).",
            *sections,
        ]
    )
    Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
