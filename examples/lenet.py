"""LeNet from the 60-minute blitz's "Neural networks" (5x5 and 3x3 variants), trained with trainkit.

    python examples/lenet.py [--variant 5x5|3x3] [--epochs 2] [--batch-size 64] [--lr 0.01]
        [--momentum 0.9] [--device DEV] [--data DIR] [--smoke]

First the tutorial's walk-through on one random 1x32x32 image: the network and its parameters,
a forward pass, a backward pass from a random gradient, `MSELoss` against a dummy target and the
`grad_fn` graph behind it, conv1's bias gradient before and after `backward`, then one update by
hand and one with `torch.optim`. Then, as the tutorial suggests for MNIST, the network is
trained with `fit` on the real FashionMNIST resized to 32x32, with cross-entropy (the blitz's
classification loss) and SGD at the tutorial's lr 0.01, with momentum 0.9 as in the blitz's
part 4. `--variant` picks the 5x5 network (LeCun's) or the blitz's 3x3 one.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.utils.data import Subset
from torchvision import transforms

from trainkit import accuracy, evaluate, fashion_mnist, fit, get_data, get_device, seed_everything


class Net(nn.Module):
    """LeNet with 5x5 convolutions: C1, S2, C3, S4, F5, F6, OUTPUT."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)  # 1 input channel, 6 output channels, 5x5 kernel
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)  # 5*5 from the image dimension
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, input: Tensor) -> Tensor:
        c1 = F.relu(self.conv1(input))  # (N, 6, 28, 28)
        s2 = F.max_pool2d(c1, (2, 2))  # (N, 6, 14, 14)
        c3 = F.relu(self.conv2(s2))  # (N, 16, 10, 10)
        s4 = F.max_pool2d(c3, 2)  # (N, 16, 5, 5)
        s4 = torch.flatten(s4, 1)  # (N, 400)
        f5 = F.relu(self.fc1(s4))  # (N, 120)
        f6 = F.relu(self.fc2(f5))  # (N, 84)
        output: Tensor = self.fc3(f6)  # (N, 10)
        return output


class Net3x3(nn.Module):
    """The blitz's LeNet: 3x3 convolutions, flattened with `num_flat_features`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16 * 6 * 6, 120)  # 6*6 from the image dimension
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))  # max pooling over a 2x2 window
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # a square window: one number will do
        x = x.view(-1, self.num_flat_features(x))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        out: Tensor = self.fc3(x)
        return out

    def num_flat_features(self, x: Tensor) -> int:
        size = x.size()[1:]  # all dimensions except the batch dimension
        num_features = 1
        for s in size:
            num_features *= s
        return num_features


def walk_through(net: Net | Net3x3) -> None:
    """The tutorial's tour of one network: parameters, forward, backward, loss, update."""
    print(net)
    params = list(net.parameters())
    print(f"{len(params)} parameter tensors; conv1's weight: {params[0].size()}")

    input = torch.randn(1, 1, 32, 32)  # nn layers take mini-batches: 1 image of 1x32x32
    out = net(input)
    print(f"output for a random image: {out}")
    net.zero_grad()
    torch.autograd.backward(out, torch.randn(1, 10))  # out.backward(torch.randn(1, 10))

    output = net(input)
    target = torch.randn(10).view(1, -1)  # a dummy target, the same shape as the output
    criterion = nn.MSELoss()
    loss = criterion(output, target)
    print(f"MSE loss: {loss!r}")
    print(" -> ".join(reversed(backward_graph(loss))))  # input -> conv2d -> relu -> ... -> loss

    net.zero_grad()  # zeroes the gradient buffers of all parameters
    bias = net.conv1.bias
    assert bias is not None
    print(f"conv1.bias.grad before backward: {bias.grad}")
    torch.autograd.backward(loss)
    print(f"conv1.bias.grad after backward: {bias.grad}")

    learning_rate = 0.01
    with torch.no_grad():  # weight = weight - learning_rate * gradient
        for f in net.parameters():
            assert f.grad is not None
            f.sub_(f.grad * learning_rate)
    print(f"MSE loss after one update by hand: {criterion(net(input), target):.4f}")

    optimizer = optim.SGD(net.parameters(), lr=0.01)
    optimizer.zero_grad()  # zero the gradient buffers
    loss = criterion(net(input), target)
    torch.autograd.backward(loss)
    optimizer.step()  # does the update
    print(f"MSE loss after one optimizer.step(): {criterion(net(input), target):.4f}")


def backward_graph(loss: Tensor) -> list[str]:
    """The `grad_fn` nodes from the loss back to the input (the parameters' leaves left out)."""
    names, node = [], loss.grad_fn
    while node is not None:
        names.append(node.name())
        inputs = [fn for fn, _ in node.next_functions if fn is not None]
        node = next((fn for fn in inputs if "AccumulateGrad" not in fn.name()), None)
    return names


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["5x5", "3x3"], default="5x5")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--data", default=None, help="folder holding FashionMNIST")
    parser.add_argument("--smoke", action="store_true", help="a few batches of the real data")
    args = parser.parse_args(argv)

    seed_everything(0)
    for net in (Net(), Net3x3()):
        print(f"\n--- {type(net).__name__}: the tutorial's walk-through ---")
        walk_through(net)

    print("\n--- training on FashionMNIST resized to 32x32 (the tutorial's advice for MNIST) ---")
    to_32 = transforms.Compose([transforms.Resize(32), transforms.ToTensor()])
    train_ds = fashion_mnist(train=True, root=args.data, transform=to_32)
    test_ds = fashion_mnist(train=False, root=args.data, transform=to_32)
    if args.smoke:
        train_ds, test_ds = Subset(train_ds, range(512)), Subset(test_ds, range(256))
    print(f"FashionMNIST (real data): {len(train_ds)} training, {len(test_ds)} test images")
    train_dl, test_dl = get_data(train_ds, test_ds, args.batch_size)

    device = torch.device(args.device) if args.device else get_device()
    model = (Net() if args.variant == "5x5" else Net3x3()).to(device)
    opt = optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    loss_fn = nn.CrossEntropyLoss()
    print(f"{type(model).__name__}, SGD lr {args.lr} momentum {args.momentum}, on {device}")
    history = fit(args.epochs, model, loss_fn, opt, train_dl, test_dl, metrics=[accuracy])
    print(history)
    final = evaluate(model, loss_fn, test_dl, [accuracy])
    print(f"Test accuracy: {100 * final['accuracy']:.1f}%, avg loss: {final['loss']:.4f}")
    return final


if __name__ == "__main__":
    main()
