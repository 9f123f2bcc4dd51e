"""A training run for the crash tests: `python resume_child.py DIR EPOCHS EVERY_N_STEPS`.

Trains a small MLP on fixed random data with a ModelCheckpoint in DIR (resuming from it when
it holds a last.ckpt), prints "step N" after every optimizer step, and saves the final weights
to DIR/final.pth.
"""

from __future__ import annotations

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


def main(dirpath: Path, epochs: int, every_n_steps: int) -> None:
    seed_everything(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(480, 256, generator=g), torch.randint(0, 10, (480,), generator=g)
    train_dl = DataLoader(TensorDataset(x[:400], y[:400]), batch_size=16, shuffle=True)
    valid_dl = DataLoader(TensorDataset(x[400:], y[400:]), batch_size=40)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Dropout(0.2), nn.Linear(1024, 10))
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    resume = dirpath if (dirpath / "last.ckpt").is_file() else None
    fit(epochs, model, F.cross_entropy, opt, train_dl, valid_dl, progress=False, resume=resume,
        callbacks=[Report(), ModelCheckpoint(dirpath, every_n_steps=every_n_steps)])  # fmt: skip
    save_weights(dirpath / "final.pth", model)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
