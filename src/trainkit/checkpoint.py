"""Checkpoints: atomic writes, exact resume, and loading that never runs code from a file.

Everything is written with `torch.save` to a temporary file in the same directory, flushed,
fsynced and renamed over the target (then the directory is fsynced), so a crash leaves either
the old file or the new one, never half of one. Everything is read with
`torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "Stateful",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
    "save_weights",
    "seed_everything",
    "unsafe_load_pickled_model",
]

FORMAT_VERSION = 1
"""The checkpoint format this trainkit writes and the newest it reads."""

_FORMAT = "trainkit.checkpoint"
M = TypeVar("M", bound=nn.Module)
PathLike = str | os.PathLike[str]


class Stateful(Protocol):
    """Anything with `state_dict()` / `load_state_dict()`: modules, optimizers, schedulers,
    `GradScaler`s and callbacks."""

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> object: ...


class CheckpointError(ValueError):
    """A file that cannot be loaded as asked: unsafe, damaged, of another format or model.

    Example:
        >>> try:
        ...     load_checkpoint("missing.ckpt", model=torch.nn.Linear(2, 2))
        ... except CheckpointError as err:
        ...     print(str(err).split(":")[0])
        missing.ckpt
    """


@dataclass
class Checkpoint:
    """What `load_checkpoint` read and restored.

    Attributes:
        path: The file.
        format_version: Its format version.
        epoch: The epoch it was written in (counted from 0).
        step: Training batches completed in that epoch.
        global_step: Optimizer steps since the start of the run.
        epoch_complete: Whether `epoch` had ended (resume starts at the next one).
        restored: What was loaded into the objects passed in (`"model"`, `"optimizer"`, ...).
        extra: The `**extra` values given to `save_checkpoint`.
        history: The run's History records so far (empty outside `fit`).
        callbacks: Saved callback states, by callback key.
        rng: Random-number-generator states at the moment of saving.

    Example:
        >>> ckpt = load_checkpoint("runs/last.ckpt", model=model)  # doctest: +SKIP
        >>> ckpt.epoch, ckpt.restored  # doctest: +SKIP
        (3, ['model'])
    """

    path: Path
    format_version: int
    epoch: int
    step: int
    global_step: int
    epoch_complete: bool
    restored: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    epoch_rng: dict[str, Any] | None = None
    train_loss: dict[str, Any] | None = None


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

    Args:
        path: The file to write; its directory must exist.
        model: The model (a `DistributedDataParallel` or compiled wrapper is unwrapped).

    Returns:
        The path written.

    Raises:
        OSError: the file cannot be written; the message names it, and a previous file at
            `path` is left as it was.
        ModuleNotFoundError: `.safetensors` asked for without the package installed.

    Example:
        >>> save_weights("model_weights.pth", model)  # doctest: +SKIP
    """
    path = Path(path)
    weights = _unwrap(model).state_dict()
    if path.suffix == ".safetensors":
        safetensors_torch = _safetensors()
        tensors = {k: v.detach().contiguous().clone() for k, v in weights.items()}
        _atomic_write(path, lambda f: f.write(safetensors_torch.save(tensors)))
    else:
        _atomic_write(path, lambda f: torch.save(weights, f))
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
    pickled code is refused. A checkpoint written by `save_checkpoint` is accepted too (its
    model weights are used).

    Args:
        path: A `.safetensors` file, or a `torch.save` file of a state dict.
        model: The model to load into, in place.
        strict: Refuse missing or unexpected keys.
        map_location: Where to put the tensors while loading (default: where they were saved).

    Returns:
        `model`.

    Raises:
        CheckpointError: the file is missing, damaged, unsafe, or does not match the model;
            the message names the file and the missing / unexpected / wrong-shape keys.

    Example:
        >>> load_weights("model_weights.pth", NeuralNetwork())  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        device = str(map_location) if map_location is not None else "cpu"
        safetensors_torch = _safetensors()
        try:
            weights: Mapping[str, Any] = safetensors_torch.load_file(str(path), device=device)
        except Exception as err:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from err
    else:
        loaded = _safe_load(path, map_location)
        weights = loaded["model"] if _is_checkpoint(loaded) else loaded
    _load_model(path, model, weights, strict)
    return model


