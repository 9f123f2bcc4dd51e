"""Callbacks: the hook protocol and the built-in callbacks."""

from trainkit.callbacks.base import HOOKS, Callback, StopTraining, show_training_loop
from trainkit.callbacks.early_stopping import EarlyStopping
from trainkit.callbacks.loggers import CSVLogger, TensorBoardLogger
from trainkit.callbacks.progress import ProgressBar

__all__ = [
    "HOOKS",
    "CSVLogger",
    "Callback",
    "EarlyStopping",
    "ProgressBar",
    "StopTraining",
    "TensorBoardLogger",
    "show_training_loop",
]
