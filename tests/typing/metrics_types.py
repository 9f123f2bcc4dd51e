"""Metric types as a user's editor sees them: checked by mypy (`make test`), never run."""

from __future__ import annotations

from typing import assert_type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainkit import (
    Accuracy,
    BatchMetric,
    BinaryAccuracy,
    ConfusionMatrix,
    Mean,
    Metric,
    MultilabelAccuracy,
    PerClassAccuracy,
    accuracy,
    evaluate,
    fit,
    top_k_accuracy,
)

preds, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])

assert_type(Accuracy().compute(), Tensor)
assert_type(Accuracy(top_k=2).compute(), Tensor)
assert_type(PerClassAccuracy(3, class_names=["a", "b", "c"]).compute(), Tensor)
assert_type(PerClassAccuracy(3).report(), str)
assert_type(ConfusionMatrix(3).compute(), Tensor)
assert_type(Mean().compute(), Tensor)
assert_type(accuracy(preds, target), Tensor)
assert_type(top_k_accuracy(preds, target, k=2), Tensor)

# segmentation, ignore_index, binary and multi-label
assert_type(accuracy(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.uint8)), Tensor)
assert_type(top_k_accuracy(preds, target, 2, ignore_index=-100), Tensor)
assert_type(Accuracy(top_k=2, ignore_index=255).compute(), Tensor)
assert_type(PerClassAccuracy(3, ["a", "b", "c"], ignore_index=255).compute(), Tensor)
assert_type(ConfusionMatrix(3, ignore_index=-100).compute(), Tensor)
assert_type(BinaryAccuracy().compute(), Tensor)
assert_type(BinaryAccuracy(0.3, from_logits=True, ignore_index=-100).compute(), Tensor)
assert_type(MultilabelAccuracy(4, average="none", from_logits=False).compute(), Tensor)
binary_metric: Metric = BinaryAccuracy()
multilabel_metric: Metric = MultilabelAccuracy(4)


class CountCorrect:
    """A user's metric: no base class, it only has the Metric protocol's shape."""

    def reset(self) -> None:
        self.correct = torch.zeros((), dtype=torch.long)

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.correct += (preds.argmax(dim=1) == target).sum()

    def compute(self) -> Tensor:
        return self.correct


metric: Metric = CountCorrect()
assert_type(metric.compute(), Tensor | float)
batch_fn: BatchMetric = accuracy

model = nn.Linear(3, 3)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
dl = [(preds, target)]
figures = evaluate(model, F.cross_entropy, dl, {"count": CountCorrect(), "acc": accuracy})
assert_type(figures, dict[str, float])
assert_type(figures["acc"], float)
history = fit(1, model, F.cross_entropy, opt, dl, dl, metrics=[Accuracy(), CountCorrect()])
assert_type(history["val_accuracy"], list[float])
assert_type(history.tensors("val_per_class_accuracy"), list[Tensor])
