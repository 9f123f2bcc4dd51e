"""Metrics that cost nothing per batch: their sums stay on the device until `compute()`.

`update` never reads a value back from the device (no `.item()`, no branching on tensor
values), so a GPU is never stalled mid-epoch. Checks that need values (targets out of range,
non-finite predictions) are counted on the device and reported by `compute()`, which is the one
read-back per epoch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "Accuracy",
    "BatchMetric",
    "ConfusionMatrix",
    "Mean",
    "Metric",
    "MetricArg",
    "PerClassAccuracy",
    "accuracy",
    "top_k_accuracy",
]


def accuracy(out: Tensor, yb: Tensor) -> Tensor:
    """Fraction of rows of `out` whose arg-max is the target, as in "What is torch.nn really?".

    Args:
        out: Scores or log-probabilities, shape `(N, C)`.
        yb: Class indices `(N,)`, or one-hot / probability rows `(N, C)` (their arg-max is the
            class).

    Returns:
        A 0-dim float tensor on `out`'s device (not a Python float: reading it waits for the
        device).

    Example:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        tensor(0.5000)
    """
    preds = torch.argmax(out, dim=1)
    if yb.ndim == out.ndim:
        yb = yb.argmax(dim=1)
    return (preds == yb).float().mean()


def top_k_accuracy(out: Tensor, yb: Tensor, k: int = 5) -> Tensor:
    """Fraction of rows of `out` whose `k` highest scores include the target.

    Args:
        out: Scores, shape `(N, C)`.
        yb: Class indices `(N,)`, or one-hot / probability rows `(N, C)`.
        k: How many of the highest scores count, from 1 to `C`.

    Returns:
        A 0-dim float tensor on `out`'s device.

    Raises:
        ValueError: `k` is not between 1 and the number of classes; shapes do not match.

    Example:
        >>> out = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
        >>> top_k_accuracy(out, torch.tensor([1, 0]), k=2)
        tensor(0.5000)
    """
    labels = _labels(out, yb, "top_k_accuracy")
    _check_k(k, out, "top_k_accuracy")
    return _top_k_hits(out, labels, k).float().mean()


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


class _Classification:
    """Shared streaming machinery of `Accuracy`, `PerClassAccuracy` and `ConfusionMatrix`.

    `update` keeps what the batch needs (predicted classes, labels, the sum of the scores) in
    lists on the device, and every `fold_every` batches (and in `compute`/`sync`) folds them
    into fixed count tensors. So a batch costs two or three device ops and no read-back; range
    and finiteness checks run per fold, on the device, and are reported by `compute()`.
    """

    fold_every = 64
    owner = "metric"

    def __init__(self, num_classes: int | None) -> None:
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._preds: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._sums: list[Tensor] = []
        self._columns: int | None = self.num_classes
        self.seen = torch.zeros((), dtype=torch.long)
        self.bad_targets = torch.zeros((), dtype=torch.long)
        self.score_sum = torch.zeros((), dtype=torch.float64)  # NaN/Inf if any score was
        self._init_counts()

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Take in one batch: scores `(N, C)`, targets `(N,)` or `(N, C)`; nothing is read back."""
        preds = preds.detach()  # cheaper per batch than a torch.no_grad() decorator
        labels = _labels(preds, target, self.owner, self._columns)
        self._columns = preds.shape[1]
        self._preds.append(self._predicted(preds))
        self._labels.append(labels)
        self._sums.append(preds.sum(dtype=torch.float64))
        if len(self._labels) >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        if not self._labels:
            return
        preds, labels = torch.cat(self._preds), torch.cat(self._labels)
        score_sum = torch.stack(self._sums).sum()
        self._preds, self._labels, self._sums = [], [], []
        states = self._states()
        if states[0].device != labels.device:
            self._move(labels.device)
        assert self._columns is not None
        valid = (labels >= 0) & (labels < self._columns)
        self.seen += labels.numel()
        self.bad_targets += labels.numel() - valid.sum()
        self.score_sum += score_sum
        self._count(preds, torch.where(valid, labels, 0), valid)

    def _check(self) -> None:
        self._fold()
        # the read-back from the device: once per compute()
        seen, bad_targets, score_sum = torch.stack(
            [self.seen.double(), self.bad_targets.double(), self.score_sum]
        ).tolist()
        if seen == 0:
            raise RuntimeError(f"{self.owner}.compute() called before any update()")
        if bad_targets:
            raise ValueError(
                f"{self.owner}: {int(bad_targets)} of {int(seen)} targets were outside "
                f"[0, {self._columns})"
            )
        if not math.isfinite(score_sum):
            raise ValueError(f"{self.owner}: some prediction values were NaN or infinite")

    def sync(self) -> None:
        """Sum the state over all processes of the default process group (no-op without one)."""
        self._fold()
        _all_reduce(*self._states())

    def _states(self) -> list[Tensor]:
        return [self.seen, self.bad_targets, self.score_sum, *self._counts()]

    def _move(self, device: torch.device) -> None:
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))

    def _init_counts(self) -> None:
        raise NotImplementedError

    def _counts(self) -> list[Tensor]:
        raise NotImplementedError

    def _predicted(self, preds: Tensor) -> Tensor:
        return preds.argmax(dim=1)

    def _count(self, preds: Tensor, labels: Tensor, valid: Tensor) -> None:
        raise NotImplementedError


