"""A training run for the crash tests:
`python resume_child.py DIR EPOCHS EVERY_N_STEPS [ACCUMULATE [SIGINT_AT_BATCH]]`.

Trains a small MLP on fixed random data with a ModelCheckpoint in DIR (resuming from it when
it holds a last.ckpt), prints "step N" after every batch (N: optimizer steps so far), and saves
the final weights to DIR/final.pth. With ACCUMULATE, an optimizer step every that many batches.
With SIGINT_AT_BATCH, the process sends itself a real SIGINT (Ctrl-C) as that batch (counted
from 0 in the first epoch) starts.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

from trainkit import Callback, ModelCheckpoint, TrainState, fit, save_weights, seed_everything


class Report(Callback):
    def on_train_batch_end(self, state: TrainState) -> None:
        print(f"step {state.global_step}", flush=True)


class SigintAt(Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, state: TrainState) -> None:
        if state.epoch == 0 and state.step == self.batch:
            os.kill(os.getpid(), signal.SIGINT)


def main(
    dirpath: Path, epochs: int, every_n_steps: int, accumulate: int, sigint_at: int | None
) -> None:
    seed_everything(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(480, 256, generator=g), torch.randint(0, 10, (480,), generator=g)
    train_dl = DataLoader(TensorDataset(x[:400], y[:400]), batch_size=16, shuffle=True)
    valid_dl = DataLoader(TensorDataset(x[400:], y[400:]), batch_size=40)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Dropout(0.2), nn.Linear(1024, 10))
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    resume = dirpath if (dirpath / "last.ckpt").is_file() else None
    callbacks: list[Callback] = [Report(), ModelCheckpoint(dirpath, every_n_steps=every_n_steps)]
    if sigint_at is not None:
        callbacks.append(SigintAt(sigint_at))
    fit(epochs, model, F.cross_entropy, opt, train_dl, valid_dl, progress=False, resume=resume,
        accumulate=accumulate, callbacks=callbacks)  # fmt: skip
    save_weights(dirpath / "final.pth", model)


if __name__ == "__main__":
    epochs, every_n_steps, *rest = (int(a) for a in sys.argv[2:])
    accumulate = rest[0] if rest else 1
    sigint_at = rest[1] if len(rest) > 1 else None
    main(Path(sys.argv[1]), epochs, every_n_steps, accumulate, sigint_at)
