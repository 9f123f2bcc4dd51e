"""Streaming metrics: equal to the formula on all the data, whatever the batching; bad input."""

from __future__ import annotations

import itertools
import math
import multiprocessing
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, TensorDataset

from trainkit import (
    Accuracy,
    BinaryAccuracy,
    ConfusionMatrix,
    Mean,
    MultilabelAccuracy,
    PerClassAccuracy,
    accuracy,
    evaluate,
    fit,
    top_k_accuracy,
)


def scores(n: int, c: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


def stream(metric: Any, preds: Tensor, target: Tensor, sizes: list[int]) -> Tensor:
    metric.reset()
    start = 0
    for size in sizes:
        metric.update(preds[start : start + size], target[start : start + size])
        start += size
    out: Tensor = metric.compute()
    return out


# --- equal to an independent reference -------------------------------------------------------


def test_accuracy_equals_the_batch_formula_and_accepts_one_hot() -> None:
    preds, target = scores(100)
    expected = (preds.argmax(1) == target).double().mean()
    assert torch.allclose(stream(Accuracy(), preds, target, [30, 30, 40]), expected)
    one_hot = F.one_hot(target, 5).float()
    assert torch.allclose(stream(Accuracy(), preds, one_hot, [100]), expected)
    assert torch.allclose(accuracy(preds, one_hot).double(), expected)
    assert torch.allclose(accuracy(preds, target).double(), expected)


def test_top_k_accuracy_equals_a_brute_force_count() -> None:
    preds, target = scores(60, c=7)
    ranks = (preds > preds.gather(1, target[:, None])).sum(dim=1)  # classes scoring higher
    for k in (1, 3, 7):
        expected = (ranks < k).double().mean()
        assert torch.allclose(stream(Accuracy(top_k=k), preds, target, [20, 40]), expected)
        assert torch.allclose(top_k_accuracy(preds, target, k=k).double(), expected)
    assert Accuracy(top_k=5).name == "top5_accuracy" and Accuracy().name == "accuracy"


def test_per_class_accuracy_equals_the_blitz_loop() -> None:
    preds, target = scores(200, c=4)
    class_correct, class_total = [0.0] * 4, [0.0] * 4
    predicted = preds.argmax(1)
    for label, pred in zip(target.tolist(), predicted.tolist(), strict=True):
        class_correct[label] += pred == label
        class_total[label] += 1
    expected = torch.tensor([c / t for c, t in zip(class_correct, class_total, strict=True)])
    assert torch.allclose(
        stream(PerClassAccuracy(4), preds, target, [64, 64, 72]), expected.double()
    )


def test_per_class_report_reads_like_the_blitz_table() -> None:
    metric = PerClassAccuracy(3, class_names=["plane", "car", "bird"])
    metric.update(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]]), torch.tensor([0, 1, 1]))
    assert metric.report() == "\n".join(
        ["Accuracy of plane : 100 %", "Accuracy of   car : 50 %", "Accuracy of  bird : n/a"]
    )
    assert math.isnan(metric.compute()[2].item())  # no sample of "bird" yet
    assert (
        PerClassAccuracy(2).report(torch.tensor([0.629, 1.0])).splitlines()[0]
        == "Accuracy of     0 : 62 %"
    )


def test_confusion_matrix_counts_true_by_predicted() -> None:
    preds, target = scores(150, c=3)
    expected = torch.zeros(3, 3, dtype=torch.long)
    for t, p in zip(target.tolist(), preds.argmax(1).tolist(), strict=True):
        expected[t, p] += 1
    assert torch.equal(stream(ConfusionMatrix(3), preds, target, [50, 100]), expected)


def test_mean_weights_by_batch_size_across_folds() -> None:
    values = torch.rand(50)
    weights = [int(w) for w in torch.randint(1, 9, (50,))]
    mean = Mean()
    mean.fold_every = 7  # force several device-side folds
    for v, w in zip(values, weights, strict=True):
        mean.update(v, w)
    expected = sum(float(v) * w for v, w in zip(values, weights, strict=True)) / sum(weights)
    assert mean.compute().item() == pytest.approx(expected, rel=1e-12)
    long = Mean()  # 2,000 updates: folds at fold_every, and the rest summed in compute()
    long.fold_every = 700
    for v, w in zip(values.repeat(40), weights * 40, strict=True):
        long.update(v, w)
    assert long.compute().item() == pytest.approx(expected, rel=1e-12)
    per_sample = Mean()
    per_sample.update(torch.tensor([1.0, 2.0, 3.0]))
    per_sample.update(torch.tensor(6.0))
    assert per_sample.compute().item() == pytest.approx(3.0)


