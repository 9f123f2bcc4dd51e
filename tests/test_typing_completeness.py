"""What a user's editor sees, checked by pyright as the editor runs it (Pylance is pyright).

`pyright --verifytypes trainkit --ignoreexternal` must report a type completeness of 100 %: no
public symbol of unknown or ambiguous type (an attribute set in `__init__` without an
annotation is "ambiguous": mypy and pyright may infer it differently), and every public
function documented.

pyright comes from PyPI (the `dev` extra, with node as a wheel through `pyright[nodejs]`). These
tests skip, with the reason, only when the pyright binary cannot run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import trainkit

TIMEOUT = 300  # seconds; a run takes a few seconds


def _env() -> dict[str, str]:
    # pyright asks the first `python` on PATH for the import paths: make it this interpreter, so
    # it checks the trainkit that the tests import (its `--pythonpath` is ignored by
    # `--verifytypes`)
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def _pyright(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyright", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def pyright_runs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip, saying why, when pyright is not installed or its binary cannot start."""
    try:
        import pyright  # noqa: F401 - only checks that it is installed
    except ImportError:
        pytest.skip("pyright is not installed (it is in the dev extra: pip install -e '.[dev]')")
    try:
        done = _pyright("--version", cwd=tmp_path_factory.mktemp("pyright"))
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"the pyright binary cannot run here: {err}")
    if done.returncode != 0 or "pyright" not in done.stdout:
        pytest.skip(
            "the pyright binary cannot run here (node could not be found or downloaded): "
            f"exit {done.returncode}: {(done.stdout + done.stderr).strip()[-2000:]}"
        )


def _verifytypes(cwd: Path) -> dict[str, Any]:
    done = _pyright("--verifytypes", "trainkit", "--ignoreexternal", "--outputjson", cwd=cwd)
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright --verifytypes gave no JSON report: {done.stdout}{done.stderr}")
    return report


@pytest.mark.usefixtures("pyright_runs")
def test_pyright_verifytypes_reports_full_type_completeness(tmp_path: Path) -> None:
    # run outside the repository, so pyright finds trainkit where the tests import it from
    report = _verifytypes(tmp_path)
    completeness = report["typeCompleteness"]
    assert Path(completeness["packageRootDirectory"]) == Path(trainkit.__file__).parent
    problems = [
        f"{d.get('file', '')}:{d.get('range', {}).get('start', {}).get('line', -1) + 1}: "
        f"{d['severity']}: {d['message']}"
        for d in report["generalDiagnostics"]
        if d["severity"] in ("error", "warning")
    ]
    assert problems == []
    assert completeness["exportedSymbolCounts"]["withAmbiguousType"] == 0
    assert completeness["exportedSymbolCounts"]["withUnknownType"] == 0
    assert completeness["otherSymbolCounts"]["withAmbiguousType"] == 0
    assert completeness["otherSymbolCounts"]["withUnknownType"] == 0
    assert completeness["missingFunctionDocStringCount"] == 0
    assert completeness["missingClassDocStringCount"] == 0
    assert completeness["exportedSymbolCounts"]["withKnownType"] > 400  # it saw the package
    assert completeness["completenessScore"] == 1.0


TYPING = Path(__file__).parent / "typing"


def _mypy(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # in a folder without a config file: mypy's defaults, as in a user's fresh project
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(cwd / ".mypy_cache"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_the_tutorials_wrapped_loader_lines_pass_mypy_default_and_strict(tmp_path: Path) -> None:
    # the tutorial's own code with its unannotated `def preprocess(x, y)`, without the comment
    # that lets `make typecheck` (strict) accept that def
    source = (TYPING / "tutorial_types.py").read_text()
    copy = tmp_path / "tutorial.py"
    copy.write_text(source.replace("# mypy: allow-untyped-defs\n", "", 1))
    lines = copy.read_text().splitlines()
    assert "train_dl = WrappedDataLoader(train_dl, preprocess)" in lines
    def_line = lines.index("def preprocess(x, y):") + 1

    default = _mypy(tmp_path, "tutorial.py")
    assert default.returncode == 0, default.stdout + default.stderr
    assert "Success: no issues found in 1 source file" in default.stdout

    strict = _mypy(tmp_path, "--strict", "tutorial.py")
    errors = [line for line in strict.stdout.splitlines() if ": error:" in line]
    # the user's own unannotated function, and nothing else: no line that uses trainkit
    assert errors == [
        f"tutorial.py:{def_line}: error: Function is missing a type annotation  [no-untyped-def]"
    ], strict.stdout + strict.stderr


@pytest.mark.usefixtures("pyright_runs")
def test_lambdas_given_to_wrapped_data_loader_pass_pyright_strict(tmp_path: Path) -> None:
    (tmp_path / "snippet.py").write_text((TYPING / "pyright_strict_types.py").read_text())
    (tmp_path / "pyrightconfig.json").write_text('{"typeCheckingMode": "strict"}\n')
    done = _pyright("--outputjson", "snippet.py", cwd=tmp_path)
    report = json.loads(done.stdout)
    problems = [
        f"snippet.py:{d['range']['start']['line'] + 1}: {d.get('rule', '')} {d['message']}"
        for d in report["generalDiagnostics"]
    ]
    assert problems == []
    assert report["summary"]["filesAnalyzed"] == 1
    assert done.returncode == 0
