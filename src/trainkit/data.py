"""Loaders: wrap a loader with a function, move batches to a device, batch in-memory tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any, Final, Generic, Protocol, TypedDict, TypeVar, Unpack, cast, overload

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from trainkit._batch import canonical, map_tensors, move_to
from trainkit.distributed import ShardSampler, is_distributed
from trainkit.fastpath import FastTensorLoader, draw_base_seed, draw_permutation, why_not_fast

__all__ = [
    "DeviceDataLoader",
    "Loader",
    "LoaderOptions",
    "TensorDataLoader",
    "WrappedDataLoader",
    "fast_loader",
    "get_data",
    "get_device",
    "to_device",
]

T = TypeVar("T")
B = TypeVar("B")
T_co = TypeVar("T_co", covariant=True)


class Loader(Protocol[T_co]):
    """A re-iterable loader of batches with a length and a dataset: what `get_data` returns.

    A `DataLoader` is one, and so are trainkit's loaders that wrap one (`WrappedDataLoader`,
    `DeviceDataLoader`) and `TensorDataLoader`. `get_data` is typed with it rather than with
    `DataLoader`, so the tutorial's own lines type-check as they are:
    `train_dl, valid_dl = get_data(train_ds, valid_ds, bs)`, then
    `train_dl = WrappedDataLoader(train_dl, preprocess)` (the variable keeps one type).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from trainkit import WrappedDataLoader, get_data
        >>> ds = TensorDataset(torch.zeros(8, 784), torch.zeros(8, dtype=torch.long))
        >>> train_dl, valid_dl = get_data(ds, ds, bs=4)
        >>> train_dl = WrappedDataLoader(train_dl, lambda x, y: (x.view(-1, 1, 28, 28), y))
        >>> loaders: list[Loader[object]] = [train_dl, valid_dl]
        >>> [len(dl) for dl in loaders], len(train_dl.dataset)
        ([2, 1], 8)
    """

    def __iter__(self) -> Iterator[T_co]:
        """Iterate over the batches (each epoch anew)."""
        ...

    def __len__(self) -> int:
        """The number of batches."""
        ...

    @property
    def dataset(self) -> Dataset[Any]:
        """The dataset the batches come from."""
        ...


class WrappedDataLoader(Generic[T]):
    """Apply `func` to every batch of `dl`, lazily, as the tutorial's `WrappedDataLoader`.

    A batch that is a tuple or list is unpacked into `func(*batch)`, exactly as in the tutorial;
    any other batch (a dict, a single tensor) is passed as `func(batch)`. `len()`, `dataset`
    and `sampler` are those of `dl`, so `wrapped.sampler.set_epoch(epoch)` reaches a
    `DistributedSampler` through any number of wrappers.

    Args:
        dl: The loader (or any re-iterable) to wrap.
        func: Called on each batch; its result is what iteration yields.

    Raises:
        TypeError: `func` is not callable; `len()` of a wrapper whose `dl` has no length.
        AttributeError: `dataset` or `sampler` of a wrapper whose `dl` has none.

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

    # By the number of arguments, so that an editor types a lambda's arguments (as `Any`: the
    # batches of a DataLoader are untyped) instead of leaving them unknown.
    @overload
    def __init__(self, dl: Iterable[Any], func: Callable[[Any], T]) -> None: ...
    @overload
    def __init__(self, dl: Iterable[Any], func: Callable[[Any, Any], T]) -> None: ...
    @overload
    def __init__(self, dl: Iterable[Any], func: Callable[[Any, Any, Any], T]) -> None: ...
    @overload  # mypy thinks the three above cover it; four or more arguments do reach it
    def __init__(self, dl: Iterable[Any], func: Callable[..., T]) -> None: ...  # type: ignore[overload-cannot-match]
    def __init__(self, dl: Iterable[Any], func: Callable[..., T]) -> None:
        if not callable(func):
            raise TypeError(
                f"WrappedDataLoader(func): func must be callable, got {type(func).__name__}"
            )
        self.dl = dl
        self.func = func

    def __len__(self) -> int:
        return _len(self.dl, "WrappedDataLoader")

    @property
    def dataset(self) -> Any:
        """The wrapped loader's `dataset`."""
        return _forward(self.dl, "dataset", "WrappedDataLoader")

    @property
    def sampler(self) -> Any:
        """The wrapped loader's `sampler` (e.g. a `DistributedSampler`, for `set_epoch`)."""
        return _forward(self.dl, "sampler", "WrappedDataLoader")

    def __iter__(self) -> Iterator[T]:
        func = self.func
        for b in self.dl:
            yield func(*b) if isinstance(b, tuple | list) else func(b)


