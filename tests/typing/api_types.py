"""What a user's editor sees: checked by mypy (`make test`), never run by pytest."""

from __future__ import annotations

from typing import assert_type

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from trainkit import (
    DeviceDataLoader,
    History,
    WrappedDataLoader,
    accuracy,
    evaluate,
    fit,
    get_data,
    load_weights,
    loss_batch,
    predict,
    to_device,
)

ds = TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
train_dl, valid_dl = get_data(ds, ds, 4)
model = nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)


def preprocess(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return x.view(-1, 4), y


assert_type(fit(1, model, F.cross_entropy, opt, train_dl, valid_dl), History)
assert_type(fit(1, model, F.cross_entropy, opt, train_dl, metrics=[], progress=False), History)
assert_type(evaluate(model, F.cross_entropy, valid_dl, [accuracy]), dict[str, float])
assert_type(predict(model, valid_dl), Tensor)
assert_type(
    loss_batch(model, F.cross_entropy, torch.zeros(1, 4), torch.zeros(1)), tuple[float, int]
)
assert_type(History()["val_loss"], list[float])
assert_type(History()[0], dict[str, float])
assert_type(accuracy(torch.zeros(2, 2), torch.zeros(2)), Tensor)

wrapped = WrappedDataLoader(train_dl, preprocess)
assert_type(wrapped, WrappedDataLoader[tuple[Tensor, Tensor]])
for xb, yb in wrapped:
    assert_type((xb, yb), tuple[Tensor, Tensor])

on_device = DeviceDataLoader(DataLoader(ds, batch_size=4), "cpu")
assert_type(to_device((torch.zeros(1), torch.zeros(1)), "cpu"), tuple[Tensor, Tensor])

# load_weights gives back the caller's own model type
assert_type(load_weights("w.pth", nn.Linear(4, 2)), nn.Linear)
