"""Save checkpoints during `fit`: the best k by a monitored figure, and the last one."""

from __future__ import annotations

import bisect
import importlib.util
import math
import os
import re
import string
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from trainkit._lock import DirectoryLock, pid_alive
from trainkit._run_state import save_run
from trainkit._sharded import drop_shards, is_sharded, local
from trainkit.callbacks.base import Callback
from trainkit.checkpoint import CheckpointError, save_weights
from trainkit.distributed import all_reduce_flag, is_main_process
from trainkit.state import TrainState

__all__ = ["ModelCheckpoint"]

# Names a template may use besides `val_<...>`: what every epoch records, and `step`.
_ALWAYS = ("epoch", "step", "train_loss", "lr", "seconds")
_SAFE = "-_.=+,@"  # besides letters and digits: safe in a file name on every system
_SUFFIXES = (".ckpt", ".safetensors")
# a temporary file of trainkit's atomic writes: .<target>.<pid>[.<thread>.<random>].tmp
_TEMPORARY = re.compile(r"^\..+(?:\.ckpt|\.safetensors)\.(\d+)(?:\.\d+\.[0-9a-f]+)?\.tmp$")


class ModelCheckpoint(Callback):
    """Write checkpoints that `fit(resume=dirpath)` continues from exactly.

    After every epoch, `last.ckpt` is rewritten (with `save_last`), and the epoch is kept as a
    file named by `filename` (by default `epoch=E-<monitor>=V.ckpt`, E the epoch's number from
    1) if it is among the best `save_top_k` by `monitor`. Of epochs with equal values the newer
    is kept. Files that drop out of the best k are deleted only after the new one is safely on
    disk, and only files this callback wrote: names read back from a checkpoint that point
    outside `dirpath` are refused. With `every_n_steps`, `last.ckpt` is also rewritten every
    that many optimizer steps, so a killed run loses at most that many steps. On Ctrl-C,
    `last.ckpt` is written for the last completed step before the interrupt propagates (`fit`
    defers Ctrl-C to the end of the current step). Weights that are not finite are never
    written over a good checkpoint. Runs after the other callbacks (order 100), so their state
    is saved as they left it.

    For the length of a run the directory is locked (the file `.trainkit.lock`): a second run
    started on the same directory is refused, naming the first one's pid, rather than overwrite
    its checkpoints; a lock left by a process that died is taken over. Nothing is written
    before the run starts: a directory created for a run that saved nothing is removed again.

    Args:
        dirpath: Directory for the files (created if missing).
        monitor: A name recorded in `History` (`"val_loss"`, `"val_accuracy"`, ...), or `None`:
            no ranking, `last.ckpt` holds the latest epoch (and with `save_top_k=-1` every
            epoch is also kept as its own file).
        mode: `"min"` if lower is better, `"max"` if higher is better.
        save_top_k: How many best epochs to keep (0: none; -1: every epoch).
        save_last: Keep `last.ckpt` up to date.
        every_n_steps: Also save `last.ckpt` every that many optimizer steps.
        every_n_epochs: Save at the end of every that many epochs only (epochs `n`, `2n`, ...),
            as Lightning's option of that name; `last.ckpt` is also written at the run's last
            epoch, so a finished run is never trained again on resume.
        filename: The best files' name without extension: a template of `{name}` or
            `{name:format}` fields, each written as `name=value` (`"{epoch}-{val_loss:.4f}"`
            gives `epoch=3-val_loss=0.2812.ckpt`). Fields: `epoch` (from 1), `step` (optimizer
            steps so far), and any name the run records (`train_loss`, `lr`, `seconds`,
            `val_loss`, `val_<metric>`). A character of a field's name that is unsafe in a file
            name (`/`, `:`, a space...) is written as `_` (`val_top/1` gives `val_top_1=...`);
            the template's own text must be safe. A name already kept gets `-v1`, `-v2`, ...
            By default `"{epoch}-{<monitor>:.4f}"`, or `"{epoch}"` without a monitor.
        save_weights_only: Keep the best epochs as `.safetensors` files of the model's weights
            alone (`save_weights`; readable by `load_weights` and other tools) rather than full
            checkpoints. `last.ckpt` stays a full checkpoint, for `fit(resume=...)`.

    Raises:
        ValueError: a bad `mode`, `save_top_k`, `every_n_steps`, `every_n_epochs`, `monitor`
            or `filename` (named in the message, with the valid choices); at `on_fit_start`,
            before the first step, `monitor` or a `filename` field is not a name the run
            records (the names it records listed, with the closest one).
        ModuleNotFoundError: `save_weights_only=True` without the safetensors package.
        RuntimeError: at the start of `fit`, another live run holds `dirpath` (its pid named).
        KeyError: at the end of an epoch, `monitor` or a `filename` field is not recorded (the
            names that are, listed; only outside `fit`'s checks, e.g. a figure a callback adds
            without declaring it).
        CheckpointError: on resume, the saved state names a file outside `dirpath`.
        OSError: the directory or a file cannot be written (named); older files are kept.

    Example:
        >>> mc = ModelCheckpoint("ckpt", monitor="val_accuracy", mode="max", save_top_k=3,
        ...                      filename="{epoch}-{val_accuracy:.3f}", every_n_steps=500)
        >>> mc.format_name({"epoch": 7, "step": 3500, "val_accuracy": 0.91234})
        'epoch=7-val_accuracy=0.912.ckpt'
        >>> ModelCheckpoint("ckpt", save_top_k=-1).format_name({"epoch": 2, "val_loss": 0.25})
        'epoch=2-val_loss=0.2500.ckpt'
        >>> ModelCheckpoint("ckpt", every_n_epochs=5, save_top_k=0).every_n_epochs
        5
        >>> best = ModelCheckpoint("ckpt", save_weights_only=True)
        >>> best.format_name({"epoch": 4, "val_loss": 0.5})
        'epoch=4-val_loss=0.5000.safetensors'
        >>> ModelCheckpoint("ckpt", monitor=None).format_name({"epoch": 9})  # last.ckpt only
        'epoch=9.ckpt'
        >>> history = fit(10, model, loss_func, opt, train_dl, valid_dl, callbacks=[mc],
        ...               resume="ckpt" if mc.last_path.exists() else None)  # doctest: +SKIP
    """

    order = 100

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        *,
        monitor: str | None = "val_loss",
        mode: Literal["min", "max"] = "min",
        save_top_k: int = 1,
        save_last: bool = True,
        every_n_steps: int | None = None,
        every_n_epochs: int = 1,
        filename: str | None = None,
        save_weights_only: bool = False,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"ModelCheckpoint(mode=...): expected 'min' or 'max', got {mode!r}")
        if not _is_int(save_top_k) or save_top_k < -1:
            raise ValueError(
                "ModelCheckpoint(save_top_k=...): expected an int >= 0, or -1 to keep every "
                f"epoch, got {save_top_k!r}"
            )
        if every_n_steps is not None and (not _is_int(every_n_steps) or every_n_steps < 1):
            raise ValueError(
                "ModelCheckpoint(every_n_steps=...): expected None or an int >= 1, "
                f"got {every_n_steps!r}"
            )
        if not _is_int(every_n_epochs) or every_n_epochs < 1:
            raise ValueError(
                f"ModelCheckpoint(every_n_epochs=...): expected an int >= 1, got {every_n_epochs!r}"
            )
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(
                "ModelCheckpoint(monitor=...): expected a recorded name such as 'val_loss', or "
                f"None for no ranking, got {monitor!r}"
            )
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise ValueError(
                f"ModelCheckpoint(save_top_k={save_top_k}, monitor=None): without a monitor "
                "there is nothing to rank by; use save_top_k=-1 to keep every epoch, or name a "
                "monitor"
            )
        if monitor is None and not save_last and save_top_k != -1:
            raise ValueError(
                "ModelCheckpoint(monitor=None, save_last=False): this would write nothing; keep "
                "save_last=True, or use save_top_k=-1 to keep every epoch"
            )
        if save_weights_only and importlib.util.find_spec("safetensors") is None:
            raise ModuleNotFoundError(
                "ModelCheckpoint(save_weights_only=True) writes .safetensors files, which needs "
                "the safetensors package: pip install 'trainkit[safetensors]'",
                name="safetensors",
            )
        if filename is None:
            filename = "{epoch}" if monitor is None else "{epoch}-{" + monitor + ":.4f}"
        self.dirpath: Path = Path(dirpath)
        self.monitor: str | None = monitor
        self.mode: Literal["min", "max"] = mode
        self.save_top_k: int = save_top_k
        self.save_last: bool = save_last
        self.every_n_steps: int | None = every_n_steps
        self.every_n_epochs: int = every_n_epochs
        self.filename: str = filename
        self.save_weights_only = save_weights_only
        self._template = _parse_template(filename, monitor)
        self.best: list[tuple[float, str]] = []  # (score, file name): best first, ties newer first
        self._steps_seen = 0
        self._at_step_boundary = True
        self._lock = DirectoryLock(self.dirpath, f"ModelCheckpoint(dirpath={str(dirpath)!r})")
        self._created: list[Path] = []  # folders this run made, deepest first

    @property
    def last_path(self) -> Path:
        """Where `last.ckpt` is written."""
        return self.dirpath / "last.ckpt"

    def format_name(self, values: dict[str, float]) -> str:
        """The file name `filename` gives for these figures (before any `-v1` suffix).

        Args:
            values: The figures by name: `epoch`, and whatever the template uses.

        Returns:
            The name, with the extension (`.ckpt`, or `.safetensors` with `save_weights_only`).

        Raises:
            KeyError: a field of the template is not in `values` (those that are, listed).

        Example:
            >>> ModelCheckpoint("ck", filename="{epoch}-{val_top/1:.2f}").format_name(
            ...     {"epoch": 3, "val_top/1": 0.5})
            'epoch=3-val_top_1=0.50.ckpt'
        """
        parts = []
        for literal, field, spec in self._template:
            parts.append(literal)
            if field is None:
                continue
            if field not in values:
                raise KeyError(
                    f"ModelCheckpoint(filename={self.filename!r}) uses {field!r}; this run "
                    f"records {sorted(values)}"
                )
            parts.append(_safe(f"{field}={format(values[field], spec)}"))
        name = "".join(parts)
        if name.startswith("."):  # a field whose name starts with '.': no hidden files
            name = "_" + name[1:]
        return name + (".safetensors" if self.save_weights_only else ".ckpt")

    def on_fit_start(self, state: TrainState) -> None:
        """Refuse a `monitor` or file-name field the run will not record; create, lock `dirpath`."""
        # every rank refuses a name the run will not record, before anything is written
        if self.save_top_k:  # (with save_top_k=0 neither the monitor nor the template is used)
            if self.monitor is not None:
                state.check_monitor(self.monitor, "ModelCheckpoint(monitor=...)")
            for _, field, _ in self._template:
                if field is not None and field not in ("epoch", "step"):
                    state.check_monitor(field, f"ModelCheckpoint(filename={self.filename!r})")
        if not is_main_process():  # under a process group only rank 0 writes
            return
        self._created = [p for p in (self.dirpath, *self.dirpath.parents) if not p.exists()]
        try:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(
                err.errno, f"ModelCheckpoint(dirpath=...) cannot create it ({err.strerror})",
                str(err.filename or self.dirpath),
            ) from err  # fmt: skip
        try:
            self._lock.acquire()
        except BaseException:
            self._remove_created()
            raise
        for path in self.dirpath.glob(".*.tmp"):  # left by a process killed mid-write
            found = _TEMPORARY.match(path.name)
            if found and not pid_alive(int(found.group(1))):
                path.unlink(missing_ok=True)
        self._steps_seen = state.global_step

    def on_train_batch_end(self, state: TrainState) -> None:
        """Save the last checkpoint every `every_n_steps` optimizer steps, when asked to."""
        stepped = state.global_step != self._steps_seen
        self._steps_seen, self._at_step_boundary = state.global_step, stepped
        if stepped and self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._write(self.last_path, state, epoch_complete=False)

    def on_epoch_end(self, state: TrainState) -> None:
        """Save the last checkpoint, and keep the epoch among the best `save_top_k` by `monitor`."""
        number = state.epoch + 1
        due = number % self.every_n_epochs == 0
        if due and self.monitor is not None and self.save_top_k:
            if self.monitor not in state.metrics:
                raise KeyError(
                    f"ModelCheckpoint monitors {self.monitor!r}; this run records "
                    f"{sorted(state.metrics)}"
                )
            value = float(state.metrics[self.monitor])
            self._keep_if_best(state, value if self.mode == "min" else -value)
        elif due and self.save_top_k == -1:  # no monitor: every epoch, newest first
            self._keep_if_best(state, 0.0)
        if self.save_last and (due or number == state.epochs):
            self._write(self.last_path, state, epoch_complete=True)

    def on_exception(self, state: TrainState, exc: BaseException) -> None:
        """On Ctrl-C at a step boundary, save the last checkpoint, so the run can resume there."""
        if not (
            isinstance(exc, KeyboardInterrupt) and self._at_step_boundary and state.batches_done
        ):
            return
        if self._write(self.last_path, state, epoch_complete=False) and is_main_process():
            print(f"interrupted: saved {self.last_path}", file=sys.stderr, flush=True)

    def on_fit_end(self, state: TrainState) -> None:
        """Release the lock on `dirpath`."""
        if self._lock.held:
            self._lock.release()
            self._remove_created()

    def _keep_if_best(self, state: TrainState, score: float) -> None:
        """Keep this epoch if among the best k by `score` (lower is better; ties: the newer)."""
        if math.isnan(score):
            if self.save_top_k != -1:
                return  # never among the best
            score = math.inf  # every epoch is kept: this one ranked last
        at = bisect.bisect_left([s for s, _ in self.best], score)  # before older equal scores
        k = self.save_top_k
        if k != -1 and at >= k:
            return
        above, below = self.best[:at], self.best[at:]
        dropped = below[k - 1 - at :] if k != -1 else []
        below = below[: len(below) - len(dropped)]
        name = self._free_name(state, {n for _, n in (*above, *below)})
        if not self._write(self.dirpath / name, state, epoch_complete=True, best=True):
            return
        self.best = [*above, (score, name), *below]
        for _, old in dropped:
            if is_main_process() and old != name:  # only now that the new one is safe
                gone = self.dirpath / _confined(old, self.dirpath)
                gone.unlink(missing_ok=True)
                drop_shards(gone)  # the shards of a sharded model's checkpoint

    def _free_name(self, state: TrainState, taken: set[str]) -> str:
        values = {**state.metrics, "epoch": state.epoch + 1, "step": state.global_step}
        name = self.format_name(values)
        stem, suffix = name.removesuffix(_suffix(name)), _suffix(name)
        version = 0
        while name in taken or name == self.last_path.name:
            version += 1
            name = f"{stem}-v{version}{suffix}"
        return name

    def _write(
        self, path: Path, state: TrainState, *, epoch_complete: bool, best: bool = False
    ) -> bool:
        # every rank checks (the same weights under DDP) and takes part in save_run (which
        # gathers each rank's random state and running loss); only rank 0 writes
        params = [local(p.detach()) for p in state.model.parameters()]
        finite = not params or bool(torch.stack([p.isfinite().all() for p in params]).all())
        sharded = is_sharded(state.model)
        if sharded:  # each rank checked its own shards
            finite = not all_reduce_flag(not finite)
        if not finite:
            if is_main_process():
                print(f"ModelCheckpoint: weights not finite; {path} not written", file=sys.stderr)
            return False
        if best and self.save_weights_only:
            if is_main_process() or sharded:  # sharded: gathered by every rank, written by 0
                save_weights(path, state.model)
        else:
            save_run(path, state, epoch_complete=epoch_complete)
        return True

    def _remove_created(self) -> None:
        """Remove the folders this run created, if it left them empty."""
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def state_dict(self) -> dict[str, Any]:
        """The best files kept so far, with their scores, for checkpoints."""
        return {"best": [[score, name] for score, name in self.best]}

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        """Restore the best files' list, refusing names that are not files of `dirpath`.

        Raises:
            CheckpointError: an entry is not a `[score, name]` pair, or a name is not a plain
                `.ckpt` / `.safetensors` file name (such as `"/abs/victim"` or `"../victim"`):
                a checkpoint must never make this callback delete a file elsewhere.
        """
        best = state_dict.get("best") if isinstance(state_dict, dict) else None
        if not isinstance(best, list):
            raise CheckpointError(
                f"ModelCheckpoint: the checkpoint's saved state has no list of best files "
                f"({state_dict!r:.200}); it is damaged or was not written by trainkit"
            )
        entries: list[tuple[float, str]] = []
        for entry in best:
            if (
                not isinstance(entry, list | tuple)
                or len(entry) != 2
                or not isinstance(entry[0], int | float)
                or isinstance(entry[0], bool)
                or math.isnan(entry[0])
                or not isinstance(entry[1], str)
            ):
                raise CheckpointError(
                    f"ModelCheckpoint: the checkpoint's saved state has {entry!r:.200} among "
                    "its best files, not a [score, file name] pair; it is damaged or was not "
                    "written by trainkit"
                )
            entries.append((float(entry[0]), _confined(entry[1], self.dirpath)))
        self.best = sorted(entries, key=lambda e: e[0])  # stable: ties keep newer first

    def __repr__(self) -> str:
        return (
            f"ModelCheckpoint({str(self.dirpath)!r}, monitor={self.monitor!r}, mode={self.mode!r}, "
            f"save_top_k={self.save_top_k}, every_n_steps={self.every_n_steps}, "
            f"every_n_epochs={self.every_n_epochs}, filename={self.filename!r}, "
            f"save_weights_only={self.save_weights_only})"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in _SAFE else "_" for c in text)


