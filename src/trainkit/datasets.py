"""Datasets: the real FashionMNIST, found offline or downloaded; images listed in a CSV file."""

from __future__ import annotations

import csv
import errno
import gzip
import io
import os
import re
import shutil
import stat
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, Literal

import numpy as np
import torch
from PIL import PngImagePlugin
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import rgb_to_grayscale
from typing_extensions import TypeVar  # a TypeVar with a default (typing has it from 3.13)

from trainkit._image_headers import METADATA_BYTES, count_frames, dimensions, image_kind

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "CustomImageDataset",
    "DatasetError",
    "ImageMode",
    "fashion_mnist",
]

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


ImageMode = Literal["unchanged", "gray", "rgb"]
"""How `CustomImageDataset` decodes: channels as stored, 1 channel (gray), or 3 (RGB)."""

_READ_MODES = {
    "unchanged": ImageReadMode.UNCHANGED,
    "gray": ImageReadMode.GRAY,
    "rgb": ImageReadMode.RGB,
}
_INTEGER = re.compile(r"[+-]?[0-9]+")
_MAX_INDEX = 2**63 - 1  # the largest class index a batch of labels (an int64 tensor) can hold
_MAX_LISTED = 20  # problems spelled out in one message; all of them are in `DatasetError.problems`
# A file may hold at most this many bytes per pixel of its image, plus room for metadata: more
# than any JPEG, PNG (16-bit RGBA stored uncompressed is 8), GIF or WebP of that size needs.
_BYTES_PER_PIXEL = 16
# Open without blocking: a FIFO opened for reading waits for a writer (forever, if none comes).
# O_BINARY: no newline translation where the C library has a text mode (Windows).
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class DatasetError(ValueError):
    """Bad input to a dataset: the message names the CSV file and line, or the image file.

    Args:
        message: What is wrong, and where.
        problems: Every problem found, one string each, when several are reported at once
            (`CustomImageDataset.validate`); by default just `message`.

    Example:
        >>> err = DatasetError("labels.csv, line 3: 1 column, expected path,label")
        >>> isinstance(err, ValueError), err.problems
        (True, ('labels.csv, line 3: 1 column, expected path,label',))
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep `problems` when the error crosses a process boundary (DataLoader workers).
        return type(self), (str(self), self.problems)


ImageT = TypeVar("ImageT", default=Tensor)
"""What `CustomImageDataset[i]` gives as the image: a `uint8` tensor, or `transform`'s result."""
TargetT = TypeVar("TargetT", default=int)
"""What `CustomImageDataset[i]` gives as the label: an `int`, or `target_transform`'s result."""


