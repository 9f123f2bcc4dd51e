from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

import trainkit.data
from conftest import make_tabular
from trainkit import (
    DeviceDataLoader,
    WrappedDataLoader,
    evaluate,
    fit,
    get_data,
    get_device,
    to_device,
)
from trainkit.data import TensorDataLoader


def ds(n: int = 10) -> TensorDataset:
    return TensorDataset(torch.arange(n * 2.0).view(n, 2), torch.arange(n))


def test_wrapped_loader_unpacks_each_batch_into_func() -> None:
    dl = DataLoader(ds(10), batch_size=4)
    wrapped = WrappedDataLoader(dl, lambda x, y: (x * 10, y + 1))
    assert len(wrapped) == 3
    batches = list(wrapped)
    assert len(batches) == 3
    assert torch.equal(batches[0][0], torch.arange(8.0).view(4, 2) * 10)
    assert torch.equal(batches[2][1], torch.tensor([9, 10]))
    assert len(list(wrapped)) == 3  # re-iterable, like the loader it wraps


def test_wrapped_loader_passes_non_sequence_batches_whole() -> None:
    batches = [{"x": torch.ones(2), "y": torch.zeros(2)}]
    wrapped = WrappedDataLoader(batches, lambda b: (b["x"], b["y"]))
    ((x, _),) = list(wrapped)
    assert torch.equal(x, torch.ones(2))


def test_wrapped_loader_errors() -> None:
    with pytest.raises(TypeError, match="func must be callable"):
        WrappedDataLoader([], None)  # type: ignore[call-overload]

    def gen() -> Iterator[tuple[Tensor, Tensor]]:
        yield torch.ones(1), torch.ones(1)

    with pytest.raises(TypeError, match=r"WrappedDataLoader.*generator.*no len"):
        len(WrappedDataLoader(gen(), lambda x, y: (x, y)))


class Pair(NamedTuple):
    x: Tensor
    y: Tensor


def test_to_device_moves_nested_tensors_and_keeps_structure() -> None:
    batch: dict[str, Any] = {
        "a": (torch.ones(2), [torch.zeros(1), "label"]),
        "b": Pair(torch.ones(1), torch.ones(1)),
    }
    moved = to_device(batch, "meta")
    assert moved["a"][0].device.type == "meta"
    assert moved["a"][1][0].device.type == "meta"
    assert moved["a"][1][1] == "label"
    assert isinstance(moved["b"], Pair) and moved["b"].y.device.type == "meta"
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list)


def test_to_device_is_a_no_op_for_tensors_already_there() -> None:
    x = torch.ones(3)
    (same,) = to_device((x,), torch.device("cpu"))
    assert same is x


def test_device_loader_moves_every_batch() -> None:
    dl = DeviceDataLoader(DataLoader(ds(6), batch_size=4), "meta")
    assert len(dl) == 2
    for xb, yb in dl:
        assert xb.device.type == "meta" and yb.device.type == "meta"


def test_device_loader_on_cpu_passes_batches_through() -> None:
    x = torch.ones(2, 2)
    (batch,) = list(DeviceDataLoader([(x, x)], "cpu"))
    assert batch[0] is x


def test_get_device_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert get_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert get_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert get_device() == torch.device("cuda", 0)


def test_get_data_builds_the_tutorial_loaders() -> None:
    train_dl, valid_dl = get_data(ds(10), ds(7), 3, drop_last=True)
    assert isinstance(train_dl, DataLoader) and isinstance(valid_dl, DataLoader)
    assert isinstance(train_dl.sampler, RandomSampler)
    assert isinstance(valid_dl.sampler, SequentialSampler)
    assert train_dl.batch_size == 3 and valid_dl.batch_size == 6
    assert len(train_dl) == 3 and len(valid_dl) == 1  # drop_last reached both loaders


@pytest.mark.parametrize("bs", [0, -2, 2.5, True])
def test_get_data_refuses_a_bad_batch_size(bs: object) -> None:
    with pytest.raises(ValueError, match=r"get_data\(bs=...\)"):
        get_data(ds(), ds(), bs)  # type: ignore[arg-type]


# --- forwarding len, dataset, sampler through the wrappers -------------------------------------


def test_wrappers_forward_len_dataset_and_sampler_to_a_distributed_sampler() -> None:
    data = ds(16)
    sampler: DistributedSampler[Any] = DistributedSampler(data, num_replicas=2, rank=0, seed=0)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    nested = DeviceDataLoader(WrappedDataLoader(loader, lambda x, y: (x, y)), "cpu")
    assert len(nested) == 2 and nested.dataset is data and nested.sampler is sampler

    def epoch_order(epoch: int) -> list[int]:
        nested.sampler.set_epoch(epoch)  # what a DDP loop calls each epoch, through the wrappers
        return [int(i) for _, yb in nested for i in yb]

    first, again, second = epoch_order(0), epoch_order(0), epoch_order(1)
    assert first == again and first != second and sorted(first) != sorted(range(16))


