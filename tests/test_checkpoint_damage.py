"""Damaged and malformed checkpoint files: each is refused with a `CheckpointError` naming the
file and the problem, or (a flipped bit in a part nothing reads) loads exactly as the original."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.utils.data import DataLoader, TensorDataset

from conftest import small_net
from trainkit import (
    Checkpoint,
    CheckpointError,
    ModelCheckpoint,
    fit,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)


def objects() -> tuple[nn.Sequential, optim.Optimizer, optim.lr_scheduler.StepLR]:
    model = small_net()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


def equal(a: Any, b: Any) -> bool:
    """Bitwise equality of nested states (tensors, dicts, lists, numbers)."""
    if isinstance(a, Tensor):
        return (
            isinstance(b, Tensor)
            and (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device)
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return type(a) is type(b) and bool(a == b)


RECORD_FIELDS = (
    "format_version", "epoch", "step", "global_step", "epoch_complete", "restored", "extra",
    "history", "callbacks", "rng", "epoch_rng", "train_loss", "classes", "loader",
)  # fmt: skip


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, nn.Module]:
    """A checkpoint of a model that took one step (momentum buffers, a scheduler step)."""
    torch.manual_seed(0)
    model, opt, sched = objects()
    loss = F.cross_entropy(model(torch.randn(5, 4)), torch.zeros(5, dtype=torch.long))
    torch.autograd.backward(loss)
    opt.step()
    sched.step()
    path = tmp_path / "c.ckpt"
    save_checkpoint(
        path, model=model, optimizer=opt, scheduler=sched, epoch=2, step=3,
        extra={"note": "hello", "t": torch.arange(4)},
    )  # fmt: skip
    return path, model


def load_all(path: Path) -> tuple[nn.Module, optim.Optimizer, Any, Checkpoint]:
    model, opt, sched = objects()
    ckpt = load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    return model, opt, sched, ckpt


def same_load(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return (
        equal(a[0].state_dict(), b[0].state_dict())
        and equal(a[1].state_dict(), b[1].state_dict())
        and equal(a[2].state_dict(), b[2].state_dict())
        and all(equal(getattr(a[3], f), getattr(b[3], f)) for f in RECORD_FIELDS)
    )


def record_data(path: Path, contents: bytes) -> int:
    """The offset in the file of the first byte of the record whose data is `contents`."""
    whole = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if archive.read(info) == contents:
                header = whole[info.header_offset : info.header_offset + 30]
                name_len = int.from_bytes(header[26:28], "little")
                extra_len = int.from_bytes(header[28:30], "little")
                return info.header_offset + 30 + name_len + extra_len
    raise AssertionError("no such record")


# --- 7: damage ------------------------------------------------------------------------------------


def test_one_bit_flipped_in_a_tensor_record_is_refused(saved: tuple[Path, nn.Module]) -> None:
    path, model = saved
    weight = model.state_dict()["0.weight"]
    offset = record_data(path, weight.numpy().tobytes())
    damaged = bytearray(path.read_bytes())
    damaged[offset + 5] ^= 0b0000_0100  # one bit of one float of the first layer's weight
    path.write_bytes(bytes(damaged))
    with pytest.raises(
        CheckpointError, match=r"c\.ckpt: damaged: the archive fails its check.*CRC"
    ):
        load_all(path)
    with pytest.raises(CheckpointError, match=r"c\.ckpt: damaged"):
        load_weights(path, small_net())


def test_a_record_flipped_into_a_directory_is_refused(saved: tuple[Path, nn.Module]) -> None:
    """One bit the CRC-32s do not cover but torch's reader does: a record's directory flag (it
    then reads the record as empty). Found by flipping every bit outside the records' data."""
    path, _ = saved
    whole = bytearray(path.read_bytes())
    entries = [i for i in range(len(whole)) if whole[i : i + 4] == b"PK\x01\x02"]
    assert len(entries) > 5
    for entry in entries:
        damaged = bytearray(whole)
        damaged[entry + 38] ^= 0x10  # the DOS directory bit of the external attributes
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match=r"c\.ckpt: damaged: record .* directory"):
            load_all(path)


