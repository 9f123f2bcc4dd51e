"""trainkit: typed, reusable PyTorch training parts grown from the PyTorch tutorials.

Example:
    >>> from trainkit import fit, WrappedDataLoader, accuracy
"""

from trainkit.callbacks import (
    HOOKS,
    Callback,
    CSVLogger,
    EarlyStopping,
    ProgressBar,
    StopTraining,
    TensorBoardLogger,
    show_training_loop,
)
from trainkit.data import (
    DeviceDataLoader,
    LoaderOptions,
    WrappedDataLoader,
    get_data,
    get_device,
    to_device,
)
from trainkit.datasets import fashion_mnist
from trainkit.layers import Lambda
from trainkit.loop import LossFn, evaluate, fit, loss_batch, predict
from trainkit.metrics import (
    Accuracy,
    BatchMetric,
    ConfusionMatrix,
    Mean,
    Metric,
    MetricArg,
    PerClassAccuracy,
    accuracy,
    top_k_accuracy,
)
from trainkit.state import History, Status, TrainState

__version__ = "0.1.0"

__all__ = [
    "HOOKS",
    "Accuracy",
    "BatchMetric",
    "CSVLogger",
    "Callback",
    "ConfusionMatrix",
    "DeviceDataLoader",
    "EarlyStopping",
    "History",
    "Lambda",
    "LoaderOptions",
    "LossFn",
    "Mean",
    "Metric",
    "MetricArg",
    "PerClassAccuracy",
    "ProgressBar",
    "Status",
    "StopTraining",
    "TensorBoardLogger",
    "TrainState",
    "WrappedDataLoader",
    "__version__",
    "accuracy",
    "evaluate",
    "fashion_mnist",
    "fit",
    "get_data",
    "get_device",
    "loss_batch",
    "predict",
    "show_training_loop",
    "to_device",
    "top_k_accuracy",
]