class DeviceDataLoader(Generic[B]):
    """Yield the batches of `dl` moved to `device` (tensors nested in tuples, lists and dicts).

    On a CUDA device, the next batch is copied while the current one trains: its CPU tensors
    are pinned (unless the `DataLoader` pinned them already, `pin_memory=True`) and copied with
    `non_blocking=True` on a side CUDA stream; the stream the batch is used on waits for that
    copy (`wait_stream`), and the batch's memory is marked as used there (`record_stream`), so
    the copy overlaps the model's work without a race. On any other device (the CPU), batches
    pass through: tensors already on `device` are yielded as they are, without a copy.
    `len()`, `dataset` and `sampler` are those of `dl`.

    Args:
        dl: The loader to wrap.
        device: Where batches go, e.g. `"cuda"` or `get_device()`.
        non_blocking: Copy asynchronously where the platform allows (pinned host memory to GPU).
        prefetch: On CUDA, copy the next batch on a side stream while the current one is used.
            Without it (or with `non_blocking=False`), each batch is copied when it is needed.

    Raises:
        TypeError: `len()` of a wrapper whose `dl` has no length.
        AttributeError: `dataset` or `sampler` of a wrapper whose `dl` has none.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.zeros(8, 2), torch.zeros(8))
        >>> dl = DeviceDataLoader(DataLoader(ds, batch_size=4), "cpu")
        >>> [xb.device.type for xb, _ in dl]
        ['cpu', 'cpu']
    """

    def __init__(
        self,
        dl: Iterable[B],
        device: torch.device | str,
        non_blocking: bool = True,
        *,
        prefetch: bool = True,
    ) -> None:
        self.dl = dl
        self.device: torch.device = canonical(torch.device(device))
        self.non_blocking = non_blocking
        self.prefetch = prefetch

    def __len__(self) -> int:
        return _len(self.dl, "DeviceDataLoader")

    @property
    def dataset(self) -> Any:
        """The wrapped loader's `dataset`."""
        return _forward(self.dl, "dataset", "DeviceDataLoader")

    @property
    def sampler(self) -> Any:
        """The wrapped loader's `sampler` (e.g. a `DistributedSampler`, for `set_epoch`)."""
        return _forward(self.dl, "sampler", "DeviceDataLoader")

    def __iter__(self) -> Iterator[B]:
        device, non_blocking = self.device, self.non_blocking
        if device.type == "cuda" and non_blocking and self.prefetch:
            return _prefetch_cuda(self.dl, device)
        return (to_device(b, device, non_blocking=non_blocking) for b in self.dl)


_END: Final = object()


def _prefetch_cuda(dl: Iterable[B], device: torch.device) -> Iterator[B]:
    """Yield `dl`'s batches on `device`, each copied on a side stream during the previous step."""
    side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]  # torch: unannotated
    batches = iter(dl)

    def start_copy() -> Any:
        batch = next(batches, _END)
        if batch is _END:
            return _END
        with torch.cuda.stream(side):
            return move_to(_pin(batch), device, True)

    pending = start_copy()
    while pending is not _END:
        current = torch.cuda.current_stream(device)
        current.wait_stream(side)  # this batch's copies finish before the step's kernels read it
        # Its memory was allocated on `side`; without this, the allocator could hand it out
        # again for the next copy while the step on `current` still reads it.
        _record_stream(pending, current)
        batch, pending = pending, start_copy()  # the next copy overlaps this step's work
        yield cast(B, batch)


def _pin(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.pin_memory() if _pinnable(t) else t)


def _pinnable(t: Tensor) -> bool:
    return t.device.type == "cpu" and not t.is_pinned()


def _record_stream(obj: Any, stream: torch.cuda.Stream) -> None:
    if isinstance(obj, Tensor):
        if obj.device.type == "cuda":
            obj.record_stream(stream)
    elif isinstance(obj, tuple | list):
        for item in obj:
            _record_stream(item, stream)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            _record_stream(item, stream)


