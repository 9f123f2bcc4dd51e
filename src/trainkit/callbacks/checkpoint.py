"""Save checkpoints during `fit`: the best k by a monitored figure, and the last one."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from trainkit.callbacks.base import Callback
from trainkit.checkpoint import save_run
from trainkit.distributed import is_main_process
from trainkit.state import TrainState

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(Callback):
    """Write checkpoints that `fit(resume=dirpath)` continues from exactly.

    After every epoch, `last.ckpt` is rewritten (with `save_last`), and the epoch is kept as
    `epoch=E-<monitor>=V.ckpt` (E the epoch's number, from 1) if it is among the best
    `save_top_k` by `monitor`; files that drop out of the best k are deleted only after the new
    one is safely on disk. With `every_n_steps`, `last.ckpt` is also rewritten every that many
    optimizer steps, so a killed run loses at most that many steps. On Ctrl-C, `last.ckpt` is
    written for the last completed step before the interrupt propagates (`fit` defers Ctrl-C to
    the end of the current step). Weights that are not finite are never written over a good
    checkpoint. Runs after the other callbacks (order 100), so their state is saved as they left
    it.

    Args:
        dirpath: Directory for the files (created if missing).
        monitor: A name recorded in `History` (`"val_loss"`, `"val_accuracy"`, ...).
        mode: `"min"` if lower is better, `"max"` if higher is better.
        save_top_k: How many best epochs to keep (0: none).
        save_last: Keep `last.ckpt` up to date.
        every_n_steps: Also save `last.ckpt` every that many optimizer steps.

    Raises:
        ValueError: a bad `mode`, `save_top_k` or `every_n_steps` (named in the message); at
            `on_fit_start`, before the first step, `monitor` is not a name the run records
            (the names it records listed, with the closest one).
        KeyError: at the end of an epoch, `monitor` is not recorded (the names that are, listed).
        OSError: the directory or a file cannot be written (named); older files are kept.

    Example:
        >>> history = fit(10, model, loss_func, opt, train_dl, valid_dl,
        ...               callbacks=[ModelCheckpoint("ckpt", every_n_steps=500)])  # doctest: +SKIP
        >>> history = fit(10, model, loss_func, opt, train_dl, valid_dl, resume="ckpt",
        ...               callbacks=[ModelCheckpoint("ckpt", every_n_steps=500)])  # doctest: +SKIP
    """

    order = 100

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        *,
        monitor: str = "val_loss",
        mode: Literal["min", "max"] = "min",
        save_top_k: int = 1,
        save_last: bool = True,
        every_n_steps: int | None = None,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"ModelCheckpoint(mode=...): expected 'min' or 'max', got {mode!r}")
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < 0:
            raise ValueError(
                f"ModelCheckpoint(save_top_k=...): expected an int >= 0, got {save_top_k!r}"
            )
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(
                "ModelCheckpoint(every_n_steps=...): expected None or an int >= 1, "
                f"got {every_n_steps!r}"
            )
        self.dirpath = Path(dirpath)
        self.monitor, self.mode = monitor, mode
        self.save_top_k, self.save_last, self.every_n_steps = save_top_k, save_last, every_n_steps
        self.best: list[tuple[float, str]] = []  # (score, file name), best first
        self._steps_seen = 0
        self._at_step_boundary = True

    @property
    def last_path(self) -> Path:
        """Where `last.ckpt` is written."""
        return self.dirpath / "last.ckpt"

    def on_fit_start(self, state: TrainState) -> None:
        if self.save_top_k:  # every rank refuses a name the run will not record, before writing
            state.check_monitor(self.monitor, "ModelCheckpoint(monitor=...)")
        if not is_main_process():  # under a process group only rank 0 writes
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        for stale in self.dirpath.glob(".*.ckpt.*.tmp"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
        self._steps_seen = state.global_step

    def on_train_batch_end(self, state: TrainState) -> None:
        stepped = state.global_step != self._steps_seen
        self._steps_seen, self._at_step_boundary = state.global_step, stepped
        if stepped and self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._write(self.last_path, state, epoch_complete=False)

    def on_epoch_end(self, state: TrainState) -> None:
        if self.save_top_k:
            if self.monitor not in state.metrics:
                raise KeyError(
                    f"ModelCheckpoint monitors {self.monitor!r}; this run records "
                    f"{sorted(state.metrics)}"
                )
            self._keep_if_best(state, state.metrics[self.monitor])
        if self.save_last:
            self._write(self.last_path, state, epoch_complete=True)

    def on_exception(self, state: TrainState, exc: BaseException) -> None:
        if not (
            isinstance(exc, KeyboardInterrupt) and self._at_step_boundary and state.batches_done
        ):
            return
        if self._write(self.last_path, state, epoch_complete=False):
            print(f"interrupted: saved {self.last_path}", file=sys.stderr, flush=True)

    def _keep_if_best(self, state: TrainState, value: float) -> None:
        score = value if self.mode == "min" else -value
        if math.isnan(score):
            return
        if len(self.best) >= self.save_top_k and score >= self.best[-1][0]:
            return
        name = f"epoch={state.epoch + 1}-{self.monitor}={value:.4f}.ckpt"
        if not self._write(self.dirpath / name, state, epoch_complete=True):
            return
        self.best = sorted([*(b for b in self.best if b[1] != name), (score, name)])
        for _, dropped in self.best[self.save_top_k :]:
            if is_main_process():  # only now that the new one is safe
                (self.dirpath / dropped).unlink(missing_ok=True)
        self.best = self.best[: self.save_top_k]

    def _write(self, path: Path, state: TrainState, *, epoch_complete: bool) -> bool:
        if not is_main_process():
            return True  # rank 0 writes the same file; the others keep the same bookkeeping
        params = [p.detach() for p in state.model.parameters()]
        if params and not bool(torch.stack([p.isfinite().all() for p in params]).all()):
            print(f"ModelCheckpoint: weights not finite; {path} not written", file=sys.stderr)
            return False
        save_run(path, state, epoch_complete=epoch_complete)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"best": [[score, name] for score, name in self.best]}

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        self.best = [(float(score), str(name)) for score, name in state_dict["best"]]

    def __repr__(self) -> str:
        return (
            f"ModelCheckpoint({str(self.dirpath)!r}, monitor={self.monitor!r}, mode={self.mode!r}, "
            f"save_top_k={self.save_top_k}, every_n_steps={self.every_n_steps})"
        )
