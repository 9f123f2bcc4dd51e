"""History.plot: curves of a real run saved as a readable PNG; every bad input refused clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import trainkit
from trainkit import Accuracy, BatchMetric, History, Metric, accuracy, fashion_mnist, fit, get_data

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses import the trainkit under test, whatever their working directory.
ENV = {**os.environ, "PYTHONPATH": str(Path(trainkit.__file__).parents[1])}
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's tab:blue and tab:orange


def trained(tabular: tuple[TensorDataset, TensorDataset], epochs: int = 4) -> History:
    torch.manual_seed(0)
    train_dl, valid_dl = get_data(*tabular, bs=32)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    metrics: list[Metric | BatchMetric] = [accuracy, Accuracy(top_k=2)]
    return fit(
        epochs, model, F.cross_entropy, opt, train_dl, valid_dl, metrics=metrics, progress=False
    )


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def count_colour(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(img - np.array(rgb)).max(axis=2) <= tol).sum())


def xs(line: Line2D) -> list[float]:
    return list(np.asarray(line.get_xdata(), dtype=float))


def ys(line: Line2D) -> list[float]:
    return list(np.asarray(line.get_ydata(), dtype=float))


def legend(ax: Axes) -> list[str]:
    box = ax.get_legend()
    assert box is not None
    return [t.get_text() for t in box.get_texts()]


def test_plot_of_a_real_run_is_a_png_of_the_expected_size_and_not_blank(
    tabular: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    history = trained(tabular)
    path = tmp_path / "runs" / "history.png"  # the parent folder does not exist yet
    history.plot(path)

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (3 * 550, 400)  # three panels: loss, accuracy, top2_accuracy
    img = pixels(path)
    white = (img >= 250).all(axis=2).mean()
    assert 0.5 < white < 0.98  # mostly background, but not blank
    assert count_colour(img, BLUE) > 300  # the training loss curve
    assert count_colour(img, ORANGE) > 900  # the validation curves, on all three panels
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # text, grid, lines: anti-aliased


def test_panels_titles_labels_legends_and_data_follow_the_history(
    tabular: tuple[TensorDataset, TensorDataset],
) -> None:
    history = trained(tabular, epochs=3)
    fig = history.plot(title="tabular run")

    assert fig.get_suptitle() == "tabular run"
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "top2_accuracy"]
    loss, acc, top2 = fig.axes
    for ax in fig.axes:
        assert ax.get_xlabel() == "epoch"
        assert ax.get_ylabel() == ax.get_title()
    assert legend(loss) == ["train", "validation"]
    assert legend(acc) == ["validation"]
    train_line, val_line = loss.get_lines()
    assert xs(train_line) == [1.0, 2.0, 3.0]  # epochs counted from 1
    assert ys(train_line) == history["train_loss"]
    assert ys(val_line) == history["val_loss"]
    assert ys(acc.get_lines()[0]) == history["val_accuracy"]
    assert ys(top2.get_lines()[0]) == history["val_top2_accuracy"]
    assert train_line.get_marker() == "o"  # a one-epoch run still shows its point


def test_default_title_and_layout_of_many_panels(tmp_path: Path) -> None:
    record = {"epoch": 0, "train_loss": 1.0, "val_loss": 1.1, "lr": 0.1, "seconds": 2.0}
    record |= {"val_a": 0.5, "val_b": 0.6, "val_c": 0.7}
    fig = History([record]).plot(tmp_path / "h.png")
    assert fig.get_suptitle() == "Training history (1 epochs)"
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["loss", "a", "b", "c"]
    with Image.open(tmp_path / "h.png") as im:
        assert im.size == (1650, 800)  # three panels per row, two rows


def test_unprefixed_figures_get_their_own_panel_and_missing_epochs_are_skipped() -> None:
    h = History(
        [{"epoch": 1, "train_loss": 1.0, "grad_norm": 3.0}, {"epoch": 2, "train_loss": 0.5}]
    )
    fig = h.plot()
    assert [ax.get_title() for ax in fig.axes] == ["loss", "grad_norm"]
    assert xs(fig.axes[1].get_lines()[0]) == [1.0]


def test_empty_history_is_refused() -> None:
    with pytest.raises(ValueError, match=r"History.plot: the history has no epochs"):
        History().plot()


def test_history_without_figures_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"no loss or metric to plot.*\['epoch', 'lr', 'seconds'\]"
    ):
        History([{"epoch": 0, "lr": 0.1, "seconds": 1.0}]).plot()


def test_a_path_that_is_not_png_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "history.jpg"
    with pytest.raises(ValueError, match=r"History.plot\(path=\.\.\.\).*'.png'.*history.jpg"):
        History([{"epoch": 0, "train_loss": 1.0}]).plot(path)
    assert not path.exists()


def test_an_unwritable_path_names_the_argument_and_the_path(tmp_path: Path) -> None:
    h = History([{"epoch": 0, "train_loss": 1.0}])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=r"History.plot\(path=\.\.\.\) cannot write.*a_file") as err:
        h.plot(blocker / "history.png")
    assert isinstance(err.value, FileExistsError | NotADirectoryError)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(IsADirectoryError, match=r"History.plot\(path=\.\.\.\).*dir\.png"):
        h.plot(tmp_path / "dir.png")


def test_missing_matplotlib_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'trainkit\[plot\]'") as err:
        History([{"epoch": 0, "train_loss": 1.0}]).plot()
    assert err.value.name == "matplotlib"


BLOCK_OPTIONAL = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("matplotlib", "tensorboard"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def test_trainkit_imports_and_trains_without_the_optional_dependencies(tmp_path: Path) -> None:
    code = BLOCK_OPTIONAL + (
        "import torch, trainkit\n"
        "from torch import nn\n"
        "import torch.nn.functional as F\n"
        "dl = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]\n"
        "model = nn.Linear(4, 2)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        f"log = trainkit.CSVLogger({str(tmp_path / 'log.csv')!r})\n"
        "h = trainkit.fit(2, model, F.cross_entropy, opt, dl, dl, callbacks=[log],\n"
        "                 progress=False)\n"
        "assert 'matplotlib' not in sys.modules and 'tensorboard' not in sys.modules\n"
        "for make in (h.plot, lambda: trainkit.TensorBoardLogger('tb')):\n"
        "    try:\n"
        "        make()\n"
        "    except ModuleNotFoundError as err:\n"
        "        print(err)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    assert "History.plot needs matplotlib" in result.stdout
    assert "pip install 'trainkit[plot]'" in result.stdout
    assert "pip install 'trainkit[tensorboard]'" in result.stdout
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 3  # header and two epochs


def test_quickstart_demo_saves_the_plot_of_its_run(tmp_path: Path) -> None:
    try:
        fashion_mnist(train=False, download=False)
    except FileNotFoundError as err:
        pytest.skip(f"real FashionMNIST not on this machine: {err}")
    args = ["--smoke", "--epochs", "2", "--lr", "0.1", "--out", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    assert f"Plot saved to {tmp_path / 'history.png'}" in result.stdout
    with Image.open(tmp_path / "history.png") as im:
        assert im.size == (2 * 550, 400)  # loss and accuracy
    img = pixels(tmp_path / "history.png")
    assert count_colour(img, BLUE) > 100 and count_colour(img, ORANGE) > 200
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_loss,val_loss,val_accuracy,lr,seconds"
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]  # epochs numbered from 1
