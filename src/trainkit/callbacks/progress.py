"""Progress: a tqdm bar per epoch on a terminal or notebook, one plain line per epoch elsewhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Sized
from typing import IO, Any

from tqdm.auto import tqdm

from trainkit.callbacks.base import Callback
from trainkit.distributed import is_main_process
from trainkit.state import TrainState

__all__ = ["ProgressBar"]


class ProgressBar(Callback):
    """Show training progress; `fit` adds one unless `progress=False`.

    On a terminal or in a notebook, a tqdm bar per epoch shows the batches done and the loss of
    the latest batch, refreshed every `refresh_seconds`: reading the loss waits for the device,
    so it is read only then, never per step. After each epoch, one line with the epoch's
    figures goes to `file`. When the output is not a terminal (a log file, CI), only that line.

    Args:
        force_bar: Draw the bar even when the output is not a terminal.
        refresh_seconds: Minimum time between bar refreshes (and loss reads).
        file: Where epoch lines go (standard output by default); the bar goes to standard error.

    Raises:
        ValueError: `refresh_seconds` is negative.

    Example:
        >>> fit(3, model, loss_func, opt, train_dl, valid_dl, progress=False,
        ...     callbacks=[ProgressBar(force_bar=True)])  # doctest: +SKIP
    """

    order = -10

    def __init__(
        self, *, force_bar: bool = False, refresh_seconds: float = 0.2, file: IO[str] | None = None
    ) -> None:
        if refresh_seconds < 0:
            raise ValueError(
                f"ProgressBar(refresh_seconds=...): must be >= 0, got {refresh_seconds}"
            )
        self.force_bar = force_bar
        self.refresh_seconds = refresh_seconds
        self.file = file
        self._bar: tqdm[Any] | None = None
        self._silent = False
        self._pending = 0
        self._next_refresh = 0.0

    def on_fit_start(self, state: TrainState) -> None:
        self._silent = not is_main_process()  # under a process group only rank 0 prints
        self._use_bar = not self._silent and (
            self.force_bar or sys.stderr.isatty() or "ipykernel" in sys.modules
        )

    def on_epoch_start(self, state: TrainState) -> None:
        if self._use_bar:
            total = len(state.train_dl) if isinstance(state.train_dl, Sized) else None
            desc = f"epoch {state.epoch + 1}/{state.epochs}"
            self._bar = tqdm(total=total, desc=desc, leave=False, mininterval=0, dynamic_ncols=True)
            self._pending = 0
            self._next_refresh = time.perf_counter() + self.refresh_seconds

    def on_train_batch_end(self, state: TrainState) -> None:
        if self._bar is None:
            return
        self._pending += 1
        now = time.perf_counter()
        if now >= self._next_refresh:
            self._next_refresh = now + self.refresh_seconds
            self._refresh(state)

    def _refresh(self, state: TrainState) -> None:
        assert self._bar is not None
        if state.loss is not None:
            # reading the loss waits for the device: once per refresh, not per step
            self._bar.set_postfix(loss=f"{state.loss.item():.4f}", refresh=False)
        self._bar.update(self._pending)
        self._pending = 0

    def on_epoch_end(self, state: TrainState) -> None:
        self._close()
        if not self._silent:
            print(_epoch_line(state), file=self.file or sys.stdout, flush=True)

    def on_fit_end(self, state: TrainState) -> None:
        self._close()
        if state.status == "stopped" and not self._silent:
            print(f"stopped: {state.stop_reason}", file=self.file or sys.stdout, flush=True)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __repr__(self) -> str:
        return f"ProgressBar(force_bar={self.force_bar})"


def _epoch_line(state: TrainState) -> str:
    parts = [f"epoch {state.epoch + 1}/{state.epochs}"]
    for key, value in state.metrics.items():
        if key == "lr":
            parts.append(f"lr {value:.3g}")
        elif key not in ("epoch", "seconds"):
            parts.append(f"{key} {value:.4f}")
    parts.append(f"{state.metrics.get('seconds', 0.0):.1f}s")
    return "  ".join(parts)
