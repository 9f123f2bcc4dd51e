from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, TensorDataset

from trainkit import (
    HOOKS,
    Accuracy,
    BatchMetric,
    Callback,
    ConfusionMatrix,
    CSVLogger,
    EarlyStopping,
    EvalState,
    Metric,
    ModelCheckpoint,
    PerClassAccuracy,
    ProgressBar,
    StopTraining,
    TerminateOnNaN,
    TrainState,
    accuracy,
    evaluate,
    fit,
    load_checkpoint,
    predict,
    show_training_loop,
)
from trainkit.callbacks.base import hook_table


class Recorder(Callback):
    """Records every hook it sees, with the run's status at that moment."""

    def __init__(self, log: list[str], tag: str = "") -> None:
        self.log, self.tag = log, tag

    def _rec(self, hook: str) -> None:
        self.log.append(f"{self.tag}{hook}")

    def on_fit_start(self, state: TrainState) -> None:
        self._rec("on_fit_start")

    def on_epoch_start(self, state: TrainState) -> None:
        self._rec("on_epoch_start")

    def on_train_batch_start(self, state: TrainState) -> None:
        self._rec("on_train_batch_start")

    def on_after_backward(self, state: TrainState) -> None:
        self._rec("on_after_backward")

    def on_before_optimizer_step(self, state: TrainState) -> None:
        self._rec("on_before_optimizer_step")

    def on_before_zero_grad(self, state: TrainState) -> None:
        self._rec("on_before_zero_grad")

    def on_train_batch_end(self, state: TrainState) -> None:
        self._rec("on_train_batch_end")

    def on_train_epoch_end(self, state: TrainState) -> None:
        self._rec("on_train_epoch_end")

    def on_validation_start(self, state: TrainState) -> None:
        self._rec("on_validation_start")

    def on_validation_batch_start(self, state: TrainState) -> None:
        self._rec("on_validation_batch_start")

    def on_validation_batch_end(self, state: TrainState) -> None:
        self._rec("on_validation_batch_end")

    def on_validation_end(self, state: TrainState) -> None:
        self._rec("on_validation_end")

    def on_epoch_end(self, state: TrainState) -> None:
        self._rec("on_epoch_end")

    def on_exception(self, state: TrainState, exc: BaseException) -> None:
        self._rec("on_exception")

    def on_fit_end(self, state: TrainState) -> None:
        self._rec(f"on_fit_end:{state.status}")


def setup(
    n_train: int = 8, n_valid: int = 4
) -> tuple[nn.Module, optim.Optimizer, DataLoader[Any], DataLoader[Any]]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(n_train + n_valid, 3), torch.randint(0, 2, (n_train + n_valid,))
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=4)
    valid = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=4)
    return model, optim.SGD(model.parameters(), lr=0.1), train, valid


def test_hooks_fire_in_the_documented_order() -> None:
    log: list[str] = []
    model, opt, train, valid = setup()
    fit(1, model, F.cross_entropy, opt, train, valid, callbacks=[Recorder(log)], progress=False)
    step = [
        "on_train_batch_start",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_before_zero_grad",
        "on_train_batch_end",
    ]
    assert log == [
        "on_fit_start",
        "on_epoch_start",
        *step,
        *step,
        "on_train_epoch_end",
        "on_validation_start",
        "on_validation_batch_start",
        "on_validation_batch_end",
        "on_validation_end",
        "on_epoch_end",
        "on_fit_end:completed",
    ]
    fit_hooks = HOOKS[: HOOKS.index("on_fit_end") + 1]
    assert [h for h in HOOKS if h in {e.split(":")[0] for e in log}] == [
        h for h in fit_hooks if h != "on_exception"
    ]


def test_callbacks_run_by_order_then_as_given() -> None:
    log: list[str] = []

    class Late(Recorder):
        order: ClassVar[int] = 5

    class Early(Recorder):
        order: ClassVar[int] = -5

    model, opt, train, _ = setup()
    cbs = [Late(log, "late:"), Recorder(log, "a:"), Early(log, "early:"), Recorder(log, "b:")]
    fit(1, model, F.cross_entropy, opt, train, callbacks=cbs, progress=False)
    assert log[:4] == [
        "early:on_fit_start",
        "a:on_fit_start",
        "b:on_fit_start",
        "late:on_fit_start",
    ]


