"""Checkpoints: round trips, safe loading, clear errors, atomic writes, exact resume."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, TensorDataset

from conftest import Crash, Scripted, make_three_class, small_net
from trainkit import (
    Callback,
    CheckpointError,
    EarlyStopping,
    ModelCheckpoint,
    fit,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    seed_everything,
    unsafe_load_pickled_model,
)
from trainkit.checkpoint import FORMAT_VERSION


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


# --- weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors"])
def test_weights_round_trip(tmp_path: Path, name: str) -> None:
    model, other = small_net(), small_net()
    assert save_weights(tmp_path / name, model) == tmp_path / name
    assert not same(model, other)
    load_weights(tmp_path / name, other)
    assert same(model, other)


def test_plain_torch_save_state_dict_loads_too(tmp_path: Path) -> None:
    model, other = small_net(), small_net()
    torch.save(model.state_dict(), tmp_path / "tutorial.pth")  # what the seeds do
    assert same(load_weights(tmp_path / "tutorial.pth", other), model)


def test_safetensors_file_is_readable_by_the_safetensors_package(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = small_net()
    save_weights(tmp_path / "w.safetensors", model)
    tensors = safetensors_torch.load_file(str(tmp_path / "w.safetensors"))
    assert set(tensors) == set(model.state_dict())


def test_wrong_model_names_the_keys(tmp_path: Path) -> None:
    save_weights(tmp_path / "w.pth", small_net())
    wider = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3), nn.Linear(3, 3))
    with pytest.raises(
        CheckpointError, match=r"w\.pth: the weights do not match Sequential"
    ) as info:
        load_weights(tmp_path / "w.pth", wider)
    message = str(info.value)
    assert "wrong shape: 0.bias: file (8,) vs model (16,)" in message
    assert "missing keys: 3.bias, 3.weight" in message
    load_weights(
        tmp_path / "w.pth",
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 3)),
        strict=False,
    )


def test_ddp_prefix_and_compiled_wrapper_are_handled(tmp_path: Path) -> None:
    model = small_net()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
    assert same(load_weights(tmp_path / "ddp.pth", small_net()), model)

    class Wrapper(nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    save_weights(tmp_path / "c.pth", Wrapper(model))
    assert set(torch.load(tmp_path / "c.pth", weights_only=True)) == set(model.state_dict())


# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_round_trip_restores_everything_asked(tmp_path: Path) -> None:
    model = small_net()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = F.cross_entropy(model(torch.randn(5, 4)), torch.zeros(5, dtype=torch.long))
    torch.autograd.backward(loss)
    opt.step()
    sched.step()
    save_checkpoint(
        tmp_path / "c.ckpt",
        model=model,
        optimizer=opt,
        scheduler=sched,
        scaler=scaler,
        epoch=3,
        step=7,
        extra={"note": "hello", "sizes": [1, 2]},
    )
    model2 = small_net()
    opt2 = optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sched2 = optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    scaler2 = torch.amp.GradScaler("cpu")
    ckpt = load_checkpoint(
        tmp_path / "c.ckpt", model=model2, optimizer=opt2, scheduler=sched2, scaler=scaler2
    )
    assert (ckpt.epoch, ckpt.step, ckpt.format_version) == (3, 7, FORMAT_VERSION)
    assert ckpt.restored == ["model", "optimizer", "scheduler", "scaler"]
    assert ckpt.extra == {"note": "hello", "sizes": [1, 2]}
    assert same(model, model2)
    assert torch.equal(
        opt2.state_dict()["state"][0]["momentum_buffer"],
        opt.state_dict()["state"][0]["momentum_buffer"],
    )
    assert sched2.get_last_lr() == sched.get_last_lr() and scaler2.get_scale() == 1024.0


def test_checkpoint_errors_are_clear(tmp_path: Path) -> None:
    model = small_net()
    with pytest.raises(CheckpointError, match=r"nope\.ckpt: no such file"):
        load_checkpoint(tmp_path / "nope.ckpt", model=model)
    save_weights(tmp_path / "w.pth", model)
    with pytest.raises(CheckpointError, match=r"not a trainkit checkpoint.*load_weights"):
        load_checkpoint(tmp_path / "w.pth", model=model)
    save_checkpoint(tmp_path / "c.ckpt", model=model, epoch=0, step=0)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(
            tmp_path / "c.ckpt", model=model, optimizer=optim.SGD(model.parameters(), lr=0.1)
        )
    data = torch.load(tmp_path / "c.ckpt", weights_only=True)
    torch.save({**data, "format_version": FORMAT_VERSION + 1}, tmp_path / "new.ckpt")
    with pytest.raises(
        CheckpointError, match=rf"format version {FORMAT_VERSION + 1} is newer.*upgrade"
    ):
        load_checkpoint(tmp_path / "new.ckpt", model=model)
    whole = (tmp_path / "c.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: damaged: the archive fails its check"):
        load_checkpoint(tmp_path / "cut.ckpt", model=model)
    with pytest.raises(
        TypeError,
        match=r"save_checkpoint\(extra\['fn'\]\): a builtin_function_or_method cannot be loaded",
    ):
        save_checkpoint(tmp_path / "x.ckpt", model=model, epoch=0, step=0, extra={"fn": print})


class Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_files_that_would_run_code_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"format": "trainkit.checkpoint", "model": Payload(marker)}, evil)
    model = small_net()
    for load in (
        lambda: load_checkpoint(evil, model=model),
        lambda: load_weights(evil, model),
        lambda: fit(
            1,
            model,
            F.cross_entropy,
            optim.SGD(model.parameters(), lr=0.1),
            [(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))],
            resume=evil,
            progress=False,
        ),
    ):
        with pytest.raises(
            CheckpointError, match=r"evil\.ckpt: refused.*could run code.*unsafe_load_pickled_model"
        ):
            load()
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(tmp_path / "evil.pkl", model)
    assert not marker.exists()


def test_whole_pickled_models_need_the_explicit_unsafe_opt_in(tmp_path: Path) -> None:
    model = small_net()
    torch.save(model, tmp_path / "model.pth")  # the Quickstart's torch.save(model, PATH)
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(tmp_path / "model.pth", small_net())
    assert same(unsafe_load_pickled_model(tmp_path / "model.pth"), model)


def test_unwritable_target_names_the_path_and_keeps_the_old_file(tmp_path: Path) -> None:
    model = small_net()
    save_weights(tmp_path / "w.pth", model)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(OSError, match=r"could not write .*not-a-dir/w\.pth"):
        save_weights(blocker / "w.pth", model)
    # a full disk: a file size limit below the checkpoint's size, in a child process
    import subprocess
    import sys

    script = f"""
