"""Binary and multi-label metrics: `BinaryAccuracy`, `MultilabelAccuracy`.

A binary classifier has one score per sample (`nn.Linear(d, 1)` with `BCEWithLogitsLoss`);
a multi-label one has one score per label, each judged on its own. Scores are logits or
probabilities: as torchmetrics decides, a batch with any score outside `[0, 1]` goes through a
sigmoid first (pass `from_logits=True` or `False` to say which instead); a score counts as
positive when the probability is strictly above `threshold`. Unlike torchmetrics, NaN scores and
the scores of ignored entries take no part in that decision (NaN scores are reported by
`compute()`; those of ignored entries are not looked at).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from trainkit.metrics._core import (
    FOLD_POSITIONS,
    Counted,
    all_reduce,
    check_ignore_index,
    check_int,
)

__all__ = ["BinaryAccuracy", "MultilabelAccuracy"]

Average = Literal["micro", "macro", "none"]


class _Thresholded(Counted):
    """Streaming counts of thresholded scores against 0/1 targets, per label."""

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

    def __init__(
        self,
        num_labels: int | None,
        threshold: float,
        from_logits: bool | None,
        ignore_index: int | None,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ValueError(f"{self.owner}(threshold=...): expected a float, got {threshold!r}")
        if not 0 <= threshold <= 1:
            raise ValueError(
                f"{self.owner}(threshold=...): a probability in [0, 1], got {threshold!r}"
            )
        if from_logits is not None and not isinstance(from_logits, bool):
            raise ValueError(
                f"{self.owner}(from_logits=...): expected True, False or None, got {from_logits!r}"
            )
        self.num_labels = num_labels
        self.threshold: float = float(threshold)
        self.from_logits = from_logits
        self.ignore_index: int | None = check_ignore_index(ignore_index, self.owner)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self.reset_counts()
        labels = self.num_labels or 1
        self.correct: Tensor = torch.zeros(labels, dtype=torch.long)
        self.total: Tensor = torch.zeros(labels, dtype=torch.long)

    def _columns(self, preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Take in one batch of scores and 0/1 targets; nothing is read back from the device.

        An empty batch is checked for shape and otherwise ignored.
        """
        if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
            raise TypeError(
                f"{self.owner}: preds and target must be tensors, got {type(preds).__name__} "
                f"and {type(target).__name__}"
            )
        if not preds.is_floating_point():
            raise ValueError(
                f"{self.owner}: preds must be floating-point scores, got {preds.dtype} of "
                f"shape {tuple(preds.shape)}"
            )
        if target.is_complex():
            raise ValueError(f"{self.owner}: target must be 0/1 values, got {target.dtype}")
        scores = preds.detach()
        scores, target = self._columns(scores, target)  # (labels, positions) each
        self.updates += 1
        if target.numel() == 0:
            return
        if not target.is_floating_point():
            target = target.long()  # 255 or -100 compare in range whatever the dtype
        if self.from_logits is None:  # torchmetrics' rule, decided on the device: no read-back
            inside = (scores >= 0) & (scores <= 1) | scores.isnan()
            if self.ignore_index is not None:  # what an ignored entry holds decides nothing
                inside |= target == self.ignore_index
            probabilities = inside.all()
            predicted = torch.where(probabilities, scores, scores.sigmoid()) > self.threshold
        elif self.from_logits:
            predicted = scores.sigmoid() > self.threshold
        else:
            predicted = scores > self.threshold
        self._pending.append((predicted, scores, target))
        self.pending_positions += target.numel()
        if len(self._pending) >= self.fold_every or self.pending_positions >= FOLD_POSITIONS:
            self._fold()

    def _fold(self) -> None:
        if not self._pending:
            return
        predicted = torch.cat([p[0] for p in self._pending], dim=1)
        scores = torch.cat([p[1] for p in self._pending], dim=1)
        target = torch.cat([p[2] for p in self._pending], dim=1)
        self._pending, self.pending_positions = [], 0
        self.follow(target.device)
        positive, negative = target == 1, target == 0
        valid = positive | negative
        nan = scores.isnan()
        valid, counted = self.tally(target, valid, nan, self.ignore_index)
        if self.from_logits is False:  # probabilities must lie in [0, 1]
            outside = (scores < 0) | (scores > 1)
            self.bad_scores += (outside if counted is None else outside & counted).sum()
        self.total += valid.sum(dim=1)
        self.correct += (valid & (predicted == positive)).sum(dim=1)

    def _check(self) -> tuple[int, int]:
        self._fold()
        return self.check_counts("{0, 1}", self.ignore_index)

    def sync(self) -> None:
        """Sum the state over all processes of the default process group (no-op without one)."""
        self._fold()
        all_reduce(*self.shared_states(), self.correct, self.total)

    def _options(self) -> str:
        parts = [f"threshold={self.threshold}"]
        if self.from_logits is not None:
            parts.append(f"from_logits={self.from_logits}")
        if self.ignore_index is not None:
            parts.append(f"ignore_index={self.ignore_index}")
        return ", ".join(parts)