class CustomImageDataset(Dataset[tuple[ImageT, TargetT]], Generic[ImageT, TargetT]):
    """Images listed in a CSV file of `path,label` rows: the tutorial's `CustomImageDataset`.

    The positional arguments are the tutorial's. The CSV is read with the standard library:
    the first column is an image path relative to `img_dir`, the second its label; further
    columns are ignored, and so are blank lines and spaces around cells (the tutorial's
    `tshirt1.jpg, 0`). All rows are kept: the tutorial's `pd.read_csv` takes the first row of
    its header-less `labels.csv` for a header and silently drops that image. Here the first row
    is data when it reads like data: its first cell has a file extension (`tshirt1.jpg`), or its
    label is an integer, one of `classes`, or a name other rows use too. It is a header when its
    label cannot be a label (`file_name,label` over integer labels, `path,class` when `classes=`
    is given). Whether a file exists plays no part. When nothing tells (a first path without
    extension, over class names no other row repeats), the dataset asks for `header=`.

    Labels are class indices (non-negative integers) or class names. With names, the classes
    are sorted and numbered as torchvision's `ImageFolder` numbers its folders, and exposed as
    `classes` and `class_to_idx`; pass the same `classes=` to every split of a data set so that
    an index means the same class in each.

    Images are decoded into `uint8` tensors `C x H x W`: `mode="rgb"` or `"gray"` gives every
    image the same number of channels whatever is stored (gray, RGB, RGBA); `"unchanged"`
    keeps the channels the file holds (palette images become RGB, or RGBA with transparency;
    16-bit images are scaled to 8 bits). JPEG, GIF and WebP are decoded by
    `torchvision.io.decode_image`; PNG by Pillow, because torchvision's PNG decoder crashes
    the process (a segmentation fault, not an exception) on many corrupt files.

    Before an image is decoded, its header is read: an image of more than `max_pixels` pixels
    (a decompression bomb: a small file that decodes to gigabytes), an animation (GIF, APNG,
    WebP) and a file larger than 16 bytes per pixel of its image plus 64 MiB are refused
    without decoding or reading the rest. PNGs are decoded from the open file; other formats
    are read once into one buffer. So one image costs at most about the file plus its decoded
    pixels. The annotations file and images must be regular files: a FIFO or a device is
    refused without being opened for a blocking read.

    Paths that lead outside `img_dir` (`../`, absolute paths, symlinks pointing out) are
    refused and never read. Problems in the CSV are all reported when the dataset is built;
    problems with an image file when that image is loaded, or all at once by `validate()`.

    Args:
        annotations_file: The CSV file (UTF-8; a byte-order mark is allowed).
        img_dir: The folder the CSV's paths are relative to.
        transform: Applied to each image tensor (`uint8`, `C x H x W`).
        target_transform: Applied to each label, an `int` class index (e.g. `OneHot(10)`).
        mode: `"unchanged"`, `"gray"` or `"rgb"`: the channels of the decoded images.
        classes: The class names, in index order; every label must then be one of these names
            or an integer index into them. By default the labels decide: all integers are
            indices, all names give `sorted(set(names))`.
        header: Whether the CSV's first row is a header; by default it is recognised as above.
        max_pixels: The most pixels (width times height) an image may have; larger ones are
            refused before decoding. The default, 89,478,485, is Pillow's `MAX_IMAGE_PIXELS`
            (above it Pillow warns of a decompression bomb): 0.27 GB decoded in RGB. `None`
            sets no limit.

    Attributes:
        samples: `(path relative to img_dir, class index)` for each image, in CSV order.
        targets: The class index of each image.
        classes: The class names in index order, or `None` for integer labels without `classes=`.
        class_to_idx: Name to index, or `None` likewise.
        header: Whether the first row was taken for a header.
        max_pixels: The pixel limit.

    Raises:
        DatasetError: when building: `annotations_file` missing, not a regular file (a FIFO,
            a folder), a symlink loop, unreadable, not UTF-8, or without rows; `img_dir` not a
            folder; a first row that may be a header or an image (pass `header=`); and, all
            listed together, rows with fewer than two columns or an empty cell, labels that are
            neither an integer index nor a known class (or that mix integers and names, or are
            numbers but not integers, or are too large for an `int64`), paths that are absolute
            or climb out of `img_dir`. When loading an image: the file is missing, not a regular
            file, a symlink loop, outside `img_dir` through a symlink, empty, in an unsupported
            format, corrupt or truncated, an animation, over `max_pixels`, or larger than its
            image needs.
        ValueError: `mode` is not one of the modes above, `classes` is empty or repeats a
            name, or `max_pixels` is not positive.
        TypeError: `classes` is a string rather than a sequence of names; `max_pixels` is not
            an integer or `None`.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from torchvision.io import encode_png
        >>> folder = Path(tempfile.mkdtemp())
        >>> png = encode_png(torch.zeros(1, 4, 4, dtype=torch.uint8)).numpy().tobytes()
        >>> for name in ("a.png", "b.png"):
        ...     _ = (folder / name).write_bytes(png)
        >>> _ = (folder / "labels.csv").write_text("a.png,cat\\nb.png,dog\\n")
        >>> ds = CustomImageDataset(folder / "labels.csv", folder, mode="rgb")
        >>> image, label = ds[1]
        >>> len(ds), image.shape, image.dtype, label, ds.classes
        (2, torch.Size([3, 4, 4]), torch.uint8, 1, ['cat', 'dog'])
    """

    def __init__(
        self,
        annotations_file: str | os.PathLike[str],
        img_dir: str | os.PathLike[str],
        transform: Callable[[Tensor], ImageT] | None = None,
        target_transform: Callable[[int], TargetT] | None = None,
        *,
        mode: ImageMode = "unchanged",
        classes: Sequence[str] | None = None,
        header: bool | None = None,
        max_pixels: int | None = 89_478_485,
    ) -> None:
        if mode not in _READ_MODES:
            raise ValueError(
                f"CustomImageDataset(mode=...): expected one of {list(_READ_MODES)}, got {mode!r}"
            )
        if isinstance(classes, str):
            raise TypeError(
                "CustomImageDataset(classes=...): expected a sequence of class names, "
                f"got the string {classes!r}"
            )
        if max_pixels is not None:
            if isinstance(max_pixels, bool) or not isinstance(max_pixels, int):
                raise TypeError(
                    "CustomImageDataset(max_pixels=...): expected an int or None, got "
                    f"{max_pixels!r}"
                )
            if max_pixels < 1:
                raise ValueError(
                    f"CustomImageDataset(max_pixels=...): expected at least 1, got {max_pixels}"
                )
        self.annotations_file: Path = Path(annotations_file)
        self.img_dir: Path = Path(img_dir)
        self.transform = transform
        self.target_transform = target_transform
        self.mode: ImageMode = mode
        self.max_pixels = max_pixels
        self._root = _folder(self.img_dir)

        rows = _read_csv(self.annotations_file)
        first = rows[0][1]
        self.header: bool
        self.header = _is_header(rows, classes, self.annotations_file) if header is None else header
        if self.header:
            rows = rows[1:]
            if not rows:
                raise DatasetError(
                    f"{self.annotations_file}: only a header row ({','.join(first)}), no images; "
                    "pass header=False if that row is an image"
                )
        problems: dict[int, str] = {}  # line -> what is wrong with it
        parsed: list[tuple[int, str, str]] = []  # (line, path, label)
        for line, cells in rows:
            path = _relative_path(cells[0])
            if len(cells) < 2:
                problems[line] = (
                    f"{len(cells)} column ({','.join(cells)!r}); expected path,label "
                    "separated by a comma"
                )
            elif not cells[0] or not cells[1]:
                problems[line] = f"empty {'path' if not cells[0] else 'label'}"
            elif "\0" in cells[0]:
                problems[line] = f"path {cells[0]!r} holds a NUL character"
            elif path is None:
                problems[line] = (
                    f"path {cells[0]!r} leads outside the image folder; paths must be relative "
                    "to img_dir and stay inside it"
                )
            else:
                parsed.append((line, path, cells[1]))
        self.classes: list[str] | None
        self.class_to_idx: dict[str, int] | None
        self.classes, self.class_to_idx, targets = _labels(parsed, classes, problems)
        if problems:
            raise _collected(
                [f"{self.annotations_file}, line {n}: {problems[n]}" for n in sorted(problems)],
                f"in {self.annotations_file}",
            )
        self._lines = [line for line, _, _ in parsed]
        self.samples: list[tuple[str, int]] = [
            (path, target) for (_, path, _), target in zip(parsed, targets, strict=True)
        ]
        self.targets: list[int] = targets

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> tuple[ImageT, TargetT]:
        image: Any = self._read_image(idx)
        label: Any = self.samples[idx][1]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def validate(self, *, decode: bool = False) -> None:
        """Check every image of the CSV and report all problems at once.

        Args:
            decode: Also decode every image (slower), which finds corrupt and truncated
                files; by default each file is checked to be a non-empty regular file inside
                `img_dir`, and its header is read: a supported format, a still image, within
                `max_pixels`, no larger than its image needs.

        Raises:
            DatasetError: listing every problem found (the first few in the message, all of
                them in its `problems`).

        Example:
            >>> import tempfile
            >>> from pathlib import Path
            >>> folder = Path(tempfile.mkdtemp())
            >>> _ = (folder / "labels.csv").write_text("a.png,0\\nb.png,1\\n")
            >>> try:
            ...     CustomImageDataset(folder / "labels.csv", folder).validate()
            ... except DatasetError as err:
            ...     print(*(problem.split(": ")[-1] for problem in err.problems))
            file not found file not found
        """
        problems: list[str] = []
        for idx in range(len(self)):
            try:
                if decode:
                    self._read_image(idx)
                else:
                    with self._open_image(idx):
                        pass
            except DatasetError as err:
                problems.append(str(err))
        if problems:
            raise _collected(problems, f"with the images of {self.annotations_file}")

    def __repr__(self) -> str:
        labels = "integer labels" if self.classes is None else f"{len(self.classes)} classes"
        return (
            f"CustomImageDataset({len(self)} images, {labels}, mode={self.mode!r}, "
            f"annotations_file={str(self.annotations_file)!r}, img_dir={str(self.img_dir)!r})"
        )

    def _where(self, idx: int) -> str:
        line = self._lines[idx]
        return f"{self.img_dir / self.samples[idx][0]} ({self.annotations_file}, line {line})"

    def _open_image(self, idx: int) -> _ImageFile:
        """The image file opened, its header checked against the limits; nothing decoded."""
        where = self._where(idx)
        try:
            path = (self._root / self.samples[idx][0]).resolve()
        except RuntimeError:  # pathlib before Python 3.13 raises this for a symlink loop
            raise DatasetError(f"{where}: a symlink loop; refused") from None
        except OSError as err:  # later ones may raise ELOOP, or leave it to the open below
            if err.errno == errno.ELOOP:
                raise DatasetError(f"{where}: a symlink loop; refused") from None
            raise DatasetError(f"{where}: cannot read the file: {err.strerror or err}") from err
        if not path.is_relative_to(self._root):
            raise DatasetError(
                f"{where}: a symlink leads outside the image folder (to {path}); refused"
            )
        file = _open_regular(path, where, "file")
        try:
            if os.fstat(file.fileno()).st_size == 0:
                raise DatasetError(f"{where}: empty file")
            return _check_header(file, where, self.max_pixels)
        except BaseException:
            file.close()
            raise

    def _read_image(self, idx: int) -> Tensor:
        where = self._where(idx)
        with self._open_image(idx) as image:
            try:
                if image.kind == "PNG":
                    tensor = _decode_png(image.file, self.mode)
                else:
                    tensor = decode_image(image.read_all(), _READ_MODES[self.mode])
            # Image.open turns the last three into "cannot identify image file"; here they are the
            # PNG plugin's, called directly.
            except (
                RuntimeError,
                ValueError,
                OSError,
                SyntaxError,
                EOFError,
                IndexError,
                TypeError,
                struct.error,
            ) as err:
                reason = re.sub(r"^\w+, \S+:\d+, ", "", str(err))  # drop the C++ source location
                raise DatasetError(f"{where}: corrupt or truncated {image.kind}: {reason}") from err
        if tensor.ndim == 4:  # the header said one frame; a decoder that disagrees is not trusted
            if tensor.shape[0] != 1:
                raise DatasetError(
                    f"{where}: an animation of {tensor.shape[0]} frames; "
                    "CustomImageDataset reads still images"
                )
            tensor = tensor[0]
        return _channels(tensor, self.mode)


