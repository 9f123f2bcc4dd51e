"""`fit`'s run state in a checkpoint: what an exact resume needs (written by `ModelCheckpoint`),
its checks against the resumed run (the training loader), and the one resume decision of
all processes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sized
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainkit._archive import atomic_save, check_safe, read_checkpoint, save_with_shards
from trainkit._checks import check_targets, restore, unwrap
from trainkit._format import Checkpoint, CheckpointError
from trainkit._rng import rng_state
from trainkit._sharded import is_sharded, write_shards
from trainkit.checkpoint import PathLike, build_payload
from trainkit.distributed import (
    all_gather,
    broadcast_buffers,
    broadcast_from_main,
    gather_to_main,
    is_main_process,
    world_size,
)
from trainkit.distributed import rank as this_rank


def run_payload(state: Any, *, epoch_complete: bool) -> dict[str, Any]:
    """Everything an exact resume of `fit` needs, from its `TrainState`."""
    callbacks = {}
    for key, cb in callback_keys(state.callbacks).items():
        sd = cb.state_dict()
        if sd:
            check_safe(sd, f"{key}.state_dict()")
            callbacks[key] = sd
    partial = not epoch_complete and state.train_loss is not None
    return build_payload(
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
    writes. A model sharded by `fully_shard`: every rank writes its shards of the model and
    optimizer beside `path` first (`trainkit._sharded`).
    """
    broadcast_buffers(unwrap(state.model))
    partial = not epoch_complete and state.train_loss is not None
    mine = {
        "rng": rng_state(),
        "epoch_rng": state.epoch_rng,
        "train_loss": _cpu(state.train_loss.state_dict()) if partial else None,
    }
    ranks = gather_to_main(mine)
    manifest = write_shards(path, state.model, state.opt) if is_sharded(state.model) else None
    if not is_main_process():
        return path
    payload = run_payload(state, epoch_complete=epoch_complete)
    if ranks is not None and len(ranks) > 1:
        payload["ranks"] = ranks
    if manifest is not None:
        return save_with_shards(payload, path, manifest)
    return atomic_save(payload, path)


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
    weights = check_targets(path, data, state.model, targets, strict=True)
    check_loader(path, data, state)
    saved_callbacks = data["callbacks"]
    for key, cb in callback_keys(state.callbacks).items():
        if key in saved_callbacks:
            cb.load_state_dict(saved_callbacks[key])
    ckpt = restore(path, data, state.model, targets, weights, strict=True)
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