class TensorDataLoader:
    """Batches of tensors that stay in memory, on the device, indexed there: no collate.

    For data that fits in memory (the tutorials' MNIST and FashionMNIST arrays), this replaces
    `DataLoader(TensorDataset(*tensors), batch_size, shuffle)`: the tensors are moved to
    `device` once, and each batch is one `index_select` per tensor with indices from one
    `randperm` per epoch (or a slice, without shuffling), instead of gathering samples one by
    one in Python and stacking them. The order is drawn exactly as the `DataLoader` draws it
    (the same random numbers from the same generators, in the same order, also without
    shuffling: see `trainkit.fastpath`), so its batches, in order, are the `DataLoader`'s and
    switching between the two never changes a result. With a CPU generator (or none) the
    order is drawn on the CPU, so a seed gives the same batches on every device.

    Without shuffling, batches are views of the tensors (as the tutorial's
    `x_train[start_i:end_i]`): changing a batch in place changes the data.

    Args:
        *tensors: Tensors of the same length (first dimension), e.g. `x_train, y_train`.
        batch_size: Samples per batch, at least 1.
        shuffle: A new random order each epoch.
        device: Where the tensors are kept; by default where they already are (they must
            then all be on one device).
        generator: The random generator for the shuffle order (a CPU or `device` generator).
        drop_last: Leave out the last batch when it is smaller than `batch_size`.

    Attributes:
        tensors: The tensors, on `device`.

    Raises:
        ValueError: no tensors, tensors of different lengths or on different devices (without
            `device`), a 0-dim tensor, or a `batch_size` that is not a positive integer.
        TypeError: an argument in `*tensors` that is not a tensor.

    Example:
        >>> x, y = torch.arange(10.0).view(5, 2), torch.arange(5)
        >>> dl = TensorDataLoader(x, y, batch_size=2, shuffle=True)
        >>> len(dl), sorted(int(i) for _, yb in dl for i in yb)
        (3, [0, 1, 2, 3, 4])
    """

    def __init__(
        self,
        *tensors: Tensor,
        batch_size: int,
        shuffle: bool = False,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> None:
        if not tensors:
            raise ValueError("TensorDataLoader: give at least one tensor, e.g. (x_train, y_train)")
        for i, t in enumerate(tensors):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"TensorDataLoader(*tensors): argument {i} is a {type(t).__name__}, "
                    "not a tensor"
                )
            if t.ndim == 0:
                raise ValueError(f"TensorDataLoader(*tensors): argument {i} is a 0-dim tensor")
        if len({len(t) for t in tensors}) > 1:
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
            raise ValueError(
                f"TensorDataLoader(*tensors): the tensors differ in length (shapes {shapes})"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"TensorDataLoader(batch_size=...): must be a positive integer, got {batch_size!r}"
            )
        if device is None:
            devices = {t.device for t in tensors}
            if len(devices) > 1:
                raise ValueError(
                    f"TensorDataLoader: the tensors are on different devices "
                    f"({sorted(map(str, devices))}); pass device=..."
                )
            device = tensors[0].device
        self.device: torch.device = canonical(torch.device(device))
        self.tensors: tuple[Tensor, ...] = tuple(t.to(self.device) for t in tensors)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last

    def __len__(self) -> int:
        n, bs = len(self.tensors[0]), self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    @property
    def dataset(self) -> TensorDataset:
        """The tensors as a `TensorDataset` (so `len(dl.dataset)` is the number of samples)."""
        return TensorDataset(*self.tensors)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        # the random numbers a DataLoader draws, in its order: switching never changes a run
        draw_base_seed(self.generator)
        return self._batches()

    def _batches(self) -> Iterator[tuple[Tensor, ...]]:
        tensors, bs = self.tensors, self.batch_size
        stop = len(self) * bs
        if not self.shuffle:
            for start in range(0, stop, bs):
                yield tuple(t[start : start + bs] for t in tensors)
            return
        gen = self.generator
        order = draw_permutation(len(tensors[0]), gen).to(self.device)
        for start in range(0, stop, bs):
            idx = order[start : start + bs]
            yield tuple(t.index_select(0, idx) for t in tensors)
        if gen is not None:  # a RandomSampler with a generator draws once more when exhausted
            draw_permutation(len(tensors[0]), gen)


