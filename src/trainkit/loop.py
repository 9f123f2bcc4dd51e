"""The training loop: `loss_batch` and `fit`, and nothing else (`evaluate` and `predict` are in
`trainkit.evaluation`)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from trainkit._batch import batch_size, canonical, check_loss, model_device, move_to, pair
from trainkit._hooks import call, call_in_step, hook_lists, note_failure
from trainkit._interrupt import defer_sigint
from trainkit._options import Run, check_fit_args
from trainkit._rng import rng_state, set_rng_state
from trainkit._run_state import loader_generators, own_rank_state, read_agreed, restore_run
from trainkit._sharded import gathered
from trainkit._types import LossFn, Scheduler
from trainkit.callbacks.base import Callback, StopTraining, sort_callbacks
from trainkit.callbacks.checkpoint import ModelCheckpoint
from trainkit.callbacks.nan import TerminateOnNaN
from trainkit.callbacks.progress import ProgressBar
from trainkit.checkpoint import Checkpoint, CheckpointError
from trainkit.data import fast_loader, set_epoch
from trainkit.distributed import (
    broadcast_buffers,
    convert_sync_batchnorm,
    is_distributed,
    is_main_process,
    rank,
    warn_data_setup,
    world_size,
)
from trainkit.evaluation import VALIDATION_HOOKS, evaluate_pass
from trainkit.metrics import (
    ConfusionMatrix,
    Mean,
    Metric,
    MetricArg,
    PerClassAccuracy,
    move_metrics,
    named_metrics,
)
from trainkit.state import History, TrainState

__all__ = ["Amp", "LossFn", "Scheduler", "fit", "loss_batch"]

_NULL = contextlib.nullcontext()


def loss_batch(
    model: nn.Module, loss_func: LossFn, xb: Any, yb: Any, opt: Optimizer | None = None
) -> tuple[float, int]:
    """Compute the loss of one batch and, given `opt`, take one optimizer step (the tutorial's).

    Args:
        model: The model; called as `model(xb)`.
        loss_func: Called as `loss_func(model(xb), yb)`; must return a 0-dim tensor.
        xb: Inputs.
        yb: Targets.
        opt: If given: backward, `opt.step()`, `opt.zero_grad()`, in the tutorial's order:
            gradients left in the parameters before the call are added into this step, as
            in the tutorial's loop (`fit` zeroes them before its first step).

    Returns:
        `(loss, len(xb))`, the loss as a Python float. Reading it waits for the device once
        per call; `fit` avoids that per step.

    Raises:
        TypeError, ValueError: `loss_func` returned something other than a 0-dim tensor.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch.nn.functional as F
        >>> model = nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> xb, yb = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
        >>> loss, n = loss_batch(model, F.cross_entropy, xb, yb, opt)
        >>> n
        8
    """
    loss = check_loss(loss_func(model(xb), yb), loss_func)
    if opt is not None:
        torch.autograd.backward(loss)
        opt.step()
        opt.zero_grad()
    return loss.item(), batch_size(xb, yb)


Amp = Literal["bf16", "fp16"]
"""Mixed precision for `fit(amp=...)`: `"bf16"` (CPU and CUDA autocast) or `"fp16"` (CUDA,
with a `torch.amp.GradScaler`)."""


def fit(
    epochs: int,
    model: nn.Module,
    loss_func: LossFn,
    opt: Optimizer,
    train_dl: Iterable[Any],
    valid_dl: Iterable[Any] | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    metrics: MetricArg = (),
    progress: bool | Literal["auto"] = "auto",
    device: torch.device | str | None = None,
    scheduler: Scheduler | None = None,
    scheduler_interval: Literal["epoch", "step"] = "epoch",
    scheduler_monitor: str | None = None,
    amp: Amp | None = None,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
    clip_grad_value: float | None = None,
    channels_last: bool = False,
    compile: bool = False,
    terminate_on_nan: bool = True,
    resume: str | os.PathLike[str] | None = None,
    fast_loaders: bool = True,
    sync_batchnorm: bool = False,
) -> History:
    """Train `model` for `epochs` epochs, validating after each: the tutorial's `fit`, kept.

    The positional arguments are those of "What is torch.nn really?", so its code runs
    unchanged. Each epoch: `model.train()`, for each batch of `train_dl` forward, backward,
    `opt.step()`, `opt.zero_grad()`; then, given `valid_dl`, `model.eval()` and under
    `torch.no_grad()` the validation loss (weighted by batch size, as the tutorial) and metrics.
    Batches are moved to the model's device. Nothing in a training step reads a value back from
    the device, except the progress bar and the NaN check at their refresh interval. Before
    the first step, `fit` zeroes the optimizer's gradients (`opt.zero_grad()`), so gradients
    left by code run before it (a `loss.backward()` in a notebook cell) do not leak into the
    first update; `loss_batch` keeps the tutorial's order instead.

    The names each epoch records (`epoch`, `train_loss`, with `valid_dl` also `val_loss` and
    `val_<metric>`, then `lr`, `seconds`) are known before the first step, as
    `state.recorded_names`: a monitored name that is not among them (`EarlyStopping`,
    `ModelCheckpoint`, `scheduler_monitor`) is refused at the start, not after an epoch.

    Args:
        epochs: Number of passes over `train_dl`, at least 1.
        model: The model to train, in place.
        loss_func: `loss_func(model(xb), yb)` must return a 0-dim tensor.
        opt: Optimizer over (some of) the model's parameters.
        train_dl: Yields `(xb, yb)` pairs (a `DataLoader`, `WrappedDataLoader`, ...). Adapt
            other batch shapes with `WrappedDataLoader(dl, func)`.
        valid_dl: Yields `(xb, yb)` pairs; optional.
        callbacks: `Callback`s, run by their `order`, then in the order given.
        metrics: Validation metrics: `Metric` objects or batch functions like `accuracy`,
            recorded as `val_<name>`; a mapping names them explicitly.
        progress: `"auto"`: a bar on a terminal or notebook, one line per epoch otherwise;
            `True`: always a bar; `False`: print nothing.
        device: Move the model there first; by default batches go to the device of the model's
            first parameter (the CPU for a model without parameters).
        scheduler: A learning-rate scheduler over `opt`, stepped every `scheduler_interval`.
            `ReduceLROnPlateau` is stepped once per epoch with `scheduler_monitor`. History
            records the learning rate each epoch ended with.
        scheduler_interval: `"epoch"` (after validation) or `"step"` (after every optimizer
            step, as `OneCycleLR` needs).
        scheduler_monitor: The recorded name a `ReduceLROnPlateau` scheduler is stepped with
            (`"val_accuracy"` for a `mode="max"` scheduler); by default `"val_loss"`, or
            `"train_loss"` without `valid_dl`. Only for `ReduceLROnPlateau`.
        amp: Mixed precision: `"bf16"` autocasts forward and loss to bfloat16 (CPU or CUDA);
            `"fp16"` to float16 with a `GradScaler` (CUDA only). `None`: full precision.
        accumulate: Optimizer step every `accumulate` batches, each batch's loss divided so the
            update equals that of one batch `accumulate` times larger (for a loader with a
            length, the last, shorter group is divided by its own size).
        clip_grad_norm: Clip the gradients' total 2-norm to this value before each step.
        clip_grad_value: Clip every gradient element to `[-value, value]` before each step.
        channels_last: Put the model and 4-dim inputs in `torch.channels_last` memory format
            (faster convolutions on many devices).
        compile: Compile the training step with `torch.compile`: the forward pass with the
            loss (and so their backward) as one graph, the model for validation, and the
            optimizer step (with a scheduler, only if the learning rates are tensors); the
            backward call and the hooks run between them as usual. Results agree with eager
            training to a relative 1e-4, not bit for bit. Where compiling fails, that part
            runs eagerly after one warning. On the CPU it often costs more than it saves
            (docs/benchmarks.md). Checkpoints still see the plain model.
        terminate_on_nan: Add `TerminateOnNaN()`: stop at the first NaN or infinite loss (or
            weights), with a warning; see `TerminateOnNaN` for what the model then holds.
        resume: A checkpoint file, or a `ModelCheckpoint` directory (its `last.ckpt`), to
            continue from: model, optimizer, scheduler, scaler, callbacks, History, random
            generators and the position in the epoch are restored, and the batches after it are
            the ones the uninterrupted run would have seen. `epochs` is the run's total.
            `"auto"`: the `last.ckpt` of the run's `ModelCheckpoint` if there is one, else a
            new run (the one line a restarted job needs; any other path that holds nothing is
            an error). Under a process group rank 0 decides and every rank resumes from that
            file, each with its own random states and running loss, or all fail with one error.
        sync_batchnorm: Under a process group whose backend supports it (nccl), convert the
            model's BatchNorm layers to `SyncBatchNorm` (statistics over every process's batch)
            in place; refused under gloo; nothing to do in one process. Without it, BatchNorm's
            running statistics are broadcast from rank 0 before validation and each save.
        fast_loaders: Build the batches of a `DataLoader` over a `TensorDataset` (default
            collate, no workers; also inside `WrappedDataLoader`/`DeviceDataLoader`) by
            indexing its tensors instead of sample by sample: the same batches and random
            numbers, so the same results, faster (`fast_loader`). `False`: iterate the loaders
            as given.

    Ctrl-C while training is deferred to the end of the next optimizer step (with
    `accumulate`, the end of the accumulation group; during validation, the end of the batch; a
    second Ctrl-C interrupts at once), so a `ModelCheckpoint` can save the last completed step
    before the `KeyboardInterrupt` propagates. SIGTERM (how schedulers stop a job) does the
    same, then raises `Preempted` (a `SystemExit` with status 143). Under a process group, both
    signals stop every process after the same optimizer step (a second one does not stop a
    process at once: the others would wait for it), and fit raises `Preempted`.

    Returns:
        The `History` of the run: one record per completed epoch; `history.status` is
        `"completed"` or `"stopped"`, and `history.stop_reason` says why it stopped.

    Raises:
        ValueError: `epochs` < 1, empty `train_dl`, `opt` holds none of the model's parameters,
            metrics without `valid_dl`, a loss that is not 0-dim, a monitored name the run does
            not record (before the first step, with the names it does), or a bad option
            (named).
        TypeError: a batch that is not an `(input, target)` pair, or a loss that is not a tensor.
        Exception: any error raised by the model, the loss or a callback, unchanged, after
            `on_exception` and `on_fit_end` ran.

    Example:
        >>> import torch.nn.functional as F
        >>> from torch.utils.data import TensorDataset
        >>> from trainkit import accuracy, get_data
        >>> ds = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
        >>> train_dl, valid_dl = get_data(ds, ds, bs=16)
        >>> model = nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> history = fit(2, model, F.cross_entropy, opt, train_dl, valid_dl,
        ...               metrics=[accuracy], progress=False)
        >>> len(history["val_accuracy"])
        2
        >>> history.status
        'completed'

        A `mode="max"` plateau scheduler stepped with the validation accuracy:

        >>> plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max")
        >>> history = fit(2, model, F.cross_entropy, opt, train_dl, valid_dl,
        ...               metrics=[accuracy], scheduler=plateau,
        ...               scheduler_monitor="val_accuracy", progress=False)
    """
    check_fit_args(epochs, model, opt, train_dl, valid_dl, metrics)
    warn_data_setup(train_dl, valid_dl)  # on the loaders as given, before any fast path
    if fast_loaders:  # bitwise the same batches, without per-sample Python (trainkit.fastpath)
        train_dl = fast_loader(train_dl)
        valid_dl = fast_loader(valid_dl) if valid_dl is not None else None
    if device is not None:
        model.to(device)
    dev = model_device(model) if device is None else canonical(torch.device(device))
    convert_sync_batchnorm(model, sync_batchnorm)
    run = Run.build(
        model, loss_func, opt, dev, scheduler, scheduler_interval, amp, accumulate,
        clip_grad_norm, clip_grad_value, channels_last, compile,
    )  # fmt: skip
    named = named_metrics(metrics)
    move_metrics(named, dev)
    run.plateau_monitor = _plateau_monitor(scheduler, scheduler_monitor, valid_dl)
    given = {type(cb) for cb in callbacks}
    extra: list[Callback] = []
    if terminate_on_nan and TerminateOnNaN not in given:
        extra.append(TerminateOnNaN())
    if progress is not False and ProgressBar not in given:  # the caller's own bar replaces ours
        extra.append(ProgressBar(force_bar=progress is True))
    cbs = sort_callbacks([*callbacks, *extra])
    hooks = hook_lists(cbs)
    state = TrainState(
        model, loss_func, opt, train_dl, valid_dl, epochs, dev,
        scheduler=scheduler, scaler=run.scaler, callbacks=cbs,
        recorded_names=_recorded_names(valid_dl, named),
    )  # fmt: skip
    if run.plateau_monitor is not None:
        state.check_monitor(run.plateau_monitor, "fit(scheduler_monitor=...)")
    restore_sigint = defer_sigint(state)
    try:
        call(hooks["on_fit_start"], state)
        ckpt = _resume(state, resume) if resume is not None else None
        start = 0 if ckpt is None else ckpt.epoch + ckpt.epoch_complete
        opt.zero_grad()  # gradients left by code run before fit must not leak into its first step
        for epoch in range(start, epochs):
            state.epoch = epoch
            mid_epoch = ckpt is not None and not ckpt.epoch_complete and epoch == ckpt.epoch
            _train_epoch(state, hooks, named, run, ckpt if mid_epoch else None)
        state.status = "completed"
    except StopTraining as stop:
        state.status, state.stop_reason = "stopped", str(stop)
    except BaseException as exc:
        state.status, state.exception = "failed", exc
        state.history.status = "failed"
        if is_distributed():
            exc.add_note(
                f"trainkit: on rank {rank()} of {world_size()}; if another rank failed first, "
                "its error is the cause"
            )
        for on_exception in hooks["on_exception"]:
            note_failure(exc, on_exception, state, exc)
        for on_fit_end in hooks["on_fit_end"]:
            note_failure(exc, on_fit_end, state)
        raise
    finally:
        restore_sigint()
    state.history.status, state.history.stop_reason = state.status, state.stop_reason
    failed: Exception | None = None
    for on_fit_end in hooks["on_fit_end"]:  # a stop requested here has nothing left to stop
        if failed is not None:  # every one runs: a later callback may release a lock, a file
            note_failure(failed, on_fit_end, state)
            continue
        try:
            on_fit_end(state)
        except Exception as err:
            failed = err
    if failed is not None:
        raise failed
    return state.history


def _recorded_names(valid_dl: Iterable[Any] | None, metrics: dict[str, Metric]) -> tuple[str, ...]:
    """The names each epoch's History record holds, in order, known before the first step."""
    names = ["epoch", "train_loss"]
    if valid_dl is not None:
        names.append("val_loss")
        # results with more than one element go to History.tensors, not the record
        tensor_valued = (PerClassAccuracy, ConfusionMatrix)
        names += [f"val_{n}" for n, m in metrics.items() if not isinstance(m, tensor_valued)]
    return (*names, "lr", "seconds")


