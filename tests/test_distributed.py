"""fit under torch.distributed on CPU with gloo: 2 processes started by the test, time-bounded."""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

import trainkit.distributed
from trainkit import (
    Accuracy,
    Callback,
    ModelCheckpoint,
    PerClassAccuracy,
    TrainState,
    evaluate,
    fit,
    get_data,
    load_checkpoint,
    seed_everything,
)


def datasets() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(301, 20, generator=g)
    y = (x[:, :3] * torch.tensor([1.0, 2.0, 3.0])).argmax(1)
    return TensorDataset(x[:200], y[:200]), TensorDataset(x[200:], y[200:])  # 101: uneven shards


def make_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 3))


class FailAt(Callback):
    def on_train_batch_end(self, state: TrainState) -> None:
        if state.global_step == 3:
            raise RuntimeError("rank 1 broke")


def _worker(rank: int, port: int, tmp: str, fail: bool) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # as torchrun sets them
    torch.set_num_threads(1)
    assert trainkit.distributed.init(timeout_seconds=60)
    try:
        seed_everything(rank)  # different on purpose: DDP must make the ranks agree
        train_ds, valid_ds = datasets()
        train_dl, valid_dl = get_data(train_ds, valid_ds, 16)
        model = make_model()
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        callbacks: list[Callback] = [
            ModelCheckpoint(Path(tmp) / f"ckpt-rank{rank}", monitor="val_loss")
        ]
        if fail and rank == 1:
            callbacks.append(FailAt())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            history = fit(
                2,
                model,
                F.cross_entropy,
                opt,
                train_dl,
                valid_dl,
                metrics=[Accuracy(), PerClassAccuracy(3)],
                callbacks=callbacks,
            )
        torch.save(
            {
                "params": model.state_dict(),
                "records": history.records,
                "stdout": out.getvalue(),
                "per_class": history.tensors("val_per_class_accuracy")[-1],
            },
            Path(tmp) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def run_two(
    tmp: Path, *, fail: bool = False, timeout: float = 120
) -> tuple[list[int | None], float]:
    return run_two_with(_worker, tmp, fail, timeout=timeout)


def run_two_with(
    target: Callable[..., None], tmp: Path, *args: Any, timeout: float = 120
) -> tuple[list[int | None], float]:
    """Run `target(rank, port, str(tmp), *args)` in 2 spawned processes, bounded in time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=target, args=(rank, port, str(tmp), *args)) for rank in range(2)]
    start = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=max(0.0, start + timeout - time.monotonic()))
    hung = [w for w in workers if w.is_alive()]
    for w in hung:
        w.kill()
    assert not hung, f"{len(hung)} process(es) still running after {timeout} s: a hang"
    return [w.exitcode for w in workers], time.monotonic() - start


def test_two_processes_agree_with_one(tmp_path: Path) -> None:
    codes, _ = run_two(tmp_path)
    assert codes == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    # after each epoch the parameters are identical on both ranks
    assert all(
        torch.equal(a, b) for a, b in zip(r0["params"].values(), r1["params"].values(), strict=True)
    )
    # every rank's History holds the global figures
    assert r0["records"] == [
        {**r, "seconds": s["seconds"]} for r, s in zip(r1["records"], r0["records"], strict=True)
    ]
    # only rank 0 wrote files and printed
    assert (tmp_path / "ckpt-rank0" / "last.ckpt").is_file() and not (
        tmp_path / "ckpt-rank1"
    ).exists()
    assert r1["stdout"] == "" and r0["stdout"].count("epoch ") == 2
    # the 2-process checkpoint loads into a plain model in one process ...
    model = make_model()
    load_checkpoint(tmp_path / "ckpt-rank0" / "last.ckpt", model=model)
    # ... and the reduced validation figures equal one process's over the same 101 samples
    per_class = PerClassAccuracy(3)
    single = evaluate(
        model, F.cross_entropy, DataLoader(datasets()[1], batch_size=7), [Accuracy(), per_class]
    )
    assert r0["records"][-1]["val_loss"] == pytest.approx(single["loss"], abs=1e-6)
    assert r0["records"][-1]["val_accuracy"] == pytest.approx(single["accuracy"], abs=1e-6)
    assert torch.allclose(r0["per_class"], per_class.compute(), atol=1e-6, equal_nan=True)


def test_an_error_on_one_rank_ends_both(tmp_path: Path) -> None:
    codes, seconds = run_two(tmp_path, fail=True, timeout=90)
    assert codes[1] != 0 and codes[0] != 0  # both ended with an error, neither hangs
    assert seconds < 90


def test_init_without_torchrun_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert trainkit.distributed.init() is False
    assert (trainkit.distributed.rank(), trainkit.distributed.world_size()) == (0, 1)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="RANK and WORLD_SIZE must both be set"):
        trainkit.distributed.init()


def test_shard_sampler_covers_every_sample_once() -> None:
    shards: list[Any] = [
        list(trainkit.distributed.ShardSampler(range(101), num_replicas=3, rank=r))
        for r in range(3)
    ]
    assert sorted(i for shard in shards for i in shard) == list(range(101))
    with pytest.raises(ValueError, match="rank 3 not in"):
        trainkit.distributed.ShardSampler(range(5), num_replicas=3, rank=3)


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp"])
def test_the_ddp_example_runs_under_torchrun(tmp_path: Path, sharded: bool) -> None:
    import subprocess
    import sys

    from trainkit import fashion_mnist

    try:
        fashion_mnist(train=False, download=False)
    except FileNotFoundError as err:
        pytest.skip(f"real FashionMNIST not on this machine: {err}")
    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_fashion_mnist.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(example), "--smoke", "--epochs", "2", "--out", str(tmp_path),
           *(["--fsdp"] if sharded else [])]  # fmt: skip
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    assert result.stdout.count("epoch 2/2") == 1  # printed by rank 0 only
    assert (tmp_path / "last.ckpt").is_file()
    # sharded: every process wrote its shards beside the file
    shards = list(tmp_path.glob("last.ckpt.shards-*/__1_0.distcp"))
    assert len(shards) == (1 if sharded else 0)
