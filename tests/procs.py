"""Start a test's child script in `n` processes as torchrun starts its workers, bounded in time;
and end such a child script."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest


@dataclass
class Ended:
    codes: list[int]
    stdout: list[str]
    stderr: list[str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def launch(
    child: Path,
    n: int,
    *args: str,
    timeout: float = 60,
    cwd: list[Path] | None = None,
) -> Ended:
    """Run `child` with `args` in `n` processes (torchrun's environment for n > 1), bounded."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    if n > 1:
        env.update(WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [
        subprocess.Popen(
            [sys.executable, str(child), *args],
            env={**env, **({"RANK": str(r), "LOCAL_RANK": str(r)} if n > 1 else {})},
            cwd=cwd[r] if cwd else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(n)
    ]
    deadline = time.monotonic() + timeout
    outs: list[tuple[str, str]] = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a child process still ran after {timeout} s: a hang")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return Ended([p.returncode for p in procs], [o for o, _ in outs], [e for _, e in outs])


def run_and_exit(main: Callable[[], None]) -> NoReturn:
    """Run a child script's `main`; end the process with its status (143 for `Preempted`).

    Ended with os._exit after flushing, as multiprocessing ends its workers: interpreter
    teardown with gloo's threads still around was seen, rarely, to abort a finished process
    (SIGABRT, "terminate called without an active exception"), after everything was written.
    """
    code = 0
    try:
        main()
    except SystemExit as stop:  # Preempted: status 143
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
