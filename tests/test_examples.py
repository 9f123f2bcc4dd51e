"""The examples run end to end (on real FashionMNIST; skipped where it is not installed)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from trainkit import fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def real_data() -> None:
    try:
        fashion_mnist(train=False, download=False)
    except FileNotFoundError as err:
        pytest.skip(f"real FashionMNIST not on this machine: {err}")


@pytest.mark.usefixtures("real_data")
def test_quickstart_smoke_trains_and_saves_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quickstart = load_example("quickstart")
    final = quickstart.main(["--smoke", "--epochs", "2", "--lr", "0.1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "FashionMNIST (real data): 512 training, 256 test images" in out
    assert re.search(r"epoch 2/2  train_loss [\d.]+  val_loss [\d.]+  val_accuracy [\d.]+", out)
    assert final["accuracy"] > 0.4  # well above chance (0.1) after 16 steps on real images
    assert (tmp_path / "model_weights.pth").stat().st_size > 2_000_000  # 669,706 float32 weights
    # run again with one more epoch: it resumes from the checkpoints and trains only that one
    quickstart.main(["--smoke", "--epochs", "3", "--lr", "0.1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Resuming from" in out and "epoch 3/3" in out and "epoch 2/3" not in out


@pytest.mark.usefixtures("real_data")
def test_fit_on_real_fashion_mnist_learns() -> None:
    """The Quickstart MLP on 10,000 real training images: one epoch well above chance."""
    import torch
    from torch import nn
    from torch.utils.data import Subset
    from torchvision.transforms import ToTensor

    from trainkit import accuracy, evaluate, fit, get_data

    torch.manual_seed(0)
    train = Subset(fashion_mnist(train=True, transform=ToTensor()), range(10_000))
    test = Subset(fashion_mnist(train=False, transform=ToTensor()), range(2_000))
    train_dl, test_dl = get_data(train, test, 64)
    model = load_example("quickstart").NeuralNetwork()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    history = fit(
        1, model, nn.CrossEntropyLoss(), opt, train_dl, test_dl, metrics=[accuracy], progress=False
    )
    assert history["val_accuracy"][0] > 0.7
    assert evaluate(model, nn.CrossEntropyLoss(), test_dl, [accuracy])["accuracy"] == pytest.approx(
        history["val_accuracy"][0]
    )


def test_readme_usage_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None
    result = subprocess.run(
        [sys.executable, "-c", code.group(1)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "val_accuracy" in result.stdout
