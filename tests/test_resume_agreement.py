"""One resume decision for every process: rank 0 decides which checkpoint (or, with
`resume="auto"`, that there is none and the run starts fresh), every rank reads that file, and
a rank that cannot read it, or reads another file there (each node's own disk), fails every
rank with one clear error: no hang, no collective mismatch. Child processes, bounded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

from test_preemption import EPOCHS, launch
from trainkit import CheckpointError, ModelCheckpoint, fit, seed_everything


def run(dirpath: Path | None, epochs: int, resume: str | None) -> list[dict[str, float]]:
    seed_everything(0)
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(3))
    ds = TensorDataset(x, (x[:, 0] > 0).long())
    model = nn.Linear(4, 2)
    callbacks = [ModelCheckpoint(dirpath, monitor=None)] if dirpath is not None else []
    history = fit(epochs, model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                  DataLoader(ds, batch_size=8, shuffle=True), progress=False,
                  callbacks=callbacks, resume=resume)  # fmt: skip
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history.records]


def test_resume_auto_starts_fresh_when_nothing_is_there_then_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = run(None, 3, None)
    dirpath = tmp_path / "missing" / "runs"
    first = run(dirpath, 2, "auto")  # nothing there yet: a new run
    assert (
        f"resume='auto': no last.ckpt in {dirpath}; starting a new run" in capsys.readouterr().err
    )
    assert first == reference[:2]
    assert run(dirpath, 3, "auto") == reference  # the same line continues it
    assert "starting a new run" not in capsys.readouterr().err


def test_resume_auto_needs_exactly_one_model_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"resume='auto'.*this run has 0 ModelCheckpoint"):
        run(None, 1, "auto")


def test_a_typo_still_errors_and_a_damaged_checkpoint_is_not_a_fresh_start(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"fit\(resume='typo'\): no such file or directory"):
        run(tmp_path / "runs", 1, "typo")
    (tmp_path / "runs").mkdir(exist_ok=True)
    (tmp_path / "runs" / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"last\.ckpt"):
        run(tmp_path / "runs", 1, "auto")


def test_ranks_that_read_another_file_or_none_fail_together(tmp_path: Path) -> None:
    """Each "node" (a working directory) has its own `ckpt/` on its own disk."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir()
    node1.mkdir()
    assert launch(1, Path("ckpt"), "1", cwd=[node0]).codes == [0]
    shutil.copytree(node0 / "ckpt", node1 / "ckpt")  # node 1 holds the first epoch's
    assert launch(1, Path("ckpt"), "2", cwd=[node0]).codes == [0]  # node 0 the second's
    ended = launch(2, Path("ckpt"), str(EPOCHS), cwd=[node0, node1])
    assert ended.codes[0] != 0 and ended.codes[1] != 0
    for err in ended.stderr:
        assert "ckpt/last.ckpt is not the same checkpoint on every process" in err, err
        assert "rank 0: epoch index 1" in err and "rank 1: epoch index 0" in err
    (node1 / "ckpt" / "last.ckpt").unlink()  # node 1 holds none
    ended = launch(2, Path("ckpt"), str(EPOCHS), cwd=[node0, node1])
    assert ended.codes[0] != 0 and ended.codes[1] != 0
    for err in ended.stderr:
        assert "rank 0 resumes from it, but not every process can read it (rank 1: " in err, err
        assert "put the checkpoint directory on a filesystem all nodes share" in err


def test_resume_from_nothing_fails_every_rank_with_the_same_error(tmp_path: Path) -> None:
    ended = launch(2, tmp_path / "ckpt", "1", "--resume", str(tmp_path / "nowhere"))
    assert ended.codes[0] != 0 and ended.codes[1] != 0
    for err in ended.stderr:
        assert f"fit(resume={str(tmp_path / 'nowhere')!r}): no such file or directory" in err