# --- streaming over any split equals the whole (property) -------------------------------------


def splits(n: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, n), min_size=1, max_size=8).map(lambda cuts: _sizes(n, cuts))


def _sizes(n: int, cuts: list[int]) -> list[int]:
    points = sorted({0, n, *cuts})
    return [b - a for a, b in itertools.pairwise(points) if b > a]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 64), data=st.data())
def test_streaming_over_any_split_equals_the_whole(seed: int, n: int, data: st.DataObject) -> None:
    sizes = data.draw(splits(n))
    preds, target = scores(n, c=4, seed=seed)
    for make in (
        Accuracy,
        lambda: Accuracy(top_k=2),
        lambda: ConfusionMatrix(4),
        lambda: PerClassAccuracy(4),
    ):
        whole = stream(make(), preds, target, [n])
        folding = make()
        folding.fold_every = 2  # fold on the device every other batch
        assert torch.allclose(stream(folding, preds, target, sizes), whole, equal_nan=True)
    values = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    m_whole, m_split = Mean(), Mean()
    m_whole.update(values)
    start = 0
    for size in sizes:
        m_split.update(values[start : start + size])
        start += size
    assert m_split.compute().item() == pytest.approx(m_whole.compute().item(), rel=1e-9)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [Accuracy, lambda: PerClassAccuracy(5), lambda: ConfusionMatrix(5)]
)
def test_bad_input_is_refused_clearly(make: Any) -> None:
    metric = make()
    owner = type(metric).__name__
    with pytest.raises(RuntimeError, match=rf"{owner}.compute\(\) called before any update"):
        metric.compute()
    preds, target = scores(10)
    with pytest.raises(ValueError, match=rf"{owner}: preds has 10 rows but target has 9"):
        metric.update(preds, target[:9])
    with pytest.raises(ValueError, match=rf"{owner}: preds \(10,\) has a single score per sample"):
        metric.update(preds[:, 0], target)
    with pytest.raises(ValueError, match=rf"{owner}: class-index targets must be integers"):
        metric.update(preds, target.float())
    with pytest.raises(ValueError, match=rf"{owner}: target \(10, 1\) has a column of class"):
        metric.update(preds, target.view(10, 1))
    # values are checked on the device and reported by compute(): no read-back in update
    metric.update(preds, torch.cat([torch.tensor([7, -1, 5]), target[3:]]))
    with pytest.raises(ValueError, match=rf"{owner}: 3 of 10 targets were outside \[0, 5\)"):
        metric.compute()
    metric.reset()
    nan_rows = int((preds > 1).any(dim=1).sum())
    metric.update(torch.where(preds > 1, float("nan"), preds), target)
    with pytest.raises(ValueError, match=rf"{owner}: {nan_rows} of 10 samples had NaN scores"):
        metric.compute()


def test_negative_targets_do_not_crash_the_update() -> None:
    preds, target = scores(10)
    for metric in (PerClassAccuracy(5), ConfusionMatrix(5)):
        metric.update(preds, target - 3)  # negative indices would wrap around in index_add_
        with pytest.raises(ValueError, match="targets were outside"):
            metric.compute()


def test_bad_arguments() -> None:
    preds, target = scores(10, c=3)
    with pytest.raises(ValueError, match=r"top_k=4 must be between 1 and the 3 classes"):
        Accuracy(top_k=4).update(preds, target)
    with pytest.raises(ValueError, match=r"top_k=0 must be between 1 and the 3 classes"):
        top_k_accuracy(preds, target, k=0)
    with pytest.raises(ValueError, match=r"Accuracy\(top_k=...\): expected an int >= 1, got 0"):
        Accuracy(top_k=0)
    with pytest.raises(ValueError, match=r"PerClassAccuracy\(num_classes=...\)"):
        PerClassAccuracy(0)
    with pytest.raises(ValueError, match=r"ConfusionMatrix\(num_classes=...\)"):
        ConfusionMatrix(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"class_names=...\): 2 names for 3 classes"):
        PerClassAccuracy(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"PerClassAccuracy: preds has 3 columns, expected 4"):
        PerClassAccuracy(4).update(preds, target)
    with pytest.raises(RuntimeError, match=r"Mean.compute\(\) called before any update"):
        Mean().compute()
    with pytest.raises(
        ValueError, match=r"Mean.update: expected a scalar or 1-dim value, got \(2, 2\)"
    ):
        Mean().update(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"Mean.update\(weight=...\): must be >= 0"):
        Mean().update(torch.zeros(()), -1)


# --- in fit and evaluate ---------------------------------------------------------------------


