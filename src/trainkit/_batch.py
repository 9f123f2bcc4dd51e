"""What every loop does with one batch, shared by `fit`, `evaluate`, `predict`, `lr_find` and
the loaders: the `(input, target)` pair check, device moves, the loss check, the batch size and
the model's device. Internal: not part of the public API."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

_SEQUENCES = (tuple, list)  # a constant: `tuple | list` would build a union on every call


def pair(batch: Any, arg: str) -> tuple[Any, Any]:
    if isinstance(batch, _SEQUENCES) and len(batch) == 2:
        return batch[0], batch[1]
    what = f"a {type(batch).__name__}"
    if isinstance(batch, _SEQUENCES):
        what += f" of {len(batch)} items"
    raise TypeError(
        f"{arg} yielded {what}; fit expects (input, target) pairs. Adapt the batches with "
        f"WrappedDataLoader({arg}, func), where func returns (input, target)."
    )


def check_loss(loss: Any, loss_func: Callable[..., Any]) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"loss_func ({callable_name(loss_func)}) returned a {type(loss).__name__}, not a tensor"
        )
    if loss.ndim != 0:
        raise ValueError(
            f"loss_func ({callable_name(loss_func)}) returned a tensor of shape "
            f"{tuple(loss.shape)}; it must be a scalar (0-dim): reduce it, e.g. with "
            "reduction='mean'"
        )
    return loss


def callable_name(obj: object) -> str:
    return str(getattr(obj, "__qualname__", None) or type(obj).__name__)


def batch_size(xb: Any, yb: Any) -> int:
    if isinstance(xb, Tensor) and xb.ndim:
        return xb.shape[0]  # what len(xb) returns, without Tensor.__len__'s Python checks
    return len(yb)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def move_to(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """`trainkit.to_device` with `device` already canonical; `fit` calls it twice per step."""
    if isinstance(obj, Tensor):  # the common case, without building a closure
        return obj if obj.device == device else obj.to(device, non_blocking=non_blocking)
    return map_tensors(
        obj, lambda t: t if t.device == device else t.to(device, non_blocking=non_blocking)
    )


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """`obj` with `fn` applied to every tensor in it, containers rebuilt with the same type."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [map_tensors(o, fn) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def canonical(device: torch.device) -> torch.device:
    # "cuda" and "cuda:0" compare unequal; give bare accelerator names their current index so
    # the "already there" check in move_to is a plain comparison.
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device