def _plateau_monitor(
    scheduler: Scheduler | None, monitor: str | None, valid_dl: Iterable[Any] | None
) -> str | None:
    """The name a `ReduceLROnPlateau` is stepped with; `None` for other schedulers."""
    if not isinstance(scheduler, ReduceLROnPlateau):
        if monitor is not None:
            raise ValueError(
                f"fit(scheduler_monitor={monitor!r}): only a ReduceLROnPlateau scheduler is "
                f"stepped with a monitored figure; got scheduler={type(scheduler).__name__}"
            )
        return None
    if monitor is not None and not isinstance(monitor, str):
        raise TypeError(f"fit(scheduler_monitor=...): expected a str, got {monitor!r}")
    return monitor or ("val_loss" if valid_dl is not None else "train_loss")


def _resume(state: TrainState, resume: str | os.PathLike[str]) -> Checkpoint | None:
    """Restore a run from its checkpoint (`None`: `resume="auto"` found none, start fresh).

    Every process resumes from the same file, or all fail with one error (`read_agreed`); each
    takes its own random states and running loss from it. Everything in it, and the training
    loader, is checked before anything is restored; the random generators are set here at an
    epoch's end, or by `_start_epoch` when replaying an interrupted epoch."""
    auto = isinstance(resume, str) and resume == "auto"
    target = _checkpoint_dir(state) if auto else resume
    found = read_agreed(target, state.device, missing_ok=auto)
    if found is None:
        if is_main_process():
            print(
                f"trainkit: resume='auto': no last.ckpt in {target}; starting a new run",
                file=sys.stderr,
                flush=True,
            )
        return None
    path, data = found
    ckpt = own_rank_state(restore_run(path, state, data))
    if ckpt.epoch_complete:
        set_rng_state(ckpt.rng)
        state.metrics = dict(state.history[-1]) if len(state.history) else {}
    return ckpt