def test_every_random_single_bit_flip_is_refused_or_loads_identically(
    saved: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    """A bounded sample: 300 bits drawn over the whole file (headers, pickle, tensors)."""
    path, _ = saved
    original = path.read_bytes()
    reference = load_all(path)
    rng = random.Random(17)
    flipped = tmp_path / "flipped.ckpt"
    outcomes = {"refused": 0, "identical": 0}
    for _ in range(300):
        bit = rng.randrange(len(original) * 8)
        damaged = bytearray(original)
        damaged[bit // 8] ^= 1 << (bit % 8)
        flipped.write_bytes(bytes(damaged))
        try:
            loaded = load_all(flipped)
        except CheckpointError as err:
            assert "flipped.ckpt" in str(err)
            outcomes["refused"] += 1
            continue
        assert same_load(loaded, reference), f"bit {bit} loaded a different state"
        outcomes["identical"] += 1
    assert outcomes["refused"] > 250  # nearly every byte of the file is checked


def test_files_without_checksums_are_not_written(tmp_path: Path) -> None:
    torch.serialization.set_crc32_options(False)
    try:
        with pytest.raises(ValueError, match=r"set_crc32_options\(False\) is in effect"):
            save_checkpoint(tmp_path / "c.ckpt", model=small_net(), epoch=0, step=0)
        with pytest.raises(ValueError, match=r"set_crc32_options\(False\) is in effect"):
            save_weights(tmp_path / "w.pth", small_net())
    finally:
        torch.serialization.set_crc32_options(True)
    assert list(tmp_path.iterdir()) == []


# --- 12: malformed files --------------------------------------------------------------------------


def rewrite(path: Path, name: str, change: Any) -> Path:
    """A copy of the checkpoint at `path` with its dict changed by `change` (a valid archive)."""
    data = torch.load(path, weights_only=True)
    change(data)
    out = path.with_name(name)
    torch.save(data, out)
    return out


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("no-model.ckpt", lambda d: d.pop("model"), r"missing fields model"),
        ("no-epoch.ckpt", lambda d: d.pop("epoch"), r"missing fields epoch"),
        ("int-key.ckpt", lambda d: d.update({1: 2}), r"field names that are not strings: \[1\]"),
        (
            "int-weight-keys.ckpt",
            lambda d: d.update(model={0: torch.zeros(8, 4)}),
            r"field 'model' has a key 0 that is not a string",
        ),
        (
            "string-weight.ckpt",
            lambda d: d["model"].update({"0.weight": "abc"}),
            r"field 'model' holds a str under '0\.weight' where a tensor belongs",
        ),
        (
            "version-0.ckpt",
            lambda d: d.update(format_version=0),
            r"format_version 0 was never written by any trainkit",
        ),
        (
            "version-minus-1.ckpt",
            lambda d: d.update(format_version=-1),
            r"format_version -1 was never written by any trainkit",
        ),
        (
            "version-none.ckpt",
            lambda d: d.update(format_version=None),
            r"format_version None was never written by any trainkit",
        ),
        (
            "version-1.ckpt",
            lambda d: d.update(format_version=1),
            r"format version 1 was written by a pre-release of trainkit.*load_weights",
        ),
        (
            "no-version.ckpt",
            lambda d: d.pop("format_version"),
            r"no format_version field",
        ),
    ],
)
def test_malformed_fields_are_named(
    saved: tuple[Path, nn.Module], name: str, change: Any, message: str
) -> None:
    path, _ = saved
    bad = rewrite(path, name, change)
    model = small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"{name}: .*{message}"):
        load_checkpoint(bad, model=model)
    assert equal(model.state_dict(), before)


