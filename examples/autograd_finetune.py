"""The 60-minute blitz's "A gentle introduction to torch.autograd": resnet18 frozen, a new `fc`.

    python examples/autograd_finetune.py [--epochs 1] [--batch-size 64] [--lr 1e-2]
        [--image-size 32] [--train-size N] [--device DEV] [--data DIR] [--weights FILE]
        [--download] [--fake-data] [--smoke]

Part 2's steps: one training step of resnet18 on a random image; the gradients autograd
computes for Q = 3a^3 - b^2; which results require gradients; then fine-tuning: every parameter
frozen, `fc` replaced by `nn.Linear(512, 10)`, and SGD (lr 1e-2, momentum 0.9) given all the
parameters, as the tutorial does: its point is that only the ones that require gradients (`fc`)
are updated, although the optimizer holds them all. The blitz stops there; here `fit` trains
that `fc` on the real FashionMNIST (10 classes; the gray images repeated on 3 channels, resized,
normalised as ImageNet), and the script checks that every frozen parameter is bit for bit what
it was. `--fake-data` uses random images
instead (offline, without FashionMNIST).

The ImageNet weights are used when they are on this machine: torchvision's cache, or `--weights
FILE` (a resnet18 state dict). Otherwise the network starts from random weights, and says so;
`--download` lets torchvision fetch the ImageNet weights. Frozen random weights still give
features a linear `fc` can learn from, but far weaker ones than ImageNet's.

Note: freezing stops the optimizer, not BatchNorm: in `model.train()` its running statistics
still follow the new data, as in the blitz. Those are buffers, not parameters.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision
from torch import Tensor, nn, optim
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.models import ResNet, ResNet18_Weights

from trainkit import (
    History,
    accuracy,
    fashion_mnist,
    fit,
    get_data,
    get_device,
    load_weights,
    seed_everything,
)

Images = Dataset[tuple[Tensor, int]]


def resnet18(weights_file: str | None, download: bool) -> ResNet:
    """resnet18 with the ImageNet weights if they are here (or may be downloaded), else random."""
    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if weights_file is not None:
        print(f"ImageNet weights from {weights_file}")
        return load_weights(weights_file, torchvision.models.resnet18())
    if cached.is_file() or download:
        print(f"ImageNet weights ({weights})")
        return torchvision.models.resnet18(weights=weights)
    print(f"NOTE: no ImageNet weights in {cached} (and no download without --download): "
          "resnet18 starts from RANDOM weights")  # fmt: skip
    return torchvision.models.resnet18(weights=None)


def autograd_steps(model: nn.Module) -> None:
    """Part 2's first cells: one step on random data, Q's gradients, requires_grad."""
    data = torch.rand(1, 3, 64, 64)  # one image, 3 channels, 64x64
    labels = torch.rand(1, 1000)
    prediction = model(data)  # forward pass
    loss = (prediction - labels).sum()
    torch.autograd.backward(loss)  # backward pass: loss.backward()
    optim.SGD(model.parameters(), lr=1e-2, momentum=0.9).step()  # gradient descent
    print(f"one step on a random image: loss {loss.item():.2f}")

    a = torch.tensor([2.0, 3.0], requires_grad=True)
    b = torch.tensor([6.0, 4.0], requires_grad=True)
    Q = 3 * a**3 - b**2  # noqa: N806 - the blitz's name
    torch.autograd.backward(Q, torch.tensor([1.0, 1.0]))  # Q.backward(gradient=external_grad)
    assert a.grad is not None and b.grad is not None
    print(f"Q = 3a^3 - b^2: 9a^2 == a.grad {9 * a**2 == a.grad}, -2b == b.grad {-2 * b == b.grad}")

    x, y = torch.rand(5, 5), torch.rand(5, 5)
    z = torch.rand((5, 5), requires_grad=True)
    print(f"x + y requires grad: {(x + y).requires_grad}; x + z: {(x + z).requires_grad}")


def freeze(model: ResNet) -> ResNet:
    """The blitz's fine-tuning model: every parameter frozen, then a new 10-class `fc`."""
    for param in model.parameters():  # freeze all the parameters in the network
        param.requires_grad = False
    model.fc = nn.Linear(512, 10)  # a new layer: its parameters require gradients
    return model


