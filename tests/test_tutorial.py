"""The code of "What is torch.nn really?", with its definitions replaced by trainkit imports.

Data: images the test builds (10 classes of 28x28 templates plus noise), in the tutorial's
flattened MNIST layout; MNIST itself cannot be downloaded here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.utils.data import TensorDataset

from trainkit import Lambda, WrappedDataLoader, fit, get_data

ROOT = Path(__file__).resolve().parents[1]

bs = 64
lr = 0.1
epochs = 2
loss_func = F.cross_entropy


class Mnist_CNN(nn.Module):  # noqa: N801 - the tutorial's name
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 10, kernel_size=3, stride=2, padding=1)

    def forward(self, xb: Tensor) -> Tensor:
        xb = xb.view(-1, 1, 28, 28)
        xb = F.relu(self.conv1(xb))
        xb = F.relu(self.conv2(xb))
        xb = F.relu(self.conv3(xb))
        xb = F.avg_pool2d(xb, 4)
        return xb.view(-1, xb.size(1))


def preprocess(x: Tensor) -> Tensor:
    return x.view(-1, 1, 28, 28)


def preprocess_batch(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return x.view(-1, 1, 28, 28), y


def improved(val_loss: list[float]) -> bool:
    return val_loss[-1] < 0.5 * val_loss[0]


def test_mnist_cnn(images: tuple[TensorDataset, TensorDataset]) -> None:
    torch.manual_seed(0)
    train_ds, valid_ds = images
    train_dl, valid_dl = get_data(train_ds, valid_ds, bs)
    model = Mnist_CNN()
    opt = optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    history = fit(epochs + 2, model, loss_func, opt, train_dl, valid_dl)
    assert improved(history["val_loss"])


def test_sequential_with_lambda(images: tuple[TensorDataset, TensorDataset]) -> None:
    torch.manual_seed(0)
    train_dl, valid_dl = get_data(*images, bs)
    model = nn.Sequential(
        Lambda(preprocess),
        nn.Conv2d(1, 16, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 10, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(4),
        Lambda(lambda x: x.view(x.size(0), -1)),
    )
    opt = optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    history = fit(epochs + 2, model, loss_func, opt, train_dl, valid_dl)
    assert improved(history["val_loss"])


def test_wrapped_data_loader_with_adaptive_pooling(
    images: tuple[TensorDataset, TensorDataset],
) -> None:
    torch.manual_seed(0)
    train_dl, valid_dl = get_data(*images, bs)
    train_dl = WrappedDataLoader(train_dl, preprocess_batch)
    valid_dl = WrappedDataLoader(valid_dl, preprocess_batch)
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
    history = fit(epochs + 2, model, loss_func, opt, train_dl, valid_dl)
    assert improved(history["val_loss"])


# --- the whole tutorial as one file, with trainkit's import where the README puts it ---------

# "What is torch.nn really?" as its code cells run one after another in one file, verbatim but
# for the data (the tutorial downloads MNIST as numpy arrays: here learnable 28x28 images of
# the same layout), `set_trace` and the plotting. Its definitions of loss_batch, fit, get_data,
# Lambda and WrappedDataLoader are deleted; {at_step} marks where it defined loss_batch.
TUTORIAL = """\
{at_top}
import numpy as np

rng = np.random.default_rng(0)
templates = rng.random((10, 784), dtype=np.float32)
y_train = rng.integers(0, 10, 1500)
y_valid = rng.integers(0, 10, 300)
x_train = (templates[y_train] + rng.normal(0, 0.3, (1500, 784))).astype(np.float32)
x_valid = (templates[y_valid] + rng.normal(0, 0.3, (300, 784))).astype(np.float32)
print(x_train.shape)

import torch

torch.manual_seed(0)  # not in the tutorial: the same run every time
x_train, y_train, x_valid, y_valid = map(
    torch.tensor, (x_train, y_train, x_valid, y_valid)
)
n, c = x_train.shape
print(x_train, y_train)
print(x_train.shape)
print(y_train.min(), y_train.max())

import math

weights = torch.randn(784, 10) / math.sqrt(784)
weights.requires_grad_()
bias = torch.zeros(10, requires_grad=True)

