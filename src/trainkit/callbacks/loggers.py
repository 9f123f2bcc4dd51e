"""Loggers as callbacks: one CSV row or one set of TensorBoard scalars per epoch, on rank 0 only."""

from __future__ import annotations

import contextlib
import csv
import errno
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
    back exactly); a figure an epoch lacks is left empty. Epochs are numbered from 1, as in
    `History`.

    Nothing is written before the run's first epoch ends: at the start of `fit` an existing
    file is only read and checked, so a run that fails to start (`fit(resume="typo")`) leaves it
    as it was. When the first epoch ends, with number `k`, the file's rows `1 .. k-1` are kept
    and the others dropped: a fresh run (`k = 1`) replaces the file, and a run resumed with
    `fit(resume=...)` keeps the earlier rows and writes the epochs it trains again once each.
    A new figure appearing in a later epoch or run adds a column (the file is rewritten once,
    earlier rows left empty there).

    Rewrites go through a temporary file renamed over the log, and a row that cannot be
    appended whole (a full disk) is taken back: the file always holds whole rows only, and no
    temporary file is left behind. Under `torch.distributed`, only rank 0 writes.

    Args:
        path: The CSV file; missing parent folders are created when the first epoch ends.

    Raises:
        OSError: at the start of `fit`, `path` cannot be read or its folder cannot be created;
            at an epoch's end, the log cannot be written (the message names the path; the file
            keeps its earlier rows).
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
        self.path: Path = Path(path)
        self._active = False
        self._started = False  # this run has written its first row
        self._fields: list[str] = []
        self._rows: list[dict[str, str]] = []

    def on_fit_start(self, state: TrainState) -> None:
        """Check, on the main process only, that the CSV file can be written; write nothing yet."""
        self._active, self._started = is_main_process(), False
        if not self._active:
            return
        # Check only: which epoch this run records first is known when it ends (a resume is
        # read after on_fit_start), and a run that fails to start must leave the file alone.
        self._read()
        _check_can_create(self.path.parent, "CSVLogger(path=...) cannot write the log")

    def on_epoch_end(self, state: TrainState) -> None:
        """Append the epoch's History record as a row (the header row first, in a new file)."""
        if not self._active:
            return
        record = state.history[-1]
        row = {key: _cell(value) for key, value in record.items()}
        if not self._started:
            first = float(record.get("epoch", state.epoch + 1))
            fields, rows = self._read()
            kept = [r for r in rows if _epoch_of(r, self.path) < first]
            self._rewrite(fields + [k for k in row if k not in fields], [*kept, row])
            self._started = True
            return
        new = [key for key in row if key not in self._fields]
        if new:
            self._rewrite(self._fields + new, [*self._rows, row])
            return
        self._append(row)

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
        rows = []
        for row in reader:  # each row checked before anything is written
            if None in row:
                raise ValueError(
                    f"CSVLogger(path=...): {str(self.path)!r} line {reader.line_num} has more "
                    "fields than its header; it is left untouched. Choose another path or fix "
                    "the file."
                )
            _epoch_of(row, self.path)
            rows.append(row)
        return fields, rows

    def _rewrite(self, fields: list[str], rows: list[dict[str, str]]) -> None:
        # Same-directory temp file + os.replace: a crash mid-write leaves the old file whole.
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("w", newline="", encoding="utf-8") as f:
                writer = _writer(f, fields)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, self.path)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()  # a full disk must not leave a half-written temporary file
            raise _path_error(err, "CSVLogger(path=...) cannot write the log", self.path) from err
        self._fields, self._rows = fields, rows

    def _append(self, row: dict[str, str]) -> None:
        text = io.StringIO()
        _writer(text, self._fields).writerow(row)
        data = memoryview(text.getvalue().encode("utf-8"))
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:  # removed during the run: write it again, whole
            self._rewrite(self._fields, [*self._rows, row])
            return
        except OSError as err:
            raise _path_error(
                err, "CSVLogger(path=...) cannot append to the log", self.path
            ) from err
        try:
            size = os.fstat(fd).st_size
            try:
                while data:  # one row, in as many writes as the system takes
                    data = data[os.write(fd, data) :]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # take back a partial row: whole rows only
                raise
        except OSError as err:
            raise _path_error(
                err, "CSVLogger(path=...) cannot append to the log", self.path
            ) from err
        finally:
            os.close(fd)
        self._rows.append(row)

    def __repr__(self) -> str:
        return f"CSVLogger({str(self.path)!r})"


