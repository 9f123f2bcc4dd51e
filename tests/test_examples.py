"""The examples run end to end (on real FashionMNIST; skipped where it is not installed)."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import Compose, PILToTensor, ToTensor
from torchvision.transforms.v2 import ToDtype

from trainkit import accuracy, evaluate, fashion_mnist, load_weights

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so that pickle finds the example's classes by name
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
    # the exported PNG files, read back with one-hot targets, score what the same images score
    # when read from the data set with class indices
    assert (tmp_path / "images" / "labels.csv").read_text().count("\n") == 64
    model = load_weights(tmp_path / "model_weights.pth", quickstart.NeuralNetwork())
    # the same pixels as the example reads them (ToTensor divides by 255, ToDtype multiplies
    # by 1/255: values an ulp apart), in the same batch of 64: so the same bits
    as_read = Compose([PILToTensor(), ToDtype(torch.float32, scale=True)])
    same_images = Subset(fashion_mnist(train=False, transform=as_read), range(64))
    direct = evaluate(model, nn.CrossEntropyLoss(), DataLoader(same_images, 64), [accuracy])
    assert final["files_accuracy"] == direct["accuracy"]
    assert final["files_loss"] == pytest.approx(direct["loss"], rel=1e-5)
    assert re.search(r'Predicted: "[\w -]+", Actual: "[\w -]+"', out)
    assert "as intended, load_weights refuses it (it reads weights only)" in out
    assert "the explicit opt-in, loads it: NeuralNetwork" in out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib is not installed" in out
    # run again with one more epoch: it resumes from the checkpoints and trains only that one
    quickstart.main(["--smoke", "--epochs", "3", "--lr", "0.1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Resuming from" in out and "after 2 of 3 epochs" in out
    assert "epoch 3/3" in out and "epoch 2/3" not in out
    # asked for fewer epochs than are done: it says so and trains nothing
    assert quickstart.main(["--smoke", "--epochs", "2", "--out", str(tmp_path)]) == {}
    out = capsys.readouterr().out
    assert "already trained 3 epochs (>= 2 asked); nothing to do; --fresh to start over" in out
    assert "epoch " not in out and "Test accuracy" not in out
    # a smoke run keeps its checkpoints apart: a real run in the same folder finds none
    assert (tmp_path / "smoke-checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.usefixtures("real_data")
def test_quickstart_smoke_never_resumes_a_real_runs_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    quickstart = load_example("quickstart")
    quickstart.main(["--smoke", "--epochs", "2", "--out", str(tmp_path / "first")])
    capsys.readouterr()
    # where a real run keeps its checkpoints, in the smoke run's default folder: ignored
    monkeypatch.chdir(tmp_path)
    real = tmp_path / "runs" / "quickstart-smoke" / "checkpoints"
    shutil.copytree(tmp_path / "first" / "smoke-checkpoints", real)
    quickstart.main(["--smoke", "--epochs", "2"])
    out = capsys.readouterr().out
    assert "Resuming" not in out and "already trained" not in out and "epoch 2/2" in out
    assert (tmp_path / "runs" / "quickstart-smoke" / "model_weights.pth").is_file()
    assert not (tmp_path / "runs" / "quickstart").exists()  # the real run's folder: untouched


@pytest.mark.usefixtures("real_data")
def test_quickstart_no_shuffle_is_the_documents_loop(tmp_path: Path) -> None:
    """With --no-shuffle, fit computes what the Quickstart's own train_loop computes."""
    quickstart = load_example("quickstart")
    args = ["--smoke", "--no-shuffle", "--epochs", "1", "--lr", "0.1", "--device", "cpu"]
    final = quickstart.main([*args, "--out", str(tmp_path)])

    train = Subset(fashion_mnist(train=True, transform=ToTensor()), range(512))
    test = Subset(fashion_mnist(train=False, transform=ToTensor()), range(256))
    torch.manual_seed(0)  # the document's loop, seeded as the reference run is
    model = quickstart.NeuralNetwork()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in DataLoader(train, batch_size=64):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()
    # exact: the same kernels on the same shapes (the example evaluates on get_data's
    # validation loader, batches of 2 x 64; other batch shapes could round differently)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(test, 128))
    assert final["accuracy"] == correct / 256


