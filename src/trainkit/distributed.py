"""Distributed runs on `torch.distributed`: set-up from torchrun's environment, rank helpers.

A script that works with `python train.py` runs unchanged under
`torchrun --nproc_per_node=N train.py` once it calls `trainkit.distributed.init()`: `get_data`
then shards the data, and `fit` wraps the model in `DistributedDataParallel`, reduces the
figures over all processes and lets only rank 0 print and write checkpoints.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

__all__ = ["ShardSampler", "init", "is_distributed", "is_main_process", "rank", "world_size"]


def init(backend: str | None = None, *, timeout_seconds: float = 300) -> bool:
    """Join the process group torchrun describes in the environment; a no-op without torchrun.

    Reads `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` and `LOCAL_RANK` (set by
    `torchrun`, on one node or many). Chooses `nccl` when CUDA is available (and pins this
    process to GPU `LOCAL_RANK`), `gloo` otherwise.

    Args:
        backend: Force a backend (`"gloo"`, `"nccl"`).
        timeout_seconds: How long a collective may wait for the other processes before failing
            (so a dead peer ends the run with an error rather than a hang).

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
    dist.init_process_group(
        backend or ("nccl" if torch.cuda.is_available() else "gloo"),
        timeout=datetime.timedelta(seconds=timeout_seconds),
    )
    return True


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