def test_wrappers_of_plain_iterables_say_what_is_missing() -> None:
    batches = [(torch.ones(1), torch.ones(1))]
    for wrapper in (
        WrappedDataLoader(batches, lambda x, y: (x, y)),
        DeviceDataLoader(batches, "cpu"),
    ):
        name = type(wrapper).__name__
        assert len(wrapper) == 1
        with pytest.raises(
            AttributeError, match=rf"{name}.sampler: the wrapped loader \(list\) has no 'sampler'"
        ):
            wrapper.sampler  # noqa: B018
        assert not hasattr(wrapper, "dataset")


# --- DeviceDataLoader -------------------------------------------------------------------------


def test_device_loader_on_cpu_is_a_pass_through_for_nested_and_dict_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_cuda(*args: object, **kwargs: object) -> None:
        raise AssertionError("the CPU path must not touch CUDA streams or pinned memory")

    for name in ("Stream", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    monkeypatch.setattr(Tensor, "pin_memory", no_cuda)
    x, y = torch.ones(2, 3), torch.zeros(2)
    batches: list[Any] = [
        {"image": x, "meta": {"label": y, "name": "a"}},
        (x, [y, (y,)]),
        Pair(x, y),
        x,
    ]
    out = list(DeviceDataLoader(batches, "cpu"))
    assert out[0]["image"] is x and out[0]["meta"]["label"] is y and out[0]["meta"]["name"] == "a"
    assert out[1][0] is x and out[1][1][1][0] is y
    assert isinstance(out[2], Pair) and out[2].x is x
    assert out[3] is x


def test_device_loader_without_prefetch_copies_each_batch_when_needed() -> None:
    dl = DeviceDataLoader(DataLoader(ds(6), batch_size=4), "meta", prefetch=False)
    assert [(xb.device.type, tuple(xb.shape)) for xb, _ in dl] == [
        ("meta", (4, 2)),
        ("meta", (2, 2)),
    ]


class FakeStream:
    """Stands in for a CUDA stream and logs what the loader asks of it."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(f"{self.name} waits for {other.name}")


def test_prefetch_orders_the_stream_synchronisation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path's order of events, checked on the CPU with stand-ins for the CUDA calls:
    the batch handed to the step is waited for and recorded on the step's stream before the
    next copy starts, and that next copy is issued before the step runs (so the two overlap)."""
    log: list[str] = []
    side, main = FakeStream("side", log), FakeStream("main", log)
    streams = iter([side])
    in_side = False

    @contextlib.contextmanager
    def on_stream(stream: FakeStream) -> Iterator[None]:
        nonlocal in_side
        in_side = stream is side
        yield
        in_side = False

    def copy(obj: Any, device: torch.device, non_blocking: bool) -> Any:
        assert in_side and non_blocking and device.type == "cuda"
        log.append(f"copy {int(obj[1][0])} on side")
        return obj

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: next(streams))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: main)
    monkeypatch.setattr(torch.cuda, "stream", on_stream)

    def pin(obj: Any) -> Any:
        log.append("pin")
        return obj

    monkeypatch.setattr(trainkit.data, "_pin", pin)
    monkeypatch.setattr(trainkit.data, "move_to", copy)
    monkeypatch.setattr(
        trainkit.data,
        "_record_stream",
        lambda obj, stream: log.append(f"record {int(obj[1][0])} on {stream.name}"),
    )
    dl = DeviceDataLoader(DataLoader(ds(3), batch_size=1), torch.device("cuda", 0))
    for _, yb in dl:
        log.append(f"step {int(yb[0])}")
    assert log == [
        "pin", "copy 0 on side",
        "main waits for side", "record 0 on main", "pin", "copy 1 on side", "step 0",
        "main waits for side", "record 1 on main", "pin", "copy 2 on side", "step 1",
        "main waits for side", "record 2 on main", "step 2",
    ]  # fmt: skip


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_prefetch_on_cuda_yields_the_same_batches_pinned_and_on_the_device() -> None:
    data = TensorDataset(torch.randn(64, 256, 256), torch.arange(64))
    dl = DeviceDataLoader(DataLoader(data, batch_size=8), "cuda")
    seen = []
    for step, (xb, yb) in enumerate(dl):
        assert xb.is_cuda and yb.is_cuda
        # Work on the batch on the current stream; a missing wait would read a partial copy.
        assert torch.equal((xb * 2).cpu(), data.tensors[0][step * 8 : step * 8 + 8] * 2)
        seen.append(yb.cpu())
    assert torch.equal(torch.cat(seen), torch.arange(64))


@cuda
def test_prefetch_on_cuda_with_dict_batches_and_a_non_default_stream() -> None:
    batches: list[dict[str, Any]] = [
        {"x": torch.full((1024, 1024), float(i)), "tag": str(i)} for i in range(4)
    ]
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch: unannotated
    with torch.cuda.stream(stream):
        for i, batch in enumerate(DeviceDataLoader(batches, "cuda")):
            assert batch["x"].is_cuda and batch["tag"] == str(i)
            assert float(batch["x"].sum()) == float(i) * 1024 * 1024


