"""Elastic restarts and DDP checkpoints under torchrun: 2 processes, gloo on loopback, CPU.

    python benchmarks/bench_distributed.py [--reps 5] [--sizes 10 100] [--saves 2]
                                           [--out benchmarks/distributed.md]

Two parts, each launching `python -m torch.distributed.run --standalone --nproc-per-node=2`
(with `--max-restarts=3`) on this script in worker mode:

- **restart**: `fit(resume="auto")` with `ModelCheckpoint(every_n_steps=25)`, an MLP
  (20-32-3, BatchNorm, dropout) on 2048 shuffled samples, batch 16: 4 epochs of 64 steps.
  Variants, interleaved: `uninterrupted`, and `SIGKILL at step 160` (rank 1 kills itself after
  step 160 of the first attempt; torchrun restarts both workers, which resume from step 150's
  last.ckpt). Whole-job wall time (torchrun's start to its exit) per variant, and for the killed
  runs the restart, stage by stage: kill -> the new workers running (torch imported) ->
  trainkit imported -> process group joined -> resumed and first optimizer step done.
- **checkpoint**: an MLP of `--sizes` million parameters (square `Linear` layers, SGD with
  momentum: the optimizer state is as large as the weights) under DDP, `--saves` optimizer steps
  per `fit`, a save after each step, timed on rank 0 from the start to the end of the callback.
  Variants, interleaved (each repetition one `fit` per variant, rotated order):
  `torch.save` (a hand-written `torch.save({"model", "optimizer"})` on rank 0), `torch.save +
  fsync + rename` (the same, made durable and atomic by hand), and `ModelCheckpoint last.ckpt`
  (trainkit: finiteness check, BatchNorm broadcast, every rank's RNG and running loss gathered
  to rank 0, atomic write with fsync). Files go to `--dir` (default: a temporary directory on
  the disk of the system's temporary directory).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve()
RESTART_STEPS, KILL_AT, EVERY = 256, 160, 25


# ---- worker mode (under torchrun) -------------------------------------------------------


def _log(path: Path, event: str) -> None:
    with path.open("a") as f:
        f.write(f"{event} {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')} "
                f"{os.environ.get('RANK', '0')} {time.time():.6f}\n")  # fmt: skip


def _restart_worker(run_dir: Path, kill: bool, events: Path) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn, optim
    from torch.utils.data import TensorDataset

    import trainkit.distributed
    from trainkit import Callback, ModelCheckpoint, TrainState, fit, get_data, seed_everything

    _log(events, "imported")
    trainkit.distributed.init(timeout_seconds=60)
    _log(events, "joined")
    rank = trainkit.distributed.rank()
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    class Events(Callback):
        def __init__(self) -> None:
            self.first = True

        def on_train_batch_end(self, state: TrainState) -> None:
            if self.first:
                self.first = False
                _log(events, f"first-step-{state.global_step}")
            if kill and first_attempt and rank == 1 and state.global_step == KILL_AT:
                _log(events, "kill")
                os.kill(os.getpid(), signal.SIGKILL)

    seed_everything(rank)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048 + 256, 20, generator=g)
    y = (x[:, :3] * torch.tensor([1.0, 2.0, 3.0])).argmax(1)
    train_dl, valid_dl = get_data(
        TensorDataset(x[:2048], y[:2048]), TensorDataset(x[2048:], y[2048:]), 16
    )
    model = nn.Sequential(
        nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3)
    )
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpoints = ModelCheckpoint(run_dir, every_n_steps=EVERY)
    fit(RESTART_STEPS // 64, model, F.cross_entropy, opt, train_dl, valid_dl, progress=False,
        callbacks=[Events(), checkpoints], resume="auto")  # fmt: skip
    dist.destroy_process_group()


def _disk(path: Path) -> int:
    """Bytes on disk of a checkpoint: the file, plus a sharded one's shards directory."""
    size = path.stat().st_size if path.is_file() else 0
    for d in [path] if path.is_dir() else path.parent.glob(f"{path.name}.shards-*"):
        size += sum(f.stat().st_size for f in d.iterdir())
    return size


