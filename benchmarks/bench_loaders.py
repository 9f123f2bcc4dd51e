"""Loader benchmark: `TensorDataLoader` against `DataLoader(TensorDataset(...))`, and on a GPU
`DeviceDataLoader` with and without prefetch, on the tutorials' FashionMNIST arrays.

    python benchmarks/bench_loaders.py [--reps 7] [--threads 1] [--out benchmarks/loaders.md]

Each variant first runs one untimed epoch; then every repetition runs each variant once, in
an order rotated by one each repetition, so that drift in the machine's speed spreads over
all variants. Reported per variant: the median epoch time, min-max over the repetitions, and
the ratio of the baseline's median to the variant's (how many times faster). Prints a
markdown report; `--out` also writes it to a file. Torch runs on one CPU thread by default:
the loaders' own work is single-threaded Python, and on a busy machine intra-op threads
waiting for each other would swamp what is measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from common import interleaved
from models import MnistCNN
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from trainkit import DeviceDataLoader, WrappedDataLoader, fashion_mnist
from trainkit.data import TensorDataLoader

BATCH_SIZE = 64  # the tutorials' batch size


def load_data() -> tuple[Tensor, Tensor, str]:
    """The 60,000 FashionMNIST training images as the tutorial's flat float arrays."""
    try:
        train = fashion_mnist(train=True, download=False)
    except FileNotFoundError:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(60_000, 784, generator=g)
        return x, torch.randint(0, 10, (60_000,), generator=g), "generated (FashionMNIST absent)"
    x = train.data.reshape(len(train.data), 784).float() / 255
    return x, train.targets.clone(), "real FashionMNIST training set"


def iterate(loader: Iterable[Any], device: torch.device) -> Callable[[], None]:
    """One epoch that only fetches the batches (and, on a GPU, waits for their copies)."""

    def epoch() -> None:
        for xb, _ in loader:
            xb.sum()  # touch the batch where it lives, as a model would
        _sync(device)

    return epoch


def train(
    loader: Iterable[Any], model: nn.Module, lr: float, device: torch.device
) -> Callable[[], None]:
    """One training epoch of `model` over `loader`: the tutorial's loop, without validation."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def epoch() -> None:
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            torch.autograd.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)

    return epoch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(times: dict[str, list[float]]) -> str:
    baseline = statistics.median(next(iter(times.values())))
    lines = [
        "| variant | n | median s/epoch | min-max s | speed-up vs first row (median) |",
        "|---|---|---|---|---|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(
            f"| {name} | {len(values)} | {median:.3f} | {min(values):.3f}-{max(values):.3f} "
            f"| {baseline / median:.1f}x |"
        )
    return "\n".join(lines)


def cpu_variants(x: Tensor, y: Tensor, workload: str) -> dict[str, Callable[[], None]]:
    cpu = torch.device("cpu")
    loaders: dict[str, Iterable[Any]] = {
        "DataLoader(TensorDataset(x, y), shuffle=True)": DataLoader(
            TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True
        ),
        "TensorDataLoader(x, y, shuffle=True)": TensorDataLoader(
            x, y, batch_size=BATCH_SIZE, shuffle=True
        ),
    }
    if workload == "iterate":
        return {name: iterate(dl, cpu) for name, dl in loaders.items()}
    torch.manual_seed(0)
    return {name: train(dl, nn.Linear(784, 10), 0.1, cpu) for name, dl in loaders.items()}


def gpu_variants(x: Tensor, y: Tensor, workload: str) -> dict[str, Callable[[], None]]:
    dev = torch.device("cuda", torch.cuda.current_device())

    def to_dev(xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
        return xb.to(dev), yb.to(dev)

    ds = TensorDataset(x, y)
    loaders: dict[str, Iterable[Any]] = {
        "tutorial: DataLoader + .to(dev) per batch": WrappedDataLoader(
            DataLoader(ds, batch_size=BATCH_SIZE, shuffle=True), to_dev
        ),
        "DeviceDataLoader(DataLoader(pin_memory=True), prefetch=False)": DeviceDataLoader(
            DataLoader(ds, batch_size=BATCH_SIZE, shuffle=True, pin_memory=True),
            dev,
            prefetch=False,
        ),
        "DeviceDataLoader(DataLoader(...)), prefetch on a side stream": DeviceDataLoader(
            DataLoader(ds, batch_size=BATCH_SIZE, shuffle=True), dev
        ),
        "TensorDataLoader(x, y, device='cuda', shuffle=True)": TensorDataLoader(
            x, y, batch_size=BATCH_SIZE, shuffle=True, device=dev
        ),
    }
    if workload == "iterate":
        return {name: iterate(dl, dev) for name, dl in loaders.items()}
    torch.manual_seed(0)
    return {name: train(dl, MnistCNN().to(dev), 0.1, dev) for name, dl in loaders.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs (torch.set_num_threads({torch.get_num_threads()})); "
        f"GPU: {gpu}. {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}."
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed epochs per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    x, y, source = load_data()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    parts = [
        "# Loaders: TensorDataLoader vs DataLoader(TensorDataset), DeviceDataLoader prefetch",
        "",
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Machine: {machine()}",
        "",
        f"Data: {source}, {len(x):,} samples as flat float32 rows of 784 (the tutorial's "
        f"layout), batch size {BATCH_SIZE}, shuffled every epoch. Command: "
        f"`python benchmarks/bench_loaders.py --reps {args.reps} --threads {args.threads}`.",
        "",
        "Method: one untimed epoch per variant, then "
        f"{args.reps} repetitions, each running every variant once in an order rotated by one "
        "per repetition. Median and min-max of the epoch times; speed-up = the first row's "
        "median / this row's median.",
        "",
    ]
    workloads = [
        ("CPU: iterate one epoch (fetch every batch, no model)", cpu_variants, "iterate"),
        ("CPU: train one epoch of logistic regression (Linear 784→10, SGD)", cpu_variants, "fit"),
    ]
    if torch.cuda.is_available():
        workloads += [
            ("GPU: iterate one epoch (batches on the GPU, no model)", gpu_variants, "iterate"),
            ("GPU: train one epoch of the tutorial's Mnist_CNN (SGD)", gpu_variants, "fit"),
        ]
    for title, variants, workload in workloads:
        print(f"running: {title}", file=sys.stderr, flush=True)
        parts += [f"## {title}", "", table(interleaved(variants(x, y, workload), args.reps)), ""]
    if not torch.cuda.is_available():
        parts += [
            "## GPU",
            "",
            "No CUDA device on this machine: the GPU workloads (DeviceDataLoader with and "
            "without prefetch, TensorDataLoader on the device, an epoch of the tutorial's "
            "Mnist_CNN) were not run. Run this script on a GPU machine to add them.",
            "",
        ]
    if load is not None:
        end = os.getloadavg()
        busy = max(load[0], end[0]) > (os.cpu_count() or 1)
        parts += [
            f"Load average (1 min) at start {load[0]:.2f}, at end {end[0]:.2f}, on "
            f"{os.cpu_count()} logical CPUs."
            + (
                " Other processes shared the machine: absolute times are inflated, and the "
                "interleaved repetitions keep the variants' ratios comparable."
                if busy
                else ""
            ),
            "",
        ]
    report = "\n".join(parts)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return report


if __name__ == "__main__":
    main()
