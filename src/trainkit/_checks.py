"""What a checkpoint must hold before anything is restored from it: every field's type and
range, and each state against the object it is for (classes, parameter groups, state keys,
weight names and shapes); then the restore itself."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from trainkit._format import FORMAT_MARKER, FORMAT_VERSION, STATES, Checkpoint, CheckpointError
from trainkit._rng import numpy_state
from trainkit._sharded import SHARDS_SUFFIX, check_shards, is_sharded, load_shards
from trainkit._types import Scheduler
from trainkit.distributed import all_gather


def is_checkpoint(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT_MARKER


_FIELDS = (
    "classes", "model", *STATES, "epoch", "step", "global_step", "epoch_complete", "rng",
    "epoch_rng", "history", "callbacks", "train_loss", "loader", "extra",
)  # fmt: skip
_RANK_FIELDS = ("rng", "epoch_rng", "train_loss")
_LOADER_FIELDS = (
    "loader", "dataset_length", "batch_size", "num_batches", "drop_last", "sampler",
    "generators", "world_size", "persistent_workers",
)  # fmt: skip


def check_fields(path: Path, data: Any) -> None:
    """Every field of a checkpoint has the type and range `save_checkpoint` writes."""
    if not is_checkpoint(data):
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

    check_tensors(path, data["model"], "field 'model'")
    for name in ("epoch", "step", "global_step"):
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(name, "an int >= 0")
    if not isinstance(data["epoch_complete"], bool):
        raise bad("epoch_complete", "True or False")
    classes = data["classes"]
    if not isinstance(classes, dict) or set(classes) != {"model", *STATES}:
        raise bad("classes", "a dict naming the model, optimizer, scheduler and scaler classes")
    for name in ("model", *STATES):
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
    if data.get("sharded") is not None:  # optional: written for a fully_shard model only
        _check_manifest(path, data)


def _check_manifest(path: Path, data: dict[str, Any]) -> None:
    """The shards' manifest: plain names beside the file (nothing outside is ever read)."""
    manifest = data["sharded"]

    def plain(name: Any) -> bool:
        return (
            isinstance(name, str)
            and name not in ("", ".", "..")
            and "/" not in name
            and "\\" not in name
            and "\0" not in name
        )

    if not (
        isinstance(manifest, dict)
        and set(manifest) == {"dir", "files", "world_size"}
        and plain(manifest["dir"])
        and re.fullmatch(r".+" + SHARDS_SUFFIX, manifest["dir"])
        and isinstance(manifest["files"], dict)
        and manifest["files"]
        and all(
            plain(f)
            and isinstance(v, list)
            and len(v) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v)
            for f, v in manifest["files"].items()
        )
        and isinstance(manifest["world_size"], int)
        and manifest["world_size"] >= 1
    ):
        raise CheckpointError(
            f"{path}: field 'sharded' is not a manifest of shards beside the file ({{'dir': "
            "'<file>.shards-<token>', 'files': {name: [size, crc32]}, 'world_size': n}): "
            "damaged or crafted"
        )
    if data["model"] or data["optimizer"] is not None:
        raise CheckpointError(
            f"{path}: field 'sharded' names shards, but the file holds model or optimizer "
            "state too: damaged or crafted"
        )


def check_tensors(path: Path, weights: Any, what: str) -> None:
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
        np.random.RandomState().set_state(numpy_state(state["numpy"]))
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


def check_kinds(
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
        ("scheduler", scheduler, Scheduler, "a torch.optim.lr_scheduler scheduler"),
        ("scaler", scaler, torch.amp.GradScaler, "a torch.amp.GradScaler"),
    ):
        if obj is not None and not isinstance(obj, kind):
            raise TypeError(f"{function}({name}=...): expected {what}, got {type(obj).__name__}")
    if model is None:
        raise TypeError(f"{function}(model=...): expected a torch.nn.Module, got None")


