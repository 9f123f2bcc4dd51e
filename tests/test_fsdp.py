"""FSDP2 through `fit`: a model sharded with `fully_shard` is trained as it is (no DDP around it),
validated without per-forward collectives, and checkpointed in shards with
`torch.distributed.checkpoint`; the same `ModelCheckpoint` and `fit(resume=...)`. Two processes
on gloo over loopback, against one process (tests/fsdp_child.py); every run bounded in time."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from procs import Ended, launch
from trainkit import CheckpointError, load_checkpoint, load_weights

CHILD = Path(__file__).with_name("fsdp_child.py")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def run(n: int, dirpath: Path, *args: str) -> Ended:
    ended = launch(CHILD, n, str(dirpath), *args, timeout=120)
    return ended


def final(dirpath: Path) -> dict[str, Any]:
    result: dict[str, Any] = torch.load(dirpath / "final.pt", weights_only=True)
    return result


def model() -> torch.nn.Sequential:
    from fsdp_child import make_model

    return make_model()


def assert_close_runs(a: dict[str, Any], b: dict[str, Any]) -> None:
    """The same training up to rounding (different reductions of the same sums)."""
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5)
    assert len(a["records"]) == len(b["records"])
    for x, y in zip(a["records"], b["records"], strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process FSDP2 run: 3 epochs, a checkpoint every 4 steps, top 2."""
    dirpath = tmp_path_factory.mktemp("sharded")
    ended = run(2, dirpath, "3", "--every", "4", "--top-k", "2")
    assert ended.codes == [0, 0], ended.stderr
    return dirpath


def test_a_sharded_model_trains_as_it_is_and_agrees_with_one_process_and_ddp(
    tmp_path: Path,
) -> None:
    runs = {}
    for name, n, extra in (("fsdp", 2, ()), ("ddp", 2, ("--ddp",)), ("one", 1, ())):
        (tmp_path / name).mkdir()
        ended = run(n, tmp_path / name, "2", "--accumulate", "2", "--clip", "0.5", *extra)
        assert ended.codes == [0] * n, ended.stderr
        runs[name] = final(tmp_path / name)
    assert_close_runs(runs["fsdp"], runs["one"])
    assert_close_runs(runs["fsdp"], runs["ddp"])
    # evaluate and predict after fit, over shards of 3 and 2 batches: no hang, the same figures
    for key, value in runs["one"]["evaluated"].items():
        assert runs["fsdp"]["evaluated"][key] == pytest.approx(value, rel=1e-5)
    rows = runs["one"]["predicted"][0::2]  # rank 0's shard: samples 0, 2, 4, ...
    torch.testing.assert_close(runs["fsdp"]["predicted"], rows, rtol=1e-4, atol=1e-5)
    assert runs["fsdp"]["model"].keys() == model().state_dict().keys()  # no wrapper's prefix
    assert runs["fsdp"]["gathered"] == [True, True]  # every block whole, then sharded again


def test_checkpoints_are_sharded_and_old_shards_go_with_their_files(sharded: Path) -> None:
    files = sorted(p.name for p in sharded.glob("*.ckpt"))
    shard_dirs = sorted(p.name for p in sharded.glob("*.shards-*"))
    assert "last.ckpt" in files and len(files) == 3  # last + the best 2
    # one directory per checkpoint file, named by it: earlier saves' directories were removed
    assert [d.split(".shards-")[0] for d in shard_dirs] == files
    for d in shard_dirs:
        names = {p.name for p in (sharded / d).iterdir()}
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= names  # each rank its shard


def test_a_sharded_checkpoint_loads_into_a_plain_model_in_one_process(sharded: Path) -> None:
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    ckpt = load_checkpoint(sharded / "last.ckpt", model=m, optimizer=opt)
    assert ckpt.restored == ["model", "optimizer"]
    for key, value in final(sharded)["model"].items():
        assert torch.equal(m.state_dict()[key], value)  # the run's weights, bitwise
    assert set(opt.state_dict()["state"]) == set(range(6))  # Adam's moments, per parameter
    plain = load_weights(sharded / "last.ckpt", model())
    for key, value in final(sharded)["model"].items():
        assert torch.equal(plain.state_dict()[key], value)


