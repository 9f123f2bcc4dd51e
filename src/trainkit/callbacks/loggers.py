"""Loggers as callbacks: one CSV row or one set of TensorBoard scalars per epoch, on rank 0 only."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING

from trainkit.callbacks.base import Callback
from trainkit.distributed import is_main_process
from trainkit.state import TrainState

if TYPE_CHECKING:  # tensorboard is optional (`trainkit[tensorboard]`)
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["CSVLogger", "TensorBoardLogger"]


class CSVLogger(Callback):
    """Write each epoch's `History` record as one row of a CSV file, as the epoch ends.

    The file mirrors the run: a header (`epoch,train_loss,val_loss,...,lr,seconds`), then one
    row per epoch, written and flushed at the end of each epoch so that a crash loses nothing
    already recorded. Values are written in full precision (`float("0.1234...")` reads them
    back exactly); a figure an epoch lacks is left empty.

    At the start of `fit`, rows of an existing file for the epochs this run will record are
    dropped and the earlier rows kept: a fresh run (starting at epoch 1) replaces the file, and
    a resumed run starting at epoch `k` keeps rows `1 .. k-1` and appends from `k` on, without
    duplicating rows. Epochs are numbered from 1, as in `History`. The first epoch this run
    records is `state.epoch + 1` at fit start or, if larger, one past the last epoch already in
    `state.history`. A new figure appearing in a
    later epoch or run adds a column (the file is rewritten once, earlier rows left empty
    there). Under `torch.distributed`, only rank 0 writes.

    Args:
        path: The CSV file; missing parent folders are created when the run starts.

    Raises:
        OSError: at the start of `fit` or at an epoch's end, `path` cannot be read or written
            (the message names it).
        ValueError: at the start of `fit`, an existing non-empty `path` is not a CSV log with an
            `epoch` column (it is left untouched rather than overwritten).

    Example:
        >>> logger = CSVLogger("runs/mnist/history.csv")
        >>> history = fit(10, model, loss_func, opt, train_dl, valid_dl,
        ...               callbacks=[logger])  # doctest: +SKIP
    """

    # Before the default 0: a callback stopping the run in `on_epoch_end` (EarlyStopping) must
    # not keep the epoch that stopped it out of the log. After the progress bar (-10).
    order = -5

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._active = False
        self._fields: list[str] = []
        self._rows: list[dict[str, str]] = []

    def on_fit_start(self, state: TrainState) -> None:
        self._active = is_main_process()
        if not self._active:
            return
        start = _first_epoch(state)
        fields, rows = self._read()
        self._fields = fields
        self._rows = [row for row in rows if _epoch_of(row, self.path) < start]
        self._rewrite()

    def on_epoch_end(self, state: TrainState) -> None:
        if not self._active:
            return
        row = {key: _cell(value) for key, value in state.history[-1].items()}
        new = [key for key in row if key not in self._fields]
        self._rows.append(row)
        if new or not self._fields:
            self._fields += new
            self._rewrite()
            return
        try:
            with self.path.open("a", newline="", encoding="utf-8") as f:
                self._writer(f).writerow(row)
        except OSError as err:
            raise _path_error(
                err, "CSVLogger(path=...) cannot append to the log", self.path
            ) from err

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        try:
            text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        except OSError as err:
            raise _path_error(
                err, "CSVLogger(path=...) cannot read the existing log", self.path
            ) from err
        if not text.strip():
            return [], []
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = list(reader.fieldnames or [])
        if "epoch" not in fields:
            raise ValueError(
                f"CSVLogger(path=...): {str(self.path)!r} exists and is not a trainkit CSV log "
                f"(its header {fields[:5]} has no 'epoch' column); it is left untouched. "
                "Choose another path or remove the file."
            )
        return fields, list(reader)

    def _rewrite(self) -> None:
        # Same-directory temp file + os.replace: a crash mid-write leaves the old file whole.
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("w", newline="", encoding="utf-8") as f:
                if self._fields:
                    writer = self._writer(f)
                    writer.writeheader()
                    writer.writerows(self._rows)
            os.replace(tmp, self.path)
        except OSError as err:
            raise _path_error(err, "CSVLogger(path=...) cannot write the log", self.path) from err

    def _writer(self, f: IO[str]) -> csv.DictWriter[str]:
        return csv.DictWriter(f, fieldnames=self._fields, restval="", lineterminator="\n")

    def __repr__(self) -> str:
        return f"CSVLogger({str(self.path)!r})"


class TensorBoardLogger(Callback):
    """Write each epoch's figures as TensorBoard scalars, through `torch.utils.tensorboard`.

    Every number of the epoch's `History` record except `epoch` (`train_loss`, `val_loss`,
    `val_accuracy`, `lr`, `seconds`, ...) becomes a scalar of the same name at step `epoch`,
    flushed at the end of each epoch; view them with `tensorboard --logdir <log_dir>`. The
    writer opens at the start of `fit` and closes at its end, however the run ends. Events of a
    previous run in the same `log_dir` at the epochs this run records are purged (TensorBoard's
    `purge_step`), so a resumed run shows one curve, not two; the first epoch is found as
    `CSVLogger` finds it. Under `torch.distributed`, only rank 0 writes.

    Needs the `tensorboard` package, an optional dependency: `pip install 'trainkit[tensorboard]'`.

    Args:
        log_dir: The folder for TensorBoard's event files; created when the run starts.

    Raises:
        ImportError: tensorboard is not installed (the message says how to install it).
        OSError: at the start of `fit`, `log_dir` cannot be created (the message names it).

    Example:
        >>> logger = TensorBoardLogger("runs/mnist")  # doctest: +SKIP
        >>> history = fit(10, model, loss_func, opt, train_dl, valid_dl,
        ...               callbacks=[logger])  # doctest: +SKIP
    """

    order = -5  # as CSVLogger's: log the epoch before a callback may stop the run

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        _require_tensorboard()
        self.log_dir = Path(log_dir)
        self._writer: SummaryWriter | None = None

    def on_fit_start(self, state: TrainState) -> None:
        if not is_main_process():
            return
        from torch.utils.tensorboard import SummaryWriter

        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _path_error(
                err, "TensorBoardLogger(log_dir=...) cannot create the folder", self.log_dir
            ) from err
        self._writer = SummaryWriter(str(self.log_dir), purge_step=_first_epoch(state))

    def on_epoch_end(self, state: TrainState) -> None:
        if self._writer is None:
            return
        record = state.history[-1]
        step = int(record.get("epoch", state.epoch + 1))
        for key, value in record.items():
            if key != "epoch":
                self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def on_fit_end(self, state: TrainState) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __repr__(self) -> str:
        return f"TensorBoardLogger({str(self.log_dir)!r})"


def _first_epoch(state: TrainState) -> int:
    """The number (from 1) of the first epoch a starting run will record: `state.epoch + 1`,
    or one past the last epoch in the history."""
    after_history = 1
    if state.history.records:
        last = state.history[-1]
        after_history = int(last["epoch"]) + 1 if "epoch" in last else len(state.history) + 1
    return max(state.epoch + 1, after_history)


def _epoch_of(row: dict[str, str], path: Path) -> float:
    value = row.get("epoch") or ""
    try:
        return float(value)
    except ValueError:
        raise ValueError(
            f"CSVLogger(path=...): {str(path)!r} has a row whose epoch is {value!r}, not a "
            "number; it is left untouched. Choose another path or fix the file."
        ) from None


def _cell(value: float) -> str:
    # repr is the shortest text that reads back as the same float; ints (epoch) stay ints
    return str(value) if isinstance(value, int) else repr(float(value))


def _path_error(err: OSError, what: str, path: Path) -> OSError:
    return OSError(err.errno, f"{what} ({err.strerror})", str(err.filename or path))


def _require_tensorboard() -> None:
    try:
        import torch.utils.tensorboard  # noqa: F401 - only checks that tensorboard is installed
    except ImportError as err:
        raise ModuleNotFoundError(
            "TensorBoardLogger needs the tensorboard package, an optional dependency of "
            "trainkit: pip install 'trainkit[tensorboard]' (or pip install tensorboard)",
            name="tensorboard",
        ) from err