def _checkpoint_worker(
    size_m: int, saves: int, reps: int, out_dir: Path, result: Path, sharded: bool
) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from common import interleaved
    from torch import nn, optim

    import trainkit.distributed
    from trainkit import Callback, ModelCheckpoint, TrainState, fit

    trainkit.distributed.init(timeout_seconds=600)
    rank = trainkit.distributed.rank()
    torch.manual_seed(0)
    layers = 2 if size_m <= 20 else 4
    width = round((size_m * 1e6 / layers) ** 0.5)
    model = nn.Sequential(*(m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())))
    n_params = sum(p.numel() for p in model.parameters())
    if sharded:  # FSDP2: each Linear, then the root; each rank holds half of every tensor
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    opt = optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(8, width, generator=g), torch.randn(8, width, generator=g))
               for _ in range(saves)]  # fmt: skip
    times: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}

    class Timed(Callback):
        """Times `save` after every optimizer step (rank 0's clock, on every rank)."""

        def __init__(self, name: str, path: Path) -> None:
            self.name, self.path = name, path

        def save(self, state: TrainState) -> None:
            raise NotImplementedError

        def on_train_batch_end(self, state: TrainState) -> None:
            start = time.perf_counter()
            self.save(state)
            times.setdefault(self.name, []).append(time.perf_counter() - start)
            if rank == 0:
                sizes[self.name] = _disk(self.path)

    class PlainSave(Timed):
        def save(self, state: TrainState) -> None:
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, self.path)

    class DurableSave(Timed):
        def save(self, state: TrainState) -> None:
            if rank == 0:
                tmp = self.path.with_suffix(".tmp")
                with tmp.open("wb") as f:
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    class DcpSave(Timed):
        """A hand-written sharded save: every rank writes its shards with DCP."""

        def save(self, state: TrainState) -> None:
            from torch.distributed.checkpoint.state_dict import get_state_dict
            from torch.distributed.checkpoint.state_dict_saver import save

            model_state, opt_state = get_state_dict(model, opt)
            save({"model": model_state, "optimizer": opt_state}, checkpoint_id=self.path)

    class TimedCheckpoint(ModelCheckpoint):
        def on_train_batch_end(self, state: TrainState) -> None:
            start = time.perf_counter()
            super().on_train_batch_end(state)
            times.setdefault("ModelCheckpoint last.ckpt", []).append(time.perf_counter() - start)
            if rank == 0:
                sizes["ModelCheckpoint last.ckpt"] = _disk(self.last_path)

    counter = [0]

    def run(make: Any) -> None:
        counter[0] += 1
        folder = out_dir / f"fit{counter[0]}"
        if rank == 0:
            folder.mkdir()
        dist.barrier()
        fit(1, model, F.mse_loss, opt, batches, progress=False, terminate_on_nan=False,
            callbacks=[make(folder)])  # fmt: skip
        dist.barrier()
        if rank == 0:
            shutil.rmtree(folder)

    last = {
        "ModelCheckpoint last.ckpt": lambda: run(
            lambda d: TimedCheckpoint(d, monitor=None, save_top_k=0, every_n_steps=1)
        )
    }
    if sharded:
        variants = {"dcp.save": lambda: run(lambda d: DcpSave("dcp.save", d / "ref")), **last}
    else:
        variants = {
            "torch.save": lambda: run(lambda d: PlainSave("torch.save", d / "ref.pt")),
            "torch.save + fsync + rename": lambda: run(
                lambda d: DurableSave("torch.save + fsync + rename", d / "ref.pt")
            ),
            **last,
        }
    interleaved(variants, reps)  # the per-run times are discarded; the per-save ones kept
    if rank == 0:
        per_save = {k: v[saves:] for k, v in times.items()}  # without the warm-up run's saves
        torch.save({"times": per_save, "sizes": sizes, "params": n_params}, result)
    dist.destroy_process_group()


# ---- driver -------------------------------------------------------------------------------


