"""Types named in signatures of several modules (no behaviour of their own)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, TypeVar

from torch.utils.data import Dataset

__all__ = ["Loader"]

T_co = TypeVar("T_co", covariant=True)


class Loader(Protocol[T_co]):
    """A re-iterable loader of batches with a length and a dataset: what `get_data` returns.

    A `DataLoader` is one, and so are trainkit's loaders that wrap one (`WrappedDataLoader`,
    `DeviceDataLoader`) and `TensorDataLoader`. `get_data` is typed with it rather than with
    `DataLoader`, so the tutorial's own lines type-check as they are:
    `train_dl, valid_dl = get_data(train_ds, valid_ds, bs)`, then
    `train_dl = WrappedDataLoader(train_dl, preprocess)` (the variable keeps one type).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from trainkit import WrappedDataLoader, get_data
        >>> ds = TensorDataset(torch.zeros(8, 784), torch.zeros(8, dtype=torch.long))
        >>> train_dl, valid_dl = get_data(ds, ds, bs=4)
        >>> train_dl = WrappedDataLoader(train_dl, lambda x, y: (x.view(-1, 1, 28, 28), y))
        >>> loaders: list[Loader[object]] = [train_dl, valid_dl]
        >>> [len(dl) for dl in loaders], len(train_dl.dataset)
        ([2, 1], 8)
    """

    def __iter__(self) -> Iterator[T_co]:
        """Iterate over the batches (each epoch anew)."""
        ...

    def __len__(self) -> int:
        """The number of batches."""
        ...

    @property
    def dataset(self) -> Dataset[Any]:
        """The dataset the batches come from."""
        ...
