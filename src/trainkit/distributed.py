"""Distributed runs on `torch.distributed`: set-up from torchrun's environment, rank helpers.

A script that works with `python train.py` runs unchanged under
`torchrun --nproc_per_node=N train.py` once it calls `trainkit.distributed.init()`: `get_data`
then shards the data, and `fit` wraps the model in `DistributedDataParallel`, reduces the
figures over all processes and lets only rank 0 print and write checkpoints.
"""

from __future__ import annotations

import datetime
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import (
    BatchSampler,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

__all__ = [
    "Preempted",
    "ShardSampler",
    "init",
    "is_distributed",
    "is_main_process",
    "rank",
    "world_size",
]


def init(backend: str | None = None, *, timeout_seconds: float = 300) -> bool:
    """Join the process group torchrun describes in the environment; a no-op without torchrun.

    Reads `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` and `LOCAL_RANK` (set by
    `torchrun`, on one node or many). Chooses `nccl` when CUDA is available (and pins this
    process to GPU `LOCAL_RANK`), `gloo` otherwise. Under torchrun's restarts
    (`--max-restarts`), each attempt uses keys of its own in the store torchrun's agent keeps
    for the whole job, so a restarted group never reads the addresses of a failed attempt.

    Args:
        backend: Force a backend (`"gloo"`, `"nccl"`).
        timeout_seconds: How long a collective may wait for the other processes before failing
            (so a dead peer ends the run with an error rather than a hang); joining the group
            waits as long for the others at most.

    Returns:
        Whether a process group is now initialised.

    Raises:
        ValueError: `WORLD_SIZE` is set without `RANK` (or the other way round).

    Example:
        >>> import trainkit.distributed
        >>> trainkit.distributed.init()  # under plain `python`, nothing to join
        False
    """
    if dist.is_available() and dist.is_initialized():
        return True
    has_rank, has_size = "RANK" in os.environ, "WORLD_SIZE" in os.environ
    if has_rank != has_size:
        raise ValueError(
            "trainkit.distributed.init: RANK and WORLD_SIZE must both be set (torchrun sets "
            f"them); found RANK={os.environ.get('RANK')!r}, "
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}"
        )
    if not has_rank or not dist.is_available():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_seconds)
    # The communication threads started here inherit this thread's signal mask: with SIGINT
    # and SIGTERM blocked in them, a stop signal always reaches the main thread, where
    # fit's handler runs, rather than interrupting a thread inside a system call.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        dist.init_process_group(
            backend or ("nccl" if torch.cuda.is_available() else "gloo"),
            timeout=timeout,
            store=_attempt_store(timeout),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return True


def _attempt_store(timeout: datetime.timedelta) -> Any:
    """Under torchrun, the agent's store seen through a prefix of its own for this attempt.

    torchrun's agent keeps one key-value store for all the attempts it starts
    (`TORCHELASTIC_USE_AGENT_STORE`), and `init_process_group` writes the same keys in it on
    every attempt: after a restart, a process could read a peer's address left by the failed
    attempt and connect to a dead process ("Connection refused", or a hang in gloo's
    `connectFullMesh`). The keys of each attempt (restart count, world size) are kept apart.
    `None` when not under torchrun's agent store: `init_process_group` builds its own.
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not (
        env.get("MASTER_ADDR") and env.get("MASTER_PORT")
    ):
        return None
    # torch.distributed re-exports these without declaring it (mypy --strict): their home
    from torch._C._distributed_c10d import PrefixStore, TCPStore

    store = TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]), is_master=False,
        timeout=timeout,
    )  # fmt: skip
    attempt = (
        f"trainkit/{env.get('TORCHELASTIC_RUN_ID', '')}/restart"
        f"{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/world{env['WORLD_SIZE']}/"
    )
    return PrefixStore(attempt, store)


class Preempted(SystemExit):
    """`fit` was stopped by SIGTERM (or, under a process group, by SIGINT) and exits.

    A `SystemExit` with status `128 + signal number` (143 for SIGTERM): uncaught, the process
    ends with that status and no traceback, as a scheduler stopping the job expects. `fit`
    raises it after the optimizer step every process agreed on, once `ModelCheckpoint` wrote
    `last.ckpt` and rank 0 printed what it saved. Catch it to do more before exiting.

    Attributes:
        signum: The signal that stopped the run.
        global_step: The optimizer steps completed (and saved) when it stopped.

    Example:
        >>> import signal
        >>> err = Preempted(signal.SIGTERM, 120)
        >>> err.code, err.global_step
        (143, 120)
    """

    def __init__(self, signum: int, global_step: int) -> None:
        super().__init__(128 + signum)
        self.signum: int = signum
        self.global_step: int = global_step


def is_distributed() -> bool:
    """Whether a process group with more than one process is running.

    Example:
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group).

    Example:
        >>> rank()
        0
    """
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


_this_rank = rank  # ShardSampler's argument `rank` shadows the function


def world_size() -> int:
    """Number of processes (1 outside a process group).

    Example:
        >>> world_size()
        1
    """
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this is rank 0, the process that prints and writes files.

    Example:
        >>> is_main_process()
        True
    """
    return rank() == 0


