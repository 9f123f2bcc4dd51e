"""The callback protocol: named hooks, their firing order, and the one way to stop a run."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import IO, Any, ClassVar

from trainkit.state import EvalState, TrainState

__all__ = ["HOOKS", "Callback", "StopTraining", "hook_table", "show_training_loop"]

HOOKS: tuple[str, ...] = (
    "on_fit_start",
    "on_epoch_start",
    "on_train_batch_start",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_validation_start",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_validation_end",
    "on_epoch_end",
    "on_exception",
    "on_fit_end",
    "on_evaluate_start",
    "on_evaluate_batch_start",
    "on_evaluate_batch_end",
    "on_evaluate_end",
    "on_predict_start",
    "on_predict_batch_start",
    "on_predict_batch_end",
    "on_predict_end",
)
"""Every hook: those of `fit` in the order it fires them (`on_exception` only when the run
fails), then those of `evaluate` and of `predict`."""


class StopTraining(Exception):  # noqa: N818 - named for what it does, like StopIteration
    """Raise from any hook of `fit` to end the run cleanly (or call `state.stop(reason)`).

    The other callbacks' hooks of the same event still run (every `on_epoch_end` sees the
    epoch in which the stop was requested, so a `ModelCheckpoint` saves it and a logger logs
    it); then `fit` sets `state.status = "stopped"` and `state.stop_reason = str(exc)` (the
    reasons joined by "; " if several callbacks stop in the same event), calls `on_fit_end`
    and returns the `History` so far, with `history.status` and `history.stop_reason` set.
    Requested in `on_epoch_end`, the epoch is recorded; requested during an epoch, the
    unfinished epoch is not. In `evaluate` and `predict` hooks it is not caught: it
    propagates like any error.

    Example:
        >>> class StopAtLoss(Callback):
        ...     def on_epoch_end(self, state: TrainState) -> None:
        ...         if state.metrics["train_loss"] < 0.1:
        ...             raise StopTraining("train_loss below 0.1")
    """


class Callback:
    """Base class of callbacks: override the hooks you need, each takes the `TrainState`.

    Hooks, in firing order, are `HOOKS`; `show_training_loop` prints them where they fire, and
    the callbacks page of the documentation has a table (made by `hook_table()`) of when each
    fires, also under gradient accumulation, mixed precision and a stop.

    Only hooks a callback overrides are called, so an empty hook costs nothing per step.
    Callbacks run sorted by their `order` (lower first; ties keep the order given to `fit`).
    The progress bar has order -10 so it reports each epoch before others may stop the run.

    A callback with state to resume implements `state_dict` / `load_state_dict`.

    Example:
        >>> class PrintLoss(Callback):
        ...     def on_epoch_end(self, state: TrainState) -> None:
        ...         print(state.epoch, state.metrics["train_loss"])

        Gradients of every micro-batch, and as clipped, with the hooks `fit` adds for them:

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from trainkit import fit
        >>> class GradNorms(Callback):
        ...     def on_after_backward(self, state: TrainState) -> None:
        ...         print("after backward", state.step)
        ...     def on_before_zero_grad(self, state: TrainState) -> None:
        ...         grad = state.model.weight.grad
        ...         print("clipped", bool(grad.norm() <= 0.01 + 1e-6))
        ...     def on_validation_batch_start(self, state: TrainState) -> None:
        ...         print("validating", state.step)
        >>> model = torch.nn.Linear(4, 2, bias=False)
        >>> dl = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))] * 2
        >>> history = fit(1, model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
        ...               dl, dl[:1], callbacks=[GradNorms()], accumulate=2,
        ...               clip_grad_norm=0.01, progress=False)
        after backward 0
        after backward 1
        clipped True
        validating 0
    """

    order: ClassVar[int] = 0

    def on_fit_start(self, state: TrainState) -> None:
        """Before the first epoch."""

    def on_epoch_start(self, state: TrainState) -> None:
        """At the start of each epoch."""

    def on_train_batch_start(self, state: TrainState) -> None:
        """Before the forward pass; may replace `state.xb` / `state.yb`."""

    def on_after_backward(self, state: TrainState) -> None:
        """After each batch's backward (every micro-batch under accumulation).

        Gradients are as backward left them: summed over the group so far, and still scaled
        by the `GradScaler` under `amp="fp16"`. `state.loss` and `state.output` are the batch's.
        """

    def on_before_optimizer_step(self, state: TrainState) -> None:
        """Before each optimizer step: gradients unscaled, before `fit`'s clipping (as Lightning).

        Clip or inspect here; to see the gradients as clipped, use `on_before_zero_grad`.
        """

    def on_before_zero_grad(self, state: TrainState) -> None:
        """After each `opt.step()`, before `opt.zero_grad()`: gradients as the step used them."""

    def on_train_batch_end(self, state: TrainState) -> None:
        """After the optimizer step; `state.loss` holds the batch loss (reading it syncs)."""

    def on_train_epoch_end(self, state: TrainState) -> None:
        """After the epoch's last training batch, before validation and the History record."""

    def on_validation_start(self, state: TrainState) -> None:
        """After `model.eval()`, under `torch.no_grad()`, before the first validation batch."""

    def on_validation_batch_start(self, state: TrainState) -> None:
        """Before each validation batch's forward; `state.xb`/`state.yb` are on the device."""

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

    def on_evaluate_start(self, state: EvalState) -> None:
        """`evaluate(..., callbacks=...)`: after `model.eval()`, under `torch.no_grad()`."""

    def on_evaluate_batch_start(self, state: EvalState) -> None:
        """`evaluate`: before each batch's forward; `state.xb`/`state.yb` are on the device."""

    def on_evaluate_batch_end(self, state: EvalState) -> None:
        """`evaluate`: after each batch's loss and metric updates; `state.output` is set."""

    def on_evaluate_end(self, state: EvalState) -> None:
        """`evaluate`: after the pass; `state.metrics` holds what `evaluate` returns."""

    def on_predict_start(self, state: EvalState) -> None:
        """`predict(..., callbacks=...)`: after `model.eval()`, under `torch.no_grad()`."""

    def on_predict_batch_start(self, state: EvalState) -> None:
        """`predict`: before each batch's forward; `state.xb` is on the device."""

    def on_predict_batch_end(self, state: EvalState) -> None:
        """`predict`: after each batch's forward; `state.output` is the batch's output."""

    def on_predict_end(self, state: EvalState) -> None:
        """`predict`: after the last batch, before the outputs are concatenated."""

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
    """Print the hooks of `fit`, `evaluate` and `predict` where they fire, with their callbacks.

    Pass the callbacks as `fit` would run them (include `ProgressBar()` to see the default bar).
    The outline shows every step of the loop (zeroing, unscaling, clipping, stepping), so
    where a hook fires relative to them is plain.

    Args:
        callbacks: The callbacks to show.
        file: Where to print; standard output by default.

    Returns:
        The printed text.

    Raises:
        TypeError: an item of `callbacks` is not a `Callback`.

    Example:
        >>> import io
        >>> text = show_training_loop([Callback()], file=io.StringIO())
        >>> text.splitlines()[0]
        'on_fit_start: -'
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
    (0, "if resume: load the checkpoint"),
    (0, "opt.zero_grad()  # gradients left by code run before fit do not leak in"),
    (0, "for each epoch:"),
    (1, "on_epoch_start"),
    (1, "model.train(); for each training batch (moved to the device):"),
    (2, "on_train_batch_start"),
    (2, "with autocast (amp): loss = loss_func(model(xb), yb)"),
    (2, "backward(loss / accumulate, scaled by the GradScaler with amp='fp16')"),
    (2, "on_after_backward"),
    (2, "if the batch ends an accumulation group:"),
    (3, "scaler.unscale_(opt)  # amp='fp16'"),
    (3, "on_before_optimizer_step"),
    (3, "clip gradients (clip_grad_value, clip_grad_norm)"),
    (3, "opt.step() (scaler.step(opt); scaler.update() with amp='fp16')"),
    (3, "on_before_zero_grad"),
    (3, "opt.zero_grad(); scheduler.step() if per step"),
    (2, "on_train_batch_end"),
    (1, "on_train_epoch_end"),
    (1, "if valid_dl: model.eval(); with torch.no_grad():"),
    (2, "on_validation_start"),
    (2, "for each validation batch (moved to the device):"),
    (3, "on_validation_batch_start"),
    (3, "loss and metrics"),
    (3, "on_validation_batch_end"),
    (2, "on_validation_end"),
    (1, "record the epoch in History; scheduler.step() if per epoch"),
    (1, "on_epoch_end"),
    (1, "if a hook requested a stop: stop here (after every hook of that event ran)"),
    (0, "on error: on_exception, then re-raise"),
    (1, "on_exception"),
    (0, "always:"),
    (1, "on_fit_end"),
    (0, "evaluate(..., callbacks): model.eval(); with torch.no_grad():"),
    (1, "on_evaluate_start"),
    (1, "for each batch (moved to the device):"),
    (2, "on_evaluate_batch_start"),
    (2, "loss and metrics"),
    (2, "on_evaluate_batch_end"),
    (1, "on_evaluate_end"),
    (0, "predict(..., callbacks): model.eval(); with torch.no_grad():"),
    (1, "on_predict_start"),
    (1, "for each batch (moved to the device):"),
    (2, "on_predict_batch_start"),
    (2, "output = model(xb)"),
    (2, "on_predict_batch_end"),
    (1, "on_predict_end"),
)

_EVENT_STOP = "the event's other hooks run; then the run stops, this epoch unrecorded"
_BATCH_STOP = (
    "the batch finishes (its step, every hook to `on_train_batch_end`); then the run stops, "
    "this epoch unrecorded"
)
_EVAL_STOP = "not caught: propagates like any error"

# hook: (fires, what the state holds, with accumulate=k, with amp, a stop requested here)
_HOOK_INFO: dict[str, tuple[str, str, str, str, str]] = {
    "on_fit_start": (
        "once, before the first epoch and before `resume` is loaded",
        "the arguments of `fit`; `recorded_names`",
        "",
        "",
        "the other `on_fit_start` hooks run; then no epoch runs",
    ),
    "on_epoch_start": ("each epoch, before `model.train()`", "`epoch`", "", "", _EVENT_STOP),
    "on_train_batch_start": (
        "each training batch, on the device, before forward",
        "`xb`, `yb`, `step` (replace `xb`/`yb` to change the batch)",
        "every batch",
        "before autocast is entered",
        _BATCH_STOP,
    ),
    "on_after_backward": (
        "each training batch, after its backward",
        "`loss`, `output`; gradients as backward left them",
        "every batch; gradients summed over the group so far, each loss divided by k",
        "fp16: gradients still scaled by `state.scaler`",
        _BATCH_STOP,
    ),
    "on_before_optimizer_step": (
        "each optimizer step, before `fit`'s clipping and `opt.step()`",
        "gradients unscaled, not yet clipped",
        "once per k batches (and for the last, shorter group)",
        "fp16: after `scaler.unscale_`; gradients may be inf/NaN (the scaler skips that step)",
        _BATCH_STOP,
    ),
    "on_before_zero_grad": (
        "each optimizer step, after `opt.step()`, before `opt.zero_grad()`",
        "gradients as clipped and used by the step; weights updated",
        "once per k batches, as `on_before_optimizer_step`",
        "fp16: after `scaler.step`/`update`; a skipped step left the weights unchanged",
        _BATCH_STOP,
    ),
    "on_train_batch_end": (
        "each training batch, after its step (if it ends a group)",
        "`loss` (detached; reading it waits for the device), `step`, `global_step`",
        "every batch; `global_step` grows once per group",
        "",
        _BATCH_STOP,
    ),
    "on_train_epoch_end": (
        "after the epoch's last training batch, before validation",
        "`train_loss` (a `Mean`, on the device)",
        "after the leftover group's step",
        "",
        "the other hooks run; no validation; the run stops, this epoch unrecorded",
    ),
    "on_validation_start": (
        "after `model.eval()`, under `torch.no_grad()`",
        "",
        "",
        "",
        _EVENT_STOP,
    ),
    "on_validation_batch_start": (
        "each validation batch, on the device, before forward",
        "`xb`, `yb`, `step`",
        "",
        "before autocast is entered",
        _EVENT_STOP,
    ),
    "on_validation_batch_end": (
        "each validation batch, after loss and metric updates",
        "`xb`, `yb`, `output`",
        "",
        "",
        _EVENT_STOP,
    ),
    "on_validation_end": (
        "after the validation pass",
        "`metrics` with the new `val_*` figures",
        "",
        "",
        _EVENT_STOP,
    ),
    "on_epoch_end": (
        "after the epoch's row is appended to `history`",
        "`metrics` = that row",
        "",
        "",
        "every callback's `on_epoch_end` runs for this epoch (recorded, saved); then it stops",
    ),
    "on_exception": (
        "when the run fails, before `on_fit_end`",
        "the exception (second argument)",
        "",
        "",
        "not called",
    ),
    "on_fit_end": (
        "always, last",
        "`status`, `stop_reason`, `exception`",
        "",
        "",
        "called, status `stopped`",
    ),
    "on_evaluate_start": (
        "`evaluate`: after `model.eval()`, under `torch.no_grad()`",
        "an `EvalState`: `model`, `dl`",
        "",
        "",
        _EVAL_STOP,
    ),
    "on_evaluate_batch_start": (
        "`evaluate`: each batch, on the device, before forward",
        "`xb`, `yb`, `step`",
        "",
        "",
        _EVAL_STOP,
    ),
    "on_evaluate_batch_end": (
        "`evaluate`: each batch, after loss and metric updates",
        "`output`",
        "",
        "",
        _EVAL_STOP,
    ),
    "on_evaluate_end": (
        "`evaluate`: after the pass",
        "`metrics` = what `evaluate` returns",
        "",
        "",
        _EVAL_STOP,
    ),
    "on_predict_start": (
        "`predict`: after `model.eval()`, under `torch.no_grad()`",
        "an `EvalState`: `model`, `dl`",
        "",
        "",
        _EVAL_STOP,
    ),
    "on_predict_batch_start": (
        "`predict`: each batch, on the device, before forward",
        "`xb`, `step`",
        "",
        "",
        _EVAL_STOP,
    ),
    "on_predict_batch_end": (
        "`predict`: each batch, after forward",
        "`output`",
        "",
        "",
        _EVAL_STOP,
    ),
    "on_predict_end": (
        "`predict`: after the last batch",
        "",
        "",
        "",
        _EVAL_STOP,
    ),
}


def hook_table() -> str:
    """Every hook as a markdown table row: when it fires, also under accumulation, AMP, a stop.

    The table in the callbacks page of the documentation is this text (a test checks it).

    Returns:
        The table, one line per hook in `HOOKS` order, after a header and separator line.

    Example:
        >>> hook_table().splitlines()[2].startswith("| `on_fit_start` |")
        True
    """
    header = (
        "| hook | fires | the state holds | with `accumulate=k` | with `amp` "
        "| a stop requested here |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for hook in HOOKS:
        cells = [cell or "-" for cell in _HOOK_INFO[hook]]  # "-": nothing particular
        lines.append(f"| `{hook}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
