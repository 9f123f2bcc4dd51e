"""States that do not fit are refused, and a refused load changes nothing: other optimizer or
scheduler classes, foreign keys, other training loaders, persistent workers, bad fields."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision.transforms import ToTensor

from conftest import Crash, small_net
from trainkit import (
    Callback,
    CheckpointError,
    ModelCheckpoint,
    fashion_mnist,
    fit,
    get_data,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)


def trained(tmp_path: Path) -> tuple[Path, nn.Module, optim.Optimizer, Any]:
    """A checkpoint of an SGD + StepLR model after one step."""
    torch.manual_seed(0)
    model = small_net()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loss = F.cross_entropy(model(torch.randn(5, 4)), torch.zeros(5, dtype=torch.long))
    torch.autograd.backward(loss)
    opt.step()
    sched.step()
    path = tmp_path / "sgd.ckpt"
    save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, epoch=1, step=0)
    return path, model, opt, sched


def snapshot(*objects: Any) -> list[Any]:
    """Deep copies of the objects' state dicts (tensors cloned)."""

    def copy(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.clone()
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(copy(v) for v in value)
        return value

    return [copy(obj.state_dict()) for obj in objects]


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# --- 8: classes and foreign keys ------------------------------------------------------------------


def test_sgd_state_into_adam_is_refused_naming_both(tmp_path: Path) -> None:
    path, *_ = trained(tmp_path)
    model = small_net()
    adam = optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(
        CheckpointError,
        match=r"sgd\.ckpt: the optimizer state was saved from a torch\.optim\.sgd\.SGD; it cannot "
        r"be restored into a torch\.optim\.adam\.Adam",
    ):
        load_checkpoint(path, model=model, optimizer=adam)
    assert adam.state_dict()["param_groups"][0]["betas"] == (0.9, 0.999)


def test_steplr_state_into_onecyclelr_is_refused_naming_both(tmp_path: Path) -> None:
    path, *_ = trained(tmp_path)
    model = small_net()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    one_cycle = optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100)
    with pytest.raises(
        CheckpointError,
        match=r"the scheduler state was saved from a torch\.optim\.lr_scheduler\.StepLR; it "
        r"cannot be restored into a torch\.optim\.lr_scheduler\.OneCycleLR",
    ):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=one_cycle)


def test_scheduler_state_with_foreign_keys_never_replaces_its_optimizer(tmp_path: Path) -> None:
    path, *_ = trained(tmp_path)
    data = torch.load(path, weights_only=True)
    data["scheduler"]["optimizer"] = {"param_groups": []}  # a crafted file: same class
    torch.save(data, tmp_path / "foreign.ckpt")
    model = small_net()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with pytest.raises(
        CheckpointError, match=r"foreign\.ckpt: the scheduler state does not fit .*\['optimizer'\]"
    ):
        load_checkpoint(tmp_path / "foreign.ckpt", model=model, optimizer=opt, scheduler=sched)
    assert sched.optimizer is opt


def test_fit_refuses_to_resume_with_another_optimizer_class(tmp_path: Path) -> None:
    ds = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    model = small_net()
    fit(1, model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
        DataLoader(ds, batch_size=8), callbacks=[ModelCheckpoint(tmp_path, save_top_k=0)],
        progress=False)  # fmt: skip
    resumed = small_net()
    with pytest.raises(CheckpointError, match=r"saved from a torch\.optim\.sgd\.SGD.*Adam"):
        fit(2, resumed, F.cross_entropy, optim.Adam(resumed.parameters()),
            DataLoader(ds, batch_size=8), progress=False, resume=tmp_path)  # fmt: skip


def test_objects_of_the_wrong_kind_are_refused_at_run_time(tmp_path: Path) -> None:
    model = small_net()
    opt = optim.SGD(model.parameters(), lr=0.1)
    sched = optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.raises(
        TypeError, match=r"save_checkpoint\(optimizer=...\): expected a torch\.optim\.Optimizer, "
        r"got StepLR",
    ):  # fmt: skip
        save_checkpoint(tmp_path / "a.ckpt", model=model, optimizer=sched, epoch=0, step=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'optimiser'"):
        save_checkpoint(tmp_path / "a.ckpt", model=model, optimiser=opt, epoch=0, step=0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"save_checkpoint\(extra=...\): keys must be strings"):
        save_checkpoint(tmp_path / "a.ckpt", model=model, epoch=0, step=0, extra={1: 2})  # type: ignore[dict-item]
    assert not (tmp_path / "a.ckpt").exists()


# --- 10: all or nothing ---------------------------------------------------------------------------


def crafted(path: Path, name: str, change: Any) -> Path:
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, path.with_name(name))
    return path.with_name(name)