class ShardSampler(Sampler[int]):
    """Indices `rank, rank + world_size, ...` of a dataset: every sample on exactly one process.

    Unlike `DistributedSampler`, it neither pads nor drops samples, so shards may differ in
    length by one: right for evaluation, where the figures are summed over processes (training
    needs `DistributedSampler`, which keeps step counts equal).

    Args:
        dataset: The dataset to shard (only its length is used).
        num_replicas: Number of processes (default: the process group's).
        rank: This process's shard (default: its rank).

    Raises:
        ValueError: `rank` is not in `[0, num_replicas)`.

    Example:
        >>> list(ShardSampler(range(5), num_replicas=2, rank=1))
        [1, 3]
    """

    def __init__(
        self,
        dataset: Dataset[Any] | Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.num_replicas: int = world_size() if num_replicas is None else num_replicas
        self.rank: int = _this_rank() if rank is None else rank
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"ShardSampler: rank {self.rank} not in [0, {self.num_replicas})")
        assert isinstance(dataset, Sized)
        self.length: int = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def all_reduce_flag(flag: bool) -> bool:
    """Whether `flag` is true on any process (no-op outside a process group)."""
    if not is_distributed():
        return flag
    t = torch.tensor(int(flag), device=_collective_device())
    dist.all_reduce(t)
    return bool(t.item())


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process of the group got here (a no-op without a group)."""
    if is_distributed():
        dist.barrier()


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every process's `obj`, by rank, on rank 0 (`None` elsewhere); `[obj]` without a group.

    A collective: every process of the group must call it at the same point.
    """
    if not is_distributed():
        return [obj]
    gathered: list[Any] | None = [None] * world_size() if is_main_process() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather(obj: Any) -> list[Any]:
    """Every process's `obj`, by rank, on every process (`[obj]` without a group)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every process (`obj` itself without a group)."""
    if not is_distributed():
        return obj
    box = [obj if is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's floating-point buffers (BatchNorm's running statistics) to every process.

    Under a process group, each process updates BatchNorm's running mean and variance with its
    own batches; broadcasting them makes every rank hold the model rank 0 validates and saves.
    A no-op without a process group, or for a model without buffers.
    """
    if not is_distributed():
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if buffers:
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()


def warn_data_setup(train_dl: Any, valid_dl: Any) -> None:
    """Under a process group, warn about loaders that make `fit`'s figures silently wrong.

    Read through wrappers (their `.dl`) down to the `DataLoader`; loaders that do not say
    (a list of batches, a custom batch sampler) are not judged.
    """
    if not is_distributed():
        return
    n = world_size()
    train = _sampler(train_dl)
    if isinstance(train, SequentialSampler | RandomSampler):
        warnings.warn(
            f"fit(train_dl=...): under a process group of {n} processes the training loader "
            f"draws from a {type(train).__name__}, so every process trains on the whole set "
            "(in the same order). Use a DistributedSampler, as get_data does",
            stacklevel=3,
        )
    valid, inner = _sampler(valid_dl), _innermost(valid_dl)
    if isinstance(valid, DistributedSampler):
        size = len(valid.dataset)  # type: ignore[arg-type]
        if size % n:
            what = "drops" if valid.drop_last else "pads with repeated samples"
            warnings.warn(
                f"fit(valid_dl=...): the validation loader's DistributedSampler {what} "
                f"{n - size % n if not valid.drop_last else size % n} sample(s) ({size} over "
                f"{n} processes), so the validation figures are not those of the validation "
                "set. Use trainkit.distributed.ShardSampler (every sample once), as get_data "
                "does",
                stacklevel=3,
            )
    elif isinstance(valid, SequentialSampler | RandomSampler):
        warnings.warn(
            f"fit(valid_dl=...): under a process group of {n} processes the validation loader "
            f"is not sharded ({type(valid).__name__}): every process validates the whole set "
            f"and the summed figures count each sample {n} times. Use "
            "trainkit.distributed.ShardSampler, as get_data does",
            stacklevel=3,
        )
    if getattr(inner, "drop_last", False) is True:
        warnings.warn(
            "fit(valid_dl=...): the validation loader has drop_last=True: the samples of each "
            "process's last, incomplete batch are not validated. Build it with "
            "drop_last=False",
            stacklevel=3,
        )


def _innermost(dl: Any) -> Any:
    for _ in range(8):
        inner = getattr(dl, "dl", None)
        if inner is None:
            break
        dl = inner
    return dl


def _sampler(dl: Any) -> Any:
    inner = _innermost(dl)
    batch_sampler = getattr(inner, "batch_sampler", None)
    if batch_sampler is not None and not isinstance(batch_sampler, BatchSampler):
        return None  # a custom batch sampler: not judged
    return getattr(inner, "sampler", None)


def convert_sync_batchnorm(model: torch.nn.Module, enabled: bool) -> None:
    """`fit(sync_batchnorm=True)`: BatchNorm layers to `SyncBatchNorm`, in place.

    Raises:
        ValueError: the model itself is a BatchNorm layer (it cannot be replaced in place), or
            the process group's backend cannot run `SyncBatchNorm` (gloo: CPU).
    """
    if not enabled or not is_distributed():
        return  # one process: BatchNorm already sees the whole batch
    backend = dist.get_backend()
    if backend != "nccl":
        raise ValueError(
            f"fit(sync_batchnorm=True): SyncBatchNorm needs CUDA tensors and the nccl backend; "
            f"this process group uses {backend!r}. Drop sync_batchnorm (BatchNorm's running "
            "statistics are then broadcast from rank 0 before validation and each save)"
        )
    if isinstance(model, torch.nn.modules.batchnorm._BatchNorm):
        raise ValueError(
            "fit(sync_batchnorm=True): the model is itself a BatchNorm layer; wrap it in a "
            "module (nn.Sequential(bn)) so it can be converted in place"
        )
    convert: Callable[[torch.nn.Module], torch.nn.Module] = (
        torch.nn.SyncBatchNorm.convert_sync_batchnorm
    )
    for name, child in model.named_children():
        converted = convert(child)
        if converted is not child:
            setattr(model, name, converted)


class StopVote:
    """Agree on which optimizer step every process stops after, without waiting per step.

    `request(signum)` (from a signal handler) marks this process. Every `every` optimizer
    steps, `after_step()` reads the result of the all-reduce it launched the previous time
    (long finished: later gradient all-reduces came after it on the same group) and launches a
    new one with this process's request. Every process so reads the same value after the same
    step and stops after it: at most two votes after the first request reached one. The vote
    also carries rank 0's choice of `every` (steps in about `seconds` of training, 1 to 64),
    so tiny steps do not pay a collective each while a stop still comes within a fraction of
    a second. The cost: one asynchronous all-reduce of two integers over a CPU (gloo) group
    per vote, no device synchronisation. Outside a process group `StopVote` is not used.
    """

    seconds: float = 0.05  # the time between votes rank 0 aims for

    def __init__(self) -> None:
        self.group: Any = _cpu_group()
        self.requested: int = 0  # the signal number this process received, 0 for none
        self.agreed: int = 0  # the signal number every process agreed to stop on, 0 while running
        self.every: int = 1  # steps between votes, the same on every process
        self._countdown = 1
        self._since = time.monotonic()
        self._buffer = torch.zeros(2, dtype=torch.int64)
        self._work: Any = None

    def request(self, signum: int) -> None:
        """Record that this process received `signum` (the vote after a step carries it)."""
        self.requested = max(self.requested, signum)

    def after_step(self) -> bool:
        """Called after each optimizer step on every process: whether to stop after this one."""
        if self.agreed:
            return True
        self._countdown -= 1
        if self._countdown > 0:
            return False
        if self._work is not None:
            self._work.wait()
            self._work = None
            agreed, self.every = int(self._buffer[0]), max(1, int(self._buffer[1]))
            if agreed:
                self.agreed = agreed
                return True
        self._countdown = self.every
        now = time.monotonic()
        per_step = max(now - self._since, 1e-9) / self.every
        self._since = now
        proposal = min(64, max(1, int(self.seconds / per_step))) if is_main_process() else 0
        self._buffer[0], self._buffer[1] = self.requested, proposal
        self._work = dist.all_reduce(
            self._buffer, op=dist.ReduceOp.MAX, group=self.group, async_op=True
        )
        return False

    def finish(self) -> None:
        """Wait for the last vote (at the end of a run every process completed)."""
        if self._work is not None:
            self._work.wait()
            self._work = None


_CPU_GROUPS: dict[int, Any] = {}


def _cpu_group() -> Any:
    """The default group under gloo; a gloo group over the same processes under nccl (created
    once, collectively, the first time a run asks for it)."""
    if dist.get_backend() == "gloo":
        return None  # the default group
    key = id(dist.group.WORLD)
    if key not in _CPU_GROUPS:
        _CPU_GROUPS[key] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[key]
