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

import contextlib
import dataclasses
import os
import pickle
import random
import secrets
import threading
import zipfile
from collections.abc import Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from trainkit.distributed import (
    all_gather,
    broadcast_buffers,
    broadcast_from_main,
    gather_to_main,
    is_main_process,
    world_size,
)
from trainkit.distributed import rank as this_rank

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

FORMAT_VERSION = 2
"""The checkpoint format this trainkit writes, and the only one it reads (version 1 was written
by pre-releases, without the class and loader records)."""

_FORMAT = "trainkit.checkpoint"
M = TypeVar("M", bound=nn.Module)
PathLike = str | os.PathLike[str]
_Scheduler = LRScheduler | ReduceLROnPlateau
_STATES = ("optimizer", "scheduler", "scaler")


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
        epoch: The index of the epoch it was written in (counted from 0, as `TrainState.epoch`).
        step: Training batches completed in that epoch.
        global_step: Optimizer steps since the start of the run.
        epoch_complete: Whether `epoch` had ended (resume starts at the next one).
        restored: What was loaded into the objects passed in (`"model"`, `"optimizer"`, ...).
        extra: The `extra` mapping given to `save_checkpoint`.
        history: The run's History records so far (empty outside `fit`).
        callbacks: Saved callback states, by callback key.
        rng: Random-number-generator states at the moment of saving.
        epoch_rng: The generator states from just before the epoch's data order was drawn.
        train_loss: The epoch's running training loss (a mid-epoch checkpoint of `fit`).
        classes: The classes of the saved model, optimizer, scheduler and scaler
            (`"torch.optim.sgd.SGD"`, ...; `None` for those not saved).
        loader: What identifies the training loader of the run (`fit` checkpoints only):
            dataset length, batch size, number of batches, sampler, world size, ...
        ranks: Under a process group, each rank's `rng`, `epoch_rng` and `train_loss`, by rank
            (`fit` restores each on its own rank when resumed by as many processes); `None`
            for a one-process run.

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
    classes: dict[str, str | None] = field(default_factory=dict)
    loader: dict[str, Any] | None = None
    ranks: list[dict[str, Any]] | None = None


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
        ValueError: torch was told not to write checksums
            (`torch.serialization.set_crc32_options(False)`).

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
        _atomic_save(weights, path)
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
    model weights are used).

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
    location = map_location if map_location is not None else _device_of(model)
    if path.suffix == ".safetensors":
        weights: Any = _load_safetensors(path, location)
    else:
        loaded = _load_file(path, location, require_zip=False)
        weights = loaded["model"] if _is_checkpoint(loaded) else loaded
        _check_tensors(path, weights, "the weights")
    checked = _check_model(path, model, weights, strict)
    _unwrap(model).load_state_dict(checked, strict=strict)
    return model


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
    _check_kinds("save_checkpoint", model, optimizer, scheduler, scaler)
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
        _check_safe(value, f"save_checkpoint(extra[{key!r}])")
    payload = _payload(model, optimizer, scheduler, scaler, epoch, step, extra=values)
    return _atomic_save(payload, Path(path))


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
    _check_kinds("load_checkpoint", model, optimizer, scheduler, scaler)
    data = read_checkpoint(path, map_location if map_location is not None else _device_of(model))
    targets = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    weights = _check_targets(path, data, model, targets, strict)
    return _restore(path, data, model, targets, weights, strict)


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
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _numpy_state(saved: Mapping[str, Any]) -> dict[str, Any]:
    np_state = dict(saved)
    np_state["state"] = {
        **np_state["state"],
        "key": np_state["state"]["key"].cpu().numpy().astype(np.uint32),
    }
    return np_state


