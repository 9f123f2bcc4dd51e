"""Internal helpers shared by the metric modules: input checks, the top-k rule, streaming state.

Nothing here reads a value back from the device: the checks look at shapes and dtypes only;
value checks (targets out of range, NaN scores) are counted on the device and raised by
`compute()`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

FOLD_POSITIONS = 1 << 20
"""Fold the kept batches into the counts once they hold this many positions (segmentation)."""


INDEX_DTYPES = frozenset(
    {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool}
)
"""Dtypes of class-index targets (the fast path of `multiclass_inputs`; others are checked)."""

_CLASS_INDEX: dict[tuple[int, int, torch.device], Tensor] = {}


def check_int(value: object, owner: str, arg: str, low: int) -> int:
    """`value` if it is an int (not a bool) of at least `low`, else a ValueError naming `arg`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}({arg}=...): expected an int >= {low}, got {value!r}")
    return value


def check_num_classes(value: object, owner: str) -> int:
    """`num_classes` if it is an int of at least 2, else a ValueError (one class: binary)."""
    if value == 1 and isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            f"{owner}(num_classes=1): one class is a binary classifier with one output column; "
            "use BinaryAccuracy() (or num_classes=2 with two output columns)"
        )
    return check_int(value, owner, "num_classes", 2)


def check_ignore_index(value: object, owner: str) -> int | None:
    """`ignore_index` if it is None or an int, else a ValueError."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{owner}(ignore_index=...): expected an int or None, got {value!r}")
    return value


def check_k(k: object, classes: int, owner: str) -> int:
    """`k` if it is an int between 1 and `classes`, else a ValueError."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= classes:
        raise ValueError(f"{owner}: top_k={k!r} must be between 1 and the {classes} classes")
    return k


def binary_hint(preds: Tensor, target: Tensor, owner: str) -> ValueError:
    """The error for one score per sample given to a multiclass metric."""
    return ValueError(
        f"{owner}: preds {tuple(preds.shape)} has a single score per sample (target "
        f"{tuple(target.shape)}): that is a binary classifier, which {owner} cannot score "
        "(the arg-max of one column is always 0). Use BinaryAccuracy() (threshold 0.5 on the "
        "probability), or MultilabelAccuracy for several 0/1 labels per sample"
    )


