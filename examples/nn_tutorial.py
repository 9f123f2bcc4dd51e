"""The PyTorch tutorial 'What is torch.nn really?', rebuilt stage by stage, ending on trainkit.

    python examples/nn_tutorial.py                      # every stage, in the tutorial's order
    python examples/nn_tutorial.py --stage cnn gpu      # only these stages
    python examples/nn_tutorial.py --smoke              # a few batches of tiny data per stage

The tutorial refactors one training loop a step at a time; each step is a stage here, which runs
on its own: from plain tensors (`log_softmax`, `nll`, a manual update) to `nn.Parameter`,
`nn.Linear`, `optim`, `TensorDataset`, `DataLoader` and validation. From `fit` on, the
tutorial's own helpers are trainkit's: `fit`, `get_data`, `loss_batch`, `Lambda`,
`WrappedDataLoader` and `DeviceDataLoader`. Every stage ends with the validation loss and
accuracy of its model (trainkit's `evaluate`).

Data: the tutorial's `mnist.pkl.gz` in `DATA/mnist/` (default `./data`), downloaded when
missing unless `--offline`. Without it, the real FashionMNIST stands in (same 28x28 gray images
and 10 classes, but harder, so lower accuracy), split as `mnist.pkl.gz` is: 50,000 training and
10,000 validation images from the training set. The output says which data is used.
"""

from __future__ import annotations

import argparse
import gzip
import math
import pickle
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, TensorDataset

from trainkit import (
    DeviceDataLoader,
    Lambda,
    TensorDataLoader,
    WrappedDataLoader,
    accuracy,
    evaluate,
    fashion_mnist,
    fit,
    get_data,
    get_device,
    loss_batch,
    seed_everything,
)

URL = "https://github.com/pytorch/tutorials/raw/main/_static/mnist.pkl.gz"
loss_func = F.cross_entropy


@dataclass
class Config:
    """The tutorial's globals: data (flat 784-pixel rows in [0, 1]) and hyperparameters."""

    x_train: Tensor
    y_train: Tensor
    x_valid: Tensor
    y_valid: Tensor
    bs: int
    epochs: int
    lr: float | None  # None: the tutorial's rates, 0.5 (logistic regression) and 0.1 (CNNs)
    dev: torch.device  # used by the last stage only, as in the tutorial


# --- from scratch: plain tensors ------------------------------------------------------------