def _torchrun(*args: str, timeout: float) -> tuple[int, float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "--max-restarts=3", str(HERE), *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return proc.returncode, time.time() - start, proc.stdout + proc.stderr


def _restart_part(reps: int) -> str:
    from common import table

    times: dict[str, list[float]] = {"uninterrupted": [], f"SIGKILL at step {KILL_AT}": []}
    stages: dict[str, list[float]] = {}
    names = list(times)
    for rep in range(reps + 1):  # the first round is a warm-up
        for name in names[rep % 2 :] + names[: rep % 2]:
            with tempfile.TemporaryDirectory() as tmp:
                events = Path(tmp) / "events"
                kill = name != "uninterrupted"
                code, wall, out = _torchrun("--worker-restart", tmp, str(int(kill)), str(events),
                                            timeout=300)  # fmt: skip
                if code != 0:
                    raise RuntimeError(f"torchrun failed ({code}):\n{out[-3000:]}")
                if rep == 0:
                    continue
                times[name].append(wall)
                if kill:
                    ev = [line.split() for line in events.read_text().splitlines()]
                    t_kill = next(float(t) for e, _, _, t in ev if e == "kill")
                    after = [(e, float(t)) for e, attempt, _, t in ev if attempt != "0"]
                    start = min(t for e, t in after if e == "start")
                    imported = max(t for e, t in after if e == "imported")
                    joined = max(t for e, t in after if e == "joined")
                    first = max(t for e, t in after if e.startswith("first-step"))
                    for key, value in (
                        ("kill -> new workers running (torch imported)", start - t_kill),
                        ("-> trainkit imported", imported - start),
                        ("-> process group joined (`init()`)", joined - imported),
                        ("-> resumed, first step done", first - joined),
                        ("kill -> first step of the restarted attempt", first - t_kill),
                    ):
                        stages.setdefault(key, []).append(value)
    rows = "\n".join(
        f"| {k} | {statistics.median(v):.2f} | {min(v):.2f}-{max(v):.2f} |"
        for k, v in stages.items()
    )
    extra = statistics.median(k - u for k, u in zip(times[names[1]], times[names[0]], strict=True))
    return (
        f"## Restart after a SIGKILL\n\n"
        f"{RESTART_STEPS} optimizer steps (4 epochs of 64), last.ckpt every {EVERY} steps, rank 1 "
        f"SIGKILLed after step {KILL_AT} of the first attempt (so steps "
        f"{KILL_AT // EVERY * EVERY + 1}-{KILL_AT} are redone); whole job, torchrun's start "
        "to its exit:\n\n"
        + table(times, "uninterrupted")
        + f"\n\nMedian extra wall time of the killed job (paired): {extra:.2f} s.\n\n"
        "The restart, stage by stage (medians over the killed runs, seconds):\n\n"
        "| stage | median s | min-max s |\n|---|---|---|\n" + rows + "\n"
    )


def _checkpoint_part(
    sizes: list[int], saves: int, reps: int, out_dir: str | None, sharded: bool = False
) -> str:
    from common import table

    parts = []
    for size_m in sizes:
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            result = Path(tmp) / "result.pt"
            code, _, out = _torchrun("--worker-checkpoint", str(size_m), str(saves), str(reps),
                                     tmp, str(result), str(int(sharded)),
                                     timeout=3600)  # fmt: skip
            if code != 0:
                raise RuntimeError(f"torchrun failed ({code}):\n{out[-3000:]}")
            data = torch.load(result, weights_only=True)
        mb = {k: v / 1e6 for k, v in data["sizes"].items()}
        sizes_line = ", ".join(f"{k}: {v:.1f} MB" for k, v in mb.items())
        reference = "dcp.save" if sharded else "torch.save"
        parts.append(
            f"### {data['params'] / 1e6:.1f} M parameters ({data['params'] * 4 / 1e6:.0f} MB of "
            f"float32 weights, as much again of momentum)\n\nOn disk: {sizes_line}.\n\n"
            + table(data["times"], reference)
            + "\n"
        )
    return "\n".join(parts)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker-restart":
        _log(Path(sys.argv[4]), "start")
        torch.set_num_threads(1)
        _restart_worker(Path(sys.argv[2]), sys.argv[3] == "1", Path(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--worker-checkpoint":
        torch.set_num_threads(1)
        size_m, saves, reps, out_dir, result, sharded = sys.argv[2:8]
        _checkpoint_worker(
            int(size_m), int(saves), int(reps), Path(out_dir), Path(result), sharded == "1"
        )
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10, 100])
    parser.add_argument("--saves", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where checkpoints are written")
    parser.add_argument("--skip-restart", action="store_true")
    parser.add_argument("--out", default=str(HERE.with_name("distributed.md")))
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from common import machine

    command = "python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:])
    text = (
        "# Elastic restarts, DDP and sharded checkpoints under torchrun "
        "(2 processes, gloo, loopback)\n\n"
        f"Measured {datetime.date.today()} on {machine()} ({os.cpu_count()} cores, "
        f"{platform.system()}). Command: `OMP_NUM_THREADS=1 {command.strip()}`.\n\n"
    )
    if not args.skip_restart:
        text += _restart_part(args.reps) + "\n"
    text += "## Checkpoint write time under DDP (rank 0, per save)\n\n"
    text += _checkpoint_part(args.sizes, args.saves, args.reps, args.dir)
    text += (
        "\n## Sharded checkpoints under FSDP2 (torch.distributed.checkpoint, per save)\n\n"
        "The same models sharded with `fully_shard` (each `Linear`, then the root); the time "
        "of a save on rank 0, every rank writing its half. Variants, interleaved: `dcp.save` "
        "(hand-written: `get_state_dict` and `torch.distributed.checkpoint.save`, which "
        "fsyncs each file) and `ModelCheckpoint last.ckpt` (trainkit: the same DCP save into "
        "a new directory, each rank's CRC-32 of its files gathered, the directory fsynced, "
        "rank 0's file written atomically, the previous save's directory removed).\n\n"
    )
    text += _checkpoint_part(args.sizes, args.saves, args.reps, args.dir, sharded=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