def fast_loader(dl: Iterable[T]) -> Iterable[T]:
    """`dl` with its batches built by indexing where that gives exactly the same batches.

    A `DataLoader` for which `why_not_fast` finds nothing (a `TensorDataset`, default collate,
    no workers, `shuffle` either way; see docs/data.md) becomes a `FastTensorLoader`, also
    inside a `WrappedDataLoader` or `DeviceDataLoader` (rebuilt around it with the same
    function, device and options). Anything else is returned as it is. Batches, the random
    generators' states and so every result are bitwise those of iterating `dl`. `fit`,
    `evaluate` and `predict` call it on their loaders unless given `fast_loaders=False`.

    Args:
        dl: Any loader.

    Returns:
        The faster equivalent of `dl`, or `dl` itself.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.zeros(8, 2), torch.zeros(8))
        >>> type(fast_loader(DataLoader(ds, batch_size=4, shuffle=True))).__name__
        'FastTensorLoader'
        >>> wrapped = fast_loader(WrappedDataLoader(DataLoader(ds, batch_size=4), lambda x, y: x))
        >>> type(wrapped.dl).__name__
        'FastTensorLoader'
        >>> dl = DataLoader(ds, batch_size=4, num_workers=1)
        >>> fast_loader(dl) is dl
        True
    """
    loader: object = dl  # checked by exact type below: a subclass may iterate differently
    if type(loader) is DataLoader:
        return cast(Iterable[T], FastTensorLoader(loader)) if why_not_fast(loader) is None else dl
    if type(loader) is WrappedDataLoader:
        inner = fast_loader(loader.dl)
        return (
            dl if inner is loader.dl else cast(Iterable[T], WrappedDataLoader(inner, loader.func))
        )
    if type(loader) is DeviceDataLoader:
        inner = fast_loader(loader.dl)
        if inner is loader.dl:
            return dl
        rebuilt = DeviceDataLoader(
            inner, loader.device, loader.non_blocking, prefetch=loader.prefetch
        )
        return cast(Iterable[T], rebuilt)
    return dl


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
    return cast(T, move_to(batch, canonical(torch.device(device)), non_blocking))


def get_device() -> torch.device:
    """Pick the best available device: CUDA, then Apple's MPS, then the CPU (as the Quickstart).

    Returns:
        The chosen `torch.device`.

    Example:
        >>> get_device().type in {"cuda", "mps", "cpu"}
        True
    """
    if torch.cuda.is_available():
        return canonical(torch.device("cuda"))
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
) -> tuple[Loader[Any], Loader[Any]]:
    """Build the tutorial's loaders: shuffled training batches of `bs`, validation of `2 * bs`.

    Under a process group (`trainkit.distributed.init()`), the training loader draws from a
    `DistributedSampler` (each process a different shuffled shard of equal length) and the
    validation loader from a `ShardSampler` (every sample on exactly one process, none
    repeated), so `fit`'s reduced figures cover the validation set exactly once.

    Args:
        train_ds: Training dataset.
        valid_ds: Validation dataset (not shuffled; batches twice as large since no gradients
            are kept).
        bs: Training batch size, at least 1.
        **loader_kwargs: Further `DataLoader` options for both loaders (`num_workers`,
            `pin_memory`, ...).

    Returns:
        `(train_dl, valid_dl)`: two `DataLoader`s, typed as `Loader` so that the tutorial's
        `train_dl = WrappedDataLoader(train_dl, preprocess)` type-checks (narrow with
        `isinstance(train_dl, DataLoader)` for `batch_size` and the other attributes).

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
    if is_distributed():  # each process its own shard; fit calls set_epoch every epoch
        return (
            DataLoader(
                train_ds, batch_size=bs, sampler=DistributedSampler(train_ds), **loader_kwargs
            ),
            DataLoader(
                valid_ds, batch_size=bs * 2, sampler=ShardSampler(valid_ds), **loader_kwargs
            ),
        )
    return (
        DataLoader(train_ds, batch_size=bs, shuffle=True, **loader_kwargs),
        DataLoader(valid_ds, batch_size=bs * 2, **loader_kwargs),
    )


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


def _forward(dl: object, name: str, owner: str) -> Any:
    try:
        return getattr(dl, name)
    except AttributeError:
        raise AttributeError(
            f"{owner}.{name}: the wrapped loader ({type(dl).__name__}) has no {name!r}"
        ) from None
