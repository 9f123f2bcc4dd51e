"""Progress: a tqdm bar per epoch on a terminal or notebook, plain lines elsewhere."""

from __future__ import annotations

import importlib
import math
import sys
import time
from collections.abc import Sized
from typing import IO, Any

from tqdm.std import tqdm

from trainkit.callbacks.base import Callback
from trainkit.distributed import is_main_process
from trainkit.state import TrainState

__all__ = ["ProgressBar"]


class ProgressBar(Callback):
    """Show training progress; `fit` adds one unless `progress=False`.

    On a terminal or in a notebook, a tqdm bar per epoch counts the training batches and shows
    the loss of the latest batch, refreshed every `refresh_seconds`: reading the loss waits for
    the device, so it is read only then, never per step. During validation the bar, full, counts
    the validation batches (`valid 40/157`). Every bar ends at its total; in a notebook the
    epoch's bar stays, green, and a bar cut short by an error or a stop ends red. Without
    `ipywidgets` a notebook gets the text bar, with no warning.

    When the output is not a terminal (a log file, CI), there is no bar: a line every
    `log_seconds` during an epoch says how far it is (`epoch 3/10  train 412/938  loss 0.4312
    84.0s`, then `validation 40/157` during validation), so a long epoch is never silent.

    After each epoch, one line with the epoch's figures goes to `file`.

    Args:
        force_bar: Draw the bar even when the output is not a terminal.
        refresh_seconds: Minimum time between bar refreshes (and loss reads).
        log_seconds: Without a bar, the time between progress lines during an epoch (each
            reads the loss once); `None` for the epoch lines only.
        file: Where the lines go (standard output by default); the bar goes to standard error.

    Raises:
        ValueError: `refresh_seconds` is negative, or `log_seconds` is not positive.

    Example:
        >>> fit(3, model, loss_func, opt, train_dl, valid_dl, progress=False,
        ...     callbacks=[ProgressBar(log_seconds=60)])  # doctest: +SKIP
    """

    order = -10

    def __init__(
        self,
        *,
        force_bar: bool = False,
        refresh_seconds: float = 0.2,
        log_seconds: float | None = 30.0,
        file: IO[str] | None = None,
    ) -> None:
        if refresh_seconds < 0:
            raise ValueError(
                f"ProgressBar(refresh_seconds=...): must be >= 0, got {refresh_seconds}"
            )
        if log_seconds is not None and not log_seconds > 0:
            raise ValueError(
                f"ProgressBar(log_seconds=...): must be > 0 (or None), got {log_seconds}"
            )
        self.force_bar = force_bar
        self.refresh_seconds = refresh_seconds
        self.log_seconds = log_seconds
        self.file = file
        self._bar: tqdm[Any] | None = None
        self._bar_class: type[tqdm[Any]] = tqdm
        self._silent = False
        self._use_bar = False
        self._leave = False
        self._loss = ""
        self._next_refresh = 0.0
        self._next_line = math.inf
        self._epoch_started = 0.0

    def on_fit_start(self, state: TrainState) -> None:
        """Choose a bar (terminal or notebook) or plain lines; only the main process prints."""
        self._silent = not is_main_process()  # under a process group only rank 0 prints
        notebook = _in_notebook()
        self._use_bar = not self._silent and (self.force_bar or sys.stderr.isatty() or notebook)
        widgets = self._use_bar and notebook and _has_ipywidgets()
        self._bar_class = _notebook_tqdm() if widgets else tqdm
        self._leave = widgets  # a notebook keeps each epoch's (green) bar; a terminal does not

    def on_epoch_start(self, state: TrainState) -> None:
        """Open the epoch's bar."""
        now = time.perf_counter()
        self._epoch_started = now
        self._loss = ""
        if self._use_bar:
            total = len(state.train_dl) if isinstance(state.train_dl, Sized) else None
            self._bar = self._bar_class(
                total=total,
                desc=f"epoch {state.epoch + 1}/{state.epochs}",
                leave=self._leave,
                mininterval=0,
                dynamic_ncols=True,
            )
            self._next_refresh = now + self.refresh_seconds
        elif not self._silent and self.log_seconds is not None:
            self._next_line = now + self.log_seconds

    def on_train_batch_end(self, state: TrainState) -> None:
        """Advance the bar, showing the loss at most every `refresh_seconds` (reading it syncs)."""
        if self._bar is not None:
            now = time.perf_counter()
            if now >= self._next_refresh:
                self._next_refresh = now + self.refresh_seconds
                if state.loss is not None:
                    # reading the loss waits for the device: once per refresh, not per step
                    self._loss = f"{state.loss.item():.4f}"
                    self._bar.set_postfix(loss=self._loss, refresh=False)
                self._count(state.batches_done)
        elif time.perf_counter() >= self._next_line:
            total = _length(state.train_dl)
            loss = f"  loss {state.loss.item():.4f}" if state.loss is not None else ""
            self._line(state, f"train {state.batches_done}/{total}{loss}")

    def on_validation_batch_end(self, state: TrainState) -> None:
        """Show the validation progress."""
        done, total = state.step + 1, _length(state.valid_dl)
        if self._bar is not None:
            if state.step == 0:
                self._count(state.batches_done)  # training is over: the bar is full
            now = time.perf_counter()
            if state.step == 0 or now >= self._next_refresh:
                self._next_refresh = now + self.refresh_seconds
                self._show_validation(f"{done}/{total}")
        elif time.perf_counter() >= self._next_line:
            self._line(state, f"validation {done}/{total}")

    def on_epoch_end(self, state: TrainState) -> None:
        """Finish the epoch's bar and print the epoch's figures."""
        if self._bar is not None:
            self._count(state.batches_done)
            if state.valid_dl is not None:
                total = _length(state.valid_dl)
                self._show_validation(f"{total}/{total}" if total != "?" else "done")
        self._close()
        self._next_line = math.inf
        if not self._silent:
            print(_epoch_line(state), file=self.file or sys.stdout, flush=True)

    def on_fit_end(self, state: TrainState) -> None:
        """Close the bar; say why when the run was stopped."""
        if self._bar is not None:  # cut short by a stop or an error: tqdm marks it unfinished
            self._count(state.batches_done)  # (red in a notebook) where it stopped
        self._close()
        self._next_line = math.inf
        if state.status == "stopped" and not self._silent:
            print(f"stopped: {state.stop_reason}", file=self.file or sys.stdout, flush=True)

    def _count(self, batches_done: int) -> None:
        """Move the bar to `batches_done` (on a resumed epoch it starts past 0)."""
        assert self._bar is not None
        if batches_done > self._bar.n:
            self._bar.update(batches_done - self._bar.n)

    def _show_validation(self, progress: str) -> None:
        assert self._bar is not None
        postfix = {"loss": self._loss} if self._loss else {}
        self._bar.set_postfix({**postfix, "valid": progress}, refresh=True)

    def _line(self, state: TrainState, progress: str) -> None:
        """A progress line during an epoch, for output without a bar; the next one is due
        `log_seconds` later."""
        assert self.log_seconds is not None
        now = time.perf_counter()
        self._next_line = now + self.log_seconds
        seconds = now - self._epoch_started
        line = f"epoch {state.epoch + 1}/{state.epochs}  {progress}  {seconds:.1f}s"
        print(line, file=self.file or sys.stdout, flush=True)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __repr__(self) -> str:
        return f"ProgressBar(force_bar={self.force_bar})"


def _length(loader: object) -> int | str:
    return len(loader) if isinstance(loader, Sized) else "?"


def _in_notebook() -> bool:
    """Running in a Jupyter kernel (notebook, JupyterLab, VS Code)."""
    return "ipykernel.zmqshell" in sys.modules


def _has_ipywidgets() -> bool:
    """tqdm's notebook bar needs ipywidgets; without it tqdm would warn, so we check first."""
    try:
        importlib.import_module("ipywidgets")
    except ImportError:
        return False
    return True


def _notebook_tqdm() -> type[tqdm[Any]]:
    from tqdm.notebook import tqdm as notebook_tqdm  # imports IPython: only in a notebook

    return notebook_tqdm


def _epoch_line(state: TrainState) -> str:
    parts = [f"epoch {state.epoch + 1}/{state.epochs}"]
    for key, value in state.metrics.items():
        if key == "lr":
            parts.append(f"lr {value:.3g}")
        elif key not in ("epoch", "seconds"):
            parts.append(f"{key} {value:.4f}")
    parts.append(f"{state.metrics.get('seconds', 0.0):.1f}s")
    return "  ".join(parts)
