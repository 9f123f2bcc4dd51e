"""Shared fixtures: small learnable data sets built by the tests themselves."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from trainkit import Callback, TrainState

HOST_READS = ("item", "tolist", "__bool__", "cpu", "numpy", "__float__", "__int__")
"""The Tensor methods that read a value back from the device (a sync on a GPU)."""


def make_images(n: int, *, seed: int = 0, noise: float = 0.5) -> TensorDataset:
    """`n` flattened 28x28 images of 10 classes: a fixed random template per class plus noise.

    Learnable in a few epochs, so tests can check that training improves the figures.
    """
    g = torch.Generator().manual_seed(1234)
    templates = torch.randn(10, 784, generator=g)
    g.manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = templates[y] + noise * torch.randn(n, 784, generator=g)
    return TensorDataset(x, y)


def make_tabular(n: int, *, seed: int = 0) -> TensorDataset:
    """`n` rows of 20 features, 3 linearly separable classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    w = torch.randn(20, 3, generator=torch.Generator().manual_seed(99))
    return TensorDataset(x, (x @ w).argmax(dim=1))


def small_net() -> nn.Sequential:
    """A 4-feature, 3-class MLP for the checkpoint tests (fits `make_three_class`)."""
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def make_three_class(n: int, *, seed: int = 0) -> TensorDataset:
    """`n` rows of 4 features; the class counts how many of the first two are positive."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


class Crash(Callback):
    """Kills the run (as a crash would) after `at` optimizer steps."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, state: TrainState) -> None:
        if state.global_step == self.at:
            raise RuntimeError("simulated crash")


class Scripted(Callback):
    """Feeds a scripted val_loss to the callbacks after it (stands in for real figures)."""

    order = 50

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def on_fit_start(self, state: TrainState) -> None:
        # a figure a callback adds is declared before the monitoring callbacks check names
        state.recorded_names = (*(state.recorded_names or ()), "val_loss")

    def on_epoch_end(self, state: TrainState) -> None:
        state.metrics["val_loss"] = self.values[state.epoch]


@pytest.fixture
def images() -> tuple[TensorDataset, TensorDataset]:
    return make_images(1024, seed=0), make_images(256, seed=1)


@pytest.fixture
def tabular() -> tuple[TensorDataset, TensorDataset]:
    return make_tabular(256, seed=0), make_tabular(128, seed=1)


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts of every `HOST_READS` call on any tensor while the test runs (reset by the test
    with `counts.update(dict.fromkeys(counts, 0))`)."""
    counts = dict.fromkeys(HOST_READS, 0)

    def counting(name: str) -> Any:
        original = getattr(Tensor, name)

        def wrapper(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(Tensor, name, counting(name))
    yield counts