def log_softmax(x):
    return x - x.exp().sum(-1).log().unsqueeze(-1)

def model(xb):
    return log_softmax(xb @ weights + bias)

bs = 64  # batch size
xb = x_train[0:bs]  # a mini-batch from x
preds = model(xb)  # predictions
preds[0], preds.shape
print(preds[0], preds.shape)

def nll(input, target):
    return -input[range(target.shape[0]), target].mean()

loss_func = nll
yb = y_train[0:bs]
print(loss_func(preds, yb))

def accuracy(out, yb):
    preds = torch.argmax(out, dim=1)
    return (preds == yb).float().mean()

print(accuracy(preds, yb))

lr = 0.5  # learning rate
epochs = 2  # how many epochs to train for

for epoch in range(epochs):
    for i in range((n - 1) // bs + 1):
        start_i = i * bs
        end_i = start_i + bs
        xb = x_train[start_i:end_i]
        yb = y_train[start_i:end_i]
        pred = model(xb)
        loss = loss_func(pred, yb)

        loss.backward()
        with torch.no_grad():
            weights -= weights.grad * lr
            bias -= bias.grad * lr
            weights.grad.zero_()
            bias.grad.zero_()

print(loss_func(model(xb), yb), accuracy(model(xb), yb))

import torch.nn.functional as F

loss_func = F.cross_entropy

def model(xb):
    return xb @ weights + bias

print(loss_func(model(xb), yb), accuracy(model(xb), yb))

from torch import nn

class Mnist_Logistic(nn.Module):
    def __init__(self):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(784, 10) / math.sqrt(784))
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, xb):
        return xb @ self.weights + self.bias

model = Mnist_Logistic()
print(loss_func(model(xb), yb))

