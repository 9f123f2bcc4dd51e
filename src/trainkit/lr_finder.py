"""The learning-rate range test: train briefly with a rising learning rate, watch the loss."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from trainkit._batch import canonical, check_loss, model_device, move_to, pair
from trainkit._rng import rng_state, set_rng_state
from trainkit._sharded import is_sharded
from trainkit._types import LossFn

__all__ = ["LRFinderResult", "lr_find"]


@dataclass
class LRFinderResult:
    """What `lr_find` measured.

    Attributes:
        lrs: The learning rate of each step taken.
        losses: The loss of each step, smoothed (exponential moving average, bias-corrected).
        suggestion: The learning rate where the smoothed loss fell fastest (per log-step of
            learning rate): a good maximum for `OneCycleLR`, or a start for a constant rate.

    Example:
        >>> result = lr_find(model, loss_func, opt, train_dl)  # doctest: +SKIP
        >>> opt.param_groups[0]["lr"] = result.suggestion  # doctest: +SKIP
    """

    lrs: list[float]
    losses: list[float]
    suggestion: float


def lr_find(
    model: nn.Module,
    loss_func: LossFn,
    opt: Optimizer,
    train_dl: Iterable[Any],
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    diverge: float = 4.0,
    smoothing: float = 0.98,
    device: torch.device | str | None = None,
) -> LRFinderResult:
    """Run the learning-rate range test (as fastai's `lr_find`), then put everything back.

    Takes up to `num_steps` optimizer steps on batches of `train_dl` (cycling through it if
    it is shorter), the learning rate rising exponentially from `start_lr` to `end_lr`, and
    stops early once the smoothed loss exceeds `diverge` times its best. Afterwards the model,
    the optimizer (its learning rates and state) and the random generators are restored
    exactly as they were. Each step reads its loss from the device: this is a short
    diagnostic, not training.

    Args:
        model: The model (trained in place during the test, then restored).
        loss_func: `loss_func(model(xb), yb)` returns a 0-dim tensor.
        opt: The optimizer over the model's parameters.
        train_dl: Yields `(xb, yb)` pairs.
        start_lr: First learning rate, > 0.
        end_lr: Last learning rate, > `start_lr`.
        num_steps: Most steps to take, at least 2.
        diverge: Stop when the smoothed loss exceeds this multiple of the best one, > 1.
        smoothing: Weight of the past in the loss's moving average, in [0, 1).
        device: Where batches go; the model's device by default.

    Returns:
        An `LRFinderResult` with the learning rates, smoothed losses and a suggestion.

    Raises:
        ValueError: a bad argument (named), or `train_dl` yielded no batches.

    Example:
        >>> import torch.nn.functional as F
        >>> model = nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> batches = [(torch.randn(16, 4), torch.randint(0, 2, (16,)))] * 4
        >>> result = lr_find(model, F.cross_entropy, opt, batches, num_steps=20)
        >>> opt.param_groups[0]["lr"], 1e-7 <= result.suggestion <= 10
        (0.1, True)
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"lr_find: need 0 < start_lr < end_lr, got {start_lr!r} and {end_lr!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"lr_find(num_steps=...): expected an int >= 2, got {num_steps!r}")
    if not diverge > 1:
        raise ValueError(f"lr_find(diverge=...): expected a number > 1, got {diverge!r}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"lr_find(smoothing=...): expected a number in [0, 1), got {smoothing!r}")
    if is_sharded(model):  # each process would decide alone when to stop: a hang
        raise ValueError(
            "lr_find with a model sharded by fully_shard: not supported; find the learning "
            "rate on the model before sharding it, in one process"
        )
    dev = model_device(model) if device is None else canonical(torch.device(device))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_rng, was_training = rng_state(), model.training
    lrs: list[float] = []
    losses: list[float] = []
    try:
        model.train()
        avg, best = 0.0, math.inf
        batches = itertools.cycle(train_dl) if _reiterable(train_dl) else iter(train_dl)
        for i in range(num_steps):
            batch = next(batches, None)
            if batch is None:
                break
            lr = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))
            for group in opt.param_groups:
                group["lr"] = lr
            xb, yb = pair(batch, "train_dl")
            out = model(move_to(xb, dev))
            loss = check_loss(loss_func(out, move_to(yb, dev)), loss_func)
            torch.autograd.backward(loss)
            opt.step()
            opt.zero_grad()
            value = loss.item()  # one read per step: acceptable for a short diagnostic
            avg = smoothing * avg + (1 - smoothing) * value
            smoothed = avg / (1 - smoothing ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            if not math.isfinite(smoothed) or smoothed > diverge * best:
                break
            best = min(best, smoothed)
    finally:
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
        set_rng_state(saved_rng)
        model.train(was_training)
    if not lrs:
        raise ValueError("lr_find(train_dl=...): the loader yielded no batches")
    return LRFinderResult(lrs, losses, _steepest(lrs, losses))


def _reiterable(dl: Iterable[Any]) -> bool:
    return iter(dl) is not dl  # a loader or list, not a one-shot generator


def _steepest(lrs: list[float], losses: list[float]) -> float:
    finite = [(lr, loss) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss)]
    if len(finite) < 3:
        return finite[0][0] if finite else lrs[0]
    slopes = [
        (b[1] - a[1]) / (math.log(b[0]) - math.log(a[0])) for a, b in itertools.pairwise(finite)
    ]
    i = min(range(len(slopes)), key=slopes.__getitem__)
    return finite[i][0]
