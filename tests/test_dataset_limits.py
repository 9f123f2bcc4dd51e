"""`CustomImageDataset` against hostile input: decompression bombs, animations, huge files, header
guessing, FIFOs, symlink loops, huge labels. Each case is the file a user (or an attacker) would
have; the memory cases run in a child process whose peak memory is measured and capped."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor
from torch.utils.data import DataLoader, default_collate
from torchvision.io import encode_jpeg, encode_png

import trainkit.datasets
from trainkit.datasets import CustomImageDataset, DatasetError

CHILD = Path(__file__).with_name("dataset_memory_child.py")
MiB = 2**20
DEFAULT_MAX_PIXELS = 89_478_485


def pixels(channels: int, seed: int, size: tuple[int, int] = (16, 16)) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, *size), generator=g, dtype=torch.uint8)


def png(image: Tensor) -> bytes:
    return bytes(encode_png(image).numpy())


def jpeg(image: Tensor) -> bytes:
    return bytes(encode_jpeg(image, quality=95).numpy())


def pil_frames(frames: list[Image.Image], fmt: str, **options: Any) -> bytes:
    """An animation (GIF, APNG, WebP) of `frames`, as Pillow writes it."""
    path = Path(f"animation.{fmt}")
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], **options)
    data = path.read_bytes()
    path.unlink()
    return data


def colour_frames(n: int, size: tuple[int, int] = (8, 8)) -> list[Image.Image]:
    return [Image.new("RGB", size, (20 * i, 255 - 20 * i, 7 * i)) for i in range(n)]


def with_png_size(data: bytes, width: int, height: int) -> bytes:
    """`data`, a PNG, with its IHDR saying `width` x `height` (and a valid checksum)."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def constant_jpeg(width: int, height: int) -> bytes:
    """A valid grayscale baseline JPEG of `width` x `height` pixels, all 128, built cheaply.

    With the standard Huffman tables, a block of 128s codes as 6 bits (DC difference 0: `00`;
    end of block: `1010`), so four blocks are the three bytes 28 A2 8A, and the 30000x30000
    image the issue names is a 10.5 MB file that decodes to 900 MB (2.7 GB in RGB).
    """
    small = Image.new("L", (8, 8), 128)
    path = Path("small.jpg")
    small.save(path, quality=75)
    data = path.read_bytes()
    path.unlink()
    sof, sos = data.index(b"\xff\xc0"), data.index(b"\xff\xda")
    sos_end = sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]
    blocks = -(-width // 8) * -(-height // 8)
    assert blocks % 4 == 0, "four blocks per three bytes"
    header = bytearray(data[:sos_end])
    header[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(header) + b"\x28\xa2\x8a" * (blocks // 4) + b"\xff\xd9"


def gif_with_frame_size(width: int, height: int) -> bytes:
    """A one-frame GIF whose logical screen is 4x4 but whose frame says `width` x `height`."""
    data = bytearray(pil_frames([Image.new("P", (4, 4), 1)], "GIF"))
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while data[pos] == 0x21:  # skip extensions: label, then sub-blocks
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    assert data[pos] == 0x2C
    data[pos + 5 : pos + 9] = struct.pack("<HH", width, height)
    return bytes(data)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    return tmp_path


def write(folder: Path, files: dict[str, bytes], csv: str) -> Path:
    for name, data in files.items():
        (folder / "images" / name).write_bytes(data)
    (folder / "labels.csv").write_text(csv)
    return folder / "labels.csv"


def dataset(folder: Path, **options: Any) -> CustomImageDataset:
    return CustomImageDataset(folder / "labels.csv", folder / "images", **options)


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM interrupts a blocked open() or read()."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- 13. Decompression bombs, animations, huge files: peak memory in a child process ----------

linux_only = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux's /proc"
)


def test_the_constant_jpeg_is_a_valid_jpeg_of_the_size_it_claims(folder: Path) -> None:
    # The bomb below is this construction at 30000x30000; here it is small enough to decode.
    write(folder, {"c.jpg": constant_jpeg(64, 48)}, "c.jpg,0\n")
    image = dataset(folder)[0][0]
    assert image.shape == (1, 48, 64) and torch.all(image == 128)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every memory case, loaded in one child process (one start-up of torch, not six)."""
    root = tmp_path_factory.mktemp("memory")
    small = pixels(3, 0)
    cases: list[dict[str, Any]] = []

    def case(name: str, data: bytes, *, size: int | None = None, **options: Any) -> None:
        folder = root / name
        (folder / "images").mkdir(parents=True)
        image = folder / "images" / "image"
        image.write_bytes(data)
        if size is not None:
            os.truncate(image, size)  # zeros after the image, as a sparse file: free to write
        (folder / "labels.csv").write_text("image,0\n")
        cases.append(
            {"name": name, "csv": str(folder / "labels.csv"), "img_dir": str(folder / "images")}
            | options
        )

    # warm-up: each decoder's first call sets itself up
    case("warm-png", png(small))
    case("warm-jpeg", jpeg(small))
    case("warm-gif", pil_frames(colour_frames(1), "GIF"))
    case("warm-webp", pil_frames(colour_frames(1), "WEBP", lossless=True))

    case("jpeg-30000x30000", constant_jpeg(30000, 30000))
    case("png-30000x30000", with_png_size(png(small), 30000, 30000))
    frames = [Image.new("P", (1000, 1000), i) for i in range(40)]
    case("gif-40-frames", pil_frames(frames, "GIF"))
    case("gif-frame-beyond-screen", gif_with_frame_size(30000, 30000))
    case("png-100MiB", png(small), size=100 * MiB)
    case("png-48MiB", png(small), size=48 * MiB)
    case("jpeg-48MiB", jpeg(small), size=48 * MiB)
    cases_file = root / "cases.json"
    cases_file.write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(CHILD), str(cases_file)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    results: dict[str, dict[str, Any]] = json.loads(run.stdout)
    for name, result in results.items():  # the figures, shown with `pytest -s`
        outcome = result.get("error") or result.get("crash") or f"image {result.get('shape')}"
        print(f"{name:24} peak {result['peak'] / MiB:8.2f} MiB  {outcome.rsplit('): ', 1)[-1]}")
    results["paths"] = {case["name"]: case["csv"] for case in cases}
    results["files"] = {
        case["name"]: (Path(case["img_dir"]) / "image").stat().st_size for case in cases
    }
    return results


def expect_error(result: dict[str, Any], message: str) -> None:
    assert "error" in result, result
    assert message in result["error"], result["error"]


@linux_only
def test_a_10_mb_jpeg_of_30000x30000_is_refused_before_decoding(
    measured: dict[str, dict[str, Any]],
) -> None:
    # 10.5 MB on disk, 2.7 GB decoded in RGB: refused from its header, in a few KB of memory.
    assert 10 * MiB < measured["files"]["jpeg-30000x30000"] < 11 * MiB
    result = measured["jpeg-30000x30000"]
    expect_error(
        result,
        "/images/image (" + measured["paths"]["jpeg-30000x30000"] + ", line 1): 30000x30000 = "
        "900,000,000 pixels, over max_pixels=89,478,485; refused before decoding",
    )
    assert result["peak"] < 4 * MiB


@linux_only
def test_a_png_claiming_30000x30000_is_refused_before_decoding(
    measured: dict[str, dict[str, Any]],
) -> None:
    result = measured["png-30000x30000"]
    expect_error(result, "30000x30000 = 900,000,000 pixels, over max_pixels=89,478,485")
    assert result["peak"] < 4 * MiB


@linux_only
def test_a_40_frame_gif_is_refused_before_any_frame_is_decoded(
    measured: dict[str, dict[str, Any]],
) -> None:
    # torchvision decodes every frame (40 x 1000 x 1000 x 3 bytes = 120 MB) before returning.
    result = measured["gif-40-frames"]
    expect_error(result, "an animation of 40 frames; CustomImageDataset reads still images")
    assert result["peak"] < 4 * MiB


@linux_only
def test_a_gif_frame_larger_than_its_screen_counts_against_the_limit(
    measured: dict[str, dict[str, Any]],
) -> None:
    result = measured["gif-frame-beyond-screen"]
    expect_error(result, "30000x30000 = 900,000,000 pixels, over max_pixels=")
    assert result["peak"] < 4 * MiB


@linux_only
def test_a_file_far_larger_than_its_image_is_refused_without_reading_it(
    measured: dict[str, dict[str, Any]],
) -> None:
    # The "1 GB file read whole" case at 100 MiB: a 16x16 PNG followed by 100 MiB of zeros.
    result = measured["png-100MiB"]
    expect_error(
        result,
        "a file of 104,857,600 bytes for a 16x16 image, more than any PNG of that size needs "
        "(at most 67,112,960); refused without reading it",
    )
    assert result["peak"] < 4 * MiB


@linux_only
def test_a_png_is_decoded_from_the_open_file_without_reading_it_whole(
    measured: dict[str, dict[str, Any]],
) -> None:
    # 48 MiB of zeros after the image end: within the size rule, and never read.
    result = measured["png-48MiB"]
    assert result["shape"] == [3, 16, 16] and result["sum"] == int(pixels(3, 0).sum())
    assert result["peak"] < 4 * MiB


@linux_only
def test_a_jpeg_is_read_into_one_buffer_not_two(measured: dict[str, dict[str, Any]]) -> None:
    # decode_image needs the bytes in memory: one copy of the file (48 MiB), not the two
    # (bytes, then a bytearray for the tensor) it took before.
    result = measured["jpeg-48MiB"]
    assert result["shape"] == [3, 16, 16]
    assert result["peak"] < 52 * MiB


# --- 13. The limits, in process (no large allocation can happen here) ----------------------------


def test_max_pixels_is_the_limit_whatever_pillow_is_set_to(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {"a.png": png(pixels(1, 0, (10, 20))), "b.jpg": jpeg(pixels(3, 1, (10, 20)))}
    write(folder, files, "a.png,0\nb.jpg,1\n")
    assert dataset(folder, max_pixels=200)[0][0].shape == (1, 10, 20)  # exactly at the limit
    assert dataset(folder, max_pixels=200)[1][0].shape == (3, 10, 20)
    ds = dataset(folder, max_pixels=199)
    for idx, name in enumerate(files):
        with pytest.raises(
            DatasetError,
            match=rf"{name} \(.*labels.csv, line {idx + 1}\): 20x10 = 200 pixels, over "
            r"max_pixels=199; refused before decoding \(a decompression bomb\? if the image is "
            r"real, pass a larger max_pixels= to CustomImageDataset\)",
        ):
            ds[idx]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's global plays no part
    assert dataset(folder)[0][0].shape == (1, 10, 20)
    assert dataset(folder, max_pixels=None).max_pixels is None
    assert dataset(folder).max_pixels == DEFAULT_MAX_PIXELS == 1024**3 // 4 // 3  # Pillow's


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, r"max_pixels=...\): expected at least 1, got 0"),
        (-5, ValueError, r"expected at least 1, got -5"),
        (1.5e6, TypeError, r"max_pixels=...\): expected an int or None, got 1500000.0"),
        (True, TypeError, r"expected an int or None, got True"),
        ("1000", TypeError, r"expected an int or None, got '1000'"),
    ],
)
def test_a_bad_max_pixels_is_refused(
    folder: Path, value: object, error: type[Exception], message: str
) -> None:
    write(folder, {}, "a.png,0\n")
    with pytest.raises(error, match=message):
        dataset(folder, max_pixels=value)


def test_validate_finds_bombs_and_animations_from_headers_without_decoding(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {
        "ok.png": png(pixels(3, 0)),
        "bomb.png": with_png_size(png(pixels(3, 0)), 30000, 30000),
        "bomb.jpg": constant_jpeg(2048, 2048),
        "anim.gif": pil_frames(colour_frames(3), "GIF"),
        "anim.png": pil_frames(colour_frames(4), "PNG"),
        "anim.webp": pil_frames(colour_frames(5), "WEBP"),
    }
    write(folder, files, "".join(f"{name},0\n" for name in files))

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("validate() without decode=True decoded an image")

    monkeypatch.setattr(trainkit.datasets, "decode_image", no_decoding)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    with pytest.raises(DatasetError) as info:
        dataset(folder, max_pixels=2**20).validate()
    assert [p.split("): ", 1)[1] for p in info.value.problems] == [
        "30000x30000 = 900,000,000 pixels, over max_pixels=1,048,576; refused before decoding "
        "(a decompression bomb? if the image is real, pass a larger max_pixels= to "
        "CustomImageDataset)",
        "2048x2048 = 4,194,304 pixels, over max_pixels=1,048,576; refused before decoding "
        "(a decompression bomb? if the image is real, pass a larger max_pixels= to "
        "CustomImageDataset)",
        "an animation of 3 frames; CustomImageDataset reads still images",
        "an animation of 4 frames; CustomImageDataset reads still images",
        "an animation of 5 frames; CustomImageDataset reads still images",
    ]


# --- 15. Animated PNG and WebP: refused as animated GIF is ---------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP"])
def test_every_animation_is_refused_and_a_single_frame_file_is_read(folder: Path, fmt: str) -> None:
    frames = colour_frames(3)
    files = {"still": pil_frames(frames[:1], fmt), "animation": pil_frames(frames, fmt)}
    write(folder, files, "still,0\nanimation,1\n")
    ds = dataset(folder, mode="rgb")
    still = ds[0][0]
    assert still.shape == (3, 8, 8)
    if fmt != "WEBP":  # lossy by default
        assert still[:, 0, 0].tolist() == [0, 255, 0]
    with pytest.raises(
        DatasetError,
        match=r"images/animation \(.*labels.csv, line 2\): an animation of 3 frames; "
        r"CustomImageDataset reads still images",
    ):
        ds[1]


# --- 14. Header detection: from the rows, never from the disk ------------------------------------


def test_a_header_less_csv_whose_first_file_is_missing_keeps_that_row(folder: Path) -> None:
    # The case: `img0,3` with no file img0. Before, the row was taken for a header,
    # dropped, and validate() passed.
    files = {"img1": png(pixels(1, 1)), "img2": png(pixels(1, 2))}
    write(folder, files, "img0,3\nimg1,5\nimg2,1\n")
    ds = dataset(folder)
    assert not ds.header and ds.samples == [("img0", 3), ("img1", 5), ("img2", 1)]
    with pytest.raises(DatasetError, match=r"images/img0 \(.*labels.csv, line 1\): file not found"):
        ds.validate()


@pytest.mark.parametrize(
    ("csv", "header"),
    [
        ("file_name,label\na.png,1\nb.png,0\n", True),  # a label that is no integer
        ("img0,3\nimg1,5\n", False),  # an integer label is data, file or no file
        ("a.png,three\nb.png,1\nc.png,2\n", False),  # a file name is data: its label is wrong
        ("a.png,cat\nb.png,dog\n", False),
        ("img0,cat\nimg1,cat\nimg2,dog\n", False),  # a class name other rows use
        ("id,breed\nimg0,3\n", True),
    ],
)
def test_the_first_row_is_a_header_only_when_it_cannot_be_data(
    folder: Path, csv: str, header: bool
) -> None:
    write(folder, {}, csv)
    if csv.startswith("a.png,three"):
        with pytest.raises(DatasetError, match=r"line 1: label 'three' is not an integer"):
            dataset(folder)
        return
    assert dataset(folder).header is header


@pytest.mark.parametrize("exists", [True, False])
def test_class_names_without_file_extensions_ask_for_header(folder: Path, exists: bool) -> None:
    # "path,class" or an image "img0" of class "cat"? Whether img0 exists must not decide.
    write(folder, {"img0": png(pixels(1, 0))} if exists else {}, "img0,cat\na.png,dog\n")
    with pytest.raises(
        DatasetError,
        match=r"labels.csv, line 1: 'img0,cat' may be a header or an image \('img0' of class "
        r"'cat'\): its path has no file extension and its label is a name no other row uses; "
        r"pass header=True or header=False",
    ):
        dataset(folder)
    assert dataset(folder, header=False).samples == [("img0", 0), ("a.png", 1)]
    assert dataset(folder, header=True).samples == [("a.png", 0)]
    assert dataset(folder, classes=["cat", "dog"]).header is False  # "cat" is a class: data
    assert dataset(folder, classes=["dog"]).header is True  # "cat" is none: a header


def test_a_header_alone_says_how_to_read_it_as_an_image(folder: Path) -> None:
    write(folder, {}, "img0,cat\n")
    with pytest.raises(
        DatasetError, match=r"only a header row \(img0,cat\), no images; pass header=False"
    ):
        dataset(folder)
    assert len(dataset(folder, header=False)) == 1


# --- 15. A FIFO, devices, symlink loops --------------------------------------------------------

fifo_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")


@fifo_only
def test_a_fifo_as_annotations_file_is_refused_without_blocking(folder: Path) -> None:
    os.mkfifo(folder / "labels.csv")  # no writer will ever open it
    with (
        deadline(10),
        pytest.raises(
            DatasetError,
            match=r"labels.csv: the annotations file is a FIFO \(named pipe\), not a regular file; "
            "refused",
        ),
    ):
        dataset(folder)


@fifo_only
def test_a_fifo_as_an_image_is_refused_without_blocking(folder: Path) -> None:
    write(folder, {"ok.png": png(pixels(1, 0))}, "ok.png,0\npipe.png,1\n")
    os.mkfifo(folder / "images" / "pipe.png")
    ds = dataset(folder)
    message = r"pipe.png \(.*line 2\): the file is a FIFO \(named pipe\), not a regular file"
    with deadline(10):
        with pytest.raises(DatasetError, match=message):
            ds[1]
        with pytest.raises(DatasetError, match=message):
            ds.validate()


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="no /dev/null")
def test_a_device_as_annotations_file_is_refused(folder: Path) -> None:
    with pytest.raises(
        DatasetError, match=r"^/dev/null: the annotations file is a character device, not a"
    ):
        CustomImageDataset("/dev/null", folder / "images")


def test_a_nul_in_the_argument_paths_is_a_dataset_error(folder: Path) -> None:
    (folder / "labels.csv").write_text("a.png,0\n")
    with pytest.raises(DatasetError, match=r"labels.csv\x00: cannot open the annotations file"):
        CustomImageDataset(f"{folder}/labels.csv\0", folder / "images")
    with pytest.raises(DatasetError, match=r"the image folder \(img_dir\) cannot be opened"):
        CustomImageDataset(folder / "labels.csv", f"{folder}/images\0")


def test_a_folder_as_annotations_file_is_named(folder: Path) -> None:
    with pytest.raises(DatasetError, match=r"images: the annotations file is a directory, not a"):
        CustomImageDataset(folder / "images", folder / "images")


@pytest.mark.parametrize("cycle", ["self", "pair"])
def test_a_symlink_loop_as_an_image_is_a_dataset_error(folder: Path, cycle: str) -> None:
    images = folder / "images"
    if cycle == "self":
        os.symlink("loop.png", images / "loop.png")
    else:
        os.symlink("other.png", images / "loop.png")
        os.symlink("loop.png", images / "other.png")
    write(folder, {"ok.png": png(pixels(1, 0))}, "ok.png,0\nloop.png,1\n")
    ds = dataset(folder)
    message = r"images/loop.png \(.*labels.csv, line 2\): a symlink loop; refused"
    with pytest.raises(DatasetError, match=message):
        ds[1]
    with pytest.raises(DatasetError, match=message):
        ds.validate()


def test_a_symlink_loop_reported_by_resolve_as_oserror_is_a_dataset_error(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What pathlib raises for a loop depends on the Python version (RuntimeError up to 3.12).
    os.symlink("loop.png", folder / "images" / "loop.png")
    write(folder, {}, "loop.png,0\n")
    ds = dataset(folder)
    real_resolve = Path.resolve

    def resolve(path: Path, strict: bool = False) -> Path:
        if path.name == "loop.png":
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
        return real_resolve(path, strict)

    monkeypatch.setattr(Path, "resolve", resolve)
    with pytest.raises(DatasetError, match=r"loop.png \(.*line 1\): a symlink loop; refused"):
        ds[0]


def test_a_symlink_loop_as_annotations_file_or_img_dir_is_a_dataset_error(folder: Path) -> None:
    os.symlink("labels.csv", folder / "labels.csv")
    with pytest.raises(DatasetError, match=r"labels.csv: a symlink loop; refused"):
        dataset(folder)
    os.symlink("pictures", folder / "pictures")
    with pytest.raises(DatasetError, match=r"pictures: the image folder \(img_dir\) is a symlink"):
        CustomImageDataset(folder / "labels.csv", folder / "pictures")
    (folder / "plain").write_text("")
    with pytest.raises(DatasetError, match=r"plain: the image folder \(img_dir\) is not a folder"):
        CustomImageDataset(folder / "labels.csv", folder / "plain")


# --- 15. Labels too large for a batch ------------------------------------------------------------


def test_a_label_of_10_to_the_30_is_refused_when_built(folder: Path) -> None:
    write(folder, {}, f"a.png,1\nb.png,{10**30}\nc.png,{'9' * 5000}\n")
    with pytest.raises(DatasetError) as info:
        dataset(folder)
    assert info.value.problems == (
        f"{folder / 'labels.csv'}, line 2: label 1000000000000000000000000000000 is too large "
        "for a class index (at most 2**63 - 1, what a batch of labels, an int64 tensor, holds)",
        f"{folder / 'labels.csv'}, line 3: label 99999999999999999999...9999999999 (5000 "
        "characters) is too large for a class index (at most 2**63 - 1, what a batch of "
        "labels, an int64 tensor, holds)",
    )
    write(folder, {}, f"a.png,cat\nb.png,{10**30}\n")
    with pytest.raises(DatasetError, match=r"line 2: label '1000000000000000000000000000000' is "):
        dataset(folder, classes=["cat"])


def test_the_largest_label_accepted_is_the_largest_a_batch_holds(folder: Path) -> None:
    largest = 2**63 - 1
    assert default_collate([largest, 0]).tolist() == [largest, 0]
    with pytest.raises((RuntimeError, ValueError), match="Overflow"):
        default_collate([largest + 1, 0])
    files = {"a.png": png(pixels(1, 0)), "b.png": png(pixels(1, 1))}
    write(folder, files, f"a.png,{largest}\nb.png,0\n")
    ds = dataset(folder)
    _, labels = next(iter(DataLoader(ds, batch_size=2)))
    assert labels.tolist() == [largest, 0]
    write(folder, {}, f"a.png,{largest + 1}\nb.png,0\n")
    with pytest.raises(DatasetError, match=rf"line 1: label {largest + 1} is too large"):
        dataset(folder)


# --- Other hostile images and CSVs ---------------------------------------------------------------


def jpeg_without_sof() -> bytes:
    data = jpeg(pixels(1, 0))
    sof = data.index(b"\xff\xc0")
    length = struct.unpack(">H", data[sof + 2 : sof + 4])[0]
    return data[:sof] + data[sof + 2 + length :]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (png(pixels(1, 0))[:20], "corrupt or truncated PNG: the header ends early"),
        (b"GIF89a\x01", "corrupt or truncated GIF: the header ends early"),
        (jpeg(pixels(1, 0))[:30], "corrupt or truncated JPEG: "),
        (jpeg_without_sof(), "corrupt or truncated JPEG: no frame header \\(SOF\\) before the"),
        (with_png_size(png(pixels(1, 0)), 0, 16), "corrupt image: its header says 0x16 pixels"),
        (b"RIFF\0\0\0\0WEBPVP8Z" + bytes(20), "corrupt or truncated WebP: no VP8, VP8L or VP8X"),
        (b"\xff\xd8\xff" + b"\xff" * 5000, "corrupt or truncated JPEG: no marker at byte"),
    ],
    ids=["png-cut", "gif-cut", "jpeg-cut", "jpeg-no-sof", "png-zero-width", "webp", "jpeg-fill"],
)
def test_a_bad_header_is_named_with_its_csv_line(folder: Path, data: bytes, problem: str) -> None:
    write(folder, {"bad": data}, "bad,0\n")
    with pytest.raises(DatasetError, match=r"images/bad \(.*labels.csv, line 1\): " + problem):
        dataset(folder)[0]


def test_a_webp_claiming_16383x16383_is_refused(folder: Path) -> None:
    simple = pil_frames(colour_frames(1), "WEBP", lossless=True)
    assert simple[12:16] == b"VP8L"
    # The extended format: a VP8X chunk (flags, then the canvas size minus one) before the image
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (16382).to_bytes(3, "little") * 2
    body = b"WEBP" + vp8x + simple[12:]
    write(folder, {"big.webp": b"RIFF" + struct.pack("<I", len(body)) + body}, "big.webp,0\n")
    with pytest.raises(DatasetError, match=r"16383x16383 = 268,402,689 pixels, over max_pixels"):
        dataset(folder)[0]


def test_a_path_too_long_for_the_system_is_named(folder: Path) -> None:
    write(folder, {}, f"a.png,0\n{'x' * 5000}.png,1\n")
    ds = dataset(folder)
    message = r"x\.png \(.*labels.csv, line 2\): cannot read the file: File name too long"
    with pytest.raises(DatasetError, match=message):
        ds[1]


def test_a_csv_cell_over_the_csv_modules_limit_is_named(folder: Path) -> None:
    write(folder, {}, f"a.png,0\n{'x' * 200_000}.png,1\n")
    with pytest.raises(
        DatasetError, match=r"labels.csv, line 2: not valid CSV: field larger than field limit"
    ):
        dataset(folder)


def test_random_damage_to_headers_gives_an_image_or_a_dataset_error(folder: Path) -> None:
    # Every byte of the first 48 of each format, set to values a hostile file would use.
    sources = {
        "png": png(pixels(3, 0)),
        "jpg": jpeg(pixels(3, 0)),
        "gif": pil_frames(colour_frames(1), "GIF"),
        "webp": pil_frames(colour_frames(1), "WEBP", lossless=True),
    }
    rng = np.random.default_rng(0)
    outcomes = {"image": 0, "error": 0}
    for name, source in sources.items():
        for _ in range(60):
            data = bytearray(source)
            for pos in rng.integers(0, min(48, len(data)), 3):
                data[pos] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF, int(rng.integers(256))]))
            write(folder, {name: bytes(data)}, f"{name},0\n")
            try:
                image = dataset(folder, max_pixels=2**16)[0][0]
            except DatasetError:
                outcomes["error"] += 1
            else:
                assert image.dtype == torch.uint8 and image.numel() <= 4 * 2**16
                outcomes["image"] += 1
    assert outcomes["error"] > 0 and outcomes["image"] > 0