@cuda
def test_prefetch_on_cuda_keeps_tensors_already_there_and_pinned_ones() -> None:
    on_gpu = torch.ones(4, device="cuda")
    pinned = torch.ones(4).pin_memory()
    (batch,) = list(DeviceDataLoader([(on_gpu, pinned)], "cuda"))
    assert batch[0] is on_gpu and batch[1].is_cuda


# --- TensorDataLoader ---------------------------------------------------------------------------


def test_tensor_loader_yields_each_sample_once_with_inputs_and_targets_together() -> None:
    x = torch.arange(23.0).view(23, 1).expand(23, 3)
    y = torch.arange(23)
    dl = TensorDataLoader(x, y, batch_size=5, shuffle=True)
    assert len(dl) == 5 and len(dl.dataset) == 23
    batches = list(dl)
    assert [len(yb) for _, yb in batches] == [5, 5, 5, 5, 3]
    order = torch.cat([yb for _, yb in batches])
    assert sorted(order.tolist()) == list(range(23)) and order.tolist() != list(range(23))
    for xb, yb in batches:
        assert torch.equal(xb[:, 0].long(), yb) and xb.shape[1:] == (3,)


def test_tensor_loader_without_shuffle_yields_views_in_order() -> None:
    x, y = torch.arange(10.0), torch.arange(10)
    dl = TensorDataLoader(x, y, batch_size=4, drop_last=True)
    assert len(dl) == 2
    (xb, _), (_, yb2) = list(dl)
    assert xb.data_ptr() == x.data_ptr() and yb2.tolist() == [4, 5, 6, 7]
    assert [len(b[0]) for b in TensorDataLoader(x, batch_size=4)] == [4, 4, 2]


def test_tensor_loader_shuffles_reproducibly_from_its_generator_or_the_global_seed() -> None:
    y = torch.arange(50)

    def order(**kwargs: Any) -> list[int]:
        return torch.cat(
            [b[0] for b in TensorDataLoader(y, batch_size=7, shuffle=True, **kwargs)]
        ).tolist()

    g = torch.Generator().manual_seed(1)
    first, second = order(generator=g), order(generator=g)
    assert first != second  # a new order each epoch
    assert order(generator=torch.Generator().manual_seed(1)) == first
    torch.manual_seed(3)
    a = order()
    torch.manual_seed(3)
    assert order() == a


def test_tensor_loader_moves_the_tensors_once() -> None:
    dl = TensorDataLoader(
        torch.zeros(6, 2), torch.zeros(6), batch_size=4, shuffle=True, device="meta"
    )
    assert all(t.device.type == "meta" for t in dl.tensors)
    assert [xb.device.type for xb, _ in dl] == ["meta", "meta"]


def test_tensor_loader_trains_a_model_with_fit() -> None:
    torch.manual_seed(0)
    (x, y), (x_valid, y_valid) = make_tabular(256).tensors, make_tabular(128, seed=1).tensors
    train_dl = TensorDataLoader(x, y, batch_size=16, shuffle=True)
    valid_dl = TensorDataLoader(x_valid, y_valid, batch_size=64)
    model = nn.Linear(20, 3)
    untrained = evaluate(model, F.cross_entropy, valid_dl)["loss"]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    history = fit(3, model, F.cross_entropy, opt, train_dl, valid_dl, progress=False)
    assert history["val_loss"][-1] < 0.5 * untrained


@pytest.mark.parametrize(
    ("tensors", "kwargs", "error", "message"),
    [
        ((), {}, ValueError, r"give at least one tensor"),
        ((torch.zeros(3), [1, 2, 3]), {}, TypeError, r"argument 1 is a list, not a tensor"),
        ((torch.zeros(3), torch.tensor(1)), {}, ValueError, r"argument 1 is a 0-dim tensor"),
        (
            (torch.zeros(3, 2), torch.zeros(4)),
            {},
            ValueError,
            r"differ in length \(shapes \(3, 2\), \(4,\)\)",
        ),
        ((torch.zeros(3),), {"batch_size": 0}, ValueError, r"batch_size=...\): must be a positive"),
        ((torch.zeros(3),), {"batch_size": 2.0}, ValueError, r"got 2.0"),
        (
            (torch.zeros(3), torch.zeros(3, device="meta")),
            {},
            ValueError,
            r"on different devices \(\['cpu', 'meta'\]\); pass device=",
        ),
    ],
)
def test_tensor_loader_refuses_bad_arguments(
    tensors: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=r"TensorDataLoader.*" + message):
        TensorDataLoader(*tensors, **{"batch_size": 2, **kwargs})


@cuda
def test_tensor_loader_on_cuda_shuffles_like_on_cpu() -> None:
    y = torch.arange(100)
    cpu = TensorDataLoader(
        y, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    gpu = TensorDataLoader(
        y, batch_size=10, shuffle=True, device="cuda", generator=torch.Generator().manual_seed(0)
    )
    assert all(b.is_cuda for (b,) in gpu)
    cpu.generator, gpu.generator = (
        torch.Generator().manual_seed(5),
        torch.Generator().manual_seed(5),
    )
    assert [b.tolist() for (b,) in cpu] == [b.cpu().tolist() for (b,) in gpu]