class _ImageFile:
    """An open image file whose header has been read: its format, size and frame count."""

    def __init__(self, file: io.BufferedReader, kind: str, size: int) -> None:
        self.file, self.kind, self.size = file, kind, size

    def read_all(self) -> Tensor:
        """The whole file in one `uint8` tensor, read into it without an intermediate copy."""
        buffer = torch.empty(self.size, dtype=torch.uint8)
        view, done = buffer.numpy().data, 0
        self.file.seek(0)
        while done < self.size and (n := self.file.readinto(view[done:])):
            done += n
        return buffer[:done]

    def __enter__(self) -> _ImageFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def _open_regular(path: Path, where: str, noun: str) -> io.BufferedReader:
    """`path` opened for reading, if it is a regular file; a FIFO or a device is never opened."""
    try:
        info = path.stat()
        if stat.S_ISREG(info.st_mode):
            file = open(os.open(path, _OPEN_FLAGS), "rb")  # noqa: SIM115
            info = os.fstat(file.fileno())  # what was opened, if the path changed meanwhile
            if not stat.S_ISREG(info.st_mode):
                file.close()
    except FileNotFoundError:
        raise DatasetError(f"{where}: {noun} not found") from None
    except ValueError as err:  # "embedded null byte"
        raise DatasetError(f"{where}: cannot open the {noun}: {err}") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DatasetError(f"{where}: a symlink loop; refused") from None
        raise DatasetError(f"{where}: cannot read the {noun}: {err.strerror or err}") from err
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "special file")
        raise DatasetError(f"{where}: the {noun} is {kind}, not a regular file; refused")
    return file


