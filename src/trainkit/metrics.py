"""Metrics: the tutorial's batch `accuracy`, and the `Metric` protocol `fit` and `evaluate` use."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["BatchMetric", "Metric", "MetricArg", "accuracy"]


def accuracy(out: Tensor, yb: Tensor) -> Tensor:
    """Fraction of rows of `out` whose arg-max is the target, as in "What is torch.nn really?".

    Args:
        out: Scores or log-probabilities, shape `(N, C)`.
        yb: Class indices, shape `(N,)`.

    Returns:
        A 0-dim float tensor on `out`'s device (not a Python float: reading it waits for the
        device).

    Example:
        >>> import torch
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        tensor(0.5000)
    """
    preds = torch.argmax(out, dim=1)
    return (preds == yb).float().mean()


@runtime_checkable
class Metric(Protocol):
    """A streaming metric: `reset()`, then `update(preds, target)` per batch, then `compute()`.

    Any object of this shape works with `fit(..., metrics=...)` and `evaluate` (torchmetrics'
    metrics too). `fit` names it by its `name` attribute if it has one, else by its class name
    in snake case, prefixed with `val_` in `History`. `update` should keep its sums as tensors
    on the device (no `.item()`), so that only `compute` reads from the device.

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


class _BatchMean:
    """Streams a per-batch function as its batch-size-weighted mean; sums stay on the device."""

    def __init__(self, fn: BatchMetric) -> None:
        self.fn = fn
        self.total: Tensor | None = None
        self.count = 0

    def reset(self) -> None:
        self.total, self.count = None, 0

    def update(self, preds: Tensor, target: Tensor) -> None:
        n = len(target)
        value = self.fn(preds, target).detach().float() * n
        self.total = value if self.total is None else self.total + value
        self.count += n

    def compute(self) -> Tensor:
        if self.total is None:
            return torch.tensor(float("nan"))
        return self.total / self.count


def named_metrics(metrics: MetricArg) -> dict[str, Metric]:
    """Name each metric and wrap batch functions, refusing clashes and non-metrics.

    Raises:
        TypeError: an item is neither a `Metric` nor a callable.
        ValueError: two metrics get the same name.
    """
    items = list(metrics.items()) if isinstance(metrics, Mapping) else [(None, m) for m in metrics]
    named: dict[str, Metric] = {}
    for i, (key, m) in enumerate(items):
        if isinstance(m, Metric):
            metric, default = m, getattr(m, "name", None) or _snake(type(m).__name__)
        elif callable(m):
            metric, default = _BatchMean(m), getattr(m, "__name__", "metric")
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


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
