"""Type aliases of trainkit's signatures, shared by the loop, the run state and `lr_find`
(exported from `trainkit.loop` and `trainkit`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

LossFn = Callable[[Any, Any], Tensor]
"""A loss function `loss_func(output, target) -> 0-dim tensor`, such as `F.cross_entropy`."""

Scheduler = LRScheduler | ReduceLROnPlateau
"""A learning-rate scheduler `fit` can step: any `torch.optim.lr_scheduler` scheduler."""
