"""Mistakes a user's editor must flag: each line carries the error mypy must report.

`mypy --strict` warns about an ignore comment that silences nothing, so if trainkit's types
stopped catching one of these mistakes, `make test` would fail on that line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from trainkit import (
    Callback,
    CSVLogger,
    EarlyStopping,
    History,
    TrainState,
    WrappedDataLoader,
    evaluate,
    fit,
    load_checkpoint,
    save_checkpoint,
)

model = nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
train_dl = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)))

fit("3", model, F.cross_entropy, opt, train_dl)  # type: ignore[arg-type]
fit(3, model, F.cross_entropy, opt, train_dl, metrics=[42])  # type: ignore[list-item]
fit(3, model, F.cross_entropy, opt, train_dl, progress="yes")  # type: ignore[arg-type]
fit(3, model, F.cross_entropy, opt, train_dl, callbacks=[print])  # type: ignore[list-item]
evaluate(model, F.cross_entropy, train_dl)["loss"].upper()  # type: ignore[attr-defined]
History().plot(3)  # type: ignore[arg-type]
EarlyStopping(mode="maximum")  # type: ignore[arg-type]
CSVLogger(42)  # type: ignore[arg-type]

# checkpoints: a misspelt keyword, and each object only where its own kind belongs
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
save_checkpoint("a.ckpt", model=model, optimiser=opt, epoch=0, step=0)  # type: ignore[call-arg]
save_checkpoint("a.ckpt", model=opt, epoch=0, step=0)  # type: ignore[arg-type]
save_checkpoint("a.ckpt", model=model, optimizer=sched, epoch=0, step=0)  # type: ignore[arg-type]
save_checkpoint("a.ckpt", model=model, scheduler=opt, epoch=0, step=0)  # type: ignore[arg-type]
save_checkpoint("a.ckpt", model=model, scaler=sched, epoch=0, step=0)  # type: ignore[arg-type]
save_checkpoint("a.ckpt", model=model, epoch=0, step=0, extra={1: "x"})  # type: ignore[dict-item]
save_checkpoint("a.ckpt", model=model, epoch=0, step=0, note="x")  # type: ignore[call-arg]
load_checkpoint("a.ckpt", model=model, optimizer=model)  # type: ignore[arg-type]
load_checkpoint("a.ckpt", model=model, scheduler=opt)  # type: ignore[arg-type]


def scale(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return x * 2, y


for xb, _yb in WrappedDataLoader(train_dl, scale):
    xb.no_such_method()  # type: ignore[attr-defined]


class WrongHook(Callback):
    def on_epoch_end(self, state: int) -> None:  # type: ignore[override]
        pass

    def on_fit_end(self, state: TrainState) -> int:  # type: ignore[override]
        return 0