def _payload(
    model: nn.Module,
    optimizer: Optimizer | None,
    scheduler: _Scheduler | None,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    step: int,
    **run: Any,
) -> dict[str, Any]:
    from trainkit import __version__

    objects = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    return {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "trainkit_version": __version__,
        "classes": {
            "model": _class_name(_unwrap(model)),
            **{name: None if obj is None else _class_name(obj) for name, obj in objects.items()},
        },
        "model": _unwrap(model).state_dict(),
        **{name: obj.state_dict() if obj is not None else None for name, obj in objects.items()},
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


def _atomic_save(payload: Any, path: Path) -> Path:
    if not torch.serialization.get_crc32_options():
        raise ValueError(
            f"cannot write {path}: torch.serialization.set_crc32_options(False) is in effect, "
            "and trainkit checks every record's CRC-32 when loading; set it back to True"
        )
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


def read_checkpoint(path: Path, map_location: torch.device | str) -> dict[str, Any]:
    """The checkpoint at `path`, its archive verified, loaded safely and every field checked.

    Raises:
        CheckpointError: anything wrong with the file (named, with the file).
    """
    data: dict[str, Any] = _load_file(path, map_location, require_zip=True)
    _check_fields(path, data)
    return data


_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 20
_DOS_DIRECTORY = 0x10  # the directory bit of a zip record's external attributes


def _load_file(path: Path, map_location: torch.device | str, *, require_zip: bool) -> Any:
    """Verify the archive (checksums, no compression), then `torch.load(weights_only=True)`."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read: {err}") from err
    if head == _ZIP_MAGIC or zipfile.is_zipfile(path):
        _verify_archive(path)
    elif require_zip:
        raise CheckpointError(
            f"{path}: damaged or not a trainkit checkpoint: not a torch.save zip archive"
        )  # a file in torch's legacy format (not a zip) has no checksums: weights only
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain values, and "
            "loading them could run code. If you made this file yourself with "
            "torch.save(model, ...), use unsafe_load_pickled_model(path)."
        ) from err
    except Exception as err:  # whatever a damaged file makes torch raise, named as damage
        raise CheckpointError(
            f"{path}: damaged or not a torch file: {type(err).__name__}: {err}"
        ) from err


def _verify_archive(path: Path) -> None:
    """Check a `torch.save` zip archive from its own headers before anything is unpickled.

    Every record must be stored uncompressed (`torch.save` never compresses; a compressed
    record could inflate to gigabytes before any shape is checked: a deflate bomb) and must
    match the CRC-32 the archive records for it, read in 1 MiB chunks (bounded memory).
    """
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            for info in records:
                if info.is_dir() or info.external_attr & _DOS_DIRECTORY:
                    # torch's reader (miniz) reads a "directory" as empty, not as its bytes
                    raise CheckpointError(
                        f"{path}: damaged: record {info.filename!r} is marked as a directory"
                    )
                if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                    raise CheckpointError(
                        f"{path}: refused: record {info.filename!r} is compressed "
                        f"({_bytes(info.compress_size)} inflating to {_bytes(info.file_size)}); "
                        "torch.save never compresses, so the file is damaged or crafted"
                    )
            if sum(info.file_size for info in records) > size:
                raise CheckpointError(
                    f"{path}: damaged: its records add up to more than the file's {size} bytes"
                )
            for info in records:
                with archive.open(info) as record:  # raises at the end on a CRC-32 mismatch
                    while record.read(_CHUNK):
                        pass
    except CheckpointError:
        raise
    except Exception as err:  # zipfile raises BadZipFile, but also OSError, ValueError, ...
        hint = ""
        if "CRC" in str(err) and not torch.serialization.get_crc32_options():
            hint = " (torch.serialization.set_crc32_options(False) writes no checksums)"
        raise CheckpointError(
            f"{path}: damaged: the archive fails its check ({type(err).__name__}: {err}){hint}"
        ) from err


def _bytes(n: int) -> str:
    if n < 1000:
        return f"{n} bytes"
    for power, unit in ((3, "GB"), (2, "MB"), (1, "KB")):
        if n >= 1000**power:
            return f"{n / 1000**power:.1f} {unit}"
    raise AssertionError  # unreachable: n >= 1000


def _load_safetensors(path: Path, map_location: torch.device | str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    # a safetensors file: an 8-byte header length, then the header, a JSON object
    if head[8:9] != b"{" and (head[:4] == _ZIP_MAGIC or head[:1] == b"\x80"):
        kind = "a torch.save zip archive" if head[:4] == _ZIP_MAGIC else "a pickle"
        raise CheckpointError(
            f"{path}: named .safetensors but it is {kind}, not a safetensors file; rename it "
            "(e.g. to .pth) and load it with load_weights, which reads only tensors from it"
        )
    safetensors_torch = _safetensors()
    try:
        return safetensors_torch.load_file(str(path), device=str(map_location))
    except Exception as err:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from err


def _is_checkpoint(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == _FORMAT


_FIELDS = (
    "classes", "model", *_STATES, "epoch", "step", "global_step", "epoch_complete", "rng",
    "epoch_rng", "history", "callbacks", "train_loss", "loader", "extra",
)  # fmt: skip
_RANK_FIELDS = ("rng", "epoch_rng", "train_loss")
_LOADER_FIELDS = (
    "loader", "dataset_length", "batch_size", "num_batches", "drop_last", "sampler",
    "generators", "world_size", "persistent_workers",
)  # fmt: skip


def _check_fields(path: Path, data: Any) -> None:
    """Every field of a checkpoint has the type and range `save_checkpoint` writes."""
    if not _is_checkpoint(data):
        raise CheckpointError(
            f"{path}: not a trainkit checkpoint (no format marker); for a plain state dict "
            "use load_weights(path, model)"
        )
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise CheckpointError(f"{path}: damaged: field names that are not strings: {odd[:5]!r}")
    if "format_version" not in data:
        raise CheckpointError(f"{path}: damaged or crafted: no format_version field")
    version = data["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(
            f"{path}: format_version {version!r} was never written by any trainkit "
            f"(versions are 1 to {FORMAT_VERSION}): damaged or crafted"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this trainkit reads "
            f"({FORMAT_VERSION}); upgrade trainkit to load it"
        )
    if version < FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} was written by a pre-release of "
            f"trainkit; this one reads version {FORMAT_VERSION}, which records the classes and "
            "the training loader a safe resume needs. Start a new run; its weights still load "
            "with load_weights(path, model)"
        )
    missing = [name for name in _FIELDS if name not in data]
    if missing:
        raise CheckpointError(f"{path}: damaged or crafted: missing fields {', '.join(missing)}")

    def bad(name: str, expected: str) -> CheckpointError:
        value = data[name]
        shown = repr(value) if isinstance(value, int | float | str | None) else type(value).__name__
        return CheckpointError(f"{path}: field {name!r} is {shown}; expected {expected}")

    _check_tensors(path, data["model"], "field 'model'")
    for name in ("epoch", "step", "global_step"):
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(name, "an int >= 0")
    if not isinstance(data["epoch_complete"], bool):
        raise bad("epoch_complete", "True or False")
    classes = data["classes"]
    if not isinstance(classes, dict) or set(classes) != {"model", *_STATES}:
        raise bad("classes", "a dict naming the model, optimizer, scheduler and scaler classes")
    for name in ("model", *_STATES):
        saved = data[name]
        if name != "model" and saved is not None and not _str_dict(saved):
            raise bad(name, "a state dict (string keys) or None")
        if not (isinstance(classes[name], str) or (classes[name] is None and saved is None)):
            raise CheckpointError(f"{path}: field 'classes' names no class for the {name} state")
    for name in ("extra", "callbacks"):
        if not _str_dict(data[name]):
            raise bad(name, "a dict with string keys")
    if not all(_str_dict(state) for state in data["callbacks"].values()):
        raise bad("callbacks", "a dict of callback state dicts")
    history = data["history"]
    if not (
        isinstance(history, dict)
        and isinstance(history.get("records"), list)
        and isinstance(history.get("tensors"), list)
        and len(history["records"]) == len(history["tensors"])
        and all(_str_dict(r) and all(_number(v) for v in r.values()) for r in history["records"])
        and all(
            _str_dict(t) and all(isinstance(v, Tensor) for v in t.values())
            for t in history["tensors"]
        )
    ):
        raise bad("history", "{'records': [dicts of numbers], 'tensors': [dicts of tensors]}")
    _check_rng(path, data["rng"], "rng")
    if data["epoch_rng"] is not None:
        _check_rng(path, data["epoch_rng"], "epoch_rng")
        loaders = data["epoch_rng"].get("loaders", [])
        if not isinstance(loaders, list) or not all(_byte_tensor(s) for s in loaders):
            raise CheckpointError(
                f"{path}: field 'epoch_rng' holds loader generator states that are not 1-dim "
                "uint8 tensors"
            )
    loss = data["train_loss"]
    if loss is not None and not (
        isinstance(loss, dict)
        and set(loss) == {"total", "count"}
        and (loss["total"] is None or _scalar_tensor(loss["total"]))
        and _number(loss["count"])
        and loss["count"] >= 0
    ):
        raise bad("train_loss", "None or {'total': a 0-dim tensor, 'count': a number}")
    loader = data["loader"]
    if loader is not None and not (isinstance(loader, dict) and set(loader) == set(_LOADER_FIELDS)):
        raise bad("loader", f"None or a dict of {', '.join(_LOADER_FIELDS)}")
    ranks = data.get("ranks")  # optional: written by multi-process runs only
    if ranks is not None:
        if not (
            isinstance(ranks, list)
            and len(ranks) > 1
            and all(isinstance(r, dict) and set(r) == set(_RANK_FIELDS) for r in ranks)
        ):
            raise CheckpointError(
                f"{path}: field 'ranks' is not a list of per-rank dicts of "
                f"{', '.join(_RANK_FIELDS)}"
            )
        world = loader.get("world_size") if isinstance(loader, dict) else None
        if world != len(ranks):
            raise CheckpointError(
                f"{path}: field 'ranks' holds {len(ranks)} ranks; the run had world size {world!r}"
            )
        for i, r in enumerate(ranks):
            _check_rng(path, r["rng"], f"ranks[{i}].rng")
            if r["epoch_rng"] is not None:
                _check_rng(path, r["epoch_rng"], f"ranks[{i}].epoch_rng")
            loss = r["train_loss"]
            if (loss is None) != (data["train_loss"] is None) or not (
                loss is None
                or (
                    isinstance(loss, dict)
                    and set(loss) == {"total", "count"}
                    and (loss["total"] is None or _scalar_tensor(loss["total"]))
                    and _number(loss["count"])
                    and loss["count"] >= 0
                )
            ):
                raise CheckpointError(
                    f"{path}: field 'ranks[{i}].train_loss' is not a running loss "
                    "({'total': a 0-dim tensor, 'count': a number}) as the run's"
                )


def _check_tensors(path: Path, weights: Any, what: str) -> None:
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{path}: {what} is a {type(weights).__name__}, not model weights")
    for key, value in weights.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: {what} has a key {key!r} that is not a string")
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"{path}: {what} holds a {type(value).__name__} under {key!r} where a tensor "
                "belongs"
            )


def _str_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scalar_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) and value.ndim == 0


def _byte_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dtype == torch.uint8 and value.ndim == 1


def _check_rng(path: Path, state: Any, where: str) -> None:
    """Set each generator state on a scratch generator: what `set_rng_state` will accept."""
    try:
        if not isinstance(state, dict):
            raise TypeError(f"a {type(state).__name__}, not a dict")
        version, internal, gauss = state["python"]
        random.Random().setstate((version, tuple(internal), gauss))
        np.random.RandomState().set_state(_numpy_state(state["numpy"]))
        if not _byte_tensor(state["torch"]):
            raise TypeError("the torch state is not a 1-dim uint8 tensor")
        torch.Generator().set_state(state["torch"].cpu())
        cuda = state.get("cuda", [])
        if not isinstance(cuda, list) or not all(_byte_tensor(s) for s in cuda):
            raise TypeError("the CUDA states are not 1-dim uint8 tensors")
    except Exception as err:
        raise CheckpointError(
            f"{path}: field {where!r} is not a valid random-generator state: "
            f"{type(err).__name__}: {err}"
        ) from err


def _check_kinds(
    function: str,
    model: object,
    optimizer: object,
    scheduler: object,
    scaler: object,
) -> None:
    """Each object is of its own kind (a scheduler given as `optimizer=` is refused)."""
    for name, obj, kind, what in (
        ("model", model, nn.Module, "a torch.nn.Module"),
        ("optimizer", optimizer, Optimizer, "a torch.optim.Optimizer"),
        ("scheduler", scheduler, _Scheduler, "a torch.optim.lr_scheduler scheduler"),
        ("scaler", scaler, torch.amp.GradScaler, "a torch.amp.GradScaler"),
    ):
        if obj is not None and not isinstance(obj, kind):
            raise TypeError(f"{function}({name}=...): expected {what}, got {type(obj).__name__}")
    if model is None:
        raise TypeError(f"{function}(model=...): expected a torch.nn.Module, got None")


def _class_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_targets(
    path: Path,
    data: dict[str, Any],
    model: nn.Module,
    targets: Mapping[str, Optimizer | _Scheduler | torch.amp.GradScaler | None],
    strict: bool,
) -> dict[str, Tensor]:
    """Check that every state fits the object it is for; return the model weights to load."""
    for name, target in targets.items():
        if target is None:
            continue
        saved = data[name]
        if saved is None:
            raise CheckpointError(f"{path}: the checkpoint holds no {name} state to restore")
        saved_class, given_class = data["classes"][name], _class_name(target)
        if saved_class != given_class:
            raise CheckpointError(
                f"{path}: the {name} state was saved from a {saved_class}; it cannot be restored "
                f"into a {given_class}. Resume with the {name} class the run was saved with"
            )
        if isinstance(target, Optimizer):
            _check_optimizer(path, saved, target)
        else:
            if isinstance(target, torch.amp.GradScaler) and not all(
                _number(v) for v in saved.values()
            ):
                raise CheckpointError(f"{path}: the scaler state holds values that are not numbers")
            expected = set(target.state_dict())
            foreign, absent = sorted(set(saved) - expected), sorted(expected - set(saved))
            if foreign or absent:
                raise CheckpointError(
                    f"{path}: the {name} state does not fit {given_class}: "
                    + "; ".join(
                        [f"keys it does not have: {foreign}"] * bool(foreign)
                        + [f"missing keys: {absent}"] * bool(absent)
                    )
                    + " (a foreign key such as 'optimizer' is never loaded)"
                )
    return _check_model(path, model, data["model"], strict)


def _check_optimizer(path: Path, saved: dict[str, Any], opt: Optimizer) -> None:
    """What `Optimizer.load_state_dict` assumes: the same groups of the same sizes."""
    groups, state = saved.get("param_groups"), saved.get("state")
    if (
        not isinstance(groups, list)
        or not isinstance(state, dict)
        or set(saved) - {"state", "param_groups"}
    ):
        raise CheckpointError(
            f"{path}: the optimizer state is not an optimizer state dict "
            "({'state': ..., 'param_groups': [...]})"
        )
    sizes = [len(g["params"]) for g in opt.param_groups]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(f"{path}: the optimizer state has malformed parameter groups")
    saved_sizes = [len(g["params"]) for g in groups]
    if saved_sizes != sizes:
        raise CheckpointError(
            f"{path}: the optimizer state has parameter groups of sizes {saved_sizes}; this "
            f"optimizer has {sizes}: build it over the same parameters, in the same groups"
        )
    ids = {p for g in groups for p in g["params"]}
    known = {k for g in opt.param_groups for k in g} | {"params", "param_names"}
    foreign = sorted({k for g in groups for k in g} - known)
    if foreign:
        raise CheckpointError(
            f"{path}: the optimizer state has group settings this optimizer does not: {foreign}"
        )
    if not all(k in ids and _str_dict(v) for k, v in state.items()):
        raise CheckpointError(
            f"{path}: the optimizer state has per-parameter states for unknown parameters"
        )


def _check_model(
    path: Path, model: nn.Module, weights: Mapping[str, Any], strict: bool
) -> dict[str, Tensor]:
    target = _unwrap(model)
    expected = target.state_dict()
    if (
        weights
        and all(k.startswith("module.") for k in weights)
        and not any(k.startswith("module.") for k in expected)
    ):
        weights = {k.removeprefix("module."): v for k, v in weights.items()}  # saved under DDP
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(weights)
        if weights[k].shape != expected[k].shape
    )
    problems = [f"wrong shape: {', '.join(shapes[:10])}"] if shapes else []
    if strict:
        problems += [f"missing keys: {', '.join(missing[:10])}"] if missing else []
        problems += [f"unexpected keys: {', '.join(unexpected[:10])}"] if unexpected else []
    if problems:
        raise CheckpointError(
            f"{path}: the weights do not match {type(target).__name__}: " + "; ".join(problems)
        )
    return dict(weights)


def _restore(
    path: Path,
    data: dict[str, Any],
    model: nn.Module,
    targets: Mapping[str, Optimizer | _Scheduler | torch.amp.GradScaler | None],
    weights: dict[str, Tensor],
    strict: bool,
) -> Checkpoint:
    """Load the checked states into the objects; then the `Checkpoint` record."""
    restored: list[str] = []
    current = "model"
    try:
        _unwrap(model).load_state_dict(weights, strict=strict)
        restored.append(current)
        for current, target in targets.items():
            if target is not None:
                target.load_state_dict(data[current])
                restored.append(current)
    except Exception as err:  # every check passed, so this is unexpected: said as such
        raise CheckpointError(
            f"{path}: restoring the {current} failed after every check passed "
            f"({type(err).__name__}: {err}); restored before it: {restored or 'nothing'}"
        ) from err
    return Checkpoint(
        path=path,
        format_version=data["format_version"],
        epoch=data["epoch"],
        step=data["step"],
        global_step=data["global_step"],
        epoch_complete=data["epoch_complete"],
        restored=restored,
        extra=data["extra"],
        history=data["history"],
        callbacks=data["callbacks"],
        rng=data["rng"],
        epoch_rng=data["epoch_rng"],
        train_loss=data["train_loss"],
        classes=data["classes"],
        loader=data["loader"],
        ranks=data.get("ranks"),
    )


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's tensors are: the first parameter's (or buffer's) device, else CPU."""
    for tensor in (*_unwrap(model).parameters(), *_unwrap(model).buffers()):
        return tensor.device
    return torch.device("cpu")


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


# --- fit(resume=...) ------------------------------------------------------------------------------


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
        loader=loader_identity(state.train_dl),
    )  # fmt: skip


