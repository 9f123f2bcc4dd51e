"""fit's training options: accumulation, clipping, schedulers, mixed precision, channels_last,
compile, and the default NaN check."""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, TensorDataset

from trainkit import Callback, TerminateOnNaN, TrainState, fit


def data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def twin_models() -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, copy.deepcopy(model)


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), (pa - pb).abs().max()


class Steps(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_fit_end(self, state: TrainState) -> None:
        self.steps.append(state.global_step)


# --- gradient accumulation --------------------------------------------------------------------


def test_accumulated_update_equals_one_big_batch() -> None:
    ds = data(32)
    small, big = twin_models()
    steps = Steps()
    fit(
        1,
        small,
        F.cross_entropy,
        optim.SGD(small.parameters(), lr=0.5),
        DataLoader(ds, batch_size=8),
        accumulate=4,
        callbacks=[steps],
        progress=False,
    )
    fit(
        1,
        big,
        F.cross_entropy,
        optim.SGD(big.parameters(), lr=0.5),
        DataLoader(ds, batch_size=32),
        progress=False,
    )
    assert steps.steps == [1]
    assert_same_params(small, big)


def test_the_last_shorter_group_is_divided_by_its_own_size() -> None:
    ds = data(40)  # 5 batches of 8 with accumulate=3: groups of 3 and 2 batches
    small, big = twin_models()
    fit(
        1,
        small,
        F.cross_entropy,
        optim.SGD(small.parameters(), lr=0.5),
        DataLoader(ds, batch_size=8),
        accumulate=3,
        progress=False,
    )
    x, y = ds.tensors
    fit(
        1,
        big,
        F.cross_entropy,
        optim.SGD(big.parameters(), lr=0.5),
        [(x[:24], y[:24]), (x[24:], y[24:])],
        progress=False,
    )
    assert_same_params(small, big)


def test_a_loader_without_length_steps_its_leftover_group() -> None:
    ds = data(40)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        yield from DataLoader(ds, batch_size=8)

    model, _ = twin_models()
    steps = Steps()
    fit(
        1,
        model,
        F.cross_entropy,
        optim.SGD(model.parameters(), lr=0.1),
        batches(),
        accumulate=2,
        callbacks=[steps],
        progress=False,
    )
    assert steps.steps == [3]  # 2 + 2 + the leftover 1


# --- clipping ---------------------------------------------------------------------------------


class Grads(Callback):
    """Records the gradient norm the hook sees (before clipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, state: TrainState) -> None:
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_clip_grad_norm_bounds_the_update() -> None:
    model, _ = twin_models()
    before, grads = flat(model), Grads()
    fit(
        1,
        model,
        lambda out, y: 100 * F.cross_entropy(out, y),
        optim.SGD(model.parameters(), lr=1.0),
        [data(16).tensors],
        clip_grad_norm=0.5,
        callbacks=[grads],
        progress=False,
    )
    assert grads.norms[0] > 0.5  # the hook saw the unclipped gradient
    assert float(torch.linalg.vector_norm(flat(model) - before)) == pytest.approx(0.5, rel=1e-4)


def test_clip_grad_value_bounds_every_element() -> None:
    model, _ = twin_models()
    before = flat(model)
    fit(
        1,
        model,
        lambda out, y: 100 * F.cross_entropy(out, y),
        optim.SGD(model.parameters(), lr=1.0),
        [data(16).tensors],
        clip_grad_value=0.01,
        progress=False,
    )
    delta = (flat(model) - before).abs()
    assert delta.max() == pytest.approx(0.01, rel=1e-5)


# --- schedulers -------------------------------------------------------------------------------


def test_epoch_scheduler_and_recorded_learning_rate() -> None:
    model, _ = twin_models()
    opt = optim.SGD(model.parameters(), lr=0.1)
    history = fit(
        3,
        model,
        F.cross_entropy,
        opt,
        DataLoader(data(32), batch_size=8),
        scheduler=optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        progress=False,
    )
    assert history["lr"] == pytest.approx([0.1, 0.05, 0.025])


def test_one_cycle_is_stepped_per_batch() -> None:
    model, _ = twin_models()
    opt = optim.SGD(model.parameters(), lr=0.1)
    dl = DataLoader(data(32), batch_size=8)
    sched = optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=3 * len(dl))
    history = fit(
        3,
        model,
        F.cross_entropy,
        opt,
        dl,
        scheduler=sched,
        scheduler_interval="step",
        progress=False,
    )
    assert sched.last_epoch == 12  # one step per batch; one more would raise in OneCycleLR
    assert history["lr"][0] > history["lr"][2]  # annealed down at the end


def test_plateau_scheduler_reads_the_validation_loss() -> None:
    model, _ = twin_models()
    opt = optim.SGD(model.parameters(), lr=0.0)  # nothing improves
    sched = optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    opt.param_groups[0]["lr"] = 0.0
    dl = DataLoader(data(16), batch_size=8)
    fit(3, model, F.cross_entropy, opt, dl, dl, scheduler=sched, progress=False)
    assert sched.best == pytest.approx(
        F.cross_entropy(model(data(16).tensors[0]), data(16).tensors[1]).item(), rel=1e-5
    )
    assert sched.num_bad_epochs == 0 and sched.last_epoch == 3


class Scripted:
    """A metric whose epochs' results are scripted: `values[epoch]`."""

    def __init__(self, values: list[float]) -> None:
        self.values, self.calls = values, 0

    def reset(self) -> None:
        pass

    def update(self, preds: Tensor, target: Tensor) -> None:
        pass

    def compute(self) -> Tensor:
        self.calls += 1
        return torch.tensor(self.values[self.calls - 1])


def test_a_max_mode_plateau_scheduler_reads_the_monitored_accuracy() -> None:
    """The issue's input: a mode='max' ReduceLROnPlateau meant for accuracy. Fed val_loss it
    halved the rate in the epoch where accuracy peaked; fed val_accuracy it does not."""
    model, _ = twin_models()
    opt = optim.SGD(model.parameters(), lr=0.1)
    sched = optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=0, factor=0.5)
    dl = DataLoader(data(16), batch_size=8)
    history = fit(
        4,
        model,
        F.cross_entropy,
        opt,
        dl,
        dl,
        metrics={"accuracy": Scripted([0.5, 0.6, 0.7, 0.65])},  # peaks at epoch 3
        scheduler=sched,
        scheduler_monitor="val_accuracy",
        progress=False,
    )
    assert history["val_accuracy"] == pytest.approx([0.5, 0.6, 0.7, 0.65])
    assert sched.best == pytest.approx(0.7)
    # halved only after epoch 4, the first without improvement (History records the lr the
    # epoch ran with)
    assert history["lr"] == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_scheduler_monitor_is_checked_before_the_first_step() -> None:
    model, _ = twin_models()
    opt = optim.SGD(model.parameters(), lr=0.1)
    dl = DataLoader(data(16), batch_size=8)
    plateau = optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max")
    steps = Steps()
    with pytest.raises(
        ValueError,
        match=r"fit\(scheduler_monitor=...\): this run does not record 'val_acc'\. "
        r"Did you mean 'val_accuracy'\?",
    ):
        fit(1, model, F.cross_entropy, opt, dl, dl, metrics={"accuracy": Scripted([1.0])},
            scheduler=plateau, scheduler_monitor="val_acc", callbacks=[steps])  # fmt: skip
    assert steps.steps == []  # on_fit_end never ran: refused before the run started
    step_lr = optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.raises(ValueError, match=r"only a ReduceLROnPlateau .* got scheduler=StepLR"):
        fit(1, model, F.cross_entropy, opt, dl, scheduler=step_lr, scheduler_monitor="train_loss")
    # any recorded name may be monitored, seconds and lr too
    fit(1, model, F.cross_entropy, opt, dl, scheduler=plateau, scheduler_monitor="seconds",
        progress=False)  # fmt: skip


