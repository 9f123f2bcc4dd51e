"""ModelCheckpoint: confined names, one run per directory, ties, safe file names, the options
people reach for in Keras and Lightning (save_top_k=-1, every_n_epochs, filename templates,
save_weights_only, monitor=None)."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn, optim
from torch.utils.data import DataLoader

import trainkit
from conftest import Scripted, make_three_class, small_net
from trainkit import (
    Callback,
    CheckpointError,
    History,
    ModelCheckpoint,
    TrainState,
    accuracy,
    fit,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from trainkit._lock import DirectoryLock

ENV = {**os.environ, "PYTHONPATH": str(Path(trainkit.__file__).parents[1])}
LOCK = ".trainkit.lock"


class Files(Callback):
    """Records the checkpoint files after each epoch's saves."""

    order = 200

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = dirpath
        self.seen: list[list[str]] = []

    def on_epoch_end(self, state: TrainState) -> None:
        self.seen.append(names(self.dirpath))


def names(dirpath: Path) -> list[str]:
    return sorted(p.name for p in dirpath.iterdir() if not p.name.startswith("."))


def train(
    epochs: int,
    callbacks: list[Callback],
    *,
    resume: Path | None = None,
    valid: bool = False,
    metrics: dict[str, Any] | None = None,
    model: nn.Module | None = None,
) -> History:
    torch.manual_seed(0)
    model = model or small_net()
    return fit(
        epochs,
        model,
        F.cross_entropy,
        optim.SGD(model.parameters(), lr=0.1),
        DataLoader(make_three_class(32), batch_size=16),
        DataLoader(make_three_class(16, seed=1), batch_size=16) if valid else None,
        callbacks=callbacks,
        metrics=metrics or {},
        progress=False,
        resume=resume,
    )


def epochs_kept(dirpath: Path) -> list[int]:
    return sorted(int(m.group(1)) for n in names(dirpath) if (m := re.match(r"epoch=(\d+)", n)))


# --- names read from a checkpoint stay inside dirpath (#17, 3) --------------------------------


@pytest.mark.parametrize("hostile", ["/abs/victim", "../victim"])
def test_a_checkpoint_cannot_make_model_checkpoint_delete_a_file_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hostile: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("the user's file")
    # "/abs/victim" stands for an absolute path: the real file's, so its deletion would show
    name = str(victim) if hostile.startswith("/abs/") else hostile
    ck = tmp_path / "ck"
    writer = ModelCheckpoint(ck)
    crafted = {"best": [[1e9, name]]}  # the worst score: it drops out at the next epoch
    monkeypatch.setattr(writer, "state_dict", lambda: crafted)
    train(1, [Scripted([0.5]), writer])  # a genuine last.ckpt holding the crafted state
    assert (
        load_checkpoint(ck / "last.ckpt", model=small_net()).callbacks["ModelCheckpoint"] == crafted
    )

    with pytest.raises(CheckpointError, match=re.escape(f"names {name!r} as one of its best")):
        train(3, [Scripted([0.5, 0.4, 0.3]), ModelCheckpoint(ck)], resume=ck)
    assert victim.read_text() == "the user's file"


def test_saved_state_that_is_not_a_list_of_pairs_is_refused(tmp_path: Path) -> None:
    mc = ModelCheckpoint(tmp_path)
    for bad in ({"best": "x"}, {"best": [[0.1]]}, {"best": [["0.1", "a.ckpt"]]}, {}):
        with pytest.raises(CheckpointError, match="ModelCheckpoint: the checkpoint's saved"):
            mc.load_state_dict(bad)
    for name in ("last.ckpt", ".trainkit.lock", "notes.txt", "sub/a.ckpt", "..", ""):
        with pytest.raises(CheckpointError, match="not a checkpoint file name inside dirpath"):
            mc.load_state_dict({"best": [[0.1, name]]})
    assert mc.best == []  # refused as a whole
    mc.load_state_dict({"best": [[0.2, "b.ckpt"], [0.1, "a.safetensors"], [0.2, "c.ckpt"]]})
    assert mc.best == [(0.1, "a.safetensors"), (0.2, "b.ckpt"), (0.2, "c.ckpt")]


# --- one run per directory; concurrent writers (#17, 5) ---------------------------------------

