# mypy: allow-untyped-defs
"""The tutorial's own lines ("What is torch.nn really?", "Wrapping DataLoader"), as written there.

Its `preprocess` has no annotations, as in the tutorial; the comment above allows exactly that
here (`make typecheck` runs `mypy --strict`). tests/test_typing_completeness.py also checks a
copy without it: with mypy's defaults it is clean, and `--strict` flags only that unannotated
`def`, not one line that uses trainkit.
"""

import gzip
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import TensorDataset

from trainkit import Lambda, WrappedDataLoader, fit, get_data

PATH = Path("data") / "mnist"
FILENAME = "mnist.pkl.gz"
with gzip.open((PATH / FILENAME).as_posix(), "rb") as f:
    ((x_train, y_train), (x_valid, y_valid), _) = pickle.load(f, encoding="latin-1")

x_train, y_train, x_valid, y_valid = map(torch.tensor, (x_train, y_train, x_valid, y_valid))
train_ds = TensorDataset(x_train, y_train)
valid_ds = TensorDataset(x_valid, y_valid)
bs = 64
lr = 0.1
epochs = 2
loss_func = F.cross_entropy


def preprocess(x, y):
    return x.view(-1, 1, 28, 28), y


train_dl, valid_dl = get_data(train_ds, valid_ds, bs)
train_dl = WrappedDataLoader(train_dl, preprocess)
valid_dl = WrappedDataLoader(valid_dl, preprocess)

model = nn.Sequential(
    nn.Conv2d(1, 16, kernel_size=3, stride=2, padding=1),
    nn.ReLU(),
    nn.Conv2d(16, 16, kernel_size=3, stride=2, padding=1),
    nn.ReLU(),
    nn.Conv2d(16, 10, kernel_size=3, stride=2, padding=1),
    nn.ReLU(),
    nn.AdaptiveAvgPool2d(1),
    Lambda(lambda x: x.view(x.size(0), -1)),
)
opt = optim.SGD(model.parameters(), lr=lr, momentum=0.9)
fit(epochs, model, loss_func, opt, train_dl, valid_dl)