def test_stop_training_in_epoch_end_keeps_the_epoch() -> None:
    ends: list[TrainState] = []

    class StopAfterTwo(Callback):
        def on_epoch_end(self, state: TrainState) -> None:
            if state.epoch == 1:
                raise StopTraining("enough")

        def on_fit_end(self, state: TrainState) -> None:
            ends.append(state)

    model, opt, train, valid = setup()
    history = fit(
        10, model, F.cross_entropy, opt, train, valid, callbacks=[StopAfterTwo()], progress=False
    )
    assert len(history) == 2
    assert ends[0].status == "stopped" and ends[0].stop_reason == "enough"


def test_stop_training_mid_epoch_drops_the_unfinished_epoch() -> None:
    class StopAtBatch(Callback):
        def on_train_batch_end(self, state: TrainState) -> None:
            if state.epoch == 1 and state.step == 0:
                raise StopTraining("mid-epoch")

    model, opt, train, valid = setup()
    history = fit(
        5, model, F.cross_entropy, opt, train, valid, callbacks=[StopAtBatch()], progress=False
    )
    assert history["epoch"] == [1]


class BoomError(Exception):
    pass


def test_an_error_in_the_model_propagates_unchanged_after_the_hooks() -> None:
    log: list[str] = []
    seen: list[BaseException] = []

    class Catch(Callback):
        def on_exception(self, state: TrainState, exc: BaseException) -> None:
            seen.append(exc)

    class Broken(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            raise BoomError("in forward")

    _, _, train, _ = setup()
    model = Broken(3, 2)
    with pytest.raises(BoomError, match="in forward") as info:
        fit(
            1,
            model,
            F.cross_entropy,
            optim.SGD(model.parameters(), lr=0.1),
            train,
            callbacks=[Recorder(log), Catch()],
            progress=False,
        )
    assert seen == [info.value]
    assert log[-2:] == ["on_exception", "on_fit_end:failed"]
    assert info.traceback[-1].name == "forward"  # the traceback still ends where it was raised


def test_an_error_in_a_callback_propagates_and_keyboard_interrupt_too() -> None:
    class Fails(Callback):
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def on_train_batch_end(self, state: TrainState) -> None:
            raise self.exc

    for exc in (BoomError("in a hook"), KeyboardInterrupt()):
        log: list[str] = []
        model, opt, train, _ = setup()
        with pytest.raises(type(exc)) as info:
            fit(
                1,
                model,
                F.cross_entropy,
                opt,
                train,
                callbacks=[Fails(exc), Recorder(log)],
                progress=False,
            )
        assert info.value is exc
        assert log[-2:] == ["on_exception", "on_fit_end:failed"]


def test_a_failing_exception_hook_is_noted_not_swapped_in() -> None:
    class BadHandler(Callback):
        def on_exception(self, state: TrainState, exc: BaseException) -> None:
            raise RuntimeError("handler broke")

    class Fails(Callback):
        def on_epoch_start(self, state: TrainState) -> None:
            raise BoomError("original")

    model, opt, train, _ = setup()
    with pytest.raises(BoomError, match="original") as info:
        fit(
            1, model, F.cross_entropy, opt, train, callbacks=[Fails(), BadHandler()], progress=False
        )
    assert any("handler broke" in note for note in info.value.__notes__)


def test_hooks_may_replace_the_batch_and_see_final_gradients() -> None:
    grads: list[Tensor] = []

    class ZeroInputs(Callback):
        def on_train_batch_start(self, state: TrainState) -> None:
            state.xb = torch.zeros_like(state.xb)

        def on_before_optimizer_step(self, state: TrainState) -> None:
            assert isinstance(state.model, nn.Linear) and state.model.weight.grad is not None
            grads.append(state.model.weight.grad.clone())

    model, opt, train, _ = setup()
    fit(1, model, F.cross_entropy, opt, train, callbacks=[ZeroInputs()], progress=False)
    # with all-zero inputs the weight gradient is exactly zero: the hook's batch was used
    assert len(grads) == 2 and all(torch.equal(g, torch.zeros(2, 3)) for g in grads)


def test_state_carries_loss_step_and_metrics() -> None:
    seen: list[tuple[int, int, int]] = []
    metrics: list[dict[str, float]] = []

    class Look(Callback):
        def on_train_batch_end(self, state: TrainState) -> None:
            assert state.loss is not None and state.loss.ndim == 0 and not state.loss.requires_grad
            seen.append((state.epoch, state.step, state.global_step))

        def on_epoch_end(self, state: TrainState) -> None:
            metrics.append(dict(state.metrics))

    model, opt, train, valid = setup()
    history = fit(
        2,
        model,
        F.cross_entropy,
        opt,
        train,
        valid,
        metrics=[accuracy],
        callbacks=[Look()],
        progress=False,
    )
    assert seen == [(0, 0, 1), (0, 1, 2), (1, 0, 3), (1, 1, 4)]
    assert metrics == history.records


# --- EarlyStopping ---------------------------------------------------------------------------


def drive(stopper: EarlyStopping, values: list[float], monitor: str = "val_loss") -> int:
    """Feed `values` as successive epochs; return the epoch at which it stopped (or -1)."""
    model, opt, _, _ = setup()
    state = TrainState(model, F.cross_entropy, opt, [], None, len(values), torch.device("cpu"))
    stopper.on_fit_start(state)
    for epoch, value in enumerate(values):
        state.epoch, state.metrics = epoch, {monitor: value}
        try:
            stopper.on_epoch_end(state)
        except StopTraining:
            return epoch
    return -1


def test_early_stopping_waits_patience_epochs() -> None:
    assert drive(EarlyStopping(patience=2), [1.0, 0.9, 0.95, 0.91, 0.5]) == 3
    assert drive(EarlyStopping(patience=3), [1.0, 0.9, 0.95, 0.91, 0.5]) == -1
    assert (
        drive(
            EarlyStopping("val_accuracy", mode="max", patience=1), [0.5, 0.6, 0.6], "val_accuracy"
        )
        == 2
    )
    # improvements smaller than min_delta do not count
    assert drive(EarlyStopping(patience=2, min_delta=0.1), [1.0, 0.95, 0.92]) == 2
    # NaN never counts as an improvement
    assert drive(EarlyStopping(patience=1), [1.0, float("nan")]) == 1


def test_early_stopping_stops_fit_and_keeps_its_state() -> None:
    stopper = EarlyStopping("train_loss", mode="max", patience=1)  # the loss falls: stop after 1
    model, opt, train, _ = setup()
    history = fit(10, model, F.cross_entropy, opt, train, callbacks=[stopper], progress=False)
    assert len(history) == 2
    assert stopper.state_dict() == {
        "best": history["train_loss"][0],
        "best_epoch": 0,
        "wait": 1,
        "stopped_epoch": 1,
        "best_weights": None,
    }
    fresh = EarlyStopping("train_loss", mode="max", patience=1)
    fresh.load_state_dict(stopper.state_dict())
    assert fresh.state_dict() == stopper.state_dict()


def test_early_stopping_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"EarlyStopping\(mode=...\).*'mni'"):
        EarlyStopping(mode="mni")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"EarlyStopping\(patience=...\)"):
        EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match=r"EarlyStopping\(min_delta=...\)"):
        EarlyStopping(min_delta=-1.0)
    with pytest.raises(ValueError, match=r"EarlyStopping\(start_from_epoch=...\)"):
        EarlyStopping(start_from_epoch=-1)
    with pytest.raises(ValueError, match=r"EarlyStopping\(baseline=...\)"):
        EarlyStopping(baseline=float("nan"))
    model, opt, train, _ = setup()
    with pytest.raises(ValueError, match=r"does not record 'val_loss'.*fit\(valid_dl=...\)"):
        fit(2, model, F.cross_entropy, opt, train, callbacks=[EarlyStopping()], progress=False)