def class_name(obj: object) -> str:
    cls = type(obj)
    if isinstance(obj, nn.Module) and is_sharded(
        obj
    ):  # fully_shard made the class FSDP<Class>(FSDPModule, Class)
        cls = cls.__bases__[-1]
    return f"{cls.__module__}.{cls.__qualname__}"


def check_targets(
    path: Path,
    data: dict[str, Any],
    model: nn.Module,
    targets: Mapping[str, Optimizer | Scheduler | torch.amp.GradScaler | None],
    strict: bool,
) -> dict[str, Tensor]:
    """Check that every state fits the object it is for; return the model weights to load."""
    for name, target in targets.items():
        if target is None:
            continue
        saved = data[name]
        in_shards = name == "optimizer" and data.get("sharded") is not None
        if saved is None and not (in_shards and data["classes"][name] is not None):
            raise CheckpointError(f"{path}: the checkpoint holds no {name} state to restore")
        saved_class, given_class = data["classes"][name], class_name(target)
        if saved_class != given_class:
            raise CheckpointError(
                f"{path}: the {name} state was saved from a {saved_class}; it cannot be restored "
                f"into a {given_class}. Resume with the {name} class the run was saved with"
            )
        if isinstance(target, Optimizer):
            if not in_shards:  # sharded: DCP matches the states to the parameters by name
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
    if data.get("sharded") is not None:
        collective = is_sharded(model)  # then every process checks a part of the files
        opt = targets.get("optimizer")
        assert opt is None or isinstance(opt, Optimizer)
        problem = check_shards(path, data["sharded"], model, opt, collective=collective)
        problems = all_gather(problem) if collective else [problem]
        failed = [f"rank {r}: {p}" if len(problems) > 1 else p for r, p in enumerate(problems) if p]
        if failed:
            raise CheckpointError(f"{path}: {'; '.join(failed)}")
        return {}
    if is_sharded(model):
        raise CheckpointError(
            f"{path}: written without fully_shard (whole weights, saved by one process); this "
            "model is sharded. Load it before sharding (load_checkpoint, then fully_shard), or "
            "resume a run that saved sharded checkpoints"
        )
    return check_model(path, model, data["model"], strict)


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


def check_model(
    path: Path, model: nn.Module, weights: Mapping[str, Any], strict: bool
) -> dict[str, Tensor]:
    target = unwrap(model)
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


def restore(
    path: Path,
    data: dict[str, Any],
    model: nn.Module,
    targets: Mapping[str, Optimizer | Scheduler | torch.amp.GradScaler | None],
    weights: dict[str, Tensor],
    strict: bool,
) -> Checkpoint:
    """Load the checked states into the objects; then the `Checkpoint` record."""
    restored: list[str] = []
    current = "model"
    shards = data.get("sharded")
    try:
        if shards is not None:  # the model and optimizer states, through DCP
            opt = targets.get("optimizer")
            assert opt is None or isinstance(opt, Optimizer)
            load_shards(shards, path, model, opt, collective=is_sharded(model))
            restored += ["model", "optimizer"] if opt is not None else ["model"]
        else:
            unwrap(model).load_state_dict(weights, strict=strict)
            restored.append(current)
        for current, target in targets.items():
            if target is not None and current not in restored:
                target.load_state_dict(data[current])
                restored.append(current)
    except BaseException as err:  # every check passed, so this is unexpected: said as such
        if isinstance(err, KeyboardInterrupt | SystemExit):  # (DCP's errors are BaseExceptions)
            raise
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


def device_of(model: nn.Module) -> torch.device:
    """Where the model's tensors are: the first parameter's (or buffer's) device, else CPU."""
    for tensor in (*unwrap(model).parameters(), *unwrap(model).buffers()):
        return tensor.device
    return torch.device("cpu")


def unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(inner, nn.parallel.DistributedDataParallel | nn.DataParallel):
        inner = inner.module
    assert isinstance(inner, nn.Module)
    return inner
