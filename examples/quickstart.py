"""The PyTorch Quickstart on trainkit: data, your own files, model, fit, save and load.

    python examples/quickstart.py [--epochs 10] [--batch-size 64] [--lr 1e-3] [--device DEV]
        [--data DIR] [--out DIR] [--no-shuffle] [--fresh] [--vgg16] [--smoke]

In the Quickstart's order:
- Data: the real FashionMNIST. Nine random training images titled from its `labels_map` are
  saved as `OUT/samples.png` when matplotlib is installed.
- Your own files: test images exported as PNG files with a `labels.csv` (a subset: 1,000),
  read back by `CustomImageDataset` with `OneHot` targets (the Quickstart's one-hot `Lambda`).
- The `NeuralNetwork` MLP trained with `fit`, with the Quickstart's SGD, lr 1e-3 and batches of
  64. Its plain-PyTorch loop reaches about 71% test accuracy after 10 epochs. That loop reads the
  training images in file order; `--no-shuffle` does the same and gives its figures epoch for
  epoch (docs/examples.md). Checkpoints go to `OUT/checkpoints` every 200 steps and every epoch:
  interrupt the run (Ctrl-C) and start it again to resume where it stopped (`--fresh` starts
  over). A run that has already trained the epochs asked for says so and trains nothing.
- Save and load: the weights saved to `OUT/model_weights.pth` and loaded into a new model, which
  names the class of a test image and is evaluated on the exported files. The Quickstart's
  `torch.save(model)` pickles the whole model; the demo shows that `load_weights` refuses such a
  file, as intended (unpickling runs code named in the file), and that trainkit's explicit
  `unsafe_load_pickled_model` loads it. `--vgg16` adds the Quickstart's VGG16 weights save and
  load (528 MB; `weights=None`, random weights, unless the ImageNet weights are in torchvision's
  cache).

Also in OUT: the per-epoch figures as CSV (`CSVLogger`) and their curves as `history.png`
(`History.plot`, when matplotlib is installed). OUT is `runs/quickstart` unless `--out` says
otherwise; with `--smoke` it is `runs/quickstart-smoke`, and a smoke run's checkpoints go to
`OUT/smoke-checkpoints`, so a smoke run never resumes a real run nor is resumed by one.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import models
from torchvision.transforms import ToTensor
from torchvision.transforms.v2 import ToDtype

from trainkit import (
    CheckpointError,
    CSVLogger,
    CustomImageDataset,
    ModelCheckpoint,
    OneHot,
    accuracy,
    evaluate,
    fashion_mnist,
    fit,
    get_data,
    get_device,
    load_checkpoint,
    load_weights,
    predict,
    save_weights,
    seed_everything,
    unsafe_load_pickled_model,
)

labels_map = {
    0: "T-Shirt",
    1: "Trouser",
    2: "Pullover",
    3: "Dress",
    4: "Coat",
    5: "Sandal",
    6: "Shirt",
    7: "Sneaker",
    8: "Bag",
    9: "Ankle Boot",
}


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


def save_samples(training_data: Any, path: Path) -> None:
    """The Quickstart's 3x3 grid of random training images with their labels, as a PNG file."""
    try:
        from matplotlib.figure import Figure  # optional: pip install matplotlib
    except ImportError:
        print("No sample grid: matplotlib is not installed (pip install matplotlib)")
        return
    # a generator of its own: the same nine images on every run
    generator = torch.Generator().manual_seed(0)
    figure = Figure(figsize=(8, 8))
    cols, rows = 3, 3
    for i in range(1, cols * rows + 1):
        sample_idx = int(torch.randint(len(training_data), size=(1,), generator=generator))
        img, label = training_data[sample_idx]
        ax = figure.add_subplot(rows, cols, i)
        ax.set_title(labels_map[label])
        ax.axis("off")
        ax.imshow(img.squeeze().numpy(), cmap="gray")
    figure.savefig(path)
    print(f"Nine training images saved to {path}")


def export_images(images: Any, folder: Path, n: int) -> Path:
    """Write the first `n` (PIL image, label) pairs as PNG files, and a `labels.csv` for them."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img, label = images[i]
        img.save(folder / f"{i:05d}.png")
        rows.append(f"{i:05d}.png,{label}\n")  # the Quickstart's format: file name, label
    (folder / "labels.csv").write_text("".join(rows))
    return folder / "labels.csv"


def save_whole_model(model: nn.Module, path: Path) -> None:
    """The Quickstart's `torch.save(model)`: loadable only through trainkit's explicit opt-in."""
    torch.save(model, path)  # pickles the model: loading it runs code named in the file
    print(f"The whole model pickled to {path}, as the Quickstart's torch.save(model) does")
    try:
        load_weights(path, NeuralNetwork())
    except CheckpointError as err:
        print(f"  as intended, load_weights refuses it (it reads weights only): {err}")
    model = unsafe_load_pickled_model(path)  # unpickles: only for files you made yourself
    print(f"  unsafe_load_pickled_model({path}), the explicit opt-in, loads it: "
          f"{type(model).__name__}")  # fmt: skip


def vgg16_weights(path: Path) -> None:
    """The Quickstart's VGG16: weights saved, then loaded into a new, untrained VGG16."""
    weights = models.VGG16_Weights.IMAGENET1K_V1
    cached = (Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name).is_file()
    if not cached:
        print("VGG16: the ImageNet weights are not here (no download), so weights=None")
    model = models.vgg16(weights=weights if cached else None)
    save_weights(path, model)
    model = models.vgg16()  # no weights given: an untrained model, then the saved ones
    load_weights(path, model)
    model.eval()  # dropout off before inference
    print(f"VGG16 weights saved to {path} and loaded into a new VGG16")