def test_a_pickle_named_safetensors_is_named_as_such(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    model = small_net()
    torch.save(model.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"w\.safetensors: named \.safetensors but it is a torch\.save zip archive, not a "
        r"safetensors file",
    ):
        load_weights(tmp_path / "w.safetensors", small_net())
    import pickle

    with open(tmp_path / "p.safetensors", "wb") as f:
        pickle.dump({k: v.numpy() for k, v in model.state_dict().items()}, f)
    with pytest.raises(CheckpointError, match=r"p\.safetensors: .* it is a pickle"):
        load_weights(tmp_path / "p.safetensors", small_net())


def save_as_if_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tag every saved tensor as a CUDA tensor, as torch.save does on a GPU."""
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine is the case")
def test_a_gpu_written_checkpoint_loads_onto_the_models_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model, opt, sched = objects()
    with monkeypatch.context() as patch:
        save_as_if_on_gpu(patch)
        save_checkpoint(
            tmp_path / "gpu.ckpt", model=model, optimizer=opt, scheduler=sched, epoch=0, step=1
        )
    with pytest.raises(RuntimeError, match="CUDA"):  # the file really is tagged for a GPU
        torch.load(tmp_path / "gpu.ckpt", weights_only=True)
    for kwargs in ({}, {"map_location": "cpu"}):
        other, other_opt, other_sched = objects()
        ckpt = load_checkpoint(
            tmp_path / "gpu.ckpt", model=other, optimizer=other_opt, scheduler=other_sched,
            **kwargs,  # type: ignore[arg-type]
        )  # fmt: skip
        assert ckpt.restored == ["model", "optimizer", "scheduler"]
        assert equal(other.state_dict(), model.state_dict())
    assert equal(load_weights(tmp_path / "gpu.ckpt", small_net()).state_dict(), model.state_dict())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine is the case")
def test_fit_resumes_a_gpu_written_run_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    model = small_net()
    with monkeypatch.context() as patch:
        save_as_if_on_gpu(patch)
        fit(1, model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
            DataLoader(ds, batch_size=8), callbacks=[ModelCheckpoint(tmp_path, save_top_k=0)],
            progress=False)  # fmt: skip
    resumed = small_net()
    history = fit(2, resumed, F.cross_entropy, optim.SGD(resumed.parameters(), lr=0.1),
                  DataLoader(ds, batch_size=8), progress=False, resume=tmp_path)  # fmt: skip
    assert [r["epoch"] for r in history] == [1, 2]


MIB = 1 << 20
BOMB_MIB = 954  # 1.0 GB of float32 zeros when inflated, about 980 KB deflated
BOMB_ELEMENTS = BOMB_MIB * MIB // 4


def deflated_zeros(n_mib: int) -> tuple[bytes, int]:
    """A raw deflate stream of `n_mib` MiB of zeros, and their CRC-32, without deflating a GiB:
    after a full flush the compressor starts afresh, so every MiB deflates to the same bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(MIB)) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(bytes(MIB)) + c.flush(zlib.Z_FULL_FLUSH) == block
    crc = 0
    for _ in range(n_mib):
        crc = zlib.crc32(bytes(MIB), crc)
    return block * n_mib + zlib.compressobj(9, zlib.DEFLATED, -15).flush(), crc


def write_zip(out: Path, records: list[tuple[str, bytes, int, int, int]]) -> None:
    """A plain zip archive: (name, data as stored, method, CRC-32, inflated size) per record."""
    body, central = bytearray(), bytearray()
    for name, data, method, crc, size in records:
        encoded = name.encode()
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(data), size,
            len(encoded), 0, 0, 0, 0, 0, len(body),
        ) + encoded  # fmt: skip
        body += struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data), size,
            len(encoded), 0,
        ) + encoded + data  # fmt: skip
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(central), len(body), 0
    )
    out.write_bytes(bytes(body + central + end))


def deflate_bomb(good: Path, out: Path) -> None:
    """A checkpoint whose one weight is 1.0 GB of floats, its record deflated to under 1 MB.

    Built from a real checkpoint of `nn.Linear(251, 1, bias=False)`: the pickle's element count,
    shape and stride (251 = 0xFB, an int found nowhere else) are rewritten, and the weight's
    record replaced by a deflated stream of 1 GiB of zeros.
    """
    records = []
    with zipfile.ZipFile(good) as src:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                # numel, size (1, 251) and stride (251, 1); protocol 2 has no frames to fix
                assert data.count(b"K\xfb") == 3
                data = data.replace(b"K\xfb", b"J" + BOMB_ELEMENTS.to_bytes(4, "little"))
            if "/data/" in info.filename and info.file_size == 251 * 4:
                deflated, crc = deflated_zeros(BOMB_MIB)
                records.append((info.filename, deflated, zipfile.ZIP_DEFLATED, crc, BOMB_MIB * MIB))
            else:
                records.append((info.filename, data, 0, zlib.crc32(data), len(data)))
    write_zip(out, records)


def test_a_deflate_bomb_is_refused_from_the_headers_with_bounded_memory(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "good.ckpt", model=nn.Linear(251, 1, bias=False), epoch=0, step=0)
    bomb = tmp_path / "bomb.ckpt"
    deflate_bomb(tmp_path / "good.ckpt", bomb)
    assert bomb.stat().st_size < 1000 * 1024  # about 980 KiB
    script = f"""
import resource, torch
from torch import nn
from trainkit import CheckpointError, load_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_checkpoint({str(bomb)!r}, model=nn.Linear(251, 1, bias=False))
except CheckpointError as err:
    print("CheckpointError:", err)
print("grew KiB:", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert "CheckpointError:" in result.stdout, result.stdout + result.stderr
    assert "bomb.ckpt: refused: record 'archive/data/" in result.stdout
    assert "inflating to 1.0 GB" in result.stdout
    grew = int(result.stdout.split("grew KiB:")[1])
    assert grew < 100_000, f"loading grew the process by {grew} KiB"
