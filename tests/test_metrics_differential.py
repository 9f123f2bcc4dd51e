"""Every trainkit metric against its torchmetrics counterpart, over generated inputs.

Shapes `(N, C)` and `(N, C, d1, d2)`, class counts 1..1000, scores with ties, `-inf` masks and
half precision, targets of every integer dtype (and one-hot rows), `ignore_index` 255 / -100 /
inside `[0, C)`, and any split into batches (with empty batches between). Zero mismatches.

Top-k ties: trainkit breaks ties toward the lower class index (a stable sort), torchmetrics
takes `torch.topk`'s order, which is unspecified. So each top-k result is checked against an
independent numpy reference of the documented rule, and against torchmetrics wherever no tie
straddles the k-th place (there the two rules must agree); for `k=1` both are `argmax`.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import Tensor

from trainkit import (
    Accuracy,
    BinaryAccuracy,
    ConfusionMatrix,
    MultilabelAccuracy,
    PerClassAccuracy,
    accuracy,
    top_k_accuracy,
)

tmf = pytest.importorskip("torchmetrics.functional.classification")
tmc = pytest.importorskip("torchmetrics.classification")

DTYPES = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
}
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fits(dtype: torch.dtype, *values: int) -> bool:
    info = torch.iinfo(dtype)
    return all(info.min <= v <= info.max for v in values)


def batches(n: int, cuts: list[int]) -> list[slice]:
    """Slices covering `range(n)` at the given cut points, with an empty batch after each."""
    points = sorted({0, n, *(c % (n + 1) for c in cuts)})
    parts = [slice(a, b) for a, b in itertools.pairwise(points)]
    return [s for part in parts for s in (part, slice(part.stop, part.stop))] or [slice(0, 0)]


def stream(metric: Any, preds: Tensor, target: Tensor, parts: list[slice]) -> Tensor:
    metric.reset()
    for part in parts:
        metric.update(preds[part], target[part])
    out: Tensor = metric.compute()
    return out


def scores(kind: str, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    if kind == "ties":  # a few distinct values: ties everywhere
        return torch.randint(0, 3, shape, generator=g).float()
    x = torch.randn(shape, generator=g)
    if kind == "masked":  # -inf masks, some samples masked but for one class, some entirely
        x = x.masked_fill(torch.rand(shape, generator=g) < 0.6, float("-inf"))
    if kind == "half":
        return x.half()
    if kind == "bfloat16":
        return x.bfloat16()
    return x


def reference_hits(preds: Tensor, target: Tensor, k: int) -> np.ndarray:
    """The documented rule, in numpy: a stable descending sort, target among the first k."""
    classes = preds.shape[1]
    p = preds.double().movedim(1, -1).reshape(-1, classes).numpy()
    t = target.reshape(-1).numpy().astype(np.int64)
    order = np.argsort(-p, axis=1, kind="stable")
    hits: np.ndarray = (order[:, :k] == t[:, None]).any(axis=1)
    return hits


def order_free(preds: Tensor, target: Tensor, counted: np.ndarray, k: int) -> bool:
    """Whether no counted sample has a tie straddling the k-th place (any tie rule agrees)."""
    classes = preds.shape[1]
    p = preds.double().movedim(1, -1).reshape(-1, classes).numpy()[counted]
    t = target.reshape(-1).numpy().astype(np.int64)[counted]
    v = p[np.arange(len(t)), t][:, None]
    above, equal = (p > v).sum(axis=1), (p == v).sum(axis=1)
    return bool(((above + equal <= k) | (above >= k)).all())


@SETTINGS
@given(
    classes=st.one_of(st.integers(1, 6), st.integers(7, 1000)),
    extra=st.lists(st.integers(1, 3), max_size=2),
    n=st.integers(0, 24),
    kind=st.sampled_from(["normal", "ties", "masked", "half", "bfloat16"]),
    ignore=st.sampled_from([None, 255, -100, "inside"]),
    dtype=st.sampled_from(list(DTYPES)),
    top_k=st.integers(1, 5),
    one_hot=st.booleans(),
    cuts=st.lists(st.integers(0, 24), max_size=5),
    seed=st.integers(0, 2**31),
)
@example(1, [], 8, "normal", None, "int64", 1, False, [], 0)  # one output column: refused
@example(5, [], 8, "ties", None, "int64", 2, False, [3], 1)  # ties at the k-th place
@example(20, [], 16, "normal", None, "uint8", 1, False, [5], 2)  # 13 * 20 wraps in uint8
@example(1000, [], 16, "normal", None, "int16", 3, False, [7], 3)  # int16, 1000 classes
@example(4, [3, 2], 6, "masked", 255, "uint8", 2, False, [2, 4], 4)  # segmentation, 255
@example(7, [2], 10, "half", -100, "int8", 3, False, [1], 5)  # -100 in int8, half scores
@example(6, [2, 2], 5, "ties", "inside", "int32", 4, False, [], 6)  # ignore_index inside
@example(9, [3], 7, "normal", None, "int64", 2, True, [3], 7)  # one-hot rows, multidim
@example(3, [], 0, "normal", None, "int64", 1, False, [], 8)  # nothing but empty batches
def test_multiclass_metrics_agree_with_torchmetrics(
    classes: int,
    extra: list[int],
    n: int,
    kind: str,
    ignore: int | str | None,
    dtype: str,
    top_k: int,
    one_hot: bool,
    cuts: list[int],
    seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    if ignore == "inside":
        ignore = int(torch.randint(0, classes, (), generator=g))
    assert not isinstance(ignore, str)
    int_dtype = DTYPES[dtype]
    if not fits(int_dtype, classes - 1, *([] if ignore is None else [ignore])):
        int_dtype = torch.int64
    k = min(top_k, classes)
    preds = scores(kind, (n, classes, *extra), g)
    target = torch.randint(0, classes, (n, *extra), generator=g)
    if ignore is not None:
        target = target.masked_fill(torch.rand(target.shape, generator=g) < 0.25, ignore)
    parts = batches(n, cuts)
    given_target = target.to(int_dtype)
    if one_hot and ignore is None:
        given_target = F.one_hot(target, classes).movedim(-1, 1).float()

    if classes == 1:  # one score per sample: both refuse; ours names BinaryAccuracy
        with pytest.raises(ValueError, match="BinaryAccuracy"):
            stream(Accuracy(), preds, given_target, parts)
        with pytest.raises(ValueError, match="BinaryAccuracy"):
            PerClassAccuracy(classes)
        with pytest.raises(ValueError):
            tmf.multiclass_accuracy(preds, target, num_classes=classes)
        return

    if n == 0:  # nothing but empty batches (torchmetrics cannot take an empty input)
        with pytest.raises(RuntimeError, match=r"no samples to score after .* every batch"):
            stream(Accuracy(top_k=k, ignore_index=ignore), preds, given_target, parts)
        per_class_metric = PerClassAccuracy(classes, ignore_index=ignore)
        assert stream(per_class_metric, preds, given_target, parts).isnan().all()
        matrix_metric = ConfusionMatrix(classes, ignore_index=ignore)
        assert stream(matrix_metric, preds, given_target, parts).sum() == 0
        return

    counted = (target != ignore).reshape(-1).numpy() if ignore is not None else None
    n_counted = int(target.numel() if counted is None else counted.sum())
    keep = np.ones(target.numel(), dtype=bool) if counted is None else counted

    # Accuracy(top_k) and the batch functions
    hits = reference_hits(preds, target, k)[keep]
    if n_counted == 0:
        with pytest.raises(RuntimeError, match="no samples to score"):
            stream(Accuracy(top_k=k, ignore_index=ignore), preds, given_target, parts)
    else:
        ours = stream(Accuracy(top_k=k, ignore_index=ignore), preds, given_target, parts).item()
        assert ours == hits.mean()
        theirs = tmf.multiclass_accuracy(
            preds, target, classes, average="micro", top_k=k, ignore_index=ignore
        ).item()
        if k == 1 or order_free(preds, target, keep, k):
            assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-7)
        batch = top_k_accuracy(preds, given_target, k=k, ignore_index=ignore)
        assert batch.item() == pytest.approx(ours, rel=1e-6)
        if k == 1:
            assert accuracy(preds, given_target, ignore_index=ignore).item() == batch.item()

    # PerClassAccuracy: torchmetrics gives 0 for a class with no counted sample, we give NaN
    per_class = stream(PerClassAccuracy(classes, ignore_index=ignore), preds, given_target, parts)
    theirs_per_class = tmf.multiclass_accuracy(
        preds, target, classes, average="none", ignore_index=ignore
    )
    flat_target = target.reshape(-1)[torch.from_numpy(keep)]
    present = torch.bincount(flat_target.long(), minlength=classes) > 0 if n_counted else None
    if present is None:
        assert per_class.isnan().all()
    else:
        assert per_class[~present].isnan().all()
        assert torch.allclose(per_class[present].float(), theirs_per_class[present], atol=1e-6)

    # ConfusionMatrix: exact counts
    matrix = stream(ConfusionMatrix(classes, ignore_index=ignore), preds, given_target, parts)
    theirs_matrix = tmf.multiclass_confusion_matrix(preds, target, classes, ignore_index=ignore)
    assert torch.equal(matrix, theirs_matrix.long())


def test_100000_classes_agree_with_torchmetrics() -> None:
    g = torch.Generator().manual_seed(0)
    classes = 100_000
    preds = torch.randn(48, classes, generator=g)
    target = torch.randint(0, classes, (48,), generator=g)
    preds[:20].scatter_(1, target[:20, None], 10.0)  # some right
    preds[20:30].scatter_(1, target[20:30, None], preds[20:30].topk(3).values[:, 2:] + 1e-3)
    for dtype in (torch.int32, torch.int64):
        for k in (1, 5):
            ours = stream(Accuracy(top_k=k), preds, target.to(dtype), [slice(0, 17), slice(17, 48)])
            theirs = tmf.multiclass_accuracy(preds, target, classes, average="micro", top_k=k)
            assert ours.item() == pytest.approx(theirs.item())
            assert ours.item() == reference_hits(preds, target, k).mean()
        # per class: torchmetrics would build a 10^10-cell matrix; the reference counts directly
        per_class = stream(PerClassAccuracy(classes), preds, target.to(dtype), [slice(0, 48)])
        predicted = preds.argmax(1)
        for c in torch.unique(target).tolist():
            mine = target == c
            assert per_class[c].item() == (predicted[mine] == c).double().mean().item()
        assert per_class.isnan().sum() == classes - len(torch.unique(target))


BINARY_TARGETS = ["float32", "bool", "uint8", "int8", "int64"]


@SETTINGS
@given(
    shape=st.sampled_from(["n", "n1", "n1-target-n", "nhw"]),
    n=st.integers(1, 20),
    kind=st.sampled_from(["logits", "probabilities", "mixed", "boundary", "half"]),
    target_dtype=st.sampled_from(BINARY_TARGETS),
    ignore=st.sampled_from([None, 255, -100]),
    threshold=st.sampled_from([0.5, 0.0, 1.0, 0.3, 0.73]),
    from_logits=st.sampled_from([None, True, False]),
    cuts=st.lists(st.integers(0, 20), max_size=4),
    seed=st.integers(0, 2**31),
)
@example("n1", 4, "logits", "float32", None, 0.5, None, [], 0)  # the reported case's shape
@example("nhw", 6, "mixed", "uint8", 255, 0.5, None, [2, 4], 1)  # binary masks, 255
@example("n", 9, "boundary", "int8", -100, 0.5, True, [3], 2)  # sigmoid(0) = 0.5: negative
def test_binary_accuracy_agrees_with_torchmetrics(
    shape: str,
    n: int,
    kind: str,
    target_dtype: str,
    ignore: int | None,
    threshold: float,
    from_logits: bool | None,
    cuts: list[int],
    seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    dims = {"n": (n,), "n1": (n, 1), "n1-target-n": (n, 1), "nhw": (n, 2, 3)}[shape]
    x = torch.randn(dims, generator=g) * 3
    if kind == "probabilities" or from_logits is False:
        x = torch.rand(dims, generator=g)
    elif kind == "mixed":  # some batches all in [0, 1]: those are read as probabilities
        x = torch.where(
            torch.rand(dims[:1], generator=g).view(-1, *[1] * (len(dims) - 1)) < 0.5, x.sigmoid(), x
        )
    elif kind == "boundary":
        x = torch.tensor([0.0, 0.5, 1.0, -0.0])[torch.randint(0, 4, dims, generator=g)]
    elif kind == "half":
        x = x.half()
    target = torch.randint(0, 2, dims, generator=g)
    if ignore is not None:
        target = target.masked_fill(torch.rand(dims, generator=g) < 0.25, ignore)
    if shape == "n1-target-n":
        target = target[:, 0]
    dtype = getattr(torch, target_dtype)
    if ignore is not None and (dtype == torch.bool or not fits_any(dtype, ignore)):
        dtype = torch.int64
    given_target = target.to(dtype)
    parts = batches(n, cuts)
    ours_metric = BinaryAccuracy(threshold, from_logits=from_logits, ignore_index=ignore)
    counted = int((target != ignore).sum()) if ignore is not None else target.numel()
    if counted == 0:
        with pytest.raises(RuntimeError, match="no samples to score"):
            stream(ours_metric, x, given_target, parts)
        return
    ours = stream(ours_metric, x, given_target, parts).item()

    # torchmetrics, fed what our options mean: sigmoid applied for from_logits=True; the scores
    # of ignored entries neutral (they take no part in our logits-or-probabilities decision)
    theirs_metric = tmc.BinaryAccuracy(threshold=threshold, ignore_index=ignore)
    tm_scores = x.reshape(target.shape) if shape == "n1-target-n" else x
    if from_logits:
        tm_scores = tm_scores.sigmoid()
    if ignore is not None:
        tm_scores = torch.where(
            target == ignore, torch.tensor(0.5, dtype=tm_scores.dtype), tm_scores
        )
    for part in parts:
        if part.stop > part.start:
            theirs_metric.update(tm_scores[part], target[part].long())
    assert ours == pytest.approx(theirs_metric.compute().item(), rel=1e-6, abs=1e-7)


def fits_any(dtype: torch.dtype, value: int) -> bool:
    return dtype.is_floating_point or fits(dtype, value)


@SETTINGS
@given(
    labels=st.integers(2, 8),
    extra=st.lists(st.integers(1, 3), max_size=1),
    n=st.integers(1, 16),
    probabilities=st.booleans(),
    ignore=st.sampled_from([None, -1, 255]),
    average=st.sampled_from(["micro", "macro", "none"]),
    threshold=st.sampled_from([0.5, 0.2, 0.9]),
    cuts=st.lists(st.integers(0, 16), max_size=3),
    seed=st.integers(0, 2**31),
)
@example(3, [], 5, False, -1, "macro", 0.5, [2], 0)
def test_multilabel_accuracy_agrees_with_torchmetrics(
    labels: int,
    extra: list[int],
    n: int,
    probabilities: bool,
    ignore: int | None,
    average: str,
    threshold: float,
    cuts: list[int],
    seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    dims = (n, labels, *extra)
    x = torch.rand(dims, generator=g) if probabilities else torch.randn(dims, generator=g) * 2
    target = torch.randint(0, 2, dims, generator=g)
    if ignore is not None:
        target = target.masked_fill(torch.rand(dims, generator=g) < 0.3, ignore)
    parts = batches(n, cuts)
    metric = MultilabelAccuracy(labels, threshold, average=average, ignore_index=ignore)  # type: ignore[arg-type]
    theirs_metric = tmc.MultilabelAccuracy(
        labels, threshold=threshold, average=average, ignore_index=ignore
    )
    tm_scores = x if ignore is None else torch.where(target == ignore, 0.5, x)
    for part in parts:
        if part.stop > part.start:
            theirs_metric.update(tm_scores[part], target[part])
    theirs = theirs_metric.compute()
    per_label_counted = (
        (target != ignore).movedim(1, 0).reshape(labels, -1).sum(1)
        if ignore is not None
        else torch.full((labels,), target[:, 0].numel())
    )
    if int(per_label_counted.sum()) == 0 and average != "none":
        with pytest.raises(RuntimeError, match="no samples to score"):
            stream(metric, x, target, parts)
        return
    ours = stream(metric, x, target, parts)
    have = per_label_counted > 0
    if average == "none":
        assert ours[~have].isnan().all()
        assert torch.allclose(ours[have].float(), theirs[have], atol=1e-6)
    elif average == "macro" and not have.all():  # torchmetrics averages in 0 for such labels
        assert ours.item() == pytest.approx(theirs.item() * labels / int(have.sum()), rel=1e-5)
    else:
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
