"""Each input that once gave a wrong number with no error, exactly as reported, and its fix.

Also: binary / multi-label metrics, segmentation shapes, `ignore_index`, every integer target
dtype, the top-k tie rule, and no host reads per batch on any of these paths.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, TensorDataset

from trainkit import (
    Accuracy,
    BinaryAccuracy,
    ConfusionMatrix,
    Metric,
    MultilabelAccuracy,
    PerClassAccuracy,
    accuracy,
    evaluate,
    fit,
    top_k_accuracy,
)

INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def streamed(metric: Any, *batches: tuple[Tensor, Tensor]) -> Tensor:
    metric.reset()
    for preds, target in batches:
        metric.update(preds, target)
    out: Tensor = metric.compute()
    return out


def multiclass_metrics(classes: int, **options: Any) -> list[Any]:
    return [
        Accuracy(**options),
        PerClassAccuracy(classes, **options),
        ConfusionMatrix(classes, **options),
    ]


# --- one output column: a binary classifier ----------------------------------------------------

ONE_COLUMN = torch.tensor([[2.0], [-2.0], [3.0], [-1.0]])
ONE_COLUMN_TARGETS = torch.tensor([[0.0], [1.0], [0.0], [1.0]])  # every prediction wrong


def test_one_output_column_is_refused_and_points_to_binary_accuracy() -> None:
    refusing: list[Any] = [
        accuracy,
        top_k_accuracy,
        Accuracy().update,
        PerClassAccuracy(2).update,
        ConfusionMatrix(2).update,
    ]
    for fn in refusing:
        with pytest.raises(
            ValueError,
            match=r"preds \(4, 1\) has a single score per sample \(target \(4, 1\)\).*"
            r"BinaryAccuracy",
        ):
            fn(ONE_COLUMN, ONE_COLUMN_TARGETS)
    for make in (PerClassAccuracy, ConfusionMatrix):
        with pytest.raises(ValueError, match=r"num_classes=1\): one class .* BinaryAccuracy"):
            make(1)
    # (N,) outputs: once a bare IndexError
    with pytest.raises(ValueError, match=r"accuracy: preds \(4,\) has a single score.*Binary"):
        accuracy(ONE_COLUMN[:, 0], torch.tensor([0, 1, 0, 1]))
    BinaryAccuracy().update(ONE_COLUMN, ONE_COLUMN_TARGETS)  # the metric for this shape


def test_binary_accuracy_scores_the_reported_case_and_agrees_with_torchmetrics() -> None:
    tm = pytest.importorskip("torchmetrics.functional.classification")
    assert streamed(BinaryAccuracy(), (ONE_COLUMN, ONE_COLUMN_TARGETS)).item() == 0.0
    assert tm.binary_accuracy(ONE_COLUMN, ONE_COLUMN_TARGETS.long()).item() == 0.0
    # (N, 1) outputs with (N,) targets, int / bool / float targets
    for target in (torch.tensor([0, 1, 1, 1]), torch.tensor([False, True, True, True])):
        assert streamed(BinaryAccuracy(), (ONE_COLUMN, target)).item() == 0.25
    # probabilities as given; logits through a sigmoid; strictly above the threshold
    probs = torch.tensor([0.5, 0.51, 0.2, 1.0])
    assert streamed(BinaryAccuracy(), (probs, torch.tensor([1, 1, 0, 1]))).item() == 0.75
    assert streamed(BinaryAccuracy(threshold=0.1), (probs, torch.tensor([1, 1, 1, 1]))) == 1.0
    logits = torch.tensor([0.0, 0.3, 0.9, 1.0])  # all in [0, 1]: read as probabilities...
    auto = streamed(BinaryAccuracy(), (logits, torch.tensor([1, 1, 1, 1])))
    assert auto.item() == 0.5 == tm.binary_accuracy(logits, torch.tensor([1, 1, 1, 1])).item()
    explicit = streamed(BinaryAccuracy(from_logits=True), (logits, torch.tensor([1, 1, 1, 1])))
    assert explicit.item() == 0.75  # ...unless the metric is told they are logits (0 is not > 0)


def test_binary_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"BinaryAccuracy: preds \(4, 2\) and target \(4,\).*"):
        BinaryAccuracy().update(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"threshold=...\): a probability in \[0, 1\], got 2"):
        BinaryAccuracy(threshold=2)
    with pytest.raises(ValueError, match=r"preds must be floating-point scores, got torch.int64"):
        BinaryAccuracy().update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    metric = BinaryAccuracy()
    metric.update(torch.tensor([0.2, 0.9, 0.4]), torch.tensor([0.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match=r"BinaryAccuracy: 2 of 3 targets were outside \{0, 1\}"):
        metric.compute()
    metric = BinaryAccuracy(from_logits=False)
    metric.update(torch.tensor([0.2, 1.5, -1.0]), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"2 of 3 scores were outside \[0, 1\], but from_log"):
        metric.compute()
    metric = BinaryAccuracy()
    metric.update(torch.tensor([0.2, float("nan"), float("nan")]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"2 of 3 samples had NaN scores"):
        metric.compute()
    ignoring = BinaryAccuracy(ignore_index=-100)  # NaN where the target is ignored: not counted
    ignoring.update(torch.tensor([0.2, 0.9, float("nan")]), torch.tensor([0, 1, -100]))
    assert ignoring.compute().item() == 1.0


def test_binary_accuracy_on_a_binary_segmentation_mask_with_ignore_index() -> None:
    logits = torch.tensor([[[[3.0, -3.0], [2.0, -1.0]]]])  # (N=1, 1, H=2, W=2)
    mask = torch.tensor([[[[1, 0], [255, 1]]]], dtype=torch.uint8)
    assert streamed(BinaryAccuracy(ignore_index=255), (logits, mask)).item() == pytest.approx(2 / 3)


def test_multilabel_accuracy_micro_macro_and_per_label() -> None:
    probs = torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.8, 0.4], [0.6, 0.6, 0.6]])
    target = torch.tensor([[1, 0, -1], [0, 1, 0], [1, 1, -1]])
    per_label = streamed(MultilabelAccuracy(3, average="none", ignore_index=-1), (probs, target))
    assert torch.equal(per_label, torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    target[1, 2] = 1
    per_label = streamed(MultilabelAccuracy(3, average="none", ignore_index=-1), (probs, target))
    assert per_label.tolist() == [1.0, 1.0, 0.0]
    micro = streamed(MultilabelAccuracy(3, ignore_index=-1), (probs, target))
    assert micro.item() == pytest.approx(6 / 7)
    macro = streamed(MultilabelAccuracy(3, average="macro", ignore_index=-1), (probs, target))
    assert macro.item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"preds must be \(N, 3, ...\) scores"):
        MultilabelAccuracy(3).update(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"average=...\): expected 'micro', 'macro' or 'none'"):
        MultilabelAccuracy(3, average="weighted")  # type: ignore[arg-type]


def test_multi_hot_targets_are_not_read_as_one_hot() -> None:
    preds = torch.tensor([[0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    multi_hot = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    for metric in multiclass_metrics(3):
        metric.update(preds, multi_hot)
        with pytest.raises(ValueError, match=r"1 of 2 one-hot target rows .*MultilabelAccuracy"):
            metric.compute()
    assert accuracy(preds, multi_hot).isnan()


def test_fit_with_one_output_column_records_the_true_binary_accuracy() -> None:
    """The reported run: nn.Linear(d, 1) + BCEWithLogitsLoss on random labels."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 6, generator=g), torch.randint(0, 2, (200, 1), generator=g).float()
    train = DataLoader(TensorDataset(x[:100], y[:100]), batch_size=20)
    valid = DataLoader(TensorDataset(x[100:], y[100:]), batch_size=30)
    torch.manual_seed(0)
    model = nn.Linear(6, 1)
    history = fit(
        2,
        model,
        nn.BCEWithLogitsLoss(),
        optim.SGD(model.parameters(), lr=0.1),
        train,
        valid,
        metrics=[BinaryAccuracy()],
        progress=False,
    )
    with torch.no_grad():
        expected = ((model(x[100:]) > 0).float() == y[100:]).float().mean().item()
    assert history["val_binary_accuracy"][-1] == pytest.approx(expected)
    assert 0.0 < expected < 1.0
    with pytest.raises(ValueError, match=r"single score per sample.*BinaryAccuracy"):
        evaluate(model, nn.BCEWithLogitsLoss(), valid, [Accuracy()])