def bad_rng(data: dict[str, Any]) -> None:
    data["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("bad-epoch.ckpt", lambda d: d.update(epoch="three"), r"field 'epoch' is 'three'"),
        ("bad-rng.ckpt", bad_rng, r"field 'rng' is not a valid random-generator state"),
        (
            "other-class.ckpt",
            lambda d: d["classes"].update(scheduler="torch.optim.lr_scheduler.OneCycleLR"),
            r"scheduler state was saved from a torch\.optim\.lr_scheduler\.OneCycleLR",
        ),
    ],
)
def test_a_failed_load_leaves_every_object_bitwise_unchanged(
    tmp_path: Path, name: str, change: Any, message: str
) -> None:
    path, *_ = trained(tmp_path)
    bad = crafted(path, name, change)
    torch.manual_seed(1)
    model = small_net()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.autograd.backward(model(torch.randn(2, 4)).sum())
    opt.step()  # a momentum buffer of its own
    sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    before = snapshot(model, opt, sched, scaler)
    with pytest.raises(CheckpointError, match=rf"{name}: .*{message}"):
        load_checkpoint(bad, model=model, optimizer=opt, scheduler=sched)
    assert equal(snapshot(model, opt, sched, scaler), before)


def test_a_failed_resume_leaves_every_object_bitwise_unchanged(tmp_path: Path) -> None:
    """fit(resume=...) with a checkpoint whose RNG state is bad: nothing restored."""
    ds = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    model = small_net()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fit(1, model, F.cross_entropy, opt, DataLoader(ds, batch_size=8),
        callbacks=[ModelCheckpoint(tmp_path, save_top_k=0)], progress=False)  # fmt: skip
    crafted(tmp_path / "last.ckpt", "last.ckpt", bad_rng)
    other = small_net()
    other_opt = optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    before = snapshot(other, other_opt)
    with pytest.raises(CheckpointError, match=r"field 'rng' is not a valid random-generator"):
        fit(2, other, F.cross_entropy, other_opt, DataLoader(ds, batch_size=8), progress=False,
            resume=tmp_path)  # fmt: skip
    assert equal(snapshot(other, other_opt), before)


# --- 9: another training loader -------------------------------------------------------------------


def rows(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(n)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def crash_mid_epoch(dirpath: Path) -> None:
    """64 rows in batches of 8 (8 per epoch); a checkpoint every 3 steps; a crash at step 4."""
    seed_everything(0)
    model = small_net()
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(2, model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
            DataLoader(rows(64), batch_size=8, shuffle=True),
            callbacks=[ModelCheckpoint(dirpath, save_top_k=0, every_n_steps=3), Crash(4)],
            progress=False)  # fmt: skip


@pytest.mark.parametrize(
    ("loader", "difference"),
    [
        (lambda: DataLoader(rows(64), batch_size=16, shuffle=True), r"batch_size 8 then, 16 now"),
        (
            lambda: DataLoader(rows(128), batch_size=8, shuffle=True),
            r"dataset_length 64 then, 128 now; num_batches 8 then, 16 now",
        ),
    ],
)
def test_a_mid_epoch_checkpoint_resumed_with_another_loader_is_refused(
    tmp_path: Path, loader: Any, difference: str
) -> None:
    crash_mid_epoch(tmp_path)
    model = small_net()
    opt = optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model, opt)
    with pytest.raises(CheckpointError) as info:
        fit(2, model, F.cross_entropy, opt, loader(), progress=False, resume=tmp_path)
    message = str(info.value)
    assert "last.ckpt: saved after 3 batches of epoch 1 with another training loader" in message
    assert re.search(difference, message), message
    assert "restart the epoch with this loader: resume from a checkpoint written at an " in message
    assert equal(snapshot(model, opt), before)


