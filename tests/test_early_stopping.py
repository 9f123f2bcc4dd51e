"""EarlyStopping against Keras 3's rules, and its Keras/Lightning options.

`keras_rules` below is written from Keras 3's documented behaviour (keras/src/callbacks/
early_stopping.py, 3.15), independently of trainkit's code; the property tests compare
trainkit's EarlyStopping with it over generated metric sequences. `test_the_reference_agrees_
with_real_keras` cross-checks the reference against Keras itself where Keras is installed
(it is not a dev dependency: `pip install keras` to run it; it was run for this test file).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, TensorDataset

from trainkit import Callback, EarlyStopping, StopTraining, TrainState, fit


@dataclass
class Outcome:
    stopped: int  # 0-based epoch index at which the run stops, or -1
    best_epoch: int | None  # the epoch whose weights restore_best_weights keeps


def keras_rules(
    values: list[float],
    *,
    mode: Literal["min", "max"],
    patience: int,
    min_delta: float,
    baseline: float | None,
    start_from_epoch: int,
) -> Outcome:
    """Keras 3's EarlyStopping, rule by rule, with restore_best_weights on."""
    sign = 1.0 if mode == "max" else -1.0
    delta = sign * abs(min_delta)  # Keras negates min_delta for "min"

    def improves(value: float, reference: float | None) -> bool:
        if reference is None:
            return True
        shifted = value - delta
        return shifted > reference if mode == "max" else shifted < reference

    wait, best, best_epoch = 0, None, None
    for epoch, value in enumerate(values):
        if epoch < start_from_epoch:
            continue
        if best_epoch is None:  # restore_best_weights: the first monitored epoch's weights
            best_epoch = epoch
        wait += 1
        if improves(value, best):
            best, best_epoch = value, epoch
            if baseline is None or improves(value, baseline):
                wait = 0
            continue
        if wait >= patience and epoch > 0:
            return Outcome(epoch, best_epoch)
    return Outcome(-1, best_epoch)


class Weights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.register_buffer("seen", torch.zeros(()))


def drive(stopper: EarlyStopping, values: list[float]) -> Outcome:
    """Feed `values` as successive epochs' val_loss; the weights hold the epoch index."""
    model = Weights()
    state = TrainState(
        model, F.mse_loss, optim.SGD(model.parameters()), [], None, len(values), torch.device("cpu")
    )
    stopper.on_fit_start(state)
    stopped = -1
    for epoch, value in enumerate(values):
        with torch.no_grad():
            model.w.fill_(epoch)
        state.epoch, state.metrics = epoch, {"val_loss": value}
        try:
            stopper.on_epoch_end(state)
        except StopTraining:
            stopped = epoch
            break
    state.status = "stopped" if stopped >= 0 else "completed"
    stopper.on_fit_end(state)
    if stopper.restore_best_weights:  # the model holds the best epoch's weights
        restored = int(model.w[0]) if stopper.best_weights is not None else None
        assert restored == stopper.best_epoch
    return Outcome(stopped, stopper.best_epoch)


# values on a grid of sixteenths: exact in float32 (Keras compares in float32) and float64
GRID = st.integers(-64, 64).map(lambda k: k / 16)
SETTINGS = st.fixed_dictionaries(
    {
        "mode": st.sampled_from(["min", "max"]),
        "patience": st.integers(0, 4),
        "min_delta": st.sampled_from([0.0, 1 / 16, 1 / 8, 1 / 4]),
        "baseline": st.none() | GRID,
        "start_from_epoch": st.integers(0, 3),
    }
)


@settings(max_examples=400, deadline=None)
@given(values=st.lists(GRID, min_size=1, max_size=12), options=SETTINGS)
def test_early_stopping_follows_keras_rules(values: list[float], options: dict[str, Any]) -> None:
    stopper = EarlyStopping(restore_best_weights=True, **options)
    assert drive(stopper, values) == keras_rules(values, **options)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(GRID | st.sampled_from([math.nan, math.inf, -math.inf]), max_size=10),
    options=SETTINGS,
)
def test_without_check_finite_non_finite_values_follow_keras_too(
    values: list[float], options: dict[str, Any]
) -> None:
    stopper = EarlyStopping(restore_best_weights=True, check_finite=False, **options)
    assert drive(stopper, values) == keras_rules(values, **options)


def test_the_reference_agrees_with_real_keras() -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")

    class Model:
        stop_training = False

        def get_weights(self) -> list[int]:
            return [self.epoch]

        def set_weights(self, weights: list[int]) -> None:
            self.restored = weights[0]

        epoch = 0
        restored = -1

    def real(values: list[float], options: dict[str, Any]) -> Outcome:
        cb = keras.callbacks.EarlyStopping(restore_best_weights=True, **options)
        model = Model()
        cb.set_model(model)
        cb.on_train_begin()
        stopped = -1
        for epoch, value in enumerate(values):
            model.epoch = epoch
            cb.on_epoch_end(epoch, {"val_loss": value})
            if model.stop_training:
                stopped = epoch
                break
        cb.on_train_end()
        return Outcome(stopped, model.restored if cb.best_weights is not None else None)

    @settings(max_examples=300, deadline=None)
    @given(
        values=st.lists(GRID | st.sampled_from([math.nan, math.inf]), min_size=1, max_size=10),
        options=SETTINGS,
    )
    def check(values: list[float], options: dict[str, Any]) -> None:
        assert real(values, options) == keras_rules(values, **options)

    check()


# --- each option, with the cases that tell it apart --------------------------------------------


