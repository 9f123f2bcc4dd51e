"""What a run carries: `TrainState` (seen by callbacks) and `History` (returned by `fit`)."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

if TYPE_CHECKING:
    # matplotlib is optional (`trainkit[plot]`); only History.plot imports it at run time
    from matplotlib.figure import Figure

    from trainkit._types import LossFn, Scheduler

    # these modules import this one: their names are for type checkers only
    from trainkit.callbacks.base import Callback
    from trainkit.metrics.base import Mean

__all__ = ["EvalState", "History", "HistoryFigure", "Status", "TrainState"]

Status = Literal["running", "completed", "stopped", "failed"]
"""How a run stands: `"running"` during `fit`; in `on_fit_end`, `"completed"` (every epoch ran),
`"stopped"` (a hook raised `StopTraining`) or `"failed"` (an exception propagates)."""


class HistoryFigure(Protocol):
    """What `History.plot` returns: a matplotlib `Figure`, typed without matplotlib.

    matplotlib is an optional dependency (`trainkit[plot]`), so `History.plot` cannot name its
    `Figure` class in a type an editor can always resolve: without matplotlib it would be
    unknown. This protocol names the parts of the figure used most, so they type-check
    everywhere (`History.plot(path)` writes the PNG itself). For the rest of the `Figure` API
    (`savefig` options, `add_subplot`, ...), narrow it:
    `assert isinstance(fig, matplotlib.figure.Figure)`.

    Example:
        >>> fig = History([{"epoch": 1, "train_loss": 0.9}]).plot()
        >>> fig.savefig("history.svg")  # doctest: +SKIP
        >>> fig.get_suptitle(), [ax.get_title() for ax in fig.axes]
        ('Training history (1 epochs)', ['loss'])
        >>> from matplotlib.figure import Figure
        >>> isinstance(fig, Figure)
        True
    """

    @property
    def axes(self) -> list[Any]:
        """The figure's panels (matplotlib `Axes`), in order."""
        ...

    def get_suptitle(self) -> str:
        """The figure's title."""
        ...

    def savefig(self, fname: str | os.PathLike[str], /) -> None:
        """Write the figure to `fname`, in the format its suffix names (`.png`, `.svg`, ...)."""
        ...