def save_checkpoint(
    path: PathLike,
    *,
    model: nn.Module,
    optimizer: Stateful | None = None,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    epoch: int,
    step: int,
    **extra: Any,
) -> Path:
    """Write a checkpoint atomically: model, optimizer, scheduler and scaler state, position
    and random-number-generator states, plus `extra` values.

    `ModelCheckpoint` and `fit(resume=...)` use the same format, adding what an exact resume
    of `fit` needs (history, callback states, the epoch's data order).

    Args:
        path: The file to write; its directory must exist.
        model: The model (a `DistributedDataParallel` or compiled wrapper is unwrapped).
        optimizer: Its `state_dict()` is saved when given.
        scheduler: Its `state_dict()` is saved when given.
        scaler: The `GradScaler`'s `state_dict()` is saved when given.
        epoch: The epoch (counted from 0).
        step: Training batches completed in that epoch.
        **extra: Further values: tensors, numbers, strings, and lists / tuples / dicts of them
            (nothing else can be loaded safely).

    Returns:
        The path written.

    Raises:
        TypeError: an `extra` value that could not be loaded safely (its key is named).
        OSError: the file cannot be written; the message names it, and a previous file at
            `path` is left as it was.

    Example:
        >>> save_checkpoint("a.ckpt", model=model, optimizer=opt, epoch=3, step=0)  # doctest: +SKIP
    """
    for key, value in extra.items():
        _check_safe(value, f"save_checkpoint({key}=...)")
    payload = _payload(model, optimizer, scheduler, scaler, epoch, step, extra=extra)
    return _atomic_save(payload, Path(path))


def load_checkpoint(
    path: PathLike,
    *,
    model: nn.Module,
    optimizer: Stateful | None = None,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    map_location: torch.device | str | None = None,
    strict: bool = True,
) -> Checkpoint:
    """Read a checkpoint safely (`weights_only=True`) and restore what is passed in.

    Random-number-generator states are returned, not applied (`fit(resume=...)` applies them).

    Args:
        path: A file written by `save_checkpoint` or `ModelCheckpoint`.
        model: Restored from the checkpoint (a wrapper is unwrapped; a `module.` prefix written
            by `DistributedDataParallel` is handled).
        optimizer: Restored when given; an error if the checkpoint has none.
        scheduler: Restored when given; an error if the checkpoint has none.
        scaler: Restored when given; an error if the checkpoint has none.
        map_location: Where to put the tensors while loading (default: where they were saved).
        strict: Refuse missing or unexpected model keys.

    Returns:
        A `Checkpoint` record of what was read and restored.

    Raises:
        CheckpointError: the file is missing, damaged, unsafe (would run code), not a trainkit
            checkpoint, of a newer format, or does not match the model (the missing /
            unexpected / wrong-shape keys are named), or lacks a state asked for.

    Example:
        >>> ckpt = load_checkpoint("runs/last.ckpt", model=model, optimizer=opt)  # doctest: +SKIP
    """
    path = Path(path)
    data = _safe_load(path, map_location)
    if not _is_checkpoint(data):
        raise CheckpointError(
            f"{path}: not a trainkit checkpoint (no format marker); for a plain state dict "
            "use load_weights(path, model)"
        )
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is newer than this trainkit reads "
            f"({FORMAT_VERSION}); upgrade trainkit to load it"
        )
    _load_model(path, model, data["model"], strict)
    restored = ["model"]
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is None:
            continue
        if data.get(name) is None:
            raise CheckpointError(f"{path}: the checkpoint holds no {name} state to restore")
        try:
            target.load_state_dict(data[name])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise CheckpointError(f"{path}: the {name} state does not fit: {err}") from err
        restored.append(name)
    return Checkpoint(
        path=path,
        format_version=version,
        epoch=data["epoch"],
        step=data["step"],
        global_step=data.get("global_step", 0),
        epoch_complete=data.get("epoch_complete", False),
        restored=restored,
        extra=data.get("extra", {}),
        history=data.get("history") or {},
        callbacks=data.get("callbacks") or {},
        rng=data.get("rng") or {},
        epoch_rng=data.get("epoch_rng"),
        train_loss=data.get("train_loss"),
    )


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