# --- every integer target dtype ------------------------------------------------------------------


def test_confusion_matrix_with_uint8_targets_counts_the_right_cell() -> None:
    preds = torch.zeros(2, 20)
    preds[:, 13] = 1.0
    cm = streamed(ConfusionMatrix(20), (preds, torch.tensor([13, 13], dtype=torch.uint8)))
    assert cm[13, 13] == 2 and cm.sum() == 2  # once counted into [0, 17]: 13 * 20 wraps in uint8


def test_int16_targets_with_1000_classes_give_the_int64_result() -> None:
    g = torch.Generator().manual_seed(0)
    preds, target = torch.randn(300, 1000, generator=g), torch.randint(0, 1000, (300,), generator=g)
    preds[:150].scatter_(1, target[:150, None], 10.0)  # half of them right
    for make in (lambda: ConfusionMatrix(1000), lambda: PerClassAccuracy(1000), Accuracy):
        expected = streamed(make(), (preds, target))
        got = streamed(make(), (preds, target.to(torch.int16)))
        assert (
            torch.equal(got, expected)
            if got.dtype == torch.long
            else torch.allclose(got, expected, equal_nan=True)
        )


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_every_integer_dtype_gives_the_int64_result_past_a_fold(dtype: torch.dtype) -> None:
    """PerClassAccuracy once failed at the 64th batch (index_add_ wants int32/int64)."""
    g = torch.Generator().manual_seed(1)
    preds, target = torch.randn(70 * 3, 5, generator=g), torch.randint(0, 5, (210,), generator=g)
    batches = [(preds[i : i + 3], target[i : i + 3]) for i in range(0, 210, 3)]
    narrow = [(p, t.to(dtype)) for p, t in batches]
    for make in (
        Accuracy,
        lambda: Accuracy(top_k=2),
        lambda: PerClassAccuracy(5),
        lambda: ConfusionMatrix(5),
    ):
        assert torch.equal(streamed(make(), *narrow), streamed(make(), *batches))
    for fn in (accuracy, functools.partial(top_k_accuracy, k=3)):
        assert torch.equal(fn(preds, target.to(dtype)), fn(preds, target))


