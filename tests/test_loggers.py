"""CSVLogger and TensorBoardLogger: a row / scalars per epoch, resume without duplicates, rank 0."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import trainkit
from trainkit import (
    Callback,
    CheckpointError,
    CSVLogger,
    EarlyStopping,
    History,
    ModelCheckpoint,
    StopTraining,
    TensorBoardLogger,
    TrainState,
    accuracy,
    fit,
    get_data,
)

ENV = {**os.environ, "PYTHONPATH": str(Path(trainkit.__file__).parents[1])}


class Resumed(Callback):
    """Makes `fit` run as a run resumed after `previous` would: the History holds the earlier
    epochs, and the epochs this run records are numbered on from there."""

    order = -20  # before the loggers, as a restored state would be

    def __init__(self, previous: History) -> None:
        self.previous = previous

    def on_fit_start(self, state: TrainState) -> None:
        state.history = History(self.previous.records)
        state.epoch = len(self.previous)

    def on_epoch_start(self, state: TrainState) -> None:
        state.epoch += len(self.previous)


class FailAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, state: TrainState) -> None:
        if state.epoch == self.epoch:
            raise RuntimeError(f"crash after epoch {state.epoch}")


def run(
    tabular: tuple[TensorDataset, TensorDataset],
    epochs: int,
    callbacks: list[Callback],
    *,
    seed: int = 0,
    metrics: bool = True,
    resume: Path | str | None = None,
) -> History:
    torch.manual_seed(seed)
    train_dl, valid_dl = get_data(*tabular, bs=64)
    model = nn.Linear(20, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return fit(
        epochs,
        model,
        F.cross_entropy,
        opt,
        train_dl,
        valid_dl,
        metrics=[accuracy] if metrics else [],
        callbacks=callbacks,
        progress=False,
        resume=resume,
    )


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def as_floats(rows: list[dict[str, str]]) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items() if v != ""} for row in rows]


# --- CSVLogger ---------------------------------------------------------------------------------


def test_csv_has_a_header_and_one_exact_row_per_epoch(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    path = tmp_path / "logs" / "run.csv"  # the folder is created
    history = run(tabular, 3, [CSVLogger(path)])
    fields, rows = read_csv(path)
    assert fields == ["epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"]
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert as_floats(rows) == history.records  # full precision: floats read back exactly
    assert not list(tmp_path.glob("logs/.*.tmp"))


def test_each_row_is_on_disk_when_its_epoch_ends(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    path = tmp_path / "run.csv"
    seen: list[list[str]] = []

    class Peek(Callback):
        def on_epoch_end(self, state: TrainState) -> None:
            seen.append([row["epoch"] for row in read_csv(path)[1]])

    run(tabular, 3, [Peek(), CSVLogger(path)])  # the logger's order puts it first anyway
    assert seen == [["1"], ["1", "2"], ["1", "2", "3"]]


def test_a_fresh_run_replaces_the_rows_of_an_earlier_run(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    path = tmp_path / "run.csv"
    run(tabular, 4, [CSVLogger(path)], seed=0)
    second = run(tabular, 2, [CSVLogger(path)], seed=1)
    assert as_floats(read_csv(path)[1]) == second.records


def test_resume_keeps_earlier_rows_and_appends_without_duplicates(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    path = tmp_path / "run.csv"
    first = run(tabular, 4, [CSVLogger(path)], seed=0)  # epochs 1-4 logged, then "crashed"
    # Resume from a checkpoint taken after epoch 2: epochs 3 and 4 are trained again.
    checkpointed = History(first.records[:2])
    second = run(tabular, 2, [Resumed(checkpointed), CSVLogger(path)], seed=1)

    assert [r["epoch"] for r in second.records] == [1, 2, 3, 4]
    rows = as_floats(read_csv(path)[1])
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]  # each epoch once
    assert rows[:2] == first.records[:2]  # kept from the first run
    assert rows[2:] == second.records[2:]  # from the resumed run, not the first
    assert rows[2] != first.records[2]


def test_resume_after_a_crash_continues_the_same_file(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    path = tmp_path / "run.csv"
    with pytest.raises(RuntimeError, match="crash after epoch 2"):
        run(tabular, 5, [CSVLogger(path), FailAt(2)])
    rows = as_floats(read_csv(path)[1])
    assert [row["epoch"] for row in rows] == [1, 2, 3]  # what finished is on disk
    resumed = run(tabular, 2, [Resumed(History(rows)), CSVLogger(path)])
    rows = as_floats(read_csv(path)[1])
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4, 5]
    assert rows[3:] == resumed.records[3:]


def test_csv_keeps_every_earlier_epoch_across_fit_resume(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    """2 epochs, then resume to 4: the file holds epochs 1-4, each once (#17, 1)."""
    path, ck = tmp_path / "log.csv", tmp_path / "ck"
    first = run(tabular, 2, [CSVLogger(path), ModelCheckpoint(ck)])
    second = run(tabular, 4, [CSVLogger(path), ModelCheckpoint(ck)], seed=1, resume=ck)
    rows = as_floats(read_csv(path)[1])
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert rows[:2] == first.records  # kept from the first run
    assert rows == second.records  # the resumed run's History holds them too


def test_csv_resume_writes_an_epoch_trained_again_once(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    """Epoch 3 was logged, then the run died before its checkpoint: resumed from the end of
    epoch 2, epoch 3 is trained again and its row replaced, not doubled."""
    path, ck = tmp_path / "log.csv", tmp_path / "ck"
    with pytest.raises(RuntimeError, match="crash after epoch 2"):
        run(tabular, 4, [CSVLogger(path), ModelCheckpoint(ck), FailAt(2)])
    assert [row["epoch"] for row in read_csv(path)[1]] == ["1", "2", "3"]
    first = as_floats(read_csv(path)[1])
    second = run(tabular, 4, [CSVLogger(path), ModelCheckpoint(ck)], resume=ck)
    rows = as_floats(read_csv(path)[1])
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert rows[:2] == first[:2]
    assert rows[2:] == second.records[2:]


def test_tensorboard_keeps_every_earlier_epoch_across_fit_resume(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    """2 epochs, then resume to 4: steps 1-4, each once (#17, 1)."""
    tb, ck = tmp_path / "tb", tmp_path / "ck"
    first = run(tabular, 2, [TensorBoardLogger(tb), ModelCheckpoint(ck)])
    second = run(tabular, 4, [TensorBoardLogger(tb), ModelCheckpoint(ck)], seed=1, resume=ck)
    for tag, points in scalars(tb).items():
        assert [step for step, _ in points] == [1, 2, 3, 4], tag
        assert [v for _, v in points] == pytest.approx(second[tag], rel=1e-6), tag
        assert [v for _, v in points][:2] == pytest.approx(first[tag], rel=1e-6), tag


def test_a_failed_start_changes_nothing_on_disk(
    tabular: tuple[TensorDataset, TensorDataset],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fit(resume="typo") raises CheckpointError; the existing log keeps its rows (#17, 2)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "log.csv"
    run(tabular, 3, [CSVLogger(path), TensorBoardLogger(tmp_path / "tb")])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"fit\(resume='typo'\): no such file or directory"):
        run(
            tabular,
            3,
            [CSVLogger(path), TensorBoardLogger(tmp_path / "tb"), CSVLogger("new/log.csv")],
            resume="typo",
        )
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert [row["epoch"] for row in read_csv(path)[1]] == ["1", "2", "3"]
    assert not (tmp_path / "new").exists()


# A child process whose file-size limit stands for a full disk: a write past it fails with
# EFBIG (SIGXFSZ ignored), part of it written, as a write to a full disk does.
DISK_FULL = """
import os, resource, signal, sys
import torch, torch.nn.functional as F
from trainkit import Callback, CSVLogger, fit

path, at, room = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

class FillDisk(Callback):
    order = -6  # just before the logger

    def on_epoch_end(self, state):
        if state.epoch + 1 == at:
            size = os.path.getsize(path) if os.path.exists(path) else 0
            resource.setrlimit(resource.RLIMIT_FSIZE, (size + room, resource.RLIM_INFINITY))

torch.manual_seed(0)
dl = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))] * 2
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
fit(5, model, F.cross_entropy, opt, dl, dl, callbacks=[FillDisk(), CSVLogger(path)],
    progress=False)
"""


def run_disk_full(tmp_path: Path, path: Path, at: int, room: int) -> str:
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL)
    result = subprocess.run(
        [sys.executable, str(script), str(path), str(at), str(room)],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    return result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_while_appending_leaves_whole_rows_only(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    err = run_disk_full(tmp_path, path, at=3, room=20)  # 20 bytes of room: part of row 3
    assert re.search(r"CSVLogger\(path=\.\.\.\) cannot append to the log \(File too large\)", err)
    text = path.read_text()
    assert text.endswith("\n")
    assert [row["epoch"] for row in read_csv(path)[1]] == ["1", "2"]
    assert all(len(row) == 5 and "" not in row.values() for row in read_csv(path)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk_full.py", "log.csv"]


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_while_rewriting_leaves_the_old_log_and_no_temporary_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.csv"
    path.write_text("epoch,train_loss\n1,0.5\n2,0.25\n")  # an earlier run's log
    err = run_disk_full(tmp_path, path, at=1, room=-20)  # not even room for the header
    assert "CSVLogger(path=...) cannot write the log (File too large)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk_full.py", "log.csv"]
    assert path.read_text() == "epoch,train_loss\n1,0.5\n2,0.25\n"


def test_a_new_figure_adds_a_column(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    path = tmp_path / "run.csv"
    first = run(tabular, 2, [CSVLogger(path)], metrics=False)
    run(tabular, 1, [Resumed(first), CSVLogger(path)], metrics=True)
    fields, rows = read_csv(path)
    assert fields == ["epoch", "train_loss", "val_loss", "lr", "seconds", "val_accuracy"]
    assert [row["val_accuracy"] for row in rows][:2] == ["", ""]
    assert float(rows[2]["val_accuracy"]) > 0


def test_the_epoch_that_early_stopping_stops_at_is_logged(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    class StopAtOnce(Callback):
        def on_epoch_end(self, state: TrainState) -> None:
            raise StopTraining("enough")

    path = tmp_path / "run.csv"
    history = run(tabular, 5, [StopAtOnce(), EarlyStopping(), CSVLogger(path)])
    assert len(history) == 1
    assert [row["epoch"] for row in read_csv(path)[1]] == ["1"]


def test_an_unwritable_path_names_the_argument_and_the_path(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=r"CSVLogger\(path=\.\.\.\) cannot write the log.*a_file"):
        run(tabular, 1, [CSVLogger(blocker / "run.csv")])
    folder = tmp_path / "a_folder.csv"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"CSVLogger\(path=\.\.\.\).*a_folder\.csv"):
        run(tabular, 1, [CSVLogger(folder)])


def test_a_file_that_is_not_a_csv_log_is_left_untouched(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    path = tmp_path / "notes.csv"
    path.write_text("name,score\nada,3\n")
    with pytest.raises(ValueError, match=r"notes.csv' exists and is not a trainkit CSV log"):
        run(tabular, 1, [CSVLogger(path)])
    assert path.read_text() == "name,score\nada,3\n"
    path.write_text("epoch,train_loss\n0,1.0\nlast,0.5\n")
    with pytest.raises(ValueError, match=r"epoch is 'last', not a number"):
        run(tabular, 1, [CSVLogger(path)])
    assert path.read_text() == "epoch,train_loss\n0,1.0\nlast,0.5\n"
    path.write_text("epoch,train_loss\n1,1.0\n2,0.5,7\n")
    with pytest.raises(ValueError, match=r"line 3 has more fields than its header"):
        run(tabular, 1, [CSVLogger(path)])
    assert path.read_text() == "epoch,train_loss\n1,1.0\n2,0.5,7\n"


def test_an_empty_existing_file_is_a_new_log(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    path = tmp_path / "run.csv"
    path.write_text("")
    run(tabular, 1, [CSVLogger(path)])
    assert [row["epoch"] for row in read_csv(path)[1]] == ["1"]


def test_repr_names_the_path() -> None:
    assert repr(CSVLogger("runs/x.csv")) == "CSVLogger('runs/x.csv')"


# --- TensorBoardLogger -------------------------------------------------------------------------


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_every_figure_per_epoch(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    logger = TensorBoardLogger(tmp_path / "tb")
    history = run(tabular, 3, [logger])
    found = scalars(tmp_path / "tb")
    assert sorted(found) == ["lr", "seconds", "train_loss", "val_accuracy", "val_loss"]
    for tag, points in found.items():
        assert [step for step, _ in points] == [1, 2, 3]
        assert [v for _, v in points] == pytest.approx(history[tag], rel=1e-6)
    assert logger._writer is None  # closed at the end of fit


def test_tensorboard_resume_purges_the_epochs_trained_again(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    first = run(tabular, 4, [TensorBoardLogger(tmp_path)], seed=0)
    second = run(tabular, 2, [Resumed(History(first.records[:2])), TensorBoardLogger(tmp_path)])
    points = scalars(tmp_path)["train_loss"]
    assert [step for step, _ in points] == [1, 2, 3, 4]  # one curve, no doubled steps
    expected = first["train_loss"][:2] + second["train_loss"][2:]
    assert [v for _, v in points] == pytest.approx(expected, rel=1e-6)


def test_tensorboard_writer_is_closed_when_the_run_fails(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    logger = TensorBoardLogger(tmp_path)
    with pytest.raises(RuntimeError, match="crash after epoch 1"):
        run(tabular, 3, [logger, FailAt(1)])
    assert logger._writer is None
    assert [s for s, _ in scalars(tmp_path)["val_loss"]] == [1, 2]


def test_tensorboard_unwritable_log_dir_names_the_argument(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=r"TensorBoardLogger\(log_dir=\.\.\.\) cannot create.*a_file"):
        run(tabular, 1, [TensorBoardLogger(blocker / "tb")])


def test_missing_tensorboard_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'trainkit\[tensorboard\]'") as err:
        TensorBoardLogger("tb")
    assert err.value.name == "tensorboard"


# --- rank 0 only ------------------------------------------------------------------------------

RANK = """
import sys
import torch, torch.distributed as dist
import torch.nn.functional as F
from trainkit import CSVLogger, TensorBoardLogger, fit

rank, out = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
try:
    torch.manual_seed(rank)
    dl = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loggers = [CSVLogger(f"{out}/rank{rank}.csv"), TensorBoardLogger(f"{out}/tb{rank}")]
    fit(2, model, F.cross_entropy, opt, dl, dl, callbacks=loggers, progress=False)
    dist.barrier()
finally:
    dist.destroy_process_group()
"""


def test_only_rank_zero_writes_under_distributed(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(tmp_path)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        for proc in ranks:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
    finally:  # a failed rank leaves the other waiting for it
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert [row["epoch"] for row in read_csv(tmp_path / "rank0.csv")[1]] == ["1", "2"]
    assert sorted(scalars(tmp_path / "tb0")) == ["lr", "seconds", "train_loss", "val_loss"]
    assert not (tmp_path / "rank1.csv").exists()
    assert not (tmp_path / "tb1").exists()


def test_a_non_zero_rank_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainkit.callbacks.loggers

    monkeypatch.setattr(trainkit.callbacks.loggers, "is_main_process", lambda: False)  # rank 3
    dl = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loggers: list[Callback] = [CSVLogger(tmp_path / "run.csv"), TensorBoardLogger(tmp_path / "tb")]
    fit(2, model, F.cross_entropy, opt, dl, dl, callbacks=loggers, progress=False)
    assert list(tmp_path.iterdir()) == []