def test_bad_scheduler_options() -> None:
    model, other = twin_models()
    opt = optim.SGD(model.parameters(), lr=0.1)
    dl = DataLoader(data(16), batch_size=8)
    foreign = optim.lr_scheduler.StepLR(optim.SGD(other.parameters(), lr=0.1), step_size=1)
    with pytest.raises(
        ValueError, match=r"fit\(scheduler=...\): the scheduler was built for another optimizer"
    ):
        fit(1, model, F.cross_entropy, opt, dl, scheduler=foreign)
    with pytest.raises(
        ValueError, match=r"fit\(scheduler_interval=...\): expected 'epoch' or 'step', got 'batch'"
    ):
        fit(1, model, F.cross_entropy, opt, dl, scheduler_interval="batch")  # type: ignore[arg-type]
    plateau = optim.lr_scheduler.ReduceLROnPlateau(opt)
    with pytest.raises(ValueError, match="ReduceLROnPlateau steps per epoch"):
        fit(1, model, F.cross_entropy, opt, dl, scheduler=plateau, scheduler_interval="step")


# --- mixed precision, memory format, compile ------------------------------------------------------


def test_bf16_autocast_on_cpu_trains_in_bfloat16() -> None:
    dtypes: list[torch.dtype] = []

    class Look(Callback):
        def on_train_batch_end(self, state: TrainState) -> None:
            dtypes.append(state.output.dtype)

    model, _ = twin_models()
    dl = DataLoader(data(64), batch_size=16)
    history = fit(
        4,
        model,
        F.cross_entropy,
        optim.SGD(model.parameters(), lr=0.5),
        dl,
        dl,
        amp="bf16",
        callbacks=[Look()],
        progress=False,
    )
    assert set(dtypes) == {torch.bfloat16}
    assert model[0].weight.dtype == torch.float32  # master weights stay float32
    assert history["val_loss"][-1] < history["val_loss"][0]


