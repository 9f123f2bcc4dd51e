"""The checkpoint format's version and marker, the record `load_checkpoint` returns and the error
every reader raises; re-exported by `trainkit.checkpoint`, where they are documented."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2
"""The checkpoint format this trainkit writes, and the only one it reads (version 1 was written
by pre-releases, without the class and loader records)."""

FORMAT_MARKER = "trainkit.checkpoint"
STATES = ("optimizer", "scheduler", "scaler")


class CheckpointError(ValueError):
    """A file that cannot be loaded as asked: unsafe, damaged, of another format or model.

    Example:
        >>> import torch
        >>> from trainkit import load_checkpoint
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


# Used by several internal modules, named (in tracebacks, reprs, pickles) by the module users
# import them from, where they are documented.
CheckpointError.__module__ = Checkpoint.__module__ = "trainkit.checkpoint"
