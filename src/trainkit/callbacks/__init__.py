"""Callbacks: the hook protocol and the built-in callbacks."""

from trainkit.callbacks.base import HOOKS, Callback, StopTraining, show_training_loop
from trainkit.callbacks.checkpoint import ModelCheckpoint
from trainkit.callbacks.early_stopping import EarlyStopping
from trainkit.callbacks.loggers import CSVLogger, TensorBoardLogger
from trainkit.callbacks.nan import TerminateOnNaN
from trainkit.callbacks.progress import ProgressBar

__all__ = [
    "HOOKS",
    "CSVLogger",
    "Callback",
    "EarlyStopping",
    "ModelCheckpoint",
    "ProgressBar",
    "StopTraining",
    "TensorBoardLogger",
    "TerminateOnNaN",
    "show_training_loop",
]
