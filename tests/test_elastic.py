"""torchrun itself restarting and stopping a run: `python -m torch.distributed.run
--nproc-per-node=2 --max-restarts=3` (gloo on loopback) runs tests/dist_child.py with
`ModelCheckpoint(every_n_steps=4)` and `fit(resume="auto")` (dropout, BatchNorm, shuffling on,
every rank seeded differently; 3 epochs of 7 steps). (a) A worker SIGKILLs itself after step 10
of the first attempt: torchrun restarts the group, which resumes from step 8's last.ckpt, redoes
steps 9-10 and finishes. (b) SIGTERM reaches torchrun's agent (as Kubernetes sends it to the
container's first process) or every process of the job (as SLURM signals a job step): the
workers save last.ckpt mid-epoch and exit, and a second torchrun launch finishes the run. In
every case the final weights, optimizer state and History equal those of an uninterrupted
torchrun run, bitwise, on both ranks. Every launch is bounded in time; a hang fails the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from test_preemption import CHILD, assert_same_run, final, model
from trainkit import load_checkpoint

ARGS = ("3", "--every", "4")  # 3 epochs of 7 steps; last.ckpt every 4 steps: mid-epoch
LAUNCH_TIMEOUT = 60.0


def rendezvous(kind: str) -> list[str]:
    """torchrun's rendezvous options: `--standalone` (c10d on a port the OS picks), or the
    static rendezvous multi-node launches use, on a free port."""
    if kind == "c10d":
        return ["--standalone"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ["--nnodes=1", "--node-rank=0", "--master-addr=127.0.0.1", f"--master-port={port}"]


class Torchrun:
    """One torchrun launch of dist_child.py in a session of its own (so that a timeout kills
    the workers too), its output (agent and workers, interleaved) collected as it comes."""

    def __init__(self, dirpath: Path, *args: str, kind: str = "c10d") -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("TORCHELASTIC_")
            and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        }
        env["OMP_NUM_THREADS"] = "1"
        self.deadline = time.monotonic() + LAUNCH_TIMEOUT
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *rendezvous(kind),
             "--nproc-per-node=2", "--max-restarts=3", str(CHILD), str(dirpath), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1) -> None:
        """Wait until `pattern` occurs `count` times in the output."""
        while len(re.findall(pattern, self.output, re.MULTILINE)) < count:
            if self.proc.poll() is not None or time.monotonic() > self.deadline:
                self.kill()
                pytest.fail(f"torchrun: {pattern!r} never came ({count}x):\n{self.output}")
            time.sleep(0.01)

    def end(self) -> int:
        try:
            code = self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"torchrun still ran after {LAUNCH_TIMEOUT} s: a hang\n{self.output}")
        self.reader.join(timeout=10)
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the agent and every worker
        self.proc.wait()

    def steps(self) -> list[int]:
        """The optimizer steps the workers reported, in order (two ranks interleaved)."""
        return [int(n) for n in re.findall(r"(?<!optimizer )step (\d+)", self.output)]


def launch(dirpath: Path, *args: str, kind: str = "c10d") -> Torchrun:
    run = Torchrun(dirpath, *args, kind=kind)
    run.end()
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The uninterrupted run, under torchrun too."""
    dirpath = tmp_path_factory.mktemp("elastic-reference")
    run = launch(dirpath, *ARGS)
    assert run.proc.returncode == 0, run.output
    assert Counter(run.steps()) == {s: 2 for s in range(1, 22)}
    return [final(dirpath, r) for r in range(2)]


@pytest.mark.parametrize(("kind", "killed"), [("c10d", 1), ("static", 0)])
def test_a_worker_killed_by_sigkill_is_restarted_by_torchrun_and_ends_bitwise_equal(
    tmp_path: Path, reference: list[dict[str, Any]], kind: str, killed: int
) -> None:
    run = launch(tmp_path, *ARGS, "--kill-at", "10", str(killed), kind=kind)
    assert run.proc.returncode == 0, run.output
    # the first attempt: steps 1-10 on both ranks, then the kill (nothing saved after step 8);
    # the second attempt resumed from step 8's last.ckpt: steps 9-21 on both ranks
    assert Counter(run.steps()) == {s: 4 if s in (9, 10) else 2 for s in range(1, 22)}
    assert run.output.count("resume='auto': no last.ckpt") == 1  # the first attempt only
    assert "Connection refused" not in run.output  # no attempt reached a dead one's address
    for r in range(2):
        assert_same_run(final(tmp_path, r), reference[r])


@pytest.mark.parametrize("target", ["agent", "every process"])
def test_sigterm_saves_mid_epoch_and_a_second_torchrun_ends_bitwise_equal(
    tmp_path: Path, reference: list[dict[str, Any]], target: str
) -> None:
    """After step 10 both workers wait for `sent`; the test signals, sees the agent pass
    SIGTERM on to the workers, then lets them go on: with a vote after every step they stop
    after step 12, mid-epoch (the second epoch is steps 8-14)."""
    sent = tmp_path / "sent"
    run = Torchrun(tmp_path / "ckpt", *ARGS, "--wait-at", "10", str(sent), "--vote-seconds", "0")
    run.wait_for(r"(?<!optimizer )step 10(?!\d)", 2)  # both ranks' lines may interleave
    if target == "agent":  # what a container's first process gets from Kubernetes
        os.kill(run.proc.pid, signal.SIGTERM)
    else:  # SLURM signals every process of the job step: the agent and the workers
        os.killpg(run.proc.pid, signal.SIGTERM)
    run.wait_for(r"Received 15 death signal, shutting down workers")
    sent.touch()
    assert run.end() == 1, run.output  # torchrun's status when it was signalled
    out = run.output
    stop = re.search(r"trainkit: SIGTERM: stopped after optimizer step (\d+) \(epoch 2,", out)
    assert stop is not None, out
    step = int(stop.group(1))
    assert step in (12, 13), out  # the vote after the step after the signal
    assert out.count("trainkit: SIGTERM: stopped") == 1  # rank 0 only
    assert out.count(f"interrupted: saved {tmp_path / 'ckpt' / 'last.ckpt'}") == 1
    assert "exiting with status 143" in out
    assert "Unable to shutdown process" not in out  # within torchrun's grace: no SIGKILL
    assert Counter(run.steps()) == {s: 2 for s in range(1, step + 1)}
    ckpt = load_checkpoint(tmp_path / "ckpt" / "last.ckpt", model=model())
    assert (ckpt.epoch, ckpt.epoch_complete, ckpt.global_step) == (1, False, step)
    assert ckpt.ranks is not None and len(ckpt.ranks) == 2

    resumed = launch(tmp_path / "ckpt", *ARGS)
    assert resumed.proc.returncode == 0, resumed.output
    assert "no last.ckpt" not in resumed.output
    assert Counter(resumed.steps()) == {s: 2 for s in range(step + 1, 22)}
    for r in range(2):
        assert_same_run(final(tmp_path / "ckpt", r), reference[r])
