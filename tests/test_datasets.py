"""FashionMNIST discovery (files the test writes in the idx format, and the real data if
present); `CustomImageDataset` on real PNG, JPEG, GIF and broken files the tests write."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.io import encode_jpeg, encode_png
from torchvision.transforms import ToTensor
from torchvision.transforms.v2 import ToDtype

import trainkit.datasets
from conftest import make_images
from trainkit import evaluate, fashion_mnist, fit
from trainkit.datasets import CustomImageDataset, DatasetError
from trainkit.transforms import OneHot

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


# --- CustomImageDataset -------------------------------------------------------------------------


def png(image: Tensor) -> bytes:
    return bytes(encode_png(image).numpy())


def jpeg(image: Tensor) -> bytes:
    return bytes(encode_jpeg(image, quality=95).numpy())


def pil_bytes(array: np.ndarray, fmt: str, **kwargs: object) -> bytes:
    """Formats and colour types torchvision cannot write (RGBA, palette, 16-bit, GIF, BMP)."""
    path = Path(f"pil.{fmt}")
    Image.fromarray(array).save(path, **kwargs)  # type: ignore[arg-type]
    data = path.read_bytes()
    path.unlink()
    return data


def pixels(channels: int, seed: int, size: tuple[int, int] = (6, 5)) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, *size), generator=g, dtype=torch.uint8)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with an empty `images/` folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    return tmp_path


def write(folder: Path, files: dict[str, bytes], csv: str) -> Path:
    """Write `files` under `folder/images` and `csv` as `folder/labels.csv`; return the CSV."""
    for name, data in files.items():
        (folder / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "images" / name).write_bytes(data)
    (folder / "labels.csv").write_text(csv)
    return folder / "labels.csv"


def dataset(folder: Path, **kwargs: object) -> CustomImageDataset[Any, Any]:
    return CustomImageDataset(folder / "labels.csv", folder / "images", **kwargs)  # type: ignore[arg-type]


def test_every_row_of_the_tutorials_header_less_csv_is_read(folder: Path) -> None:
    images = [pixels(1, seed) for seed in range(3)]
    # The tutorial's labels.csv: no header, a space after the comma.
    write(
        folder,
        {f"{i}.png": png(im) for i, im in enumerate(images)},
        "0.png, 9\n1.png, 0\n2.png, 3\n",
    )
    ds = dataset(folder)
    assert len(ds) == 3 and not ds.header  # pd.read_csv would have made "0.png, 9" the header
    assert ds.targets == [9, 0, 3] and ds.classes is None and ds.class_to_idx is None
    assert ds.samples == [("0.png", 9), ("1.png", 0), ("2.png", 3)]
    for i, image in enumerate(images):
        got, label = ds[i]
        assert torch.equal(got, image) and label == ds.targets[i]
        assert type(label) is int


def test_a_header_row_is_recognised_and_can_be_stated(folder: Path) -> None:
    files = {"a.png": png(pixels(1, 0)), "b.png": png(pixels(1, 1))}
    write(folder, files, "file_name,label\na.png,1\nb.png,0\n")
    ds = dataset(folder)
    assert ds.header and ds.targets == [1, 0]
    with pytest.raises(DatasetError, match=r"labels.csv, line 1: label 'label' is not an integer"):
        dataset(folder, header=False)

    write(folder, files, "a.png,1\nb.png,0\n")
    assert dataset(folder, header=True).samples == [("b.png", 0)]  # as stated: no guessing

    # Whether a file exists plays no part (tests/test_dataset_limits.py has the other cases).
    write(folder, {}, "img0,3\na.png,5\n")
    ds = dataset(folder)
    assert not ds.header and ds.targets == [3, 5]


def test_class_names_are_numbered_as_image_folder_numbers_folders(folder: Path) -> None:
    names = ["dog", "cat", "bird", "cat", "ant_eater", "Zebra"]
    files, rows = {}, []
    for i, name in enumerate(names):
        files[f"{name}/{i}.png"] = png(pixels(3, i))
        rows.append(f"{name}/{i}.png,{name}")
    write(folder, files, "\n".join(["path,class", *rows]))
    ds = dataset(folder, header=True)  # over class names, a header must be stated
    reference = ImageFolder(str(folder / "images"))
    assert ds.classes == reference.classes == ["Zebra", "ant_eater", "bird", "cat", "dog"]
    assert ds.class_to_idx == reference.class_to_idx
    assert sorted(ds.targets) == sorted(reference.targets)
    assert [ds.classes[t] for t in ds.targets] == names


def test_given_classes_fix_the_numbering_for_every_split(folder: Path) -> None:
    classes = ["zero", "one", "two"]
    files = {f"{i}.png": png(pixels(1, i)) for i in range(3)}
    write(folder, files, "0.png,two\n1.png,1\n2.png,two\n")
    ds = dataset(folder, classes=classes)
    assert ds.targets == [2, 1, 2] and ds.classes == classes
    assert ds.class_to_idx == {"zero": 0, "one": 1, "two": 2}

    write(folder, files, "0.png,two\n1.png,three\n2.png,3\n")
    with pytest.raises(DatasetError) as info:
        dataset(folder, classes=classes)
    assert info.value.problems == (
        f"{folder / 'labels.csv'}, line 2: label 'three' is neither an integer in [0, 3) nor one "
        "of the classes ['zero', 'one', 'two']",
        f"{folder / 'labels.csv'}, line 3: label '3' is neither an integer in [0, 3) nor one "
        "of the classes ['zero', 'one', 'two']",
    )


def test_modes_give_one_shape_to_gray_rgb_and_rgba_files(folder: Path) -> None:
    gray, rgb = pixels(1, 0), pixels(3, 1)
    rgba = np.random.default_rng(0).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    gray_alpha = np.random.default_rng(1).integers(0, 256, (6, 5, 2), dtype=np.uint8)
    files = {
        "gray.png": png(gray),
        "rgb.png": png(rgb),
        "rgba.png": pil_bytes(rgba, "png"),
        "gray_alpha.png": pil_bytes(gray_alpha, "png"),
        "gray.jpg": jpeg(gray),
        "rgb.jpeg": jpeg(rgb),
        "rgb.gif": pil_bytes(rgb.permute(1, 2, 0).numpy(), "gif"),
        "rgb.webp": pil_bytes(rgb.permute(1, 2, 0).numpy(), "webp", lossless=True),
    }
    write(folder, files, "".join(f"{name},0\n" for name in files))
    stored = dataset(folder)
    assert [stored[i][0].shape[0] for i in range(len(files))] == [1, 3, 4, 2, 1, 3, 3, 3]
    for mode, channels in (("rgb", 3), ("gray", 1)):
        ds = dataset(folder, mode=mode)
        for i in range(len(files)):
            image = ds[i][0]
            assert image.shape == (channels, 6, 5) and image.dtype == torch.uint8
    as_rgb = dataset(folder, mode="rgb")
    assert torch.equal(as_rgb[0][0], gray.expand(3, -1, -1))
    assert torch.equal(as_rgb[1][0], rgb)
    assert torch.equal(as_rgb[2][0], torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))
    assert torch.equal(as_rgb[7][0], rgb)  # lossless WebP


def test_palette_and_16_bit_pngs_decode_to_their_colours_in_uint8(folder: Path) -> None:
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 99, 199]]], dtype=np.uint8)
    palette = Image.fromarray(colours).convert("P")
    palette.save(folder / "images" / "palette.png")
    deep = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(deep).save(folder / "images" / "deep.png")
    (folder / "labels.csv").write_text("palette.png,0\ndeep.png,1\n")
    ds = dataset(folder)
    expected = torch.from_numpy(np.array(palette.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(ds[0][0], expected)  # decode_image would return the palette indices
    assert ds[1][0].dtype == torch.uint8
    assert ds[1][0].tolist() == [[[0, 1, 255, 128]]]


def test_loaders_batch_it_and_workers_receive_it_by_pickle(folder: Path) -> None:
    files = {f"{i}.png": png(pixels(3, i, (8, 8))) for i in range(12)}
    write(folder, files, "".join(f"{i}.png,{i % 10}\n" for i in range(12)))
    ds = dataset(folder, target_transform=OneHot(10), mode="gray")
    copy = pickle.loads(pickle.dumps(ds))
    assert torch.equal(copy[5][0], ds[5][0]) and torch.equal(copy[5][1], ds[5][1])
    batches = list(DataLoader(ds, batch_size=5, num_workers=2))
    assert [tuple(xb.shape) for xb, _ in batches] == [(5, 1, 8, 8), (5, 1, 8, 8), (2, 1, 8, 8)]
    targets = torch.cat([yb for _, yb in batches])
    assert torch.equal(targets.argmax(dim=1), torch.arange(12) % 10)


# Bad input: each case is the file the user would have, and the message names where it is.


def test_a_missing_or_unreadable_csv_is_named(folder: Path) -> None:
    with pytest.raises(DatasetError, match=r"nothing.csv: annotations file not found"):
        CustomImageDataset(folder / "nothing.csv", folder / "images")
    with pytest.raises(
        DatasetError, match=r"images: the annotations file is a directory, not a regular file"
    ):
        CustomImageDataset(folder / "images", folder / "images")
    (folder / "labels.csv").write_text("a.png,0\n")
    with pytest.raises(
        DatasetError, match=r"pictures: the image folder \(img_dir\) does not exist"
    ):
        CustomImageDataset(folder / "labels.csv", folder / "pictures")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"labels.csv: empty; expected one path,label row per image"),
        (b"\n \n,\n", r"labels.csv: empty"),
        (b"filename,label\n", r"labels.csv: only a header row \(filename,label\), no images"),
        (b"a.png,0\nb.png,1\n\xe9t\xe9.png,2\n", r"labels.csv, line 3: not UTF-8 text"),
        (b'a.png,0\nb.png,"1\nc.png,2\n', r"labels.csv, line 2: not valid CSV: unexpected end"),
    ],
)
def test_a_csv_without_usable_rows_is_refused(folder: Path, content: bytes, message: str) -> None:
    (folder / "labels.csv").write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        dataset(folder)


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ("a.png;0", r"line 2: 1 column \('a.png;0'\); expected path,label separated by a comma"),
        ("a.png,", r"line 2: empty label"),
        (",3", r"line 2: empty path"),
        ("a.png,cat", r"line 2: label 'cat' is not an integer, but most labels are integers"),
        ("a.png,-1", r"line 2: label -1 is negative; class indices start at 0"),
        ('"a\0.png",1', r"line 2: path 'a\\x00.png' holds a NUL character"),
    ],
)
def test_a_bad_row_is_named_by_line(folder: Path, rows: str, problem: str) -> None:
    write(folder, {}, f"x.png,1\n{rows}\ny.png,2\n")
    with pytest.raises(DatasetError, match=r"labels.csv, " + problem):
        dataset(folder)


def test_every_bad_row_is_reported_at_once(folder: Path) -> None:
    write(folder, {}, "a.png,1.5\nb.png,2.0\nc.png\n../d.png,0.5\n")
    with pytest.raises(DatasetError) as info:
        dataset(folder)
    message = str(info.value)
    assert message.startswith(f"4 problems in {folder / 'labels.csv'}:\n")
    assert [p.split(": ", 1)[0].rsplit(" ", 1)[-1] for p in info.value.problems] == list("1234")
    assert "label '1.5' is a number but not an integer" in info.value.problems[0]
    assert "'../d.png' leads outside the image folder" in info.value.problems[3]


def test_integers_among_names_are_reported_as_the_odd_ones(folder: Path) -> None:
    write(folder, {}, "a.png,cat\nb.png,dog\nc.png,7\n")
    with pytest.raises(DatasetError, match=r"line 3: label '7' is an integer, but most labels"):
        dataset(folder)


@pytest.mark.parametrize("path", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_paths_that_leave_img_dir_are_refused(folder: Path, path: str) -> None:
    (folder / "outside.png").write_bytes(png(pixels(1, 0)))
    path = str(folder / "outside.png") if path == "ABSOLUTE" else path
    write(folder, {"in.png": png(pixels(1, 1))}, f"in.png,0\n{path},1\n")
    with pytest.raises(DatasetError, match=r"line 2: path .* leads outside the image folder"):
        dataset(folder)


def test_symlinks_pointing_outside_are_refused_and_not_read(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (folder / "outside").mkdir()
    (folder / "outside" / "secret.png").write_bytes(png(pixels(1, 0)))
    images = folder / "images"
    write(folder, {"real.png": png(pixels(1, 1))}, "link.png,0\nlinked_dir/secret.png,1\n")
    os.symlink(folder / "outside" / "secret.png", images / "link.png")
    os.symlink(folder / "outside", images / "linked_dir")
    (folder / "labels.csv").write_text(
        "real.png,2\ninner.png,3\nlink.png,0\nlinked_dir/secret.png,1\n"
    )
    os.symlink("real.png", images / "inner.png")  # a symlink inside img_dir is fine
    ds = dataset(folder)
    assert torch.equal(ds[1][0], ds[0][0])

    read: list[Path] = []
    real_read_bytes = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        read.append(path)
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    for idx, line in ((2, 3), (3, 4)):
        with pytest.raises(
            DatasetError, match=rf"labels.csv, line {line}\): a symlink leads outside"
        ):
            ds[idx]
    assert read == []

    # img_dir may itself be a symlink: containment is checked against its real location.
    os.symlink(images, folder / "alias")
    assert len(CustomImageDataset(folder / "labels.csv", folder / "alias")[0][0]) == 1


def corrupt(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 8]) + data[middle + 8 :]


def png_with_bad_filter(image: Tensor) -> bytes:
    """A PNG whose checksums are all valid but whose first row has filter type 9 (0-4 exist)."""
    data, pos, chunks = png(image), 8, []
    while pos < len(data):
        (size,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + size]))
        pos += 12 + size
    rows = bytearray(zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")))
    rows[0] = 9
    chunks = [chunks[0], (b"IDAT", zlib.compress(bytes(rows))), chunks[-1]]
    return data[:8] + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        for kind, body in chunks
    )


IMAGE = pixels(3, 7, (16, 16))


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (None, "file not found"),
        (b"", "empty file"),
        (png(IMAGE)[:-40], "corrupt or truncated PNG"),
        (jpeg(IMAGE)[:-60], "corrupt or truncated JPEG: Image is incomplete or truncated"),
        # torchvision's PNG decoder ends the process with a segmentation fault on these two
        (corrupt(png(IMAGE)), "corrupt or truncated PNG"),
        (png_with_bad_filter(IMAGE), "corrupt or truncated PNG"),
        (b"path,label\nnot,an image\n", r"unsupported image format \(starts with b'path,lab'\); "),
        (b"BM" + bytes(60), "unsupported image format"),
        ("animation", "an animation of 3 frames; CustomImageDataset reads still images"),
    ],
    ids=[
        "missing",
        "empty",
        "truncated-png",
        "truncated-jpeg",
        "corrupt-png",
        "bad-filter-png",
        "text",
        "bmp",
        "gif",
    ],
)
def test_a_bad_image_is_named_with_its_csv_line(
    folder: Path, data: bytes | str | None, problem: str
) -> None:
    if data == "animation":
        frames = [Image.fromarray(np.full((4, 4, 3), v, dtype=np.uint8)) for v in (0, 99, 255)]
        frames[0].save(
            folder / "images" / "bad.img", format="GIF", save_all=True, append_images=frames[1:]
        )
    elif isinstance(data, bytes):
        (folder / "images" / "bad.img").write_bytes(data)
    write(folder, {"good.png": png(IMAGE)}, "good.png,0\nbad.img,1\n")
    ds = dataset(folder)
    assert torch.equal(ds[0][0], IMAGE)
    where = rf"{folder / 'images' / 'bad.img'} \({folder / 'labels.csv'}, line 2\): "
    with pytest.raises(DatasetError, match=where + problem) as info:
        ds[1]
    if "corrupt" in problem:
        assert isinstance(info.value.__cause__, RuntimeError | OSError)  # the decoder's, kept


def test_an_image_over_max_pixels_is_refused(folder: Path) -> None:
    # The limits themselves, and the bombs, are in tests/test_dataset_limits.py.
    write(folder, {"big.png": png(IMAGE)}, "big.png,0\n")
    with pytest.raises(
        DatasetError, match=r"big.png \(.*line 1\): 16x16 = 256 pixels, over max_pixels=100"
    ):
        dataset(folder, max_pixels=100)[0]


def test_a_folder_listed_as_an_image_is_named(folder: Path) -> None:
    write(folder, {"sub/a.png": png(IMAGE)}, "sub,0\nsub/a.png,0\n")
    with pytest.raises(
        DatasetError, match=r"images/sub \(.*line 1\): the file is a directory, not a regular file"
    ):
        dataset(folder, header=False)[0]


def test_bad_arguments_are_refused(folder: Path) -> None:
    write(folder, {"a.png": png(IMAGE)}, "a.png,cat\n")
    with pytest.raises(
        ValueError, match=r"mode=...\): expected one of \['unchanged', 'gray', 'rgb'\], got 'RGB'"
    ):
        dataset(folder, mode="RGB")
    with pytest.raises(TypeError, match=r"classes=...\): expected a sequence of class names"):
        dataset(folder, classes="cat")
    with pytest.raises(ValueError, match=r"expected distinct class names, got \['cat', 'cat'\]"):
        dataset(folder, classes=["cat", "cat"])


def test_validate_reports_every_problem_at_once(folder: Path) -> None:
    (folder / "outside.png").write_bytes(png(IMAGE))
    files = {"ok.png": png(IMAGE), "cut.png": png(IMAGE)[:30], "empty.png": b""}
    write(folder, files, "ok.png,0\nmissing.png,1\ncut.png,2\nlink.png,3\nempty.png,4\n")
    os.symlink(folder / "outside.png", folder / "images" / "link.png")
    ds = dataset(folder)
    with pytest.raises(DatasetError) as info:
        ds.validate()
    assert [p.split(": ", 1)[1] for p in info.value.problems] == [
        "file not found",
        f"a symlink leads outside the image folder (to {folder / 'outside.png'}); refused",
        "empty file",
    ]
    assert str(info.value).startswith("3 problems with the images of ")
    with pytest.raises(DatasetError) as info:
        ds.validate(decode=True)
    assert len(info.value.problems) == 4 and "line 3): corrupt or truncated PNG" in str(info.value)

    write(folder, {}, "".join(f"gone{i}.png,0\n" for i in range(25)))
    with pytest.raises(
        DatasetError, match=r"  \.\.\. and 5 more \(all are in the error's \.problems\)$"
    ) as info:
        dataset(folder).validate()
    assert len(info.value.problems) == 25
    write(folder, {}, "ok.png,0\n")
    dataset(folder).validate(decode=True)  # nothing to report: returns


def test_dataset_error_is_a_value_error_that_survives_pickling() -> None:
    err = DatasetError("2 problems", ["first", "second"])
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == "2 problems" and copy.problems == ("first", "second")


# Done when: FashionMNIST written as PNG files with a header-less labels.csv, read back with
# OneHot(10) targets, trains with fit.


def fashion_arrays(n_train: int, n_valid: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """uint8 images (N, 28, 28) and labels: the real FashionMNIST, else generated images."""
    try:
        train, valid = (fashion_mnist(train=t, download=False) for t in (True, False))
        return (
            train.data[:n_train],
            train.targets[:n_train],
            valid.data[:n_valid],
            valid.targets[:n_valid],
        )
    except FileNotFoundError:
        arrays = []
        for n, seed in ((n_train, 0), (n_valid, 1)):
            x, y = make_images(n, seed=seed).tensors
            arrays += [(x.view(-1, 28, 28).sigmoid() * 255).round().to(torch.uint8), y]
        return arrays[0], arrays[1], arrays[2], arrays[3]


def write_split(folder: Path, images: Tensor, labels: Tensor) -> Path:
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (folder / "images" / f"{i:05d}.png").write_bytes(png(image[None]))
        rows.append(f"{i:05d}.png,{int(label)}\n")
    (folder / "labels.csv").write_text("".join(rows))  # no header, as the tutorial's
    return folder


def one_hot_accuracy(out: Tensor, yb: Tensor) -> Tensor:
    return (out.argmax(dim=1) == yb.argmax(dim=1)).float().mean()


def test_fashion_mnist_as_png_files_trains_with_one_hot_targets(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x_train, y_train, x_valid, y_valid = fashion_arrays(600, 200)
    splits = [
        CustomImageDataset(
            write_split(tmp_path / name, x, y) / "labels.csv",
            tmp_path / name / "images",
            transform=ToDtype(torch.float32, scale=True),
            target_transform=OneHot(10),
        )
        for name, x, y in (("train", x_train, y_train), ("valid", x_valid, y_valid))
    ]
    train_ds, valid_ds = splits
    assert len(train_ds) == 600 and len(valid_ds) == 200  # the first image is not dropped
    image, target = train_ds[0]
    assert torch.equal((image * 255).round().to(torch.uint8), x_train[0][None])
    assert torch.equal(target, torch.eye(10)[y_train[0]])

    # Workers receive the dataset with its OneHot target transform.
    train_dl = DataLoader(
        train_ds, batch_size=50, shuffle=True, num_workers=2, persistent_workers=True
    )
    valid_dl = DataLoader(valid_ds, batch_size=100)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))  # the tutorial's logistic regression
    loss_func = nn.CrossEntropyLoss()  # takes the one-hot rows as class probabilities
    untrained = evaluate(model, loss_func, valid_dl)["loss"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    metrics = {"accuracy": one_hot_accuracy}
    history = fit(3, model, loss_func, opt, train_dl, valid_dl, metrics=metrics, progress=False)
    assert history["val_loss"][-1] < 0.5 * untrained
    assert history["val_accuracy"][-1] > 0.6  # chance is 0.1
