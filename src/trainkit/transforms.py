"""Target transforms: `OneHot`, the picklable form of the tutorial's one-hot `Lambda`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["OneHot", "one_hot"]


def one_hot(
    labels: int | Sequence[int] | Tensor, num_classes: int, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Encode class indices as one-hot vectors: shape `labels.shape + (num_classes,)`.

    The result is the probability target `nn.CrossEntropyLoss` accepts in place of class
    indices. Unlike `torch.nn.functional.one_hot`, the result has the `dtype` asked for (float
    by default, as losses need) and a label out of range is reported with its value.

    Args:
        labels: Class indices: an `int`, a sequence of ints, or an integer tensor of any shape
            (on any device; the result is on the same device).
        num_classes: Number of classes, at least 1; every label must be in `[0, num_classes)`.
        dtype: The result's dtype.

    Returns:
        A tensor of `dtype` with a trailing dimension of size `num_classes`, holding 1 at each
        label's index and 0 elsewhere.

    Raises:
        ValueError: `num_classes` is not a positive integer, or a label is outside
            `[0, num_classes)` (checking reads the labels' minimum and maximum, which waits
            for the device when they live on a GPU).
        TypeError: `labels` are not integers (floats, bools), or `dtype` is not a `torch.dtype`.

    Example:
        >>> one_hot(torch.tensor([0, 2]), 3)
        tensor([[1., 0., 0.],
                [0., 0., 1.]])
    """
    _check_args("one_hot", num_classes, dtype)
    t = torch.as_tensor(labels)
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(
            f"one_hot(labels=...): labels must be integer class indices, got {t.dtype}; "
            "targets that are already probabilities need no one-hot encoding"
        )
    if t.numel() and bool((t.min() < 0) | (t.max() >= num_classes)):  # reads from the device
        bad = t[(t < 0) | (t >= num_classes)][0]
        raise ValueError(
            f"one_hot: label {int(bad)} is outside [0, {num_classes}) (num_classes={num_classes})"
        )
    out = torch.zeros(*t.shape, num_classes, dtype=dtype, device=t.device)
    # The tutorial's scatter_, for any shape: 1 at each label's index along the last dimension.
    return out.scatter_(-1, t.long().unsqueeze(-1), 1)


class OneHot:
    """Target transform: a class index becomes a one-hot vector of `num_classes`.

    Use it as `target_transform=OneHot(10)` where the tutorial writes
    `Lambda(lambda y: torch.zeros(10, dtype=torch.float).scatter_(0, torch.tensor(y), value=1))`:
    same result, but an `OneHot` can be pickled, so a `DataLoader` with `num_workers > 0` works
    under every start method (spawn, forkserver), and a label out of range is reported with its
    value instead of an index error from `scatter_`. Train on its targets with
    `nn.CrossEntropyLoss()`, which takes class probabilities as targets.

    Args:
        num_classes: Number of classes, at least 1.
        dtype: The dtype of the vectors (float32, as the tutorial's).

    Raises:
        ValueError: `num_classes` is not a positive integer; when called, a label outside
            `[0, num_classes)`.
        TypeError: `dtype` is not a `torch.dtype`; when called, a label that is not an integer.

    Example:
        >>> OneHot(4)(2)
        tensor([0., 0., 1., 0.])
    """

    def __init__(self, num_classes: int, dtype: torch.dtype = torch.float32) -> None:
        _check_args("OneHot", num_classes, dtype)
        self.num_classes = num_classes
        self.dtype = dtype

    def __call__(self, label: int | Tensor) -> Tensor:
        """Encode one label (an `int` or an integer tensor) as a one-hot vector.

        Args:
            label: The class index.

        Returns:
            A tensor of shape `label.shape + (num_classes,)`.

        Raises:
            ValueError: `label` is outside `[0, num_classes)`.
            TypeError: `label` is not an integer.

        Example:
            >>> OneHot(3, dtype=torch.long)(torch.tensor(0))
            tensor([1, 0, 0])
        """
        if type(label) is int:  # the per-sample case of a Dataset: no tensor ops to check it
            if not 0 <= label < self.num_classes:
                raise ValueError(
                    f"OneHot({self.num_classes}): label {label} is outside [0, {self.num_classes})"
                )
            out = torch.zeros(self.num_classes, dtype=self.dtype)
            out[label] = 1
            return out
        return one_hot(label, self.num_classes, dtype=self.dtype)

    def __repr__(self) -> str:
        return f"OneHot(num_classes={self.num_classes}, dtype={self.dtype})"


def _check_args(owner: str, num_classes: int, dtype: torch.dtype) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"{owner}(num_classes=...): must be a positive integer, got {num_classes!r}"
        )
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{owner}(dtype=...): expected a torch.dtype, got {dtype!r}")
