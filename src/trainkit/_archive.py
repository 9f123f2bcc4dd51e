"""Checkpoint files on disk: atomic writes (temporary file, fsync, rename, fsync the
directory) and safe reading (the zip archive verified from its own headers and checksums, then
`torch.load(weights_only=True)`; safetensors files)."""

from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import shutil
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainkit._checks import check_fields
from trainkit._format import CheckpointError
from trainkit._sharded import drop_shards


def atomic_save(payload: Any, path: Path) -> Path:
    if not torch.serialization.get_crc32_options():
        raise ValueError(
            f"cannot write {path}: torch.serialization.set_crc32_options(False) is in effect, "
            "and trainkit checks every record's CRC-32 when loading; set it back to True"
        )
    return atomic_write(path, lambda f: torch.save(payload, f))


def save_with_shards(payload: dict[str, Any], path: Path, manifest: dict[str, Any]) -> Path:
    """Rank 0's part of a sharded save: the file, naming the shards just written for it (the
    atomic rename is the switch to them), then the shards of `path`'s earlier saves removed.
    If the file cannot be written, the new shards are removed and the old file stays."""
    try:
        _fsync_dir(path.parent / manifest["dir"])  # its entries durable before the switch
        atomic_save({**payload, "sharded": manifest}, path)
    except BaseException:
        shutil.rmtree(path.parent / manifest["dir"], ignore_errors=True)
        raise
    drop_shards(path, keep=manifest["dir"])
    return path


def atomic_write(path: Path, write: Any) -> Path:
    """Write through a temporary file in the same directory, fsync, rename, fsync the directory."""
    # unique per process, thread and call: two writers of one path never share a temporary file
    unique = f"{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}"
    tmp = path.with_name(f".{path.name}.{unique}.tmp")
    try:
        with open(tmp, "wb") as f:
            writer = _Writer(f)
            try:
                write(writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None  # torch.save hides a failed write (a full disk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        _remove(tmp)
        raise OSError(err.errno, f"could not write {path}: {err.strerror or err}") from err
    except BaseException:
        _remove(tmp)
        raise
    return path


class _Writer:
    """A file's `write`, remembering the first OSError (torch.save reports it as RuntimeError)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return int(self.f.write(data))
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def _remove(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Path, map_location: torch.device | str) -> dict[str, Any]:
    """The checkpoint at `path`, its archive verified, loaded safely and every field checked.

    Raises:
        CheckpointError: anything wrong with the file (named, with the file).
    """
    data: dict[str, Any] = load_file(path, map_location, require_zip=True)
    check_fields(path, data)
    return data


_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 20
_DOS_DIRECTORY = 0x10  # the directory bit of a zip record's external attributes


def load_file(path: Path, map_location: torch.device | str, *, require_zip: bool) -> Any:
    """Verify the archive (checksums, no compression), then `torch.load(weights_only=True)`."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read: {err}") from err
    if head == _ZIP_MAGIC or zipfile.is_zipfile(path):
        verify_archive(path)
    elif require_zip:
        raise CheckpointError(
            f"{path}: damaged or not a trainkit checkpoint: not a torch.save zip archive"
        )  # a file in torch's legacy format (not a zip) has no checksums: weights only
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain values, and "
            "loading them could run code. If you made this file yourself with "
            "torch.save(model, ...), use unsafe_load_pickled_model(path)."
        ) from err
    except Exception as err:  # whatever a damaged file makes torch raise, named as damage
        raise CheckpointError(
            f"{path}: damaged or not a torch file: {type(err).__name__}: {err}"
        ) from err


def verify_archive(path: Path) -> None:
    """Check a `torch.save` zip archive from its own headers before anything is unpickled.

    Every record must be stored uncompressed (`torch.save` never compresses; a compressed
    record could inflate to gigabytes before any shape is checked: a deflate bomb) and must
    match the CRC-32 the archive records for it, read in 1 MiB chunks (bounded memory).
    """
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            for info in records:
                if info.is_dir() or info.external_attr & _DOS_DIRECTORY:
                    # torch's reader (miniz) reads a "directory" as empty, not as its bytes
                    raise CheckpointError(
                        f"{path}: damaged: record {info.filename!r} is marked as a directory"
                    )
                if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                    raise CheckpointError(
                        f"{path}: refused: record {info.filename!r} is compressed "
                        f"({_bytes(info.compress_size)} inflating to {_bytes(info.file_size)}); "
                        "torch.save never compresses, so the file is damaged or crafted"
                    )
            if sum(info.file_size for info in records) > size:
                raise CheckpointError(
                    f"{path}: damaged: its records add up to more than the file's {size} bytes"
                )
            for info in records:
                with archive.open(info) as record:  # raises at the end on a CRC-32 mismatch
                    while record.read(_CHUNK):
                        pass
    except CheckpointError:
        raise
    except Exception as err:  # zipfile raises BadZipFile, but also OSError, ValueError, ...
        hint = ""
        if "CRC" in str(err) and not torch.serialization.get_crc32_options():
            hint = " (torch.serialization.set_crc32_options(False) writes no checksums)"
        raise CheckpointError(
            f"{path}: damaged: the archive fails its check ({type(err).__name__}: {err}){hint}"
        ) from err


def _bytes(n: int) -> str:
    if n < 1000:
        return f"{n} bytes"
    for power, unit in ((3, "GB"), (2, "MB"), (1, "KB")):
        if n >= 1000**power:
            return f"{n / 1000**power:.1f} {unit}"
    raise AssertionError  # unreachable: n >= 1000


def load_safetensors(path: Path, map_location: torch.device | str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    # a safetensors file: an 8-byte header length, then the header, a JSON object
    if head[8:9] != b"{" and (head[:4] == _ZIP_MAGIC or head[:1] == b"\x80"):
        kind = "a torch.save zip archive" if head[:4] == _ZIP_MAGIC else "a pickle"
        raise CheckpointError(
            f"{path}: named .safetensors but it is {kind}, not a safetensors file; rename it "
            "(e.g. to .pth) and load it with load_weights, which reads only tensors from it"
        )
    safetensors_torch = safetensors_module()
    try:
        return safetensors_torch.load_file(str(path), device=str(map_location))
    except Exception as err:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from err


def check_safe(value: Any, where: str) -> None:
    if isinstance(value, Tensor) and type(value) not in (Tensor, torch.nn.Parameter):
        # a DTensor (a sharded model's parameter): rank 0 would save its own shard alone
        raise TypeError(
            f"{where}: a {type(value).__name__} cannot be saved in a checkpoint file: it is one "
            "process's part of a tensor (a model sharded by fully_shard); save plain tensors "
            "(DTensor.full_tensor()) or leave them out"
        )
    if value is None or isinstance(value, bool | int | float | str | Tensor | torch.dtype):
        return
    if isinstance(value, list | tuple):
        for item in value:
            check_safe(item, where)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            check_safe(k, where)
            check_safe(v, where)
        return
    raise TypeError(
        f"{where}: a {type(value).__name__} cannot be loaded safely; use tensors, numbers, "
        "strings, and lists / tuples / dicts of them"
    )


def safetensors_module() -> Any:
    try:
        import safetensors.torch
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the .safetensors format needs the safetensors package: "
            "pip install 'trainkit[safetensors]'"
        ) from err
    return safetensors.torch
