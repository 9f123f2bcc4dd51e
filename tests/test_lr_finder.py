from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, TensorDataset

from trainkit import lr_find


def setup() -> tuple[nn.Module, optim.Optimizer, DataLoader[tuple[Tensor, ...]]]:
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    ds = TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 2))
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.autograd.backward(F.cross_entropy(model(x[:8]), ds.tensors[1][:8]))
    opt.step()  # the optimizer has state (momentum buffers) to restore
    opt.zero_grad()
    return model, opt, DataLoader(ds, batch_size=32, shuffle=True)


def test_range_test_restores_model_optimizer_and_generators_bitwise() -> None:
    model, opt, dl = setup()
    model.eval()
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    result = lr_find(model, F.cross_entropy, opt, dl, num_steps=30)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(
        torch.equal(a, opt.state[p]["momentum_buffer"])
        for a, p in zip(buffers, model.parameters(), strict=True)
    )
    assert opt.param_groups[0]["lr"] == 0.05 and not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert result.lrs == sorted(result.lrs) and result.lrs[0] == pytest.approx(1e-7)
    assert (
        len(result.lrs) == len(result.losses)
        and result.lrs[0] <= result.suggestion <= result.lrs[-1]
    )


def test_stops_when_the_loss_diverges_and_suggests_a_rate_before_it() -> None:
    model, opt, dl = setup()
    result = lr_find(model, F.cross_entropy, opt, dl, start_lr=1e-4, end_lr=1e4, num_steps=100)
    assert len(result.lrs) < 100  # stopped early: lr 1e4 diverges
    assert result.suggestion < result.lrs[-1]
    best = min(range(len(result.losses)), key=result.losses.__getitem__)
    assert result.suggestion <= result.lrs[best]  # on the way down, not past the minimum


def test_one_shot_loader_and_bad_arguments() -> None:
    model, opt, dl = setup()

    def once() -> Iterator[tuple[Tensor, Tensor]]:
        yield from dl

    assert len(lr_find(model, F.cross_entropy, opt, once(), num_steps=50).lrs) <= len(dl)
    with pytest.raises(ValueError, match=r"need 0 < start_lr < end_lr, got 1.0 and 0.1"):
        lr_find(model, F.cross_entropy, opt, dl, start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError, match=r"lr_find\(num_steps=...\)"):
        lr_find(model, F.cross_entropy, opt, dl, num_steps=1)
    with pytest.raises(ValueError, match=r"lr_find\(diverge=...\)"):
        lr_find(model, F.cross_entropy, opt, dl, diverge=1.0)
    with pytest.raises(ValueError, match=r"lr_find\(smoothing=...\)"):
        lr_find(model, F.cross_entropy, opt, dl, smoothing=1.0)
    with pytest.raises(ValueError, match=r"lr_find\(train_dl=...\): the loader yielded no batches"):
        lr_find(model, F.cross_entropy, opt, [])
