"""Datasets: the real FashionMNIST, found offline where it lies or downloaded by torchvision."""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchvision import datasets

__all__ = ["DEBIAN_FASHION_MNIST", "fashion_mnist"]

_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's package `dataset-fashion-mnist` puts the files."""


def fashion_mnist(
    train: bool,
    *,
    root: str | os.PathLike[str] | None = None,
    transform: Callable[[Any], Any] | None = None,
    target_transform: Callable[[Any], Any] | None = None,
    download: bool = True,
) -> datasets.FashionMNIST:
    """The real FashionMNIST through `torchvision.datasets.FashionMNIST`, found offline if possible.

    Looks in `root` if given, else in `$TRAINKIT_DATA`, `./data`, then Debian's
    `/usr/share/datasets/fashion-mnist`, for the four idx files (plain or `.gz`), either
    directly in the folder or in torchvision's `FashionMNIST/raw` layout. Compressed files are
    unpacked once into `<cache>/FashionMNIST/raw`, where `<cache>` is `root`, else
    `$TRAINKIT_DATA`, else `./data`. If nothing is found and `download` is true, torchvision
    downloads into `<cache>`. Never substitutes other data.

    Args:
        train: The 60,000 training images if true, the 10,000 test images otherwise.
        root: A folder to use instead of the search list.
        transform: Applied to each PIL image (e.g. `torchvision.transforms.ToTensor()`).
        target_transform: Applied to each label.
        download: Try torchvision's download when no local copy is found.

    Returns:
        The torchvision dataset.

    Raises:
        FileNotFoundError: no copy found (and the download failed or was not allowed); the
            message lists where it looked and how to get the data.

    Example:
        >>> from torchvision.transforms import ToTensor
        >>> test_ds = fashion_mnist(train=False, transform=ToTensor())  # doctest: +SKIP
        >>> len(test_ds)  # doctest: +SKIP
        10000
    """
    env = os.environ.get("TRAINKIT_DATA")
    cache = Path(root) if root is not None else Path(env) if env else Path("data")
    candidates = [Path(root)] if root is not None else _search_dirs(env)
    for folder in candidates:
        torchvision_raw = folder / "FashionMNIST" / "raw"
        if _has_files(torchvision_raw, compressed=False):
            return _load(folder, train, transform, target_transform)
        for raw in (torchvision_raw, folder):
            if _has_files(raw, compressed=True):
                _unpack(raw, cache / "FashionMNIST" / "raw")
                return _load(cache, train, transform, target_transform)
    looked = ", ".join(str(p) for p in candidates)
    hint = (
        f"FashionMNIST not found (looked in: {looked}). Get it with "
        "`apt-get install dataset-fashion-mnist` (Debian), or put the four idx files "
        "(train-images-idx3-ubyte.gz, ...) in a folder and set TRAINKIT_DATA to it"
    )
    if not download:
        raise FileNotFoundError(hint + ", or allow download=True.")
    try:
        datasets.FashionMNIST(str(cache), train=train, download=True)
    except Exception as err:
        raise FileNotFoundError(f"{hint}. The download into {cache} failed: {err}") from err
    return _load(cache, train, transform, target_transform)


def _search_dirs(env: str | None) -> list[Path]:
    return [*([Path(env)] if env else []), Path("data"), DEBIAN_FASHION_MNIST]


def _has_files(folder: Path, *, compressed: bool) -> bool:
    return all(
        (folder / name).is_file() or (compressed and (folder / f"{name}.gz").is_file())
        for name in _FILES
    )


def _unpack(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in _FILES:
        target = dest / name
        if target.is_file() and target.stat().st_size > 0:
            continue
        tmp = target.with_suffix(".part")
        plain = src / name
        if plain.is_file():
            shutil.copyfile(plain, tmp)
        else:
            with gzip.open(src / f"{name}.gz", "rb") as fin, tmp.open("wb") as fout:
                shutil.copyfileobj(fin, fout)
        tmp.replace(target)  # atomic: a killed unpack leaves no half file under the real name


def _load(
    root: Path,
    train: bool,
    transform: Callable[[Any], Any] | None,
    target_transform: Callable[[Any], Any] | None,
) -> datasets.FashionMNIST:
    return datasets.FashionMNIST(
        str(root), train=train, transform=transform, target_transform=target_transform
    )