import resource, signal, torch
from torch import nn
from trainkit import save_weights
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    save_weights({str(tmp_path / "w.pth")!r}, nn.Linear(100, 100))
except OSError as err:
    print("OSError:", err)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "OSError: [Errno 27] could not write" in result.stdout, result.stderr
    assert same(load_weights(tmp_path / "w.pth", small_net()), model)  # the old file is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_seed_everything_repeats_every_generator() -> None:
    def draws() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    assert seed_everything(7) == 7
    first = draws()
    seed_everything(7)
    assert draws() == first
    with pytest.raises(ValueError, match=r"seed_everything\(seed=...\)"):
        seed_everything(-1)


# --- ModelCheckpoint --------------------------------------------------------------------------


def test_model_checkpoint_keeps_the_best_k_and_last(tmp_path: Path) -> None:
    model = small_net()
    mc = ModelCheckpoint(tmp_path / "ck", save_top_k=2)
    fit(
        5,
        model,
        F.cross_entropy,
        optim.SGD(model.parameters(), lr=0.1),
        DataLoader(make_three_class(64), batch_size=16),
        callbacks=[Scripted([0.9, 0.5, 0.7, 0.4, 0.8]), mc],
        progress=False,
    )
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["epoch=2-val_loss=0.5000.ckpt", "epoch=4-val_loss=0.4000.ckpt", "last.ckpt"]
    assert mc.state_dict() == {
        "best": [[0.4, "epoch=4-val_loss=0.4000.ckpt"], [0.5, "epoch=2-val_loss=0.5000.ckpt"]]
    }
    ckpt = load_checkpoint(tmp_path / "ck" / "epoch=4-val_loss=0.4000.ckpt", model=small_net())
    assert ckpt.epoch == 3 and ckpt.epoch_complete


