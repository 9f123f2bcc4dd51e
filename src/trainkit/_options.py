"""The options of one `fit`, checked and prepared once, read by every step."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from trainkit._sharded import is_sharded, no_grad_sync
from trainkit._types import LossFn, Scheduler
from trainkit.compiling import compile_step
from trainkit.distributed import is_distributed
from trainkit.metrics import MetricArg


@dataclass
class Run:
    """The options of one `fit`, checked and prepared once, read by every step."""

    forward_loss: Callable[[Any, Any], tuple[Any, Any]]  # (model(xb), loss_func(output, yb))
    evaluate_forward: Callable[[Any], Any]
    # the context in which a micro-batch's gradients are not reduced across processes (DDP's
    # no_sync, FSDP2's set_requires_gradient_sync(False)); None in one process
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None
    sharded: bool  # the model is sharded by fully_shard: validation gathers it once
    scheduler: Scheduler | None
    step_scheduler: bool  # per optimizer step rather than per epoch
    autocast: torch.autocast | None
    scaler: torch.amp.GradScaler | None
    accumulate: int
    clip_grad_norm: float | None
    clip_grad_value: float | None
    channels_last: bool
    opt_step: Callable[[], object]  # opt.step, or compiled with compile=True (trainkit.compiling)
    plateau_monitor: str | None = None  # what a ReduceLROnPlateau is stepped with

    @classmethod
    def build(
        cls,
        model: nn.Module,
        loss_func: LossFn,
        opt: Optimizer,
        dev: torch.device,
        scheduler: Scheduler | None,
        scheduler_interval: str,
        amp: str | None,
        accumulate: int,
        clip_grad_norm: float | None,
        clip_grad_value: float | None,
        channels_last: bool,
        compile: bool,
    ) -> Run:
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                "fit(scheduler_interval=...): expected 'epoch' or 'step', "
                f"got {scheduler_interval!r}"
            )
        if scheduler is not None and getattr(scheduler, "optimizer", opt) is not opt:
            raise ValueError("fit(scheduler=...): the scheduler was built for another optimizer")
        if isinstance(scheduler, ReduceLROnPlateau) and scheduler_interval == "step":
            raise ValueError("fit(scheduler=...): ReduceLROnPlateau steps per epoch, not per step")
        if amp not in (None, "bf16", "fp16"):
            raise ValueError(f"fit(amp=...): expected None, 'bf16' or 'fp16', got {amp!r}")
        if amp == "fp16" and dev.type != "cuda":
            raise ValueError(f"fit(amp='fp16') needs a CUDA device (model on {dev}); use 'bf16'")
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"fit(accumulate=...): expected an int >= 1, got {accumulate!r}")
        for name, value in (
            ("clip_grad_norm", clip_grad_norm),
            ("clip_grad_value", clip_grad_value),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"fit({name}=...): expected a number > 0, got {value!r}")
        if channels_last:
            model.to(memory_format=torch.channels_last)
        sharded = is_sharded(model)
        if sharded and compile:
            raise ValueError(
                "fit(compile=True) with a model sharded by fully_shard: not supported; compile "
                "its blocks yourself (before fully_shard) and pass compile=False"
            )
        # used as it is: a DistributedDataParallel or fully_shard model; else DDP around it
        ddp = model if isinstance(model, DistributedDataParallel) else None
        if ddp is None and is_distributed() and not sharded:
            ddp = DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        # validation runs the plain module (a sharded one gathered once, see _sharded.gathered):
        # no collectives, so shards may differ in length
        evaluate_forward: Callable[[Any], Any] = (
            model.module if isinstance(model, DistributedDataParallel) else model
        )
        forward: Callable[[Any], Any] = ddp if ddp is not None else model
        no_sync = ddp.no_sync if ddp is not None else None
        if sharded:
            no_sync = functools.partial(no_grad_sync, model)

        def eager_forward_loss(xb: Any, yb: Any) -> tuple[Any, Any]:
            out = forward(xb)
            return out, loss_func(out, yb)

        forward_loss: Callable[[Any, Any], tuple[Any, Any]] = eager_forward_loss
        opt_step: Callable[[], object] = opt.step
        if compile:  # forward and loss (and so their backward), and the optimizer step
            compiled = compile_step(forward_loss, evaluate_forward, opt, scheduler is not None)
            forward_loss, evaluate_forward, opt_step = compiled
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
        return cls(
            forward_loss=forward_loss,
            evaluate_forward=evaluate_forward,
            no_sync=no_sync,
            sharded=sharded,
            scheduler=scheduler,
            step_scheduler=scheduler is not None and scheduler_interval == "step",
            autocast=torch.autocast(dev.type, dtype=dtype) if dtype is not None else None,
            scaler=torch.amp.GradScaler(dev.type) if amp == "fp16" else None,
            accumulate=accumulate,
            clip_grad_norm=clip_grad_norm,
            clip_grad_value=clip_grad_value,
            channels_last=channels_last,
            opt_step=opt_step,
        )


def check_fit_args(
    epochs: int,
    model: nn.Module,
    opt: Optimizer,
    train_dl: Iterable[Any],
    valid_dl: Iterable[Any] | None,
    metrics: MetricArg,
) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fit(epochs=...): epochs must be an integer >= 1, got {epochs!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fit(model=...): expected an nn.Module, got {type(model).__name__}")
    if not isinstance(opt, Optimizer):
        raise TypeError(f"fit(opt=...): expected a torch.optim.Optimizer, got {type(opt).__name__}")
    params = {id(p) for p in model.parameters()}
    if not any(id(p) in params for group in opt.param_groups for p in group["params"]):
        raise ValueError(
            "fit(opt=...): the optimizer holds none of the model's parameters; build it from "
            "this model, e.g. optim.SGD(model.parameters(), lr=...)"
        )
    if isinstance(train_dl, Sized) and len(train_dl) == 0:
        raise ValueError("fit(train_dl=...): the training loader is empty")
    if metrics and valid_dl is None:
        raise ValueError("fit(metrics=...): metrics are computed on validation data; pass valid_dl")