def _checkpoint_dir(state: TrainState) -> Path:
    """The directory `resume="auto"` looks in: that of the run's one `ModelCheckpoint`."""
    found = [cb for cb in state.callbacks if isinstance(cb, ModelCheckpoint)]
    if len(found) != 1:
        raise ValueError(
            "fit(resume='auto') resumes from the last.ckpt of the run's ModelCheckpoint; this "
            f"run has {len(found)} ModelCheckpoint callbacks. Pass one, or pass resume=PATH"
        )
    return found[0].dirpath


def _train_epoch(
    state: TrainState,
    hooks: dict[str, list[Callable[..., None]]],
    metrics: dict[str, Metric],
    run: Run,
    resume: Checkpoint | None = None,
) -> None:
    model, loss_func, dev, forward_loss = (
        state.model,
        state.loss_func,
        state.device,
        run.forward_loss,
    )
    batch_start, batch_end = hooks["on_train_batch_start"], hooks["on_train_batch_end"]
    after_backward = hooks["on_after_backward"]
    accumulate, autocast, scaler = run.accumulate, run.autocast, run.scaler
    # with accumulation, the last group of a sized loader may be shorter: divide by its size
    n = len(state.train_dl) if isinstance(state.train_dl, Sized) else -1
    full_groups_end = n - n % accumulate
    pending = 0
    started = time.perf_counter()
    call(hooks["on_epoch_start"], state)
    model.train()
    batches, train_loss = _start_epoch(state, resume)
    for step, batch in batches:
        xb, yb = pair(batch, "train_dl")
        xb, yb = move_to(xb, dev), move_to(yb, dev)
        if run.channels_last and isinstance(xb, Tensor) and xb.ndim == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        state.step, state.xb, state.yb = step, xb, yb
        if batch_start:
            call_in_step(batch_start, state)
        # under DDP or FSDP2, gradients are reduced only on the batch that ends a group
        no_sync = run.no_sync is not None and pending + 1 < accumulate and step + 1 != n
        with run.no_sync() if no_sync else _NULL:  # type: ignore[misc]
            with autocast or _NULL:
                out, loss = forward_loss(state.xb, state.yb)
                loss = check_loss(loss, loss_func)
            scaled = loss
            if accumulate > 1:
                scaled = loss / (
                    n - full_groups_end if 0 <= full_groups_end <= step else accumulate
                )
            torch.autograd.backward(scaler.scale(scaled) if scaler is not None else scaled)
        state.output, state.loss = out, loss.detach()
        if after_backward:
            call_in_step(after_backward, state)
        pending += 1
        if pending == accumulate or step + 1 == n:
            _optimizer_step(state, hooks, run)
            pending = 0
        train_loss.update(state.loss, batch_size(state.xb, state.yb))
        state.batches_done = step + 1
        if batch_end:
            call_in_step(batch_end, state)
        if state.interrupted:
            raise KeyboardInterrupt
        if state.should_stop:  # requested in one of this batch's hooks, all of which ran
            raise StopTraining(state.stop_reason)
    if train_loss.count == 0:
        raise ValueError("fit(train_dl=...): the training loader yielded no batches")
    if pending:  # a loader without a length ended inside an accumulation group
        _optimizer_step(state, hooks, run)
    call(hooks["on_train_epoch_end"], state)
    if is_distributed():
        train_loss.sync()  # the loss over every process's batches
    # epochs are numbered from 1 wherever a user reads them; state.epoch is the 0-based index
    record: dict[str, float] = {
        "epoch": state.epoch + 1,
        "train_loss": float(train_loss.compute()),
    }
    tensors: dict[str, Tensor] = {}
    if state.valid_dl is not None:
        broadcast_buffers(model)  # every rank validates rank 0's BatchNorm statistics
        model.eval()
        with gathered(model) if run.sharded else _NULL:
            figures, tensors = evaluate_pass(
                run.evaluate_forward, loss_func, state.valid_dl, "valid_dl", dev, metrics,
                state, VALIDATION_HOOKS, hooks, autocast,
            )  # fmt: skip
        record.update({f"val_{name}": value for name, value in figures.items()})
        tensors = {f"val_{name}": value for name, value in tensors.items()}
        state.metrics = {**state.metrics, **record}
        call(hooks["on_validation_end"], state)
    record["lr"] = float(state.opt.param_groups[0]["lr"])
    record["seconds"] = time.perf_counter() - started
    if run.scheduler is not None and not run.step_scheduler:
        if isinstance(run.scheduler, ReduceLROnPlateau):
            assert run.plateau_monitor is not None  # checked against the recorded names
            run.scheduler.step(record[run.plateau_monitor])
        else:
            run.scheduler.step()
    state.history.append(record, tensors)
    state.metrics = dict(record)
    call(hooks["on_epoch_end"], state)