class Accuracy(_Classification):
    """Streaming (top-k) accuracy: the fraction of samples whose target is among the `top_k`
    highest scores.

    Targets may be class indices `(N,)` or one-hot / probability rows `(N, C)`. Recorded by
    `fit` as `val_accuracy`, or `val_top{k}_accuracy` for `top_k > 1`.

    Args:
        top_k: How many of the highest scores count as a hit, at least 1.

    Raises:
        ValueError: bad `top_k`; in `update`, mismatched shapes or `top_k` larger than the
            number of classes; in `compute`, targets outside `[0, C)` or non-finite predictions
            were seen.
        RuntimeError: `compute()` before any `update()`.

    Example:
        >>> acc = Accuracy()
        >>> acc.update(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        >>> acc.update(torch.tensor([[0.3, 0.7]]), torch.tensor([1]))
        >>> acc.compute()
        tensor(0.6667, dtype=torch.float64)
    """

    owner = "Accuracy"

    def __init__(self, top_k: int = 1) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"Accuracy(top_k=...): expected an int >= 1, got {top_k!r}")
        self.top_k = top_k
        self.name = "accuracy" if top_k == 1 else f"top{top_k}_accuracy"
        super().__init__(None)

    def _init_counts(self) -> None:
        self.correct = torch.zeros((), dtype=torch.long)

    def _counts(self) -> list[Tensor]:
        return [self.correct]

    def _predicted(self, preds: Tensor) -> Tensor:
        if self.top_k == 1:
            return preds.argmax(dim=1)
        _check_k(self.top_k, preds, "Accuracy")
        return preds.topk(self.top_k, dim=1).indices

    def _count(self, preds: Tensor, labels: Tensor, valid: Tensor) -> None:
        hits = preds == labels if preds.ndim == 1 else (preds == labels.unsqueeze(1)).any(dim=1)
        self.correct += (hits & valid).sum()

    def compute(self) -> Tensor:
        """The accuracy since `reset` as a 0-dim float64 tensor (reads from the device)."""
        self._check()
        return self.correct.double() / self.seen

    def __repr__(self) -> str:
        return f"Accuracy(top_k={self.top_k})"


class PerClassAccuracy(_Classification):
    """Streaming accuracy of each class: of the samples of class `c`, the fraction predicted `c`.

    Recorded by `fit` as the tensor `val_per_class_accuracy` in `History.tensors`; `report()`
    prints the 60-minute blitz's table ("Accuracy of plane : 62 %").

    Args:
        num_classes: Number of classes `C`, at least 1.
        class_names: Optional names of the classes, for `report()`; `C` of them.

    Raises:
        ValueError: bad `num_classes` or `class_names`; in `update`, scores that do not have
            `num_classes` columns or mismatched shapes; in `compute`, targets outside `[0, C)` or
            non-finite predictions were seen.
        RuntimeError: `compute()` before any `update()`.

    Example:
        >>> per_class = PerClassAccuracy(2, class_names=["cat", "dog"])
        >>> out = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
        >>> per_class.update(out, torch.tensor([0, 1, 1]))
        >>> per_class.compute()
        tensor([1.0000, 0.5000], dtype=torch.float64)
        >>> print(per_class.report())
        Accuracy of   cat : 100 %
        Accuracy of   dog : 50 %
    """

    name = "per_class_accuracy"
    owner = "PerClassAccuracy"

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        _check_num_classes(num_classes, "PerClassAccuracy")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"PerClassAccuracy(class_names=...): {len(class_names)} names for "
                f"{num_classes} classes"
            )
        self.class_names = list(class_names) if class_names is not None else None
        super().__init__(num_classes)

    def _init_counts(self) -> None:
        assert self.num_classes is not None
        self.correct = torch.zeros(self.num_classes, dtype=torch.long)
        self.total = torch.zeros(self.num_classes, dtype=torch.long)

    def _counts(self) -> list[Tensor]:
        return [self.correct, self.total]

    def _count(self, preds: Tensor, labels: Tensor, valid: Tensor) -> None:
        self.total.index_add_(0, labels, valid.long())
        self.correct.index_add_(0, labels, (valid & (preds == labels)).long())

    def compute(self) -> Tensor:
        """Accuracy of each class, float64 `(C,)`; NaN for a class with no samples yet."""
        self._check()
        return self.correct.double() / self.total

    def report(self, values: Tensor | None = None) -> str:
        """The blitz's per-class table, one line per class: `Accuracy of plane : 62 %`.

        Args:
            values: Per-class accuracies to show (e.g. from `History.tensors`); by default
                `compute()`.

        Returns:
            The table as text.
        """
        values = self.compute() if values is None else values
        names = self.class_names or [str(i) for i in range(len(values))]
        return "\n".join(
            f"Accuracy of {name:>5s} : " + ("n/a" if v != v else f"{int(100 * v):2d} %")
            for name, v in zip(names, values.tolist(), strict=True)
        )

    def __repr__(self) -> str:
        return f"PerClassAccuracy({self.num_classes})"