# --- progress --------------------------------------------------------------------------------


def test_plain_progress_prints_one_line_per_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    model, opt, train, valid = setup()
    fit(3, model, F.cross_entropy, opt, train, valid, metrics=[accuracy])  # not a terminal here
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3 and err == ""
    assert lines[0].startswith("epoch 1/3  train_loss ")
    for name in ("val_loss", "val_accuracy", "lr 0.1"):
        assert name in lines[2]


def test_progress_false_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    model, opt, train, valid = setup()
    fit(2, model, F.cross_entropy, opt, train, valid, progress=False)
    assert capsys.readouterr() == ("", "")


def test_forced_bar_draws_on_stderr_and_reads_the_loss_only_at_refresh(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = 0
    item = torch.Tensor.item

    def counting_item(self: Tensor) -> Any:
        nonlocal reads
        reads += 1
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    model, opt, train, _ = setup(n_train=40)
    fit(
        1,
        model,
        F.cross_entropy,
        opt,
        train,
        progress=False,
        callbacks=[ProgressBar(force_bar=True, refresh_seconds=3600)],
    )
    per_epoch, reads = reads, 0  # ten steps, no refresh due: only the epoch's own reads
    fit(
        1,
        model,
        F.cross_entropy,
        opt,
        train,
        progress=False,
        callbacks=[ProgressBar(force_bar=True, refresh_seconds=0)],
    )
    assert reads == per_epoch + 10  # a refresh every step: one loss read each
    out, err = capsys.readouterr()
    assert "epoch 1/1" in err and "loss=" in err  # the bar
    assert out.count("epoch 1/1  train_loss") == 2  # the epoch lines


def test_progress_bar_refuses_negative_refresh() -> None:
    with pytest.raises(ValueError, match=r"refresh_seconds=...\): must be >= 0"):
        ProgressBar(refresh_seconds=-1)


def test_steps_read_nothing_back_from_the_device(host_reads: dict[str, int]) -> None:
    """With the bar and every kind of metric on, host reads happen per epoch, never per step:
    ten times the training and validation steps make exactly as many reads."""
    counts = host_reads
    totals = []
    for n_train, n_valid in ((40, 8), (400, 80)):  # 10 and 100 steps; 2 and 20 validation batches
        counts.update(dict.fromkeys(counts, 0))
        model, opt, train, valid = setup(n_train=n_train, n_valid=n_valid)
        metrics: dict[str, Metric | BatchMetric] = {
            "acc": Accuracy(),
            "top2": Accuracy(top_k=2),
            "per_class": PerClassAccuracy(2),
            "matrix": ConfusionMatrix(2),
            "batch_acc": accuracy,
        }
        for m in metrics.values():
            if isinstance(m, Accuracy | PerClassAccuracy | ConfusionMatrix):
                m.fold_every = 3  # fold mid-epoch too: folding must not read back either
        # the bar and the NaN check read at their interval: here longer than the run
        interval = [ProgressBar(force_bar=True, refresh_seconds=3600), TerminateOnNaN(3600)]
        fit(
            2,
            model,
            F.cross_entropy,
            opt,
            train,
            valid,
            metrics=metrics,
            callbacks=interval,
            progress=False,
            terminate_on_nan=False,
        )
        totals.append(dict(counts))
    assert totals[0] == totals[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steps_never_synchronise() -> None:
    """On a GPU, every training step and validation batch runs under sync debug mode "error"."""
    x, y = torch.randn(640, 3, device="cuda"), torch.randint(0, 2, (640,), device="cuda")
    train = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=32)  # already on the device
    valid = DataLoader(TensorDataset(x[512:], y[512:]), batch_size=32)

    class Strict(Callback):
        def on_train_batch_start(self, state: TrainState) -> None:
            torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, state: TrainState) -> None:
            torch.cuda.set_sync_debug_mode("default")

        def on_validation_start(self, state: TrainState) -> None:
            torch.cuda.set_sync_debug_mode("error")

        def on_validation_batch_end(self, state: TrainState) -> None:
            if state.step == len(valid) - 1:  # compute() follows: the one read per epoch
                torch.cuda.set_sync_debug_mode("default")

    model = nn.Linear(3, 2).cuda()
    metrics: list[Metric | BatchMetric] = [PerClassAccuracy(2), ConfusionMatrix(2), accuracy]
    try:
        fit(
            2,
            model,
            F.cross_entropy,
            optim.SGD(model.parameters(), lr=0.1),
            train,
            valid,
            metrics=metrics,
            callbacks=[Strict()],
            progress=False,
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- show_training_loop ----------------------------------------------------------------------


def test_show_training_loop_lists_hooks_in_order_with_their_callbacks() -> None:
    buf = io.StringIO()
    text = show_training_loop([EarlyStopping(), ProgressBar()], file=buf)
    assert buf.getvalue() == text + "\n"
    hooks = [
        line.strip().split(":")[0] for line in text.splitlines() if line.strip().startswith("on_")
    ]
    assert hooks == list(HOOKS)
    lines = {line.strip().split(":")[0]: line for line in text.splitlines()}
    assert lines["on_epoch_end"].endswith(
        "ProgressBar(force_bar=False), "
        "EarlyStopping('val_loss', mode='min', patience=3, min_delta=0.0)"
    )
    assert lines["on_train_batch_end"].endswith("ProgressBar(force_bar=False)")
    assert lines["on_validation_end"].endswith(": -")


def test_show_training_loop_prints_to_stdout_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    show_training_loop()
    assert capsys.readouterr().out.startswith("on_fit_start: -")
    assert sys.stdout is not None


# --- a stop lets every hook of its event run (defect 1) ---------------------------------------


def test_early_stopping_lets_the_checkpoint_and_the_logger_save_the_stopping_epoch(
    tmp_path: Path,
) -> None:
    """The issue's input: EarlyStopping stops epoch 2 of a 2-epoch-long run; ModelCheckpoint
    (order 100) and a user callback after it must still see that epoch's on_epoch_end."""
    seen: list[int] = []

    class After(Callback):
        def on_epoch_end(self, state: TrainState) -> None:
            seen.append(state.epoch)

    stopper = EarlyStopping("train_loss", mode="max", patience=1)  # the loss falls: stop at 2
    model, opt, train, valid = setup()
    history = fit(
        10,
        model,
        F.cross_entropy,
        opt,
        train,
        valid,
        callbacks=[
            stopper,
            After(),
            ModelCheckpoint(tmp_path / "ck"),
            CSVLogger(tmp_path / "log.csv"),
        ],
        progress=False,
    )
    ckpt = load_checkpoint(tmp_path / "ck" / "last.ckpt", model=nn.Linear(3, 2))
    assert (ckpt.epoch, ckpt.epoch_complete) == (1, True)  # the stopping epoch, saved
    assert seen == [0, 1]
    assert history["epoch"] == [1, 2] and history.status == "stopped"
    for saved, live in zip(ckpt_model(tmp_path).parameters(), model.parameters(), strict=True):
        assert torch.equal(saved, live)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]


