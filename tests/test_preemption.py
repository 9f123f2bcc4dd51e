"""Preemption and exact resume, in real child processes: one process, and two on gloo over
loopback started as torchrun starts them. A real SIGTERM stops the run after an optimizer step
every rank agreed on, last.ckpt is written, rank 0 alone says so, and the resumed run ends
bitwise equal to an uninterrupted one: weights, optimizer and History, on every rank (dropout,
BatchNorm, shuffling on, every rank seeded differently). Every run is bounded in time."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import procs
from procs import Ended
from trainkit import CheckpointError, load_checkpoint

CHILD = Path(__file__).with_name("dist_child.py")


def model() -> torch.nn.Module:
    from dist_child import make_model

    return make_model()


EPOCHS = 3  # 7 steps per epoch under 2 processes, 13 in one


def launch(
    n: int, dirpath: Path, *args: str, timeout: float = 60, cwd: list[Path] | None = None
) -> Ended:
    """Run dist_child.py in `n` processes (torchrun's environment for n > 1), bounded."""
    return procs.launch(CHILD, n, str(dirpath), *args, timeout=timeout, cwd=cwd)


def final(dirpath: Path, rank: int) -> dict[str, Any]:
    result: dict[str, Any] = torch.load(dirpath / f"final-rank{rank}.pt", weights_only=True)
    return result


def assert_same_run(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["records"] == b["records"]  # History bitwise (every figure but `seconds`)
    for x, y in zip(a["model"].values(), b["model"].values(), strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a["opt"]["state"].values(), b["opt"]["state"].values(), strict=True):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])


@pytest.fixture(scope="module")
def reference2(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    dirpath = tmp_path_factory.mktemp("reference2")
    ended = launch(2, dirpath, str(EPOCHS))
    assert ended.codes == [0, 0], ended.stderr
    return [final(dirpath, r) for r in range(2)]


@pytest.fixture(scope="module")
def preempted2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Ended]:
    """A 2-process run that rank 1 alone gets a SIGTERM in, at batch 2 of the second epoch."""
    dirpath = tmp_path_factory.mktemp("preempted2")
    ended = launch(2, dirpath, str(EPOCHS), "--term", "1", "2", "1", "--vote-seconds", "0")
    if (dirpath / "last.ckpt").is_file():  # kept as written: the resumed run replaces last.ckpt
        shutil.copyfile(dirpath / "last.ckpt", dirpath.parent / "preempted2.ckpt")
    return dirpath, ended


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_and_saves(
    preempted2: tuple[Path, Ended],
) -> None:
    dirpath, ended = preempted2
    assert ended.codes == [128 + signal.SIGTERM] * 2, ended.stderr
    # both stopped after the same optimizer step: the last "step N" each printed; voting after
    # every step, the step after the one the signal came in (step 10, in epoch 2)
    last = [out.split()[-1] for out in ended.stdout]
    assert last == ["11", "11"]
    ckpt = load_checkpoint(dirpath.parent / "preempted2.ckpt", model=model())
    assert (ckpt.epoch, ckpt.epoch_complete) == (1, False)
    assert ckpt.global_step == int(last[0]) and ckpt.step == ckpt.global_step - 7
    assert ckpt.ranks is not None and len(ckpt.ranks) == 2
    # one clear message, on rank 0 only; no traceback anywhere
    assert f"interrupted: saved {dirpath / 'last.ckpt'}" in ended.stderr[0]
    assert f"trainkit: SIGTERM: stopped after optimizer step {ckpt.global_step}" in ended.stderr[0]
    assert "exiting with status 143" in ended.stderr[0]
    assert ended.stderr[1] == ""
    assert "Traceback" not in ended.stderr[0]


def test_two_processes_resume_bitwise_after_sigterm(
    preempted2: tuple[Path, Ended], reference2: list[dict[str, Any]]
) -> None:
    dirpath, ended = preempted2
    assert ended.codes == [143, 143]
    resumed = launch(2, dirpath, str(EPOCHS))
    assert resumed.codes == [0, 0], resumed.stderr
    for r in range(2):
        assert_same_run(final(dirpath, r), reference2[r])


def test_a_mid_epoch_checkpoint_refuses_another_world_size(
    preempted2: tuple[Path, Ended],
) -> None:
    import torch.nn.functional as F
    from torch import optim

    import dist_child
    from trainkit import fit, get_data

    dirpath, _ = preempted2
    train_dl, _ = get_data(*dist_child.datasets(), 16)
    model = dist_child.make_model()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointError, match=r"world_size 2 then, 1 now"):
        saved = dirpath.parent / "preempted2.ckpt"
        fit(EPOCHS, model, F.cross_entropy, opt, train_dl, resume=saved, progress=False)


