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
    EvalState,
    History,
    HistoryFigure,
    ProgressBar,
    Status,
    StopTraining,
    TensorBoardLogger,
    TrainState,
    evaluate,
    fit,
    predict,
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
        assert_type(state.recorded_names, tuple[str, ...] | None)
        assert_type(state.should_stop, bool)
        assert_type(state.check_monitor("val_loss", "StopBelow"), None)
        if state.metrics["val_loss"] < self.threshold:
            raise StopTraining(f"val_loss below {self.threshold}")
        if state.epoch > 10:
            state.stop("enough")

    def on_after_backward(self, state: TrainState) -> None:
        assert_type(state.output, Any)

    def on_before_zero_grad(self, state: TrainState) -> None:
        assert_type(state.opt, torch.optim.Optimizer)

    def on_evaluate_end(self, state: EvalState) -> None:
        assert_type(state.metrics, dict[str, float])

    def on_predict_batch_end(self, state: EvalState) -> None:
        assert_type(state.step, int)


model = nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
dl = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
callbacks = [
    CSVLogger("runs/log.csv"),
    CSVLogger(Path("runs") / "log.csv"),
    TensorBoardLogger(Path("runs/tb")),
    EarlyStopping("val_loss", mode="min", patience=2),
    EarlyStopping(
        "val_accuracy",
        mode="max",
        patience=0,
        restore_best_weights=True,
        start_from_epoch=2,
        baseline=0.5,
        check_finite=False,
    ),
    ProgressBar(refresh_seconds=1.0),
    StopBelow(0.1),
]
history = fit(3, model, F.cross_entropy, opt, dl, dl, callbacks=callbacks, progress=False)
assert_type(history, History)
assert_type(history.status, Status)
assert_type(history.stop_reason, str | None)
plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max")
fit(1, model, F.cross_entropy, opt, dl, dl, scheduler=plateau, scheduler_monitor="val_loss")
assert_type(evaluate(model, F.cross_entropy, dl, callbacks=callbacks), dict[str, float])
assert_type(predict(model, dl, callbacks=callbacks), Tensor)
assert_type(history.plot(), HistoryFigure)
assert_type(history.plot("runs/history.png", title="run"), HistoryFigure)
assert_type(history.plot(Path("runs/history.png")), HistoryFigure)
assert_type(history.plot().get_suptitle(), str)
history.plot().savefig(Path("runs/history.svg"))
figure = history.plot()
assert isinstance(figure, Figure)  # the rest of matplotlib's API, by narrowing
assert_type(figure, Figure)
assert_type(history.keys(), list[str])
assert_type(show_training_loop(callbacks), str)
assert_type(HOOKS, tuple[str, ...])
assert_type(EarlyStopping().state_dict(), dict[str, Any])
assert_type(trainkit.__version__, str)