def _suffix(name: str) -> str:
    return next(s for s in _SUFFIXES if name.endswith(s))


def _confined(name: str, dirpath: Path) -> str:
    """`name` if it is a file this callback could have written in `dirpath`; else refused."""
    if (
        Path(name).name != name
        or os.sep in name
        or "/" in name
        or (os.altsep is not None and os.altsep in name)
        or "\0" in name
        or name.startswith(".")
        or not name.endswith(_SUFFIXES)
        or name == "last.ckpt"
    ):
        raise CheckpointError(
            f"ModelCheckpoint: the checkpoint's saved state names {name!r} as one of its best "
            f"files, which is not a checkpoint file name inside dirpath {str(dirpath)!r}. "
            "ModelCheckpoint deletes only files it wrote there, so this state is refused: the "
            "checkpoint is damaged or was crafted. Resume from another checkpoint."
        )
    return name


def _parse_template(filename: str, monitor: str | None) -> list[tuple[str, str | None, str]]:
    """`(literal text, field or None, format spec)` parts of a `filename` template, checked.

    A field must be a name a run can record (or the monitor, whose name is checked with it)."""
    if not isinstance(filename, str) or not filename:
        raise ValueError(f"ModelCheckpoint(filename=...): expected a template, got {filename!r}")

    def refuse(problem: str) -> ValueError:
        return ValueError(f"ModelCheckpoint(filename={filename!r}): {problem}")

    try:
        parsed = list(string.Formatter().parse(filename))
    except ValueError as err:
        raise refuse(f"not a valid template ({err}); fields look like {{epoch}}") from None
    parts: list[tuple[str, str | None, str]] = []
    for literal, field, format_spec, conversion in parsed:
        spec = format_spec or ""
        unsafe = sorted({c for c in literal if not (c.isalnum() or c in _SAFE)})
        if unsafe:
            raise refuse(
                f"{''.join(unsafe)!r} is not safe in a file name; outside fields use letters, "
                f"digits and {_SAFE!r}"
            )
        if field is None:
            parts.append((literal, None, ""))
            continue
        if not field or field.isdigit() or conversion or "{" in spec:
            raise refuse(
                "fields are names with an optional format, such as {epoch} or {val_loss:.4f}"
            )
        if field not in _ALWAYS and field != monitor and not field.startswith("val_"):
            raise refuse(
                f"unknown field {field!r}; fields are the names a run records: "
                f"{', '.join(_ALWAYS)}, val_loss and val_<metric> for each metric"
            )
        try:
            format(1 if field in ("epoch", "step") else 0.5, spec)
        except ValueError as err:
            raise refuse(f"the format {spec!r} of {field!r} does not apply: {err}") from None
        parts.append((literal, field, spec))
    if filename.startswith("."):
        raise refuse("a name starting with '.' would be a hidden file")
    if filename.endswith(_SUFFIXES):
        raise refuse("give the name without extension; '.ckpt' (or '.safetensors') is added")
    return parts