class History:
    """Per-epoch records of a run: one dict per epoch, in order.

    Every record has `epoch` (the epoch's number, counted from 1 as everywhere a user reads
    it), `train_loss`, `lr` (the first parameter group's learning rate at the end of the
    epoch) and `seconds`; with a validation loader also
    `val_loss` and one `val_<name>` per metric (`val_accuracy`, `val_top5_accuracy`, ...).
    Metric results with more than one element (`val_per_class_accuracy`,
    `val_confusion_matrix`) are kept as CPU tensors: `history.tensors("val_per_class_accuracy")`.

    The History that `fit` returns also says how the run ended, so a stop is visible without a
    progress bar: `status` is `"completed"` or `"stopped"` (`"running"` while `fit` runs, and
    for a History built by hand), and `stop_reason` the message of the stop (`None` unless
    stopped), e.g. `"TerminateOnNaN: the training loss was not finite at epoch 2 batch 3 ..."`.

    Attributes:
        records: The epochs' records, in order.
        status: How the run that wrote this History ended (see above).
        stop_reason: Why it was stopped, or `None`.

    Example:
        >>> h = History()
        >>> h.append({"epoch": 1, "train_loss": 0.9, "val_loss": 0.8})
        >>> h.append({"epoch": 2, "train_loss": 0.5, "val_loss": 0.6})
        >>> h["val_loss"]
        [0.8, 0.6]
        >>> h[-1]["epoch"]
        2
        >>> h.status, h.stop_reason  # fit sets them on the History it returns
        ('running', None)
    """

    def __init__(self, records: Iterable[dict[str, float]] = ()) -> None:
        self.records: list[dict[str, float]] = [dict(r) for r in records]
        self._tensors: list[dict[str, Tensor]] = [{} for _ in self.records]
        self.status: Status = "running"
        self.stop_reason: str | None = None

    def append(self, record: dict[str, float], tensors: dict[str, Tensor] | None = None) -> None:
        """Add one epoch's record, and its tensor-valued metric results if any.

        Args:
            record: The epoch's figures by name (`fit` writes `epoch`, `train_loss`, ...).
            tensors: The epoch's metric results with more than one element, by name.

        Example:
            >>> h = History()
            >>> h.append({"epoch": 1, "train_loss": 0.9}, {"val_per_class": torch.ones(3)})
            >>> len(h)
            1
        """
        self.records.append(record)
        self._tensors.append(dict(tensors or {}))

    def state_dict(self) -> dict[str, Any]:
        """The records and tensors, for checkpoints."""
        return {
            "records": [dict(r) for r in self.records],
            "tensors": [dict(t) for t in self._tensors],
        }

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        """Replace the records and tensors with those of `state_dict`."""
        self.records = [dict(r) for r in state_dict["records"]]
        self._tensors = [dict(t) for t in state_dict["tensors"]]

    def tensors(self, name: str) -> list[Tensor]:
        """The tensor-valued results recorded under `name`, one per epoch.

        Args:
            name: A name given to `append`'s `tensors`, such as `"val_per_class_accuracy"`.

        Returns:
            One tensor per epoch that recorded `name`, in order.

        Raises:
            KeyError: no epoch recorded `name`; the message lists the tensor names that exist.

        Example:
            >>> h = History()
            >>> h.append({"epoch": 1}, {"val_per_class": torch.tensor([0.5, 1.0])})
            >>> h.tensors("val_per_class")
            [tensor([0.5000, 1.0000])]
        """
        found = [t[name] for t in self._tensors if name in t]
        if not found:
            names = list(dict.fromkeys(k for t in self._tensors for k in t))
            raise KeyError(f"History has no tensor {name!r}; recorded tensors: {names}")
        return found

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, float]]:
        return iter(self.records)

    @overload
    def __getitem__(self, key: str) -> list[float]: ...
    @overload
    def __getitem__(self, key: int) -> dict[str, float]: ...
    def __getitem__(self, key: str | int) -> list[float] | dict[str, float]:
        """`history["val_loss"]` is that column as a list; `history[-1]` is the last record.

        Raises:
            KeyError: no epoch recorded `key`; the message lists the names that exist and the
                closest one (`did you mean 'val_loss'?`).
        """
        if isinstance(key, int):
            return self.records[key]
        if not any(key in r for r in self.records):
            raise KeyError(
                f"History has no {key!r}.{_did_you_mean(key, self.keys())} "
                f"Recorded names: {self.keys()}"
            )
        return [r[key] for r in self.records if key in r]

    def keys(self) -> list[str]:
        """Recorded names, in first-seen order.

        Returns:
            Every name any record holds, each once.

        Example:
            >>> History([{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "val_loss": 0.5}]).keys()
            ['epoch', 'train_loss', 'val_loss']
        """
        return list(dict.fromkeys(k for r in self.records for k in r))

    def plot(
        self, path: str | os.PathLike[str] | None = None, *, title: str | None = None
    ) -> HistoryFigure:
        """Draw the loss and metric curves per epoch; save them as a PNG when `path` is given.

        One panel per figure: `loss` first, then each metric in the order recorded. Training
        and validation values of the same figure share a panel (`train_loss` and `val_loss` on
        the `loss` panel), each a line with a point per epoch, in the same colours in every
        panel. The x axis counts epochs from 1, as the progress lines do. `lr` and `seconds`
        are not drawn; tensor-valued results (`History.tensors`) neither.

        Needs matplotlib, an optional dependency: `pip install 'trainkit[plot]'`. The figure is
        made without `pyplot`, so it works without a display and leaves no window open; in a
        notebook the returned figure shows as the cell's result.

        Args:
            path: Where to write the PNG (a name ending in `.png`); missing parent folders are
                created. `None` saves nothing.
            title: The figure's title; by default `"Training history (N epochs)"`.

        Returns:
            The matplotlib `Figure` (typed as `HistoryFigure`), 5.5 x 4 inches per panel at
            100 dpi (550 x 400 pixels), up to three panels per row.

        Raises:
            ImportError: matplotlib is not installed (the message says how to install it).
            ValueError: the history has no epochs, or no figure to draw (only `epoch`, `lr`,
                `seconds`); `path` does not end in `.png`.
            OSError: `path` cannot be written (the message names it).

        Example:
            >>> h = History([{"epoch": 1, "train_loss": 0.9, "val_loss": 0.8, "val_accuracy": 0.6},
            ...              {"epoch": 2, "train_loss": 0.5, "val_loss": 0.6, "val_accuracy": 0.7}])
            >>> fig = h.plot()  # h.plot("runs/history.png") also writes the PNG
            >>> [ax.get_title() for ax in fig.axes]
            ['loss', 'accuracy']
        """
        if path is not None and Path(path).suffix.lower() != ".png":
            raise ValueError(
                f"History.plot(path=...): the plot is written as PNG; give a name ending in "
                f"'.png', got {os.fspath(path)!r}"
            )
        panels = self._panels()
        _require_matplotlib()
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        ncols = min(len(panels), _PANELS_PER_ROW)
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(
            figsize=(_PANEL_INCHES[0] * ncols, _PANEL_INCHES[1] * nrows),
            dpi=_DPI,
            layout="constrained",
        )
        axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
        for ax, (name, series) in zip(axes, panels.items(), strict=False):
            for label, (xs, ys) in series.items():
                color = _COLORS.get(label)
                ax.plot(xs, ys, marker="o", markersize=4, label=label, color=color)
            ax.set_title(name)
            ax.set_xlabel("epoch")
            ax.set_ylabel(name)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            ax.legend()
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        n = len(self)
        fig.suptitle(title if title is not None else f"Training history ({n} epochs)")
        if path is not None:
            _save_png(fig, path)
        return fig

    def _panels(self) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
        """`{panel: {line label: (epochs, values)}}`, loss first, then in first-seen order."""
        if not self.records:
            raise ValueError("History.plot: the history has no epochs; there is nothing to plot")
        panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
        for i, record in enumerate(self.records):
            x = float(record.get("epoch", i + 1))
            for key, value in record.items():
                if key in _NOT_PLOTTED:
                    continue
                name, label = _panel_and_label(key)
                xs, ys = panels.setdefault(name, {}).setdefault(label, ([], []))
                xs.append(x)
                ys.append(float(value))
        if not panels:
            raise ValueError(
                f"History.plot: no loss or metric to plot; the history records {self.keys()}"
            )
        if "loss" in panels:
            panels = {"loss": panels.pop("loss"), **panels}
        return panels

    def __repr__(self) -> str:
        return f"History({len(self)} epochs: {', '.join(self.keys())})"

    def __str__(self) -> str:
        """The records as an aligned text table, one row per epoch."""
        keys = self.keys()
        if not keys:
            return "History (no epochs)"
        rows = [[_fmt(r.get(k)) for k in keys] for r in self.records]
        widths = [max(len(k), *(len(row[i]) for row in rows)) for i, k in enumerate(keys)]
        lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        return "\n".join(lines)