def scratch(c: Config) -> dict[str, float]:
    """Logistic regression from scratch: plain tensors, log_softmax, nll, a manual update."""
    x_train, y_train, bs, lr = c.x_train, c.y_train, c.bs, c.lr or 0.5
    n = len(x_train)
    weights = torch.randn(784, 10) / math.sqrt(784)  # Xavier initialisation
    weights.requires_grad_()
    bias = torch.zeros(10, requires_grad=True)

    def log_softmax(x: Tensor) -> Tensor:
        return x - x.exp().sum(-1).log().unsqueeze(-1)

    def model(xb: Tensor) -> Tensor:
        return log_softmax(xb @ weights + bias)

    def nll(input: Tensor, target: Tensor) -> Tensor:
        return -input[range(target.shape[0]), target].mean()

    xb, yb = x_train[0:bs], y_train[0:bs]
    print(f"  random weights, first batch: loss {nll(model(xb), yb):.4f}, "
          f"accuracy {accuracy(model(xb), yb):.4f}")  # fmt: skip
    for _epoch in range(c.epochs):
        for i in range((n - 1) // bs + 1):
            xb, yb = x_train[i * bs : i * bs + bs], y_train[i * bs : i * bs + bs]
            loss = nll(model(xb), yb)
            torch.autograd.backward(loss)  # loss.backward(), typed
            with torch.no_grad():  # the update itself must not be recorded for the gradient
                assert weights.grad is not None and bias.grad is not None
                weights -= weights.grad * lr
                bias -= bias.grad * lr
                weights.grad.zero_()
                bias.grad.zero_()
    print(f"  trained, last batch: loss {nll(model(xb), yb):.4f}, "
          f"accuracy {accuracy(model(xb), yb):.4f}")  # fmt: skip
    # torch.nn.functional: F.cross_entropy is log_softmax and nll in one, so the model drops
    # its log_softmax and the loss is the same
    print(f"  F.cross_entropy without log_softmax: {F.cross_entropy(xb @ weights + bias, yb):.4f}")
    return score(model, c)


# --- nn.Module, nn.Linear, optim ------------------------------------------------------------


class Mnist_Logistic(nn.Module):  # noqa: N801 - the tutorial's name
    """The tutorial's first Mnist_Logistic: its weights are `nn.Parameter`s."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.randn(784, 10) / math.sqrt(784))
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, xb: Tensor) -> Tensor:
        return xb @ self.weights + self.bias


class Mnist_Logistic_Linear(nn.Module):  # noqa: N801 - the tutorial reuses Mnist_Logistic
    """The tutorial's second Mnist_Logistic: one `nn.Linear` layer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(784, 10)

    def forward(self, xb: Tensor) -> Tensor:
        out: Tensor = self.lin(xb)
        return out


def fit_by_hand(model: nn.Module, c: Config) -> None:
    """The tutorial's first `fit()`: slices of the data, `model.parameters()` updated by hand."""
    n, bs, lr = len(c.x_train), c.bs, c.lr or 0.5
    for _epoch in range(c.epochs):
        for i in range((n - 1) // bs + 1):
            xb, yb = c.x_train[i * bs : i * bs + bs], c.y_train[i * bs : i * bs + bs]
            torch.autograd.backward(loss_func(model(xb), yb))
            with torch.no_grad():
                for p in model.parameters():
                    assert p.grad is not None
                    p.sub_(p.grad * lr)  # p -= p.grad * lr
                model.zero_grad()


def parameter(c: Config) -> dict[str, float]:
    """nn.Module and nn.Parameter: Mnist_Logistic, updated through model.parameters()."""
    model = Mnist_Logistic()
    fit_by_hand(model, c)
    return score(model, c)


def linear(c: Config) -> dict[str, float]:
    """nn.Linear: the layer holds and initialises the weights and bias."""
    model = Mnist_Logistic_Linear()
    fit_by_hand(model, c)
    return score(model, c)


def get_model(c: Config) -> tuple[nn.Module, optim.Optimizer]:
    model = Mnist_Logistic_Linear()
    return model, optim.SGD(model.parameters(), lr=c.lr or 0.5)


def optimizer(c: Config) -> dict[str, float]:
    """torch.optim: opt.step() and opt.zero_grad() replace the manual update."""
    model, opt = get_model(c)
    n, bs = len(c.x_train), c.bs
    for _epoch in range(c.epochs):
        for i in range((n - 1) // bs + 1):
            xb, yb = c.x_train[i * bs : i * bs + bs], c.y_train[i * bs : i * bs + bs]
            torch.autograd.backward(loss_func(model(xb), yb))
            opt.step()
            opt.zero_grad()
    return score(model, c)


# --- Dataset, DataLoader, validation --------------------------------------------------------


def dataset(c: Config) -> dict[str, float]:
    """TensorDataset: x and y indexed and sliced together."""
    train_ds = TensorDataset(c.x_train, c.y_train)
    model, opt = get_model(c)
    n, bs = len(train_ds), c.bs
    for _epoch in range(c.epochs):
        for i in range((n - 1) // bs + 1):
            xb, yb = train_ds[i * bs : i * bs + bs]
            torch.autograd.backward(loss_func(model(xb), yb))
            opt.step()
            opt.zero_grad()
    return score(model, c)


def dataloader(c: Config) -> dict[str, float]:
    """DataLoader: it makes the batches."""
    train_dl = DataLoader(TensorDataset(c.x_train, c.y_train), batch_size=c.bs)
    model, opt = get_model(c)
    for _epoch in range(c.epochs):
        for xb, yb in train_dl:
            torch.autograd.backward(loss_func(model(xb), yb))
            opt.step()
            opt.zero_grad()
    return score(model, c)


def validation(c: Config) -> dict[str, float]:
    """Validation: shuffled training batches, a validation loss after each epoch."""
    train_dl = DataLoader(TensorDataset(c.x_train, c.y_train), batch_size=c.bs, shuffle=True)
    valid_dl = DataLoader(TensorDataset(c.x_valid, c.y_valid), batch_size=c.bs * 2)
    model, opt = get_model(c)
    for epoch in range(c.epochs):
        model.train()
        for xb, yb in train_dl:
            torch.autograd.backward(loss_func(model(xb), yb))
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            valid_loss = sum(loss_func(model(xb), yb) for xb, yb in valid_dl)
        print(f"  {epoch} {valid_loss / len(valid_dl):.4f}")
    return score(model, c)


# --- the tutorial's fit, get_data, loss_batch: trainkit's -------------------------------------


def fit_get_data(c: Config) -> dict[str, float]:
    """fit() and get_data(): the whole training in three lines (trainkit's fit and get_data)."""
    train_ds, valid_ds = TensorDataset(c.x_train, c.y_train), TensorDataset(c.x_valid, c.y_valid)
    train_dl, valid_dl = get_data(train_ds, valid_ds, c.bs)
    model, opt = get_model(c)
    fit(c.epochs, model, loss_func, opt, train_dl, valid_dl)
    # fit steps with the tutorial's loss_batch; alone, it returns (loss, batch size)
    loss, n = loss_batch(model, loss_func, c.x_valid[: c.bs], c.y_valid[: c.bs])
    print(f"  loss_batch on the first validation batch: loss {loss:.4f} over {n} images")
    return score(model, c)


# --- CNNs -----------------------------------------------------------------------------------


class Mnist_CNN(nn.Module):  # noqa: N801 - the tutorial's name
    """Three stride-2 convolutions with ReLU, then average pooling over the last 4x4 grid."""

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


def cnn(c: Config) -> dict[str, float]:
    """Mnist_CNN, trained by the same fit: SGD with lr 0.1 and momentum 0.9."""
    train_dl, valid_dl = get_data(*datasets(c), c.bs)
    model = Mnist_CNN()
    opt = optim.SGD(model.parameters(), lr=c.lr or 0.1, momentum=0.9)
    fit(c.epochs, model, loss_func, opt, train_dl, valid_dl)
    return score(model, c)


def preprocess(x: Tensor) -> Tensor:
    return x.view(-1, 1, 28, 28)


def convolutions() -> list[nn.Module]:
    """Mnist_CNN's three convolutions, each followed by a ReLU."""
    return [
        nn.Conv2d(1, 16, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 10, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
    ]


def sequential(c: Config) -> dict[str, float]:
    """nn.Sequential: the CNN as a list of layers, with Lambda for the reshapes."""
    train_dl, valid_dl = get_data(*datasets(c), c.bs)
    model = nn.Sequential(
        Lambda(preprocess),
        *convolutions(),
        nn.AvgPool2d(4),
        Lambda(lambda x: x.view(x.size(0), -1)),
    )
    opt = optim.SGD(model.parameters(), lr=c.lr or 0.1, momentum=0.9)
    fit(c.epochs, model, loss_func, opt, train_dl, valid_dl)
    return score(model, c)


def preprocess_batch(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return x.view(-1, 1, 28, 28), y


def adaptive_cnn() -> nn.Sequential:
    """The CNN for any image size: the loader reshapes, AdaptiveAvgPool2d sets the output size."""
    return nn.Sequential(
        *convolutions(), nn.AdaptiveAvgPool2d(1), Lambda(lambda x: x.view(x.size(0), -1))
    )


def wrapped(c: Config) -> dict[str, float]:
    """WrappedDataLoader: the loader reshapes, and AdaptiveAvgPool2d replaces AvgPool2d."""
    loaders = get_data(*datasets(c), c.bs)
    train_dl, valid_dl = (WrappedDataLoader(dl, preprocess_batch) for dl in loaders)
    model = adaptive_cnn()
    opt = optim.SGD(model.parameters(), lr=c.lr or 0.1, momentum=0.9)
    fit(c.epochs, model, loss_func, opt, train_dl, valid_dl)
    return score(model, c, images=True)


def gpu(c: Config) -> dict[str, float]:
    """The GPU: the model and every batch on the device (trainkit's DeviceDataLoader)."""
    print(f"  CUDA available: {torch.cuda.is_available()}; device: {c.dev}")
    # the tutorial's preprocess(x, y) with .to(dev) in it, as two wrappers
    loaders = get_data(*datasets(c), c.bs)
    train_dl, valid_dl = (
        DeviceDataLoader(WrappedDataLoader(dl, preprocess_batch), c.dev) for dl in loaders
    )
    model = adaptive_cnn().to(c.dev)
    opt = optim.SGD(model.parameters(), lr=c.lr or 0.1, momentum=0.9)
    fit(c.epochs, model, loss_func, opt, train_dl, valid_dl)
    return score(model, c, images=True)


STAGES: dict[str, Callable[[Config], dict[str, float]]] = {
    "scratch": scratch,
    "parameter": parameter,
    "linear": linear,
    "optim": optimizer,
    "dataset": dataset,
    "dataloader": dataloader,
    "validation": validation,
    "fit": fit_get_data,
    "cnn": cnn,
    "sequential": sequential,
    "wrapped": wrapped,
    "gpu": gpu,
}


def datasets(c: Config) -> tuple[TensorDataset, TensorDataset]:
    return TensorDataset(c.x_train, c.y_train), TensorDataset(c.x_valid, c.y_valid)


def score(model: Callable[[Tensor], Tensor], c: Config, images: bool = False) -> dict[str, float]:
    """Validation loss and accuracy; a plain function is scored as a trainkit `Lambda` layer."""
    module = model if isinstance(model, nn.Module) else Lambda(model)
    x_valid = c.x_valid.view(-1, 1, 28, 28) if images else c.x_valid
    valid_dl = TensorDataLoader(x_valid, c.y_valid, batch_size=c.bs * 2)
    return evaluate(module, loss_func, valid_dl, [accuracy])


# --- data -----------------------------------------------------------------------------------


# how numpy pickles an array (numpy 1 and 2): all that mnist.pkl.gz may hold
NUMPY_ARRAYS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes, in a protocol-2 pickle written by Python 3
})  # fmt: skip


class ArraysOnly(pickle.Unpickler):
    """Unpickle numpy arrays and nothing else: a pickle from the network could run any code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in NUMPY_ARRAYS:
            raise pickle.UnpicklingError(f"mnist.pkl.gz: refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_data(folder: Path, root: str | None, offline: bool) -> tuple[Tensor, ...]:
    """(x_train, y_train, x_valid, y_valid): MNIST from mnist.pkl.gz, else FashionMNIST."""
    path = folder / "mnist" / "mnist.pkl.gz"
    if not path.is_file() and not offline:
        print(f"Downloading {URL} to {path}")
        try:
            with urllib.request.urlopen(URL, timeout=30) as response:
                content = response.read()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".part").write_bytes(content)
            path.with_suffix(".part").replace(path)
        except OSError as err:
            print(f"  the download failed: {err}")
    if path.is_file():
        with gzip.open(path, "rb") as f:
            (x_train, y_train), (x_valid, y_valid), _ = ArraysOnly(f, encoding="latin-1").load()
        print(f"Data: MNIST, the tutorial's {path}")
        return tuple(torch.tensor(a) for a in (x_train, y_train, x_valid, y_valid))
    print(
        f"Data: no {path}, so the real FashionMNIST stands in for MNIST: same 28x28 gray "
        "images and 10 classes, but a harder task (expect lower accuracy than the tutorial's)"
    )
    train = fashion_mnist(train=True, root=root, download=not offline)
    x, y = train.data.view(-1, 784).float() / 255, train.targets  # flat rows in [0, 1]
    return x[:50_000], y[:50_000], x[50_000:], y[50_000:]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES), metavar="STAGE",
                        help=f"the stages to run (default: all): {', '.join(STAGES)}")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None,
                        help="one rate for all stages (default: 0.5, CNNs 0.1)")  # fmt: skip
    parser.add_argument("--device", default=None, help="for the gpu stage (default: best there is)")
    parser.add_argument("--data", default=None, help="folder of mnist/mnist.pkl.gz (./data)")
    parser.add_argument("--offline", action="store_true", help="do not download mnist.pkl.gz")
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 512 images per stage")
    args = parser.parse_args(argv)

    x_train, y_train, x_valid, y_valid = load_data(
        Path(args.data or "data"), args.data, args.offline
    )
    n, m = (512, 256) if args.smoke else (None, None)  # smoke: a few batches
    x_train, y_train, x_valid, y_valid = x_train[:n], y_train[:n], x_valid[:m], y_valid[:m]
    print(f"{tuple(x_train.shape)} training images, {tuple(x_valid.shape)} validation images")
    dev = torch.device(args.device) if args.device else get_device()
    epochs = 1 if args.smoke else args.epochs
    c = Config(x_train, y_train, x_valid, y_valid, args.batch_size, epochs, args.lr, dev)
    results: dict[str, dict[str, float]] = {}
    for name in args.stage:
        stage = STAGES[name]
        print(f"\n[{name}] {stage.__doc__}")
        seed_everything(0)  # a stage gives the same figures alone as in the full run
        results[name] = figures = stage(c)
        print(f"  validation: loss {figures['loss']:.4f}, accuracy {figures['accuracy']:.1%}")
    print("\nstage        val_loss  val_accuracy")
    for name, figures in results.items():
        print(f"{name:<12} {figures['loss']:8.4f}  {figures['accuracy']:12.1%}")
    return results


if __name__ == "__main__":
    main()
