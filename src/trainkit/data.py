"""Loaders from the tutorial: wrap a loader with a function, move batches to a device."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any, Generic, TypedDict, TypeVar, Unpack, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DeviceDataLoader",
    "LoaderOptions",
    "WrappedDataLoader",
    "get_data",
    "get_device",
    "to_device",
]

T = TypeVar("T")
B = TypeVar("B")


class WrappedDataLoader(Generic[T]):
    """Apply `func` to every batch of `dl`, lazily, as the tutorial's `WrappedDataLoader`.

    A batch that is a tuple or list is unpacked into `func(*batch)`, exactly as in the tutorial;
    any other batch (a dict, a single tensor) is passed as `func(batch)`.

    Args:
        dl: The loader (or any re-iterable) to wrap.
        func: Called on each batch; its result is what iteration yields.

    Raises:
        TypeError: `func` is not callable; `len()` of a wrapper whose `dl` has no length.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.zeros(8, 784), torch.zeros(8, dtype=torch.long))
        >>> def preprocess(x, y):
        ...     return x.view(-1, 1, 28, 28), y
        >>> dl = WrappedDataLoader(DataLoader(ds, batch_size=4), preprocess)
        >>> [tuple(xb.shape) for xb, _ in dl]
        [(4, 1, 28, 28), (4, 1, 28, 28)]
    """

    def __init__(self, dl: Iterable[Any], func: Callable[..., T]) -> None:
        if not callable(func):
            raise TypeError(
                f"WrappedDataLoader(func): func must be callable, got {type(func).__name__}"
            )
        self.dl = dl
        self.func = func

    def __len__(self) -> int:
        return _len(self.dl, "WrappedDataLoader")

    def __iter__(self) -> Iterator[T]:
        func = self.func
        for b in self.dl:
            yield func(*b) if isinstance(b, tuple | list) else func(b)


class DeviceDataLoader(Generic[B]):
    """Yield the batches of `dl` moved to `device` (tensors nested in tuples, lists and dicts).

    Tensors already on `device` are passed through untouched.

    Args:
        dl: The loader to wrap.
        device: Where batches go, e.g. `"cuda"` or `get_device()`.
        non_blocking: Copy asynchronously where the platform allows (pinned host memory to GPU).

    Raises:
        TypeError: `len()` of a wrapper whose `dl` has no length.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.zeros(8, 2), torch.zeros(8))
        >>> dl = DeviceDataLoader(DataLoader(ds, batch_size=4), "cpu")
        >>> [xb.device.type for xb, _ in dl]
        ['cpu', 'cpu']
    """

    def __init__(
        self, dl: Iterable[B], device: torch.device | str, non_blocking: bool = True
    ) -> None:
        self.dl = dl
        self.device = _canonical(torch.device(device))
        self.non_blocking = non_blocking

    def __len__(self) -> int:
        return _len(self.dl, "DeviceDataLoader")

    def __iter__(self) -> Iterator[B]:
        device, non_blocking = self.device, self.non_blocking
        for b in self.dl:
            yield to_device(b, device, non_blocking=non_blocking)


def to_device(batch: T, device: torch.device | str, *, non_blocking: bool = False) -> T:
    """Move every tensor in `batch` (nested tuples, lists, dicts) to `device`.

    Tensors already on `device` are returned as they are, without a copy; other values pass
    through unchanged. Containers are rebuilt with the same type (named tuples included).

    Args:
        batch: A tensor, or a tuple / list / dict holding tensors.
        device: Target device. `"cuda"` means the current CUDA device.
        non_blocking: Passed to `Tensor.to`.

    Returns:
        A batch of the same structure with its tensors on `device`.

    Example:
        >>> import torch
        >>> xb, yb = to_device((torch.ones(2), torch.zeros(2)), "cpu")
        >>> xb.device
        device(type='cpu')
    """
    return cast(T, _to_device(batch, _canonical(torch.device(device)), non_blocking))


def _to_device(obj: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(obj, Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, tuple):
        items = [_to_device(o, device, non_blocking) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [_to_device(o, device, non_blocking) for o in obj]
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device, non_blocking) for k, v in obj.items()}
    return obj


def get_device() -> torch.device:
    """Pick the best available device: CUDA, then Apple's MPS, then the CPU (as the Quickstart).

    Returns:
        The chosen `torch.device`.

    Example:
        >>> get_device().type in {"cuda", "mps", "cpu"}
        True
    """
    if torch.cuda.is_available():
        return _canonical(torch.device("cuda"))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class LoaderOptions(TypedDict, total=False):
    """Keyword options `get_data` forwards to both `DataLoader`s.

    Example:
        >>> options: LoaderOptions = {"num_workers": 2, "pin_memory": True}
    """

    num_workers: int
    pin_memory: bool
    drop_last: bool
    persistent_workers: bool
    prefetch_factor: int
    timeout: float
    collate_fn: Callable[[list[Any]], Any]
    worker_init_fn: Callable[[int], None]
    generator: torch.Generator


def get_data(
    train_ds: Dataset[T], valid_ds: Dataset[T], bs: int, **loader_kwargs: Unpack[LoaderOptions]
) -> tuple[DataLoader[T], DataLoader[T]]:
    """Build the tutorial's loaders: shuffled training batches of `bs`, validation of `2 * bs`.

    Args:
        train_ds: Training dataset.
        valid_ds: Validation dataset (not shuffled; batches twice as large since no gradients
            are kept).
        bs: Training batch size, at least 1.
        **loader_kwargs: Further `DataLoader` options for both loaders (`num_workers`,
            `pin_memory`, ...).

    Returns:
        `(train_dl, valid_dl)`.

    Raises:
        ValueError: `bs` is not a positive integer.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.zeros(10, 3), torch.zeros(10))
        >>> train_dl, valid_dl = get_data(ds, ds, bs=4)
        >>> len(train_dl), len(valid_dl)
        (3, 2)
    """
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"get_data(bs=...): bs must be a positive integer, got {bs!r}")
    return (
        DataLoader(train_ds, batch_size=bs, shuffle=True, **loader_kwargs),
        DataLoader(valid_ds, batch_size=bs * 2, **loader_kwargs),
    )


def _canonical(device: torch.device) -> torch.device:
    # "cuda" and "cuda:0" compare unequal; give bare accelerator names their current index so
    # the "already there" check in _to_device is a plain comparison.
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _len(dl: object, owner: str) -> int:
    if not isinstance(dl, Sized):
        raise TypeError(f"{owner}: the wrapped loader ({type(dl).__name__}) has no len()")
    return len(dl)


def set_epoch(dl: object, epoch: int) -> None:
    """Tell a loader's `DistributedSampler` (or any sampler with `set_epoch`) the epoch, through
    wrappers (`WrappedDataLoader`, `DeviceDataLoader`), so each epoch is shuffled differently."""
    for _ in range(8):  # through a few layers of wrappers
        for owner in (
            dl,
            getattr(dl, "sampler", None),
            getattr(getattr(dl, "batch_sampler", None), "sampler", None),
        ):
            method = getattr(owner, "set_epoch", None)
            if callable(method):
                method(epoch)
                return
        dl = getattr(dl, "dl", None)
        if dl is None:
            return