def ckpt_model(tmp_path: Path) -> nn.Module:
    model = nn.Linear(3, 2)
    load_checkpoint(tmp_path / "ck" / "last.ckpt", model=model)
    return model


def test_a_stop_in_a_batch_hook_lets_the_steps_other_batch_hooks_run() -> None:
    log: list[str] = []

    class StopAtFirstBatch(Callback):
        def on_train_batch_end(self, state: TrainState) -> None:
            if state.epoch == 1 and state.step == 0:
                raise StopTraining("mid-epoch")

    class Later(Callback):
        def on_train_batch_end(self, state: TrainState) -> None:
            log.append(f"{state.epoch}:{state.step}")

    model, opt, train, valid = setup()
    history = fit(
        5,
        model,
        F.cross_entropy,
        opt,
        train,
        valid,
        callbacks=[StopAtFirstBatch(), Later()],
        progress=False,
    )
    assert log == ["0:0", "0:1", "1:0"]  # the later callback saw the stopping step
    assert history["epoch"] == [1] and history.stop_reason == "mid-epoch"


def test_state_stop_is_a_flag_like_keras_stop_training_and_reasons_are_joined() -> None:
    steps: list[int] = []

    class FlagInBatchStart(Callback):
        def on_train_batch_start(self, state: TrainState) -> None:
            state.stop("flagged")

    class Raise(Callback):
        def on_train_batch_end(self, state: TrainState) -> None:
            steps.append(state.global_step)
            raise StopTraining("raised")

    model, opt, train, _ = setup()
    history = fit(
        3,
        model,
        F.cross_entropy,
        opt,
        train,
        callbacks=[FlagInBatchStart(), Raise()],
        progress=False,
    )
    assert steps == [1]  # the batch that requested the stop still trained, then it stopped
    assert history.status == "stopped" and history.stop_reason == "flagged; raised"


