"""Stop a run when a monitored figure stops improving (Keras' rules, Lightning's `check_finite`)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

from torch import Tensor

from trainkit._sharded import is_sharded
from trainkit.callbacks.base import Callback, StopTraining
from trainkit.state import TrainState

__all__ = ["EarlyStopping"]


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` epochs.

    The rules are Keras 3's, so code ported from Keras stops at the same epoch. At the end of
    each epoch from `start_from_epoch` on (earlier epochs are ignored entirely), with `epoch`
    the 0-based index `state.epoch`:

    1. the wait count grows by one;
    2. the value improves on the best so far if it is lower than `best - min_delta` (`"min"`;
       higher than `best + min_delta` for `"max"`; the first monitored value always does);
       then it becomes the best (its weights are kept with `restore_best_weights`), and the
       wait count restarts at 0 only if the value also beats `baseline` (when given);
    3. otherwise, the run stops if the wait count has reached `patience` and `epoch > 0`.

    So `patience=0` and `patience=1` both stop at the first epoch without improvement. With
    `check_finite` (Lightning's option, on by default), a NaN or infinite value stops the
    run at once, with a warning, before the rules above. Comparisons are made on Python
    floats (Keras compares in float32: the two agree on any values float32 holds exactly).

    The figure is monitored by name: `fit` refuses, before the first step, a name its epochs
    will not record (`"val_los"`, or `"val_loss"` without validation data), listing the names
    it records with the closest one. The check runs at `on_fit_start`.

    Args:
        monitor: A name recorded in `History`, such as `"val_loss"` or `"val_accuracy"`.
        mode: `"min"` if lower is better, `"max"` if higher is better.
        patience: Epochs without improvement to accept before stopping, at least 0.
        min_delta: How much the figure must improve to count, at least 0.
        restore_best_weights: At the end of the run (completed or stopped, not failed), load
            the weights of the best epoch back into the model. They are kept on the CPU, a copy
            of `model.state_dict()` (buffers too) bitwise equal to that epoch's; without an
            improvement yet, the first monitored epoch's. History still ends with the last
            epoch's figures; `best_epoch` says which epoch's weights the model holds.
        start_from_epoch: Epochs to ignore at the start (warm-up), as in Keras.
        baseline: A value to beat: the wait count restarts only when the best value also
            beats it, so the run stops after `patience` epochs that do not reach it.
        check_finite: Stop at once when the monitored value is NaN or infinite.

    Attributes:
        best: The best value so far, or `None` before the first monitored epoch.
        best_epoch: Index (`state.epoch`, from 0) of the best epoch, or `None`.
        wait: Epochs counted since the last improvement that reset it.
        stopped_epoch: Index of the epoch at which this callback stopped the run, or `None`.
        best_weights: The kept weights (with `restore_best_weights`), or `None`.

    Raises:
        ValueError: a bad `mode`, `patience`, `min_delta`, `start_from_epoch` or `baseline`
            (named in the message); at `on_fit_start`, `monitor` is not a name the run records.
        KeyError: at the end of an epoch, `monitor` is missing from `state.metrics` (only for
            a state built outside `fit`, which checks the name before the first step).

    Example:
        >>> stopper = EarlyStopping("val_accuracy", mode="max", patience=2,
        ...                         restore_best_weights=True, start_from_epoch=1,
        ...                         baseline=0.5, check_finite=True)
        >>> stopper  # doctest: +NORMALIZE_WHITESPACE
        EarlyStopping('val_accuracy', mode='max', patience=2, min_delta=0.0,
                      restore_best_weights=True, start_from_epoch=1, baseline=0.5)
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
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
        baseline: float | None = None,
        check_finite: bool = True,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping(mode=...): expected 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping(patience=...): expected an int >= 0, got {patience!r}")
        if not min_delta >= 0:
            raise ValueError(f"EarlyStopping(min_delta=...): expected >= 0, got {min_delta!r}")
        if (
            isinstance(start_from_epoch, bool)
            or not isinstance(start_from_epoch, int)
            or start_from_epoch < 0
        ):
            raise ValueError(
                f"EarlyStopping(start_from_epoch=...): expected an int >= 0, "
                f"got {start_from_epoch!r}"
            )
        if baseline is not None and not math.isfinite(baseline):
            raise ValueError(
                f"EarlyStopping(baseline=...): expected None or a finite number, got {baseline!r}"
            )
        self.monitor: str = monitor
        self.mode: Literal["min", "max"] = mode
        self.patience: int = patience
        self.min_delta: float = min_delta
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self.baseline = baseline
        self.check_finite = check_finite
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait: int = 0
        self.stopped_epoch: int | None = None
        self.best_weights: dict[str, Tensor] | None = None

    def on_fit_start(self, state: TrainState) -> None:
        """Refuse a `monitor` the run will not record, and start counting afresh."""
        state.check_monitor(self.monitor, "EarlyStopping(monitor=...)")
        if self.restore_best_weights and is_sharded(state.model):
            # its copy would hold each rank's shards, and a checkpoint only rank 0's
            raise ValueError(
                "EarlyStopping(restore_best_weights=True) with a model sharded by fully_shard: "
                "not supported; keep the best epoch with ModelCheckpoint(monitor=..., "
                "save_top_k=1) and load it after fit: "
                "load_checkpoint(dirpath / checkpoint.best[0][1], model=model)"
            )
        self._reset()

    def on_epoch_end(self, state: TrainState) -> None:
        """Compare the monitored figure with the best so far; stop the run after `patience` epochs
        without improvement."""
        if self.monitor not in state.metrics:
            raise KeyError(
                f"EarlyStopping monitors {self.monitor!r}; this run records {sorted(state.metrics)}"
            )
        epoch, value = state.epoch, state.metrics[self.monitor]
        if epoch < self.start_from_epoch:
            return
        if self.check_finite and not math.isfinite(value):
            self.stopped_epoch = epoch
            reason = (
                f"EarlyStopping: {self.monitor} is {value} at epoch {epoch + 1} "
                f"(check_finite=True); best {self.best} at epoch {_number(self.best_epoch)}"
            )
            warnings.warn(reason, RuntimeWarning, stacklevel=2)
            raise StopTraining(reason)
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights, self.best_epoch = _cpu_copy(state), epoch
        self.wait += 1
        if self._improves(value, self.best):
            self.best, self.best_epoch = value, epoch
            if self.restore_best_weights:
                self.best_weights = _cpu_copy(state)
            if self.baseline is None or self._improves(value, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            raise StopTraining(
                f"EarlyStopping: {self.monitor} has not improved for {self.wait} epochs "
                f"(best {self.best} at epoch {_number(self.best_epoch)})"
            )

    def on_fit_end(self, state: TrainState) -> None:
        """With `restore_best_weights`, load the best epoch's weights into the model (unless the run
        failed)."""
        # a failing run is left as it failed
        ok = state.status in ("completed", "stopped")
        if self.restore_best_weights and self.best_weights is not None and ok:
            state.model.load_state_dict(self.best_weights)

    def _improves(self, value: float, reference: float | None) -> bool:
        # Keras: monitor_op(value - min_delta, reference) with min_delta negated for "min"
        if reference is None:
            return True
        if self.mode == "min":
            return value + self.min_delta < reference
        return value - self.min_delta > reference

    def state_dict(self) -> dict[str, Any]:
        """The best figure and epoch, the epochs waited and the best weights, for checkpoints."""
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        """Restore what `state_dict` returned, so a resumed run stops where the whole run would."""
        self.best = state_dict["best"]
        self.best_epoch = state_dict["best_epoch"]
        self.wait = state_dict["wait"]
        self.stopped_epoch = state_dict.get("stopped_epoch")
        weights = state_dict.get("best_weights")
        self.best_weights = None if weights is None else {k: v.cpu() for k, v in weights.items()}

    def __repr__(self) -> str:
        options = [
            f"{self.monitor!r}, mode={self.mode!r}, patience={self.patience}",
            f"min_delta={self.min_delta}",
        ]
        extra = {
            "restore_best_weights": self.restore_best_weights,
            "start_from_epoch": self.start_from_epoch,
            "baseline": self.baseline,
            "check_finite": self.check_finite,
        }
        defaults = {
            "restore_best_weights": False,
            "start_from_epoch": 0,
            "baseline": None,
            "check_finite": True,
        }
        options += [f"{k}={v!r}" for k, v in extra.items() if v != defaults[k]]
        return f"EarlyStopping({', '.join(options)})"


def _number(epoch: int | None) -> str:
    """An epoch index as the number a user reads (from 1), or `-` for none yet."""
    return "-" if epoch is None else str(epoch + 1)


def _cpu_copy(state: TrainState) -> dict[str, Tensor]:
    """The model's weights and buffers as CPU copies (never views of the live tensors)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.model.state_dict().items()}
