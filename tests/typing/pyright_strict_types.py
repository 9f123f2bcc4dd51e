"""Lambdas and loaders as a user writes them, clean under pyright's strict mode (and mypy's).

tests/test_typing_completeness.py runs `pyright` in strict mode on this file: a lambda given to
`WrappedDataLoader` must not leave its arguments "unknown" (pyright strict's
reportUnknownLambdaType), however the loader was made.
"""

from __future__ import annotations

from typing import Any, assert_type

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from trainkit import History, HistoryFigure, Loader, TensorDataLoader, WrappedDataLoader, get_data

x_train, y_train = torch.randn(8, 784), torch.zeros(8, dtype=torch.long)
train_ds = TensorDataset(x_train, y_train)
valid_ds = TensorDataset(x_train, y_train)

# the tutorial's lines, with a lambda for its preprocess
train_dl, valid_dl = get_data(train_ds, valid_ds, 4)
train_dl = WrappedDataLoader(train_dl, lambda x, y: (x.view(-1, 1, 28, 28), y))
valid_dl = WrappedDataLoader(valid_dl, lambda x, y: (x.view(-1, 1, 28, 28), y))
for xb, _yb in train_dl:
    assert_type(xb, Any)  # a DataLoader's batches are untyped: Any, not unknown

# one argument (a batch that is not a tuple), three, a DataLoader and trainkit's own loaders
singles = WrappedDataLoader([x_train], lambda x: x.sum())
assert_type(singles, WrappedDataLoader[Any])
triples = WrappedDataLoader(DataLoader(train_ds), lambda x, y, z: x)
in_memory = WrappedDataLoader(TensorDataLoader(x_train, y_train, batch_size=4), lambda x, y: y)


def scale(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return x * 2, y


typed = WrappedDataLoader(DataLoader(train_ds), scale)
assert_type(typed, WrappedDataLoader[tuple[Tensor, Tensor]])
for xt, _yt in typed:
    assert_type(xt, Tensor)
loaders: list[Loader[Any]] = [train_dl, valid_dl, typed, in_memory]
assert_type(History([{"epoch": 1, "train_loss": 0.5}]).plot(), HistoryFigure)