def fit():
    for epoch in range(epochs):
        for i in range((n - 1) // bs + 1):
            start_i = i * bs
            end_i = start_i + bs
            xb = x_train[start_i:end_i]
            yb = y_train[start_i:end_i]
            pred = model(xb)
            loss = loss_func(pred, yb)

            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= p.grad * lr
                model.zero_grad()

fit()
print(loss_func(model(xb), yb))

class Mnist_Logistic(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(784, 10)

    def forward(self, xb):
        return self.lin(xb)

model = Mnist_Logistic()
print(loss_func(model(xb), yb))
fit()
print(loss_func(model(xb), yb))

from torch import optim

def get_model():
    model = Mnist_Logistic()
    return model, optim.SGD(model.parameters(), lr=lr)

model, opt = get_model()
print(loss_func(model(xb), yb))

for epoch in range(epochs):
    for i in range((n - 1) // bs + 1):
        start_i = i * bs
        end_i = start_i + bs
        xb = x_train[start_i:end_i]
        yb = y_train[start_i:end_i]
        pred = model(xb)
        loss = loss_func(pred, yb)

        loss.backward()
        opt.step()
        opt.zero_grad()

print(loss_func(model(xb), yb))

from torch.utils.data import TensorDataset

train_ds = TensorDataset(x_train, y_train)
model, opt = get_model()

for epoch in range(epochs):
    for i in range((n - 1) // bs + 1):
        xb, yb = train_ds[i * bs: i * bs + bs]
        pred = model(xb)
        loss = loss_func(pred, yb)

        loss.backward()
        opt.step()
        opt.zero_grad()

print(loss_func(model(xb), yb))

from torch.utils.data import DataLoader

train_ds = TensorDataset(x_train, y_train)
train_dl = DataLoader(train_ds, batch_size=bs)
model, opt = get_model()

for epoch in range(epochs):
    for xb, yb in train_dl:
        pred = model(xb)
        loss = loss_func(pred, yb)

        loss.backward()
        opt.step()
        opt.zero_grad()

print(loss_func(model(xb), yb))

train_ds = TensorDataset(x_train, y_train)
train_dl = DataLoader(train_ds, batch_size=bs, shuffle=True)

valid_ds = TensorDataset(x_valid, y_valid)
valid_dl = DataLoader(valid_ds, batch_size=bs * 2)

model, opt = get_model()

for epoch in range(epochs):
    model.train()
    for xb, yb in train_dl:
        pred = model(xb)
        loss = loss_func(pred, yb)

        loss.backward()
        opt.step()
        opt.zero_grad()

    model.eval()
    with torch.no_grad():
        valid_loss = sum(loss_func(model(xb), yb) for xb, yb in valid_dl)

    print(epoch, valid_loss / len(valid_dl))

{at_step}

train_dl, valid_dl = get_data(train_ds, valid_ds, bs)
model, opt = get_model()
fit(epochs, model, loss_func, opt, train_dl, valid_dl)

class Mnist_CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 10, kernel_size=3, stride=2, padding=1)

    def forward(self, xb):
        xb = xb.view(-1, 1, 28, 28)
        xb = F.relu(self.conv1(xb))
        xb = F.relu(self.conv2(xb))
        xb = F.relu(self.conv3(xb))
        xb = F.avg_pool2d(xb, 4)
        return xb.view(-1, xb.size(1))

lr = 0.1

model = Mnist_CNN()
opt = optim.SGD(model.parameters(), lr=lr, momentum=0.9)

fit(epochs, model, loss_func, opt, train_dl, valid_dl)

def preprocess(x):
    return x.view(-1, 1, 28, 28)

model = nn.Sequential(
    Lambda(preprocess),
    nn.Conv2d(1, 16, kernel_size=3, stride=2, padding=1),
    nn.ReLU(),
    nn.Conv2d(16, 16, kernel_size=3, stride=2, padding=1),
    nn.ReLU(),
    nn.Conv2d(16, 10, kernel_size=3, stride=2, padding=1),
    nn.ReLU(),
    nn.AvgPool2d(4),
    Lambda(lambda x: x.view(x.size(0), -1)),
)

opt = optim.SGD(model.parameters(), lr=lr, momentum=0.9)
fit(epochs, model, loss_func, opt, train_dl, valid_dl)

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

print(torch.cuda.is_available())

dev = torch.device(
    "cuda") if torch.cuda.is_available() else torch.device("cpu")

def preprocess(x, y):
    return x.view(-1, 1, 28, 28).to(dev), y.to(dev)

train_dl, valid_dl = get_data(train_ds, valid_ds, bs)
train_dl = WrappedDataLoader(train_dl, preprocess)
valid_dl = WrappedDataLoader(valid_dl, preprocess)

model.to(dev)
opt = optim.SGD(model.parameters(), lr=lr, momentum=0.9)

history = fit(epochs, model, loss_func, opt, train_dl, valid_dl)
print("last val_loss", history["val_loss"][-1])
"""


def readme_import() -> str:
    """The import line the README tells tutorial readers to use."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(
        r"put `(from trainkit import [\w, ]+)` where it\s+defined `loss_batch`", readme
    )
    assert found is not None, "the README no longer says where the import goes"
    return found.group(1)


def run_tutorial(tmp_path: Path, at_top: str, at_step: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "nn_tutorial.py"
    script.write_text(TUTORIAL.format(at_top=at_top, at_step=at_step))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )


def test_the_whole_tutorial_runs_with_the_import_where_the_readme_puts_it(tmp_path: Path) -> None:
    result = run_tutorial(tmp_path, at_top="", at_step=readme_import())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    fits = [line for line in lines if line.startswith("epoch 2/2  train_loss")]
    assert len(fits) == 5  # trainkit's fit, five times: the logistic regression, four CNNs
    # the logistic regression learns the ten templates (chance: ln 10 = 2.3)
    assert float(fits[0].split("val_loss ")[1].split()[0]) < 0.5
    assert lines[-1].startswith("last val_loss ")


def test_at_the_top_the_tutorials_own_zero_argument_fit_hides_trainkits(tmp_path: Path) -> None:
    """Why the README does not say "at the top": the tutorial's first `def fit():` replaces it."""
    result = run_tutorial(tmp_path, at_top=readme_import(), at_step="")
    assert result.returncode == 1
    assert "TypeError: fit() takes 0 positional arguments but 6 were given" in result.stderr
