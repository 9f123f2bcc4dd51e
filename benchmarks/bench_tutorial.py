"""The tutorial's own code against trainkit's `fit` on the same loaders, and Ignite.

    OMP_NUM_THREADS=1 python benchmarks/bench_tutorial.py [--reps 15] [--seconds 60]

"What is torch.nn really?" as written: `get_data` builds `DataLoader(TensorDataset(x, y),
batch_size=64, shuffle=True)` and a validation loader of batch 128, W1 trains the logistic
regression (`nn.Linear(784, 10)`, SGD lr 0.5), W2 the `Mnist_CNN` (SGD lr 0.1, momentum 0.9)
through `WrappedDataLoader(dl, preprocess)`. Each run is one epoch, training plus validation,
of each variant on the same loaders (in-memory random data of MNIST's shapes: the work per
step does not depend on the values):

- the tutorial's loop: its `fit` with `loss_batch` (`.item()` every step);
- `fit` with its defaults (the NaN check, one line per epoch off a terminal), given the same
  `DataLoader`s: it takes the fast path (`trainkit.fastpath`);
- `fit` with `fast_loaders=False`: the `DataLoader`s iterated as they are;
- `fit` with `compile=True` (and, on W2, `channels_last=True`);
- Ignite's `create_supervised_trainer` with a `create_supervised_evaluator` computing the
  validation loss after each epoch, the strongest peer measured (shared/benchmarks/peers.md).

Every run starts from the same weights, optimizer state and global seed (so the same shuffle
order). Variants run interleaved in one process per workload; the paired ratio is the median of
the per-repetition ratios to the tutorial's loop. Before timing, two epochs of the tutorial's
loop and two of `fit` (defaults) are run from the same start and their weights compared bit
for bit.
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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import interleaved, machine, table
from ignite.engine import Engine, Events, create_supervised_evaluator, create_supervised_trainer
from ignite.metrics import Loss
from models import MnistCNN, tutorial_epoch
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, TensorDataset

from trainkit import WrappedDataLoader, fit

Loaders = tuple[Iterable[Any], Iterable[Any]]
BASELINE = "(a) the tutorial's loop"


def preprocess(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The tutorial's `preprocess` for `WrappedDataLoader`."""
    return x.view(-1, 1, 28, 28), y


def get_data(train_ds: TensorDataset, valid_ds: TensorDataset, bs: int) -> Loaders:
    """The tutorial's `get_data`, unchanged."""
    return (
        DataLoader(train_ds, batch_size=bs, shuffle=True),
        DataLoader(valid_ds, batch_size=bs * 2),
    )


def logistic_loaders(n_train: int) -> Loaders:
    return get_data(*datasets(n_train), 64)


def cnn_loaders(n_train: int) -> Loaders:
    train_dl, valid_dl = get_data(*datasets(n_train), 64)
    return WrappedDataLoader(train_dl, preprocess), WrappedDataLoader(valid_dl, preprocess)


def datasets(n_train: int) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    n_valid = n_train // 5  # the tutorial: 50,000 training and 10,000 validation images
    x = torch.rand(n_train + n_valid, 784, generator=g)
    y = torch.randint(0, 10, (n_train + n_valid,), generator=g)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


Workload = tuple[str, Callable[[], nn.Module], Callable[[int], Loaders], int, float, float]
WORKLOADS: list[Workload] = [
    # name, model, loaders, default training samples, lr, momentum
    ("W1 logistic regression", lambda: nn.Linear(784, 10), logistic_loaders, 50_000, 0.5, 0.0),
    ("W2 Mnist_CNN, WrappedDataLoader", MnistCNN, cnn_loaders, 10_000, 0.1, 0.9),
]


class Trainee:
    """One model and optimizer, put back to the same start before every run, in place: a
    compiled step is compiled for these objects once, as in one real run (the compiled SGD
    step is specialised to its momentum buffers; new buffers would compile it again)."""

    def __init__(self, make: Callable[[], nn.Module], lr: float, momentum: float) -> None:
        torch.manual_seed(0)
        self.model = make()
        self.opt = optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        self.weights = {k: v.clone() for k, v in self.model.state_dict().items()}

    def reset(self) -> tuple[nn.Module, optim.Optimizer]:
        self.model.load_state_dict(self.weights)  # copies into the same tensors
        with torch.no_grad():
            for state in self.opt.state.values():
                # a zero buffer gives SGD's first update exactly (0 * momentum + grad)
                if state.get("momentum_buffer") is not None:
                    state["momentum_buffer"].zero_()
        torch.manual_seed(0)  # the same shuffle order in every run
        return self.model, self.opt


def bitwise_check(workload: Workload, n_train: int) -> str:
    """Two epochs of the tutorial's loop and of `fit` from one start: the same weights?"""
    _, make, loaders, _, lr, momentum = workload
    train_dl, valid_dl = loaders(n_train)
    results = []
    for use_fit in (False, True):
        model, opt = Trainee(make, lr, momentum).reset()
        if use_fit:
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                fit(2, model, F.cross_entropy, opt, train_dl, valid_dl)
        else:
            for _ in range(2):
                tutorial_epoch(model, opt, train_dl, valid_dl)
        results.append([p.detach().clone() for p in model.parameters()])
    same = all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(*results, strict=True)
    )
    return "bitwise equal" if same else "NOT bitwise equal"


