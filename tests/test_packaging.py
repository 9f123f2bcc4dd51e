"""Packaging: `python -m build` makes a wheel and an sdist; the wheel, installed into a fresh
virtual environment, imports, ships `py.typed`, has pyproject's version, and type-checks the
user snippets of tests/typing/ for mypy.

The fresh environment reuses the packages already installed where the tests run (torch above
all, so nothing is downloaded): a `.pth` file in it names this environment's site-packages.
`--system-site-packages` would not do, as a venv made from inside a venv sees the base
interpreter's packages, not the running environment's. The build runs without isolation, so
offline, with the hatchling of the `dev` extra.
"""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import trainkit

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
# Subprocesses must find the installed wheel, not this source tree.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # Without --sdist/--wheel, build makes the sdist, then the wheel from the sdist: so the
    # sdist is checked complete enough to build from.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)], out)
    return out


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    (found,) = dist.glob("trainkit-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A fresh venv with the wheel installed, seeing this environment's packages (torch)."""
    where = tmp_path_factory.mktemp("venv")
    env = where / "env"
    run([sys.executable, "-m", "venv", "--without-pip", str(env)], where)
    python = env / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = run([str(python), "-c", code], where)
    outer = [*site.getsitepackages(), site.getusersitepackages()]
    Path(purelib.stdout.strip(), "_reuse_outer_packages.pth").write_text("\n".join(outer) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    run([*pip, "--no-index", "--no-deps", str(wheel)], where)
    return python


def test_version_is_pyprojects() -> None:
    assert trainkit.__version__ == VERSION


def test_wheel_holds_the_typed_package_and_pyprojects_metadata(wheel: Path) -> None:
    assert wheel.name == f"trainkit-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = email.parser.Parser().parsestr(
            zf.read(f"trainkit-{VERSION}.dist-info/METADATA").decode()
        )
    assert "trainkit/py.typed" in names
    sources = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src").rglob("*.py")}
    assert sources <= names  # every module, callbacks/loggers.py included
    assert not [n for n in names if n.startswith(("tests/", "docs/", "examples/"))]

    assert metadata["Name"] == "trainkit"
    assert metadata["Version"] == VERSION
    assert metadata["Requires-Python"] == PROJECT["requires-python"]
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]
    base = sorted(str(r) for r in requires if r.marker is None)
    assert base == sorted(str(Requirement(d)) for d in PROJECT["dependencies"])
    extras = PROJECT["optional-dependencies"]
    assert set(metadata.get_all("Provides-Extra") or []) == set(extras)
    for extra in ("plot", "tensorboard"):
        declared = [r for r in requires if r.marker and r.marker.evaluate({"extra": extra})]
        assert {str(r).split(";")[0] for r in declared} == {
            str(Requirement(d)) for d in extras[extra]
        }
    assert "Typing :: Typed" in (metadata.get_all("Classifier") or [])


def test_sdist_holds_what_a_build_and_the_tests_need(dist: Path) -> None:
    (sdist,) = dist.glob("trainkit-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in (
        "pyproject.toml",
        "README.md",
        "CHANGELOG.md",
        "src/trainkit/py.typed",
        "src/trainkit/callbacks/loggers.py",
        "tests/typing/api_types.py",
        "mkdocs.yml",
        "docs/index.md",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.startswith((".venv/", "runs/", "site/", "data/"))]


def test_the_installed_wheel_imports_is_typed_and_has_pyprojects_version(
    venv: Path, tmp_path: Path
) -> None:
    deps = [Requirement(d).name for d in PROJECT["dependencies"]]
    code = (
        "import importlib.metadata as md, importlib.resources as res, json, trainkit\n"
        "print(json.dumps({'file': trainkit.__file__, 'version': trainkit.__version__,\n"
        "    'dist': md.version('trainkit'),\n"
        "    'typed': res.files('trainkit').joinpath('py.typed').is_file(),\n"
        f"    'deps': {{name: md.version(name) for name in {deps!r}}}}}))\n"
    )
    found = json.loads(run([str(venv), "-c", code], tmp_path).stdout)
    assert Path(found["file"]).is_relative_to(venv.parents[1])  # the wheel, not src/
    assert found["version"] == found["dist"] == VERSION
    assert found["typed"] is True
    for dep in PROJECT["dependencies"]:
        req = Requirement(dep)
        assert req.specifier.contains(found["deps"][req.name], prereleases=True), req


def test_the_installed_wheel_trains_logs_and_plots(venv: Path, tmp_path: Path) -> None:
    code = (
        "import torch, torch.nn.functional as F\n"
        "from trainkit import CSVLogger, accuracy, fit\n"
        "dl = [(torch.randn(16, 4), torch.randint(0, 2, (16,)))]\n"
        "model = torch.nn.Linear(4, 2)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "h = fit(2, model, F.cross_entropy, opt, dl, dl, metrics=[accuracy],\n"
        "        callbacks=[CSVLogger('log.csv')], progress=False)\n"
        "h.plot('history.png')\n"
    )
    run([str(venv), "-c", code], tmp_path)
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 3
    assert (tmp_path / "history.png").stat().st_size > 10_000


def test_mypy_checks_the_user_snippets_against_the_installed_package(
    venv: Path, tmp_path: Path
) -> None:
    snippets = tmp_path / "snippets"
    shutil.copytree(ROOT / "tests" / "typing", snippets)
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n")  # none of the project's settings
    mypy = [sys.executable, "-m", "mypy", "--strict", "--config-file", str(config)]
    mypy += ["--python-executable", str(venv), "--cache-dir", str(tmp_path / "cache")]
    result = run([*mypy, "snippets"], tmp_path)
    assert "Success: no issues found in" in result.stdout

    # The types come from the installed package: a mistake in a user's code is caught.
    (tmp_path / "wrong.py").write_text("from trainkit import fit\n\nhistory: int = fit\n")
    wrong = subprocess.run(
        [*mypy, "wrong.py"], cwd=tmp_path, env=CLEAN_ENV, capture_output=True, text=True
    )
    assert wrong.returncode == 1
    assert 'wrong.py:3: error: Incompatible types in assignment (expression has type "def' in (
        wrong.stdout
    )
    assert "-> History" in wrong.stdout