def epochs_done(path: Path) -> int:
    """How many epochs the run checkpointed in `path` has finished."""
    ckpt = load_checkpoint(path, model=NeuralNetwork(), map_location="cpu")
    return ckpt.epoch + 1 if ckpt.epoch_complete else ckpt.epoch


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the Quickstart; returns the test figures (empty when there was nothing to train)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--data", default=None, help="folder holding FashionMNIST")
    parser.add_argument("--out", default=None,
                        help="where files are written (default: runs/quickstart, "
                             "runs/quickstart-smoke with --smoke)")  # fmt: skip
    parser.add_argument("--no-shuffle", action="store_true", help="train in file order")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier checkpoints")
    parser.add_argument("--vgg16", action="store_true", help="also save and load VGG16 weights")
    parser.add_argument("--smoke", action="store_true", help="a few batches of the real data")
    args = parser.parse_args(argv)
    out = Path(args.out or ("runs/quickstart-smoke" if args.smoke else "runs/quickstart"))
    out.mkdir(parents=True, exist_ok=True)

    # a smoke run's checkpoints apart from a real run's: neither ever resumes the other
    folder = out / ("smoke-checkpoints" if args.smoke else "checkpoints")
    checkpoints = ModelCheckpoint(folder, monitor="val_accuracy", mode="max", every_n_steps=200)
    resume = None if args.fresh or not checkpoints.last_path.is_file() else checkpoints.dirpath
    if resume is not None:
        done = epochs_done(checkpoints.last_path)
        if done >= args.epochs:
            print(f"{checkpoints.last_path}: already trained {done} epochs (>= {args.epochs} "
                  "asked); nothing to do; --fresh to start over")  # fmt: skip
            return {}
        print(f"Resuming from {checkpoints.last_path} after {done} of {args.epochs} epochs "
              "(--fresh to start over)")  # fmt: skip

    # Data
    train_ds = fashion_mnist(train=True, root=args.data, transform=ToTensor())
    test_ds = fashion_mnist(train=False, root=args.data, transform=ToTensor())
    save_samples(train_ds, out / "samples.png")

    # Your own files: CustomImageDataset over exported images, one-hot targets
    n_files = 64 if args.smoke else 1000
    labels_csv = export_images(fashion_mnist(train=False, root=args.data), out / "images", n_files)
    files_ds = CustomImageDataset(labels_csv, out / "images", ToDtype(torch.float32, scale=True),
                                  OneHot(10), mode="gray")  # fmt: skip
    files_dl = DataLoader(files_ds, batch_size=args.batch_size)
    features, labels = next(iter(files_dl))
    print(f"{len(files_ds)} test images exported to {out / 'images'} and read back: "
          f"batches of {tuple(features.shape)}, one-hot labels {tuple(labels.shape)}")  # fmt: skip

    # Model and training
    if args.smoke:
        train_ds, test_ds = Subset(train_ds, range(512)), Subset(test_ds, range(256))
    print(f"FashionMNIST (real data): {len(train_ds)} training, {len(test_ds)} test images")
    train_dl, test_dl = get_data(train_ds, test_ds, args.batch_size)
    if args.no_shuffle:  # the Quickstart's loop: DataLoader(training_data, batch_size=64)
        train_dl = DataLoader(train_ds, batch_size=args.batch_size)

    device = torch.device(args.device) if args.device else get_device()
    print(f"Using {device} device")
    # seeded here, as the Quickstart's run is seeded before it builds its model: the same
    # initial weights (iterating a DataLoader, above, draws from the global generator)
    seed_everything(0)
    model = NeuralNetwork().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()

    callbacks = [checkpoints, CSVLogger(out / "history.csv")]
    history = fit(args.epochs, model, loss_fn, opt, train_dl, test_dl, metrics=[accuracy],
                  callbacks=callbacks, resume=resume)  # fmt: skip
    print(history)
    print(f"Per-epoch figures saved to {out / 'history.csv'}")
    try:
        history.plot(out / "history.png", title=f"Quickstart MLP on FashionMNIST (lr {args.lr})")
    except ModuleNotFoundError as err:
        print(f"No plot: {err}")
    else:
        print(f"Plot saved to {out / 'history.png'}")
    final = evaluate(model, loss_fn, test_dl, [accuracy])
    print(f"Test accuracy: {100 * final['accuracy']:.1f}%, avg loss: {final['loss']:.4f}")

    # Save and load
    save_weights(out / "model_weights.pth", model)
    print(f"Weights saved to {out / 'model_weights.pth'}")
    model = NeuralNetwork()
    load_weights(out / "model_weights.pth", model)
    model.eval()
    x, y = test_ds[0]
    pred = predict(model, [x.unsqueeze(0)])  # a batch of one image
    print(f'Predicted: "{labels_map[int(pred[0].argmax(0))]}", Actual: "{labels_map[y]}"')
    on_files = evaluate(model, loss_fn, files_dl, [accuracy])
    print(f"The loaded model on the {len(files_ds)} exported files, one-hot targets: accuracy "
          f"{100 * on_files['accuracy']:.1f}%, avg loss {on_files['loss']:.4f}")  # fmt: skip
    save_whole_model(model, out / "model.pth")
    if args.vgg16:
        vgg16_weights(out / "vgg16_weights.pth")
    return {**final, "files_accuracy": on_files["accuracy"], "files_loss": on_files["loss"]}


if __name__ == "__main__":
    main()
