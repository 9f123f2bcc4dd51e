"""Stop a run when a monitored figure stops improving."""

from __future__ import annotations

import math
from typing import Any, Literal

from trainkit.callbacks.base import Callback, StopTraining
from trainkit.state import TrainState

__all__ = ["EarlyStopping"]


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` epochs.

    Args:
        monitor: A name recorded in `History`, such as `"val_loss"` or `"val_accuracy"`.
        mode: `"min"` if lower is better, `"max"` if higher is better.
        patience: Epochs without improvement to accept before stopping, at least 1.
        min_delta: How much the figure must improve to count, at least 0.

    Raises:
        ValueError: a bad `mode`, `patience` or `min_delta` (named in the message).
        KeyError: at the end of an epoch, `monitor` is not among the recorded names.

    Example:
        >>> stopper = EarlyStopping("val_accuracy", mode="max", patience=2)
        >>> history = fit(50, model, loss_func, opt, train_dl, valid_dl, metrics=[accuracy],
        ...               callbacks=[stopper])  # doctest: +SKIP
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        *,
        mode: Literal["min", "max"] = "min",
        patience: int = 3,
        min_delta: float = 0.0,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping(mode=...): expected 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping(patience=...): expected an int >= 1, got {patience!r}")
        if not min_delta >= 0:
            raise ValueError(f"EarlyStopping(min_delta=...): expected >= 0, got {min_delta!r}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0

    def on_fit_start(self, state: TrainState) -> None:
        self.best, self.best_epoch, self.wait = None, None, 0

    def on_epoch_end(self, state: TrainState) -> None:
        if self.monitor not in state.metrics:
            raise KeyError(
                f"EarlyStopping monitors {self.monitor!r}; this run records {sorted(state.metrics)}"
            )
        value = state.metrics[self.monitor]
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, state.epoch, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            raise StopTraining(
                f"EarlyStopping: {self.monitor} has not improved for {self.wait} epochs "
                f"(best {self.best} at epoch {self.best_epoch})"
            )

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        self.best = state_dict["best"]
        self.best_epoch = state_dict["best_epoch"]
        self.wait = state_dict["wait"]

    def __repr__(self) -> str:
        return (
            f"EarlyStopping({self.monitor!r}, mode={self.mode!r}, patience={self.patience}, "
            f"min_delta={self.min_delta})"
        )