def multiclass_inputs(
    preds: Tensor,
    target: Tensor,
    owner: str,
    num_classes: int | None = None,
    ignore_index: int | None = None,
) -> tuple[Tensor, bool]:
    """Check shapes and dtypes of scores `(N, C, d1, ...)` and targets; return int64 labels.

    Targets are class indices `(N, d1, ...)` of any integer dtype (returned as int64, so no
    index arithmetic wraps around), or one-hot / probability rows of `preds`' shape (their
    arg-max along dim 1). The flag says which. Shapes and dtypes only: nothing is read back.
    """
    if (  # the common case, decided from shapes and dtypes at the cost of a few attribute reads
        type(preds) is Tensor
        and type(target) is Tensor
        and preds.ndim == 2
        and target.dtype in INDEX_DTYPES
        and target.shape == preds.shape[:1]
        and preds.shape[1] > 1
        and preds.is_floating_point()
        and (num_classes is None or preds.shape[1] == num_classes)
    ):
        return (target if target.dtype == torch.int64 else target.long()), False
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"{owner}: preds and target must be tensors, got {type(preds).__name__} and "
            f"{type(target).__name__}"
        )
    if not preds.is_floating_point():
        raise ValueError(
            f"{owner}: preds must be floating-point scores (N, C, ...), got {preds.dtype} of "
            f"shape {tuple(preds.shape)}"
        )
    if preds.ndim == 1 or (preds.ndim >= 2 and preds.shape[1] == 1):
        raise binary_hint(preds, target, owner)
    if preds.ndim == 0:
        raise ValueError(f"{owner}: preds must be (N, C, ...) scores, got a 0-dim tensor")
    classes = preds.shape[1]
    if classes == 0:
        raise ValueError(f"{owner}: preds {tuple(preds.shape)} has no class column")
    if num_classes is not None and classes != num_classes:
        raise ValueError(
            f"{owner}: preds has {classes} columns, expected {num_classes} (one per class)"
        )
    if target.shape[:1] != preds.shape[:1]:
        raise ValueError(
            f"{owner}: preds has {preds.shape[0]} rows but target has "
            f"{target.shape[0] if target.ndim else 'none'} (shape {tuple(target.shape)})"
        )
    index_shape = preds.shape[:1] + preds.shape[2:]
    if target.shape == preds.shape:
        if ignore_index is not None:
            raise ValueError(
                f"{owner}(ignore_index={ignore_index}): ignore_index applies to class-index "
                f"targets {tuple(index_shape)}; these targets are one-hot rows "
                f"{tuple(target.shape)}"
            )
        rows = target.to(torch.uint8) if target.dtype == torch.bool else target
        return rows.argmax(dim=1), True
    if target.shape == index_shape:
        if target.is_floating_point() or target.is_complex():
            raise ValueError(
                f"{owner}: class-index targets must be integers, got {target.dtype} (cast "
                "them with .long() if they are whole numbers; one-hot rows must have preds' "
                f"shape {tuple(preds.shape)})"
            )
        return target.long(), False
    if target.ndim == preds.ndim and target.shape[1] == 1 and target.shape[2:] == preds.shape[2:]:
        raise ValueError(
            f"{owner}: target {tuple(target.shape)} has a column of class indices; they must "
            f"be {tuple(index_shape)} (one per sample): pass target.squeeze(1)"
        )
    raise ValueError(
        f"{owner}: target must be class indices {tuple(index_shape)} or one-hot rows "
        f"{tuple(preds.shape)} for preds {tuple(preds.shape)}, got shape {tuple(target.shape)}"
    )


def bad_one_hot_rows(target: Tensor) -> Tensor:
    """Positions whose target row (dim 1) is not one-hot or a probability row (sum 1, >= 0)."""
    total = target.sum(dim=1, dtype=torch.float64)
    bad = ((total - 1).abs() > 1e-2) | total.isnan()
    return bad if target.dtype == torch.bool else bad | (target.amin(dim=1) < 0)


def top_k_hits(scores: Tensor, labels: Tensor, k: int) -> Tensor:
    """Whether each label is among the `k` highest scores along dim 1, ties to the lower index.

    The rank of the target class is the number of classes scoring strictly higher plus the
    number of classes with an equal score and a lower index: a stable descending sort. So
    `k=1` is exactly `argmax` (the first maximum), and hits only grow with `k`. Labels outside
    `[0, C)` are clamped here; the caller masks them out.
    """
    if k == 1:
        return scores.argmax(dim=1) == labels
    classes = scores.shape[1]
    safe = labels.clamp(0, classes - 1).unsqueeze(1)
    target_score = scores.gather(1, safe)
    key = (classes, scores.ndim, scores.device)
    index = _CLASS_INDEX.get(key)
    if index is None:  # made once per class count, rank and device, not per batch
        shape = (1, classes, *[1] * (scores.ndim - 2))
        index = _CLASS_INDEX.setdefault(
            key, torch.arange(classes, device=scores.device).view(shape)
        )
    ahead = torch.where(index < safe, scores >= target_score, scores > target_score)
    return ahead.sum(dim=1) < k