def test_a_stop_in_on_fit_start_lets_the_other_fit_start_hooks_run() -> None:
    log: list[str] = []

    class Stop(Callback):
        def on_fit_start(self, state: TrainState) -> None:
            state.stop("not today")

    model, opt, train, _ = setup()
    history = fit(
        3, model, F.cross_entropy, opt, train, callbacks=[Stop(), Recorder(log)], progress=False
    )
    assert log == ["on_fit_start", "on_fit_end:stopped"] and len(history) == 0


# --- names checked before the first step (defect 2) -------------------------------------------


class CountSteps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, state: TrainState) -> None:
        self.steps += 1


def test_a_misspelled_early_stopping_monitor_is_refused_before_the_first_step() -> None:
    counter = CountSteps()
    model, opt, train, valid = setup()
    with pytest.raises(
        ValueError,
        match=r"EarlyStopping\(monitor=...\): this run does not record 'val_los'\. "
        r"Did you mean 'val_loss'\? Each epoch records \['epoch', 'train_loss', 'val_loss', "
        r"'lr', 'seconds'\]",
    ):
        fit(
            2,
            model,
            F.cross_entropy,
            opt,
            train,
            valid,
            callbacks=[EarlyStopping("val_los"), counter],
            progress=False,
        )
    assert counter.steps == 0


