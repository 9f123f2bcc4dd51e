"""Datasets: the real FashionMNIST, found offline or downloaded; images listed in a CSV file."""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import shutil
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import rgb_to_grayscale

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
_MAX_LISTED = 20  # problems spelled out in one message; all of them are in `DatasetError.problems`


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


class CustomImageDataset(Dataset[tuple[Any, Any]]):
    """Images listed in a CSV file of `path,label` rows: the tutorial's `CustomImageDataset`.

    The positional arguments are the tutorial's. The CSV is read with the standard library:
    the first column is an image path relative to `img_dir`, the second its label; further
    columns are ignored, and so are blank lines and spaces around cells (the tutorial's
    `tshirt1.jpg, 0`). All rows are kept: the tutorial's `pd.read_csv` takes the first row of
    its header-less `labels.csv` for a header and silently drops that image; here a header is
    recognised only when its first cell has no file extension and names no file in `img_dir`
    (`file,label` is a header, `tshirt1.jpg,0` is not), and `header=` can say so explicitly.

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

    Attributes:
        samples: `(path relative to img_dir, class index)` for each image, in CSV order.
        targets: The class index of each image.
        classes: The class names in index order, or `None` for integer labels without `classes=`.
        class_to_idx: Name to index, or `None` likewise.
        header: Whether the first row was taken for a header.

    Raises:
        DatasetError: when building: `annotations_file` missing, unreadable, not UTF-8, or
            without rows; `img_dir` not a folder; and, all listed together, rows with fewer
            than two columns or an empty cell, labels that are neither an integer index nor a
            known class (or that mix integers and names, or are numbers but not integers),
            paths that are absolute or climb out of `img_dir`. When loading an image: the file
            is missing, not a regular file, outside `img_dir` through a symlink, empty, in an
            unsupported format, corrupt or truncated, or an animation.
        ValueError: `mode` is not one of the modes above, or `classes` is empty or repeats a
            name.
        TypeError: `classes` is a string rather than a sequence of names.

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
        transform: Callable[[Tensor], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        *,
        mode: ImageMode = "unchanged",
        classes: Sequence[str] | None = None,
        header: bool | None = None,
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
        self.annotations_file = Path(annotations_file)
        self.img_dir = Path(img_dir)
        self.transform = transform
        self.target_transform = target_transform
        self.mode: ImageMode = mode
        if not self.img_dir.is_dir():
            raise DatasetError(f"{self.img_dir}: the image folder (img_dir) does not exist")
        self._root = self.img_dir.resolve()

        rows = _read_csv(self.annotations_file)
        first = rows[0]
        self.header = _looks_like_header(first[1], self._root) if header is None else header
        if self.header:
            rows = rows[1:]
            if not rows:
                raise DatasetError(
                    f"{self.annotations_file}: only a header row ({','.join(first[1])}), no images"
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

    def __getitem__(self, idx: int) -> tuple[Any, Any]:
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
            decode: Also decode every image (slower), which finds corrupt, truncated and
                unsupported files; by default only checks that each file exists inside
                `img_dir` and is a non-empty regular file.

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
                    self._check_file(idx)
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

    def _check_file(self, idx: int) -> Path:
        """The image's real path, checked to be a non-empty regular file inside `img_dir`."""
        where = self._where(idx)
        path = (self._root / self.samples[idx][0]).resolve()
        if not path.is_relative_to(self._root):
            raise DatasetError(
                f"{where}: a symlink leads outside the image folder (to {path}); refused"
            )
        try:
            info = path.stat()
        except FileNotFoundError:
            raise DatasetError(f"{where}: file not found") from None
        except OSError as err:
            raise DatasetError(f"{where}: cannot read: {err.strerror or err}") from err
        if not stat.S_ISREG(info.st_mode):
            raise DatasetError(f"{where}: not a regular file")
        if info.st_size == 0:
            raise DatasetError(f"{where}: empty file")
        return path

    def _read_image(self, idx: int) -> Tensor:
        path = self._check_file(idx)
        where = self._where(idx)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DatasetError(f"{where}: cannot read: {err.strerror or err}") from err
        kind = _image_kind(data)
        if kind is None:
            raise DatasetError(
                f"{where}: unsupported image format (starts with {data[:8]!r}); "
                "CustomImageDataset reads JPEG, PNG, GIF and WebP"
            )
        try:
            if kind == "PNG":
                image = _decode_png(data, self.mode)
            else:
                buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                image = decode_image(buffer, _READ_MODES[self.mode])
        except Image.DecompressionBombError as err:
            raise DatasetError(f"{where}: too large to decode safely: {err}") from err
        except (RuntimeError, ValueError, OSError, SyntaxError, EOFError) as err:
            reason = re.sub(r"^\w+, \S+:\d+, ", "", str(err))  # drop the C++ source location
            raise DatasetError(f"{where}: corrupt or truncated {kind}: {reason}") from err
        if image.ndim == 4:
            if image.shape[0] != 1:
                raise DatasetError(
                    f"{where}: an animation of {image.shape[0]} frames; "
                    "CustomImageDataset reads still images"
                )
            image = image[0]
        return _channels(image, self.mode)