HOLDER = """
import os, signal, sys, time
from pathlib import Path
import torch, torch.nn.functional as F
from trainkit import Callback, ModelCheckpoint, fit

ck, flags, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

class Hold(Callback):
    def on_epoch_end(self, state):
        if state.epoch != 0:
            return
        if how == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        (flags / "ready").touch()
        deadline = time.monotonic() + 60
        while not (flags / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)

torch.manual_seed(0)
dl = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))] * 2
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
fit(3, model, F.cross_entropy, opt, dl, dl, callbacks=[Hold(), ModelCheckpoint(ck)],
    progress=False)
"""


def start_holder(tmp_path: Path, ck: Path, how: str) -> subprocess.Popen[str]:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    return subprocess.Popen(
        [sys.executable, str(script), str(ck), str(tmp_path), how],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_a_second_live_run_in_the_same_directory_is_refused_naming_the_first(
    tmp_path: Path,
) -> None:
    ck = tmp_path / "ck"
    first = start_holder(tmp_path, ck, "hold")
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline, "the first run never reached its first epoch end"
            time.sleep(0.02)
        with pytest.raises(RuntimeError, match=rf"is in use by another run \(pid {first.pid} on"):
            train(2, [ModelCheckpoint(ck, save_top_k=0)])
        (tmp_path / "go").touch()
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, err  # the refused run did not disturb the first one
    ckpt = load_checkpoint(ck / "last.ckpt", model=small_net())
    assert (ckpt.epoch, ckpt.epoch_complete) == (2, True)
    assert not (ck / LOCK).exists()  # released at the end of the run
    assert not [p for p in ck.iterdir() if p.name.endswith(".tmp")]


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    dead = start_holder(tmp_path, ck, "die")
    dead.communicate(timeout=120)
    assert dead.returncode == -signal.SIGKILL
    assert (ck / LOCK).read_text().split()[0] == str(dead.pid)  # left behind, stale
    history = train(3, [ModelCheckpoint(ck, save_top_k=0)])
    assert len(history) == 3
    assert not (ck / LOCK).exists()


def test_a_second_run_in_the_same_process_is_refused_too(tmp_path: Path) -> None:
    inner: list[BaseException] = []

    class Nested(Callback):
        def on_epoch_end(self, state: TrainState) -> None:
            try:
                train(1, [ModelCheckpoint(tmp_path, save_top_k=0)])
            except RuntimeError as err:
                inner.append(err)

    train(1, [Nested(), ModelCheckpoint(tmp_path, save_top_k=0)])
    assert len(inner) == 1
    assert f"(pid {os.getpid()}, this very process" in str(inner[0])
    assert names(tmp_path) == ["last.ckpt"]


def test_the_directory_lock_itself(tmp_path: Path) -> None:
    first, second = DirectoryLock(tmp_path, "A"), DirectoryLock(tmp_path, "B")
    first.acquire()
    assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())
    with pytest.raises(RuntimeError, match=r"^B: .* is in use by another run \(pid \d+, this very"):
        second.acquire()
    assert first.held and not second.held
    first.release()
    assert not (tmp_path / LOCK).exists()
    second.acquire()  # free again
    second.release()
    second.release()  # releasing twice is harmless
    (tmp_path / LOCK).write_text("999999999 elsewhere\n")  # a stale file: not locked by anyone
    first.acquire()
    assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())
    first.release()


def test_two_threads_saving_the_same_path_never_raise_nor_mix(tmp_path: Path) -> None:
    path = tmp_path / "shared.ckpt"
    models = [small_net(), small_net()]
    for i, m in enumerate(models):
        m.add_module("pad", nn.Linear(512, 512))  # big enough for the writes to overlap
        for p in m.parameters():
            p.data.fill_(float(i + 1))
    for rnd in range(12):
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def save(model: nn.Module, errors: list[BaseException] = errors, b: Any = barrier) -> None:
            try:
                b.wait()
                save_checkpoint(path, model=model, epoch=0, step=0)
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=save, args=(m,)) for m in models]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == [], f"round {rnd}: {errors}"
        loaded = small_net()
        loaded.add_module("pad", nn.Linear(512, 512))
        load_checkpoint(path, model=loaded)
        values = set(torch.cat([p.detach().flatten() for p in loaded.parameters()]).tolist())
        assert values in ({1.0}, {2.0}), f"round {rnd}: a mixed state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.ckpt"]  # no temporary left