def test_100000_classes_with_int32_targets() -> None:
    g = torch.Generator().manual_seed(2)
    preds = torch.randn(64, 100_000, generator=g)
    target = torch.randint(0, 100_000, (64,), generator=g)
    preds[:40].scatter_(1, target[:40, None], 10.0)
    for dtype in (torch.int32, torch.int64):
        assert streamed(Accuracy(), (preds, target.to(dtype))).item() == 40 / 64
        assert streamed(Accuracy(top_k=5), (preds, target.to(dtype))).item() >= 40 / 64
        per_class = streamed(PerClassAccuracy(100_000), (preds, target.to(dtype)))
        present = torch.zeros(100_000, dtype=torch.bool)
        present[target] = True
        assert per_class[~present].isnan().all()
        right = torch.zeros(100_000, dtype=torch.bool)
        right[target[:40]] = True
        assert (per_class[right] > 0).all() and per_class[present & ~right].eq(0).all()


# --- top-k: ties to the lower class index, monotone in k ---------------------------------------


def test_the_tie_row_is_monotone_in_k() -> None:
    row = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # target 0: ranked first of the three tied classes, a hit for every k (once a miss at k=2)
    for k in (1, 2, 3, 4):
        assert streamed(Accuracy(top_k=k), (row, torch.tensor([0]))).item() == 1.0
        assert top_k_accuracy(row, torch.tensor([0]), k=k).item() == 1.0
    # target 2: third of the tied classes
    hits = [top_k_accuracy(row, torch.tensor([2]), k=k).item() for k in (1, 2, 3, 4)]
    assert hits == [0.0, 0.0, 1.0, 1.0]
    assert [streamed(Accuracy(top_k=k), (row, torch.tensor([2]))).item() for k in (1, 2, 3, 4)] == [
        0.0,
        0.0,
        1.0,
        1.0,
    ]
    assert top_k_accuracy(row, torch.tensor([3]), k=3).item() == 0.0  # the lowest score


