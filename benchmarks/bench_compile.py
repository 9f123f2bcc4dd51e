"""`fit(compile=True)` against eager `fit`, on the seeds' models W1-W4 (CPU).

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py [--reps 11] [--seconds 30]

The workloads and loaders of bench_fit.py (in-memory random data of the real shapes, one epoch
of training plus validation). Both variants run `fit` with its defaults; one with
`compile=True` (the model, forward and backward, and the optimizer step compiled). Each variant
keeps one model and optimizer and puts them back to the same start in place before every run,
so the compiled step is compiled once (in the untimed first run), as in one long real run;
the first run's time, compiling included, is reported apart. One process per workload.
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

import torch.nn.functional as F
from bench_fit import WORKLOADS, loaders
from bench_tutorial import Trainee, host, load
from common import interleaved, machine, table

from trainkit import fit


def bench(index: int, reps: int, seconds: float, n_train: int) -> str:
    name, make, shape, bs, lr, momentum = WORKLOADS[index]
    train_dl, valid_dl = loaders(shape, bs, n_train)
    sink = open(os.devnull, "w")  # noqa: SIM115 - used by every run below

    def variant(compile: bool) -> Callable[[], None]:
        trainee = Trainee(make, lr, momentum)

        def run() -> None:
            model, opt = trainee.reset()
            with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
                fit(1, model, F.cross_entropy, opt, train_dl, valid_dl, compile=compile)

        return run

    variants = {"fit (eager)": variant(False), "fit, compile=True": variant(True)}
    first = {}
    for label, run in variants.items():
        start = time.perf_counter()
        run()
        first[label] = time.perf_counter() - start
    start = time.perf_counter()
    for run in variants.values():
        run()
    reps = max(reps, math.ceil(seconds / (time.perf_counter() - start)))
    times = interleaved(variants, reps)
    return (
        f"## {name}\n\n{len(train_dl)} steps + {len(valid_dl)} validation batches per epoch. "
        f"First run: eager {first['fit (eager)']:.1f} s, compiled "
        f"{first['fit, compile=True']:.1f} s (compiling included).\n\n"
        f"{table(times, 'fit (eager)')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=11, help="repetitions, at least")
    parser.add_argument("--seconds", type=float, default=30, help="time per table, at least")
    parser.add_argument("--train", type=int, default=10_000, help="training samples per epoch")
    parser.add_argument("--out", default=str(Path(__file__).with_name("compile.md")))
    parser.add_argument("--section", type=int, help=argparse.SUPPRESS)  # one table, for main
    args = parser.parse_args()
    if args.section is not None:
        print(bench(args.section, args.reps, args.seconds, args.train))
        return
    sections = []
    load_before = load()
    for index in range(len(WORKLOADS)):
        command = [sys.executable, __file__, "--section", str(index), "--reps", str(args.reps)]
        command += ["--seconds", str(args.seconds), "--train", str(args.train)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        sections.append(done.stdout.strip())
        print(sections[-1], flush=True)
    report = "\n\n".join(
        [
            "# `fit(compile=True)` against eager `fit` (CPU)",
            f"Measured {datetime.date.today()} on {machine()}; {host()}. Load average "
            f"(1/5/15 min) {load_before} before the run, {load()} after: other jobs shared "
            "the machine, so the variants run interleaved and compare by paired ratios.",
            f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --reps {args.reps} "
            f"--seconds {args.seconds:g} --train {args.train}`.",
            "One epoch = training plus validation. Ratio = compiled / eager; the paired ratio "
            "is the median over repetitions of the ratio within the same repetition (below 1: "
            "compiling wins).",
            *sections,
        ]
    )
    Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