def test_sigterm_saves_shards_and_the_resumed_run_is_bitwise_the_uninterrupted_one(
    sharded: Path, tmp_path: Path
) -> None:
    ended = run(2, tmp_path, "3", "--every", "4", "--top-k", "2", "--term", "1", "5")
    assert ended.codes == [143, 143], ended.stderr
    assert "SIGTERM: stopped after optimizer step" in ended.stderr[0]
    assert list(tmp_path.glob("last.ckpt.shards-*"))
    ended = run(2, tmp_path, "3", "--every", "4", "--top-k", "2")
    assert ended.codes == [0, 0], ended.stderr
    resumed, reference = final(tmp_path), final(sharded)
    assert resumed["records"] == reference["records"]  # History bitwise, every figure
    for key, value in reference["model"].items():
        assert torch.equal(resumed["model"][key], value)


def test_a_sharded_run_resumes_under_one_process_at_an_epoch_boundary(
    sharded: Path, tmp_path: Path
) -> None:
    ended = run(2, tmp_path, "2")
    assert ended.codes == [0, 0], ended.stderr
    two_epochs = final(tmp_path)["records"]
    ended = run(1, tmp_path, "3")  # the same checkpoint directory, now one process
    assert ended.codes == [0], ended.stderr
    resumed = final(tmp_path)
    assert resumed["records"][:2] == two_epochs  # the earlier epochs kept as they were
    assert_close_runs(resumed, final(sharded))  # the third epoch: the same up to rounding


