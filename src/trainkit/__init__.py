"""trainkit: typed, reusable PyTorch training parts grown from the PyTorch tutorials.

Example:
    >>> from trainkit import fit, WrappedDataLoader, accuracy
"""

from trainkit.callbacks import (
    HOOKS,
    Callback,
    CSVLogger,
    EarlyStopping,
    ModelCheckpoint,
    ProgressBar,
    StopTraining,
    TensorBoardLogger,
    TerminateOnNaN,
    show_training_loop,
)
from trainkit.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    seed_everything,
    unsafe_load_pickled_model,
)
from trainkit.data import (
    DeviceDataLoader,
    Loader,
    LoaderOptions,
    TensorDataLoader,
    WrappedDataLoader,
    fast_loader,
    get_data,
    get_device,
    to_device,
)
from trainkit.datasets import CustomImageDataset, DatasetError, fashion_mnist
from trainkit.distributed import Preempted
from trainkit.evaluation import evaluate, predict
from trainkit.fastpath import FastTensorLoader, why_not_fast
from trainkit.layers import Lambda
from trainkit.loop import Amp, LossFn, Scheduler, fit, loss_batch
from trainkit.lr_finder import LRFinderResult, lr_find
from trainkit.metrics import (
    Accuracy,
    BatchMetric,
    BinaryAccuracy,
    ConfusionMatrix,
    Mean,
    Metric,
    MetricArg,
    MultilabelAccuracy,
    PerClassAccuracy,
    accuracy,
    top_k_accuracy,
)
from trainkit.state import EvalState, History, HistoryFigure, Status, TrainState
from trainkit.transforms import OneHot, one_hot

__version__ = "0.1.0"

__all__ = [
    "HOOKS",
    "Accuracy",
    "Amp",
    "BatchMetric",
    "BinaryAccuracy",
    "CSVLogger",
    "Callback",
    "Checkpoint",
    "CheckpointError",
    "ConfusionMatrix",
    "CustomImageDataset",
    "DatasetError",
    "DeviceDataLoader",
    "EarlyStopping",
    "EvalState",
    "FastTensorLoader",
    "History",
    "HistoryFigure",
    "LRFinderResult",
    "Lambda",
    "Loader",
    "LoaderOptions",
    "LossFn",
    "Mean",
    "Metric",
    "MetricArg",
    "ModelCheckpoint",
    "MultilabelAccuracy",
    "OneHot",
    "PerClassAccuracy",
    "Preempted",
    "ProgressBar",
    "Scheduler",
    "Status",
    "StopTraining",
    "TensorBoardLogger",
    "TensorDataLoader",
    "TerminateOnNaN",
    "TrainState",
    "WrappedDataLoader",
    "__version__",
    "accuracy",
    "evaluate",
    "fashion_mnist",
    "fast_loader",
    "fit",
    "get_data",
    "get_device",
    "load_checkpoint",
    "load_weights",
    "loss_batch",
    "lr_find",
    "one_hot",
    "predict",
    "save_checkpoint",
    "save_weights",
    "seed_everything",
    "show_training_loop",
    "to_device",
    "top_k_accuracy",
    "unsafe_load_pickled_model",
    "why_not_fast",
]
