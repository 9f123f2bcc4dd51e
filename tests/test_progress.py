"""ProgressBar: every bar ends at its total, validation shows, a line every N seconds in logs.

The notebook side (ipywidgets bars, no warning without ipywidgets) is in test_notebook.py.
"""

from __future__ import annotations

import csv
import io
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, TensorDataset
from tqdm.std import tqdm

from trainkit import Callback, CSVLogger, ProgressBar, StopTraining, TrainState, accuracy, fit


def setup(
    n_train: int = 40, n_valid: int = 12, batch_size: int = 4
) -> tuple[nn.Module, optim.Optimizer, DataLoader[Any], DataLoader[Any]]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(n_train + n_valid, 3), torch.randint(0, 2, (n_train + n_valid,))
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch_size)
    valid = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=batch_size)
    return model, optim.SGD(model.parameters(), lr=0.1), train, valid


@pytest.fixture
def closed_bars(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int | None]]:
    """(description, count, total) of every tqdm bar as it is closed."""
    closed: list[tuple[str, int, int | None]] = []
    close = tqdm.close

    def recording_close(self: tqdm[Any]) -> None:
        if not self.disable:
            total = None if self.total is None else int(self.total)
            closed.append((self.desc, int(self.n), total))
        close(self)

    monkeypatch.setattr(tqdm, "close", recording_close)
    return closed


class Clock:
    """A stand-in for time.perf_counter that advances only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tick(Callback):
    """Advance the clock by `seconds` after each batch, before the progress bar sees it."""

    order = -20

    def __init__(self, clock: Clock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def on_train_batch_end(self, state: TrainState) -> None:
        self.clock.now += self.seconds

    def on_validation_batch_end(self, state: TrainState) -> None:
        self.clock.now += self.seconds


# --- item: the bar finishes ------------------------------------------------------------------


@pytest.mark.parametrize("refresh_seconds", [3600.0, 0.0])
def test_every_bar_ends_at_its_total(
    closed_bars: list[tuple[str, int, int | None]],
    capsys: pytest.CaptureFixture[str],
    refresh_seconds: float,
) -> None:
    """With a refresh interval longer than the run, the bar was closed at 0/10 (and at 927/938
    on FashionMNIST): the batches since the last refresh were never counted."""
    model, opt, train, valid = setup()
    bar = ProgressBar(force_bar=True, refresh_seconds=refresh_seconds)
    fit(2, model, F.cross_entropy, opt, train, valid, progress=False, callbacks=[bar])
    assert closed_bars == [("epoch 1/2", 10, 10), ("epoch 2/2", 10, 10)]
    err = capsys.readouterr().err
    # the last drawing of each bar: full, and the validation batches counted
    assert err.count("10/10") >= 2 and err.count("valid=3/3") >= 2


def test_a_bar_cut_short_is_closed_where_it_stopped(
    closed_bars: list[tuple[str, int, int | None]],
) -> None:
    class StopAtSeven(Callback):
        def on_train_batch_end(self, state: TrainState) -> None:
            if state.batches_done == 7:
                raise StopTraining("enough")

    model, opt, train, _ = setup()
    bar = ProgressBar(force_bar=True, refresh_seconds=3600)
    fit(1, model, F.cross_entropy, opt, train, progress=False, callbacks=[bar, StopAtSeven()])
    assert closed_bars == [("epoch 1/1", 7, 10)]  # where it stopped: tqdm marks it unfinished


def test_the_bar_shows_validation_progress(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a terminal the bar used to freeze during validation with no sign of it."""
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    model, opt, train, valid = setup(n_valid=40)  # ten validation batches
    bar = ProgressBar(force_bar=True, refresh_seconds=1.0)
    fit(1, model, F.cross_entropy, opt, train, valid, progress=False,
        callbacks=[bar, Tick(clock, 0.5)])  # fmt: skip
    err = capsys.readouterr().err
    shown = [int(n) for n in re.findall(r"valid=(\d+)/10", err)]
    assert shown[0] == 1 and shown[-1] == 10 and len(set(shown)) >= 5, shown
    assert "10/10" in err.split("valid=")[0]  # the training count is full before validation