class ConfusionMatrix(_Classification):
    """Streaming confusion matrix: entry `[t, p]` counts samples of class `t` predicted as `p`.

    Recorded by `fit` as the tensor `val_confusion_matrix` in `History.tensors`.

    Args:
        num_classes: Number of classes `C`, at least 1.

    Raises:
        ValueError: bad `num_classes`; in `update`, scores that do not have `num_classes`
            columns or mismatched shapes; in `compute`, targets outside `[0, C)` or non-finite
            predictions were seen.
        RuntimeError: `compute()` before any `update()`.

    Example:
        >>> cm = ConfusionMatrix(2)
        >>> cm.update(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([0, 1, 1]))
        >>> cm.compute()
        tensor([[1, 0],
                [1, 1]])
    """

    name = "confusion_matrix"
    owner = "ConfusionMatrix"

    def __init__(self, num_classes: int) -> None:
        super().__init__(_check_num_classes(num_classes, "ConfusionMatrix"))

    def _init_counts(self) -> None:
        assert self.num_classes is not None
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def _counts(self) -> list[Tensor]:
        return [self.matrix]

    def _count(self, preds: Tensor, labels: Tensor, valid: Tensor) -> None:
        assert self.num_classes is not None
        self.matrix.view(-1).index_add_(0, labels * self.num_classes + preds, valid.long())

    def compute(self) -> Tensor:
        """The `(C, C)` matrix of counts, rows the true class, columns the predicted one."""
        self._check()
        return self.matrix.clone()

    def __repr__(self) -> str:
        return f"ConfusionMatrix({self.num_classes})"


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
        self.count = 0.0

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
        _all_reduce(state)
        self.total, self.count = state[0], float(state[1])

    def __repr__(self) -> str:
        return "Mean()"


class _BatchMean:
    """Streams a per-batch function as its batch-size-weighted mean."""

    def __init__(self, fn: BatchMetric) -> None:
        self.fn = fn
        self.mean = Mean()

    def reset(self) -> None:
        self.mean.reset()

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.mean.update(self.fn(preds, target), len(target))

    def compute(self) -> Tensor:
        return self.mean.compute()

    def sync(self) -> None:
        self.mean.sync()


SYNCED = (_Classification, Mean, _BatchMean)
"""Metrics whose `sync()` `fit` calls under a process group (torchmetrics sync in `compute`)."""


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


def move_metrics(metrics: Mapping[str, Metric], device: torch.device) -> None:
    """Put module metrics (torchmetrics') on `device`; trainkit's follow their inputs."""
    for m in metrics.values():
        if isinstance(m, nn.Module):
            m.to(device)


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _labels(preds: Tensor, target: Tensor, owner: str, num_classes: int | None = None) -> Tensor:
    """Class indices from index or one-hot/probability targets; shape checks only (no sync)."""
    if preds.ndim != 2:
        raise ValueError(f"{owner}: preds must be (N, C) scores, got shape {tuple(preds.shape)}")
    if num_classes is not None and preds.shape[1] != num_classes:
        raise ValueError(
            f"{owner}: preds has {preds.shape[1]} columns, expected {num_classes} (one per class)"
        )
    if target.shape[:1] != preds.shape[:1]:
        raise ValueError(
            f"{owner}: preds has {preds.shape[0]} rows but target has "
            f"{target.shape[0] if target.ndim else 'none'} (shape {tuple(target.shape)})"
        )
    if target.ndim == 2 and target.shape == preds.shape:
        return target.argmax(dim=1)
    if target.ndim == 1:
        if target.is_floating_point() or target.is_complex():
            raise ValueError(f"{owner}: class-index targets must be integers, got {target.dtype}")
        return target
    raise ValueError(
        f"{owner}: target must be class indices (N,) or one-hot rows {tuple(preds.shape)}, "
        f"got shape {tuple(target.shape)}"
    )


def _check_k(k: int, preds: Tensor, owner: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= preds.shape[1]:
        raise ValueError(f"{owner}: top_k={k!r} must be between 1 and the {preds.shape[1]} classes")


def _check_num_classes(num_classes: int, owner: str) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{owner}(num_classes=...): expected an int >= 1, got {num_classes!r}")
    return num_classes


def _top_k_hits(preds: Tensor, labels: Tensor, k: int) -> Tensor:
    if k == 1:
        return preds.argmax(dim=1) == labels
    return (preds.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1)


def _all_reduce(*tensors: Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)
