"""The seed documents' models (the examples' own classes) and their hand-written training loop."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim

from trainkit import loss_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from cifar10_classifier import Net as BlitzNet  # the blitz's CIFAR-10 Net
from nn_tutorial import Mnist_CNN as MnistCNN  # "What is torch.nn really?"
from quickstart import NeuralNetwork as QuickstartMLP  # the Quickstart's MLP

__all__ = ["BlitzNet", "MnistCNN", "QuickstartMLP", "tutorial_epoch"]

Batches = Iterable[tuple[Tensor, Tensor]]


def tutorial_epoch(
    model: nn.Module, opt: optim.Optimizer, train_dl: Batches, valid_dl: Batches
) -> float:
    """One epoch of "What is torch.nn really?"'s own `fit` with `loss_batch`; the val loss."""
    model.train()
    for xb, yb in train_dl:
        loss_batch(model, F.cross_entropy, xb, yb, opt)
    model.eval()
    with torch.no_grad():
        losses, nums = zip(
            *[loss_batch(model, F.cross_entropy, xb, yb) for xb, yb in valid_dl], strict=True
        )
    return float(np.sum(np.multiply(losses, nums)) / np.sum(nums))
