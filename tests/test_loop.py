from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, TensorDataset

from trainkit import (
    Callback,
    Loader,
    TrainState,
    accuracy,
    evaluate,
    fit,
    get_data,
    loss_batch,
    predict,
)


def linear_setup(
    data: tuple[TensorDataset, TensorDataset], lr: float = 0.1
) -> tuple[nn.Module, optim.Optimizer, Loader[Any], Loader[Any]]:
    torch.manual_seed(0)
    model = nn.Linear(20, 3)
    opt = optim.SGD(model.parameters(), lr=lr)
    train_dl, valid_dl = get_data(data[0], data[1], 32)
    return model, opt, train_dl, valid_dl


# --- loss_batch -----------------------------------------------------------------------------


def test_loss_batch_returns_float_loss_and_batch_size() -> None:
    model = nn.Linear(4, 2)
    xb, yb = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    loss, n = loss_batch(model, F.cross_entropy, xb, yb)
    assert isinstance(loss, float) and n == 5
    assert loss == pytest.approx(F.cross_entropy(model(xb), yb).item())


def test_loss_batch_with_opt_takes_one_step_and_clears_grads() -> None:
    model = nn.Linear(4, 2)
    before = model.weight.detach().clone()
    opt = optim.SGD(model.parameters(), lr=0.5)
    loss_batch(model, F.cross_entropy, torch.randn(5, 4), torch.zeros(5, dtype=torch.long), opt)
    assert not torch.equal(model.weight, before)
    assert model.weight.grad is None  # zero_grad(set_to_none)


def test_loss_batch_refuses_a_non_scalar_loss() -> None:
    def per_sample(out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y, reduction="none")

    with pytest.raises(ValueError, match=r"per_sample.*shape \(5,\).*scalar"):
        loss_batch(nn.Linear(4, 2), per_sample, torch.randn(5, 4), torch.zeros(5, dtype=torch.long))


# --- fit: the same maths as the tutorial ----------------------------------------------------


def tutorial_fit(
    epochs: int, model: nn.Module, loss_func: Any, opt: Any, train_dl: Any, valid_dl: Any
) -> list[float]:
    """The tutorial's fit, returning its validation losses instead of printing them."""
    val_losses = []
    for _ in range(epochs):
        model.train()
        for xb, yb in train_dl:
            loss_batch(model, loss_func, xb, yb, opt)
        model.eval()
        with torch.no_grad():
            losses, nums = zip(
                *[loss_batch(model, loss_func, xb, yb) for xb, yb in valid_dl], strict=True
            )
        val_losses.append(float(np.sum(np.multiply(losses, nums)) / np.sum(nums)))
    return val_losses


