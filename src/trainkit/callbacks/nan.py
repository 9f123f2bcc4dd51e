"""Stop a run at the first NaN or infinite training loss or weights, without a read per step."""

from __future__ import annotations

import time
import warnings

import torch
from torch import Tensor

from trainkit._sharded import local
from trainkit.callbacks.base import Callback, StopTraining
from trainkit.distributed import all_reduce_flag, is_distributed
from trainkit.state import TrainState

__all__ = ["TerminateOnNaN"]


class TerminateOnNaN(Callback):
    """Stop training at a NaN or infinite training loss or weights; `fit` adds one by default.

    The losses of the steps are kept on the device and checked together every
    `check_seconds` and after the epoch's last training batch, so no step waits for the
    device. Each check also looks at the optimizer's parameters (a sum per tensor on the
    device), which catches a NaN or infinite gradient under a finite loss (it makes the weights
    non-finite at the step), the last step's included. A check costs about one pass over the
    weights, at most once per `check_seconds`.

    A non-finite stop cannot be missed, with or without a progress bar: a `RuntimeWarning`
    names the epoch (numbered from 1) and the batch, `StopTraining` stops the run with the same
    message, and the `History` that `fit` returns has `status == "stopped"` and that
    `stop_reason`. The run stops before the epoch is validated or recorded and before any
    `on_epoch_end` (where checkpoints are saved), so the last good checkpoint is not
    overwritten with broken weights.

    What the model holds afterwards: the weights as they were at the check, which are likely
    not finite (the steps between the bad one and the check are not undone). Nothing is rolled
    back, as keeping a copy at every check would cost memory and time on every run. The last
    finite epoch is in `ModelCheckpoint`'s files (it never writes non-finite weights), and
    `EarlyStopping(restore_best_weights=True)` loads its best epoch back at the end.

    Args:
        check_seconds: Minimum time between checks (each reads one flag from the device).

    Raises:
        ValueError: `check_seconds` is negative.

    Example:
        >>> fit(10, model, loss_func, opt, train_dl, terminate_on_nan=False,
        ...     callbacks=[TerminateOnNaN(check_seconds=0)])  # doctest: +SKIP
    """

    order = -20

    def __init__(self, check_seconds: float = 0.2) -> None:
        if not check_seconds >= 0:
            raise ValueError(
                f"TerminateOnNaN(check_seconds=...): must be >= 0, got {check_seconds!r}"
            )
        self.check_seconds = check_seconds
        self._losses: list[Tensor] = []
        self._first_step = 0
        self._checked_to = 0  # batches of the epoch already covered by a check
        self._next_check = 0.0
        self._distributed = False

    def on_epoch_start(self, state: TrainState) -> None:
        """Start collecting the epoch's losses."""
        self._losses, self._first_step, self._checked_to = [], 0, 0
        self._next_check = time.perf_counter() + self.check_seconds

    def on_fit_start(self, state: TrainState) -> None:
        """Note whether a process group runs (then checks happen only at epoch ends)."""
        # under a process group, check only where every rank is (the epoch end), all together
        self._distributed = is_distributed()

    def on_train_batch_end(self, state: TrainState) -> None:
        """Keep the step's loss on the device; check the kept losses every `check_seconds`."""
        if state.loss is None:
            return
        if not self._losses:
            self._first_step = state.step
        self._losses.append(state.loss)
        now = time.perf_counter()
        if now >= self._next_check and not self._distributed:
            self._next_check = now + self.check_seconds
            self._check(state)

    def on_train_epoch_end(self, state: TrainState) -> None:
        """Check the epoch's remaining losses and the weights before validation."""
        self._check(state)

    def _check(self, state: TrainState) -> None:
        # one vector on the device: a flag per step's loss, then one for the weights
        flags = [~torch.isfinite(torch.stack(self._losses))] if self._losses else []
        # a sharded (FSDP2) parameter: this process's shard; every process checks its own
        weights = [local(p) for group in state.opt.param_groups for p in group["params"]]
        if weights:
            # NaN and inf survive a sum; a plain float32 sum (the fastest reduction) can also
            # overflow on huge finite weights, so a flag raised here alone is confirmed below
            sums = torch.stack([p.detach().sum() for p in weights])
            flags.append((~torch.isfinite(sums).all()).reshape(1).to(sums.device))
        if not flags:
            return
        bad = torch.cat([f.to(flags[-1].device) for f in flags])
        first, checked_from = self._first_step, self._checked_to
        self._losses, self._checked_to = [], state.batches_done
        found = bool(bad.any())  # the read-back: once per check, not per step
        loss_bad = found and bool(bad[: len(bad) - bool(weights)].any())
        if found and not loss_bad:  # only the weights' flag: confirm element by element
            found = not all(bool(p.isfinite().all()) for p in weights)
        if not all_reduce_flag(found):
            return
        where = f"epoch {state.epoch + 1}"
        if not found:
            reason = f"TerminateOnNaN: the training was not finite on another process in {where}"
        elif loss_bad:
            step = first + int(bad.nonzero()[0, 0])
            reason = (
                f"TerminateOnNaN: the training loss was not finite at {where} batch {step + 1} "
                f"(state.epoch={state.epoch}, state.step={step})"
            )
        else:
            reason = (
                f"TerminateOnNaN: the weights became NaN or infinite in {where} between batch "
                f"{checked_from + 1} and batch {state.batches_done}, with every loss finite: "
                "a non-finite gradient (see on_after_backward to find it)"
            )
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
        raise StopTraining(reason)

    def __repr__(self) -> str:
        return f"TerminateOnNaN(check_seconds={self.check_seconds})"