class BinaryAccuracy(_Thresholded):
    """Streaming accuracy of a binary classifier: one score per sample, 0/1 targets.

    Scores `(N,)` or `(N, 1)` (the output of `nn.Linear(d, 1)`), or any `(N, ...)` shape with
    targets of the same shape (then every entry is a sample: pixels of a binary mask, or the
    labels of a multi-label classifier pooled together). Targets `(N,)` also go with scores
    `(N, 1)`. Targets are 0/1 of any dtype (floats as for `BCEWithLogitsLoss`, ints, bools).

    Logits or probabilities, as torchmetrics decides: a batch with any score outside `[0, 1]`
    goes through a sigmoid first (NaN scores and those of ignored entries take no part in this).
    A batch of logits that all happen to lie in `[0, 1]` would be read as probabilities, so
    pass `from_logits=True` when the model outputs logits (or `False` for probabilities: then a
    score outside `[0, 1]` is an error). A sample is predicted positive when its probability is
    strictly above `threshold` (a logit of exactly 0 is negative at 0.5). Recorded by `fit` as
    `val_binary_accuracy`.

    Args:
        threshold: Probability above which a score is positive, in `[0, 1]`.
        from_logits: True: scores are logits; False: probabilities; None: decided per batch.
        ignore_index: A target value whose entries are not counted (e.g. -100 or 255).

    Raises:
        ValueError: a bad argument; in `update`, integer scores or shapes that do not match
            (named); in `compute`, targets other than 0/1, NaN scores, or (with
            `from_logits=False`) scores outside `[0, 1]` were seen (with their counts).
        RuntimeError: `compute()` before any `update()`, or with no sample counted.

    Example:
        >>> acc = BinaryAccuracy()
        >>> logits = torch.tensor([[2.0], [-2.0], [3.0], [-1.0]])  # nn.Linear(d, 1) output
        >>> acc.update(logits, torch.tensor([[0.0], [1.0], [0.0], [1.0]]))
        >>> acc.compute()
        tensor(0., dtype=torch.float64)
        >>> acc.update(torch.tensor([0.9, 0.2]), torch.tensor([1, 0]))  # probabilities
        >>> acc.compute()
        tensor(0.3333, dtype=torch.float64)
    """

    name = "binary_accuracy"
    owner = "BinaryAccuracy"

    def __init__(
        self,
        threshold: float = 0.5,
        *,
        from_logits: bool | None = None,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(None, threshold, from_logits, ignore_index)

    def _columns(self, preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if preds.ndim == 0:
            raise ValueError("BinaryAccuracy: preds must be (N,) or (N, ...) scores, got 0-dim")
        if preds.ndim == 2 and preds.shape[1] == 1 and target.shape == preds.shape[:1]:
            preds = preds[:, 0]
        if preds.shape != target.shape:
            hint = (
                "; for class indices with one score per class use Accuracy"
                if target.shape == preds.shape[:1] + preds.shape[2:]
                else ""
            )
            raise ValueError(
                f"BinaryAccuracy: preds {tuple(preds.shape)} and target "
                f"{tuple(target.shape)} must have the same shape (or preds (N, 1) with target "
                f"(N,)){hint}"
            )
        return preds.reshape(1, -1), target.reshape(1, -1)

    def compute(self) -> Tensor:
        """The accuracy since `reset` as a 0-dim float64 tensor (reads from the device)."""
        seen, counted = self._check()
        if counted == 0:
            raise self.no_samples(seen, self.ignore_index)
        return self.correct.sum().double() / counted

    def __repr__(self) -> str:
        return f"BinaryAccuracy({self._options()})"


class MultilabelAccuracy(_Thresholded):
    """Streaming accuracy of a multi-label classifier: `L` scores per sample, each 0/1.

    Scores `(N, L)` or `(N, L, d1, ...)` with 0/1 targets of the same shape; each label is
    thresholded on its own, as in `BinaryAccuracy` (same logits rule). `average="micro"` is the
    fraction of all counted (sample, label) decisions that are right; `"macro"` the mean of the
    labels' accuracies (labels with no counted entry left out); `"none"` each label's accuracy,
    a `(L,)` tensor with NaN for a label with no counted entry. Recorded by `fit` as
    `val_multilabel_accuracy` (a tensor in `History.tensors` for `"none"`).

    Args:
        num_labels: Number of labels `L`, at least 1.
        threshold: Probability above which a score is positive, in `[0, 1]`.
        average: `"micro"`, `"macro"` or `"none"`, as above.
        from_logits: True: scores are logits; False: probabilities; None: decided per batch.
        ignore_index: A target value whose entries are not counted.

    Raises:
        ValueError: a bad argument; in `update`, shapes that do not match or not `num_labels`
            columns; in `compute`, bad values seen, as by `BinaryAccuracy`.
        RuntimeError: `compute()` before any `update()`, or (micro, macro) with no entry
            counted.

    Example:
        >>> acc = MultilabelAccuracy(3)
        >>> probs = torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.8, 0.4]])
        >>> acc.update(probs, torch.tensor([[1, 0, 0], [0, 1, 0]]))
        >>> acc.compute()
        tensor(0.8333, dtype=torch.float64)
        >>> per_label = MultilabelAccuracy(3, average="none")
        >>> per_label.update(probs, torch.tensor([[1, 0, 0], [0, 1, 0]]))
        >>> per_label.compute()
        tensor([1.0000, 1.0000, 0.5000], dtype=torch.float64)
    """

    name = "multilabel_accuracy"
    owner = "MultilabelAccuracy"

    def __init__(
        self,
        num_labels: int,
        threshold: float = 0.5,
        *,
        average: Average = "micro",
        from_logits: bool | None = None,
        ignore_index: int | None = None,
    ) -> None:
        check_int(num_labels, "MultilabelAccuracy", "num_labels", 1)
        if average not in ("micro", "macro", "none"):
            raise ValueError(
                "MultilabelAccuracy(average=...): expected 'micro', 'macro' or 'none', got "
                f"{average!r}"
            )
        self.average: Average = average
        super().__init__(num_labels, threshold, from_logits, ignore_index)

    def _columns(self, preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if preds.ndim < 2 or preds.shape[1] != self.num_labels:
            raise ValueError(
                f"MultilabelAccuracy: preds must be (N, {self.num_labels}, ...) scores (one "
                f"column per label), got shape {tuple(preds.shape)}"
            )
        if preds.shape != target.shape:
            raise ValueError(
                f"MultilabelAccuracy: preds {tuple(preds.shape)} and target "
                f"{tuple(target.shape)} must have the same shape (0/1 per sample and label)"
            )
        columns = preds.shape[1]
        return (
            preds.movedim(1, 0).reshape(columns, -1),
            target.movedim(1, 0).reshape(columns, -1),
        )

    def compute(self) -> Tensor:
        """The accuracy since `reset`, float64: 0-dim (micro, macro) or `(L,)` (none)."""
        seen, counted = self._check()
        per_label = self.correct.double() / self.total
        if self.average == "none":
            return per_label
        if counted == 0:
            raise self.no_samples(seen, self.ignore_index)
        if self.average == "macro":
            return per_label.nanmean()
        return self.correct.sum().double() / counted

    def __repr__(self) -> str:
        return f"MultilabelAccuracy({self.num_labels}, average={self.average!r}, {self._options()})"