# --- item: lines every N seconds when not on a terminal ---------------------------------------


def test_log_lines_every_n_seconds_during_training_and_validation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    out = io.StringIO()
    model, opt, train, valid = setup(n_valid=40)  # ten training, ten validation batches
    bar = ProgressBar(log_seconds=30, file=out)  # not a terminal here: no bar
    fit(1, model, F.cross_entropy, opt, train, valid, progress=False,
        callbacks=[bar, Tick(clock, 10.0)])  # fmt: skip
    lines = out.getvalue().splitlines()
    progress_lines = [line for line in lines if "train_loss" not in line]
    assert [re.sub(r"loss [\d.]+", "loss L", line) for line in progress_lines] == [
        "epoch 1/1  train 3/10  loss L  30.0s",
        "epoch 1/1  train 6/10  loss L  60.0s",
        "epoch 1/1  train 9/10  loss L  90.0s",
        "epoch 1/1  validation 2/10  120.0s",
        "epoch 1/1  validation 5/10  150.0s",
        "epoch 1/1  validation 8/10  180.0s",
    ]
    assert lines[-1].startswith("epoch 1/1  train_loss ")  # then the epoch's line


def test_the_default_interval_is_30_seconds_and_none_turns_the_lines_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ProgressBar().log_seconds == 30.0
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    for log_seconds, expected in [(30.0, 3), (None, 0)]:
        out = io.StringIO()
        model, opt, train, _ = setup()
        bar = ProgressBar(log_seconds=log_seconds, file=out)
        fit(1, model, F.cross_entropy, opt, train, progress=False,
            callbacks=[bar, Tick(clock, 10.0)])  # fmt: skip
        assert out.getvalue().count("  train ") == expected


@pytest.mark.parametrize("log_seconds", [0, -1.0])
def test_log_seconds_must_be_positive(log_seconds: float) -> None:
    with pytest.raises(ValueError, match=r"ProgressBar\(log_seconds=...\): must be > 0"):
        ProgressBar(log_seconds=log_seconds)


def test_log_lines_read_the_loss_only_when_they_print(monkeypatch: pytest.MonkeyPatch) -> None:
    """No read-back per step: 20 steps cost the reads of 10 steps plus one per printed line."""
    reads = 0
    item = torch.Tensor.item

    def counting_item(self: Tensor) -> Any:
        nonlocal reads
        reads += 1
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    counts = []
    for n_train, seconds in [(40, 0.0), (80, 0.0), (80, 10.0)]:
        model, opt, train, _ = setup(n_train=n_train)
        reads = 0
        bar = ProgressBar(log_seconds=30, file=io.StringIO())
        fit(1, model, F.cross_entropy, opt, train, progress=False,
            callbacks=[bar, Tick(clock, seconds)])  # fmt: skip
        counts.append(reads)
    assert counts[0] == counts[1]  # no per-step read
    assert counts[2] == counts[1] + 6  # 20 steps of 10 s: a line (one read) every 3 steps


# --- epochs numbered from 1 everywhere a user reads them --------------------------------------


def test_bar_epoch_lines_history_csv_and_plot_agree_on_epoch_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, opt, train, valid = setup()
    out = io.StringIO()
    callbacks = [ProgressBar(force_bar=True, file=out), CSVLogger(tmp_path / "log.csv")]
    history = fit(3, model, F.cross_entropy, opt, train, valid, metrics=[accuracy],
                  progress=False, callbacks=callbacks)  # fmt: skip
    expected = [1, 2, 3]
    bars = sorted({int(n) for n in re.findall(r"epoch (\d+)/3:", capsys.readouterr().err)})
    lines = [int(n) for n in re.findall(r"^epoch (\d+)/3  train_loss", out.getvalue(), re.M)]
    with (tmp_path / "log.csv").open(newline="") as f:
        rows = [int(row["epoch"]) for row in csv.DictReader(f)]
    (train_line, _), *_ = [ax.get_lines() for ax in history.plot().axes]
    assert bars == lines == history["epoch"] == rows == expected
    assert np.asarray(train_line.get_xdata()).tolist() == expected
    assert str(history).splitlines()[1].split()[0] == "1"  # the table's first row