def test_model_checkpoint_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(mode=...\)"):
        ModelCheckpoint(tmp_path, mode="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(save_top_k=...\)"):
        ModelCheckpoint(tmp_path, save_top_k=-2)
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(every_n_steps=...\)"):
        ModelCheckpoint(tmp_path, every_n_steps=0)
    model = small_net()
    with pytest.raises(
        ValueError, match=r"ModelCheckpoint\(monitor=...\): .* not record 'val_acc'"
    ):
        fit(
            1,
            model,
            F.cross_entropy,
            optim.SGD(model.parameters(), lr=0.1),
            DataLoader(make_three_class(64), batch_size=16),
            callbacks=[ModelCheckpoint(tmp_path, monitor="val_acc")],
            progress=False,
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"fit\(resume=.*\): no last\.ckpt in that directory"):
        fit(
            1,
            model,
            F.cross_entropy,
            optim.SGD(model.parameters(), lr=0.1),
            DataLoader(make_three_class(64), batch_size=16),
            resume=tmp_path / "empty",
            progress=False,
        )
    with pytest.raises(
        CheckpointError, match=r"fit\(resume=.*nowhere.*\): no such file or directory"
    ):
        fit(
            1,
            model,
            F.cross_entropy,
            optim.SGD(model.parameters(), lr=0.1),
            DataLoader(make_three_class(64), batch_size=16),
            resume=tmp_path / "nowhere",
            progress=False,
        )


# --- exact resume -----------------------------------------------------------------------------


class Net(nn.Module):
    """The tutorial's Mnist_CNN, with dropout so the random masks matter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 10, kernel_size=3, stride=2, padding=1)
        self.drop = nn.Dropout(0.3)

    def forward(self, xb: Tensor) -> Tensor:
        xb = F.relu(self.conv1(xb.view(-1, 1, 28, 28)))
        xb = self.drop(xb)
        xb = F.relu(self.conv2(xb))
        return F.avg_pool2d(xb, 7).view(-1, 10)


def run(
    dirpath: Path,
    epochs: int,
    *,
    crash_at: int | None = None,
    resume: bool = False,
    generator: bool = False,
    unsized: bool = False,
) -> tuple[nn.Module, optim.Optimizer, Any]:
    """Fresh objects every time, as a new process would have."""
    seed_everything(0)
    g = torch.Generator().manual_seed(5) if generator else None
    x = torch.randn(200, 784, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(2))
    train_dl = DataLoader(TensorDataset(x[:160], y[:160]), batch_size=16, shuffle=True, generator=g)
    valid_dl = DataLoader(TensorDataset(x[160:], y[160:]), batch_size=32)
    loader: Any = train_dl
    if unsized:
        loader = Batches(lambda: iter(train_dl))
    model = Net()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    callbacks: list[Callback] = [
        EarlyStopping(patience=5),
        ModelCheckpoint(dirpath, every_n_steps=3),
    ]
    if crash_at is not None:
        callbacks.append(Crash(crash_at))
    if resume:
        seed_everything(12345)  # a new process: other generator states; resume must restore them
    history = fit(
        epochs,
        model,
        F.cross_entropy,
        opt,
        loader,
        valid_dl,
        scheduler=sched,
        callbacks=callbacks,
        progress=False,
        resume=dirpath if resume else None,
    )
    return model, opt, history


class Batches:
    """An iterable without a length (as a generator-based loader)."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def __iter__(self) -> Any:
        return self.make()