def _check_header(file: io.BufferedReader, where: str, max_pixels: int | None) -> _ImageFile:
    """Read the image's header: its format, size and frames; refuse what is over the limits."""
    size = os.fstat(file.fileno()).st_size
    head = file.read(32)
    kind = image_kind(head)
    if kind is None:
        raise DatasetError(
            f"{where}: unsupported image format (starts with {head[:8]!r}); "
            "CustomImageDataset reads JPEG, PNG, GIF and WebP"
        )
    try:
        width, height = dimensions(file, kind, head)
        _check_pixels(width, height, where, max_pixels)
        most = _BYTES_PER_PIXEL * width * height + METADATA_BYTES
        if size > most:
            raise DatasetError(
                f"{where}: a file of {size:,} bytes for a {width}x{height} image, more than any "
                f"{kind} of that size needs (at most {most:,}); refused without reading it"
            )
        frames, width, height = count_frames(file, kind, head, width, height)
        _check_pixels(width, height, where, max_pixels)  # a GIF's frames may extend its screen
    except DatasetError:
        raise
    except (ValueError, IndexError, struct.error) as err:  # a header cut short or nonsensical
        raise DatasetError(f"{where}: corrupt or truncated {kind}: {err}") from err
    if frames > 1:
        raise DatasetError(
            f"{where}: an animation of {frames} frames; CustomImageDataset reads still images"
        )
    return _ImageFile(file, kind, size)


