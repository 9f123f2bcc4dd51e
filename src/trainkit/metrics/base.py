"""The metric protocol, `Mean`, and how `fit` names and streams the metrics it is given.

A metric costs nothing per batch: `update` never reads a value back from the device (no
`.item()`, no branching on tensor values), so a GPU is never stalled mid-epoch. Checks that need
values are counted on the device and reported by `compute()`, the one read-back per epoch.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from trainkit.metrics._core import all_reduce
from trainkit.metrics.multiclass import accuracy, top_k_accuracy

__all__ = ["BatchMetric", "Mean", "Metric", "MetricArg"]


@runtime_checkable
class Metric(Protocol):
    """A streaming metric: `reset()`, then `update(preds, target)` per batch, then `compute()`.

    Any object of this shape works with `fit(..., metrics=...)` and `evaluate` (torchmetrics'
    metrics too). `fit` names it by its `name` attribute if it has one, else by its class name
    in snake case, prefixed with `val_` in `History`. `update` should keep its sums as tensors
    on the device (no `.item()`), so that only `compute` reads from the device. A `compute`
    result with one element is recorded as a float; larger results (per-class values, a
    confusion matrix) are kept as tensors in `History.tensors`.

    Example:
        >>> class CountCorrect:
        ...     def reset(self) -> None:
        ...         self.correct = torch.zeros((), dtype=torch.long)
        ...     def update(self, preds: Tensor, target: Tensor) -> None:
        ...         self.correct += (preds.argmax(dim=1) == target).sum()
        ...     def compute(self) -> Tensor:
        ...         return self.correct
        >>> isinstance(CountCorrect(), Metric)
        True
    """

    def reset(self) -> None:
        """Forget everything seen so far."""

    def update(self, preds: Tensor, target: Tensor, /) -> None:
        """Take in one batch."""

    def compute(self) -> Tensor | float:
        """The value over every batch since `reset`."""


BatchMetric = Callable[[Tensor, Tensor], Tensor]
"""A function of one batch, `fn(out, yb) -> 0-dim tensor`, such as `accuracy`; `fit` averages it
over the validation set weighted by batch size, as the tutorial weights the loss."""

MetricArg = Sequence[Metric | BatchMetric] | Mapping[str, Metric | BatchMetric]
"""What `fit` and `evaluate` accept as `metrics`: a sequence (named automatically) or a mapping
from name to metric."""


class Mean:
    """Weighted mean of per-batch scalars (losses, say), each weighted by its batch size.

    `update` costs one list append: values are summed on the device in chunks, and only
    `compute` reads the result back. `fit` uses it for the training and validation loss.

    Raises:
        ValueError: in `update`, a value with more than one dimension or a negative weight.
        RuntimeError: `compute()` before any `update()`.

    Example:
        >>> loss = Mean()
        >>> loss.update(torch.tensor(2.0), 3)  # a batch of 3 with mean loss 2
        >>> loss.update(torch.tensor(1.0), 1)
        >>> loss.compute()
        tensor(1.7500, dtype=torch.float64)
    """

    name = "mean"
    fold_every = 1024

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._values: list[Tensor] = []
        self._weights: list[float] = []
        self.total: Tensor | None = None
        self.count: float = 0.0

    def update(self, value: Tensor, weight: float = 1) -> None:
        """Add `value` (a 0-dim tensor) with `weight`; a 1-dim tensor adds its mean, weighted
        by its length (per-sample values)."""
        if value.ndim == 1:
            value, weight = value.double().mean(), value.numel()
        elif value.ndim != 0:
            raise ValueError(
                f"Mean.update: expected a scalar or 1-dim value, got {tuple(value.shape)}"
            )
        if weight < 0:
            raise ValueError(f"Mean.update(weight=...): must be >= 0, got {weight!r}")
        self._values.append(value.detach() if value.requires_grad else value)
        self._weights.append(weight)
        self.count += weight
        if len(self._values) >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        if not self._values:
            return
        values = torch.stack(self._values).double()
        weights = torch.tensor(self._weights, dtype=torch.float64)
        part = (values * weights.to(values.device, non_blocking=True)).sum()
        self.total = part if self.total is None else self.total + part
        self._values, self._weights = [], []

    def state_dict(self) -> dict[str, Any]:
        """The running total and weight, for checkpoints."""
        self._fold()
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        """Continue from what `state_dict` returned."""
        self.reset()
        self.total, self.count = state_dict["total"], float(state_dict["count"])

    def compute(self) -> Tensor:
        """The weighted mean as a 0-dim float64 tensor."""
        self._fold()
        if self.total is None or self.count == 0:
            raise RuntimeError("Mean.compute() called before any update() (or all weights 0)")
        return self.total / self.count

    def sync(self) -> None:
        """Sum the state over all processes of the default process group (no-op without one)."""
        self._fold()
        if self.total is None:
            self.total = torch.zeros((), dtype=torch.float64)
        state = torch.stack([self.total, self.total.new_tensor(self.count)])
        all_reduce(state)
        self.total, self.count = state[0], float(state[1])

    def __repr__(self) -> str:
        return "Mean()"


class BatchMean:
    """Streams a per-batch function as its batch-size-weighted mean (internal to `fit`)."""

    def __init__(self, fn: BatchMetric) -> None:
        self.fn = fn
        self.mean: Mean = Mean()

    def reset(self) -> None:
        """Forget the batches seen so far."""
        self.mean.reset()

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add the batch's value of the function, weighted by the batch size."""
        self.mean.update(self.fn(preds, target), len(target))

    def compute(self) -> Tensor:
        """The batch-size-weighted mean over the batches seen."""
        value = self.mean.compute()
        fn = self.fn.func if isinstance(self.fn, functools.partial) else self.fn
        # our batch functions give NaN for bad values (they cannot raise without a read-back);
        # here, once per pass, that NaN becomes the error the streaming metric would raise
        if fn in (accuracy, top_k_accuracy) and bool(value.isnan()):
            name = getattr(fn, "__name__", "metric")
            raise ValueError(
                f"{name} was NaN for some batch: a target outside [0, C), a NaN score, a one-hot "
                "row that is not one-hot, or every target ignored; Accuracy() reports the counts"
            )
        return value

    def sync(self) -> None:
        """Sum the running mean's state over all processes (no-op without a process group)."""
        self.mean.sync()