def _channels(image: Tensor, mode: ImageMode) -> Tensor:
    """`image` with the channels `mode` asks for (decode_image ignores it for GIF and WebP)."""
    channels = image.shape[0]
    if mode == "gray" and channels != 1:
        return rgb_to_grayscale(image[:3]) if channels >= 3 else image[:1]
    if mode == "rgb" and channels != 3:
        return image[:3] if channels == 4 else image[:1].expand(3, -1, -1).contiguous()
    return image


def _decode_png(data: bytes, mode: ImageMode) -> Tensor:
    """Decode a PNG with Pillow into a `uint8` tensor `C x H x W` of the channels `mode` asks."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
        im.load()
        if im.mode.startswith("I"):  # 16-bit gray: keep the high byte, as decode_image scales
            array = (np.array(im, dtype=np.uint32) >> 8).astype(np.uint8)
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


def _read_csv(csv_path: Path) -> list[tuple[int, list[str]]]:
    """`(line number, stripped cells)` of each non-blank row; errors name the file and line."""
    try:
        data = csv_path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{csv_path}: annotations file not found") from None
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


def _looks_like_header(cells: list[str], root: Path) -> bool:
    # A header names its column ("file", "image_path"); a data row names a file ("a.png").
    first = cells[0]
    rel = _relative_path(first) if first else None
    return rel is not None and not Path(first).suffix and not (root / rel).is_file()


def _relative_path(cell: str) -> str | None:
    """`cell` normalised, or `None` if it is absolute or climbs out of its folder."""
    if os.path.isabs(cell):
        return None
    normal = os.path.normpath(cell)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        return None
    return normal


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
            if label in to_idx:
                targets.append(to_idx[label])
            elif _INTEGER.fullmatch(label) and 0 <= int(label) < len(names):
                targets.append(int(label))
            else:
                problems[line] = (
                    f"label {label!r} is neither an integer in [0, {len(names)}) nor one of "
                    f"the classes {_short(names)}"
                )
        return names, to_idx, targets

    integer = [bool(_INTEGER.fullmatch(label)) for _, _, label in rows]
    if all(integer):
        for line, _, label in rows:
            if int(label) < 0:
                problems[line] = f"label {label} is negative; class indices start at 0"
            targets.append(int(label))
        return None, None, targets
    if any(integer):  # report the fewer kind: that is where the typos are
        odd = sum(integer) <= len(rows) / 2
        for (line, _, label), is_int in zip(rows, integer, strict=True):
            if is_int == odd:
                problems[line] = (
                    f"label {label!r} is {'an integer' if odd else 'not an integer'}, but most "
                    f"labels are {'names' if odd else 'integers'}; pass classes=[...] if the "
                    "labels are class names"
                )
        return None, None, []
    for line, _, label in rows:
        if _is_number(label):
            problems[line] = (
                f"label {label!r} is a number but not an integer; labels are integer class "
                "indices or class names"
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


def _image_kind(data: bytes) -> str | None:
    """What the file's first bytes say it is, among the formats CustomImageDataset reads."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _short(names: Sequence[str]) -> str:
    return repr(list(names)) if len(names) <= 10 else f"{list(names[:10])!r} (and more)"


def _collected(problems: list[str], what: str) -> DatasetError:
    listed = "\n".join(f"  {p}" for p in problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    if more > 0:
        listed += f"\n  ... and {more} more (all are in the error's .problems)"
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    return DatasetError(f"{count} {what}:\n{listed}", problems)
