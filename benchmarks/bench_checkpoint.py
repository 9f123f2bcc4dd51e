"""What checking a checkpoint costs: loading a 100 MB checkpoint with and without the checks.

    python benchmarks/bench_checkpoint.py [--reps 15] [--out benchmarks/checkpoint.md]

The checkpoint holds one `nn.Linear(3536, 3536)` (12.5 million float32 weights, 50 MB) and an
SGD optimizer with momentum (another 50 MB), written by `save_checkpoint`. Variants, each
restoring into a fresh model and optimizer:
- `torch.load + load_state_dict`: what `load_checkpoint` did before it checked anything;
- `archive check only`: the CRC-32 of every record, read in 1 MiB chunks (no load);
- `load_checkpoint`: archive check, `torch.load(weights_only=True)`, field, class and shape
  checks, then the restore.
The file is in the page cache (it is read once before timing): the figures are the CPU cost of
the checks, not the disk's speed.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
from pathlib import Path

import torch
from common import interleaved, machine, table
from torch import nn, optim

from trainkit import load_checkpoint, save_checkpoint
from trainkit._archive import verify_archive


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).with_name("checkpoint.md")))
    args = parser.parse_args()

    def objects() -> tuple[nn.Module, optim.Optimizer]:
        model = nn.Linear(3536, 3536)
        return model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.ckpt"
        model, opt = objects()
        torch.autograd.backward(model(torch.randn(2, 3536)).sum())
        opt.step()  # momentum buffers: the optimizer state is as large as the weights
        save_checkpoint(path, model=model, optimizer=opt, epoch=0, step=1)
        size_mb = path.stat().st_size / 1e6
        del model, opt
        target_model, target_opt = objects()

        def unchecked() -> None:
            data = torch.load(path, map_location="cpu", weights_only=True)
            target_model.load_state_dict(data["model"])
            target_opt.load_state_dict(data["optimizer"])

        def checked() -> None:
            load_checkpoint(path, model=target_model, optimizer=target_opt)

        variants = {
            "torch.load + load_state_dict (no checks)": unchecked,
            "archive check only (CRC-32 of every record)": lambda: verify_archive(path),
            "load_checkpoint (all checks, then restore)": checked,
        }
        times = interleaved(variants, args.reps)
    report = "\n\n".join(
        [
            "# Checkpoint checks: what loading a 100 MB checkpoint costs with them",
            f"Measured {datetime.date.today()} on {machine()}. "
            f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_checkpoint.py "
            f"--reps {args.reps}`.",
            f"A `save_checkpoint` file of {size_mb:.0f} MB: `nn.Linear(3536, 3536)` weights and "
            "SGD momentum buffers (50 MB each), restored into a model and optimizer made once; "
            "the file in the page cache; variants interleaved, one warm-up run each.",
            "Against the load without checks:\n\n"
            + table(times, "torch.load + load_state_dict (no checks)"),
        ]
    )
    Path(args.out).write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