def data(n: int = 256, c: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, :c] * torch.arange(1.0, c + 1)).argmax(1))


def test_fit_records_scalar_metrics_and_keeps_tensor_ones() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    valid = data(100, seed=1)
    per_class = PerClassAccuracy(4, class_names=["a", "b", "c", "d"])
    history = fit(
        3,
        model,
        F.cross_entropy,
        optim.SGD(model.parameters(), lr=0.5),
        DataLoader(data(), batch_size=32, shuffle=True),
        DataLoader(valid, batch_size=32),
        metrics=[Accuracy(), Accuracy(top_k=2), per_class, ConfusionMatrix(4)],
        progress=False,
    )
    assert history.keys() == [
        "epoch",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_top2_accuracy",
        "lr",
        "seconds",
    ]
    x, y = valid.tensors
    with torch.no_grad():
        out = model(x)
    assert history["val_accuracy"][-1] == pytest.approx(accuracy(out, y).item())
    assert history["val_top2_accuracy"][-1] == pytest.approx(top_k_accuracy(out, y, k=2).item())
    per_class_values = history.tensors("val_per_class_accuracy")
    assert len(per_class_values) == 3 and per_class_values[-1].shape == (4,)
    matrix = history.tensors("val_confusion_matrix")[-1]
    assert matrix.sum() == 100 and matrix.diagonal().sum() / 100 == pytest.approx(
        history["val_accuracy"][-1]
    )
    assert per_class.report().startswith("Accuracy of     a : ")
    with pytest.raises(
        KeyError, match=r"no tensor 'val_matrix'; recorded tensors: \['val_per_class"
    ):
        history.tensors("val_matrix")


def test_evaluate_returns_scalars_and_leaves_tensor_results_on_the_metric() -> None:
    model = nn.Linear(8, 4)
    cm = ConfusionMatrix(4)
    result = evaluate(model, F.cross_entropy, DataLoader(data(50), batch_size=16), [Accuracy(), cm])
    assert set(result) == {"loss", "accuracy"}
    assert cm.compute().sum() == 50


def test_metric_names_must_not_clash() -> None:
    model = nn.Linear(8, 4)
    dl = DataLoader(data(32), batch_size=16)
    with pytest.raises(ValueError, match="two metrics are named 'accuracy'"):
        fit(
            1,
            model,
            F.cross_entropy,
            optim.SGD(model.parameters(), lr=0.1),
            dl,
            dl,
            metrics=[Accuracy(), accuracy],
        )


def test_one_hot_targets_with_cross_entropy_in_fit() -> None:
    torch.manual_seed(0)
    x, y = data().tensors
    one_hot = TensorDataset(x, F.one_hot(y, 4).float())
    model = nn.Linear(8, 4)
    history = fit(
        2,
        model,
        nn.CrossEntropyLoss(),
        optim.SGD(model.parameters(), lr=0.5),
        DataLoader(one_hot, batch_size=32),
        DataLoader(one_hot, batch_size=64),
        metrics={"acc": Accuracy(), "batch_acc": accuracy, "per_class": PerClassAccuracy(4)},
        progress=False,
    )
    assert history["val_acc"] == pytest.approx(history["val_batch_acc"])
    with torch.no_grad():
        assert history["val_acc"][-1] == pytest.approx(accuracy(model(x), y).item())


def test_torchmetrics_metrics_are_accepted_and_agree() -> None:
    torchmetrics = pytest.importorskip("torchmetrics")
    model = nn.Linear(8, 4)
    dl = DataLoader(data(100), batch_size=32)
    theirs = torchmetrics.classification.MulticlassAccuracy(num_classes=4, average="micro")
    per_class = torchmetrics.classification.MulticlassAccuracy(num_classes=4, average="none")
    result = evaluate(
        model, F.cross_entropy, dl, {"tm_acc": theirs, "tm_per_class": per_class, "acc": Accuracy()}
    )
    assert result["tm_acc"] == pytest.approx(result["acc"])
    history = fit(
        1,
        model,
        F.cross_entropy,
        optim.SGD(model.parameters(), lr=0.1),
        dl,
        dl,
        metrics=[torchmetrics.classification.MulticlassAccuracy(num_classes=4, average="micro")],
        progress=False,
    )
    assert "val_multiclass_accuracy" in history.keys()  # noqa: SIM118 - a list


# --- distributed sync --------------------------------------------------------------------------


def test_sync_is_a_no_op_without_a_process_group() -> None:
    preds, target = scores(20)
    for metric in (Accuracy(), PerClassAccuracy(5), ConfusionMatrix(5), Mean()):
        metric.update(preds, target) if not isinstance(metric, Mean) else metric.update(preds[:, 0])
        before = metric.compute()
        metric.sync()
        assert torch.equal(metric.compute(), before)