def test_a_checkpoint_monitor_that_is_not_recorded_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    """The issue's input: ModelCheckpoint(monitor="val_acc") when the metric is `accuracy`."""
    counter = CountSteps()
    model, opt, train, valid = setup()
    with pytest.raises(
        ValueError,
        match=r"ModelCheckpoint\(monitor=...\): this run does not record 'val_acc'\. "
        r"Did you mean 'val_accuracy'\?",
    ):
        fit(
            2,
            model,
            F.cross_entropy,
            opt,
            train,
            valid,
            metrics=[accuracy],
            callbacks=[ModelCheckpoint(tmp_path / "ck", monitor="val_acc"), counter],
            progress=False,
        )
    assert counter.steps == 0 and not (tmp_path / "ck").exists()


def test_recorded_names_are_known_at_fit_start_and_match_the_records() -> None:
    names: list[tuple[str, ...] | None] = []

    class Look(Callback):
        def on_fit_start(self, state: TrainState) -> None:
            names.append(state.recorded_names)

    model, opt, train, valid = setup()
    metrics: dict[str, Metric | BatchMetric] = {"acc": accuracy, "per_class": PerClassAccuracy(2)}
    history = fit(1, model, F.cross_entropy, opt, train, valid, metrics=metrics, callbacks=[Look()])
    assert names == [("epoch", "train_loss", "val_loss", "val_acc", "lr", "seconds")]
    assert tuple(history.keys()) == names[0]
    with pytest.raises(ValueError, match=r"'val_per_class'.*History\.tensors"):
        fit(1, model, F.cross_entropy, opt, train, valid, metrics=metrics,
            callbacks=[EarlyStopping("val_per_class")])  # fmt: skip