def named_metrics(metrics: MetricArg) -> dict[str, Metric]:
    """Name each metric and wrap batch functions, refusing clashes and non-metrics.

    Raises:
        TypeError: an item is neither a `Metric` nor a callable.
        ValueError: two metrics get the same name, or one is named `loss`.
    """
    items = list(metrics.items()) if isinstance(metrics, Mapping) else [(None, m) for m in metrics]
    named: dict[str, Metric] = {}
    for i, (key, m) in enumerate(items):
        if isinstance(m, Metric):
            metric, default = m, getattr(m, "name", None) or _snake(type(m).__name__)
        elif callable(m):
            _refuse_weighted_ignore(m, key if key is not None else i)
            metric, default = BatchMean(m), getattr(m, "__name__", "metric")
        else:
            raise TypeError(
                f"metrics[{key if key is not None else i}] is a {type(m).__name__}: expected an "
                "object with reset/update/compute or a function fn(out, yb) -> tensor"
            )
        name = key if key is not None else str(default)
        if name == "loss":
            raise ValueError(
                "metrics: the name 'loss' is the loss's own; name the metric otherwise"
            )
        if name in named:
            raise ValueError(
                f"metrics: two metrics are named {name!r}; pass a mapping to name them, "
                "e.g. metrics={'acc': ..., 'acc_top5': ...}"
            )
        named[name] = metric
    return named


def move_metrics(metrics: Mapping[str, Metric], device: torch.device) -> None:
    """Put module metrics (torchmetrics') on `device`; trainkit's follow their inputs."""
    for m in metrics.values():
        if isinstance(m, nn.Module):
            m.to(device)


def _refuse_weighted_ignore(fn: object, where: object) -> None:
    """A batch mean of `accuracy(..., ignore_index=...)` weights batches by size, not by their
    counted positions: not the accuracy. Refuse the plain `functools.partial` form."""
    if (
        isinstance(fn, functools.partial)
        and fn.func in (accuracy, top_k_accuracy)
        and fn.keywords.get("ignore_index") is not None
    ):
        raise ValueError(
            f"metrics[{where}]: {fn.func.__name__} with ignore_index is averaged over batches "
            "weighted by batch size, not by the positions each batch counts; use "
            f"Accuracy(ignore_index={fn.keywords['ignore_index']}) for the exact figure"
        )


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