def _check_pixels(width: int, height: int, where: str, max_pixels: int | None) -> None:
    if width < 1 or height < 1:
        raise DatasetError(f"{where}: corrupt image: its header says {width}x{height} pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise DatasetError(
            f"{where}: {width}x{height} = {width * height:,} pixels, over max_pixels="
            f"{max_pixels:,}; refused before decoding (a decompression bomb? if the image is "
            "real, pass a larger max_pixels= to CustomImageDataset)"
        )


def _channels(image: Tensor, mode: ImageMode) -> Tensor:
    """`image` with the channels `mode` asks for (decode_image ignores it for GIF and WebP)."""
    channels = image.shape[0]
    if mode == "gray" and channels != 1:
        return rgb_to_grayscale(image[:3]) if channels >= 3 else image[:1]
    if mode == "rgb" and channels != 3:
        return image[:3] if channels == 4 else image[:1].expand(3, -1, -1).contiguous()
    return image


def _decode_png(file: io.BufferedReader, mode: ImageMode) -> Tensor:
    """Decode a PNG with Pillow from the open file into a `uint8` tensor `C x H x W`."""
    file.seek(0)
    # The plugin class itself, not Image.open: `max_pixels` is the limit, not Pillow's global one.
    with PngImagePlugin.PngImageFile(file) as im:
        im.load()
        if im.mode.startswith("I"):  # 16-bit gray: keep the high byte, as decode_image scales
            array = (np.asarray(im) >> 8).astype(np.uint8)
            if mode == "rgb":
                array = np.repeat(array[..., None], 3, axis=-1)
        else:
            target = {"gray": "L", "rgb": "RGB"}.get(mode) or _UNCHANGED.get(im.mode, "RGB")
            if im.mode == "P" and mode == "unchanged" and "transparency" in im.info:
                target = "RGBA"
            array = np.array(im if im.mode == target else im.convert(target))
    tensor = torch.from_numpy(array)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


