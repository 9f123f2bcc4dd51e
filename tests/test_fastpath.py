"""The fast path: bitwise the DataLoader's batches, random streams and trained weights."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import Tensor, nn, optim
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from trainkit import (
    Callback,
    DeviceDataLoader,
    FastTensorLoader,
    TensorDataLoader,
    TrainState,
    WrappedDataLoader,
    evaluate,
    fast_loader,
    fit,
    get_data,
    predict,
    why_not_fast,
)


def bits(t: Tensor) -> Tensor:
    """The tensor's bytes, so -0.0 != 0.0 and NaN payloads count."""
    return t.contiguous().view(torch.uint8)


def same_batch(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return (
            isinstance(b, Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.stride() == b.stride()
            and a.device == b.device
            and torch.equal(bits(a), bits(b))
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_batch(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def epochs_of(dl: Iterable[Any], epochs: int, gen: torch.Generator | None) -> list[Any]:
    """Every batch, and the global and loader generator states after each epoch."""
    out: list[Any] = []
    for _ in range(epochs):
        out.append([batch for batch in dl])
        out.append(torch.get_rng_state())
        out.append(gen.get_state() if gen is not None else None)
    return out


def same_run(a: list[Any], b: list[Any]) -> bool:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, list):
            if not same_batch(x, y):
                return False
        elif x is None or y is None:
            if x is not y:
                return False
        elif not torch.equal(x, y):
            return False
    return True


def dataset(n: int = 23) -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, 2, generator=g)
    x[0, 0, 0] = -0.0
    return TensorDataset(x, torch.randint(0, 4, (n,), generator=g), torch.arange(n) * 2)


CASES = [
    (shuffle, with_gen, drop_last, n)
    for shuffle in (False, True)
    for with_gen in (False, True)
    for drop_last in (False, True)
    for n in (23, 20)  # a last short batch; batches that divide the data exactly
]


@pytest.mark.parametrize(("shuffle", "with_gen", "drop_last", "n"), CASES)
def test_batches_and_random_streams_equal_the_dataloaders(
    shuffle: bool, with_gen: bool, drop_last: bool, n: int
) -> None:
    def run(fast: bool) -> list[Any]:
        gen = torch.Generator().manual_seed(7) if with_gen else None
        dl = DataLoader(
            dataset(n), batch_size=5, shuffle=shuffle, drop_last=drop_last, generator=gen
        )
        torch.manual_seed(3)
        return epochs_of(FastTensorLoader(dl) if fast else dl, 3, gen)

    slow, fast = run(False), run(True)
    assert same_run(slow, fast)
    assert isinstance(slow[0][0], list) and len(slow[0][0]) == 3  # what collate gives: a list
    if shuffle:
        assert not same_batch(slow[0], slow[3])  # each epoch its own order


def test_a_sampler_generator_apart_from_the_loaders_is_honoured() -> None:
    ds = dataset()

    def run(fast: bool) -> list[Any]:
        sampler_gen = torch.Generator().manual_seed(1)
        loader_gen = torch.Generator().manual_seed(2)
        dl = DataLoader(
            ds, batch_size=4, sampler=RandomSampler(ds, generator=sampler_gen), generator=loader_gen
        )
        torch.manual_seed(0)
        out = epochs_of(FastTensorLoader(dl) if fast else dl, 2, sampler_gen)
        return [*out, loader_gen.get_state()]

    assert same_run(run(False), run(True))


def test_an_epoch_abandoned_midway_leaves_the_same_random_state() -> None:
    def run(fast: bool) -> tuple[Tensor, Tensor, list[Any]]:
        gen = torch.Generator().manual_seed(4)
        dl = DataLoader(dataset(), batch_size=5, shuffle=True, generator=gen)
        torch.manual_seed(0)
        batches = iter(FastTensorLoader(dl) if fast else dl)
        first = [next(batches), next(batches)]
        return torch.get_rng_state(), gen.get_state(), first

    slow, fast = run(False), run(True)
    assert torch.equal(slow[0], fast[0]) and torch.equal(slow[1], fast[1])
    assert same_batch(slow[2], fast[2])


def test_batches_are_new_memory_as_the_dataloaders() -> None:
    ds = dataset()
    for shuffle in (False, True):
        (xb, _, _), *_ = FastTensorLoader(DataLoader(ds, batch_size=5, shuffle=shuffle))
        xb.zero_()  # a preprocess that works in place must not change the data
    assert ds.tensors[0].abs().sum() > 0 and torch.equal(ds.tensors[0], dataset().tensors[0])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    bs=st.integers(1, 12),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.one_of(st.none(), st.integers(0, 2**31)),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool]),
)
def test_generated_loaders_match(
    n: int, bs: int, shuffle: bool, drop_last: bool, seed: int | None, dtype: torch.dtype
) -> None:
    ds = TensorDataset((torch.randn(n, 2) * 100).to(dtype), torch.arange(n))

    def run(fast: bool) -> list[Any]:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        dl = DataLoader(ds, batch_size=bs, shuffle=shuffle, drop_last=drop_last, generator=gen)
        torch.manual_seed(11)
        return epochs_of(fast_loader(dl) if fast else dl, 2, gen)

    assert same_run(run(False), run(True))