def test_a_damaged_or_missing_shard_is_refused_and_nothing_changes(
    sharded: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(sharded, copy)
    shard = next(copy.glob("last.ckpt.shards-*/__1_0.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x04
    shard.write_bytes(bytes(data))
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is damaged"):
        load_checkpoint(copy / "last.ckpt", model=m)
    shutil.rmtree(shard.parent)
    with pytest.raises(CheckpointError, match=r"shards directory .* is missing"):
        load_checkpoint(copy / "last.ckpt", model=m)
    # a link where the directory was, to a whole copy: never followed
    shard.parent.symlink_to(next(sharded.glob("last.ckpt.shards-*")))
    with pytest.raises(CheckpointError, match=r"is missing \(or a link, never followed\)"):
        load_checkpoint(copy / "last.ckpt", model=m)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("crafted", ["../victim", "/abs/victim", "last.ckpt", "a/b.shards-x", ".."])
def test_a_crafted_shards_directory_outside_the_file_is_refused(
    sharded: Path, tmp_path: Path, crafted: str
) -> None:
    payload = torch.load(sharded / "last.ckpt", weights_only=True)
    payload["sharded"]["dir"] = crafted
    torch.save(payload, tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match="field 'sharded'"):
        load_checkpoint(tmp_path / "last.ckpt", model=model())


def test_a_sharded_checkpoint_refuses_another_model(sharded: Path) -> None:
    other = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    shapes = r"wrong shape: .*0\.weight: file \(32, 20\) vs model \(8, 20\).*unexpected keys: 4"
    with pytest.raises(CheckpointError, match=shapes):
        load_checkpoint(sharded / "last.ckpt", model=other)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--blocks-only", r"the model itself is not; call fully_shard\(model\) on the root too"),
        ("--compile", r"fit\(compile=True\) with a model sharded by fully_shard: not supported"),
        ("--restore-best", r"EarlyStopping\(restore_best_weights=True\) with a model sharded"),
        ("--lr-find", r"lr_find with a model sharded by fully_shard: not supported"),
    ],
)
def test_what_fit_cannot_run_sharded_is_refused_on_every_rank(
    tmp_path: Path, flag: str, message: str
) -> None:
    ended = run(2, tmp_path, "1", flag)
    assert ended.codes == [1, 1]
    for err in ended.stderr:
        assert re.search(message, err), err


class Runs:
    """Unpickled, it would run code: create the file named."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _with_manifest(sharded: Path, target: Path, shards: Path) -> None:
    """Write target/last.ckpt: the run's file, with a manifest that fits `shards` (an attacker
    writes both: the sizes and CRC-32s are no defence, the loading must be)."""
    from trainkit._sharded import _size_and_crc

    payload = torch.load(sharded / "last.ckpt", weights_only=True)
    files = {p.name: _size_and_crc(p) for p in shards.iterdir()}
    payload["sharded"] = {"dir": shards.name, "files": files, "world_size": 2}
    torch.save(payload, target / "last.ckpt")


def test_a_crafted_metadata_pickle_runs_no_code(sharded: Path, tmp_path: Path) -> None:
    shards = tmp_path / "last.ckpt.shards-0123456789ab"
    shutil.copytree(next(sharded.glob("last.ckpt.shards-*")), shards)
    marker = tmp_path / "ran"
    (shards / ".metadata").write_bytes(pickle.dumps(Runs(marker)))  # DCP: plain pickle.load
    _with_manifest(sharded, tmp_path, shards)
    with pytest.raises(CheckpointError, match=r"metadata cannot be read .*Path\.touch"):
        load_checkpoint(tmp_path / "last.ckpt", model=model())
    assert not marker.exists()


def test_a_crafted_value_in_a_shard_runs_no_code(sharded: Path, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save

    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    model_state, opt_state = get_state_dict(m, opt)
    marker = tmp_path / "ran"
    groups: Any = opt_state["param_groups"]
    groups[0]["lr"] = Runs(marker)  # DCP loads it with torch.load(weights_only=False)
    shards = tmp_path / "last.ckpt.shards-0123456789ab"
    save({"model": model_state, "optimizer": opt_state}, checkpoint_id=shards, no_dist=True)
    _with_manifest(sharded, tmp_path, shards)
    target = model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"param_groups\.0\.lr' that is not plain data"):
        load_checkpoint(
            tmp_path / "last.ckpt",
            model=target,
            optimizer=torch.optim.Adam(target.parameters(), lr=1e-2),
        )
    assert not marker.exists()
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_an_optimizer_over_other_parameters_is_refused_before_it_changes(sharded: Path) -> None:
    m = model()
    opt = torch.optim.Adam(m[2].parameters(), lr=1e-2)  # the run's Adam had every layer's
    with pytest.raises(CheckpointError, match=r"optimizer state is for other parameters"):
        load_checkpoint(sharded / "last.ckpt", model=m, optimizer=opt)
    assert not opt.state  # no step with learning rate 0 was run to make a state to load into
    later = list(m[2].parameters()) + list(m[4].parameters())
    groups: list[dict[str, Any]] = [{"params": m[0].parameters()}, {"params": later}]
    two_groups = torch.optim.Adam(groups)
    with pytest.raises(CheckpointError, match=r"has 1 parameter groups; this optimizer has 2"):
        load_checkpoint(sharded / "last.ckpt", model=m, optimizer=two_groups)


def test_a_copied_checkpoint_file_names_the_original_shards(sharded: Path, tmp_path: Path) -> None:
    """A sharded checkpoint is the file and its directory: a copy of the file alone still
    loads while the directory lives, and is refused (not misread) once the next save of the
    original removed it."""
    from trainkit._sharded import drop_shards

    copy = tmp_path / "run"
    shutil.copytree(sharded, copy)
    shutil.copyfile(copy / "last.ckpt", copy / "backup.ckpt")
    load_checkpoint(copy / "backup.ckpt", model=model())
    drop_shards(copy / "last.ckpt")  # as the next save of last.ckpt does
    with pytest.raises(CheckpointError, match=r"last\.ckpt\.shards-[0-9a-f]{12} is missing"):
        load_checkpoint(copy / "backup.ckpt", model=model())
    # only last.ckpt's own directories went: the best files' stayed
    assert len(list(copy.glob("*.shards-*"))) == 2


def test_best_weights_only_files_hold_the_whole_weights_of_a_sharded_model(tmp_path: Path) -> None:
    ended = run(2, tmp_path, "2", "--weights-only", "--top-k", "-1")
    assert ended.codes == [0, 0], ended.stderr
    best = sorted(tmp_path.glob("*.safetensors"))
    assert len(best) == 2  # one per epoch, written by rank 0 from the gathered weights
    assert not [p for p in tmp_path.glob("*.shards-*") if not p.name.startswith("last.ckpt")]
    m = load_weights(best[-1], model())  # whole tensors of the model's own shapes
    # the last epoch's file: the same weights as the run ended with
    for key, value in final(tmp_path)["model"].items():
        assert torch.equal(m.state_dict()[key], value)


def test_a_save_failing_on_one_rank_fails_every_rank_and_leaves_no_shards(tmp_path: Path) -> None:
    ended = run(2, tmp_path, "1", "--every", "2", "--fail-read-back")
    assert ended.codes == [1, 1]  # no hang: the ranks compare notes after writing
    for err in ended.stderr:
        assert "rank 1: OSError: simulated read error on __1_0.distcp" in err, err
    assert not list(tmp_path.glob("*.shards-*"))
    assert not (tmp_path / "last.ckpt").exists()
