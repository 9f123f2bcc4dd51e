"""The fast path for in-memory `DataLoader`s: the same batches, without per-sample Python.

`DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)` fetches every sample with a
Python call and stacks them (`default_collate`). When the result is provably what indexing the
tensors gives, `FastTensorLoader` builds each batch with one `index_select` per tensor, and
draws the same random numbers, from the same generators, in the same order as the
`DataLoader`'s iterator (as in torch 2.14's `torch/utils/data/dataloader.py` and `sampler.py`;
each process checks once, on a tiny loader, that the installed torch still draws so, and
leaves every loader to the `DataLoader` if not):

1. `iter(dl)`: one `int64` draw for the workers' base seed, from `dl.generator` (the global
   generator when it is `None`), even without workers;
2. the first `next()`: a `RandomSampler` without a generator draws one `int64` seed from the
   global generator and permutes with a fresh generator seeded with it; with a generator, it
   permutes with that generator (`torch.randperm(n, generator=...)`); a `SequentialSampler`
   draws nothing;
3. the `next()` after the last batch: a `RandomSampler` with a generator draws one more
   permutation from it (the tail of its loop), which is what moves that generator on.

So batches, the generators' states after every epoch, and everything trained from them are
bitwise identical to iterating the `DataLoader`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
    default_collate,
)

__all__ = ["FastTensorLoader", "draw_base_seed", "draw_permutation", "why_not_fast"]


def why_not_fast(dl: object) -> str | None:
    """Why `dl` cannot take the fast path, or `None` when it can.

    The fast path applies to a `DataLoader` (the class itself, not a subclass) with: a
    `TensorDataset` of at least one plain, strided, contiguous tensor, all on one device and none
    requiring grad; the default `collate_fn`; `num_workers=0`; `pin_memory=False`; the default
    `BatchSampler` (from `batch_size`, `drop_last` either way) over a `SequentialSampler`
    (`shuffle=False`) or a `RandomSampler` without replacement and with `num_samples` equal to
    the dataset's length (`shuffle=True`), its generator and the loader's either `None` or CPU
    generators.

    Args:
        dl: Any loader.

    Returns:
        `None` when `FastTensorLoader(dl)` yields exactly `dl`'s batches; otherwise the first
        condition that fails, in words.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.zeros(8, 2), torch.zeros(8))
        >>> why_not_fast(DataLoader(ds, batch_size=4, shuffle=True)) is None
        True
        >>> why_not_fast(DataLoader(ds, batch_size=4, num_workers=2))
        'num_workers=2'
    """
    reason = _static_reason(dl)
    if reason is None and not _draws_as_this_torch():
        return (
            f"this torch's DataLoader ({torch.__version__}) draws its random numbers otherwise "
            "than trainkit reproduces"
        )
    return reason


def _static_reason(dl: object) -> str | None:
    if type(dl) is not DataLoader:
        return f"a {type(dl).__name__}, not a DataLoader"
    ds = dl.dataset
    if type(ds) is not TensorDataset:
        return f"a dataset of type {type(ds).__name__}, not TensorDataset"
    if dl.num_workers != 0:
        return f"num_workers={dl.num_workers}"
    if dl.pin_memory:
        return "pin_memory=True"
    if dl.collate_fn is not default_collate:
        return "a collate_fn other than the default"
    tensors = ds.tensors
    if not tensors:
        return "a TensorDataset without tensors"
    if len({t.device for t in tensors}) > 1:
        return "dataset tensors on different devices"
    for t in tensors:
        if type(t) is not Tensor or t.layout != torch.strided or t.is_nested:
            return "a dataset tensor that is not a plain strided tensor"
        if t.ndim == 0 or not t.is_contiguous() or t.requires_grad:
            return "a dataset tensor that is 0-dim, not contiguous, or requires grad"
        if t.is_conj() or t.is_neg():
            return "a dataset tensor with a lazy conjugate or negation"
    bs = dl.batch_sampler
    if type(bs) is not BatchSampler:
        return "no default BatchSampler (batch_size=None, or a batch_sampler of your own)"
    sampler = bs.sampler
    n = len(ds)
    if type(sampler) is SequentialSampler:
        if len(sampler.data_source) != n:
            return "a SequentialSampler over data of another length"
    elif type(sampler) is RandomSampler:
        if sampler.replacement or sampler.num_samples != n or len(sampler.data_source) != n:
            return "a RandomSampler with replacement or num_samples other than len(dataset)"
        if not _cpu_or_none(sampler.generator):
            return "a RandomSampler with a generator not on the CPU"
    else:
        return f"a sampler of type {type(sampler).__name__}"
    if not _cpu_or_none(dl.generator):
        return "a DataLoader generator not on the CPU"
    return None


@functools.cache
def _draws_as_this_torch() -> bool:
    """Whether the installed torch's `DataLoader` yields and draws what the fast path does.

    Checked once per process, on a tiny loader in every case (shuffle, a generator, drop_last,
    each on and off; two epochs), with the global random state put back afterwards: the
    reproduction follows torch 2.14's source, and a torch that changes it must not silently
    change results.
    """
    saved = torch.get_rng_state()
    try:
        data = TensorDataset(torch.arange(7), torch.arange(7) * 10)
        for shuffle, seeded, drop_last in itertools.product((False, True), repeat=3):
            runs = []
            for fast in (False, True):
                torch.manual_seed(0)
                gen = torch.Generator().manual_seed(1) if seeded else None
                dl = DataLoader(
                    data, batch_size=3, shuffle=shuffle, drop_last=drop_last, generator=gen
                )
                batches = [
                    [t.tolist() for t in batch]
                    for _ in range(2)
                    for batch in (_fast_batches(dl) if fast else dl)
                ]
                states = [torch.get_rng_state()] + ([gen.get_state()] if gen is not None else [])
                runs.append((batches, states))
            (slow_batches, slow_states), (fast_batches, fast_states) = runs
            if slow_batches != fast_batches or not all(
                torch.equal(a, b) for a, b in zip(slow_states, fast_states, strict=True)
            ):
                return False
        return True
    finally:
        torch.set_rng_state(saved)


def _cpu_or_none(g: object) -> bool:
    return g is None or (isinstance(g, torch.Generator) and g.device.type == "cpu")


def draw_base_seed(generator: torch.Generator | None) -> None:
    """Draw what `iter(DataLoader)` draws for its workers' base seed, even without workers.

    Args:
        generator: The loader's `generator`; `None` draws from the global generator.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> _ = torch.manual_seed(0); _ = iter(DataLoader(range(4))); a = torch.rand(1)
        >>> _ = torch.manual_seed(0); draw_base_seed(None); b = torch.rand(1)
        >>> bool(a == b)
        True
    """
    device = generator.device if generator is not None else "cpu"
    torch.empty((), dtype=torch.int64, device=device).random_(generator=generator)


def draw_permutation(n: int, generator: torch.Generator | None) -> Tensor:
    """The permutation `RandomSampler(data, generator=generator)` draws at the start of an epoch.

    Without a generator, one `int64` seed is drawn from the global generator and the
    permutation comes from a fresh CPU generator seeded with it; with one, from `generator`
    (on its device). A `RandomSampler` with a generator draws one more permutation from it when
    it is exhausted: call this again there to move the generator on alike.

    Args:
        n: The number of samples.
        generator: The sampler's generator, or `None`.

    Returns:
        A permutation of `range(n)` (`int64`, on the generator's device).

    Example:
        >>> import torch
        >>> from torch.utils.data import RandomSampler
        >>> _ = torch.manual_seed(1); expected = list(RandomSampler(range(6)))
        >>> _ = torch.manual_seed(1); draw_permutation(6, None).tolist() == expected
        True
    """
    if generator is None:
        seed = int(torch.empty((), dtype=torch.int64).random_().item())  # once per epoch
        generator = torch.Generator()
        generator.manual_seed(seed)
    return torch.randperm(n, generator=generator, device=generator.device)


class FastTensorLoader:
    """A qualifying `DataLoader`'s batches, each built by indexing its tensors.

    Yields what iterating `dl` yields (lists of tensors, bitwise equal, contiguous, new memory
    for every batch) and draws the same random numbers in the same order, so a run is the same
    with or without it; only faster: about 10 µs per batch instead of one Python call per
    sample and a `torch.stack`. Each epoch checks `why_not_fast(dl)` again and iterates `dl`
    itself if it no longer qualifies (its `collate_fn` or `num_workers` changed). `fit`,
    `evaluate` and `predict` use it on their own (`fast_loaders=True`); `len()`, `dataset`,
    `sampler`, `batch_sampler`, `generator`, `batch_size` and `drop_last` are `dl`'s.

    Args:
        dl: A `DataLoader` for which `why_not_fast(dl)` is `None`.

    Attributes:
        dl: The `DataLoader`.

    Raises:
        ValueError: `dl` does not qualify; the message says why.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.arange(10.0), torch.arange(10))
        >>> dl = DataLoader(ds, batch_size=4, shuffle=True)
        >>> _ = torch.manual_seed(0); slow = [yb.tolist() for _, yb in dl]
        >>> _ = torch.manual_seed(0); fast = [yb.tolist() for _, yb in FastTensorLoader(dl)]
        >>> fast == slow
        True
    """

    def __init__(self, dl: DataLoader[Any]) -> None:
        reason = why_not_fast(dl)
        if reason is not None:
            raise ValueError(f"FastTensorLoader(dl): this loader does not qualify: {reason}")
        self.dl = dl

    def __len__(self) -> int:
        return len(self.dl)

    @property
    def dataset(self) -> Any:
        """The loader's `dataset`."""
        return self.dl.dataset

    @property
    def sampler(self) -> Any:
        """The loader's `sampler`."""
        return self.dl.sampler

    @property
    def batch_sampler(self) -> Any:
        """The loader's `batch_sampler`."""
        return self.dl.batch_sampler

    @property
    def generator(self) -> torch.Generator | None:
        """The loader's `generator`."""
        generator: torch.Generator | None = self.dl.generator
        return generator

    @property
    def batch_size(self) -> int | None:
        """The loader's `batch_size`."""
        return self.dl.batch_size

    @property
    def drop_last(self) -> bool:
        """The loader's `drop_last`."""
        return self.dl.drop_last

    def __iter__(self) -> Iterator[list[Tensor]]:
        dl = self.dl
        if _static_reason(dl) is not None:  # changed since: the loader's own way
            return iter(dl)
        return _fast_batches(dl)