def save_run(path: Path, state: Any, *, epoch_complete: bool) -> Path:
    """Write `run_payload(state)` atomically to `path`.

    Under a process group, a collective: every rank calls it; BatchNorm's running statistics
    are first broadcast from rank 0 (so every rank holds the saved model), each rank's random
    states and running training loss are gathered to rank 0 (field `ranks`), and only rank 0
    writes.
    """
    broadcast_buffers(_unwrap(state.model))
    partial = not epoch_complete and state.train_loss is not None
    mine = {
        "rng": rng_state(),
        "epoch_rng": state.epoch_rng,
        "train_loss": _cpu(state.train_loss.state_dict()) if partial else None,
    }
    ranks = gather_to_main(mine)
    if not is_main_process():
        return path
    payload = run_payload(state, epoch_complete=epoch_complete)
    if ranks is not None and len(ranks) > 1:
        payload["ranks"] = ranks
    return _atomic_save(payload, path)


def _cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    return value


def own_rank_state(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` with this rank's random states and running loss, where it was saved by as many
    processes as now run (else rank 0's, as saved at the top level)."""
    if ckpt.ranks is None or len(ckpt.ranks) != world_size():
        return ckpt
    mine = ckpt.ranks[this_rank()]
    return dataclasses.replace(
        ckpt, rng=mine["rng"], epoch_rng=mine["epoch_rng"], train_loss=mine["train_loss"]
    )


def restore_run(path: Path, state: Any, data: dict[str, Any] | None = None) -> Checkpoint:
    """Check everything `fit(resume=path)` needs, then restore the run into `state`'s objects.

    Checked first: the file, its fields, the classes and states of model, optimizer, scheduler
    and scaler, and the training loader against the one the checkpoint was saved with. Then the
    callbacks' states are loaded (their own code may refuse one), then model, optimizer,
    scheduler, scaler, History and the step count. Random-generator states are left to `fit`.

    Raises:
        CheckpointError: anything that does not fit (named), before anything is changed.
    """
    if data is None:
        data = read_checkpoint(path, state.device)
    targets = {"optimizer": state.opt, "scheduler": state.scheduler, "scaler": state.scaler}
    for name, target in targets.items():
        if target is None and data[name] is not None:
            arg = {"optimizer": "opt", "scheduler": "scheduler", "scaler": "amp"}[name]
            raise CheckpointError(
                f"{path}: the run was saved with a {name} ({data['classes'][name]}); resume it "
                f"with the same fit({arg}=...)"
            )
    weights = _check_targets(path, data, state.model, targets, strict=True)
    check_loader(path, data, state)
    saved_callbacks = data["callbacks"]
    for key, cb in callback_keys(state.callbacks).items():
        if key in saved_callbacks:
            cb.load_state_dict(saved_callbacks[key])
    ckpt = _restore(path, data, state.model, targets, weights, strict=True)
    history = data["history"]
    state.history.load_state_dict(
        {
            "records": history["records"],
            "tensors": [{k: v.cpu() for k, v in t.items()} for t in history["tensors"]],
        }
    )
    state.global_step = data["global_step"]
    return ckpt


def loader_identity(dl: Any) -> dict[str, Any]:
    """What decides which batches a training loader yields, as far as it can be read.

    Read through wrappers (`WrappedDataLoader`, `DeviceDataLoader`: their `.dl`) from the
    innermost loader; `None` where the loader does not say (a list of batches, a generator).
    """
    inner = dl
    for _ in range(8):
        wrapped = getattr(inner, "dl", None)
        if wrapped is None:
            break
        inner = wrapped
    dataset = getattr(inner, "dataset", None)
    batch_size = getattr(inner, "batch_size", None)
    batch_sampler = getattr(inner, "batch_sampler", None)
    if batch_size is None and batch_sampler is not None:
        batch_size = getattr(batch_sampler, "batch_size", None)
    sampler = getattr(inner, "sampler", None)
    if batch_sampler is not None and type(batch_sampler).__name__ != "BatchSampler":
        sampler = batch_sampler  # a custom batch sampler decides the batches
    kind: str | None = None
    if sampler is not None:
        kind = type(sampler).__name__
        shuffle = getattr(sampler, "shuffle", None)
        kind += f"(shuffle={shuffle})" if isinstance(shuffle, bool) else ""
    elif isinstance(getattr(inner, "shuffle", None), bool):
        kind = f"shuffle={inner.shuffle}"
    drop_last = getattr(inner, "drop_last", None)
    return {
        "loader": type(inner).__name__,
        "dataset_length": _length(dataset),
        "batch_size": batch_size if isinstance(batch_size, int) else None,
        "num_batches": _length(dl),
        "drop_last": drop_last if isinstance(drop_last, bool) else None,
        "sampler": kind,
        "generators": len(loader_generators(dl)),
        "world_size": world_size(),
        "persistent_workers": bool(
            getattr(inner, "persistent_workers", False) and getattr(inner, "num_workers", 0) > 0
        ),
    }


def _length(obj: Any) -> int | None:
    if not isinstance(obj, Sized):
        return None
    try:
        return len(obj)
    except TypeError:  # a DataLoader over an IterableDataset without a length
        return None


def check_loader(path: Path, data: dict[str, Any], state: Any) -> None:
    """Refuse a resume whose training loader would not give the batches the run would have.

    Mid-epoch, everything that decides the replayed batches must match. At an epoch's end,
    the training set's length must (another length is other data: a `--smoke` run's
    checkpoint resumed by a full run, say). After the first epoch, a loader with persistent
    workers cannot be resumed exactly: its workers keep their random state across epochs, and
    it draws their seed only when it first starts them.
    """
    saved, now = data["loader"], loader_identity(state.train_dl)
    epoch, step = data["epoch"], data["step"]
    if not data["epoch_complete"]:
        if saved is None or data["epoch_rng"] is None or data["train_loss"] is None:
            raise CheckpointError(
                f"{path}: saved inside epoch {epoch + 1} without the epoch's state (data order, "
                "running loss, loader) that fit needs to resume there: it was not written by "
                "fit's ModelCheckpoint. Load it with load_checkpoint(path, model=...) instead"
            )
        diffs = [f"{k} {saved[k]!r} then, {now[k]!r} now" for k in now if saved[k] != now[k]]
        if diffs:
            raise CheckpointError(
                f"{path}: saved after {step} batches of epoch {epoch + 1} with another training "
                f"loader ({'; '.join(diffs)}): replaying the epoch with this one would give "
                "other batches than the interrupted run. Resume with the loader it was saved "
                "with; or restart the epoch with this loader: resume from a checkpoint written "
                "at an epoch's end (ModelCheckpoint's epoch=N-... files), or load the state "
                "with load_checkpoint(path, model=..., optimizer=...) and call fit without "
                "resume= (a new run)"
            )
    elif (
        saved is not None
        and None not in (saved["dataset_length"], now["dataset_length"])
        and saved["dataset_length"] != now["dataset_length"]
    ):
        raise CheckpointError(
            f"{path}: the run was trained on a training set of {saved['dataset_length']} "
            f"samples; train_dl now has {now['dataset_length']}. Resuming would continue "
            f"that run (epoch {epoch + 2} of its schedule) on other data. Start a new run "
            "(without resume=, or in another directory); to start from its weights, load "
            "them with load_weights(path, model)"
        )
    start = epoch + data["epoch_complete"]
    persistent = (saved or {}).get("persistent_workers") or now["persistent_workers"]
    if persistent and 0 < start < state.epochs:
        raise CheckpointError(
            f"{path}: cannot resume exactly at epoch {start + 1} with persistent_workers=True: "
            "such a loader starts its worker processes once, seeded once, and they keep their "
            "random state from epoch to epoch, so a resumed run would shuffle and augment "
            "differently from the uninterrupted one. Train with persistent_workers=False "
            "(workers restarted and reseeded each epoch) to be able to resume; to continue "
            "this run anyway, load_checkpoint(path, model=..., optimizer=...) and call fit "
            "without resume="
        )


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


def read_agreed(
    resume: PathLike, device: torch.device, *, missing_ok: bool
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint `fit(resume=...)` continues from, the same on every process.

    Rank 0 decides which file (or, with `missing_ok`, that there is none: `None`, start
    fresh) and broadcasts it; every process then reads and checks that file itself and all
    compare notes: if one cannot read it, or read another run's file (a node's own disk), every
    process raises the same `CheckpointError`, naming the ranks, before anything is restored.
    Without a process group: `resume_path` and `read_checkpoint`.

    Raises:
        CheckpointError: no checkpoint there (unless `missing_ok`), or one that a process
            cannot read (named, with its rank), or different files on different processes.
    """
    decision: tuple[str, str]
    if is_main_process():
        try:
            decision = ("path", str(resume_path(resume)))
        except CheckpointError as err:
            decision = ("fresh", str(resume)) if missing_ok else ("error", str(err))
    else:
        decision = ("", "")
    kind, value = broadcast_from_main(decision)
    if kind == "error":
        raise CheckpointError(value)
    if kind == "fresh":
        return None
    path = Path(value)
    data: dict[str, Any] = {}
    problem: str | None = None
    summary: tuple[Any, ...] | None = None
    try:
        data = read_checkpoint(path, device)
        summary = (data["epoch"], data["step"], data["global_step"], data["epoch_complete"])
    except (CheckpointError, OSError) as err:
        problem = f"{type(err).__name__}: {err}"
    reports = all_gather((problem, summary))
    failed = [f"rank {r}: {p}" for r, (p, _) in enumerate(reports) if p is not None]
    if failed:
        raise CheckpointError(
            f"fit(resume=...): {path}: rank 0 resumes from it, but not every process can read "
            f"it ({'; '.join(failed)}). Every process must read the same checkpoint: put the "
            "checkpoint directory on a filesystem all nodes share"
        )
    if len({s for _, s in reports}) > 1:
        seen = "; ".join(
            f"rank {r}: epoch index {s[0]}, batch {s[1]}, step {s[2]}"
            for r, (_, s) in enumerate(reports)
            if s is not None
        )
        raise CheckpointError(
            f"fit(resume=...): {path} is not the same checkpoint on every process ({seen}): "
            "each node reads its own copy. Put the checkpoint directory on a filesystem all "
            "nodes share"
        )
    return path, data


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
