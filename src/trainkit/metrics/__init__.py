"""Metrics: streaming (`Accuracy`, `PerClassAccuracy`, `ConfusionMatrix`, `BinaryAccuracy`,
`MultilabelAccuracy`, `Mean`) and per batch (`accuracy`, `top_k_accuracy`).

One module per concept: `base` (the `Metric` protocol, `Mean`, naming for `fit`),
`multiclass`, `binary`; `_core` holds the input checks, the top-k rule and the shared counts.
"""

from __future__ import annotations

from trainkit.metrics.base import (
    BatchMean,
    BatchMetric,
    Mean,
    Metric,
    MetricArg,
)
from trainkit.metrics.base import (
    move_metrics as move_metrics,
)
from trainkit.metrics.base import (
    named_metrics as named_metrics,
)
from trainkit.metrics.binary import BinaryAccuracy, MultilabelAccuracy
from trainkit.metrics.multiclass import (
    Accuracy,
    ConfusionMatrix,
    PerClassAccuracy,
    accuracy,
    top_k_accuracy,
)

SYNCED = (
    Accuracy,
    PerClassAccuracy,
    ConfusionMatrix,
    BinaryAccuracy,
    MultilabelAccuracy,
    Mean,
    BatchMean,
)
"""Metrics whose `sync()` `fit` calls under a process group (torchmetrics sync in `compute`)."""

__all__ = [
    "Accuracy",
    "BatchMetric",
    "BinaryAccuracy",
    "ConfusionMatrix",
    "Mean",
    "Metric",
    "MetricArg",
    "MultilabelAccuracy",
    "PerClassAccuracy",
    "accuracy",
    "top_k_accuracy",
]