def all_reduce(*tensors: Tensor) -> None:
    """Sum each tensor over the default process group, in place (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


class Counted:
    """Streaming state every classification metric shares, kept on the device.

    `seen` positions (samples, or pixels of a segmentation), of which `counted` were not
    `ignore_index`; `bad_targets` counted targets outside the valid values; `nan_rows` counted
    positions with a NaN score; `bad_rows` one-hot target rows that were not one-hot;
    `bad_scores` probabilities outside `[0, 1]` (binary metrics, `from_logits=False`). `_check`
    reads them back in one transfer and raises for bad input.
    """

    owner = "metric"
    fold_every = 64
    updates: int
    pending_positions: int
    seen: Tensor
    counted: Tensor
    bad_targets: Tensor
    nan_rows: Tensor
    bad_rows: Tensor
    bad_scores: Tensor

    def reset_counts(self) -> None:
        """Zero the shared counts and forget pending batches."""
        self.updates = 0
        self.pending_positions = 0
        self.seen = torch.zeros((), dtype=torch.long)
        self.counted = torch.zeros((), dtype=torch.long)
        self.bad_targets = torch.zeros((), dtype=torch.long)
        self.nan_rows = torch.zeros((), dtype=torch.long)
        self.bad_rows = torch.zeros((), dtype=torch.long)
        self.bad_scores = torch.zeros((), dtype=torch.long)

    def shared_states(self) -> list[Tensor]:
        """The shared count tensors, in a fixed order (for `sync`)."""
        return [
            self.seen,
            self.counted,
            self.bad_targets,
            self.nan_rows,
            self.bad_rows,
            self.bad_scores,
        ]

    def follow(self, device: torch.device) -> None:
        """Move every state tensor to `device` (the device of the inputs)."""
        if self.seen.device != device:
            for name, value in vars(self).items():
                if isinstance(value, Tensor):
                    setattr(self, name, value.to(device))

    def tally(
        self, target: Tensor, valid: Tensor, nan: Tensor, ignore_index: int | None
    ) -> tuple[Tensor, Tensor | None]:
        """Count a batch's positions: seen, counted (not `ignore_index`), counted targets that
        are not `valid`, counted NaN scores. Returns `valid` restricted to the counted
        positions, and the counted mask (`None` when every position counts)."""
        self.seen += target.numel()
        if ignore_index is None:
            self.counted += target.numel()
            self.bad_targets += target.numel() - valid.sum()
            self.nan_rows += nan.sum()
            return valid, None
        counted = target != ignore_index
        self.counted += counted.sum()
        self.bad_targets += (counted & ~valid).sum()
        self.nan_rows += (nan & counted).sum()
        return valid & counted, counted

    def check_counts(self, valid_values: str, ignore_index: int | None) -> tuple[int, int]:
        """Read the counts back (the one sync of `compute`); raise for bad input seen.

        Returns:
            `(seen, counted)`.
        """
        seen, counted, bad_targets, nan_rows, bad_rows, bad_scores = (
            int(v) for v in torch.stack(self.shared_states()).tolist()
        )
        if seen == 0 and self.updates == 0:
            raise RuntimeError(f"{self.owner}.compute() called before any update()")
        ignored = "" if ignore_index is None else f" (ignore_index={ignore_index})"
        if bad_targets:
            raise ValueError(
                f"{self.owner}: {bad_targets} of {counted} targets were outside "
                f"{valid_values}{ignored}"
            )
        if bad_rows:
            raise ValueError(
                f"{self.owner}: {bad_rows} of {counted} one-hot target rows were not one-hot or "
                "probability rows (values >= 0 summing to 1); for several 0/1 labels per "
                "sample use MultilabelAccuracy"
            )
        if bad_scores:
            raise ValueError(
                f"{self.owner}: {bad_scores} of {counted} scores were outside [0, 1], but "
                "from_logits=False says they are probabilities; pass from_logits=True for logits"
            )
        if nan_rows:
            raise ValueError(
                f"{self.owner}: {nan_rows} of {counted} samples had NaN scores (-inf is fine: "
                "it is a masked class); check the model's outputs"
            )
        return seen, counted

    def no_samples(self, seen: int, ignore_index: int | None) -> RuntimeError:
        """The error for `compute` when every update was empty or ignored."""
        why = (
            f"all {seen} targets were ignore_index={ignore_index}"
            if seen
            else "every batch was empty"
        )
        return RuntimeError(
            f"{self.owner}.compute(): no samples to score after {self.updates} update() calls: "
            f"{why}"
        )
