"""`fit(compile=True)`: the model and the optimizer step compiled, results as eager's within the
documented tolerance, and eager with a warning where compiling fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, TensorDataset

from trainkit import fit

# docs/benchmarks.md: compiled and eager training agree to this, not bit for bit (Inductor
# fuses and reorders floating-point operations)
RTOL, ATOL = 1e-4, 1e-5


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))


def loaders(shape: tuple[int, ...]) -> tuple[DataLoader[Any], DataLoader[Any]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, *shape, generator=g), torch.randint(0, 3, (96,), generator=g)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True)
    return train, DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32)


def train(
    make: Callable[[], nn.Module], shape: tuple[int, ...], compile: bool, **options: Any
) -> tuple[nn.Module, list[float]]:
    torch.manual_seed(0)
    model = make()
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_dl, valid_dl = loaders(shape)
    history = fit(2, model, F.cross_entropy, opt, train_dl, valid_dl, progress=False,
                  compile=compile, **options)  # fmt: skip
    return model, history["val_loss"]


@pytest.mark.parametrize(("make", "shape"), [(mlp, (16,)), (cnn, (1, 12, 12))])
def test_compiled_training_matches_eager_within_the_tolerance(
    make: Callable[[], nn.Module], shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled_what: list[str] = []
    real_compile = torch.compile

    def recording(fn: Any, **kwargs: Any) -> Any:
        compiled_what.append(type(fn).__name__ if isinstance(fn, nn.Module) else fn.__name__)
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    eager, eager_loss = train(make, shape, compile=False)
    compiled, compiled_loss = train(make, shape, compile=True)
    # forward and loss in one function, the model for validation, and opt.step in a function
    assert compiled_what == ["eager_forward_loss", "Sequential", "step"]
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)
    assert compiled_loss == pytest.approx(eager_loss, rel=RTOL, abs=ATOL)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # no "_orig_mod." prefix


def test_with_a_float_learning_rate_scheduler_the_step_stays_eager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compiled_what: list[object] = []

    def recording(fn: object) -> object:
        compiled_what.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", recording)
    torch.manual_seed(0)
    model = mlp()
    opt = optim.SGD(model.parameters(), lr=0.05)
    scheduler = optim.lr_scheduler.StepLR(opt, step_size=1)
    fit(1, model, F.cross_entropy, opt, loaders((16,))[0], scheduler=scheduler, compile=True,
        progress=False)  # fmt: skip
    # forward and loss, and the model for validation; each new float lr would compile the step
    # again, so it is not compiled
    assert len(compiled_what) == 2 and compiled_what[1] is model


def failing_compile(fn: Any, **kwargs: Any) -> Callable[..., Any]:
    """What torch.compile gives where Inductor cannot build its kernels: an error at the first
    call, before anything ran."""

    def call(*args: Any) -> Any:
        raise torch._dynamo.exc.BackendCompilerFailed(
            lambda *a: None, RuntimeError("no C++ compiler found"), None
        )

    return call


def test_a_step_that_fails_to_compile_runs_eagerly_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eager, eager_loss = train(mlp, (16,), compile=False)
    monkeypatch.setattr(torch, "compile", failing_compile)
    with pytest.warns(UserWarning) as warned:
        fallback, fallback_loss = train(mlp, (16,), compile=True)
    messages = [str(w.message) for w in warned]
    assert any(
        m.startswith("fit(compile=True): the forward pass with the loss runs eagerly")
        for m in messages
    )
    assert any(m.startswith("fit(compile=True): the optimizer step runs eagerly") for m in messages)
    assert all("no C++ compiler" in m for m in messages if m.startswith("fit(compile"))
    assert any(m.startswith("fit(compile=True): the model in validation runs") for m in messages)
    # once each (training forward and loss, validation, optimizer step), not per step
    assert len([m for m in messages if m.startswith("fit(compile")]) == 3
    for a, b in zip(eager.parameters(), fallback.parameters(), strict=True):
        assert torch.equal(a, b)  # eager after all: each step ran once, exactly as eager
    assert fallback_loss == eager_loss


def test_an_error_in_the_model_is_raised_unchanged_under_compile() -> None:
    class Broken(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise ValueError("the model's own error")

    model = nn.Sequential(nn.Linear(16, 3), Broken())
    opt = optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the model's own error"):
        fit(1, model, F.cross_entropy, opt, loaders((16,))[0], compile=True, progress=False)