# Pillow's mode of a PNG -> what "unchanged" decodes it to; palette ("P") images become RGB.
_UNCHANGED = {
    "1": "L",
    "L": "L",
    "LA": "LA",
    "PA": "RGBA",
    "RGB": "RGB",
    "RGBA": "RGBA",
}


def _folder(img_dir: Path) -> Path:
    """`img_dir` resolved, checked to be a folder."""
    where = f"{img_dir}: the image folder (img_dir)"
    try:
        info = img_dir.stat()
    except FileNotFoundError:
        raise DatasetError(f"{where} does not exist") from None
    except ValueError as err:  # "embedded null byte"
        raise DatasetError(f"{where} cannot be opened: {err}") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DatasetError(f"{where} is a symlink loop") from None
        raise DatasetError(f"{where} cannot be read: {err.strerror or err}") from err
    if not stat.S_ISDIR(info.st_mode):
        raise DatasetError(f"{where} is not a folder")
    return img_dir.resolve()


def _read_csv(csv_path: Path) -> list[tuple[int, list[str]]]:
    """`(line number, stripped cells)` of each non-blank row; errors name the file and line."""
    with _open_regular(csv_path, str(csv_path), "annotations file") as file:
        try:
            data = file.read()
        except OSError as err:
            raise DatasetError(f"{csv_path}: cannot read the annotations file: {err}") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DatasetError(
            f"{csv_path}, line {line}: not UTF-8 text ({err.reason} at byte {err.start}); "
            "the annotations file must be a UTF-8 CSV"
        ) from err
    rows: list[tuple[int, list[str]]] = []
    # strict: a stray quote is an error at its line, not a cell that swallows the next rows
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
    line = 1
    try:
        for cells in reader:
            stripped = [cell.strip() for cell in cells]
            if any(stripped):
                rows.append((line, stripped))
            line = reader.line_num + 1
    except csv.Error as err:
        raise DatasetError(f"{csv_path}, line {line}: not valid CSV: {err}") from err
    if not rows:
        raise DatasetError(f"{csv_path}: empty; expected one path,label row per image")
    return rows


def _is_header(
    rows: list[tuple[int, list[str]]], classes: Sequence[str] | None, csv_path: Path
) -> bool:
    """Whether the first row is a header, from what the rows say (never from the disk)."""
    first = rows[0][1]
    if len(first) < 2 or not first[0] or not first[1]:
        return False  # a broken row: reported as such
    if Path(first[0]).suffix or _index(first[1]) is not None:
        return False  # a file name ("a.png"), or an integer label: data
    if classes is not None:
        return first[1] not in classes
    labels = {cells[1] for _, cells in rows[1:] if len(cells) >= 2}
    if all(_index(label) is not None for label in labels):
        return True  # "file_name,label" over integer labels
    if first[1] in labels:
        return False  # a class name other rows use: data
    # "path,class" or "img0,cat" over class names: nothing in the rows tells which
    raise DatasetError(
        f"{csv_path}, line 1: {','.join(first)!r} may be a header or an image ({first[0]!r} of "
        f"class {first[1]!r}): its path has no file extension and its label is a name no other "
        "row uses; pass header=True or header=False"
    )


