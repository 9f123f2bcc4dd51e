"""Models sharded by FSDP2's `fully_shard`: how `fit` runs them and how their state is saved.

A sharded model's parameters and optimizer states are `DTensor` shards: no process holds the
whole state, so rank 0 cannot `torch.save` it. Its checkpoints therefore come in two parts:

* the shards, written by every process with `torch.distributed.checkpoint` (DCP) into a
  directory beside the checkpoint file, `<file>.shards-<token>/`, as torchtitan does; DCP
  reshards them on loading, so they resume under another number of processes (or load into
  a plain model in one process);
* the checkpoint file itself, written atomically by rank 0 in trainkit's format, holding
  everything else and the manifest of the shards: the directory's name and every file's size
  and CRC-32, checked before anything is loaded.

A new save writes a new directory, then rank 0 replaces the file (the switch is the atomic
rename) and removes the directories of that file's earlier saves: a crash at any point leaves
a file whose shards are whole.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import secrets
import shutil
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from trainkit.distributed import all_gather, broadcast_from_main, rank, world_size

__all__ = [
    "check_shards",
    "drop_shards",
    "full_weights",
    "gathered",
    "is_sharded",
    "load_shards",
    "local",
    "no_grad_sync",
    "write_shards",
]

_CHUNK = 1 << 20
SHARDS_SUFFIX = r"\.shards-[0-9a-f]{12}"  # after the checkpoint file's name


def _fsdp_module() -> type[Any]:
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or what a compiled wrapper holds) is a `fully_shard`-ed model.

    Raises:
        ValueError: submodules are sharded but the model itself is not (`fit` would have no
            root to run and save the shards through).
    """
    inner = getattr(model, "_orig_mod", model)
    if not torch.distributed.is_available():
        return False
    fsdp = _fsdp_module()
    if isinstance(inner, fsdp):
        return True
    inner_sharded = [name for name, m in inner.named_modules() if isinstance(m, fsdp)]
    if inner_sharded:
        raise ValueError(
            f"model: submodules {inner_sharded[:3]} are sharded with fully_shard, but the model "
            "itself is not; call fully_shard(model) on the root too (after its blocks), as "
            "FSDP2 expects"
        )
    return False