# --- fit, evaluate, predict ---------------------------------------------------------------------


class Seen(Callback):
    """Records what `fit` iterates."""

    def __init__(self) -> None:
        self.train_dl: object = None
        self.valid_dl: object = None

    def on_fit_start(self, state: TrainState) -> None:
        self.train_dl, self.valid_dl = state.train_dl, state.valid_dl


def dropout_model() -> nn.Module:
    # dropout draws from the global generator between batches: the streams must interleave alike
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 4))


def preprocess(x: Tensor, y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    return x.view(-1, 3, 2), y


LoaderPair = tuple[Iterable[Any], Iterable[Any]]


def tutorial_loaders(gen: torch.Generator | None, drop_last: bool, shuffle: bool) -> LoaderPair:
    ds = dataset(50)
    options: dict[str, Any] = {"drop_last": drop_last, "generator": gen}
    train = DataLoader(ds, batch_size=8, shuffle=shuffle, **options)
    valid = DataLoader(dataset(20), batch_size=16)
    return WrappedDataLoader(train, preprocess), WrappedDataLoader(valid, preprocess)


@pytest.mark.parametrize(("with_gen", "drop_last", "shuffle"), [
    (False, False, True), (True, False, True), (False, True, True), (True, True, False),
])  # fmt: skip
def test_fit_through_wrapped_loaders_trains_bitwise_the_same(
    with_gen: bool, drop_last: bool, shuffle: bool
) -> None:
    def run(fast: bool) -> tuple[dict[str, Tensor], Any, Tensor, Seen]:
        gen = torch.Generator().manual_seed(9) if with_gen else None
        train, valid = tutorial_loaders(gen, drop_last, shuffle)
        torch.manual_seed(0)
        model = dropout_model()
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        seen = Seen()
        history = fit(2, model, F.cross_entropy, opt, train, valid, callbacks=[seen],
                      progress=False, fast_loaders=fast)  # fmt: skip
        return model.state_dict(), history["val_loss"], torch.get_rng_state(), seen

    slow, fast = run(False), run(True)
    for name, value in slow[0].items():
        assert torch.equal(bits(value), bits(fast[0][name])), name
    assert slow[1] == fast[1] and torch.equal(slow[2], fast[2])
    assert isinstance(fast[3].train_dl, WrappedDataLoader)  # rebuilt around the fast loader
    assert isinstance(fast[3].train_dl.dl, FastTensorLoader)
    assert isinstance(slow[3].train_dl, WrappedDataLoader)
    assert type(slow[3].train_dl.dl) is DataLoader


def test_fit_with_get_data_trains_bitwise_the_same() -> None:
    def run(fast: bool) -> tuple[dict[str, Tensor], Tensor, Seen]:
        train, valid = get_data(dataset(50), dataset(20), bs=8)
        torch.manual_seed(1)
        model = dropout_model()
        seen = Seen()
        fit(2, model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
            WrappedDataLoader(train, preprocess), WrappedDataLoader(valid, preprocess),
            callbacks=[seen], progress=False, fast_loaders=fast)  # fmt: skip
        return model.state_dict(), torch.get_rng_state(), seen

    slow, fast = run(False), run(True)
    assert all(torch.equal(bits(v), bits(fast[0][k])) for k, v in slow[0].items())
    assert torch.equal(slow[1], fast[1])
    assert isinstance(fast[2].valid_dl, WrappedDataLoader)
    assert isinstance(fast[2].valid_dl.dl, FastTensorLoader)


def test_a_tensor_loader_and_a_dataloader_train_bitwise_the_same() -> None:
    ds = dataset(50)

    def run(loader: Callable[[torch.Generator], Iterable[Any]]) -> tuple[Tensor, ...]:
        gen = torch.Generator().manual_seed(2)
        torch.manual_seed(0)
        model = dropout_model()
        train = WrappedDataLoader(loader(gen), preprocess)
        fit(2, model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1), train,
            progress=False, fast_loaders=False)  # fmt: skip
        return (*model.state_dict().values(), torch.get_rng_state(), gen.get_state())

    data_loader = run(lambda g: DataLoader(ds, batch_size=8, shuffle=True, generator=g))
    tensor_loader = run(lambda g: TensorDataLoader(*ds.tensors, batch_size=8, shuffle=True,
                                                   generator=g))  # fmt: skip
    assert all(
        torch.equal(bits(a), bits(b)) for a, b in zip(data_loader, tensor_loader, strict=True)
    )


