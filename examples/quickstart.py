"""The PyTorch Quickstart's model, trained with trainkit's `fit` on the real FashionMNIST.

    python examples/quickstart.py [--epochs 10] [--batch-size 64] [--lr 1e-3] [--data DIR]

Same model, loss, optimizer and learning rate as the Quickstart; its plain-PyTorch loop reaches
about 71% test accuracy after 10 epochs. Checkpoints go to `runs/quickstart/checkpoints` every
200 steps and every epoch: interrupt the run (Ctrl-C) and start it again to resume where it
stopped (`--fresh` starts over). Also saved under `runs/quickstart/`: the trained weights,
the per-epoch figures as CSV (`CSVLogger`) and their curves as a PNG (`History.plot`; needs
matplotlib, `pip install 'trainkit[plot]'`, else the plot is skipped with a note).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset
from torchvision.transforms import ToTensor

from trainkit import (
    CSVLogger,
    ModelCheckpoint,
    accuracy,
    evaluate,
    fashion_mnist,
    fit,
    get_data,
    get_device,
    save_weights,
    seed_everything,
)


class NeuralNetwork(nn.Module):
    """The Quickstart's MLP: Flatten, 784-512-512-10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.linear_relu_stack(self.flatten(x))
        return logits


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--data", default=None, help="folder holding FashionMNIST")
    parser.add_argument("--out", default="runs/quickstart", help="where the results are saved")
    parser.add_argument("--smoke", action="store_true", help="a few batches of the real data")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier checkpoints")
    args = parser.parse_args(argv)

    seed_everything(0)
    train_ds = fashion_mnist(train=True, root=args.data, transform=ToTensor())
    test_ds = fashion_mnist(train=False, root=args.data, transform=ToTensor())
    if args.smoke:
        train_ds, test_ds = Subset(train_ds, range(512)), Subset(test_ds, range(256))
    print(f"FashionMNIST (real data): {len(train_ds)} training, {len(test_ds)} test images")
    train_dl, test_dl = get_data(train_ds, test_ds, args.batch_size)

    device = torch.device(args.device) if args.device else get_device()
    print(f"Using {device} device")
    model = NeuralNetwork().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()

    out = Path(args.out)
    checkpoints = ModelCheckpoint(
        out / "checkpoints", monitor="val_accuracy", mode="max", every_n_steps=200
    )
    resume = None if args.fresh or not checkpoints.last_path.is_file() else checkpoints.dirpath
    if resume is not None:
        print(f"Resuming from {checkpoints.last_path} (--fresh to start over)")
    callbacks = [checkpoints, CSVLogger(out / "history.csv")]
    history = fit(args.epochs, model, loss_fn, opt, train_dl, test_dl, metrics=[accuracy],
                  callbacks=callbacks, resume=resume)  # fmt: skip
    final = evaluate(model, loss_fn, test_dl, [accuracy])
    print(f"Test accuracy: {100 * final['accuracy']:.1f}%, avg loss: {final['loss']:.4f}")

    save_weights(out / "model_weights.pth", model)
    print(f"Weights saved to {out / 'model_weights.pth'}")
    print(history)
    print(f"Per-epoch figures saved to {out / 'history.csv'}")
    title = (
        f"Quickstart MLP on FashionMNIST, validated on the test set "
        f"(lr {args.lr}, batch {args.batch_size}, {device})"
    )
    try:
        history.plot(out / "history.png", title=title)
    except ModuleNotFoundError as err:
        print(f"No plot: {err}")
    else:
        print(f"Plot saved to {out / 'history.png'}")
    return final


if __name__ == "__main__":
    main()
