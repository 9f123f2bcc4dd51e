"""The 60-minute blitz's "Training a classifier": CIFAR-10 and its 3-channel `Net`, on trainkit.

    python examples/cifar10_classifier.py [--epochs 2] [--batch-size 4] [--lr 0.001]
        [--device DEV] [--data DIR] [--out DIR] [--fake-data] [--smoke]

The blitz's steps: CIFAR-10 normalised with `Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))`, the
3-channel LeNet `Net`, `CrossEntropyLoss`, SGD with lr 0.001 and momentum 0.9 on batches of 4,
two epochs (here with trainkit's `fit`); the weights saved and loaded into a new `Net`; its
predictions for four test images; the accuracy on the test set and per class.

CIFAR-10 is read from `--data` (default `./data`), or downloaded there by torchvision.
`--fake-data` uses `torchvision.datasets.FakeData` instead: random images of the same shape, so
the script runs offline, but there is nothing to learn (about 10% accuracy); the output says so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn, optim
from torch.utils.data import Subset
from torchvision import transforms
from torchvision.datasets import VisionDataset

from trainkit import (
    PerClassAccuracy,
    accuracy,
    evaluate,
    fit,
    get_data,
    get_device,
    load_weights,
    predict,
    save_weights,
    seed_everything,
)

classes = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class Net(nn.Module):
    """The LeNet of the blitz's part 3, for 3-channel 32x32 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        out: Tensor = self.fc3(x)
        return out


def cifar10(root: str, fake: bool) -> tuple[VisionDataset, VisionDataset]:
    """CIFAR-10's training and test sets, as tensors in [-1, 1]; or FakeData of that shape."""
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )
    if fake:
        print("FakeData (--fake-data): random images, NOT CIFAR-10; expect about 10% accuracy")
        # FakeData draws image i from seed i + random_offset: the test images start past the
        # training ones, so no test image is a training image
        return (
            torchvision.datasets.FakeData(50_000, (3, 32, 32), 10, transform),
            torchvision.datasets.FakeData(10_000, (3, 32, 32), 10, transform, random_offset=50_000),
        )
    try:
        trainset = torchvision.datasets.CIFAR10(
            root, train=True, download=True, transform=transform
        )
        testset = torchvision.datasets.CIFAR10(
            root, train=False, download=True, transform=transform
        )
    except (OSError, RuntimeError) as err:  # offline, and no copy in `root`
        raise SystemExit(
            f"CIFAR-10 is not in {root} and could not be downloaded ({err}). "
            "Run with --fake-data to try the script on random images."
        ) from err
    print(f"CIFAR-10 from {root}")
    return trainset, testset


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--data", default="data", help="folder holding (or to hold) CIFAR-10")
    parser.add_argument("--out", default="runs/cifar10", help="where the weights are saved")
    parser.add_argument("--fake-data", action="store_true", help="random images, not CIFAR-10")
    parser.add_argument("--smoke", action="store_true", help="a few batches")
    args = parser.parse_args(argv)

    seed_everything(0)
    trainset, testset = cifar10(args.data, args.fake_data)
    if args.smoke:
        trainset, testset = Subset(trainset, range(64)), Subset(testset, range(32))
    # the blitz's loaders: shuffled training batches of 4, 2 worker processes
    trainloader, testloader = get_data(
        trainset, testset, args.batch_size, num_workers=0 if args.smoke else 2
    )
    images = torch.stack([testset[i][0] for i in range(4)])
    print("GroundTruth: ", " ".join(f"{classes[testset[i][1]]:5s}" for i in range(4)))

    device = torch.device(args.device) if args.device else get_device()
    net = Net().to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    print(f"Training on {len(trainset)} images, {device}")
    history = fit(args.epochs, net, criterion, optimizer, trainloader)
    print(history)

    path = Path(args.out) / "cifar_net.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, net)
    net = Net()  # reloading is not necessary here: it shows how it is done
    load_weights(path, net)
    print(f"Weights saved to {path} and loaded into a new Net")

    predicted = predict(net, [images]).argmax(1)
    print("Predicted: ", " ".join(f"{classes[int(j)]:5s}" for j in predicted))

    per_class = PerClassAccuracy(10, class_names=classes)
    final = evaluate(net, criterion, testloader, {"accuracy": accuracy, "per_class": per_class})
    print(f"Accuracy of the network on the {len(testset)} test images: "
          f"{int(100 * final['accuracy'])} %")  # fmt: skip
    print(per_class.report())
    return final


if __name__ == "__main__":
    main()
