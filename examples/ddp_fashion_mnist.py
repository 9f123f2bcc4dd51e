"""The Quickstart model on FashionMNIST, the same script for one process or many.

    python examples/ddp_fashion_mnist.py                              # one process
    torchrun --nproc_per_node=2 examples/ddp_fashion_mnist.py         # two on this machine
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=4 \\
        examples/ddp_fashion_mnist.py                                 # and on several machines
    torchrun --max-restarts=3 --nproc_per_node=2 examples/ddp_fashion_mnist.py   # restartable
    torchrun --nproc_per_node=2 examples/ddp_fashion_mnist.py --fsdp  # the model sharded (FSDP2)

The only distributed line is `trainkit.distributed.init()`: it joins the process group torchrun
describes (gloo on CPU, nccl on CUDA) and does nothing under plain `python`. `get_data` then
shards the data, `fit` wraps the model in DistributedDataParallel, reduces the figures over all
processes, and lets only rank 0 print and write checkpoints.

The elastic recipe is `fit(..., resume="auto")`: a restarted job (torchrun's `--max-restarts`, a
requeued SLURM job, a rescheduled pod) continues from `--out`'s last.ckpt, a first one starts
fresh; SIGTERM saves last.ckpt after the current step and exits with status 143.

`--fsdp` shards the model with FSDP2's `fully_shard` (each Linear, then the whole model) before
the optimizer is built: `fit` then uses it as it is, and its checkpoints are written in shards
by every process (`torch.distributed.checkpoint`) beside `--out`'s files.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset
from torchvision.transforms import ToTensor

import trainkit.distributed
from trainkit import Accuracy, ModelCheckpoint, fashion_mnist, fit, get_data, seed_everything


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--data", default=None, help="folder holding FashionMNIST")
    parser.add_argument("--out", default="runs/ddp", help="checkpoint directory")
    parser.add_argument("--smoke", action="store_true", help="a few batches of the real data")
    parser.add_argument("--fsdp", action="store_true", help="shard the model (FSDP2)")
    args = parser.parse_args(argv)

    trainkit.distributed.init()
    seed_everything(0)
    train_ds = fashion_mnist(train=True, root=args.data, transform=ToTensor())
    test_ds = fashion_mnist(train=False, root=args.data, transform=ToTensor())
    if args.smoke:
        train_ds, test_ds = Subset(train_ds, range(512)), Subset(test_ds, range(256))
    train_dl, test_dl = get_data(train_ds, test_ds, args.batch_size)
    if trainkit.distributed.is_main_process():
        print(f"FashionMNIST (real data) on {trainkit.distributed.world_size()} process(es)")

    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )
    # one GPU per process: the one torchrun's LOCAL_RANK names (init() made it current)
    if torch.cuda.is_available():
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    if args.fsdp and trainkit.distributed.is_distributed():
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)  # the root last; the optimizer after sharding
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    checkpoints = ModelCheckpoint(
        Path(args.out), monitor="val_accuracy", mode="max", every_n_steps=200
    )
    fit(args.epochs, model, nn.CrossEntropyLoss(), opt, train_dl, test_dl, metrics=[Accuracy()],
        callbacks=[checkpoints], resume="auto")  # fmt: skip
    if trainkit.distributed.is_distributed():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
