from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

from trainkit import DeviceDataLoader, WrappedDataLoader, get_data, get_device, to_device


def ds(n: int = 10) -> TensorDataset:
    return TensorDataset(torch.arange(n * 2.0).view(n, 2), torch.arange(n))


def test_wrapped_loader_unpacks_each_batch_into_func() -> None:
    dl = DataLoader(ds(10), batch_size=4)
    wrapped = WrappedDataLoader(dl, lambda x, y: (x * 10, y + 1))
    assert len(wrapped) == 3
    batches = list(wrapped)
    assert len(batches) == 3
    assert torch.equal(batches[0][0], torch.arange(8.0).view(4, 2) * 10)
    assert torch.equal(batches[2][1], torch.tensor([9, 10]))
    assert len(list(wrapped)) == 3  # re-iterable, like the loader it wraps


def test_wrapped_loader_passes_non_sequence_batches_whole() -> None:
    batches = [{"x": torch.ones(2), "y": torch.zeros(2)}]
    wrapped = WrappedDataLoader(batches, lambda b: (b["x"], b["y"]))
    ((x, _),) = list(wrapped)
    assert torch.equal(x, torch.ones(2))


def test_wrapped_loader_errors() -> None:
    with pytest.raises(TypeError, match="func must be callable"):
        WrappedDataLoader([], None)  # type: ignore[arg-type]

    def gen() -> Iterator[tuple[Tensor, Tensor]]:
        yield torch.ones(1), torch.ones(1)

    with pytest.raises(TypeError, match=r"WrappedDataLoader.*generator.*no len"):
        len(WrappedDataLoader(gen(), lambda x, y: (x, y)))


class Pair(NamedTuple):
    x: Tensor
    y: Tensor


def test_to_device_moves_nested_tensors_and_keeps_structure() -> None:
    batch: dict[str, Any] = {
        "a": (torch.ones(2), [torch.zeros(1), "label"]),
        "b": Pair(torch.ones(1), torch.ones(1)),
    }
    moved = to_device(batch, "meta")
    assert moved["a"][0].device.type == "meta"
    assert moved["a"][1][0].device.type == "meta"
    assert moved["a"][1][1] == "label"
    assert isinstance(moved["b"], Pair) and moved["b"].y.device.type == "meta"
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list)


def test_to_device_is_a_no_op_for_tensors_already_there() -> None:
    x = torch.ones(3)
    (same,) = to_device((x,), torch.device("cpu"))
    assert same is x


def test_device_loader_moves_every_batch() -> None:
    dl = DeviceDataLoader(DataLoader(ds(6), batch_size=4), "meta")
    assert len(dl) == 2
    for xb, yb in dl:
        assert xb.device.type == "meta" and yb.device.type == "meta"


def test_device_loader_on_cpu_passes_batches_through() -> None:
    x = torch.ones(2, 2)
    (batch,) = list(DeviceDataLoader([(x, x)], "cpu"))
    assert batch[0] is x


def test_get_device_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert get_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert get_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert get_device() == torch.device("cuda", 0)


def test_get_data_builds_the_tutorial_loaders() -> None:
    train_dl, valid_dl = get_data(ds(10), ds(7), 3, drop_last=True)
    assert isinstance(train_dl.sampler, RandomSampler)
    assert isinstance(valid_dl.sampler, SequentialSampler)
    assert train_dl.batch_size == 3 and valid_dl.batch_size == 6
    assert len(train_dl) == 3 and len(valid_dl) == 1  # drop_last reached both loaders


@pytest.mark.parametrize("bs", [0, -2, 2.5, True])
def test_get_data_refuses_a_bad_batch_size(bs: object) -> None:
    with pytest.raises(ValueError, match=r"get_data\(bs=...\)"):
        get_data(ds(), ds(), bs)  # type: ignore[arg-type]
