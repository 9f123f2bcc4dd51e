"""Multiclass metrics: `accuracy`, `top_k_accuracy`, `Accuracy`, `PerClassAccuracy`,
`ConfusionMatrix`.

Inputs: scores `(N, C)` or `(N, C, d1, d2, ...)` (each position a sample, as a segmentation
model's `(N, C, H, W)` output), with targets of class indices `(N,)` / `(N, d1, d2, ...)` of any
integer dtype, or one-hot / probability rows of the scores' shape. `ignore_index` leaves out the
positions whose target has that value (255 or -100 as usual, inside or outside `[0, C)`).

Top-k tie rule: classes are ranked by score, ties broken toward the lower class index (a stable
descending sort); a sample is a hit when its target's rank is below `k`. So top-1 is exactly
`argmax` (the first maximum), and a larger `k` never scores lower.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trainkit.metrics._core import (
    FOLD_POSITIONS,
    Counted,
    all_reduce,
    bad_one_hot_rows,
    check_ignore_index,
    check_int,
    check_k,
    check_num_classes,
    multiclass_inputs,
    top_k_hits,
)

__all__ = ["Accuracy", "ConfusionMatrix", "PerClassAccuracy", "accuracy", "top_k_accuracy"]


def accuracy(out: Tensor, yb: Tensor, *, ignore_index: int | None = None) -> Tensor:
    """Fraction of samples whose arg-max is the target, as in "What is torch.nn really?".

    Nothing is read back from the device, so bad values cannot raise here: the result is NaN
    when a counted target is outside `[0, C)`, a one-hot row is not one-hot, a counted sample
    has a NaN score, or every target is `ignore_index`. `Accuracy` raises for these instead,
    and so do `fit` and `evaluate` when this function gave NaN for some batch.
    In `fit`, a batch function is averaged weighted by batch size; with `ignore_index` the
    batches hold different numbers of counted positions, so use `Accuracy(ignore_index=...)`
    there (`fit` refuses a `functools.partial` of this function with `ignore_index`).

    Args:
        out: Scores `(N, C)` or `(N, C, d1, ...)`; `-inf` marks a masked class.
        yb: Class indices `(N,)` / `(N, d1, ...)` of any integer dtype, or one-hot /
            probability rows of `out`'s shape (their arg-max is the class).
        ignore_index: A target value whose positions are not counted (e.g. 255 or -100).

    Returns:
        A 0-dim float tensor on `out`'s device (not a Python float: reading it waits for the
        device).

    Raises:
        ValueError: an empty batch; one score per sample (use `BinaryAccuracy`); float class
            indices; targets `(N, 1)`; shapes that do not match (all named in the message).

    Example:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        tensor(0.5000)
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 255]),
        ...          ignore_index=255)
        tensor(1.)
    """
    return _batch_top_k(out, yb, 1, ignore_index, "accuracy")


def top_k_accuracy(
    out: Tensor, yb: Tensor, k: int = 5, *, ignore_index: int | None = None
) -> Tensor:
    """Fraction of samples whose target is among the `k` highest scores.

    Ties are broken toward the lower class index (a stable descending sort), so `k=1` equals
    `accuracy` and the result never decreases as `k` grows. Bad values give NaN, as for
    `accuracy`.

    Args:
        out: Scores `(N, C)` or `(N, C, d1, ...)`.
        yb: Class indices `(N,)` / `(N, d1, ...)`, or one-hot / probability rows of `out`'s
            shape.
        k: How many of the highest scores count, from 1 to `C`.
        ignore_index: A target value whose positions are not counted.

    Returns:
        A 0-dim float tensor on `out`'s device.

    Raises:
        ValueError: `k` is not between 1 and the number of classes; the inputs are refused
            as by `accuracy`.

    Example:
        >>> out = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
        >>> top_k_accuracy(out, torch.tensor([1, 0]), k=2)
        tensor(0.5000)
        >>> top_k_accuracy(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), torch.tensor([2]), k=2)
        tensor(0.)
    """
    return _batch_top_k(out, yb, k, ignore_index, "top_k_accuracy")


def _batch_top_k(out: Tensor, yb: Tensor, k: int, ignore_index: int | None, owner: str) -> Tensor:
    ignore_index = check_ignore_index(ignore_index, owner)
    labels, one_hot = multiclass_inputs(out, yb, owner, None, ignore_index)
    classes = out.shape[1]
    check_k(k, classes, owner)
    if labels.numel() == 0:
        raise ValueError(
            f"{owner}: empty batch (preds {tuple(out.shape)}, target {tuple(yb.shape)}): "
            "there is no sample to score"
        )
    if k == 1:  # one pass gives the prediction and, in the maxima, the NaN check
        maxima, predicted = out.max(dim=1)
        hits = predicted == labels
    else:
        hits, maxima = top_k_hits(out, labels, k), out.amax(dim=1)
    bad = maxima.isnan() | (labels < 0) | (labels >= classes)
    if one_hot:
        bad |= bad_one_hot_rows(yb)
    if ignore_index is None:
        score = hits.sum() / labels.numel()
    else:
        counted = labels != ignore_index
        bad &= counted
        score = (hits & counted).sum() / counted.sum()
    return torch.where(bad.any(), torch.nan, score)


class _Classification(Counted):
    """Streaming machinery of `Accuracy`, `PerClassAccuracy` and `ConfusionMatrix`.

    `update` keeps what the batch needs (predicted classes or top-k hits, the row maxima for
    the NaN check, labels as int64) in a list on the device, and every `fold_every` batches
    (or once they hold about a million positions, and in `compute`/`sync`) folds them into fixed
    count tensors. So a batch costs one or a few device ops and no read-back; range and NaN
    checks run per fold, on the device, and are reported by `compute()`.
    """

    # the shared counts of `Counted`, updated here too (declared again for type checkers, which
    # otherwise infer each subclass's own type for them)
    updates: int
    pending_positions: int
    seen: Tensor
    counted: Tensor
    bad_targets: Tensor
    nan_rows: Tensor
    bad_rows: Tensor
    bad_scores: Tensor

    def __init__(self, num_classes: int | None, ignore_index: int | None) -> None:
        self.num_classes = num_classes
        self.ignore_index: int | None = check_ignore_index(ignore_index, self.owner)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._pending: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []
        self._columns: int | None = self.num_classes
        self.reset_counts()
        self._init_counts()

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Take in one batch: scores `(N, C, ...)`, targets `(N, ...)` or one-hot; no read-back.

        An empty batch is checked for shape and otherwise ignored.
        """
        preds = preds.detach()  # cheaper per batch than a torch.no_grad() decorator
        labels, one_hot = multiclass_inputs(
            preds, target, self.owner, self._columns, self.ignore_index
        )
        self._columns = preds.shape[1]
        self.updates += 1
        if labels.numel() == 0:
            return
        predicted, maxima = self._predicted(preds, labels)
        bad_rows = bad_one_hot_rows(target) if one_hot else None
        if labels.ndim > 1:  # segmentation: every position a sample
            predicted, maxima, labels = (
                predicted.reshape(-1),
                maxima.reshape(-1),
                labels.reshape(-1),
            )
            bad_rows = None if bad_rows is None else bad_rows.reshape(-1)
        self._pending.append((predicted, maxima, labels, bad_rows))
        self.pending_positions += labels.numel()
        if len(self._pending) >= self.fold_every or self.pending_positions >= FOLD_POSITIONS:
            self._fold()

    def _predicted(self, preds: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        maxima, predicted = preds.max(dim=1)  # the first maximum, as argmax; NaN propagates
        return predicted, maxima

    def _fold(self) -> None:
        if not self._pending:
            return
        predicted = torch.cat([p[0] for p in self._pending])
        maxima = torch.cat([p[1] for p in self._pending])
        labels = torch.cat([p[2] for p in self._pending])
        bad_rows = [p[3] for p in self._pending if p[3] is not None]
        self._pending, self.pending_positions = [], 0
        self.follow(labels.device)
        assert self._columns is not None
        valid = (labels >= 0) & (labels < self._columns)
        valid, _ = self.tally(labels, valid, maxima.isnan(), self.ignore_index)
        if bad_rows:
            self.bad_rows += torch.cat(bad_rows).sum()
        self._count(predicted, torch.where(valid, labels, 0), valid)

    def _check(self) -> tuple[int, int]:
        self._fold()
        return self.check_counts(f"[0, {self._columns})", self.ignore_index)

    def sync(self) -> None:
        """Sum the state over all processes of the default process group (no-op without one)."""
        self._fold()
        all_reduce(*self.shared_states(), *self._counts())

    def _init_counts(self) -> None:
        raise NotImplementedError

    def _counts(self) -> list[Tensor]:
        raise NotImplementedError

    def _count(self, predicted: Tensor, labels: Tensor, valid: Tensor) -> None:
        raise NotImplementedError

    def _options(self) -> str:
        return "" if self.ignore_index is None else f", ignore_index={self.ignore_index}"


class Accuracy(_Classification):
    """Streaming (top-k) accuracy: the fraction of samples whose target is among the `top_k`
    highest scores.

    Scores `(N, C)` or `(N, C, d1, ...)` (each position a sample: segmentation); targets class
    indices `(N, d1, ...)` of any integer dtype, or one-hot / probability rows of the scores'
    shape. Ties are broken toward the lower class index (a stable descending sort), so
    `top_k=1` is `argmax` and a larger `top_k` never scores lower; `-inf` scores (masked
    classes) are fine. Recorded by `fit` as `val_accuracy`, or `val_top{k}_accuracy`.

    Args:
        top_k: How many of the highest scores count as a hit, at least 1.
        ignore_index: A target value whose positions are not counted (e.g. 255 or -100).

    Raises:
        ValueError: bad `top_k` or `ignore_index`; in `update`, one score per sample (use
            `BinaryAccuracy`), float class indices, mismatched shapes, `top_k` larger than the
            number of classes; in `compute`, targets outside `[0, C)`, one-hot rows that are
            not one-hot, or NaN scores were seen (with their counts).
        RuntimeError: `compute()` before any `update()`, or with no sample counted (every
            batch empty, every target ignored).

    Example:
        >>> acc = Accuracy()
        >>> acc.update(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        >>> acc.update(torch.tensor([[0.3, 0.7]]), torch.tensor([1]))
        >>> acc.compute()
        tensor(0.6667, dtype=torch.float64)
        >>> pixels = Accuracy(ignore_index=255)  # segmentation: (N, C, H, W) with (N, H, W)
        >>> scores = torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]]])  # N=1, C=2, H=1, W=2
        >>> pixels.update(scores, torch.tensor([[[0, 255]]], dtype=torch.uint8))
        >>> pixels.compute()
        tensor(1., dtype=torch.float64)
    """

    owner = "Accuracy"

    def __init__(self, top_k: int = 1, *, ignore_index: int | None = None) -> None:
        self.top_k: int = check_int(top_k, "Accuracy", "top_k", 1)
        self.name: str = "accuracy" if top_k == 1 else f"top{top_k}_accuracy"
        super().__init__(None, ignore_index)

    def _init_counts(self) -> None:
        self.correct: Tensor = torch.zeros((), dtype=torch.long)

    def _counts(self) -> list[Tensor]:
        return [self.correct]

    def _predicted(self, preds: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.top_k == 1:
            return super()._predicted(preds, labels)
        check_k(self.top_k, preds.shape[1], "Accuracy")
        return top_k_hits(preds, labels, self.top_k), preds.amax(dim=1)

    def _count(self, predicted: Tensor, labels: Tensor, valid: Tensor) -> None:
        hits = predicted == labels if self.top_k == 1 else predicted
        self.correct += (hits & valid).sum()

    def compute(self) -> Tensor:
        """The accuracy since `reset` as a 0-dim float64 tensor (reads from the device)."""
        seen, counted = self._check()
        if counted == 0:
            raise self.no_samples(seen, self.ignore_index)
        return self.correct.double() / counted

    def __repr__(self) -> str:
        return f"Accuracy(top_k={self.top_k}{self._options()})"


class PerClassAccuracy(_Classification):
    """Streaming accuracy of each class: of the samples of class `c`, the fraction predicted `c`.

    Inputs as for `Accuracy` (with `C == num_classes`). Recorded by `fit` as the tensor
    `val_per_class_accuracy` in `History.tensors`; `report()` prints the 60-minute blitz's table
    ("Accuracy of plane : 62 %").

    Args:
        num_classes: Number of classes `C`, at least 2.
        class_names: Optional names of the classes, for `report()`; `C` of them.
        ignore_index: A target value whose positions are not counted.

    Raises:
        ValueError: bad `num_classes`, `class_names` or `ignore_index`; in `update`, scores that
            do not have `num_classes` columns or refused as by `Accuracy`; in `compute`, bad
            values seen, as by `Accuracy`.
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

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        *,
        ignore_index: int | None = None,
    ) -> None:
        check_num_classes(num_classes, "PerClassAccuracy")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"PerClassAccuracy(class_names=...): {len(class_names)} names for "
                f"{num_classes} classes"
            )
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None
        super().__init__(num_classes, ignore_index)

    def _init_counts(self) -> None:
        assert self.num_classes is not None
        self.correct: Tensor = torch.zeros(self.num_classes, dtype=torch.long)
        self.total: Tensor = torch.zeros(self.num_classes, dtype=torch.long)

    def _counts(self) -> list[Tensor]:
        return [self.correct, self.total]

    def _count(self, predicted: Tensor, labels: Tensor, valid: Tensor) -> None:
        self.total.index_add_(0, labels, valid.long())
        self.correct.index_add_(0, labels, (valid & (predicted == labels)).long())

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
        return f"PerClassAccuracy({self.num_classes}{self._options()})"


class ConfusionMatrix(_Classification):
    """Streaming confusion matrix: entry `[t, p]` counts samples of class `t` predicted as `p`.

    Inputs as for `Accuracy` (with `C == num_classes`); the predicted class is the arg-max (the
    first maximum on ties). Cell indices are computed in int64, whatever the target dtype.
    Recorded by `fit` as the tensor `val_confusion_matrix` in `History.tensors`.

    Args:
        num_classes: Number of classes `C`, at least 2.
        ignore_index: A target value whose positions are not counted.

    Raises:
        ValueError: bad `num_classes` or `ignore_index`; in `update`, scores that do not have
            `num_classes` columns or refused as by `Accuracy`; in `compute`, bad values seen,
            as by `Accuracy`.
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

    def __init__(self, num_classes: int, *, ignore_index: int | None = None) -> None:
        super().__init__(check_num_classes(num_classes, "ConfusionMatrix"), ignore_index)

    def _init_counts(self) -> None:
        assert self.num_classes is not None
        self.matrix: Tensor = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def _counts(self) -> list[Tensor]:
        return [self.matrix]

    def _count(self, predicted: Tensor, labels: Tensor, valid: Tensor) -> None:
        assert self.num_classes is not None
        self.matrix.view(-1).index_add_(0, labels * self.num_classes + predicted, valid.long())

    def compute(self) -> Tensor:
        """The `(C, C)` matrix of counts, rows the true class, columns the predicted one."""
        self._check()
        return self.matrix.clone()

    def __repr__(self) -> str:
        return f"ConfusionMatrix({self.num_classes}{self._options()})"