def _start_epoch(
    state: TrainState, resume: Checkpoint | None
) -> tuple[Iterator[tuple[int, Any]], Mean]:
    """The epoch's batches and running loss: fresh, or replayed up to a mid-epoch checkpoint."""
    set_epoch(state.train_dl, state.epoch)
    generators = loader_generators(state.train_dl)
    train_loss = state.train_loss = Mean()
    if resume is None:
        state.batches_done = 0
        state.epoch_rng = {**rng_state(), "loaders": [g.get_state() for g in generators]}
        return enumerate(state.train_dl), train_loss
    # checked by restore_run before anything was restored
    assert resume.epoch_rng is not None and resume.train_loss is not None
    # replay the epoch's data order: the generators as they were when it was drawn
    set_rng_state(resume.epoch_rng)
    for g, g_state in zip(generators, resume.epoch_rng.get("loaders", []), strict=True):
        g.set_state(g_state.cpu())  # loaded onto the model's device with the rest
    state.epoch_rng = resume.epoch_rng
    batches = iter(state.train_dl)
    for done in range(resume.step):  # the loader's work for these batches is repeated
        if next(batches, None) is None:
            raise CheckpointError(
                f"{resume.path}: saved after {resume.step} batches of epoch {resume.epoch + 1}, "
                f"but train_dl now yields only {done}"
            )
    set_rng_state(resume.rng)  # dropout and the rest continue as they would have
    train_loss.load_state_dict(resume.train_loss)
    state.batches_done = resume.step
    return enumerate(batches, start=resume.step), train_loss