def test_fit_matches_the_tutorial_loop_exactly(
    tabular: tuple[TensorDataset, TensorDataset],
) -> None:
    model_a, opt_a, train_a, valid_a = linear_setup(tabular)
    torch.manual_seed(1)
    expected = tutorial_fit(3, model_a, F.cross_entropy, opt_a, train_a, valid_a)

    model_b, opt_b, train_b, valid_b = linear_setup(tabular)
    torch.manual_seed(1)
    history = fit(3, model_b, F.cross_entropy, opt_b, train_b, valid_b, progress=False)

    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)  # same batches, same order, same updates
    assert history["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert history["epoch"] == [1, 2, 3]  # numbered from 1


def test_history_records_train_loss_lr_seconds_and_metrics(
    tabular: tuple[TensorDataset, TensorDataset],
) -> None:
    model, opt, train_dl, valid_dl = linear_setup(tabular)
    history = fit(
        8, model, F.cross_entropy, opt, train_dl, valid_dl, metrics=[accuracy], progress=False
    )
    assert history.keys() == ["epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"]
    assert history["val_loss"][-1] < history["val_loss"][0]
    assert history["val_accuracy"][-1] > 0.8  # linearly separable classes
    assert history["lr"] == [0.1] * 8
    assert all(s > 0 for s in history["seconds"])
    # the accuracy equals the batch formula over the whole validation set
    x, y = tabular[1].tensors
    with torch.no_grad():
        assert history["val_accuracy"][-1] == pytest.approx(accuracy(model(x), y).item(), abs=1e-6)


def test_train_loss_is_the_batch_size_weighted_mean(
    tabular: tuple[TensorDataset, TensorDataset],
) -> None:
    model = nn.Linear(20, 3)
    opt = optim.SGD(model.parameters(), lr=0.0)  # no learning: every batch sees the same model
    dl = DataLoader(tabular[0], batch_size=100)  # batches of 100, 100, 56
    history = fit(1, model, F.cross_entropy, opt, dl, progress=False)
    x, y = tabular[0].tensors
    with torch.no_grad():
        assert history["train_loss"][0] == pytest.approx(
            F.cross_entropy(model(x), y).item(), rel=1e-6
        )
    assert "val_loss" not in history.keys()  # noqa: SIM118 - History.keys() is a list


def test_fit_calls_train_and_eval_and_validates_without_grad(
    tabular: tuple[TensorDataset, TensorDataset],
) -> None:
    seen: list[tuple[str, bool, bool]] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(20, 3)

        def forward(self, x: Tensor) -> Tensor:
            seen.append(("call", self.training, torch.is_grad_enabled()))
            out: Tensor = self.lin(x)
            return out

    model = Probe()
    fit(
        1,
        model,
        F.cross_entropy,
        optim.SGD(model.parameters(), lr=0.1),
        DataLoader(tabular[0], batch_size=128),
        DataLoader(tabular[1], batch_size=128),
        progress=False,
    )
    assert seen == [("call", True, True)] * 2 + [("call", False, False)]


def test_fit_moves_the_model_and_batches_to_device(
    tabular: tuple[TensorDataset, TensorDataset],
) -> None:
    devices: list[torch.device] = []

    class Spy(Callback):
        def on_train_batch_start(self, state: TrainState) -> None:
            devices.append(state.xb.device)

    model, opt, train_dl, _ = linear_setup(tabular)
    fit(1, model, F.cross_entropy, opt, train_dl, device="cpu", callbacks=[Spy()], progress=False)
    assert set(devices) == {torch.device("cpu")}


def test_evaluate_is_the_quickstart_test_loop(tabular: tuple[TensorDataset, TensorDataset]) -> None:
    model = nn.Linear(20, 3)
    model.train()
    dl = DataLoader(tabular[1], batch_size=50)
    result = evaluate(model, F.cross_entropy, dl, [accuracy])
    x, y = tabular[1].tensors
    with torch.no_grad():
        out = model(x)
    assert result["loss"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)
    assert result["accuracy"] == pytest.approx((out.argmax(1) == y).float().mean().item())
    assert model.training  # the mode it was in is restored
    assert evaluate(model, F.cross_entropy, dl, {"acc": accuracy}).keys() == {"loss", "acc"}


class RoundsByBatchShape(nn.Linear):
    """A CPU on which each batch size takes its own kernel: outputs moved by an ulp or two,
    as on an AVX-512 machine where batches of 10 and 118 gave results 2.4e-7 from those of 50."""

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input)
        for _ in range(len(input) % 3):
            out = torch.nextafter(out, torch.full_like(out, math.inf))
        return out


@pytest.mark.parametrize("layer", [nn.Linear, RoundsByBatchShape])
def test_predict_concatenates_outputs_and_ignores_targets(
    tabular: tuple[TensorDataset, TensorDataset], layer: type[nn.Linear]
) -> None:
    model = layer(20, 3).eval()
    x, _ = tabular[1].tensors
    out = predict(model, DataLoader(tabular[1], batch_size=50))
    assert out.shape == (128, 3) and not out.requires_grad
    # one batch of 128 against batches of 50: other shapes may take other kernels (AVX-512
    # differs by 2.4e-7), so a tolerance; the same batches in a list give the same bits
    torch.testing.assert_close(out, model(x).detach())
    torch.testing.assert_close(predict(model, [x[:10], x[10:]]), out)
    assert torch.equal(predict(model, [x[:50], x[50:100], x[100:]]), out)
    assert not model.training
    with pytest.raises(ValueError, match=r"predict\(dl=...\)"):
        predict(model, [])