def test_top_k_never_decreases_with_k_on_heavily_tied_scores() -> None:
    g = torch.Generator().manual_seed(3)
    preds = torch.randint(0, 3, (500, 8), generator=g).float()
    target = torch.randint(0, 8, (500,), generator=g)
    values = [streamed(Accuracy(top_k=k), (preds, target)).item() for k in range(1, 9)]
    assert values == sorted(values) and values[-1] == 1.0
    assert values[0] == pytest.approx(accuracy(preds, target).item())
    # and top-1 is the confusion matrix's diagonal (the same argmax)
    cm = streamed(ConfusionMatrix(8), (preds, target))
    assert cm.diagonal().sum().item() / 500 == values[0]


# --- segmentation: (N, C, H, W) with (N, H, W), ignore_index -----------------------------------


def segmentation(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 5, 6, generator=g), torch.randint(0, 4, (3, 5, 6), generator=g)


def pixels(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    return preds.movedim(1, -1).reshape(-1, preds.shape[1]), target.reshape(-1)


def test_segmentation_shapes_equal_the_flattened_pixels() -> None:
    preds, target = segmentation()
    flat = pixels(preds, target)
    for make in (
        Accuracy,
        lambda: Accuracy(top_k=2),
        lambda: PerClassAccuracy(4),
        lambda: ConfusionMatrix(4),
    ):
        assert torch.equal(streamed(make(), (preds, target)), streamed(make(), flat))
    assert torch.equal(accuracy(preds, target), accuracy(*flat))
    assert torch.equal(top_k_accuracy(preds, target, k=3), top_k_accuracy(*flat, k=3))
    one_hot = F.one_hot(target, 4).movedim(-1, 1).float()  # one-hot along the class dim
    assert torch.equal(streamed(Accuracy(), (preds, one_hot)), streamed(Accuracy(), flat))
    for rows in (one_hot.long(), one_hot.bool(), one_hot.half()):
        assert torch.equal(streamed(Accuracy(), (preds, rows)), streamed(Accuracy(), flat))
        assert torch.equal(accuracy(preds, rows), accuracy(*flat))
    with pytest.raises(ValueError, match=r"target must be class indices \(3, 5, 6\) or one-hot"):
        Accuracy().update(preds, target[:, :4])


@pytest.mark.parametrize("ignore", [255, -100, 2])
def test_ignore_index_leaves_those_pixels_out(ignore: int) -> None:
    preds, target = segmentation(1)
    target = target.clone()
    target[:, :2] = ignore  # two rows of every image unlabelled
    keep = target != ignore
    p, t = pixels(preds, target)
    kept = (p[keep.reshape(-1)], t[keep.reshape(-1)])
    for make in (
        lambda **o: Accuracy(**o),
        lambda **o: Accuracy(top_k=2, **o),
        lambda **o: PerClassAccuracy(4, **o),
        lambda **o: ConfusionMatrix(4, **o),
    ):
        got = streamed(make(ignore_index=ignore), (preds, target))
        assert torch.equal(got, streamed(make(), kept)) or torch.allclose(
            got, streamed(make(), kept), equal_nan=True
        )
    assert accuracy(preds, target, ignore_index=ignore).item() == pytest.approx(
        accuracy(*kept).item()
    )
    assert top_k_accuracy(preds, target, k=2, ignore_index=ignore).item() == pytest.approx(
        top_k_accuracy(*kept, k=2).item()
    )
    if ignore in (255, -100):
        with pytest.raises(ValueError, match=r"targets were outside \[0, 4\)"):
            streamed(Accuracy(), (preds, target))  # without ignore_index: refused, not counted


def test_ignore_index_with_uint8_and_int8_targets() -> None:
    preds, target = segmentation(2)
    expected = streamed(Accuracy(ignore_index=255), (preds, torch.where(target == 3, 255, target)))
    as_uint8 = torch.where(target == 3, 255, target).to(torch.uint8)
    assert torch.equal(streamed(Accuracy(ignore_index=255), (preds, as_uint8)), expected)
    as_int8 = torch.where(target == 3, -100, target).to(torch.int8)
    assert torch.equal(streamed(Accuracy(ignore_index=-100), (preds, as_int8)), expected)


def test_every_target_ignored_or_every_batch_empty() -> None:
    preds = torch.randn(2, 3)
    ignored = torch.tensor([-100, -100])
    with pytest.raises(RuntimeError, match=r"no samples to score .* all 2 targets were ignore_in"):
        streamed(Accuracy(ignore_index=-100), (preds, ignored))
    assert streamed(PerClassAccuracy(3, ignore_index=-100), (preds, ignored)).isnan().all()
    assert streamed(ConfusionMatrix(3, ignore_index=-100), (preds, ignored)).sum() == 0
    assert accuracy(preds, ignored, ignore_index=-100).isnan()
    with pytest.raises(ValueError, match=r"ignore_index applies to class-index targets"):
        Accuracy(ignore_index=0).update(preds, F.one_hot(torch.tensor([0, 1]), 3))
    with pytest.raises(ValueError, match=r"ignore_index=...\): expected an int or None"):
        Accuracy(ignore_index=2.0)  # type: ignore[arg-type]


# --- masked logits, target shapes and dtypes, empty batches ------------------------------------


def test_minus_inf_masked_logits_are_scored() -> None:
    inf = float("inf")
    preds = torch.tensor([[-inf, 2.0, 1.0], [0.5, -inf, -inf], [-inf, -inf, 3.0], [1.0, 2.0, -inf]])
    target = torch.tensor([1, 0, 2, 0])
    assert accuracy(preds, target).item() == 0.75
    assert top_k_accuracy(preds, target, k=2).item() == 1.0
    for metric in multiclass_metrics(3):
        metric.update(preds, target)
        metric.compute()  # no error: -inf is a score
    assert streamed(Accuracy(), (preds, target)).item() == 0.75
    cm = streamed(ConfusionMatrix(3), (preds, target))
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    all_masked = torch.full((1, 3), -inf)  # every class masked: arg-max is class 0
    assert accuracy(all_masked, torch.tensor([0])).item() == 1.0


def test_nan_scores_are_counted_by_row() -> None:
    preds = torch.tensor([[float("nan"), 1.0], [float("nan"), float("nan")], [0.0, 1.0]])
    for metric in multiclass_metrics(2):
        metric.update(preds, torch.tensor([0, 1, 1]))
        with pytest.raises(ValueError, match=r"2 of 3 samples had NaN scores \(-inf is fine"):
            metric.compute()
    assert accuracy(preds, torch.tensor([0, 1, 1])).isnan()


def test_targets_of_shape_n_1_are_refused_not_broadcast() -> None:
    out = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    yb = torch.tensor([[1], [0]])  # right answer 1.0; broadcasting once gave 0.5
    for fn in (accuracy, Accuracy().update, PerClassAccuracy(2).update, ConfusionMatrix(2).update):
        with pytest.raises(
            ValueError, match=r"target \(2, 1\) has a column of class indices.*squeeze\(1\)"
        ):
            fn(out, yb)
    assert accuracy(out, yb.squeeze(1)).item() == 1.0


def test_float_class_indices_are_refused() -> None:
    out = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    for fn in (accuracy, Accuracy().update, PerClassAccuracy(2).update, ConfusionMatrix(2).update):
        with pytest.raises(ValueError, match=r"class-index targets must be integers, got torch.f"):
            fn(out, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"preds must be floating-point scores"):
        accuracy(torch.tensor([[0, 1], [1, 0]]), torch.tensor([1, 0]))


def test_an_empty_batch_is_a_no_op_for_metrics_and_an_error_for_functions() -> None:
    empty_preds, empty_target = torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)
    with pytest.raises(
        ValueError, match=r"accuracy: empty batch \(preds \(0, 3\), target \(0,\)\)"
    ):
        accuracy(empty_preds, empty_target)
    with pytest.raises(ValueError, match=r"top_k_accuracy: empty batch \(preds \(0, 3\)"):
        top_k_accuracy(empty_preds, empty_target, k=2)
    preds, target = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.2, 0.0]]), torch.tensor([1, 1])
    for make in (
        Accuracy,
        lambda: PerClassAccuracy(3),
        lambda: ConfusionMatrix(3),
    ):
        with_empty = streamed(
            make(), (empty_preds, empty_target), (preds, target), (empty_preds, empty_target)
        )
        assert torch.allclose(with_empty, streamed(make(), (preds, target)), equal_nan=True)
    with pytest.raises(RuntimeError, match=r"no samples to score after 1 update\(\) calls: every"):
        streamed(Accuracy(), (empty_preds, empty_target))
    assert streamed(ConfusionMatrix(3), (empty_preds, empty_target)).sum() == 0
    with pytest.raises(RuntimeError, match=r"no samples to score after 1 update"):
        streamed(BinaryAccuracy(), (torch.zeros(0), torch.zeros(0)))


