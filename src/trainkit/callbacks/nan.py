"""Stop a run at the first NaN or infinite training loss, without a read-back per step."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from trainkit.callbacks.base import Callback, StopTraining
from trainkit.distributed import all_reduce_flag, is_distributed
from trainkit.state import TrainState

__all__ = ["TerminateOnNaN"]


class TerminateOnNaN(Callback):
    """Stop training when a training loss is NaN or infinite; `fit` adds one by default.

    The losses of the steps are kept on the device and checked together every
    `check_seconds` and after the epoch's last training batch, so no step waits for the
    device. The run stops with `StopTraining` naming the epoch and step of the first non-finite
    loss, before that epoch is validated or recorded and before any `on_epoch_end` (where
    checkpoints are saved), so the last good checkpoint is not overwritten with broken weights.
    Steps taken between the bad loss and the check are not undone.

    Args:
        check_seconds: Minimum time between checks (each reads one flag from the device).

    Raises:
        ValueError: `check_seconds` is negative.

    Example:
        >>> fit(10, model, loss_func, opt, train_dl, terminate_on_nan=False,
        ...     callbacks=[TerminateOnNaN(check_seconds=0)])  # doctest: +SKIP
    """

    order = -20

    def __init__(self, check_seconds: float = 0.2) -> None:
        if not check_seconds >= 0:
            raise ValueError(
                f"TerminateOnNaN(check_seconds=...): must be >= 0, got {check_seconds!r}"
            )
        self.check_seconds = check_seconds
        self._losses: list[Tensor] = []
        self._first_step = 0
        self._next_check = 0.0
        self._distributed = False

    def on_epoch_start(self, state: TrainState) -> None:
        self._losses, self._first_step = [], 0
        self._next_check = time.perf_counter() + self.check_seconds

    def on_fit_start(self, state: TrainState) -> None:
        # under a process group, check only where every rank is (the epoch end), all together
        self._distributed = is_distributed()

    def on_train_batch_end(self, state: TrainState) -> None:
        if state.loss is None:
            return
        if not self._losses:
            self._first_step = state.step
        self._losses.append(state.loss)
        now = time.perf_counter()
        if now >= self._next_check and not self._distributed:
            self._next_check = now + self.check_seconds
            self._check(state)

    def on_train_epoch_end(self, state: TrainState) -> None:
        self._check(state)

    def _check(self, state: TrainState) -> None:
        if not self._losses:
            return
        bad = ~torch.isfinite(torch.stack(self._losses))
        first = self._first_step
        self._losses = []
        if all_reduce_flag(bool(bad.any())):  # the read-back: once per check, not per step
            if not bad.any():
                raise StopTraining(
                    f"TerminateOnNaN: the training loss was not finite on another process in "
                    f"epoch {state.epoch}"
                )
            step = first + int(bad.nonzero()[0, 0])
            raise StopTraining(
                f"TerminateOnNaN: the training loss was not finite at epoch {state.epoch} "
                f"step {step}"
            )

    def __repr__(self) -> str:
        return f"TerminateOnNaN(check_seconds={self.check_seconds})"