# --- fit: bad input --------------------------------------------------------------------------


@pytest.mark.parametrize("epochs", [0, -1, 1.5, True, "3"])
def test_epochs_must_be_a_positive_int(
    epochs: object, tabular: tuple[TensorDataset, TensorDataset]
) -> None:
    model, opt, train_dl, _ = linear_setup(tabular)
    with pytest.raises(ValueError, match=r"fit\(epochs=...\).*>= 1, got"):
        fit(epochs, model, F.cross_entropy, opt, train_dl)  # type: ignore[arg-type]


def test_empty_training_loader_is_refused(tabular: tuple[TensorDataset, TensorDataset]) -> None:
    model, opt, _, _ = linear_setup(tabular)
    empty = DataLoader(TensorDataset(torch.zeros(0, 20), torch.zeros(0)), batch_size=4)
    with pytest.raises(ValueError, match=r"fit\(train_dl=...\).*empty"):
        fit(1, model, F.cross_entropy, opt, empty)

    def no_batches() -> Iterator[tuple[Tensor, Tensor]]:
        yield from ()

    with pytest.raises(ValueError, match=r"fit\(train_dl=...\).*no batches"):
        fit(1, model, F.cross_entropy, opt, no_batches(), progress=False)


def test_optimizer_of_another_model_is_refused(
    tabular: tuple[TensorDataset, TensorDataset],
) -> None:
    model, _, train_dl, _ = linear_setup(tabular)
    other = optim.SGD(nn.Linear(20, 3).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"fit\(opt=...\).*none of the model's parameters"):
        fit(1, model, F.cross_entropy, other, train_dl)


@pytest.mark.parametrize(
    ("batch", "what"),
    [
        ({"x": torch.zeros(2, 20), "y": torch.zeros(2)}, "a dict"),
        ((torch.zeros(2, 20), torch.zeros(2), torch.zeros(2)), "a tuple of 3 items"),
        (torch.zeros(2, 20), "a Tensor"),
    ],
)
def test_batch_that_is_not_a_pair_is_refused(
    batch: object, what: str, tabular: tuple[TensorDataset, TensorDataset]
) -> None:
    model, opt, _, _ = linear_setup(tabular)
    with pytest.raises(TypeError, match=rf"train_dl yielded {what}.*WrappedDataLoader"):
        fit(1, model, F.cross_entropy, opt, [batch], progress=False)


def test_bad_validation_batch_names_valid_dl(tabular: tuple[TensorDataset, TensorDataset]) -> None:
    model, opt, train_dl, _ = linear_setup(tabular)
    with pytest.raises(TypeError, match="valid_dl yielded a Tensor"):
        fit(1, model, F.cross_entropy, opt, train_dl, [torch.zeros(2, 20)], progress=False)


def test_loss_that_is_not_a_scalar_tensor_is_refused(
    tabular: tuple[TensorDataset, TensorDataset],
) -> None:
    model, opt, train_dl, _ = linear_setup(tabular)

    def summed_per_class(out: Tensor, y: Tensor) -> Tensor:
        return out.sum(dim=0)

    with pytest.raises(ValueError, match=r"summed_per_class.*shape \(3,\)"):
        fit(1, model, summed_per_class, opt, train_dl, progress=False)

    def as_float(out: Tensor, y: Tensor) -> float:
        return 1.0

    with pytest.raises(TypeError, match=r"as_float.*returned a float, not a tensor"):
        fit(1, model, as_float, opt, train_dl, progress=False)  # type: ignore[arg-type]