def test_bad_amp_options() -> None:
    model, _ = twin_models()
    opt, dl = optim.SGD(model.parameters(), lr=0.1), [data(8).tensors]
    with pytest.raises(ValueError, match=r"fit\(amp='fp16'\) needs a CUDA device.*'bf16'"):
        fit(1, model, F.cross_entropy, opt, dl, amp="fp16")
    with pytest.raises(
        ValueError, match=r"fit\(amp=...\): expected None, 'bf16' or 'fp16', got 'fp8'"
    ):
        fit(1, model, F.cross_entropy, opt, dl, amp="fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"fit\(accumulate=...\): expected an int >= 1, got 0"):
        fit(1, model, F.cross_entropy, opt, dl, accumulate=0)
    with pytest.raises(ValueError, match=r"fit\(clip_grad_norm=...\): expected a number > 0"):
        fit(1, model, F.cross_entropy, opt, dl, clip_grad_norm=0.0)
    with pytest.raises(ValueError, match=r"fit\(clip_grad_value=...\): expected a number > 0"):
        fit(1, model, F.cross_entropy, opt, dl, clip_grad_value=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_cuda_uses_a_grad_scaler() -> None:
    model = nn.Linear(6, 2).cuda()
    seen: list[Any] = []

    class Look(Callback):
        def on_fit_end(self, state: TrainState) -> None:
            seen.append(state.scaler)

    x, y = data(64).tensors
    fit(
        2,
        model,
        F.cross_entropy,
        optim.SGD(model.parameters(), lr=0.1),
        DataLoader(TensorDataset(x.cuda(), y.cuda()), batch_size=16),
        amp="fp16",
        callbacks=[Look()],
        progress=False,
    )
    assert isinstance(seen[0], torch.amp.GradScaler) and seen[0].state_dict()["scale"] > 0


def conv_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


def test_channels_last_converts_model_and_inputs() -> None:
    formats: list[bool] = []

    class Look(Callback):
        def on_train_batch_start(self, state: TrainState) -> None:
            formats.append(state.xb.is_contiguous(memory_format=torch.channels_last))

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(
        torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 2, (16,), generator=g)
    )
    a, b = conv_model(), conv_model()
    fit(
        1,
        a,
        F.cross_entropy,
        optim.SGD(a.parameters(), lr=0.1),
        DataLoader(ds, batch_size=8),
        channels_last=True,
        callbacks=[Look()],
        progress=False,
    )
    fit(
        1,
        b,
        F.cross_entropy,
        optim.SGD(b.parameters(), lr=0.1),
        DataLoader(ds, batch_size=8),
        progress=False,
    )
    assert formats == [True, True]
    conv = a[0]
    assert isinstance(conv, nn.Conv2d)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_params(a, b)  # same maths, other memory layout


def test_compile_runs_the_forward_pass_compiled() -> None:
    model, twin = twin_models()
    dl = DataLoader(data(32), batch_size=16)
    fit(
        1,
        model,
        F.cross_entropy,
        optim.SGD(model.parameters(), lr=0.1),
        dl,
        dl,
        compile=True,
        progress=False,
    )
    fit(1, twin, F.cross_entropy, optim.SGD(twin.parameters(), lr=0.1), dl, dl, progress=False)
    assert_same_params(model, twin)
    assert set(model.state_dict()) == set(twin.state_dict())  # no "_orig_mod." prefix


def test_compile_falls_back_with_a_warning_where_unsupported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unsupported(model: nn.Module) -> nn.Module:
        raise RuntimeError("torch.compile is not supported on Python 3.99+")

    monkeypatch.setattr(torch, "compile", unsupported)
    model, _ = twin_models()
    with pytest.warns(UserWarning, match=r"fit\(compile=True\): running eagerly: .*Python 3.99"):
        fit(
            1,
            model,
            F.cross_entropy,
            optim.SGD(model.parameters(), lr=0.1),
            [data(8).tensors],
            compile=True,
            progress=False,
        )


# --- the NaN check ----------------------------------------------------------------------------


def nan_at(epoch: int, step: int) -> Any:
    calls = {"n": 0}

    def loss(out: Tensor, y: Tensor) -> Tensor:
        value = F.cross_entropy(out, y)
        if not torch.is_grad_enabled():  # validation
            return value
        bad = calls["n"] == epoch * 4 + step  # 4 training batches per epoch below
        calls["n"] += 1
        return value * float("nan") if bad else value

    return loss


def test_nan_loss_stops_the_run_naming_epoch_and_step(capsys: pytest.CaptureFixture[str]) -> None:
    ended: list[TrainState] = []

    class End(Callback):
        def on_fit_end(self, state: TrainState) -> None:
            ended.append(state)

    model, _ = twin_models()
    dl = DataLoader(data(32), batch_size=8)
    reason = (
        "TerminateOnNaN: the training loss was not finite at epoch 2 batch 3 "
        "(state.epoch=1, state.step=2)"
    )
    with pytest.warns(RuntimeWarning, match=re.escape(reason)):
        history = fit(
            5, model, nan_at(1, 2), optim.SGD(model.parameters(), lr=0.1), dl, dl, callbacks=[End()]
        )
    assert len(history) == 1  # the broken epoch is not recorded
    assert ended[0].status == "stopped"
    assert ended[0].stop_reason == reason
    assert (history.status, history.stop_reason) == ("stopped", reason)
    assert capsys.readouterr().out.splitlines()[-1].startswith("stopped: TerminateOnNaN")


def test_nan_check_names_the_step_after_hundreds_unchecked() -> None:
    # one check, at the epoch's end, covers 300 steps: the first bad one is still named exactly
    calls = {"n": 0}

    def loss(out: Tensor, y: Tensor) -> Tensor:
        calls["n"] += 1
        value = F.cross_entropy(out, y)
        return value * float("inf") if calls["n"] in (201, 250) else value

    ended: list[TrainState] = []

    class End(Callback):
        def on_fit_end(self, state: TrainState) -> None:
            ended.append(state)

    model, _ = twin_models()
    opt = optim.SGD(model.parameters(), lr=0.1)
    dl = DataLoader(data(300), batch_size=1)
    with pytest.warns(RuntimeWarning, match="not finite at epoch 1 batch 201"):
        fit(1, model, loss, opt, dl, progress=False, callbacks=[TerminateOnNaN(3600), End()])
    assert ended[0].stop_reason == (
        "TerminateOnNaN: the training loss was not finite at epoch 1 batch 201 "
        "(state.epoch=0, state.step=200)"
    )


def test_nan_check_runs_before_checkpoint_like_callbacks() -> None:
    saved: list[int] = []

    class Saver(Callback):
        order = 10

        def on_epoch_end(self, state: TrainState) -> None:
            saved.append(state.epoch)

    model, _ = twin_models()
    dl = DataLoader(data(32), batch_size=8)
    with pytest.warns(RuntimeWarning, match="TerminateOnNaN"):
        fit(
            3,
            model,
            nan_at(1, 3),
            optim.SGD(model.parameters(), lr=0.1),
            dl,
            callbacks=[Saver()],
            progress=False,
        )
    assert saved == [0]  # the NaN epoch was never handed to the saver


def test_nan_check_can_be_switched_off() -> None:
    model, _ = twin_models()
    dl = DataLoader(data(32), batch_size=8)
    history = fit(
        2,
        model,
        nan_at(0, 0),
        optim.SGD(model.parameters(), lr=0.1),
        dl,
        terminate_on_nan=False,
        progress=False,
    )
    assert len(history) == 2 and math.isnan(history["train_loss"][0])
    with pytest.raises(ValueError, match=r"TerminateOnNaN\(check_seconds=...\)"):
        TerminateOnNaN(-1)


def test_a_nan_loss_without_a_bar_warns_and_the_history_says_so() -> None:
    """The issue's input: progress=False, a NaN loss at epoch 1 (index 1); fit returns normally."""
    model, _ = twin_models()
    dl = DataLoader(data(32), batch_size=8)
    opt = optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(3, model, nan_at(1, 0), opt, dl, dl, progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == [
        "TerminateOnNaN: the training loss was not finite at epoch 2 batch 1 "
        "(state.epoch=1, state.step=0)"
    ]
    assert history.status == "stopped" and history.stop_reason == messages[0]
    assert history["epoch"] == [1]
    # what the model holds (documented): the weights as the check found them, not finite
    assert not all(bool(p.isfinite().all()) for p in model.parameters())


def test_a_completed_run_says_so_on_its_history() -> None:
    model, _ = twin_models()
    dl = DataLoader(data(32), batch_size=8)
    history = fit(1, model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1), dl)
    assert (history.status, history.stop_reason) == ("completed", None)


def test_nan_gradients_under_a_finite_loss_at_the_last_step_stop_the_run() -> None:
    """The issue's input: the loss is finite, the last step's gradient is NaN."""
    model, _ = twin_models()
    dl = DataLoader(data(32), batch_size=8)  # 4 steps
    calls = {"n": 0}

    def loss(out: Tensor, y: Tensor) -> Tensor:
        value = F.cross_entropy(out, y)
        calls["n"] += 1
        if calls["n"] == 4:  # a finite value with a NaN gradient: 0 * sqrt'(0) = 0 * inf
            total = out.sum()
            zero = total - total.detach()
            return value + torch.sqrt(zero) * 0.0
        return value

    ended: list[TrainState] = []

    class End(Callback):
        def on_fit_end(self, state: TrainState) -> None:
            ended.append(state)

    with pytest.warns(RuntimeWarning, match="weights became NaN or infinite in epoch 1"):
        history = fit(
            1,
            model,
            loss,
            optim.SGD(model.parameters(), lr=0.1),
            dl,
            callbacks=[TerminateOnNaN(3600), End()],  # one check, at the epoch's end
            progress=False,
        )
    assert history.status == "stopped"
    assert history.stop_reason == (
        "TerminateOnNaN: the weights became NaN or infinite in epoch 1 between batch 1 and "
        "batch 4, with every loss finite: a non-finite gradient (see on_after_backward to find it)"
    )
    assert len(history) == 0


def test_huge_finite_weights_whose_sum_overflows_do_not_stop_the_run() -> None:
    model, _ = twin_models()
    model.register_parameter("huge", nn.Parameter(torch.full((2,), 3e38)))  # sums to inf
    dl = DataLoader(data(32), batch_size=8)
    history = fit(
        2, model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1), dl, progress=False
    )
    assert history.status == "completed" and len(history) == 2