_NOT_PLOTTED = frozenset({"epoch", "lr", "seconds"})
_ROLES = (("train_", "train"), ("val_", "validation"))
_COLORS = {"train": "tab:blue", "validation": "tab:orange"}
_PANELS_PER_ROW = 3
_PANEL_INCHES = (5.5, 4.0)
_DPI = 100


def _panel_and_label(key: str) -> tuple[str, str]:
    """`"val_accuracy"` -> `("accuracy", "validation")`; an unprefixed name is its own panel."""
    for prefix, role in _ROLES:
        if key.startswith(prefix):
            return key.removeprefix(prefix), role
    return key, key


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401 - only checks that it is installed
    except ImportError as err:
        raise ModuleNotFoundError(
            "History.plot needs matplotlib, an optional dependency of trainkit: "
            "pip install 'trainkit[plot]' (or pip install matplotlib)",
            name="matplotlib",
        ) from err


def _save_png(fig: Figure, path: str | os.PathLike[str]) -> None:
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, format="png", dpi=_DPI)
    except OSError as err:
        raise OSError(
            err.errno, f"History.plot(path=...) cannot write the plot ({err.strerror})", str(target)
        ) from err


def _did_you_mean(name: str, names: Sequence[str]) -> str:
    """`" Did you mean 'val_loss'?"` for the closest of `names` to `name`, or `""`."""
    if not name.startswith("val_") and f"val_{name}" in names:
        return f" Did you mean {'val_' + name!r}? (validation figures are prefixed val_)"
    close = difflib.get_close_matches(name, names, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"


@dataclass(eq=False)
class TrainState:
    """Everything about a running `fit`, passed to every callback hook.

    Hooks read it, and may change `xb`/`yb` in `on_train_batch_start` (the step uses what they
    leave there) or the gradients in `on_after_backward` / `on_before_optimizer_step`. To stop
    the run, a hook raises `StopTraining(reason)` or calls `state.stop(reason)`: either way the
    other callbacks' hooks of the same event still run, then the run stops (as Keras'
    `model.stop_training` and Lightning's `trainer.should_stop`).

    Each field below says what it holds (your editor shows it when you hover `state.xb`).

    Example:
        >>> class LogEveryHundred(Callback):  # doctest: +SKIP
        ...     def on_train_batch_end(self, state: TrainState) -> None:
        ...         if state.global_step % 100 == 0:
        ...             print(state.epoch, state.step, float(state.loss))  # reads the device
    """

    model: nn.Module
    """The model of `fit`."""
    loss_func: LossFn
    """The loss function of `fit`: `loss_func(output, yb)` gives the batch's loss."""
    opt: Optimizer
    """The optimizer of `fit`."""
    train_dl: Iterable[Any]
    """The training loader of `fit`."""
    valid_dl: Iterable[Any] | None
    """The validation loader of `fit`, or `None`."""
    epochs: int
    """Number of epochs asked for."""
    device: torch.device
    """Where the model is and where batches are moved."""
    epoch: int = 0
    """Index of the current epoch, counted from 0 (for code: `range(epochs)`); the epoch's
    number, shown in the bar, History, logs and file names, is `epoch + 1`."""
    step: int = 0
    """Index of the current batch within the epoch."""
    global_step: int = 0
    """Optimizer steps taken since the start of the run."""
    xb: Any = None
    """The current batch's input, on `device` (what the loader yields, so of any type)."""
    yb: Any = None
    """The current batch's target, on `device`."""
    output: Any = None
    """The model's output for the current batch."""
    loss: Tensor | None = None
    """The current batch's loss, detached. Reading its value (`float(state.loss)`) waits for the
    device, so do it rarely."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The last recorded epoch's figures (`train_loss`, `val_loss`, `val_accuracy`, ...)."""
    history: History = field(default_factory=History)
    """The records so far."""
    status: Status = "running"
    """`"running"`, then `"completed"`, `"stopped"` or `"failed"` in `on_fit_end`."""
    stop_reason: str | None = None
    """Why the run stops or stopped (the `StopTraining` messages or `stop` reasons, joined by
    "; "), if any."""
    exception: BaseException | None = None
    """The exception that failed the run, if any."""
    scheduler: Scheduler | None = None
    """The learning-rate scheduler of `fit(scheduler=...)`, if any."""
    scaler: torch.amp.GradScaler | None = None
    """The `GradScaler` of `fit(amp="fp16")`, if any."""
    callbacks: list[Callback] = field(default_factory=list)
    """Every callback of the run (the built-in ones too), in firing order."""
    batches_done: int = 0
    """Training batches completed in the current epoch."""
    epoch_rng: dict[str, Any] | None = None
    """Random-number-generator states just before the epoch's data order was drawn (what an
    exact mid-epoch resume replays)."""
    train_loss: Mean | None = None
    """The current epoch's running training loss (a `Mean`; `None` before the first epoch)."""
    interrupted: bool = False
    """Ctrl-C was pressed; the run stops at the end of the current step."""
    should_stop: bool = False
    """A stop was requested; the run stops once the current event's hooks ran."""
    recorded_names: tuple[str, ...] | None = None
    """The names every epoch's History record will hold, known before the first step: `epoch`,
    `train_loss`, then with validation data `val_loss` and `val_<metric>` per metric, then
    `lr`, `seconds`. `PerClassAccuracy` and `ConfusionMatrix`, whose results go to
    `History.tensors`, are left out (a metric of yours with a multi-element result cannot be
    told apart before it is computed: it is listed, and monitoring it fails at the epoch's
    end). A callback that adds a figure of its own extends it in `on_fit_start`. `None` for a
    state built outside `fit`."""

    def stop(self, reason: str) -> None:
        """Ask the run to stop once every callback's hook of the current event has run.

        The same as raising `StopTraining(reason)` from a hook. Requested in `on_epoch_end`,
        the epoch is recorded and every callback's `on_epoch_end` sees it (checkpoints save
        it); requested in a training batch's hook, that batch finishes (its step and every
        hook up to `on_train_batch_end`) and the unfinished epoch is not recorded.

        Args:
            reason: Why; kept in `stop_reason` and `History.stop_reason`.

        Example:
            >>> from trainkit import Callback
            >>> class StopAfterThree(Callback):
            ...     def on_epoch_end(self, state: TrainState) -> None:
            ...         if state.epoch == 2:  # the third epoch (state.epoch counts from 0)
            ...             state.stop("three epochs are enough")
        """
        self.should_stop = True
        if self.stop_reason is None:
            self.stop_reason = reason
        elif reason not in self.stop_reason.split("; "):
            self.stop_reason = f"{self.stop_reason}; {reason}"

    def check_monitor(self, name: str, owner: str) -> None:
        """Refuse a monitored name the run's epochs will not record, before the first step.

        Args:
            name: The monitored name (`"val_loss"`, `"val_accuracy"`, ...).
            owner: Who monitors it, as the user wrote it: `"EarlyStopping(monitor=...)"`.

        Raises:
            ValueError: `name` is not in `recorded_names`; the message lists them and the
                closest one (`did you mean 'val_loss'?`). Does nothing when `recorded_names`
                is `None` (a state built outside `fit`).

        Example:
            >>> model = nn.Linear(2, 2)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> state = TrainState(model, torch.nn.functional.mse_loss, opt, [], None, 1,
            ...                    torch.device("cpu"), recorded_names=("epoch", "val_loss"))
            >>> state.check_monitor("val_los", "MyCallback")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: MyCallback: this run does not record 'val_los'. Did you mean 'val_loss'? ...
        """
        names = self.recorded_names
        if names is None or name in names:
            return
        hint = _did_you_mean(name, names)
        if name.startswith("val_") and "val_loss" not in names:
            hint += " val_ names are recorded only with validation data: fit(valid_dl=...)."
        raise ValueError(
            f"{owner}: this run does not record {name!r}.{hint} Each epoch records "
            f"{list(names)} (tensor-valued metric results go to History.tensors, not monitored)."
        )


@dataclass(eq=False)
class EvalState:
    """What callbacks of `evaluate(..., callbacks=...)` and `predict(..., callbacks=...)` see.

    Their hooks (`on_evaluate_start`, `on_evaluate_batch_start`, `on_evaluate_batch_end`,
    `on_evaluate_end`, and the same with `predict`) each take this object.

    Attributes:
        model: The model, in eval mode; hooks run under `torch.no_grad()`.
        dl: The loader being evaluated or predicted.
        device: Where batches are moved.
        loss_func: The loss of `evaluate`; `None` in `predict`.
        step: Index of the current batch.
        xb, yb: The current batch on `device` (`yb` is `None` in `predict`).
        output: The model's output for the current batch (set before `..._batch_end`).
        metrics: In `on_evaluate_end`, the results `evaluate` returns (`loss`, metrics).

    Example:
        >>> from trainkit import Callback
        >>> class CountBatches(Callback):
        ...     def __init__(self) -> None:
        ...         self.n = 0
        ...     def on_predict_batch_end(self, state: EvalState) -> None:
        ...         self.n += 1
    """

    model: nn.Module
    dl: Iterable[Any]
    device: torch.device
    loss_func: Callable[[Any, Any], Tensor] | None = None
    step: int = 0
    xb: Any = None
    yb: Any = None
    output: Any = None
    metrics: dict[str, float] = field(default_factory=dict)