def _fast_batches(dl: DataLoader[Any]) -> Iterator[list[Tensor]]:
    """`dl`'s batches by indexing, with its random draws; `dl` must qualify."""
    batch_sampler = dl.batch_sampler
    assert isinstance(batch_sampler, BatchSampler)
    tensors = dl.dataset.tensors  # type: ignore[attr-defined]  # checked: a TensorDataset
    draw_base_seed(dl.generator)  # as the DataLoader's iterator does when it is created
    return _batches(
        tensors, batch_sampler.sampler, batch_sampler.batch_size, batch_sampler.drop_last
    )


def _batches(
    tensors: tuple[Tensor, ...], sampler: object, batch_size: int, drop_last: bool
) -> Iterator[list[Tensor]]:
    n = len(tensors[0])
    stop = n - n % batch_size if drop_last else n
    if not isinstance(sampler, RandomSampler):  # sequential: slices, copied as collate copies
        for start in range(0, stop, batch_size):
            yield [t[start : start + batch_size].clone() for t in tensors]
        return
    generator = sampler.generator
    order = draw_permutation(n, generator).to(tensors[0].device)  # at the first next(), as it
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield [t.index_select(0, index) for t in tensors]
    if generator is not None:  # the sampler's exhausted loop draws once more from its generator
        draw_permutation(n, generator)