# --- ties and safe names (#16, 4 and 5) --------------------------------------------------------

TIES = [0.9, 0.8, 0.7, 0.5, 0.5, 0.6, 0.6, 0.6, 0.4, 0.4]  # ties at epochs 4/5 and 9/10


def test_ties_keep_the_newer_checkpoint_whatever_the_file_name_order(tmp_path: Path) -> None:
    files = Files(tmp_path)
    mc = ModelCheckpoint(tmp_path, save_top_k=1)
    train(10, [Scripted(TIES), mc, files])
    assert [n for n in files.seen[4] if n != "last.ckpt"] == ["epoch=5-val_loss=0.5000.ckpt"]
    assert names(tmp_path) == ["epoch=10-val_loss=0.4000.ckpt", "last.ckpt"]
    assert mc.best == [(0.4, "epoch=10-val_loss=0.4000.ckpt")]


def test_ties_with_two_kept_drop_the_older_of_the_tied(tmp_path: Path) -> None:
    mc = ModelCheckpoint(tmp_path, save_top_k=2)
    train(10, [Scripted(TIES), mc])
    assert epochs_kept(tmp_path) == [9, 10]
    mc2 = ModelCheckpoint(tmp_path / "b", save_top_k=3)
    train(8, [Scripted(TIES), mc2])
    # 0.5 (4, 5), then 0.6 at 6, 7, 8: of those, the newest, 8
    assert epochs_kept(tmp_path / "b") == [4, 5, 8]
    assert [n for _, n in mc2.best][:2] == [
        "epoch=5-val_loss=0.5000.ckpt",
        "epoch=4-val_loss=0.5000.ckpt",
    ]


def test_a_tie_across_a_resume_keeps_the_newer_too(tmp_path: Path) -> None:
    class CrashAfter(Callback):
        order = 150  # after ModelCheckpoint saved the epoch

        def on_epoch_end(self, state: TrainState) -> None:
            if state.epoch + 1 == 4:
                raise RuntimeError("crash after epoch 4")

    with pytest.raises(RuntimeError, match="crash after epoch 4"):
        train(10, [Scripted(TIES), ModelCheckpoint(tmp_path), CrashAfter()])
    assert names(tmp_path) == ["epoch=4-val_loss=0.5000.ckpt", "last.ckpt"]
    mc = ModelCheckpoint(tmp_path)
    train(10, [Scripted(TIES), mc], resume=tmp_path)
    assert names(tmp_path) == ["epoch=10-val_loss=0.4000.ckpt", "last.ckpt"]
    mc5 = ModelCheckpoint(tmp_path / "b", save_top_k=2)
    with pytest.raises(RuntimeError, match="crash after epoch 4"):
        train(10, [Scripted(TIES), mc5, CrashAfter()])
    mc5 = ModelCheckpoint(tmp_path / "b", save_top_k=2)
    train(5, [Scripted(TIES), mc5], resume=tmp_path / "b")
    assert [n[:7] for _, n in mc5.best] == ["epoch=5", "epoch=4"]


def reference_kept(scores: list[float], k: int) -> list[int]:
    """Epochs kept: the k best, the newer of equal scores first (as Ignite's
    `greater_or_equal=True`); NaN never; `k=-1` every epoch."""
    if k == -1:
        return list(range(1, len(scores) + 1))
    ranked = sorted((s, -e) for e, s in enumerate(scores, start=1) if not math.isnan(s))
    return sorted(-e for _, e in ranked[:k])


@settings(max_examples=25, deadline=None)
@given(
    scores=st.lists(st.sampled_from([0.1, 0.2, 0.3, math.nan]), min_size=1, max_size=9),
    k=st.sampled_from([1, 2, 3, -1]),
    mode=st.sampled_from(["min", "max"]),
)
def test_kept_epochs_match_the_reference_rule(scores: list[float], k: int, mode: Any) -> None:
    values = scores if mode == "min" else [-s for s in scores]
    with tempfile.TemporaryDirectory() as tmp:
        mc = ModelCheckpoint(tmp, save_top_k=k, mode=mode)
        train(len(scores), [Scripted(values), mc])
        assert epochs_kept(Path(tmp)) == reference_kept(scores, k)
        if k != -1:  # best first, of equal scores the newer first
            order = [int(n.split("-")[0].removeprefix("epoch=")) for _, n in mc.best]
            assert order == [-e for _, e in sorted((scores[e - 1], -e) for e in order)]