def test_a_mid_epoch_checkpoint_resumes_with_an_equal_loader(tmp_path: Path) -> None:
    crash_mid_epoch(tmp_path)
    model = small_net()
    history = fit(2, model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                  DataLoader(rows(64), batch_size=8, shuffle=True), progress=False,
                  resume=tmp_path)  # fmt: skip
    assert len(history) == 2


def quickstart_training_set() -> Dataset[Any]:
    """The Quickstart's training set: the real FashionMNIST when it is on this machine, else
    tensors of its shape (the refusal happens before any image is read)."""
    try:
        images: Dataset[Any] = fashion_mnist(train=True, transform=ToTensor(), download=False)
        return images
    except FileNotFoundError:
        return TensorDataset(torch.zeros(60_000, 1, 28, 28), torch.zeros(60_000, dtype=torch.long))


def test_quickstart_smoke_checkpoint_is_refused_by_the_real_data_run(tmp_path: Path) -> None:
    """The Quickstart with --smoke (its first 512 training images), then on the whole
    FashionMNIST training set (60,000) with the same checkpoint directory: the second run must
    not continue the first (it trained nothing and reported 11 % test accuracy)."""
    full = quickstart_training_set()
    smoke = Subset(full, range(512))  # what examples/quickstart.py --smoke trains on

    def network() -> nn.Module:  # the Quickstart's NeuralNetwork
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                             nn.ReLU(), nn.Linear(512, 10))  # fmt: skip

    model = network()
    train_dl, test_dl = get_data(smoke, Subset(full, range(256)), 64)
    fit(2, model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=1e-3), train_dl,
        test_dl, callbacks=[ModelCheckpoint(tmp_path, save_top_k=0)], progress=False)  # fmt: skip
    real = network()
    train_dl, test_dl = get_data(full, Subset(full, range(256)), 64)
    for epochs in (2, 10):  # all of the smoke run's epochs done, or more to do
        with pytest.raises(
            CheckpointError,
            match=r"last\.ckpt: the run was trained on a training set of 512 samples; train_dl "
            r"now has 60000\. .*Start a new run",
        ):
            fit(epochs, real, nn.CrossEntropyLoss(), optim.SGD(real.parameters(), lr=1e-3),
                train_dl, test_dl, progress=False, resume=tmp_path)  # fmt: skip


# --- 11: persistent workers -----------------------------------------------------------------------


def worker_loader(persistent: bool) -> DataLoader[Any]:
    return DataLoader(rows(64), batch_size=16, shuffle=True, num_workers=1,
                      persistent_workers=persistent)  # fmt: skip


def test_resume_after_epoch_0_with_persistent_workers_is_refused(tmp_path: Path) -> None:
    seed_everything(0)
    model = small_net()
    fit(1, model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1), worker_loader(True),
        callbacks=[ModelCheckpoint(tmp_path, save_top_k=0)], progress=False)  # fmt: skip
    resumed = small_net()
    for persistent in (True, False):  # the run it belongs to had persistent workers
        with pytest.raises(
            CheckpointError,
            match=r"last\.ckpt: cannot resume exactly at epoch 2 with persistent_workers=True: "
            r".*Train with persistent_workers=False",
        ):
            fit(3, resumed, F.cross_entropy, optim.SGD(resumed.parameters(), lr=0.1),
                worker_loader(persistent), progress=False, resume=tmp_path)  # fmt: skip


def test_resume_inside_epoch_0_with_persistent_workers_is_exact(tmp_path: Path) -> None:
    """Within the first epoch the resumed run starts its workers where the uninterrupted one
    did (the same generator states), so persistent workers resume bitwise there."""

    def run(dirpath: Path, crash: bool) -> nn.Module:
        seed_everything(0)
        model = small_net()
        resume = dirpath if (dirpath / "last.ckpt").is_file() else None
        if resume is not None:
            seed_everything(12345)  # as a new process would: resume restores the generators
        callbacks: list[Callback] = [ModelCheckpoint(dirpath, save_top_k=0, every_n_steps=1)]
        if crash:
            callbacks.append(Crash(2))  # 4 steps per epoch: inside epoch 0
        fit(3, model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            worker_loader(True), callbacks=callbacks, progress=False, resume=resume)  # fmt: skip
        return model

    uninterrupted = run(tmp_path / "a", crash=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", crash=True)
    resumed = run(tmp_path / "b", crash=False)
    assert equal(resumed.state_dict(), uninterrupted.state_dict())