def local(tensor: Tensor) -> Tensor:
    """This process's part of `tensor` (a `DTensor`'s local shard), or `tensor` itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


@contextlib.contextmanager
def no_grad_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients without reducing them across processes (FSDP2's `no_sync`)."""
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Hold the whole parameters on every process while evaluating, then shard them again.

    FSDP2 gathers a module's parameters before each forward (a collective): validation shards
    of different lengths would leave one process waiting for the others. Every sharded module
    is gathered here, in module order, so every forward then runs on this process alone, as
    the plain module under DDP does. The cost: the whole model's parameters in memory while
    evaluating.
    """
    fsdp = _fsdp_module()
    modules = [m for m in model.modules() if isinstance(m, fsdp)]
    # set up as the first forward would (the root then stops resharding after forward), so the
    # settings saved here are those training runs with
    model._get_fsdp_state()._lazy_init()  # type: ignore[operator]
    # the per-group setting to put back (the root's differs from the blocks' by default)
    saved = [
        (state, state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in groups])
        for state, groups in (
            (s, s._fsdp_param_groups) for s in (m._get_fsdp_state() for m in modules)
        )
    ]
    try:
        for m in modules:  # every block now, in module order (the same on every process):
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()  # a block a process's data never reaches must not be gathered late
        yield
    finally:
        for state, auto, infos in saved:
            state._auto_reshard_after_forward = auto
            for group, info in zip(state._fsdp_param_groups, infos, strict=True):
                group.post_forward_mesh_info = info
        for m in modules:
            m.reshard()


def full_weights(model: nn.Module) -> dict[str, Tensor]:
    """The whole weights of a sharded model, on CPU, on rank 0 (`{}` elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights: dict[str, Tensor] = {}
    for key, value in get_model_state_dict(model, options=options).items():
        assert isinstance(value, Tensor)
        weights[key] = value
    return weights


def _states(model: nn.Module, opt: Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if opt is None:
        return {"model": get_model_state_dict(model)}
    model_state, opt_state = get_state_dict(model, opt)
    return {"model": model_state, "optimizer": opt_state}


def write_shards(path: Path, model: nn.Module, opt: Optimizer | None) -> dict[str, Any]:
    """Write the model's (and optimizer's) shards for the checkpoint file `path`. Collective.

    Returns:
        The manifest (the same on every process): the directory's name, each file's size and
        CRC-32, and the number of processes that wrote them.
    """
    from torch.distributed.checkpoint.state_dict_saver import save

    name = f"{path.name}.shards-{broadcast_from_main(secrets.token_hex(6))}"  # SHARDS_SUFFIX
    directory = path.parent / name
    problem, mine = None, {}
    try:
        save(_states(model, opt), checkpoint_id=directory)
        # the files this process wrote (DCP names them by rank; rank 0 writes the metadata),
        # so a stale directory listing (a network filesystem) cannot leave one out
        ours = [p.name for p in directory.glob(f"__{rank()}_*.distcp")]
        ours += [".metadata"] * (rank() == 0)
        mine = {f: _size_and_crc(directory / f) for f in ours}
    except BaseException as err:  # (DCP's own errors are BaseExceptions, raised on every rank)
        if isinstance(err, KeyboardInterrupt | SystemExit):
            shutil.rmtree(directory, ignore_errors=True)
            raise
        problem = f"{type(err).__name__}: {err}"
    parts = all_gather((problem, mine))  # a rank failing alone must not leave the others waiting
    failed = [f"rank {r}: {p}" for r, (p, _) in enumerate(parts) if p is not None]
    if failed:
        shutil.rmtree(directory, ignore_errors=True)
        raise OSError(f"writing the shards of {path} failed ({'; '.join(failed)})")
    sums: dict[str, list[int]] = {}
    for _, part in parts:
        sums.update(part)
    return {"dir": name, "files": sums, "world_size": world_size()}


def drop_shards(path: Path, keep: str | None = None) -> None:
    """Remove the shard directories of the checkpoint file `path`, except `keep`."""
    pattern = re.compile(re.escape(path.name) + SHARDS_SUFFIX)
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        if pattern.fullmatch(entry.name) and entry.name != keep and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


# What a DCP `.metadata` pickle may name: DCP's own records, tensor sizes, dtypes, layouts,
# paths. Anything else (a function that would run) is refused: DCP itself unpickles the file
# with plain `pickle.load`, and trainkit never runs code from a checkpoint.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    *(("pathlib", f"{pure}{os_}Path") for pure in ("", "Pure") for os_ in ("Posix", "Windows")),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_CLASSES or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds")


def _reader(directory: Path) -> Any:
    """DCP's file reader, reading the `.metadata` pickle with the classes above only."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            with (directory / ".metadata").open("rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if not isinstance(metadata, Metadata):
                raise pickle.UnpicklingError(f"it holds a {type(metadata).__name__}")
            storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
            storage_meta.load_id = self.load_id
            metadata.storage_meta = storage_meta
            return metadata

    return Reader(directory)


def _planner() -> Any:
    """DCP's load planner, loading non-tensor values (learning rates, ...) without code: DCP
    loads them with `torch.load(weights_only=False)`; the same bytes must load with
    `weights_only=True` first."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            torch.load(value, weights_only=True)  # raises on anything but plain data
            value.seek(0)
            super().load_bytes(read_item, value)

    return Planner()


def check_shards(
    path: Path,
    manifest: dict[str, Any],
    model: nn.Module,
    opt: Optimizer | None,
    *,
    collective: bool,
) -> str | None:
    """What is wrong with the shards of `path` for `model`, or `None`.

    The files' sizes and CRC-32s are checked against the manifest (`collective`: each
    process a part of them, the caller gathers the answers); then the weights' names and
    shapes recorded by DCP are compared with the model's.
    """
    directory = path.parent / manifest["dir"]
    files = sorted(manifest["files"])
    if directory.is_symlink() or not directory.is_dir():
        return f"its shards directory {manifest['dir']} is missing (or a link, never followed)"
    share = files[rank() :: world_size()] if collective else files
    for f in share:
        where = directory / f
        if where.is_symlink() or not where.is_file():
            return f"shard file {manifest['dir']}/{f} is missing (or a link, never followed)"
        size, _ = manifest["files"][f]
        if where.stat().st_size != size or _size_and_crc(where) != list(manifest["files"][f]):
            return f"shard file {manifest['dir']}/{f} is damaged (its size or CRC-32 differs)"
    try:
        read = _reader(directory).read_metadata()
    except Exception as err:
        return f"its shards' metadata cannot be read ({type(err).__name__}: {err})"
    problem = _check_items(directory, manifest, read)
    if problem is not None:
        return problem
    metadata = read.state_dict_metadata
    saved = {
        k.removeprefix("model."): tuple(getattr(v, "size", ()))
        for k, v in metadata.items()
        if k.startswith("model.")
    }
    expected = {k: tuple(v.shape) for k, v in _states(model, None)["model"].items()}
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    shapes = sorted(
        f"{k}: file {saved[k]} vs model {expected[k]}"
        for k in set(saved) & set(expected)
        if saved[k] != expected[k]
    )
    problems = [f"wrong shape: {', '.join(shapes[:10])}"] * bool(shapes)
    problems += [f"missing keys: {', '.join(missing[:10])}"] * bool(missing)
    problems += [f"unexpected keys: {', '.join(unexpected[:10])}"] * bool(unexpected)
    if problems:
        return f"the weights do not match {type(model).__name__}: " + "; ".join(problems)
    return None if opt is None else _check_optimizer(metadata, model, opt)


def _check_optimizer(metadata: dict[str, Any], model: nn.Module, opt: Optimizer) -> str | None:
    """The saved optimizer states are for the parameters of `opt`, in as many groups.

    Checked before loading: DCP would otherwise fail half-way, and `get_state_dict` first runs
    a step with learning rate 0 on an optimizer that has no state yet.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    wanted = {names.get(id(p), "?") for group in opt.param_groups for p in group["params"]}
    states = [
        k.removeprefix("optimizer.state.") for k in metadata if k.startswith("optimizer.state.")
    ]
    saved = {n for n in names.values() if any(k.startswith(f"{n}.") for k in states)}
    groups = {k.split(".")[2] for k in metadata if k.startswith("optimizer.param_groups.")}
    if not states and not groups:
        return "the shards hold no optimizer state to restore"
    if len(groups) != len(opt.param_groups):
        return (
            f"the optimizer state has {len(groups)} parameter groups; this optimizer has "
            f"{len(opt.param_groups)}: build it over the same parameters, in the same groups"
        )
    if saved != wanted:
        missing, foreign = sorted(wanted - saved), sorted(saved - wanted)
        return "the optimizer state is for other parameters than this optimizer's: " + "; ".join(
            [f"none for {', '.join(missing[:10])}"] * bool(missing)
            + [f"states for parameters it does not have: {', '.join(foreign[:10])}"] * bool(foreign)
        )
    return None


def _check_items(directory: Path, manifest: dict[str, Any], metadata: Any) -> str | None:
    """Every item DCP would read lies in a file of the manifest, untransformed, and every
    non-tensor value (a learning rate, ...) loads as plain data."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    where = f"{manifest['dir']}/.metadata"
    for index, info in metadata.storage_data.items():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name not in manifest["files"] or name == ".metadata":
            return f"{where} places {index.fqn!r} in {name!r}, which is not one of its shard files"
        if getattr(info, "transform_descriptors", None):
            return f"{where}: {index.fqn!r} is stored transformed, which trainkit never writes"
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            with (directory / name).open("rb") as f:
                f.seek(info.offset)
                value = io.BytesIO(f.read(info.length))
            try:
                torch.load(value, weights_only=True)
            except Exception as err:
                return (
                    f"shard file {manifest['dir']}/{name} holds a value under {index.fqn!r} "
                    f"that is not plain data, refused unread ({type(err).__name__})"
                )
    return None


def load_shards(
    manifest: dict[str, Any],
    path: Path,
    model: nn.Module,
    opt: Optimizer | None,
    *,
    collective: bool,
) -> None:
    """Load the shards into `model` (and `opt`), resharded to this run's processes.

    `collective` (a sharded model): every process loads its part together; otherwise this
    process reads the whole state alone.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    states = _states(model, opt)
    with warnings.catch_warnings():  # DCP warns that it loads in one process: as asked
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        directory = path.parent / manifest["dir"]
        load(
            states,
            storage_reader=_reader(directory),
            planner=_planner(),
            no_dist=not collective,
        )
    if opt is None:
        set_model_state_dict(model, states["model"])
    else:
        set_state_dict(
            model, opt, model_state_dict=states["model"], optim_state_dict=states["optimizer"]
        )


def _size_and_crc(path: Path) -> list[int]:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return [os.path.getsize(path), crc]