def test_sigterm_to_one_process_saves_and_the_run_resumes_bitwise(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert launch(1, reference, str(EPOCHS)).codes == [0]
    run, sent = tmp_path / "run", tmp_path / "sent"
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(run), str(EPOCHS), "--wait-at", "3", str(sent)],
        env={**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")},
             "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        for line in child.stdout:  # after step 3 the child waits for `sent`: no race
            if line.startswith("step ") and int(line.split()[1]) >= 3:
                child.send_signal(signal.SIGTERM)
                sent.touch()
                break
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 143, err
    assert "SIGTERM: stopping after the next optimizer step" in err
    assert f"interrupted: saved {run / 'last.ckpt'}" in err
    assert "trainkit: SIGTERM: stopped after optimizer step" in err and "Traceback" not in err
    ckpt = load_checkpoint(run / "last.ckpt", model=model())
    assert (ckpt.global_step, ckpt.ranks) == (4, None)  # the step after the signal completed
    assert not (run / "final-rank0.pt").exists()
    assert launch(1, run, str(EPOCHS)).codes == [0]
    assert_same_run(final(run, 0), final(reference, 0))


def test_batchnorm_buffers_agree_and_history_describes_the_saved_model(
    reference2: list[dict[str, Any]],
) -> None:
    """Each rank updates BatchNorm's running statistics with its own batches; they are
    broadcast from rank 0 before validation, so both ranks hold one model and History's
    val_loss is that model's, computed in one process."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from dist_child import datasets
    from trainkit import evaluate

    r0, r1 = reference2
    assert any("running_mean" in k for k in r0["model"])
    for (k, a), b in zip(r0["model"].items(), r1["model"].values(), strict=True):
        assert torch.equal(a, b), k
    net = model()
    net.load_state_dict(r0["model"])
    single = evaluate(net, F.cross_entropy, DataLoader(datasets()[1], batch_size=7))
    assert r0["records"][-1]["val_loss"] == pytest.approx(single["loss"], abs=1e-6)


def test_sync_batchnorm_is_refused_on_gloo_and_a_no_op_in_one_process(tmp_path: Path) -> None:
    ended = launch(2, tmp_path / "ckpt", "1", "--sync-bn")
    assert ended.codes[0] != 0 and ended.codes[1] != 0
    for err in ended.stderr:
        assert "fit(sync_batchnorm=True): SyncBatchNorm needs CUDA tensors and the nccl" in err
        assert "uses 'gloo'" in err
    import torch.nn.functional as F
    from torch import optim

    from trainkit import fit

    net = model()
    x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
    fit(1, net, F.cross_entropy, optim.SGD(net.parameters(), lr=0.1), [(x, y)], progress=False,
        sync_batchnorm=True)  # fmt: skip
    assert [type(m) for m in net.modules() if "Norm" in type(m).__name__] == [torch.nn.BatchNorm1d]


def test_with_votes_spaced_out_every_rank_still_stops_at_the_same_step(tmp_path: Path) -> None:
    """Rank 0 spaces the votes to about 50 ms of steps (at most 64 steps apart), so a stop
    comes at most 2 * 64 steps after the signal: within these 25 epochs of 7 steps."""
    ended = launch(2, tmp_path, "25", "--term", "1", "2", "1")
    assert ended.codes == [143, 143], ended.stderr
    last = [int(out.split()[-1]) for out in ended.stdout]
    assert last[0] == last[1] and 10 <= last[0] <= 10 + 2 * 64
    ckpt = load_checkpoint(tmp_path / "last.ckpt", model=model())
    assert ckpt.global_step == last[0] and ckpt.ranks is not None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.append(r[0]), r"field 'ranks' holds 3 ranks; the run had world size 2"),
        (lambda r: r.pop(), r"field 'ranks' is not a list of per-rank dicts"),
        (lambda r: r[1].pop("rng"), r"field 'ranks' is not a list of per-rank dicts"),
        (lambda r: r[1].update(train_loss=None), r"field 'ranks\[1\]\.train_loss' is not"),
    ],
)
def test_malformed_per_rank_states_are_named(
    preempted2: tuple[Path, Ended], change: Any, message: str, tmp_path: Path
) -> None:
    dirpath, _ = preempted2
    data = torch.load(dirpath.parent / "preempted2.ckpt", weights_only=True)
    change(data["ranks"])
    torch.save(data, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=rf"bad\.ckpt: {message}"):
        load_checkpoint(tmp_path / "bad.ckpt", model=model())