def test_quickstart_vgg16_weights_round_trip(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--vgg16's steps, with a small stand-in for VGG16 (whose weights file is 528 MB)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached ImageNet weights
    quickstart = load_example("quickstart")
    made: list[nn.Sequential] = []

    def vgg16(weights: object = None) -> nn.Sequential:
        assert weights is None
        made.append(nn.Sequential(nn.Linear(4, 3), nn.Dropout()))
        return made[-1]

    monkeypatch.setattr(quickstart.models, "vgg16", vgg16)
    quickstart.vgg16_weights(tmp_path / "vgg16_weights.pth")
    saved, loaded = made
    assert torch.equal(saved.state_dict()["0.weight"], loaded.state_dict()["0.weight"])
    assert not loaded.training  # eval() before inference
    assert "so weights=None" in capsys.readouterr().out


@pytest.mark.usefixtures("real_data")
def test_nn_tutorial_smoke_runs_every_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./data/mnist here: FashionMNIST stands in
    nn_tutorial = load_example("nn_tutorial")
    results = nn_tutorial.main(["--smoke", "--offline", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "the real FashionMNIST stands in for MNIST" in out
    assert list(results) == list(nn_tutorial.STAGES)
    # a refactoring that keeps the computation keeps the figures (same seed, same batches)
    for same in [
        ("linear", "optim", "dataset", "dataloader"),
        ("validation", "fit"),
        ("cnn", "sequential"),
        ("wrapped", "gpu"),
    ]:
        assert all(results[name] == results[same[0]] for name in same), same
    # the same model with F.cross_entropy in place of log_softmax and nll: rounding differs
    assert results["parameter"]["loss"] == pytest.approx(results["scratch"]["loss"], rel=1e-3)
    assert results["scratch"]["accuracy"] > 0.3  # 8 steps of logistic regression, chance 0.1


def write_mnist_pickle(path: Path, payload: object) -> None:
    """Write `payload` as the tutorial's file is: gzip, pickle protocol 2, numpy 1's names."""
    data = pickle.dumps(payload, protocol=2)
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(data.replace(b"numpy._core.", b"numpy.core.")))


def test_nn_tutorial_reads_the_tutorials_mnist_pickle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n, dtype=np.int64)

    write_mnist_pickle(tmp_path / "mnist" / "mnist.pkl.gz", (split(128), split(64), split(64)))
    nn_tutorial = load_example("nn_tutorial")
    args = ["--smoke", "--offline", "--data", str(tmp_path), "--stage", "scratch", "fit"]
    results = nn_tutorial.main(args)
    out = capsys.readouterr().out
    assert "Data: MNIST, the tutorial's" in out and "(128, 784) training images" in out
    assert list(results) == ["scratch", "fit"]


def test_nn_tutorial_refuses_a_pickle_that_would_run_code(tmp_path: Path) -> None:
    write_mnist_pickle(tmp_path / "mnist" / "mnist.pkl.gz", os.system)
    nn_tutorial = load_example("nn_tutorial")
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|nt)\.system"):
        nn_tutorial.main(["--smoke", "--offline", "--data", str(tmp_path)])


