"""Checkpoints: atomic writes, damage detection, exact resume, and loading that never runs code.

Writing: `torch.save` to a temporary file in the same directory, flushed, fsynced and renamed
over the target (then the directory is fsynced), so a crash leaves either the old file or the
new one, never half of one.

Reading checks everything before it changes anything passed in:
1. the archive, from the zip's own headers and checksums: every record's CRC-32 is verified and
   compressed records are refused (`torch.save` never compresses), so a damaged file, or one
   that would inflate to gigabytes, is refused before anything is unpickled or allocated;
2. `torch.load(weights_only=True)`, which refuses pickled code;
3. every field of the checkpoint (types, ranges, random-generator states);
4. the objects to restore: their classes against those recorded, parameter groups, state keys,
   weight names and shapes, and for `fit(resume=...)` the training loader.
Only then is anything restored.
"""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from trainkit._archive import (
    atomic_save,
    atomic_write,
    check_safe,
    load_file,
    load_safetensors,
    read_checkpoint,
    safetensors_module,
    save_with_shards,
)
from trainkit._checks import (
    check_fields,
    check_kinds,
    check_model,
    check_targets,
    check_tensors,
    class_name,
    device_of,
    is_checkpoint,
    restore,
    unwrap,
)
from trainkit._format import FORMAT_MARKER, FORMAT_VERSION, Checkpoint, CheckpointError
from trainkit._rng import rng_state
from trainkit._sharded import full_weights, is_sharded, write_shards
from trainkit._types import Scheduler
from trainkit.distributed import all_gather, is_main_process

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
    "save_weights",
    "seed_everything",
    "unsafe_load_pickled_model",
]

M = TypeVar("M", bound=nn.Module)
PathLike = str | os.PathLike[str]