def stop_epoch(stopper: EarlyStopping, values: list[float]) -> int:
    return drive(stopper, values).stopped


def test_patience_zero_is_keras_default_and_stops_like_one() -> None:
    values = [1.0, 0.9, 0.95, 0.5]
    assert stop_epoch(EarlyStopping(patience=0), values) == 2
    assert stop_epoch(EarlyStopping(patience=1), values) == 2


def test_start_from_epoch_ignores_the_warm_up_epochs() -> None:
    values = [0.1, 0.5, 0.6, 0.7]
    assert stop_epoch(EarlyStopping(patience=1), values) == 1
    assert stop_epoch(EarlyStopping(patience=1, start_from_epoch=1), values) == 2
    assert stop_epoch(EarlyStopping(patience=1, start_from_epoch=4), values) == -1


def test_baseline_stops_a_run_that_does_not_reach_it() -> None:
    values = [0.9, 0.95, 0.8]
    assert stop_epoch(EarlyStopping(patience=2), values) == -1
    assert stop_epoch(EarlyStopping(patience=2, baseline=0.5), values) == 1
    assert stop_epoch(EarlyStopping(patience=2, baseline=0.92), values) == -1  # 0.9 beats it


def test_check_finite_stops_at_once_with_a_warning() -> None:
    with pytest.warns(RuntimeWarning, match=r"val_loss is inf at epoch 2 \(check_finite=True\)"):
        assert stop_epoch(EarlyStopping(patience=5), [1.0, math.inf]) == 1
    # off: Keras' rules; NaN never improves, the run stops after `patience` epochs
    assert stop_epoch(EarlyStopping(patience=2, check_finite=False), [1.0, math.nan, 2.0]) == 2


class ScriptedScore:
    """A metric whose epochs' results are scripted: `val_score` is `values[epoch]`."""

    def __init__(self, values: list[float]) -> None:
        self.values, self.calls = values, 0

    def reset(self) -> None:
        pass

    def update(self, preds: Tensor, target: Tensor) -> None:
        pass

    def compute(self) -> Tensor:
        self.calls += 1
        return torch.tensor(self.values[self.calls - 1], dtype=torch.float64)


class Snapshots(Callback):
    order = 50

    def __init__(self) -> None:
        self.weights: list[dict[str, Tensor]] = []

    def on_epoch_end(self, state: TrainState) -> None:
        self.weights.append({k: v.clone() for k, v in state.model.state_dict().items()})


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def loaders() -> tuple[DataLoader[Any], DataLoader[Any]]:
    x, y = torch.randn(24, 3, generator=torch.Generator().manual_seed(1)), torch.arange(24) % 2
    return (
        DataLoader(TensorDataset(x[:16], y[:16]), batch_size=4),
        DataLoader(TensorDataset(x[16:], y[16:]), batch_size=4),
    )


@pytest.mark.parametrize("epochs", [10, 3])  # stopped, and completed: both restore (Keras 3)
def test_restore_best_weights_loads_that_epochs_weights_bitwise(epochs: int) -> None:
    model, snapshots = bn_model(), Snapshots()
    stopper = EarlyStopping("val_score", mode="max", patience=2, restore_best_weights=True)
    train, valid = loaders()
    history = fit(
        epochs,
        model,
        F.cross_entropy,
        optim.SGD(model.parameters(), lr=0.5),
        train,
        valid,
        metrics={"score": ScriptedScore([0.5, 0.8, 0.7, 0.6, 0.9, 0.9])},
        callbacks=[stopper, snapshots],
        progress=False,
    )
    assert stopper.best_epoch == 1
    assert len(history) == (4 if epochs == 10 else 3)
    assert stopper.best_weights is not None
    assert {t.device.type for t in stopper.best_weights.values()} == {"cpu"}
    live = model.state_dict()
    assert live.keys() == snapshots.weights[1].keys()  # buffers too
    for name, value in snapshots.weights[1].items():
        assert torch.equal(live[name], value), name
    assert not torch.equal(live["0.weight"], snapshots.weights[-1]["0.weight"])


def test_restore_best_weights_leaves_a_failed_run_as_it_failed() -> None:
    class Boom(Callback):
        def on_epoch_end(self, state: TrainState) -> None:
            if state.epoch == 2:
                raise RuntimeError("boom")

    model = bn_model()
    stopper = EarlyStopping("val_score", mode="max", restore_best_weights=True)
    train, valid = loaders()
    with pytest.raises(RuntimeError, match="boom"):
        fit(
            5,
            model,
            F.cross_entropy,
            optim.SGD(model.parameters(), lr=0.5),
            train,
            valid,
            metrics={"score": ScriptedScore([0.9, 0.1, 0.1])},
            callbacks=[stopper, Boom()],
            progress=False,
        )
    assert stopper.best_epoch == 0
    assert stopper.best_weights is not None
    assert not torch.equal(model.state_dict()["0.weight"], stopper.best_weights["0.weight"])


def test_the_state_dict_with_best_weights_survives_a_safe_checkpoint_load() -> None:
    stopper = EarlyStopping(restore_best_weights=True)
    drive(stopper, [1.0, 0.5, 0.7])
    buf = io.BytesIO()
    torch.save(stopper.state_dict(), buf)
    buf.seek(0)
    fresh = EarlyStopping(restore_best_weights=True)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.best == 0.5 and fresh.best_epoch == 1 and fresh.wait == 1
    assert fresh.best_weights is not None and stopper.best_weights is not None
    assert all(torch.equal(fresh.best_weights[k], v) for k, v in stopper.best_weights.items())
