"""Shared benchmark harness: interleaved repetitions, medians, a markdown table."""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable, Mapping

import torch


def interleaved(
    variants: Mapping[str, Callable[[], object]],
    reps: int,
    faults: dict[str, list[int]] | None = None,
) -> dict[str, list[float]]:
    """Time each variant once per repetition, rotating the start so drift spreads evenly.

    Every variant runs once untimed first (warm-up). Given `faults`, each run's minor page
    faults (fresh memory pages touched) are recorded there too.
    """
    names = list(variants)
    for name in names:
        variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
            if faults is not None:
                after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                faults.setdefault(name, []).append(after - before)
    return times


def table(
    times: Mapping[str, list[float]],
    baseline: str,
    faults: Mapping[str, list[int]] | None = None,
) -> str:
    """Median, min-max, ratio of medians and median paired ratio against `baseline`; with
    `faults`, the median minor page faults per run too."""
    base = times[baseline]
    base_median = statistics.median(base)
    extra = " page faults |" if faults else ""
    lines = [
        "| variant | n | median s | min-max s | ratio (medians) | paired ratio |" + extra,
        "|---|---|---|---|---|---|" + ("---|" if faults else ""),
    ]
    for name, ts in times.items():
        median = statistics.median(ts)
        paired = statistics.median(t / b for t, b in zip(ts, base, strict=True))
        lines.append(
            f"| {name} | {len(ts)} | {median:.3f} | {min(ts):.3f}-{max(ts):.3f} "
            f"| {median / base_median:.3f} | {paired:.3f} |"
            + (f" {statistics.median(faults[name]):.0f} |" if faults else "")
        )
    return "\n".join(lines)


def machine() -> str:
    """One line describing where the figures were measured."""
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}"
    )
