"""The documentation site builds strictly, covers every public name, and its examples are true."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import trainkit
from trainkit import CSVLogger, EarlyStopping, ProgressBar, show_training_loop

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ENV = {
    **os.environ,
    "PYTHONPATH": str(Path(trainkit.__file__).parents[1]),
    "NO_MKDOCS_2_WARNING": "1",
}


def code_blocks(page: str, lang: str = "python") -> list[str]:
    """The fenced code blocks of a docs page whose info string is `lang`."""
    blocks: list[str] = []
    current: list[str] | None = None
    info = ""
    for line in (DOCS / page).read_text().splitlines():
        if line.startswith("```") and current is None:
            current, info = [], line[3:].strip()
        elif line.startswith("```") and current is not None:
            if info == lang:
                blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_mkdocs_build_strict_covers_every_page_and_every_public_name(tmp_path: Path) -> None:
    site = tmp_path / "site"
    config = ["--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)]
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", *config],
        cwd=tmp_path,  # not the repository: paths in mkdocs.yml must not depend on the cwd
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr

    pages = re.findall(r"^  - [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert sorted(pages) == sorted(p.name for p in DOCS.glob("*.md"))  # no page left out
    for page in pages:
        name = page.removesuffix(".md")
        built = site / ("index.html" if name == "index" else f"{name}/index.html")
        assert built.is_file(), page

    reference = (site / "reference" / "index.html").read_text()
    names = [n for n in trainkit.__all__ if n != "__version__"]
    assert [n for n in names if f'id="trainkit.{n}"' not in reference] == []
    assert 'id="trainkit.History.plot"' in reference
    # doctests are shown as code, not as markdown text (docs/griffe_examples.py): the output
    # line of History's example is inside a code block
    assert 'class="go">[0.8, 0.6]<' in reference
    changelog = (site / "changelog" / "index.html").read_text()
    assert "Keep a Changelog" in changelog and "CSVLogger" in changelog


def test_the_getting_started_example_runs_and_writes_its_log_and_plot(tmp_path: Path) -> None:
    (example,) = code_blocks("index.md")
    assert len([line for line in example.splitlines() if line.strip()]) <= 15
    result = subprocess.run(
        [sys.executable, "-c", example],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "val_accuracy" in result.stdout
    rows = (tmp_path / "runs" / "first" / "history.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_loss,val_loss,val_accuracy,lr,seconds"
    assert len(rows) >= 4  # header and at least three epochs before early stopping may stop it
    assert (tmp_path / "runs" / "first" / "history.png").stat().st_size > 10_000


def test_the_training_loop_outline_in_the_callbacks_page_is_what_the_code_prints() -> None:
    (block,) = [b for b in code_blocks("callbacks.md", "") if b.startswith(">>> show_training")]
    shown = block.split("\n", 1)[1].rstrip("\n")
    callbacks = [ProgressBar(), CSVLogger("runs/log.csv"), EarlyStopping()]
    assert shown == show_training_loop(callbacks, file=io.StringIO())
