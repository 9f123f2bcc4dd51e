"""What a user's editor sees of the data parts: checked by mypy, never run by pytest."""

from __future__ import annotations

from typing import Any, assert_type

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from trainkit.data import DeviceDataLoader, Loader, TensorDataLoader, WrappedDataLoader
from trainkit.datasets import CustomImageDataset, DatasetError
from trainkit.transforms import OneHot, one_hot

x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)

in_memory = TensorDataLoader(x, y, batch_size=4, shuffle=True, device="cpu")
for xb, yb in in_memory:
    assert_type((xb, yb), tuple[Tensor, Tensor])
assert_type(in_memory.dataset, TensorDataset)

on_device = DeviceDataLoader(DataLoader(TensorDataset(x, y), batch_size=4), "cpu", prefetch=False)
assert_type(on_device.sampler, Any)
assert_type(WrappedDataLoader(on_device, lambda xb, yb: xb).dataset, Any)

ds = CustomImageDataset("labels.csv", "images", target_transform=OneHot(10), mode="rgb")
assert_type(ds[0], tuple[Tensor, Tensor])
# without transforms: a uint8 image tensor and an int class index; each transform sets its part
assert_type(CustomImageDataset("labels.csv", "images")[0], tuple[Tensor, int])
assert_type(
    CustomImageDataset("labels.csv", "images", lambda im: im.shape)[0], tuple[torch.Size, int]
)
assert_type(CustomImageDataset("labels.csv", "images", None, str)[0], tuple[Tensor, str])
assert_type(
    CustomImageDataset("labels.csv", "images", lambda im: im.float(), OneHot(10))[0],
    tuple[Tensor, Tensor],
)
assert_type(ds.classes, list[str] | None)
assert_type(ds.targets, list[int])
assert_type(OneHot(10)(3), Tensor)
assert_type(one_hot(y, 10, dtype=torch.float16), Tensor)
assert_type(DatasetError("bad").problems, tuple[str, ...])


# WrappedDataLoader's func takes a batch's items as arguments, however many there are
def four(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    return a + b + c + d


assert_type(
    WrappedDataLoader(DataLoader(TensorDataset(x, x, x, x)), four), WrappedDataLoader[Tensor]
)
assert_type(WrappedDataLoader([(x, y)], lambda xb, yb: xb), WrappedDataLoader[Any])

# what get_data returns: a DataLoader, and each of trainkit's loaders, is a Loader
all_loaders: list[Loader[Any]] = [
    DataLoader(TensorDataset(x, y)),
    in_memory,
    on_device,
    WrappedDataLoader(in_memory, lambda xb, yb: xb),
]
