"""A training run of a model sharded with FSDP2's `fully_shard`, for tests/test_fsdp.py, started
as torchrun starts its workers (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment;
plain `python` for one process, where the model is not sharded):

`python fsdp_child.py DIR EPOCHS [--term EPOCH BATCH] [--resume WHAT] [--every N] [--top-k K]
[--accumulate A] [--clip C] [--ddp]`

The same data in every mode: 200 training samples, fixed order; under 2 processes each takes
every other sample of a batch of 16 (`ShardSampler`), one process takes batches of 16 whole,
so both compute the same gradients up to rounding. Validation: 101 samples (shards of 51 and
50). Writes DIR/final.pt on rank 0: the whole weights, History records (without `seconds`),
`evaluate` and (rank 0's rows of) `predict` over the validation loader after training.
`--term`: rank 0 sends itself SIGTERM as batch BATCH of epoch EPOCH (from 0) starts.
`--ddp`: under 2 processes, leave the model unsharded (`fit` wraps it in DDP).
`--blocks-only`: shard the layers but not the model itself. `--compile`: `fit(compile=True)`.
`--restore-best`: with `EarlyStopping(restore_best_weights=True)`. `--lr-find`: `lr_find` first.
`--weights-only`: `ModelCheckpoint(save_weights_only=True)`. `--fail-read-back`: rank 1 cannot
read back the shards it wrote.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader

import trainkit._sharded
import trainkit.distributed
from dist_child import TermAt, datasets
from procs import run_and_exit
from trainkit import (
    Callback,
    EarlyStopping,
    ModelCheckpoint,
    accuracy,
    evaluate,
    fit,
    lr_find,
    predict,
)
from trainkit.distributed import ShardSampler


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("epochs", type=int)
    parser.add_argument("--term", type=int, nargs=2)
    parser.add_argument("--resume", default="auto")
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--clip", type=float)
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--blocks-only", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--restore-best", action="store_true")
    parser.add_argument("--lr-find", action="store_true")
    parser.add_argument("--weights-only", action="store_true")
    parser.add_argument("--fail-read-back", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainkit.distributed.init(timeout_seconds=60)
    rank, world = trainkit.distributed.rank(), trainkit.distributed.world_size()
    if args.fail_read_back and rank == 1:  # rank 1 alone cannot read back what it wrote

        def unreadable(path: Path) -> list[int]:
            raise OSError(f"simulated read error on {path.name}")

        trainkit._sharded._size_and_crc = unreadable
    try:
        train_ds, valid_ds = datasets()
        model = make_model()
        if world > 1 and not args.ddp:
            from torch.distributed.fsdp import fully_shard

            for layer in (model[0], model[2], model[4]):
                fully_shard(layer)
            if not args.blocks_only:
                fully_shard(model)
        opt = optim.Adam(model.parameters(), lr=1e-2)
        scheduler = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        sampler = ShardSampler(train_ds) if world > 1 else None
        train_dl = DataLoader(train_ds, batch_size=16 // world, sampler=sampler)
        # shards of 51 and 50 samples: 3 batches on rank 0, 2 on rank 1
        valid_dl = DataLoader(valid_ds, batch_size=25, sampler=ShardSampler(valid_ds))
        callbacks: list[Callback] = [
            ModelCheckpoint(
                args.dir,
                every_n_steps=args.every,
                save_top_k=args.top_k,
                monitor="val_loss",
                save_weights_only=args.weights_only,
            )
        ]
        if args.restore_best:
            callbacks.append(EarlyStopping("val_loss", restore_best_weights=True))
        if args.term is not None and rank == 0:
            callbacks.append(TermAt(*args.term))
        if args.lr_find:
            lr_find(model, F.cross_entropy, opt, train_dl)
        history = fit(args.epochs, model, F.cross_entropy, opt, train_dl, valid_dl,
                      metrics={"accuracy": accuracy}, scheduler=scheduler, progress=False,
                      callbacks=callbacks, resume=args.resume, accumulate=args.accumulate,
                      clip_grad_norm=args.clip, compile=args.compile)  # fmt: skip
        gathered_whole = resharded = False
        if world > 1 and not args.ddp:
            from torch.distributed.tensor import DTensor

            from trainkit._sharded import gathered

            with gathered(model):  # every block's parameters whole, before any forward
                gathered_whole = not any(isinstance(p, DTensor) for p in model.parameters())
            resharded = all(isinstance(p, DTensor) for p in model.parameters())
        evaluated = evaluate(model, F.cross_entropy, valid_dl, [accuracy])
        predicted = predict(model, valid_dl)
        records = [{k: v for k, v in r.items() if k != "seconds"} for r in history.records]
        weights = trainkit.save_weights(args.dir / "final-weights.pt", model)
        if rank == 0:
            torch.save(
                {
                    "model": torch.load(weights, weights_only=True),
                    "records": records,
                    "evaluated": evaluated,
                    "predicted": predicted,  # rank 0's rows
                    "gathered": [gathered_whole, resharded],
                },
                args.dir / "final.pt",
            )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_and_exit(main)
