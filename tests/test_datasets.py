"""FashionMNIST discovery: files the test writes in the idx format, and the real data if present."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.transforms import ToTensor

import trainkit.datasets
from trainkit import fashion_mnist

COUNTS = {"train": 6, "t10k": 4}


def write_idx(folder: Path, *, compressed: bool) -> None:
    """Write the four FashionMNIST files, with `COUNTS` images whose pixels encode their label."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in COUNTS.items():
        labels = bytes(i % 10 for i in range(n))
        images = b"".join(bytes([label * 20]) * 784 for label in labels)
        files = {
            f"{split}-images-idx3-ubyte": struct.pack(">IIII", 2051, n, 28, 28) + images,
            f"{split}-labels-idx1-ubyte": struct.pack(">II", 2049, n) + labels,
        }
        for name, data in files.items():
            if compressed:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No TRAINKIT_DATA, an empty working directory, and no Debian copy."""
    monkeypatch.delenv("TRAINKIT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainkit.datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    return tmp_path


def test_compressed_files_in_a_flat_folder_are_unpacked_into_the_cache(isolated: Path) -> None:
    write_idx(isolated / "flat", compressed=True)
    ds = fashion_mnist(train=True, root=isolated / "flat", transform=ToTensor())
    assert len(ds) == COUNTS["train"]
    image, label = ds[3]
    assert label == 3 and torch.allclose(image, torch.full((1, 28, 28), 60 / 255))
    assert (isolated / "flat" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()
    assert len(fashion_mnist(train=False, root=isolated / "flat")) == COUNTS["t10k"]


def test_torchvision_layout_is_used_in_place(isolated: Path) -> None:
    write_idx(isolated / "tv" / "FashionMNIST" / "raw", compressed=False)
    assert len(fashion_mnist(train=False, root=isolated / "tv")) == COUNTS["t10k"]


def test_search_order_env_then_data_then_debian(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    debian = isolated / "debian"
    write_idx(debian, compressed=True)
    monkeypatch.setattr(trainkit.datasets, "DEBIAN_FASHION_MNIST", debian)
    assert len(fashion_mnist(train=True, download=False)) == COUNTS["train"]
    assert (isolated / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()

    env = isolated / "env"
    write_idx(env, compressed=False)
    (env / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 4) + bytes([7] * 4))
    monkeypatch.setenv("TRAINKIT_DATA", str(env))
    assert fashion_mnist(train=False, download=False)[0][1] == 7  # $TRAINKIT_DATA came first


def test_no_data_and_no_download_says_where_it_looked(isolated: Path) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"looked in: data, .*no-debian.*apt-get install dataset-fashion-mnist.*TRAINKIT_DATA",
    ):
        fashion_mnist(train=True, download=False)


def test_failed_download_is_reported_with_its_cause(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(
        FileNotFoundError, match="download into data failed: network unreachable"
    ) as info:
        fashion_mnist(train=True)
    assert isinstance(info.value.__cause__, OSError)


def test_a_corrupt_file_is_refused_by_the_reader(isolated: Path) -> None:
    write_idx(isolated / "bad", compressed=False)
    (isolated / "bad" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises((RuntimeError, ValueError)):
        fashion_mnist(train=True, root=isolated / "bad")


def test_real_fashion_mnist_when_installed() -> None:
    try:
        test_ds = fashion_mnist(train=False, download=False, transform=ToTensor())
    except FileNotFoundError as err:
        pytest.skip(f"real FashionMNIST not on this machine: {err}")
    assert len(test_ds) == 10_000
    image, label = test_ds[0]
    assert image.shape == (1, 28, 28) and 0 <= label < 10
    assert test_ds.classes[label] == "Ankle boot"  # the first test image of FashionMNIST