def data(args: argparse.Namespace) -> tuple[Images, Images]:
    """FashionMNIST (or random images) as resnet18 takes them: 3 channels, normalised."""
    imagenet = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    if args.fake_data:
        print("FakeData: random images, nothing to learn (expect about 10% accuracy)")
        to_tensor = transforms.Compose([transforms.ToTensor(), imagenet])
        size = (3, args.image_size, args.image_size)
        train = torchvision.datasets.FakeData(2048, size, 10, to_tensor, random_offset=0)
        test = torchvision.datasets.FakeData(512, size, 10, to_tensor, random_offset=2048)
    else:
        to_3_channels = transforms.Compose([
            transforms.Resize(args.image_size),
            transforms.Grayscale(num_output_channels=3),
            transforms.ToTensor(),
            imagenet,
        ])  # fmt: skip
        train = fashion_mnist(train=True, root=args.data, transform=to_3_channels)
        test = fashion_mnist(train=False, root=args.data, transform=to_3_channels)
    n = 256 if args.smoke else args.train_size
    if n is not None:
        train, test = Subset(train, range(n)), Subset(test, range(min(n // 2, len(test))))
    print(f"{len(train)} training, {len(test)} test images, {args.image_size}x{args.image_size}")
    return train, test


class Finetuned(NamedTuple):
    """What `main` returns: the model, its parameters before training, History, optimizer."""

    model: nn.Module
    before: dict[str, Tensor]  # every parameter before training, cloned
    history: History
    optimizer: optim.Optimizer


def main(argv: list[str] | None = None) -> Finetuned:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--image-size", type=int, default=32, help="resize images to this")
    parser.add_argument("--train-size", type=int, default=None, help="use this many images")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--data", default=None, help="folder holding FashionMNIST")
    parser.add_argument("--weights", default=None, help="a file of resnet18's ImageNet weights")
    parser.add_argument("--download", action="store_true", help="download the ImageNet weights")
    parser.add_argument("--fake-data", action="store_true", help="random images, not FashionMNIST")
    parser.add_argument("--smoke", action="store_true", help="a few batches")
    args = parser.parse_args(argv)

    seed_everything(0)
    pretrained = resnet18(args.weights, args.download)
    autograd_steps(copy.deepcopy(pretrained))  # a copy: this step changes the weights

    print("\n--- fine-tuning: resnet18 frozen, a new fc trained ---")
    device = torch.device(args.device) if args.device else get_device()
    model = freeze(pretrained).to(device)
    # every parameter registered, as in the tutorial: the frozen ones get no gradient, so the
    # optimizer leaves them as they are (the check after training shows it)
    optimizer = optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    registered = sum(len(group["params"]) for group in optimizer.param_groups)
    print(f"trainable parameters: {trainable}; the optimizer (SGD lr {args.lr} momentum 0.9) "
          f"holds all {registered}")  # fmt: skip
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    train_dl, test_dl = get_data(*data(args), args.batch_size)
    history = fit(args.epochs, model, nn.CrossEntropyLoss(), optimizer, train_dl, test_dl,
                  metrics=[accuracy])  # fmt: skip
    print(history)

    after = dict(model.named_parameters())
    frozen = [name for name in before if not name.startswith("fc.")]
    unchanged = [name for name in frozen if torch.equal(before[name], after[name])]
    fc_changed = not all(torch.equal(before[n], after[n]) for n in ("fc.weight", "fc.bias"))
    print(f"frozen parameters unchanged, bit for bit: {len(unchanged)} of {len(frozen)}; "
          f"fc changed: {fc_changed}")  # fmt: skip
    return Finetuned(model, before, history, optimizer)


if __name__ == "__main__":
    main()