def seed_everything(seed: int) -> int:
    """Seed Python's `random`, NumPy's global generator and torch (CPU and every CUDA device).

    Args:
        seed: An integer in `[0, 2**32)`.

    Returns:
        `seed`, so it can be logged.

    Raises:
        ValueError: `seed` is not an integer in range.

    Example:
        >>> seed_everything(42)
        42
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed_everything(seed=...): expected an int in [0, 2**32), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    return seed


def save_weights(path: PathLike, model: nn.Module) -> Path:
    """Write the model's weights (its `state_dict`) atomically.

    A path ending in `.safetensors` is written in the safetensors format (needs the optional
    `safetensors` package: `pip install trainkit[safetensors]`), loadable by other tools; any
    other path with `torch.save`.

    A model sharded by `fully_shard`: a collective (every process calls it); the whole
    weights are gathered to rank 0, which alone writes them.

    Args:
        path: The file to write; its directory must exist.
        model: The model (a `DistributedDataParallel` or compiled wrapper is unwrapped).

    Returns:
        The path written.

    Raises:
        OSError: the file cannot be written; the message names it, and a previous file at
            `path` is left as it was.
        ModuleNotFoundError: `.safetensors` asked for without the package installed.
        ValueError: torch was told not to write checksums
            (`torch.serialization.set_crc32_options(False)`).

    Example:
        >>> save_weights("model_weights.pth", model)  # doctest: +SKIP
    """
    path = Path(path)
    if is_sharded(model):  # gathered whole on rank 0, which alone writes
        weights = full_weights(model)
        if not is_main_process():
            return path
    else:
        weights = unwrap(model).state_dict()
    if path.suffix == ".safetensors":
        safetensors_torch = safetensors_module()
        tensors = {k: v.detach().contiguous().clone() for k, v in weights.items()}
        atomic_write(path, lambda f: f.write(safetensors_torch.save(tensors)))
    else:
        atomic_save(weights, path)
    return path


def load_weights(
    path: PathLike,
    model: M,
    *,
    strict: bool = True,
    map_location: torch.device | str | None = None,
) -> M:
    """Load weights written by `save_weights` (or a plain `torch.save(model.state_dict())`).

    Only tensors are read (`weights_only=True`, or the safetensors format): a file holding
    pickled code is refused. The records of a `torch.save` archive are checked against their
    CRC-32 checksums first. A checkpoint written by `save_checkpoint` is accepted too (its
    model weights are used), a sharded one as `load_checkpoint` says.

    Args:
        path: A `.safetensors` file, or a `torch.save` file of a state dict.
        model: The model to load into, in place.
        strict: Refuse missing or unexpected keys.
        map_location: Where to put the tensors while loading (default: the model's device,
            so a file written on a GPU loads on a CPU-only machine).

    Returns:
        `model`.

    Raises:
        CheckpointError: the file is missing, damaged, unsafe, or does not match the model;
            the message names the file and the missing / unexpected / wrong-shape keys.

    Example:
        >>> load_weights("model_weights.pth", NeuralNetwork())  # doctest: +SKIP
    """
    path = Path(path)
    location = map_location if map_location is not None else device_of(model)
    if path.suffix == ".safetensors":
        weights: Any = load_safetensors(path, location)
    else:
        loaded = read_on_every_rank(model, lambda: load_file(path, location, require_zip=False))
        if is_checkpoint(loaded) and "sharded" in loaded:  # the weights are in its shards
            check_fields(path, loaded)
            check_targets(path, loaded, model, {}, strict)
            restore(path, loaded, model, {}, {}, strict)
            return model
        weights = loaded["model"] if is_checkpoint(loaded) else loaded
        check_tensors(path, weights, "the weights")
    if is_sharded(model):
        raise CheckpointError(
            f"{path}: whole weights cannot be loaded into a model already sharded by "
            "fully_shard; load them before sharding it"
        )
    checked = check_model(path, model, weights, strict)
    unwrap(model).load_state_dict(checked, strict=strict)
    return model


def read_on_every_rank(model: nn.Module, read: Callable[[], Any]) -> Any:
    """`read()`; for a sharded model (loading it is a collective), every rank's outcome
    compared first, so that one rank failing to read fails every rank instead of leaving the
    others waiting."""
    if not is_sharded(model):
        return read()
    problem, data = None, None
    try:
        data = read()
    except (CheckpointError, OSError) as err:
        problem = f"{type(err).__name__}: {err}"
    failed = [f"rank {r}: {p}" for r, p in enumerate(all_gather(problem)) if p is not None]
    if failed:
        raise CheckpointError(
            f"not every process can read the checkpoint ({'; '.join(failed)}); every process "
            "loads a sharded model, so each must read it (a filesystem they all share)"
        )
    return data


def save_checkpoint(
    path: PathLike,
    *,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    scheduler: LRScheduler | ReduceLROnPlateau | None = None,
    scaler: torch.amp.GradScaler | None = None,
    epoch: int,
    step: int,
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Write a checkpoint atomically: model, optimizer, scheduler and scaler state and their
    classes, position and random-number-generator states, plus `extra` values.

    `ModelCheckpoint` and `fit(resume=...)` use the same format, adding what an exact resume
    of `fit` needs (history, callback states, the epoch's data order, the training loader).
    A model sharded by `fully_shard`: a collective; every process writes its shards of the
    model and optimizer with `torch.distributed.checkpoint` into `<path>.shards-<token>/`,
    then rank 0 writes `path`, naming them (see the distributed guide).

    Args:
        path: The file to write; its directory must exist.
        model: The model (a `DistributedDataParallel` or compiled wrapper is unwrapped).
        optimizer: A `torch.optim.Optimizer`; its state is saved when given.
        scheduler: A `torch.optim.lr_scheduler` scheduler; its state is saved when given.
        scaler: A `torch.amp.GradScaler`; its state is saved when given.
        epoch: The epoch's index (counted from 0).
        step: Training batches completed in that epoch.
        extra: Further values by name: tensors, numbers, strings, and lists / tuples / dicts
            of them (nothing else can be loaded safely).

    Returns:
        The path written.

    Raises:
        TypeError: an object of the wrong kind (`optimizer=` given a scheduler, say), or an
            `extra` value that could not be loaded safely (its key is named).
        ValueError: `epoch` or `step` is not an integer >= 0, or torch was told not to write
            checksums (`torch.serialization.set_crc32_options(False)`).
        OSError: the file cannot be written; the message names it, and a previous file at
            `path` is left as it was.

    Example:
        >>> save_checkpoint("a.ckpt", model=model, optimizer=opt, epoch=3, step=0,
        ...                 extra={"note": "lr 0.1"})  # doctest: +SKIP
    """
    check_kinds("save_checkpoint", model, optimizer, scheduler, scaler)
    for name, count in (("epoch", epoch), ("step", step)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"save_checkpoint({name}=...): expected an int >= 0, got {count!r}")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(
            f"save_checkpoint(extra=...): expected a mapping of names to values, "
            f"got {type(extra).__name__}"
        )
    values = dict(extra or {})
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"save_checkpoint(extra=...): keys must be strings, got {key!r}")
        check_safe(value, f"save_checkpoint(extra[{key!r}])")
    if is_sharded(model):  # every process writes its shards; rank 0 the file
        manifest = write_shards(Path(path), model, optimizer)
        if not is_main_process():
            return Path(path)
        payload = build_payload(model, optimizer, scheduler, scaler, epoch, step, extra=values)
        return save_with_shards(payload, Path(path), manifest)
    payload = build_payload(model, optimizer, scheduler, scaler, epoch, step, extra=values)
    return atomic_save(payload, Path(path))