@pytest.mark.parametrize("with_gen", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_tensor_loader_draws_as_the_dataloader(with_gen: bool, shuffle: bool) -> None:
    ds = dataset()

    def run(tensor_loader: bool) -> list[Any]:
        gen = torch.Generator().manual_seed(6) if with_gen else None
        dl: Iterable[Any] = (
            TensorDataLoader(*ds.tensors, batch_size=5, shuffle=shuffle, generator=gen)
            if tensor_loader
            else DataLoader(ds, batch_size=5, shuffle=shuffle, generator=gen)
        )
        torch.manual_seed(8)
        return [
            [list(b) for b in batch] if isinstance(batch, list) else item
            for item in epochs_of(dl, 2, gen)
            for batch in [item]
        ]

    assert same_run(run(False), run(True))


def test_evaluate_and_predict_are_the_same_either_way() -> None:
    torch.manual_seed(0)
    model = dropout_model()
    valid = WrappedDataLoader(DataLoader(dataset(30), batch_size=7), preprocess)
    torch.manual_seed(1)
    slow = evaluate(model, F.cross_entropy, valid, fast_loaders=False), torch.get_rng_state()
    torch.manual_seed(1)
    fast = evaluate(model, F.cross_entropy, valid), torch.get_rng_state()
    assert slow[0] == fast[0] and torch.equal(slow[1], fast[1])
    plain = DataLoader(dataset(30), batch_size=7)
    a, b = predict(model, plain, fast_loaders=False), predict(model, plain)
    assert torch.equal(bits(a), bits(b))


def test_fast_loaders_false_iterates_the_loaders_as_given() -> None:
    train = DataLoader(dataset(), batch_size=5)
    seen = Seen()
    model = dropout_model()
    fit(1, model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
        WrappedDataLoader(train, preprocess), callbacks=[seen], progress=False,
        fast_loaders=False)  # fmt: skip
    assert isinstance(seen.train_dl, WrappedDataLoader) and seen.train_dl.dl is train


# --- what does not qualify ----------------------------------------------------------------------


class Subclass(DataLoader[Any]):
    pass


class Listed(Dataset[tuple[Tensor, Tensor]]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return torch.zeros(2), torch.tensor(i)


def not_qualifying() -> list[tuple[object, str]]:
    ds = dataset()
    x, y = ds.tensors[0], ds.tensors[1]
    grad = torch.zeros(23, 2, requires_grad=True)
    return [
        (Subclass(ds, batch_size=4), "a Subclass, not a DataLoader"),
        (DataLoader(Listed(), batch_size=2), "not TensorDataset"),
        (DataLoader(ds, batch_size=4, num_workers=1), "num_workers=1"),
        (DataLoader(ds, batch_size=4, pin_memory=True), "pin_memory=True"),
        (DataLoader(ds, batch_size=4, collate_fn=lambda b: b), "collate_fn"),
        (DataLoader(ds, batch_size=None), "collate_fn"),  # default_convert, per sample
        (DataLoader(ds, batch_sampler=[[0, 1], [2]]), "no default BatchSampler"),
        (DataLoader(ds, sampler=[3, 2, 1], batch_size=2), "a sampler of type list"),
        (
            DataLoader(ds, sampler=RandomSampler(ds, replacement=True), batch_size=2),
            "with replacement",
        ),
        (
            DataLoader(ds, sampler=RandomSampler(ds, num_samples=5), batch_size=2),
            "num_samples",
        ),
        (
            DataLoader(ds, sampler=SequentialSampler(range(5)), batch_size=2),
            "another length",
        ),
        (DataLoader(TensorDataset(x.transpose(1, 2), y), batch_size=2), "not contiguous"),
        (DataLoader(TensorDataset(grad), batch_size=2), "requires grad"),
        (DataLoader(TensorDataset(), batch_size=2), "without tensors"),
        ([(x, y)], "a list, not a DataLoader"),
    ]


@pytest.mark.parametrize("index", range(len(not_qualifying())))
def test_loaders_that_do_not_qualify_pass_unchanged(index: int) -> None:
    dl, reason = not_qualifying()[index]
    why = why_not_fast(dl)
    assert why is not None and reason in why
    assert fast_loader(dl) is dl  # type: ignore[arg-type]  # some are no loaders
    wrapped = WrappedDataLoader(dl, lambda *b: b)
    assert fast_loader(wrapped) is wrapped
    if isinstance(dl, DataLoader):
        with pytest.raises(ValueError, match="does not qualify"):
            FastTensorLoader(dl)


def test_a_loader_changed_after_wrapping_is_iterated_its_own_way() -> None:
    dl = DataLoader(dataset(), batch_size=5)
    fast = fast_loader(dl)
    assert isinstance(fast, FastTensorLoader)
    dl.collate_fn = lambda samples: len(samples)  # not protected by DataLoader
    lengths: list[object] = list(fast)
    assert lengths == [5, 5, 5, 5, 3]


def test_the_fast_loader_forwards_what_callbacks_and_checkpoints_read() -> None:
    gen = torch.Generator().manual_seed(0)
    dl = DataLoader(dataset(), batch_size=5, shuffle=True, generator=gen, drop_last=True)
    fast = FastTensorLoader(dl)
    assert len(fast) == 4 and fast.dataset is dl.dataset and fast.sampler is dl.sampler
    assert fast.batch_sampler is dl.batch_sampler and fast.generator is gen
    assert fast.batch_size == 5 and fast.drop_last is True
    assert isinstance(dl.batch_sampler, BatchSampler)


def test_device_loader_is_rebuilt_around_the_fast_loader() -> None:
    dl = DataLoader(dataset(), batch_size=5)
    device = DeviceDataLoader(WrappedDataLoader(dl, preprocess), "cpu", prefetch=False)
    fast = fast_loader(device)
    assert isinstance(fast, DeviceDataLoader) and fast is not device
    assert fast.prefetch is False and fast.device == device.device
    assert isinstance(fast.dl, WrappedDataLoader) and isinstance(fast.dl.dl, FastTensorLoader)
    assert same_batch(list(fast), list(device))


def test_a_resumed_run_on_the_fast_path_matches_the_uninterrupted_one(tmp_path: Any) -> None:
    from trainkit import ModelCheckpoint

    class StopAfter(Callback):
        def on_train_batch_end(self, state: TrainState) -> None:
            if state.epoch == 1 and state.step == 2:
                raise KeyboardInterrupt

    def setup() -> tuple[nn.Module, optim.Optimizer, Iterable[Any]]:
        torch.manual_seed(0)
        model = dropout_model()
        train = WrappedDataLoader(DataLoader(dataset(50), batch_size=8, shuffle=True), preprocess)
        return model, optim.SGD(model.parameters(), lr=0.1), train

    model, opt, train = setup()
    fit(3, model, F.cross_entropy, opt, train, progress=False)
    expected = copy.deepcopy(model.state_dict())
    model, opt, train = setup()
    ckpt = ModelCheckpoint(tmp_path, save_top_k=0, every_n_steps=1)
    with pytest.raises(KeyboardInterrupt):
        fit(3, model, F.cross_entropy, opt, train, progress=False, callbacks=[ckpt, StopAfter()])
    model, opt, train = setup()
    torch.manual_seed(123)  # the checkpoint restores the random state
    fit(3, model, F.cross_entropy, opt, train, progress=False, resume=tmp_path)
    assert all(torch.equal(bits(v), bits(model.state_dict()[k])) for k, v in expected.items())


def test_the_fast_path_reads_nothing_back_per_step(host_reads: dict[str, int]) -> None:
    """Host reads on the fast path happen per epoch (the sampler's seed), never per step: ten
    times the training and validation steps make exactly as many reads."""
    counts = host_reads
    totals = []
    for n_train, n_valid in ((40, 8), (400, 80)):  # 10 and 100 steps; 2 and 20 validation batches
        counts.update(dict.fromkeys(counts, 0))
        ds = dataset(n_train + n_valid)
        train_ds = TensorDataset(*(t[:n_train] for t in ds.tensors))
        valid_ds = TensorDataset(*(t[n_train:] for t in ds.tensors))
        train, valid = get_data(train_ds, valid_ds, bs=4)
        valid = DataLoader(valid_ds, batch_size=4)
        model = dropout_model()
        seen = Seen()
        fit(2, model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
            WrappedDataLoader(train, preprocess), WrappedDataLoader(valid, preprocess),
            callbacks=[seen], progress=False, terminate_on_nan=False)  # fmt: skip
        assert isinstance(seen.train_dl, WrappedDataLoader)
        assert isinstance(seen.train_dl.dl, FastTensorLoader)
        assert isinstance(seen.valid_dl, WrappedDataLoader)
        assert isinstance(seen.valid_dl.dl, FastTensorLoader)
        totals.append(dict(counts))
    assert totals[0] == totals[1]
    assert totals[0]["item"] == 2 and totals[0]["tolist"] == 0  # the sampler's seed, per epoch


def test_a_torch_that_draws_otherwise_leaves_every_loader_to_the_dataloader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import trainkit.fastpath

    trainkit.fastpath._draws_as_this_torch.cache_clear()
    # a torch whose RandomSampler permutes differently: the self-check must see it
    monkeypatch.setattr(trainkit.fastpath, "draw_permutation", lambda n, g: torch.arange(n))
    try:
        dl = DataLoader(dataset(), batch_size=5, shuffle=True)
        torch.manual_seed(0)
        state = torch.get_rng_state()
        assert "draws its random numbers otherwise" in (why_not_fast(dl) or "")
        assert torch.equal(torch.get_rng_state(), state)  # the check put the global state back
        assert fast_loader(dl) is dl
    finally:
        trainkit.fastpath._draws_as_this_torch.cache_clear()


def test_this_torch_draws_as_the_fast_path_reproduces() -> None:
    import trainkit.fastpath

    trainkit.fastpath._draws_as_this_torch.cache_clear()
    assert trainkit.fastpath._draws_as_this_torch()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shuffle", [False, True])
def test_dataset_tensors_on_cuda_give_the_dataloaders_batches(shuffle: bool) -> None:
    ds = TensorDataset(*(t.cuda() for t in dataset().tensors))

    def run(fast: bool) -> list[Any]:
        gen = torch.Generator().manual_seed(2)
        dl = DataLoader(ds, batch_size=5, shuffle=shuffle, generator=gen)
        torch.manual_seed(3)
        return epochs_of(FastTensorLoader(dl) if fast else dl, 2, gen)

    slow, fast = run(False), run(True)
    assert same_run(slow, fast) and slow[0][0][0].is_cuda