# --- internals shared with ModelCheckpoint and fit(resume=...) ------------------------------------


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) generator states, in loadable types."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            **np_state,
            "state": {
                **np_state["state"],
                "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            },
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {
        **np_state["state"],
        "key": np_state["state"]["key"].numpy().astype(np.uint32),
    }
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _payload(
    model: nn.Module,
    optimizer: Stateful | None,
    scheduler: Stateful | None,
    scaler: Stateful | None,
    epoch: int,
    step: int,
    **run: Any,
) -> dict[str, Any]:
    from trainkit import __version__

    return {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "trainkit_version": __version__,
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "rng": rng_state(),
        **run,
    }


def _atomic_save(payload: Any, path: Path) -> Path:
    return _atomic_write(path, lambda f: torch.save(payload, f))


def _atomic_write(path: Path, write: Any) -> Path:
    """Write through a temporary file in the same directory, fsync, rename, fsync the directory."""
    # unique per process, thread and call: two writers of one path never share a temporary file
    unique = f"{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}"
    tmp = path.with_name(f".{path.name}.{unique}.tmp")
    try:
        with open(tmp, "wb") as f:
            writer = _Writer(f)
            try:
                write(writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None  # torch.save hides a failed write (a full disk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        _remove(tmp)
        raise OSError(err.errno, f"could not write {path}: {err.strerror or err}") from err
    except BaseException:
        _remove(tmp)
        raise
    return path


class _Writer:
    """A file's `write`, remembering the first OSError (torch.save reports it as RuntimeError)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return int(self.f.write(data))
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def _remove(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safe_load(path: Path, map_location: torch.device | str | None) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain values, and "
            "loading them could run code. If you made this file yourself with "
            "torch.save(model, ...), use unsafe_load_pickled_model(path)."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: damaged or not a torch file: {err}") from err


def _is_checkpoint(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == _FORMAT


def _load_model(path: Path, model: nn.Module, weights: Mapping[str, Any], strict: bool) -> None:
    target = _unwrap(model)
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{path}: holds a {type(weights).__name__}, not model weights")
    expected = target.state_dict()
    if all(k.startswith("module.") for k in weights) and not any(
        k.startswith("module.") for k in expected
    ):
        weights = {k.removeprefix("module."): v for k, v in weights.items()}  # saved under DDP
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(weights)
        if isinstance(weights[k], Tensor) and weights[k].shape != expected[k].shape
    )
    problems = [f"wrong shape: {', '.join(shapes[:10])}"] if shapes else []
    if strict:
        problems += [f"missing keys: {', '.join(missing[:10])}"] if missing else []
        problems += [f"unexpected keys: {', '.join(unexpected[:10])}"] if unexpected else []
    if problems:
        raise CheckpointError(
            f"{path}: the weights do not match {type(target).__name__}: " + "; ".join(problems)
        )
    target.load_state_dict(dict(weights), strict=strict)


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(inner, nn.parallel.DistributedDataParallel | nn.DataParallel):
        inner = inner.module
    assert isinstance(inner, nn.Module)
    return inner


def _check_safe(value: Any, where: str) -> None:
    if value is None or isinstance(value, bool | int | float | str | Tensor | torch.dtype):
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_safe(item, where)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_safe(k, where)
            _check_safe(v, where)
        return
    raise TypeError(
        f"{where}: a {type(value).__name__} cannot be loaded safely; use tensors, numbers, "
        "strings, and lists / tuples / dicts of them"
    )


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the .safetensors format needs the safetensors package: "
            "pip install 'trainkit[safetensors]'"
        ) from err
    return safetensors.torch


def run_payload(state: Any, *, epoch_complete: bool) -> dict[str, Any]:
    """Everything an exact resume of `fit` needs, from its `TrainState`."""
    callbacks = {}
    for key, cb in callback_keys(state.callbacks).items():
        sd = cb.state_dict()
        if sd:
            _check_safe(sd, f"{key}.state_dict()")
            callbacks[key] = sd
    partial = not epoch_complete and state.train_loss is not None
    return _payload(
        state.model, state.opt, state.scheduler, state.scaler, state.epoch, state.batches_done,
        global_step=state.global_step,
        epoch_complete=epoch_complete,
        epoch_rng=state.epoch_rng,
        history=state.history.state_dict(),
        callbacks=callbacks,
        train_loss=state.train_loss.state_dict() if partial else None,
        extra={},
    )  # fmt: skip


def save_run(path: Path, state: Any, *, epoch_complete: bool) -> Path:
    """Write `run_payload(state)` atomically to `path`."""
    return _atomic_save(run_payload(state, epoch_complete=epoch_complete), path)


def callback_keys(callbacks: list[Any]) -> dict[str, Any]:
    """Stable names for a run's callbacks: the class name, `#2`, `#3`... for repeats."""
    keys: dict[str, Any] = {}
    for cb in callbacks:
        base = type(cb).__name__
        key, n = base, 1
        while key in keys:
            n += 1
            key = f"{base}#{n}"
        keys[key] = cb
    return keys


def resume_path(resume: PathLike) -> Path:
    """The checkpoint file `fit(resume=...)` means: a file, or `last.ckpt` in a directory.

    Raises:
        CheckpointError: nothing to resume from there.
    """
    path = Path(resume)
    if path.is_dir():
        last = path / "last.ckpt"
        if not last.is_file():
            found = sorted(p.name for p in path.glob("*.ckpt"))
            raise CheckpointError(
                f"fit(resume={str(resume)!r}): no last.ckpt in that directory "
                f"(checkpoints there: {found or 'none'})"
            )
        return last
    if not path.is_file():
        raise CheckpointError(f"fit(resume={str(resume)!r}): no such file or directory")
    return path


def loader_generators(dl: Any) -> list[torch.Generator]:
    """Generators that decide a loader's data order (its own, its sampler's, a wrapped one's)."""
    found: list[torch.Generator] = []
    seen: set[int] = set()
    for _ in range(8):  # through a few layers of wrappers
        for owner in (dl, getattr(dl, "sampler", None), getattr(dl, "batch_sampler", None)):
            g = getattr(owner, "generator", None)
            if isinstance(g, torch.Generator) and id(g) not in seen:
                seen.add(id(g))
                found.append(g)
        inner = getattr(dl, "dl", None)
        if inner is None:
            break
        dl = inner
    return found