def load_checkpoint(
    path: PathLike,
    *,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    scheduler: LRScheduler | ReduceLROnPlateau | None = None,
    scaler: torch.amp.GradScaler | None = None,
    map_location: torch.device | str | None = None,
    strict: bool = True,
) -> Checkpoint:
    """Read a checkpoint safely and restore what is passed in: all of it, or nothing.

    The archive's checksums, every field, the recorded classes, the optimizer's parameter
    groups, the state keys and the weights' names and shapes are checked before anything is
    restored, so a failed load leaves every object passed in as it was. Random-number-generator
    states are returned, not applied (`fit(resume=...)` applies them).

    A checkpoint of a model sharded by `fully_shard` (a file naming its shards beside it)
    loads into a plain model in one process, or into a sharded model under any number of
    processes: then it is a collective (every process calls it).

    Args:
        path: A file written by `save_checkpoint` or `ModelCheckpoint`.
        model: Restored from the checkpoint (a wrapper is unwrapped; a `module.` prefix written
            by `DistributedDataParallel` is handled).
        optimizer: Restored when given; an error if the checkpoint has none, or one of another
            class.
        scheduler: Restored when given; an error if the checkpoint has none, or one of another
            class.
        scaler: Restored when given; an error if the checkpoint has none.
        map_location: Where to put the tensors while loading (default: the model's device, so
            a checkpoint written on a GPU loads on a CPU-only machine).
        strict: Refuse missing or unexpected model keys.

    Returns:
        A `Checkpoint` record of what was read and restored.

    Raises:
        CheckpointError: the file is missing, damaged (a checksum fails), unsafe (would run
            code), not a trainkit checkpoint, of another format version, has a field of the
            wrong type, holds the state of another class than the object given (both named),
            does not match the model (the missing / unexpected / wrong-shape keys are named),
            or lacks a state asked for. Nothing passed in has been changed.

    Example:
        >>> ckpt = load_checkpoint("runs/last.ckpt", model=model, optimizer=opt)  # doctest: +SKIP
    """
    path = Path(path)
    check_kinds("load_checkpoint", model, optimizer, scheduler, scaler)
    location = map_location if map_location is not None else device_of(model)
    data = read_on_every_rank(model, lambda: read_checkpoint(path, location))
    targets = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    weights = check_targets(path, data, model, targets, strict)
    return restore(path, data, model, targets, weights, strict)


def unsafe_load_pickled_model(path: PathLike) -> Any:
    """UNSAFE: unpickle a whole model saved with `torch.save(model, path)`, as the Quickstart
    shows. Unpickling runs whatever code the file holds: use it only on files you made
    yourself. Prefer `save_weights` / `load_weights`.

    Args:
        path: The file.

    Returns:
        The unpickled object.

    Raises:
        CheckpointError: the file is missing or not a torch file.

    Example:
        >>> model = unsafe_load_pickled_model("model.pth")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        return torch.load(path, weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: cannot be read: {err}") from err


def build_payload(
    model: nn.Module,
    optimizer: Optimizer | None,
    scheduler: Scheduler | None,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    step: int,
    **run: Any,
) -> dict[str, Any]:
    """The fields of a checkpoint file, as `save_checkpoint` writes them; `run` sets those of
    `fit`'s run state (`trainkit._run_state`)."""
    from trainkit import __version__

    objects = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    sharded = is_sharded(model)  # then model and optimizer states are in the shards
    states = {
        name: obj.state_dict()
        if obj is not None and not (sharded and name == "optimizer")
        else None
        for name, obj in objects.items()
    }
    return {
        "format": FORMAT_MARKER,
        "format_version": FORMAT_VERSION,
        "trainkit_version": __version__,
        "classes": {
            "model": class_name(unwrap(model)),
            **{name: None if obj is None else class_name(obj) for name, obj in objects.items()},
        },
        "model": {} if sharded else unwrap(model).state_dict(),
        **states,
        "epoch": epoch,
        "step": step,
        "global_step": 0,
        "epoch_complete": False,
        "rng": rng_state(),
        "epoch_rng": None,
        "history": {"records": [], "tensors": []},
        "callbacks": {},
        "train_loss": None,
        "loader": None,
        "extra": {},
        **run,
    }
