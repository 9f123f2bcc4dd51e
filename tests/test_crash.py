"""Real crashes in a child process: SIGKILL at random moments (also while a checkpoint is being
written) and Ctrl-C. After each, the newest checkpoint loads, no partial file is taken for one,
and the resumed run ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from trainkit import load_checkpoint, load_weights

CHILD = Path(__file__).with_name("resume_child.py")
EPOCHS = 4  # 25 steps each


def model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Dropout(0.2), nn.Linear(1024, 10))


def start(dirpath: Path, every_n_steps: int, *more: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(dirpath), str(EPOCHS), str(every_n_steps),
         *map(str, more)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_step(child: subprocess.Popen[str], n: int, timeout: float = 120) -> None:
    assert child.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            return  # the child finished
        if line.startswith("step ") and int(line.split()[1]) >= n:
            return
    child.kill()
    pytest.fail("the child made no progress")


def finish(dirpath: Path, every_n_steps: int, accumulate: int = 1) -> nn.Module:
    result = subprocess.run(
        [sys.executable, str(CHILD), str(dirpath), str(EPOCHS), str(every_n_steps),
         str(accumulate)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return load_weights(dirpath / "final.pth", model())


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    return finish(tmp_path_factory.mktemp("reference"), every_n_steps=1)


def test_sigkill_at_random_moments_loses_only_unsaved_steps(
    tmp_path: Path, reference: nn.Module
) -> None:
    rng = random.Random(0)
    kills = 0
    for _ in range(5):
        child = start(tmp_path, every_n_steps=1)  # a checkpoint write after every step
        wait_for_step(child, 1)
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        kills += child.returncode == -signal.SIGKILL
        visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
        assert all(name.endswith(".ckpt") or name == "final.pth" for name in visible), visible
        for name in visible:
            if name.endswith(".ckpt"):  # every checkpoint on disk is whole
                load_checkpoint(tmp_path / name, model=model())
    assert kills >= 3  # most runs were killed, not finished
    assert same(finish(tmp_path, every_n_steps=1), reference)


def test_ctrl_c_saves_the_last_step_and_the_run_resumes(
    tmp_path: Path, reference: nn.Module
) -> None:
    child = start(tmp_path, every_n_steps=1000)  # no step checkpoints: only the interrupt's
    wait_for_step(child, 7)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode != 0 and "KeyboardInterrupt" in err
    assert f"interrupted: saved {tmp_path / 'last.ckpt'}" in err
    ckpt = load_checkpoint(tmp_path / "last.ckpt", model=model())
    assert not ckpt.epoch_complete and ckpt.global_step >= 7
    assert same(finish(tmp_path, every_n_steps=1000), reference)


def test_ctrl_c_inside_an_accumulation_group_saves_the_completed_group(tmp_path: Path) -> None:
    """accumulate=3: batches 3, 4, 5 make the second optimizer step. A real SIGINT as batch 4
    starts lets batch 5 finish the group; last.ckpt holds that step (6 batches, 2 steps), and
    the resumed run ends bitwise equal to an uninterrupted one."""
    reference = finish(tmp_path / "reference", every_n_steps=1000, accumulate=3)
    child = start(tmp_path / "run", 1000, 3, 4)  # no step checkpoints; Ctrl-C at batch 4
    _, err = child.communicate(timeout=300)
    assert child.returncode != 0 and "KeyboardInterrupt" in err, err
    assert (
        "Ctrl-C: stopping after the next optimizer step (the end of the accumulation group)" in err
    )
    assert f"interrupted: saved {tmp_path / 'run' / 'last.ckpt'}" in err
    ckpt = load_checkpoint(tmp_path / "run" / "last.ckpt", model=model())
    assert (ckpt.epoch, ckpt.step, ckpt.global_step, ckpt.epoch_complete) == (0, 6, 2, False)
    assert same(finish(tmp_path / "run", every_n_steps=1000, accumulate=3), reference)