def test_a_slash_in_a_metric_name_makes_a_safe_file_name(tmp_path: Path) -> None:
    mc = ModelCheckpoint(tmp_path, monitor="val_top/1", mode="max")
    history = train(2, [mc], valid=True, metrics={"top/1": accuracy})
    best = max(range(2), key=lambda i: (history["val_top/1"][i], i))
    value = history["val_top/1"][best]
    assert names(tmp_path) == [f"epoch={best + 1}-val_top_1={value:.4f}.ckpt", "last.ckpt"]
    odd = ModelCheckpoint(tmp_path, filename="{val_a b*?\\}")
    assert odd.format_name({"val_a b*?\\": 0.5}) == "val_a_b___=0.5.ckpt"


# --- the options ---------------------------------------------------------------------------------


def test_save_top_k_minus_one_keeps_every_epoch(tmp_path: Path) -> None:
    mc = ModelCheckpoint(tmp_path, save_top_k=-1)
    train(4, [Scripted([0.5, 0.7, 0.6, math.nan]), mc])
    assert epochs_kept(tmp_path) == [1, 2, 3, 4]
    assert [n[:7] for _, n in mc.best] == ["epoch=1", "epoch=3", "epoch=2", "epoch=4"]
    assert len(names(tmp_path)) == 5  # and last.ckpt


def test_every_n_epochs_saves_at_its_multiples_and_last_at_the_end(tmp_path: Path) -> None:
    files = Files(tmp_path)
    mc = ModelCheckpoint(tmp_path, every_n_epochs=2, save_top_k=-1)
    train(5, [Scripted([0.5] * 5), mc, files])
    assert files.seen[0] == []  # nothing at epoch 1
    assert epochs_kept(tmp_path) == [2, 4]
    assert load_checkpoint(mc.last_path, model=small_net()).epoch == 4  # the run's last epoch
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(every_n_epochs=...\): expected an int"):
        ModelCheckpoint(tmp_path, every_n_epochs=0)


def test_filename_templates(tmp_path: Path) -> None:
    mc = ModelCheckpoint(tmp_path, filename="{epoch}-{val_loss:.4f}", save_top_k=1)
    train(2, [Scripted([0.25, 0.125]), mc])
    assert names(tmp_path) == ["epoch=2-val_loss=0.1250.ckpt", "last.ckpt"]
    mc = ModelCheckpoint(tmp_path / "s", filename="best-{step:05d}", save_top_k=1)
    train(1, [Scripted([0.5]), mc])  # 2 steps per epoch
    assert names(tmp_path / "s") == ["best-step=00002.ckpt", "last.ckpt"]


def test_filename_templates_are_checked_when_built(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"filename='\{epoch\}-\{vall_loss\}'\): unknown field 'vall_loss'; fields are the "
        r"names a run records: epoch, step, train_loss, lr, seconds, val_loss and val_<metric>",
    ):
        ModelCheckpoint(tmp_path, filename="{epoch}-{vall_loss}")
    for bad, problem in [
        ("{val_loss:d}", "the format 'd' of 'val_loss' does not apply"),
        ("runs/{epoch}", "'/' is not safe in a file name"),
        ("{epoch", "not a valid template"),
        ("{epoch!r}", "fields are names with an optional format"),
        ("{}", "fields are names with an optional format"),
        ("{epoch}.ckpt", "give the name without extension"),
        (".{epoch}", "would be a hidden file"),
    ]:
        with pytest.raises(ValueError, match=re.escape(problem)):
            ModelCheckpoint(tmp_path, filename=bad)
    # a field the run does not record is refused before the first step, with the names it records
    with pytest.raises(ValueError, match=r"filename='\{val_acc\}'\): this run does not record"):
        train(1, [ModelCheckpoint(tmp_path / "k", filename="{val_acc}")], valid=True)