class TensorBoardLogger(Callback):
    """Write each epoch's figures as TensorBoard scalars, through `torch.utils.tensorboard`.

    Every number of the epoch's `History` record except `epoch` (`train_loss`, `val_loss`,
    `val_accuracy`, `lr`, `seconds`, ...) becomes a scalar of the same name at step `epoch`
    (from 1), flushed at the end of each epoch; view them with `tensorboard --logdir <log_dir>`.
    The writer opens when the run's first epoch ends (so a run that fails to start writes
    nothing) and closes at the end of `fit`, however the run ends. Events of a previous run in
    the same `log_dir` at the epochs this run records are purged (TensorBoard's `purge_step`,
    the number of the first epoch this run records): a run resumed with `fit(resume=...)` keeps
    the earlier epochs and shows each epoch once; a fresh run replaces them all. Under
    `torch.distributed`, only rank 0 writes.

    Needs the `tensorboard` package, an optional dependency: `pip install 'trainkit[tensorboard]'`.

    Args:
        log_dir: The folder for TensorBoard's event files; created when the first epoch ends.

    Raises:
        ImportError: tensorboard is not installed (the message says how to install it).
        OSError: at the start of `fit`, `log_dir` could not be created (the message names it).

    Example:
        >>> logger = TensorBoardLogger("runs/mnist")  # doctest: +SKIP
        >>> history = fit(10, model, loss_func, opt, train_dl, valid_dl,
        ...               callbacks=[logger])  # doctest: +SKIP
    """

    order = -5  # as CSVLogger's: log the epoch before a callback may stop the run

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        _require_tensorboard()
        self.log_dir: Path = Path(log_dir)
        self._active = False
        self._writer: SummaryWriter | None = None

    def on_fit_start(self, state: TrainState) -> None:
        """Check, on the main process only, that `log_dir` can be created."""
        self._active = is_main_process()
        if self._active:
            _check_can_create(self.log_dir, _CANNOT_CREATE)

    def on_epoch_end(self, state: TrainState) -> None:
        """Write the epoch's figures as scalars, at the epoch's number."""
        if not self._active:
            return
        record = state.history[-1]
        step = int(record.get("epoch", state.epoch + 1))
        if self._writer is None:  # the run's first epoch: its number is the purge step
            self._writer = self._open(purge_step=step)
        for key, value in record.items():
            if key != "epoch":
                self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def on_fit_end(self, state: TrainState) -> None:
        """Close the event file."""
        self._active = False
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open(self, purge_step: int) -> SummaryWriter:
        from torch.utils.tensorboard import SummaryWriter

        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _path_error(err, _CANNOT_CREATE, self.log_dir) from err
        return SummaryWriter(str(self.log_dir), purge_step=purge_step)

    def __repr__(self) -> str:
        return f"TensorBoardLogger({str(self.log_dir)!r})"


_CANNOT_CREATE = "TensorBoardLogger(log_dir=...) cannot create the folder"


def _check_can_create(folder: Path, what: str) -> None:
    """Raise the error that creating `folder` (and writing in it) would raise, creating nothing."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OSError(errno.ENOTDIR, f"{what} ({os.strerror(errno.ENOTDIR)})", str(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, f"{what} ({os.strerror(errno.EACCES)})", str(existing))


def _writer(f: IO[str], fields: list[str]) -> csv.DictWriter[str]:
    return csv.DictWriter(f, fieldnames=fields, restval="", lineterminator="\n")


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
