"""What the preemption vote costs per step under a process group: `fit` with and without it.

    python benchmarks/bench_preemption.py [--reps 9] [--steps 150] [--out benchmarks/preemption.md]

Two processes on gloo over loopback (as torchrun starts them), each training an MLP
(20-32-3, batch 16) for `--steps` optimizer steps per `fit`. Variants, interleaved in both
processes at once (a barrier before each run):
- `no vote`: `StopVote.after_step` replaced by one that returns at once (fit as before #18);
- `vote`: the shipped `fit`: after each optimizer step, wait for the previous step's
  asynchronous all-reduce of one integer (long finished) and start the next.
Rank 0's times are reported; the figure is per `fit` of `--steps` steps.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import interleaved, machine, table
from torch import nn, optim
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import trainkit.distributed
from trainkit import fit


def _worker(rank: int, port: int, reps: int, steps: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    trainkit.distributed.init(timeout_seconds=120)
    x = torch.randn(32 * steps, 20, generator=torch.Generator().manual_seed(0))
    ds = TensorDataset(x, x[:, :3].argmax(1))
    dl = DataLoader(ds, batch_size=16, sampler=DistributedSampler(ds))
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = optim.SGD(model.parameters(), lr=0.01)
    shipped = trainkit.distributed.StopVote.after_step

    def no_vote(self: Any) -> bool:
        return False

    def run(vote: bool) -> None:
        trainkit.distributed.StopVote.after_step = shipped if vote else no_vote  # type: ignore[method-assign]
        dist.barrier()
        fit(1, model, F.cross_entropy, opt, dl, progress=False, terminate_on_nan=False)

    times = interleaved({"no vote": lambda: run(False), "vote": lambda: run(True)}, reps)
    if rank == 0:
        Path(out).write_text(
            f"# The preemption vote under 2 processes (gloo, loopback)\n\n"
            f"`python benchmarks/bench_preemption.py --reps {reps} --steps {steps}` "
            f"({datetime.date.today()}; {machine()}; {steps} steps per fit):\n\n"
            + table(times, "no vote")
            + "\n"
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default="benchmarks/preemption.md")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, port, args.reps, args.steps, args.out))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