def test_repeated_names_get_a_version_instead_of_overwriting_a_kept_file(tmp_path: Path) -> None:
    mc = ModelCheckpoint(tmp_path, filename="best", save_top_k=2)
    train(3, [Scripted([0.5, 0.4, 0.3]), mc])
    assert names(tmp_path) == ["best-v1.ckpt", "best.ckpt", "last.ckpt"]
    assert [n for _, n in mc.best] == ["best.ckpt", "best-v1.ckpt"]  # 0.3 (3) then 0.4 (2)
    assert load_checkpoint(tmp_path / "best.ckpt", model=small_net()).epoch == 2
    assert load_checkpoint(tmp_path / "best-v1.ckpt", model=small_net()).epoch == 1
    with pytest.raises(ValueError, match="give the name without extension"):
        ModelCheckpoint(tmp_path, filename="last.ckpt")
    mc = ModelCheckpoint(tmp_path / "l", filename="last", save_top_k=1)
    train(1, [Scripted([0.5]), mc])
    assert names(tmp_path / "l") == ["last-v1.ckpt", "last.ckpt"]


def test_save_weights_only_keeps_the_models_weights_as_safetensors(tmp_path: Path) -> None:
    weights: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(Callback):
        def on_epoch_end(self, state: TrainState) -> None:
            weights[state.epoch + 1] = {k: v.clone() for k, v in state.model.state_dict().items()}

    mc = ModelCheckpoint(tmp_path, save_weights_only=True, save_top_k=1)
    train(3, [Snapshot(), Scripted([0.5, 0.3, 0.4]), mc])
    assert names(tmp_path) == ["epoch=2-val_loss=0.3000.safetensors", "last.ckpt"]
    restored = load_weights(tmp_path / "epoch=2-val_loss=0.3000.safetensors", small_net())
    for key, value in restored.state_dict().items():
        assert torch.equal(value, weights[2][key])  # bitwise that epoch's weights
    import safetensors.torch

    assert set(safetensors.torch.load_file(str(tmp_path / names(tmp_path)[0]))) == {
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    }  # the model alone
    assert load_checkpoint(mc.last_path, model=small_net()).epoch == 2  # still resumable


def test_save_weights_only_without_safetensors_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "safetensors" else real(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'trainkit\[safetensors\]'"):
        ModelCheckpoint(tmp_path, save_weights_only=True)


def test_monitor_none_keeps_last_only(tmp_path: Path) -> None:
    mc = ModelCheckpoint(tmp_path, monitor=None)
    train(3, [mc])  # no validation data, nothing monitored
    assert names(tmp_path) == ["last.ckpt"]
    assert load_checkpoint(mc.last_path, model=small_net()).epoch == 2
    every = ModelCheckpoint(tmp_path / "all", monitor=None, save_top_k=-1)
    train(3, [every])
    assert names(tmp_path / "all") == ["epoch=1.ckpt", "epoch=2.ckpt", "epoch=3.ckpt", "last.ckpt"]
    with pytest.raises(ValueError, match=r"save_top_k=2, monitor=None\): without a monitor"):
        ModelCheckpoint(tmp_path, monitor=None, save_top_k=2)
    with pytest.raises(ValueError, match=r"monitor=None, save_last=False\): this would write"):
        ModelCheckpoint(tmp_path, monitor=None, save_last=False)


def test_a_run_that_fails_to_start_leaves_no_directory_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"fit\(resume='typo'\): no such file"):
        train(2, [ModelCheckpoint("runs/ck")], resume=Path("typo"), valid=True)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    stale = [f".last.ckpt.{pid}.tmp", f".epoch=1-val_loss=0.5000.ckpt.{pid}.140.0a1b2c3d.tmp"]
    alive = f".last.ckpt.{os.getpid()}.7.0a1b2c3d.tmp"  # this process may still be writing it
    for name in [*stale, alive, ".notes.tmp"]:
        (tmp_path / name).write_text("x")
    train(1, [ModelCheckpoint(tmp_path, save_top_k=0)])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(
        [alive, ".notes.tmp"]
    )


def test_a_misspelled_template_field_is_refused_before_the_first_step(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dl = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    mc = ModelCheckpoint(tmp_path / "ck", filename="{epoch}-{val_acc:.3f}")
    with pytest.raises(ValueError, match=r"filename=.*does not record 'val_acc'"):
        fit(1, model, F.cross_entropy, opt, dl, dl, callbacks=[mc], progress=False)
    assert not (tmp_path / "ck").exists()
