"""Data-setup mistakes under a process group are warned about, and `evaluate(sync=False)` runs
on one rank alone: 2 processes on gloo over loopback, bounded in time."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import optim
from torch.utils.data import DataLoader, DistributedSampler

import trainkit.distributed
from test_distributed import datasets, make_model, run_two_with
from trainkit import Accuracy, evaluate, fit


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    assert trainkit.distributed.init(timeout_seconds=30)
    try:
        train_ds, valid_ds = datasets()  # 200 and 101 samples
        model = make_model()
        opt = optim.SGD(model.parameters(), lr=0.1)
        found: dict[str, list[str]] = {}
        cases = {
            "unsharded train, padded valid": (
                DataLoader(train_ds, batch_size=16, shuffle=True),
                DataLoader(valid_ds, batch_size=32, sampler=DistributedSampler(valid_ds)),
            ),
            "unsharded valid, drop_last": (
                DataLoader(train_ds, batch_size=16, sampler=DistributedSampler(train_ds)),
                DataLoader(valid_ds, batch_size=32, drop_last=True),
            ),
        }
        for name, (train_dl, valid_dl) in cases.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fit(1, model, F.cross_entropy, opt, train_dl, valid_dl, progress=False)
            found[name] = [str(w.message) for w in caught]
        alone: dict[str, float] = {}
        if rank == 0:  # rank 1 calls nothing: no collective may be waited for
            whole = DataLoader(valid_ds, batch_size=7)
            alone = evaluate(model, F.cross_entropy, whole, [Accuracy()], sync=False)
        dist.barrier()
        torch.save({"found": found, "alone": alone, "model": model.state_dict()},
                   Path(tmp) / f"rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_data_setup_mistakes_warn_and_evaluate_runs_on_one_rank(tmp_path: Path) -> None:
    codes, _ = run_two_with(_worker, tmp_path, timeout=90)
    assert codes == [0, 0]
    for rank in range(2):
        found = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["found"]
        first, second = found["unsharded train, padded valid"], found["unsharded valid, drop_last"]
        assert any("training loader draws from a RandomSampler" in m for m in first), first
        assert any("DistributedSampler pads with repeated samples 1 sample(s) (101 over 2" in m
                   for m in first), first  # fmt: skip
        assert not any("training loader" in m for m in second), second
        assert any("is not sharded (SequentialSampler)" in m and "each sample 2 times" in m
                   for m in second), second  # fmt: skip
        assert any("drop_last=True" in m for m in second), second
    saved = torch.load(tmp_path / "rank0.pt", weights_only=True)
    model = make_model()
    model.load_state_dict(saved["model"])
    x, y = datasets()[1].tensors
    model.eval()
    with torch.no_grad():
        out = model(x)
    alone = saved["alone"]
    assert alone["loss"] == pytest.approx(F.cross_entropy(out, y).item(), abs=1e-6)
    assert alone["accuracy"] == pytest.approx((out.argmax(1) == y).float().mean().item())