def test_a_batch_mean_of_accuracy_with_ignore_index_is_refused_in_fit() -> None:
    model = nn.Linear(3, 2)
    dl = [(torch.randn(4, 3), torch.tensor([0, 1, -100, 1]))]
    with pytest.raises(ValueError, match=r"weighted by batch size.*Accuracy\(ignore_index=-100\)"):
        evaluate(model, nn.CrossEntropyLoss(), dl, [functools.partial(accuracy, ignore_index=-100)])
    result = evaluate(model, nn.CrossEntropyLoss(), dl, [Accuracy(ignore_index=-100)])
    with torch.no_grad():
        assert result["accuracy"] == pytest.approx(
            accuracy(model(dl[0][0]), dl[0][1], ignore_index=-100).item()
        )


# --- no host reads per batch on the new paths -----------------------------------------------------

HOST_READS = ("item", "tolist", "__bool__", "cpu", "numpy", "__float__", "__int__", "__index__")


def test_new_paths_read_nothing_back_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Binary, multi-label, segmentation, ignore_index, one-hot, narrow dtypes: ten times the
    batches make exactly as many host reads (those of compute(), once per pass)."""
    counts = dict.fromkeys(HOST_READS, 0)

    def counting(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def wrapper(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    def run(batches: int) -> dict[str, int]:
        g = torch.Generator().manual_seed(0)
        seg = [
            (torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 3, (2, 4, 4), generator=g))
            for _ in range(batches)
        ]
        binary = [
            (torch.randn(5, 1, generator=g), torch.randint(0, 2, (5, 1), generator=g).float())
        ]
        multilabel = [(torch.rand(5, 4, generator=g), torch.randint(0, 2, (5, 4), generator=g))]
        streams: list[tuple[Metric, list[tuple[Tensor, Tensor]]]] = [
            (Accuracy(ignore_index=255), [(p, t.masked_fill(t == 2, 255)) for p, t in seg]),
            (Accuracy(top_k=2, ignore_index=-100), [(p, t.to(torch.int8)) for p, t in seg]),
            (PerClassAccuracy(3, ignore_index=255), [(p, t.to(torch.uint8)) for p, t in seg]),
            (ConfusionMatrix(3), [(p, F.one_hot(t, 3).movedim(-1, 1).float()) for p, t in seg]),
            (BinaryAccuracy(), binary * batches),
            (BinaryAccuracy(from_logits=True, ignore_index=-1), binary * batches),
            (MultilabelAccuracy(4, average="macro"), multilabel * batches),
            (MultilabelAccuracy(4, average="none", from_logits=False), multilabel * batches),
        ]
        counts.update(dict.fromkeys(HOST_READS, 0))
        for metric, data in streams:
            metric.fold_every = 3  # type: ignore[attr-defined]  # fold mid-stream: no reads either
            metric.reset()
            for preds, target in data:
                metric.update(preds, target)
                accuracy(preds, target) if preds.ndim == 4 and target.ndim == 3 else None
            metric.compute()
        return dict(counts)

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    few, many = run(2), run(20)
    assert few == many
    assert sum(few.values()) > 0  # compute() did read: the counter works


def test_fit_reads_nothing_back_per_batch_on_the_new_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """fit with a segmentation model (ignore_index, uint8 masks) and a binary one: ten times the
    validation batches make exactly as many host reads."""
    counts = dict.fromkeys(HOST_READS, 0)

    def counting(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def wrapper(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    def run(n_valid: int) -> dict[str, int]:
        g = torch.Generator().manual_seed(0)
        images = torch.randn(8 + n_valid, 3, 4, 4, generator=g)
        masks = torch.randint(0, 3, (8 + n_valid, 4, 4), generator=g)
        masks = masks.masked_fill(torch.rand(masks.shape, generator=g) < 0.2, 255).to(torch.uint8)
        seg = TensorDataset(images, masks)
        x = torch.randn(8 + n_valid, 5, generator=g)
        flags = torch.randint(0, 2, (8 + n_valid, 1), generator=g).float()
        torch.manual_seed(0)
        seg_model, bin_model = nn.Conv2d(3, 3, 1), nn.Linear(5, 1)
        counts.update(dict.fromkeys(HOST_READS, 0))

        def seg_loss(out: Tensor, yb: Tensor) -> Tensor:
            return F.cross_entropy(out, yb.long(), ignore_index=255)

        seg_metrics: list[Metric] = [
            Accuracy(ignore_index=255),
            Accuracy(top_k=2, ignore_index=255),
            PerClassAccuracy(3, ignore_index=255),
            ConfusionMatrix(3, ignore_index=255),
        ]
        for m in seg_metrics:
            m.fold_every = 3  # type: ignore[attr-defined]  # fold mid-epoch: no reads either
        fit(
            1,
            seg_model,
            seg_loss,
            optim.SGD(seg_model.parameters(), lr=0.1),
            DataLoader(TensorDataset(*seg[:8]), batch_size=4),
            DataLoader(TensorDataset(*seg[8:]), batch_size=2),
            metrics=seg_metrics,
            progress=False,
        )
        fit(
            1,
            bin_model,
            nn.BCEWithLogitsLoss(),
            optim.SGD(bin_model.parameters(), lr=0.1),
            DataLoader(TensorDataset(x[:8], flags[:8]), batch_size=4),
            DataLoader(TensorDataset(x[8:], flags[8:]), batch_size=2),
            metrics=[BinaryAccuracy(), MultilabelAccuracy(1, from_logits=True)],
            progress=False,
        )
        return dict(counts)

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    assert run(4) == run(40)  # 2 and 20 validation batches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_updates_never_synchronise_on_the_new_paths() -> None:
    """Every update (and batch function) on the new paths runs under sync debug mode "error"."""
    g = torch.Generator(device="cuda").manual_seed(0)
    seg = torch.randn(4, 3, 8, 8, device="cuda", generator=g)
    masks = torch.randint(0, 3, (4, 8, 8), device="cuda", generator=g)
    voids = masks.masked_fill(masks == 2, 255).to(torch.uint8)
    logits = torch.randn(6, 1, device="cuda", generator=g)
    flags = torch.randint(0, 2, (6, 1), device="cuda", generator=g).float()
    streams: list[tuple[Any, Tensor, Tensor]] = [
        (Accuracy(ignore_index=255), seg, voids),
        (Accuracy(top_k=2, ignore_index=255), seg, voids),
        (PerClassAccuracy(3, ignore_index=255), seg, voids),
        (ConfusionMatrix(3), seg, F.one_hot(masks, 3).movedim(-1, 1).float()),
        (BinaryAccuracy(), logits, flags),
        (MultilabelAccuracy(3, average="macro"), seg.sigmoid(), (seg > 0).long()),
    ]
    for metric, _, _ in streams:
        metric.fold_every = 2
    try:
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(3):
            for metric, preds, target in streams:
                metric.update(preds, target)
            accuracy(seg, voids, ignore_index=255)
            top_k_accuracy(seg, masks.to(torch.int16), k=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for metric, _, _ in streams:
        metric.compute()


def test_shape_edge_cases_from_the_peer_suites() -> None:
    """Ideas from Ignite's and torchmetrics' own tests: mismatched extra dims, class count
    changing between batches, multi-label `(N, L, d)` inputs, 0-dim inputs."""
    with pytest.raises(ValueError, match=r"target must be class indices \(10, 5, 12\)"):
        accuracy(torch.randn(10, 3, 5, 12), torch.randint(0, 3, (10, 5, 6)))
    metric = Accuracy()
    metric.update(torch.randn(4, 5), torch.randint(0, 5, (4,)))
    with pytest.raises(ValueError, match=r"Accuracy: preds has 6 columns, expected 5"):
        metric.update(torch.randn(4, 6), torch.randint(0, 5, (4,)))
    with pytest.raises(ValueError, match=r"BinaryAccuracy: preds \(10, 5, 6\) and target \(10,\)"):
        BinaryAccuracy().update(torch.rand(10, 5, 6), torch.randint(0, 2, (10,)))
    with pytest.raises(ValueError, match=r"BinaryAccuracy: preds must be \(N,\) or \(N, ...\)"):
        BinaryAccuracy().update(torch.tensor(0.3), torch.tensor(1))
    with pytest.raises(ValueError, match=r"accuracy: preds must be \(N, C, ...\) scores, got a 0"):
        accuracy(torch.tensor(0.3), torch.tensor(1))
    probs = torch.tensor([[[0.9, 0.2], [0.1, 0.7]], [[0.4, 0.6], [0.8, 0.3]]])  # (N=2, L=2, d=2)
    target = torch.tensor([[[1, 0], [0, 1]], [[0, 1], [1, 1]]])
    per_label = streamed(MultilabelAccuracy(2, average="none"), (probs, target))
    assert per_label.tolist() == [1.0, 0.75]


def test_a_nan_from_the_batch_functions_is_an_error_in_fit() -> None:
    model = nn.Linear(3, 4)
    bad = [(torch.randn(4, 3), torch.tensor([0, 1, 7, 1]))]  # 7 is outside [0, 4)
    for fn in (accuracy, functools.partial(top_k_accuracy, k=2)):
        with pytest.raises(ValueError, match=r"accuracy was NaN for some batch: a target outside"):
            evaluate(model, lambda out, yb: out.sum() * 0, bad, [fn])
    good = [(torch.randn(4, 3), torch.tensor([0, 1, 3, 1]))]
    assert 0.0 <= evaluate(model, nn.CrossEntropyLoss(), good, [accuracy])["accuracy"] <= 1.0