# --- where hooks fire (defect 6) and the new hooks ---------------------------------------------


def test_validation_start_runs_under_no_grad_like_the_rest_of_validation() -> None:
    grad_enabled: list[bool] = []

    class Look(Callback):
        def on_validation_start(self, state: TrainState) -> None:
            grad_enabled.append(torch.is_grad_enabled())

        def on_validation_batch_start(self, state: TrainState) -> None:
            grad_enabled.append(torch.is_grad_enabled())

    model, opt, train, valid = setup()
    fit(1, model, F.cross_entropy, opt, train, valid, callbacks=[Look()], progress=False)
    assert grad_enabled == [False, False]


def test_clipped_gradients_are_seen_in_before_zero_grad_not_before_optimizer_step() -> None:
    norms: dict[str, list[float]] = {"after_backward": [], "before_step": [], "before_zero": []}

    def norm(state: TrainState) -> float:
        grads = [p.grad.flatten() for p in state.model.parameters() if p.grad is not None]
        return float(torch.cat(grads).norm())

    class Look(Callback):
        def on_after_backward(self, state: TrainState) -> None:
            norms["after_backward"].append(norm(state))

        def on_before_optimizer_step(self, state: TrainState) -> None:
            norms["before_step"].append(norm(state))

        def on_before_zero_grad(self, state: TrainState) -> None:
            norms["before_zero"].append(norm(state))

    model, opt, train, _ = setup(n_train=16)  # 4 batches
    fit(
        1,
        model,
        F.cross_entropy,
        opt,
        train,
        callbacks=[Look()],
        progress=False,
        accumulate=2,
        clip_grad_norm=1e-3,
    )
    assert len(norms["after_backward"]) == 4  # every micro-batch
    assert len(norms["before_step"]) == len(norms["before_zero"]) == 2  # every optimizer step
    assert all(n > 1e-3 for n in norms["before_step"])  # not yet clipped
    assert all(n == pytest.approx(1e-3, rel=1e-3) for n in norms["before_zero"])  # clipped


def test_a_hook_may_replace_a_validation_batch() -> None:
    outputs: list[Tensor] = []

    class Zero(Callback):
        def on_validation_batch_start(self, state: TrainState) -> None:
            state.xb = torch.zeros_like(state.xb)

        def on_validation_batch_end(self, state: TrainState) -> None:
            outputs.append(state.output)

    model, opt, train, valid = setup()
    fit(1, model, F.cross_entropy, opt, train, valid, callbacks=[Zero()], progress=False)
    assert isinstance(model, nn.Linear)
    assert torch.equal(outputs[0], model.bias.detach().expand(4, 2))


def test_evaluate_and_predict_run_their_own_hooks() -> None:
    log: list[str] = []

    class Look(Callback):
        def on_evaluate_start(self, state: EvalState) -> None:
            log.append(f"evaluate_start:{torch.is_grad_enabled()}:{state.model.training}")

        def on_evaluate_batch_start(self, state: EvalState) -> None:
            log.append(f"evaluate_batch_start:{state.step}")

        def on_evaluate_batch_end(self, state: EvalState) -> None:
            log.append(f"evaluate_batch_end:{tuple(state.output.shape)}")

        def on_evaluate_end(self, state: EvalState) -> None:
            log.append(f"evaluate_end:{sorted(state.metrics)}")

        def on_predict_start(self, state: EvalState) -> None:
            log.append("predict_start")

        def on_predict_batch_start(self, state: EvalState) -> None:
            state.xb = state.xb * 0  # replaces the batch

        def on_predict_batch_end(self, state: EvalState) -> None:
            log.append(f"predict_batch_end:{state.step}")

        def on_predict_end(self, state: EvalState) -> None:
            log.append("predict_end")

    model, _, _, valid = setup(n_valid=8)
    result = evaluate(model, F.cross_entropy, valid, [accuracy], callbacks=[Look()])
    out = predict(model, valid, callbacks=[Look()])
    assert log == [
        "evaluate_start:False:False",
        "evaluate_batch_start:0",
        "evaluate_batch_end:(4, 2)",
        "evaluate_batch_start:1",
        "evaluate_batch_end:(4, 2)",
        "evaluate_end:['accuracy', 'loss']",
        "predict_start",
        "predict_batch_end:0",
        "predict_batch_end:1",
        "predict_end",
    ]
    assert sorted(result) == ["accuracy", "loss"] and model.training
    assert isinstance(model, nn.Linear)
    assert torch.equal(out, model.bias.detach().expand(8, 2))
    with pytest.raises(TypeError, match=r"callbacks\[0\] is a str"):
        predict(model, valid, callbacks=["x"])  # type: ignore[list-item]