def _sync_worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        preds, target = scores(30, seed=7)
        mine = slice(0, 13) if rank == 0 else slice(13, 30)  # uneven halves
        metrics: list[Any] = [Accuracy(), PerClassAccuracy(5), ConfusionMatrix(5)]
        for metric in metrics:
            metric.update(preds[mine], target[mine])
            metric.sync()
            assert torch.allclose(
                metric.compute(),
                stream(type(metric)(*_args(metric)), preds, target, [30]),
                equal_nan=True,
            )
        seg = preds.view(30, 5, 1, 1).expand(30, 5, 2, 1)  # multidim, with ignore_index
        seg_target = torch.stack([target, torch.where(target == 4, 255, target)], 1)[..., None]
        multidim = Accuracy(top_k=2, ignore_index=255)
        multidim.update(seg[mine], seg_target[mine])
        multidim.sync()
        assert torch.equal(
            multidim.compute(), stream(Accuracy(top_k=2, ignore_index=255), seg, seg_target, [30])
        )
        flags = (target % 2).view(30, 1)
        for make in (BinaryAccuracy, lambda: MultilabelAccuracy(1, average="none")):
            binary = make()
            binary.update(preds[mine, :1], flags[mine])
            binary.sync()
            assert torch.equal(binary.compute(), stream(make(), preds[:, :1], flags, [30]))
        mean = Mean()
        mean.update(preds[mine, 0])
        mean.sync()
        assert mean.compute().item() == pytest.approx(preds[:, 0].double().mean().item())
    finally:
        dist.destroy_process_group()


def _args(metric: Any) -> tuple[Any, ...]:
    return () if isinstance(metric, Accuracy) else (metric.num_classes,)


def test_sync_sums_state_across_two_processes() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_sync_worker, args=(rank, port)) for rank in range(2)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 90
    for w in workers:
        w.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [w for w in workers if w.is_alive()]
    for w in hung:
        w.kill()
    assert not hung, "distributed metric sync did not finish in 90 s"
    assert [w.exitcode for w in workers] == [0, 0]  # a failed assertion in a worker exits 1


class BlitzNet(nn.Module):
    """The 60-minute blitz's CIFAR-10 `Net` (3-channel input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        out: Tensor = self.fc3(x)
        return out


def test_blitz_cifar_net_prints_accuracy_and_keeps_the_per_class_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Data: random 3x32x32 images built here (CIFAR-10 cannot be downloaded on this machine)."""
    classes = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    g = torch.Generator().manual_seed(0)
    images, labels = (
        torch.randn(80, 3, 32, 32, generator=g),
        torch.randint(0, 10, (80,), generator=g),
    )
    trainloader = DataLoader(TensorDataset(images[:40], labels[:40]), batch_size=4, shuffle=True)
    testloader = DataLoader(TensorDataset(images[40:], labels[40:]), batch_size=4)
    net = BlitzNet()
    opt = optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    per_class = PerClassAccuracy(10, class_names=classes)
    history = fit(
        2, net, nn.CrossEntropyLoss(), opt, trainloader, testloader, metrics=[Accuracy(), per_class]
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("val_accuracy" in line for line in lines)
    table = per_class.report(history.tensors("val_per_class_accuracy")[-1]).splitlines()
    assert len(table) == 10 and table[0].startswith("Accuracy of plane : ")
    assert table == per_class.report().splitlines()
    counts = torch.bincount(labels[40:], minlength=10)
    correct = (history.tensors("val_per_class_accuracy")[-1] * counts).nansum()
    assert correct / 40 == pytest.approx(history["val_accuracy"][-1])


def test_updates_outside_no_grad_keep_no_graph() -> None:
    # metrics are fed training outputs too (callbacks): what they keep must not hold the graph
    w = torch.ones(5, requires_grad=True)
    preds, target = scores(12)
    metrics: list[Any] = [Accuracy(), Accuracy(top_k=2), PerClassAccuracy(5), ConfusionMatrix(5)]
    for metric in metrics:
        metric.update(preds * w, target)
        kept = [t for v in vars(metric).values() for t in (v if isinstance(v, list) else [v])]
        assert kept and not any(isinstance(t, Tensor) and t.requires_grad for t in kept), metric
        metric.compute()
    mean = Mean()
    mean.update((preds * w).sum(), 2)
    assert not any(t.requires_grad for t in mean._values)
    assert not mean.compute().requires_grad
