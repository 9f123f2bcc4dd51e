"""The code of "What is torch.nn really?", with its definitions replaced by trainkit imports.

Data: images the test builds (10 classes of 28x28 templates plus noise), in the tutorial's
flattened MNIST layout; MNIST itself cannot be downloaded here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.utils.data import TensorDataset

from trainkit import Lambda, WrappedDataLoader, fit, get_data

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
    train_dl = WrappedDataLoader(train_dl, preprocess_batch)  # type: ignore[assignment]
    valid_dl = WrappedDataLoader(valid_dl, preprocess_batch)  # type: ignore[assignment]
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
