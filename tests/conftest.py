"""Shared fixtures: small learnable data sets built by the tests themselves."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset


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


@pytest.fixture
def images() -> tuple[TensorDataset, TensorDataset]:
    return make_images(1024, seed=0), make_images(256, seed=1)


@pytest.fixture
def tabular() -> tuple[TensorDataset, TensorDataset]:
    return make_tabular(256, seed=0), make_tabular(128, seed=1)
