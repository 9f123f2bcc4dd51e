"""A training run for the preemption and multi-process resume tests, started as torchrun starts
its workers (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment; plain `python` for
one process):

`python dist_child.py DIR EPOCHS [--term EPOCH BATCH RANK] [--resume WHAT] [--every N]`

Trains a small MLP with BatchNorm and dropout on fixed random data (shuffled, sharded by
`get_data`; every rank seeded differently) with a `ModelCheckpoint` in DIR, and saves each
rank's final weights and History records (without `seconds`) to DIR/final-rank{R}.pt.
`--term`: rank RANK sends itself a real SIGTERM as batch BATCH of epoch EPOCH (from 0) starts.
`--resume`: passed to `fit(resume=...)` (`auto` by default). `--sync-bn`:
`fit(sync_batchnorm=True)`. `--wait-at STEP FILE`: after optimizer step STEP, wait (30 s at
most) until FILE exists. `--vote-seconds S`: `StopVote.seconds`. `--kill-at STEP RANK`: under
torchrun's first attempt (`TORCHELASTIC_RESTART_COUNT` 0), rank RANK kills itself with SIGKILL
after optimizer step STEP, as a lost node would (no save, no message). Prints "step N" per batch.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import TensorDataset

import trainkit.distributed
from procs import run_and_exit
from trainkit import Callback, ModelCheckpoint, TrainState, fit, get_data, seed_everything


def datasets() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(301, 20, generator=g)
    y = (x[:, :3] * torch.tensor([1.0, 2.0, 3.0])).argmax(1)
    return TensorDataset(x[:200], y[:200]), TensorDataset(x[200:], y[200:])


def make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3)
    )


class Report(Callback):
    def on_train_batch_end(self, state: TrainState) -> None:
        print(f"step {state.global_step}", flush=True)


class WaitAt(Callback):
    """After optimizer step `step`, wait until `path` exists (the test sent its signal)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, state: TrainState) -> None:
        if state.global_step == self.step:
            deadline = time.monotonic() + 30
            while not self.path.exists() and time.monotonic() < deadline:
                time.sleep(0.01)


class KillAt(Callback):
    """SIGKILL this process after optimizer step `step`: nothing runs after it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, state: TrainState) -> None:
        if state.global_step == self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class TermAt(Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, state: TrainState) -> None:
        if (state.epoch, state.step) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("epochs", type=int)
    parser.add_argument("--term", type=int, nargs=3)
    parser.add_argument("--resume", default="auto")
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--sync-bn", action="store_true")
    parser.add_argument("--wait-at", nargs=2)
    parser.add_argument("--vote-seconds", type=float)
    parser.add_argument("--kill-at", type=int, nargs=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.vote_seconds is not None:  # 0: the processes vote on stopping after every step
        trainkit.distributed.StopVote.seconds = args.vote_seconds
    trainkit.distributed.init(timeout_seconds=60)
    rank = trainkit.distributed.rank()
    try:
        seed_everything(rank)  # different on purpose: each rank's generators must be restored
        train_dl, valid_dl = get_data(*datasets(), 16)
        model = make_model()
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        callbacks: list[Callback] = [Report(), ModelCheckpoint(args.dir, every_n_steps=args.every)]
        if args.wait_at is not None:
            callbacks.append(WaitAt(int(args.wait_at[0]), Path(args.wait_at[1])))
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if args.kill_at is not None and args.kill_at[1] == rank and first_attempt:
            callbacks.append(KillAt(args.kill_at[0]))
        if args.term is not None and args.term[2] == rank:
            callbacks.append(TermAt(args.term[0], args.term[1]))
        history = fit(args.epochs, model, F.cross_entropy, opt, train_dl, valid_dl,
                      progress=False, callbacks=callbacks, resume=args.resume,
                      sync_batchnorm=args.sync_bn)  # fmt: skip
        records = [{k: v for k, v in r.items() if k != "seconds"} for r in history.records]
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "records": records},
            args.dir / f"final-rank{rank}.pt",
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_and_exit(main)