def test_metrics_need_validation_data_and_unique_names(
    tabular: tuple[TensorDataset, TensorDataset],
) -> None:
    model, opt, train_dl, valid_dl = linear_setup(tabular)
    with pytest.raises(ValueError, match=r"fit\(metrics=...\).*valid_dl"):
        fit(1, model, F.cross_entropy, opt, train_dl, metrics=[accuracy])
    with pytest.raises(ValueError, match="two metrics are named 'accuracy'"):
        fit(1, model, F.cross_entropy, opt, train_dl, valid_dl, metrics=[accuracy, accuracy])
    with pytest.raises(ValueError, match="'loss' is the loss"):
        fit(1, model, F.cross_entropy, opt, train_dl, valid_dl, metrics={"loss": accuracy})
    with pytest.raises(TypeError, match=r"metrics\[1\] is a int"):
        fit(1, model, F.cross_entropy, opt, train_dl, valid_dl, metrics=[accuracy, 3])  # type: ignore[list-item]


def test_non_callback_is_refused(tabular: tuple[TensorDataset, TensorDataset]) -> None:
    model, opt, train_dl, _ = linear_setup(tabular)
    with pytest.raises(TypeError, match=r"callbacks\[0\] is a str"):
        fit(1, model, F.cross_entropy, opt, train_dl, callbacks=["progress"])  # type: ignore[list-item]


def test_nan_loss_is_recorded_not_hidden(tabular: tuple[TensorDataset, TensorDataset]) -> None:
    model, opt, train_dl, _ = linear_setup(tabular)

    def nan_loss(out: Tensor, y: Tensor) -> Tensor:
        return out.sum() * float("nan")

    history = fit(1, model, nan_loss, opt, train_dl, progress=False, terminate_on_nan=False)
    assert math.isnan(history["train_loss"][0])


# --- leftover gradients (defect 7) ------------------------------------------------------------


def stray_backward(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """What the Quickstart and the blitz do before training: one forward and backward."""
    torch.autograd.backward(F.cross_entropy(model(x), y))


def test_fit_zeroes_gradients_left_by_a_stray_backward_before_its_first_step(
    tabular: tuple[TensorDataset, TensorDataset],
) -> None:
    """The issue's input: `loss.backward()` before `fit`. fit's weights equal, bitwise, those of
    the blitz's loop, which zeroes the gradients before each step."""
    x, y = tabular[0].tensors
    model_a, opt_a, train_a, _ = linear_setup(tabular)
    stray_backward(model_a, x[:10], y[:10])
    torch.manual_seed(1)
    for _ in range(2):  # the blitz's loop: zero_grad, forward, backward, step
        for xb, yb in train_a:
            opt_a.zero_grad()
            torch.autograd.backward(F.cross_entropy(model_a(xb), yb))
            opt_a.step()

    model_b, opt_b, train_b, _ = linear_setup(tabular)
    stray_backward(model_b, x[:10], y[:10])
    assert all(p.grad is not None and bool(p.grad.any()) for p in model_b.parameters())
    torch.manual_seed(1)
    fit(2, model_b, F.cross_entropy, opt_b, train_b, progress=False)

    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_loss_batch_keeps_the_tutorials_order_and_adds_leftover_gradients() -> None:
    torch.manual_seed(0)
    model, twin = nn.Linear(4, 2), nn.Linear(4, 2)
    twin.load_state_dict(model.state_dict())
    xb, yb = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for m in (model, twin):
        stray_backward(m, xb, yb)
    loss_batch(model, F.cross_entropy, xb, yb, optim.SGD(model.parameters(), lr=0.1))
    # by hand, the tutorial's order: backward (adding to what is there), step, zero_grad
    opt = optim.SGD(twin.parameters(), lr=0.1)
    torch.autograd.backward(F.cross_entropy(twin(xb), yb))
    opt.step()
    opt.zero_grad()
    for pa, pb in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(pa, pb)