@pytest.mark.usefixtures("real_data")
def test_lenet_smoke_walks_through_and_trains(capsys: pytest.CaptureFixture[str]) -> None:
    lenet = load_example("lenet")
    final = lenet.main(
        ["--smoke", "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--device", "cpu"]
    )
    out = capsys.readouterr().out
    assert "conv1.bias.grad before backward: None" in out
    assert "ConvolutionBackward0 -> ReluBackward0 -> MaxPool2DWithIndicesBackward0" in out
    assert "ReluBackward0 -> AddmmBackward0 -> MseLossBackward0" in out
    assert "FashionMNIST (real data): 512 training, 256 test images" in out
    assert final["accuracy"] > 0.2  # chance is 0.1
    for net in (lenet.Net(), lenet.Net3x3()):
        assert net(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_autograd_finetune_registers_every_parameter_and_trains_fc_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached ImageNet weights: random init
    finetune = load_example("autograd_finetune")
    model, before, history, optimizer = finetune.main(["--smoke", "--fake-data", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "FakeData" in out and len(history) == 1
    params = dict(model.named_parameters())
    assert set(params) == set(before) and len(params) == 62
    # as in the tutorial, the optimizer holds every parameter, the frozen ones too
    registered = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in registered} == {id(p) for p in params.values()}
    assert "the optimizer (SGD lr 0.01 momentum 0.9) holds all 62" in out
    for name, param in params.items():
        if name.startswith("fc."):
            assert param.requires_grad and not torch.equal(param, before[name]), name
        else:  # frozen: bit for bit what it was
            assert not param.requires_grad and torch.equal(param, before[name]), name
    assert "frozen parameters unchanged, bit for bit: 60 of 60; fc changed: True" in out


@pytest.mark.usefixtures("real_data")
def test_autograd_finetune_smoke_on_real_images(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    finetune = load_example("autograd_finetune")
    finetune.main(["--smoke", "--device", "cpu"])
    assert "256 training, 128 test images, 32x32" in capsys.readouterr().out


def test_cifar10_classifier_smoke_on_fake_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cifar10 = load_example("cifar10_classifier")
    final = cifar10.main(["--smoke", "--fake-data", "--out", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "NOT CIFAR-10" in out and "Accuracy of the network on the 32 test images" in out
    assert len(re.findall(r"Accuracy of +\w+ : ", out)) == 10  # the per-class table
    assert re.search(r"Predicted: ( +\w+){4}", out)
    assert 0.0 <= final["accuracy"] <= 1.0
    assert (tmp_path / "cifar_net.pth").is_file()


def test_cifar10_fake_test_images_are_not_training_images() -> None:
    """FakeData draws image i from seed i + random_offset: the two sets must not share a seed."""
    cifar10 = load_example("cifar10_classifier")
    train, test = cifar10.cifar10("unused", fake=True)
    assert train.random_offset + len(train) <= test.random_offset  # seeds 0..49999, 50000..
    train_images = [train[i][0] for i in range(64)]
    for i in range(63):  # with random_offset=1, test[i] was train[i + 1]
        assert not any(torch.equal(test[i][0], image) for image in train_images), i


@pytest.mark.parametrize(
    ("name", "tutorial"),
    [
        ("nn_tutorial", "What is torch.nn really?"),
        ("lenet", '"Neural networks"'),
        ("autograd_finetune", '"A gentle introduction to torch.autograd"'),
        ("cifar10_classifier", '"Training a classifier"'),
        ("quickstart", "PyTorch Quickstart"),
    ],
)
def test_example_help_names_its_tutorial(name: str, tutorial: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps the description
    assert tutorial in text and "seed" not in text.lower(), text


@pytest.mark.usefixtures("real_data")
def test_fit_on_real_fashion_mnist_learns() -> None:
    """The Quickstart MLP on 10,000 real training images: one epoch well above chance."""
    from trainkit import fit, get_data

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


def test_readme_usage_example_runs_and_validates_on_held_out_rows() -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None
    # after the example: how many validation rows were also training rows (x[:200] were all)
    check = (
        "seen = {tuple(r.tolist()) for xb, _ in train_dl for r in xb}\n"
        "shared = sum(tuple(r.tolist()) in seen for xb, _ in valid_dl for r in xb)\n"
        "print(f'validation rows also trained on: {shared}')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code.group(1) + check], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "val_accuracy" in result.stdout
    assert "validation rows also trained on: 0" in result.stdout
    assert history_accuracy(result.stdout) > 0.8  # learnable: well above chance (1/3)


def history_accuracy(table: str) -> float:
    """The last val_accuracy of a printed History."""
    lines = [line.split() for line in table.splitlines() if line.strip()]
    header = next(i for i, cells in enumerate(lines) if cells[:2] == ["epoch", "train_loss"])
    rows = [cells for cells in lines[header + 1 :] if cells[0].isdigit()]
    return float(rows[-1][lines[header].index("val_accuracy")])
