"""Callbacks, loggers and plots as a user's editor sees them: checked by mypy, never run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, assert_type

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

import trainkit
from trainkit import (
    HOOKS,
    Callback,
    CSVLogger,
    EarlyStopping,
    History,
    ProgressBar,
    Status,
    StopTraining,
    TensorBoardLogger,
    TrainState,
    fit,
    show_training_loop,
)


class StopBelow(Callback):
    order = 10

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def on_epoch_end(self, state: TrainState) -> None:
        assert_type(state.metrics, dict[str, float])
        assert_type(state.history, History)
        assert_type(state.loss, Tensor | None)
        assert_type(state.status, Status)
        assert_type(state.epoch, int)
        if state.metrics["val_loss"] < self.threshold:
            raise StopTraining(f"val_loss below {self.threshold}")


model = nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
dl = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
callbacks = [
    CSVLogger("runs/log.csv"),
    CSVLogger(Path("runs") / "log.csv"),
    TensorBoardLogger(Path("runs/tb")),
    EarlyStopping("val_loss", mode="min", patience=2),
    ProgressBar(refresh_seconds=1.0),
    StopBelow(0.1),
]
history = fit(3, model, F.cross_entropy, opt, dl, dl, callbacks=callbacks, progress=False)
assert_type(history, History)
assert_type(history.plot(), Figure)
assert_type(history.plot("runs/history.png", title="run"), Figure)
assert_type(history.plot(Path("runs/history.png")), Figure)
assert_type(history.keys(), list[str])
assert_type(show_training_loop(callbacks), str)
assert_type(HOOKS, tuple[str, ...])
assert_type(EarlyStopping().state_dict(), dict[str, Any])
assert_type(trainkit.__version__, str)
