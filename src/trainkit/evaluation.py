"""Evaluation and prediction: `evaluate` (the Quickstart's test loop), `predict`, and the
validation pass `fit` runs each epoch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trainkit._batch import batch_size, canonical, check_loss, model_device, move_to, pair
from trainkit._hooks import call_any, call_eval, hook_lists
from trainkit._sharded import gathered, is_sharded
from trainkit._types import LossFn
from trainkit.callbacks.base import Callback, sort_callbacks
from trainkit.data import fast_loader
from trainkit.distributed import is_distributed
from trainkit.metrics import SYNCED, Mean, Metric, MetricArg, move_metrics, named_metrics
from trainkit.state import EvalState, TrainState

__all__ = ["evaluate", "predict"]

_NULL = contextlib.nullcontext()


def evaluate(
    model: nn.Module,
    loss_func: LossFn,
    dl: Iterable[Any],
    metrics: MetricArg = (),
    *,
    device: torch.device | str | None = None,
    callbacks: Sequence[Callback] = (),
    fast_loaders: bool = True,
    sync: bool = True,
) -> dict[str, float]:
    """The loss and metrics of `model` over `dl`, without training (the Quickstart's test loop).

    Runs under `torch.no_grad()` in eval mode and puts the model back in the mode it was in.
    The loss is averaged over samples (each batch weighted by its size, as the tutorial does).

    Args:
        model: The model.
        loss_func: `loss_func(model(xb), yb)` must return a 0-dim tensor.
        dl: Yields `(xb, yb)` pairs.
        metrics: As for `fit`.
        device: Where batches go; the model's device by default.
        callbacks: `Callback`s whose `on_evaluate_start`, `on_evaluate_batch_start`,
            `on_evaluate_batch_end` and `on_evaluate_end` hooks run, each with an `EvalState`
            (a hook may replace `state.xb`/`state.yb` in `on_evaluate_batch_start`).
        fast_loaders: As for `fit`: `False` iterates `dl` as given.
        sync: Under a process group, `evaluate` is a collective: every process must call it,
            each over its shard (`ShardSampler`), and the figures are summed over all of them;
            a process calling it alone waits for the others until the group's timeout.
            `sync=False`: this process's batches only, no collectives, for calling it on one
            rank (rank 0 over the whole test set); not for a model sharded by `fully_shard`,
            which is gathered whole first (a collective). No effect in one process. (A torchmetrics
            metric syncs itself in `compute`: build it with `sync_on_compute=False` there.)

    Returns:
        `{"loss": ..., "<metric name>": ...}` as Python floats. Metrics whose result has more
        than one element (`PerClassAccuracy`, `ConfusionMatrix`) are read from the metric
        object itself afterwards (`per_class.compute()`, `per_class.report()`).

    Raises:
        ValueError: `dl` yielded no batches, or a loss that is not 0-dim.
        TypeError: a batch that is not an `(input, target)` pair, or a callback that is not a
            `Callback`.
        Exception: an error raised by a callback (`StopTraining` too), unchanged.

    Example:
        >>> import torch.nn.functional as F
        >>> from trainkit import accuracy, Callback
        >>> model = nn.Linear(4, 2)
        >>> test_dl = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        >>> sorted(evaluate(model, F.cross_entropy, test_dl, [accuracy]))
        ['accuracy', 'loss']
        >>> class Show(Callback):
        ...     def on_evaluate_end(self, state: EvalState) -> None:
        ...         print(sorted(state.metrics))
        >>> _ = evaluate(model, F.cross_entropy, test_dl, callbacks=[Show()])
        ['loss']
    """
    named = named_metrics(metrics)
    dev = model_device(model) if device is None else canonical(torch.device(device))
    move_metrics(named, dev)
    dl = fast_loader(dl) if fast_loaders else dl
    hooks = hook_lists(sort_callbacks(callbacks))
    state = EvalState(model, dl, dev, loss_func) if callbacks else None
    was_training = model.training
    model.eval()
    try:
        with gathered(model) if is_sharded(model) else _NULL:
            results, _ = evaluate_pass(
                model, loss_func, dl, "dl", dev, named, state, _EVALUATE_HOOKS, hooks, sync=sync
            )
        if state is not None and hooks["on_evaluate_end"]:
            state.metrics = dict(results)
            with torch.no_grad():
                call_eval(hooks["on_evaluate_end"], state)
        return results
    finally:
        model.train(was_training)


VALIDATION_HOOKS = ("on_validation_start", "on_validation_batch_start", "on_validation_batch_end")
_EVALUATE_HOOKS = ("on_evaluate_start", "on_evaluate_batch_start", "on_evaluate_batch_end")


def evaluate_pass(
    model: Callable[[Any], Any],
    loss_func: LossFn,
    dl: Iterable[Any],
    arg: str,
    dev: torch.device,
    metrics: dict[str, Metric],
    state: TrainState | EvalState | None = None,
    names: tuple[str, str, str] = VALIDATION_HOOKS,
    hooks: dict[str, list[Callable[..., None]]] | None = None,
    autocast: torch.autocast | None = None,
    *,
    sync: bool = True,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """One pass over `dl` under `no_grad`: the loss and metrics, with the `names` hooks."""
    loss = Mean()
    for m in metrics.values():
        m.reset()
    start, batch_start, batch_end = ([], [], []) if hooks is None else (hooks[n] for n in names)
    with torch.no_grad():
        if start and state is not None:
            call_any(start, state)
        for step, batch in enumerate(dl):
            xb, yb = pair(batch, arg)
            xb, yb = move_to(xb, dev), move_to(yb, dev)
            if batch_start and state is not None:
                state.step, state.xb, state.yb = step, xb, yb
                call_any(batch_start, state)
                xb, yb = state.xb, state.yb
            with autocast or _NULL:
                out = model(xb)
                loss.update(check_loss(loss_func(out, yb), loss_func), batch_size(xb, yb))
                for m in metrics.values():
                    m.update(out, yb)
            if state is not None:
                state.step, state.xb, state.yb, state.output = step, xb, yb, out
                if batch_end:
                    call_any(batch_end, state)
                if isinstance(state, TrainState) and state.interrupted:
                    raise KeyboardInterrupt
    if loss.count == 0:
        raise ValueError(f"{arg}: the loader yielded no batches")
    if sync and is_distributed():  # sum over the processes' shards (as torchmetrics' sync)
        to_sync: list[object] = [loss, *metrics.values()]
        for item in to_sync:
            if isinstance(item, SYNCED):
                item.sync()
    # The read-backs from the device: once per validation pass.
    scalars, tensors = {"loss": float(loss.compute())}, {}
    for name, metric in metrics.items():
        value = torch.as_tensor(metric.compute())
        if value.numel() == 1:
            scalars[name] = float(value)
        else:
            tensors[name] = value.detach().cpu()
    return scalars, tensors


def predict(
    model: nn.Module,
    dl: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    callbacks: Sequence[Callback] = (),
    fast_loaders: bool = True,
) -> Tensor:
    """The model's outputs over `dl`, concatenated along the first dimension.

    Batches may be inputs alone or `(xb, yb)` pairs (the targets are ignored). Runs under
    `torch.no_grad()` in eval mode, and puts the model back in the mode it was in.
    It runs no collectives: under a process group each process predicts its own loader's
    batches, and it may be called on one rank alone (pass the plain module, not a
    `DistributedDataParallel` wrapper, whose forward may broadcast buffers). A model sharded
    by `fully_shard` is gathered whole once at the start: a collective, every process calls it.

    Args:
        model: The model; its outputs must be tensors.
        dl: Yields input batches or `(xb, yb)` pairs.
        device: Where batches go; the model's device by default.
        callbacks: `Callback`s whose `on_predict_start`, `on_predict_batch_start`,
            `on_predict_batch_end` and `on_predict_end` hooks run, each with an `EvalState`
            (a hook may replace `state.xb` in `on_predict_batch_start`).
        fast_loaders: As for `fit`: `False` iterates `dl` as given.

    Returns:
        A tensor with one row per sample, on the model's device.

    Raises:
        ValueError: `dl` yielded no batches.
        TypeError: a callback that is not a `Callback`.
        Exception: an error raised by a callback (`StopTraining` too), unchanged.

    Example:
        >>> from trainkit import Callback
        >>> model = nn.Linear(4, 3)
        >>> predict(model, [torch.randn(8, 4), torch.randn(2, 4)]).shape
        torch.Size([10, 3])
        >>> class Sizes(Callback):
        ...     def on_predict_batch_end(self, state: EvalState) -> None:
        ...         print(state.step, tuple(state.output.shape))
        >>> _ = predict(model, [torch.randn(8, 4), torch.randn(2, 4)], callbacks=[Sizes()])
        0 (8, 3)
        1 (2, 3)
    """
    dev = model_device(model) if device is None else canonical(torch.device(device))
    dl = fast_loader(dl) if fast_loaders else dl
    hooks = hook_lists(sort_callbacks(callbacks))
    state = EvalState(model, dl, dev)
    was_training = model.training
    model.eval()
    outputs: list[Tensor] = []
    try:
        with torch.no_grad(), gathered(model) if is_sharded(model) else _NULL:
            call_eval(hooks["on_predict_start"], state)
            for step, batch in enumerate(dl):
                xb = batch[0] if isinstance(batch, tuple | list) else batch
                xb = move_to(xb, dev)
                if hooks["on_predict_batch_start"]:
                    state.step, state.xb = step, xb
                    call_eval(hooks["on_predict_batch_start"], state)
                    xb = state.xb
                outputs.append(model(xb))
                if hooks["on_predict_batch_end"]:
                    state.step, state.xb, state.output = step, xb, outputs[-1]
                    call_eval(hooks["on_predict_batch_end"], state)
            call_eval(hooks["on_predict_end"], state)
    finally:
        model.train(was_training)
    if not outputs:
        raise ValueError("predict(dl=...): the loader yielded no batches")
    return torch.cat(outputs)