def without_seconds(records: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.parametrize(("crash_at", "generator"), [(14, False), (20, True), (10, False)])
def test_resume_after_a_crash_equals_the_uninterrupted_run(
    tmp_path: Path, crash_at: int, generator: bool
) -> None:
    """10 steps per epoch, checkpoints every 3 steps: crashes at 14 and 20 resume from step 12
    and 18 (mid-epoch), the crash at 10 from the end of epoch 0."""
    model_a, opt_a, history_a = run(tmp_path / "a", 3, generator=generator)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", 3, crash_at=crash_at, generator=generator)
    model_b, opt_b, history_b = run(tmp_path / "b", 3, resume=True, generator=generator)
    assert same(model_a, model_b)  # bitwise
    for sa, sb in zip(
        opt_a.state_dict()["state"].values(), opt_b.state_dict()["state"].values(), strict=True
    ):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert without_seconds(history_a.records) == without_seconds(history_b.records)


def test_resuming_a_finished_run_trains_nothing_more(tmp_path: Path) -> None:
    model_a, _, history_a = run(tmp_path / "a", 2)
    model_b, _, history_b = run(tmp_path / "a", 2, resume=True)
    assert same(model_a, model_b) and len(history_b) == 2
    assert without_seconds(history_a.records) == without_seconds(history_b.records)


def test_mid_epoch_checkpoint_against_a_shorter_unsized_loader_is_refused(tmp_path: Path) -> None:
    """A loader without a length (a generator) cannot be checked up front: the replay finds it."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", 3, crash_at=14, unsized=True)
    model = Net()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = (torch.randn(16, 784), torch.zeros(16, dtype=torch.long))
    with pytest.raises(
        CheckpointError,
        match=r"last\.ckpt: saved after 2 batches of epoch 2, but train_dl now yields only 1",
    ):
        fit(
            3,
            model,
            F.cross_entropy,
            opt,
            Batches(lambda: iter([batch])),
            scheduler=optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7),
            progress=False,
            resume=tmp_path / "b",
        )


def test_non_finite_weights_never_replace_a_good_checkpoint(tmp_path: Path) -> None:
    calls = {"n": 0}

    def breaks_in_epoch_1(out: Tensor, y: Tensor) -> Tensor:
        calls["n"] += torch.is_grad_enabled()
        loss = F.cross_entropy(out, y)
        return loss * float("inf") if calls["n"] > 4 else loss  # 4 steps per epoch

    model = small_net()
    mc = ModelCheckpoint(tmp_path, save_top_k=0)
    fit(
        3,
        model,
        breaks_in_epoch_1,
        optim.SGD(model.parameters(), lr=0.1),
        DataLoader(make_three_class(64), batch_size=16),
        callbacks=[mc],
        terminate_on_nan=False,
        progress=False,
    )
    assert not all(bool(p.isfinite().all()) for p in model.parameters())  # the run did break
    restored = small_net()
    ckpt = load_checkpoint(mc.last_path, model=restored)
    assert ckpt.epoch == 0 and all(bool(p.isfinite().all()) for p in restored.parameters())


def test_a_tensor_subclass_such_as_a_dtensor_is_refused_in_saved_state(tmp_path: Path) -> None:
    """A sharded model's DTensor is one process's part: rank 0 alone would save its shard."""

    class Part(torch.Tensor):
        pass

    with pytest.raises(TypeError, match=r"a Part cannot be saved in a checkpoint file"):
        save_checkpoint(
            tmp_path / "a.ckpt",
            model=torch.nn.Linear(2, 2),
            epoch=0,
            step=0,
            extra={"ema": torch.zeros(2).as_subclass(Part)},
        )
    assert not (tmp_path / "a.ckpt").exists()