def bench(workload: Workload, reps: int, seconds: float, n_train: int) -> str:
    """Time one workload's variants; return its markdown section."""
    name, make, loaders, _, lr, momentum = workload
    train_dl, valid_dl = loaders(n_train)
    sink = open(os.devnull, "w")  # noqa: SIM115 - used by every run below
    check = bitwise_check(workload, n_train)

    def tutorial() -> Callable[[], None]:
        trainee = Trainee(make, lr, momentum)
        return lambda: print(tutorial_epoch(*trainee.reset(), train_dl, valid_dl), file=sink)

    def trainkit_fit(**options: Any) -> Callable[[], None]:
        trainee = Trainee(make, lr, momentum)

        def run() -> None:
            model, opt = trainee.reset()
            with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
                fit(1, model, F.cross_entropy, opt, train_dl, valid_dl, **options)

        return run

    def ignite() -> Callable[[], None]:
        trainee = Trainee(make, lr, momentum)

        def run() -> None:
            model, opt = trainee.reset()
            trainer = create_supervised_trainer(model, opt, F.cross_entropy)
            evaluator = create_supervised_evaluator(model, {"loss": Loss(F.cross_entropy)})

            def validate(engine: Engine) -> None:
                evaluator.run(valid_dl)
                print(evaluator.state.metrics["loss"], file=sink)

            trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)
            trainer.run(train_dl, max_epochs=1)

        return run

    variants = {
        BASELINE: tutorial(),
        "(b) fit, defaults (fast path)": trainkit_fit(),
        "fit, fast_loaders=False": trainkit_fit(fast_loaders=False),
        "(c) fit, compile=True": trainkit_fit(compile=True),
    }
    if "CNN" in name:
        variants["fit, channels_last=True"] = trainkit_fit(channels_last=True)
    variants["Ignite supervised trainer"] = ignite()
    start = time.perf_counter()
    for run in variants.values():  # the warm-up; compiles the compiled variant
        run()
    once = time.perf_counter() - start
    start = time.perf_counter()
    for run in variants.values():
        run()
    reps = max(reps, math.ceil(seconds / (time.perf_counter() - start)))
    times = interleaved(variants, reps)
    steps = f"{len(train_dl)} training steps + {len(valid_dl)} validation batches per epoch"  # type: ignore[arg-type]
    return (
        f"## {name}\n\n{steps} ({n_train:,} training samples); first runs (compiling) "
        f"{once:.0f} s. After 2 epochs, the tutorial's loop and `fit` (defaults) are "
        f"**{check}**.\n\n{table(times, BASELINE)}"
    )


def host() -> str:
    """The CPU, its logical cores, and how busy the machine was (others' jobs share it)."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15, help="repetitions, at least")
    parser.add_argument("--seconds", type=float, default=60, help="time per table, at least")
    parser.add_argument("--train", type=int, help="training samples (default: per workload)")
    parser.add_argument("--only", default="", help="run only workloads whose name contains this")
    parser.add_argument("--out", default=str(Path(__file__).with_name("tutorial.md")))
    parser.add_argument("--section", type=int, help=argparse.SUPPRESS)  # one table, for main
    args = parser.parse_args()
    if args.section is not None:
        workload = WORKLOADS[args.section]
        print(bench(workload, args.reps, args.seconds, args.train or workload[3]))
        return
    sections = []
    load_before = load()
    for index, workload in enumerate(WORKLOADS):
        if args.only in workload[0]:
            # a fresh process per table, as bench_fit.py: what one left in the heap (compiled
            # code) changes the next one's page faults
            command = [sys.executable, __file__, "--section", str(index), "--reps", str(args.reps)]
            command += ["--seconds", str(args.seconds)]
            command += ["--train", str(args.train)] if args.train else []
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            sections.append(done.stdout.strip())
            print(sections[-1], flush=True)
    options = f" --reps {args.reps} --seconds {args.seconds:g}"
    options += f" --train {args.train}" if args.train else ""
    report = "\n\n".join(
        [
            "# The tutorial's code: its own loop, trainkit's `fit`, Ignite (CPU)",
            f"Measured {datetime.date.today()} on {machine()}; {host()}. Load average "
            f"(1/5/15 min) {load_before} before the run, {load()} after: other jobs shared "
            "the machine, so variants run interleaved and compare by paired ratios.",
            f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_tutorial.py{options}`.",
            "One epoch = training plus validation, on the tutorial's `get_data` loaders. Ratio = "
            "variant / the tutorial's loop; the paired ratio is the median over repetitions of "
            "the ratio within the same repetition (below 1: faster than the tutorial's loop).",
            *sections,
        ]
    )
    Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
