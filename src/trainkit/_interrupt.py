"""Ctrl-C and SIGTERM during `fit`: stop after a completed optimizer step, on every process."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch

from trainkit.distributed import (
    Preempted,
    StopVote,
    barrier,
    is_distributed,
    is_main_process,
    world_size,
)
from trainkit.state import TrainState


def defer_sigint(state: TrainState) -> Callable[[], None]:
    """Make Ctrl-C and SIGTERM stop the run after an optimizer step; return the undo.

    One process: the first Ctrl-C (or SIGTERM) lets the current accumulation group finish: a
    hook on the optimizer sets `state.interrupted` after its next `step()`, and the loop raises
    `KeyboardInterrupt` at the end of that batch, so a checkpoint holds the last completed
    optimizer step (never half a group's gradients). While validating (the model in eval mode)
    the run stops after the current batch. A second Ctrl-C interrupts at once; a second SIGTERM
    changes nothing.

    Under a process group, SIGINT (which torchrun turns into SIGTERM 1 ms later) and SIGTERM
    only mark this process; the processes agree on the step to stop after through
    `StopVote` (see there: no wait per step) and all stop after the same optimizer step.

    After a stop by SIGTERM, or by any signal under a process group, the undo (called in
    `fit`'s `finally`, after `on_exception` let `ModelCheckpoint` save) waits until every
    process got there, prints one line on rank 0, and raises `Preempted`.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    vote = StopVote() if is_distributed() else None  # on every rank: creating it may be collective
    received: list[int] = []  # the signals this process took, in order
    after_step: list[torch.utils.hooks.RemovableHandle] = []

    def stop(*_: Any) -> None:
        state.interrupted = True

    def voted(*_: Any) -> None:
        assert vote is not None
        if vote.after_step():
            state.interrupted = True

    if vote is not None:
        after_step.append(state.opt.register_step_post_hook(voted))

    def handler(signum: int, frame: Any) -> None:
        if vote is not None:  # every rank stops after the step they agree on
            received.append(signum)
            vote.request(signum)
            return
        again = bool(received)
        received.append(signum)
        if again:
            if signum == signal.SIGINT:  # the second Ctrl-C: now
                raise KeyboardInterrupt
            return  # a stop is already on its way
        if not state.model.training:  # validating: no step to finish
            state.interrupted = True
            return
        after_step.append(state.opt.register_step_post_hook(stop))
        what = b"Ctrl-C" if signum == signal.SIGINT else b"SIGTERM"
        # os.write: print() from a signal handler may re-enter a stream the loop is writing to
        os.write(
            2,
            b"\ntrainkit: " + what + b": stopping after the next optimizer step (the end of the "
            b"accumulation group), so a checkpoint holds a completed step; Ctrl-C again stops "
            b"at once\n",
        )

    defaults: dict[signal.Signals, Callable[[int, Any], Any] | signal.Handlers] = {
        signal.SIGINT: signal.default_int_handler,
        signal.SIGTERM: signal.SIG_DFL,
    }
    # someone else handling a signal keeps it
    ours = [s for s, default in defaults.items() if signal.getsignal(s) is default]
    for signum in ours:
        signal.signal(signum, handler)
        signal.siginterrupt(signum, False)  # system calls resume after the handler ran

    def restore() -> None:
        for signum in ours:
            signal.signal(signum, defaults[signum])
        for handle in after_step:
            handle.remove()
        stopped = state.status == "failed" and isinstance(state.exception, KeyboardInterrupt)
        if vote is not None and not stopped and state.status != "failed":
            vote.finish()
        taken = vote.agreed if vote is not None else (received[0] if received else 0)
        if not (stopped and state.interrupted and taken):
            return
        if vote is None and taken == signal.SIGINT:
            return  # Ctrl-C in one process: the KeyboardInterrupt goes on
        if vote is not None:
            barrier()  # no process exits before rank 0 wrote its checkpoint
        if is_main_process():
            name = signal.Signals(taken).name
            print(
                f"trainkit: {name}: stopped after optimizer step {state.global_step} (epoch "
                f"{state.epoch + 1}, batch {state.batches_done}) on all {world_size()} "
                f"process(es); exiting with status {128 + taken}",
                file=sys.stderr,
                flush=True,
            )
        raise Preempted(taken, state.global_step) from state.exception

    return restore