def _relative_path(cell: str) -> str | None:
    """`cell` normalised, or `None` if it is absolute or climbs out of its folder."""
    if os.path.isabs(cell):
        return None
    normal = os.path.normpath(cell)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        return None
    return normal


def _index(label: str) -> int | None:
    """The integer `label` spells (`3`, `+3`, `007`), else `None`; one past int64 if larger."""
    if not _INTEGER.fullmatch(label):
        return None
    if len(label.lstrip("+-").lstrip("0")) > len(str(_MAX_INDEX)):  # int() refuses 4300 digits
        return -_MAX_INDEX - 2 if label.startswith("-") else _MAX_INDEX + 1
    return int(label)


def _clip(label: str) -> str:
    return label if len(label) <= 40 else f"{label[:20]}...{label[-10:]} ({len(label)} characters)"


def _labels(
    rows: list[tuple[int, str, str]], classes: Sequence[str] | None, problems: dict[int, str]
) -> tuple[list[str] | None, dict[str, int] | None, list[int]]:
    """Class names, their index map and the index of each row; bad labels go to `problems`."""
    targets: list[int] = []
    if classes is not None:
        names = list(classes)
        if not names or len(set(names)) != len(names):
            raise ValueError(
                f"CustomImageDataset(classes=...): expected distinct class names, got {names!r}"
            )
        to_idx = {name: i for i, name in enumerate(names)}
        for line, _, label in rows:
            index = _index(label)
            if label in to_idx:
                targets.append(to_idx[label])
            elif index is not None and 0 <= index < len(names):
                targets.append(index)
            else:
                problems[line] = (
                    f"label {_clip(label)!r} is neither an integer in [0, {len(names)}) nor one "
                    f"of the classes {_short(names)}"
                )
        return names, to_idx, targets

    indices = [_index(label) for _, _, label in rows]
    if all(index is not None for index in indices):
        for (line, _, label), index in zip(rows, indices, strict=True):
            assert index is not None
            if index < 0:
                problems[line] = f"label {_clip(label)} is negative; class indices start at 0"
            elif index > _MAX_INDEX:
                problems[line] = (
                    f"label {_clip(label)} is too large for a class index (at most 2**63 - 1, "
                    "what a batch of labels, an int64 tensor, holds)"
                )
            targets.append(index)
        return None, None, targets
    integer = [index is not None for index in indices]
    if any(integer):  # report the fewer kind: that is where the typos are
        odd = sum(integer) <= len(rows) / 2
        for (line, _, label), is_int in zip(rows, integer, strict=True):
            if is_int == odd:
                problems[line] = (
                    f"label {_clip(label)!r} is {'an integer' if odd else 'not an integer'}, but "
                    f"most labels are {'names' if odd else 'integers'}; pass classes=[...] if "
                    "the labels are class names"
                )
        return None, None, []
    for line, _, label in rows:
        if _is_number(label):
            problems[line] = (
                f"label {_clip(label)!r} is a number but not an integer; labels are integer "
                "class indices or class names"
            )
    names = sorted({label for _, _, label in rows})
    to_idx = {name: i for i, name in enumerate(names)}
    return names, to_idx, [to_idx[label] for _, _, label in rows]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _short(names: Sequence[str]) -> str:
    return repr(list(names)) if len(names) <= 10 else f"{list(names[:10])!r} (and more)"


def _collected(problems: list[str], what: str) -> DatasetError:
    listed = "\n".join(f"  {p}" for p in problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    if more > 0:
        listed += f"\n  ... and {more} more (all are in the error's .problems)"
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    return DatasetError(f"{count} {what}:\n{listed}", problems)