def _optimizer_step(
    state: TrainState, hooks: dict[str, list[Callable[..., None]]], run: Run
) -> None:
    """Unscale, hooks, clip, step, hooks, zero_grad, per-step scheduler: one optimizer step."""
    opt, scaler = state.opt, run.scaler
    before_step, before_zero_grad = hooks["on_before_optimizer_step"], hooks["on_before_zero_grad"]
    if scaler is not None:
        scaler.unscale_(opt)  # hooks and clipping see the true gradients
    if before_step:
        call_in_step(before_step, state)
    if run.clip_grad_norm is not None or run.clip_grad_value is not None:
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if run.clip_grad_value is not None:
            nn.utils.clip_grad_value_(params, run.clip_grad_value)
        if run.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, run.clip_grad_norm)
    if scaler is not None:
        scaler.step(opt)  # GradScaler reads its inf check back from the device here
        scaler.update()
    else:
        run.opt_step()  # opt.step(), compiled with compile=True
    if before_zero_grad:  # the gradients as clipped and used by the step
        call_in_step(before_zero_grad, state)
    opt.zero_grad()
    if run.step_scheduler:
        assert run.scheduler is not None and not isinstance(run.scheduler, ReduceLROnPlateau)
        run.scheduler.step()
    state.global_step += 1
