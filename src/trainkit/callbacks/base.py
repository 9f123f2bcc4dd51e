"""The callback protocol: named hooks, their firing order, and the one way to stop a run."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import IO, Any, ClassVar

from trainkit.state import TrainState

__all__ = ["HOOKS", "Callback", "StopTraining", "show_training_loop"]

HOOKS: tuple[str, ...] = (
    "on_fit_start",
    "on_epoch_start",
    "on_train_batch_start",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_validation_start",
    "on_validation_batch_end",
    "on_validation_end",
    "on_epoch_end",
    "on_exception",
    "on_fit_end",
)
"""Every hook, in the order `fit` fires them (`on_exception` only when the run fails)."""


class StopTraining(Exception):  # noqa: N818 - named for what it does, like StopIteration
    """Raise from any hook to end the run cleanly.

    `fit` catches it, sets `state.status = "stopped"` and `state.stop_reason = str(exc)`, calls
    `on_fit_end` and returns the `History` so far. Raised in `on_epoch_end`, the epoch is already
    recorded; raised mid-epoch, the unfinished epoch is not.

    Example:
        >>> class StopAtLoss(Callback):
        ...     def on_epoch_end(self, state: TrainState) -> None:
        ...         if state.metrics["train_loss"] < 0.1:
        ...             raise StopTraining("train_loss below 0.1")
    """


class Callback:
    """Base class of callbacks: override the hooks you need, each takes the `TrainState`.

    Hooks, in firing order (see `HOOKS`; `show_training_loop` prints them for a set of callbacks):

    | hook | fires | on stop (`StopTraining`) | on failure |
    |---|---|---|---|
    | `on_fit_start` | once, before the first epoch | - | - |
    | `on_epoch_start` | each epoch, before `model.train()` | - | - |
    | `on_train_batch_start` | each batch, on the device, before forward | - | - |
    | `on_before_optimizer_step` | after backward, gradients final | - | - |
    | `on_train_batch_end` | after `opt.step()`; `state.loss` is set | - | - |
    | `on_train_epoch_end` | after the last training batch, before validation | - | - |
    | `on_validation_start` | after `model.eval()`, under `no_grad` | - | - |
    | `on_validation_batch_end` | each validation batch | - | - |
    | `on_validation_end` | validation figures computed | - | - |
    | `on_epoch_end` | the epoch's History row is written | - | - |
    | `on_exception` | - | not called | once, then the error propagates |
    | `on_fit_end` | always, last | called, status `"stopped"` | called, status `"failed"` |

    Only hooks a callback overrides are called, so an empty hook costs nothing per step.
    Callbacks run sorted by their `order` (lower first; ties keep the order given to `fit`).
    The progress bar has order -10 so it reports each epoch before others may stop the run.

    A callback with state to resume implements `state_dict` / `load_state_dict`.

    Example:
        >>> class PrintLoss(Callback):
        ...     def on_epoch_end(self, state: TrainState) -> None:
        ...         print(state.epoch, state.metrics["train_loss"])
    """

    order: ClassVar[int] = 0

    def on_fit_start(self, state: TrainState) -> None:
        """Before the first epoch."""

    def on_epoch_start(self, state: TrainState) -> None:
        """At the start of each epoch."""

    def on_train_batch_start(self, state: TrainState) -> None:
        """Before the forward pass; may replace `state.xb` / `state.yb`."""

    def on_before_optimizer_step(self, state: TrainState) -> None:
        """After backward, before `opt.step()`: gradients are final (clip or inspect here)."""

    def on_train_batch_end(self, state: TrainState) -> None:
        """After the optimizer step; `state.loss` holds the batch loss (reading it syncs)."""

    def on_train_epoch_end(self, state: TrainState) -> None:
        """After the epoch's last training batch, before validation and the History record."""

    def on_validation_start(self, state: TrainState) -> None:
        """After `model.eval()`, before the first validation batch."""

    def on_validation_batch_end(self, state: TrainState) -> None:
        """After each validation batch; `state.output` and `state.yb` are that batch's."""

    def on_validation_end(self, state: TrainState) -> None:
        """After the validation pass; `state.metrics` holds the new `val_*` figures."""

    def on_epoch_end(self, state: TrainState) -> None:
        """After the epoch's record is appended to `state.history`."""

    def on_exception(self, state: TrainState, exc: BaseException) -> None:
        """When the run fails; `exc` propagates unchanged afterwards."""

    def on_fit_end(self, state: TrainState) -> None:
        """Always, last; `state.status` says how the run ended."""

    def state_dict(self) -> dict[str, Any]:
        """What this callback needs to resume (empty by default)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        """Restore what `state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def overrides(callback: Callback, hook: str) -> bool:
    """Whether `callback`'s class overrides `hook` of `Callback`."""
    return getattr(type(callback), hook) is not getattr(Callback, hook)


def sort_callbacks(callbacks: Iterable[Callback]) -> list[Callback]:
    """Callbacks sorted by `order`, ties in the given order; refuses non-callbacks.

    Raises:
        TypeError: an item is not a `Callback`.
    """
    items = list(callbacks)
    for i, cb in enumerate(items):
        if not isinstance(cb, Callback):
            raise TypeError(
                f"callbacks[{i}] is a {type(cb).__name__}, not a trainkit Callback "
                "(subclass trainkit.Callback and override the hooks you need)"
            )
    return sorted(items, key=lambda cb: cb.order)


def show_training_loop(callbacks: Sequence[Callback] = (), *, file: IO[str] | None = None) -> str:
    """Print the hooks of `fit` in firing order, with the callbacks attached to each.

    Pass the callbacks as `fit` would run them (include `ProgressBar()` to see the default bar).

    Args:
        callbacks: The callbacks to show.
        file: Where to print; standard output by default.

    Returns:
        The printed text.

    Raises:
        TypeError: an item of `callbacks` is not a `Callback`.

    Example:
        >>> text = show_training_loop([EarlyStopping()], file=io.StringIO())  # doctest: +SKIP
    """
    ordered = sort_callbacks(callbacks)
    lines = []
    for depth, item in _OUTLINE:
        if item.startswith("on_"):
            names = ", ".join(repr(cb) for cb in ordered if overrides(cb, item)) or "-"
            item = f"{item}: {names}"
        lines.append("    " * depth + item)
    text = "\n".join(lines)
    print(text, file=file or sys.stdout)
    return text


_OUTLINE: tuple[tuple[int, str], ...] = (
    (0, "on_fit_start"),
    (0, "for each epoch:"),
    (1, "on_epoch_start"),
    (1, "model.train(); for each training batch (moved to the device):"),
    (2, "on_train_batch_start"),
    (2, "loss = loss_func(model(xb), yb); backward"),
    (2, "on_before_optimizer_step"),
    (2, "opt.step(); opt.zero_grad()"),
    (2, "on_train_batch_end"),
    (1, "on_train_epoch_end"),
    (1, "if valid_dl: model.eval(); with torch.no_grad():"),
    (2, "on_validation_start"),
    (2, "for each validation batch: loss and metrics"),
    (3, "on_validation_batch_end"),
    (2, "on_validation_end"),
    (1, "record the epoch in History"),
    (1, "on_epoch_end"),
    (0, "on error: on_exception, then re-raise"),
    (1, "on_exception"),
    (0, "always:"),
    (1, "on_fit_end"),
)