def test_the_hook_table_covers_every_hook_and_show_training_loop_every_step() -> None:
    table = hook_table().splitlines()
    assert [row.split("|")[1].strip(" `") for row in table[2:]] == list(HOOKS)
    assert all(row.count("|") == 7 for row in table)
    text = show_training_loop([], file=io.StringIO())
    for step in ("opt.zero_grad()", "unscale_", "clip gradients", "opt.step()", "backward"):
        assert step in text


def test_the_hook_table_in_the_docs_is_what_the_code_makes() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "callbacks.md").read_text()
    start, end = "<!-- hook-table:start -->\n", "\n<!-- hook-table:end -->"
    shown = page[page.index(start) + len(start) : page.index(end)]
    assert shown == hook_table()


def first_grad(state: TrainState) -> Tensor:
    grad = next(state.model.parameters()).grad
    assert grad is not None
    return grad.clone()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_after_backward_sees_scaled_gradients_and_before_step_unscaled() -> None:
    seen: dict[str, list[Tensor]] = {"scaled": [], "unscaled": [], "scale": []}

    class Look(Callback):
        def on_after_backward(self, state: TrainState) -> None:
            assert state.scaler is not None
            seen["scale"].append(state.scaler.get_scale() * torch.ones(()))
            seen["scaled"].append(first_grad(state))

        def on_before_optimizer_step(self, state: TrainState) -> None:
            seen["unscaled"].append(first_grad(state))

    torch.manual_seed(0)
    x, y = torch.randn(64, 3, device="cuda"), torch.randint(0, 2, (64,), device="cuda")
    model = nn.Linear(3, 2).cuda()
    fit(
        1,
        model,
        F.cross_entropy,
        optim.SGD(model.parameters(), lr=0.1),
        DataLoader(TensorDataset(x, y), batch_size=16),
        amp="fp16",
        callbacks=[Look()],
        progress=False,
    )
    assert len(seen["scaled"]) == len(seen["unscaled"]) == 4
    for scaled, unscaled, scale in zip(
        seen["scaled"], seen["unscaled"], seen["scale"], strict=True
    ):
        assert float(scale) > 1
        torch.testing.assert_close(scaled.float() / float(scale), unscaled.float())


def test_every_on_fit_end_runs_when_one_fails_after_a_completed_run(tmp_path: Path) -> None:
    # A failing on_fit_end must not skip a later callback's (ModelCheckpoint releases its
    # directory lock there): the first error propagates, the others are noted on it.
    ran: list[str] = []

    class Fails(Callback):
        def on_fit_end(self, state: TrainState) -> None:
            ran.append("fails")
            raise RuntimeError("on_fit_end broke")

    class Later(Callback):
        order = 50

        def on_fit_end(self, state: TrainState) -> None:
            ran.append("later")

    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dl = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    mc = ModelCheckpoint(tmp_path / "ck")
    with pytest.raises(RuntimeError, match="on_fit_end broke"):
        fit(1, model, F.cross_entropy, opt, dl, dl, callbacks=[Fails(), Later(), mc],
            progress=False)  # fmt: skip
    assert ran == ["fails", "later"]
    # the lock was released: a second run in the same directory starts
    fit(1, model, F.cross_entropy, opt, dl, dl, callbacks=[ModelCheckpoint(tmp_path / "ck")],
        progress=False)  # fmt: skip
