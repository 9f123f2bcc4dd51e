"""The documentation site builds strictly, covers every public name, and its examples are true."""

from __future__ import annotations

import importlib
import io
import os
import re
import subprocess
import sys
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as `make docs` builds it (`mkdocs build --strict`), once for this module."""
    tmp_path = tmp_path_factory.mktemp("docs")
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
    return site


def nav_pages() -> list[str]:
    """The pages of mkdocs.yml's navigation, in order."""
    return re.findall(r"^ +- [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)


def test_mkdocs_build_strict_covers_every_page_and_every_public_name(site: Path) -> None:
    pages = nav_pages()
    assert sorted(pages) == sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    for page in pages:  # as files: page.html, not page/index.html
        assert (site / page).with_suffix(".html").is_file(), page

    reference = "".join(p.read_text() for p in (site / "reference").glob("*.html"))
    names = [n for n in trainkit.__all__ if n != "__version__"]
    assert [n for n in names if f'id="trainkit.{n}"' not in reference] == []
    assert 'id="trainkit.History.plot"' in reference
    # doctests are shown as code, not as markdown text (docs/griffe_examples.py): the output
    # line of History's example is inside a code block
    assert 'class="go">[0.8, 0.6]<' in reference
    changelog = (site / "changelog.html").read_text()
    assert "Keep a Changelog" in changelog and "CSVLogger" in changelog


class Links(HTMLParser):
    """The ids of a page, and the links it follows (href of a/link, src of script/img)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.add(str(found["id"]))
        target = found.get("href") if tag in ("a", "link") else found.get("src")
        if target and tag in ("a", "link", "script", "img"):
            self.links.append(target)


def parse(path: Path) -> Links:
    parser = Links()
    parser.feed(path.read_text())
    return parser


def test_the_built_site_works_opened_as_a_file(site: Path) -> None:
    """Opened as file://.../site/index.html, every link must lead to a file (with its anchor);
    with directory URLs they led to folders, which a browser shows as a listing."""
    pages = {path: parse(path) for path in site.rglob("*.html")}
    broken = []
    for path, page in pages.items():
        if path.name == "404.html":
            continue  # a web server's error page, with absolute links: never opened as a file
        for link in page.links:
            if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("//"):
                continue  # another site (https:, mailto:, data:)
            target, _, anchor = link.partition("#")
            file = (path.parent / target.split("?")[0]).resolve() if target else path
            if not file.is_file():
                broken.append(f"{path.relative_to(site)}: {link} (no such file)")
            elif anchor and file.suffix == ".html" and anchor not in parse_ids(file, pages):
                broken.append(f"{path.relative_to(site)}: {link} (no such anchor)")
    assert broken == []
    # search works from a file too: its index is bundled as a script, not fetched
    assert (site / "search" / "search_index.js").is_file()


def parse_ids(file: Path, pages: dict[Path, Links]) -> set[str]:
    return (pages.get(file) or parse(file)).ids


def test_returns_tables_have_one_row_per_docstring(site: Path) -> None:
    """A wrapped `Returns:` description is one row, not a row per line (evaluate showed three
    `dict[str, float]` rows with one sentence cut in three)."""
    section = re.compile(
        r'<span class="doc-section-title">Returns:</span></p>\s*<table>(.*?)</table>', re.S
    )
    tables = 0
    for path in sorted((site / "reference").glob("*.html")):
        for table in section.findall(path.read_text()):
            tables += 1
            rows = table.count('<tr class="doc-section-item">')
            assert rows == 1, f"{path.name}: a Returns table of {rows} rows:\n{table}"
    assert tables >= 20  # every public function that returns something
    page = (site / "reference" / "evaluation.html").read_text()
    assert re.search(r"as Python floats. Metrics whose result has more\s+than one element", page)


def defining_module(name: str) -> str:
    """The trainkit module whose source defines `name` (aliases have no `__module__`); for a
    name defined in an internal module (`trainkit._types`), the public module exporting it."""
    for path in sorted((ROOT / "src" / "trainkit").rglob("*.py")):
        pattern = rf"^(class {name}\b|def {name}\b|{name}(: [^=]+)? = )"
        if re.search(pattern, path.read_text(), re.M):
            parts = path.relative_to(ROOT / "src").with_suffix("").parts
            if parts[1].startswith("_") and parts[1] != "__init__":
                return exporting_module(name)
            return ".".join(parts[:2])  # trainkit.callbacks.progress -> trainkit.callbacks
    raise AssertionError(f"{name} is defined nowhere in src/trainkit")


def exporting_module(name: str) -> str:
    """The one public trainkit module (not the package) whose `__all__` holds `name`."""
    src = ROOT / "src" / "trainkit"
    paths = [*src.glob("*.py"), *(p.parent for p in src.glob("*/__init__.py"))]
    modules = [f"trainkit.{p.stem}" for p in paths]
    public = [m for m in modules if not m.split(".")[1].startswith("_")]
    found = [m for m in public if name in getattr(importlib.import_module(m), "__all__", ())]
    assert len(found) == 1, (name, found)
    return found[0]


def test_one_reference_page_per_module_loop_first_and_fit_first(site: Path) -> None:
    reference = [p for p in nav_pages() if p.startswith("reference/")]
    assert reference[0] == "reference/loop.md"
    names = [n for n in trainkit.__all__ if n != "__version__"]
    for name in names:
        on = [p for p in reference if f'id="trainkit.{name}"' in page_html(site, p)]
        module = defining_module(name)
        assert on == [f"reference/{module.split('.')[1]}.md"], (name, module, on)
    loop = page_html(site, "reference/loop.md")
    first = re.search(r'<h2 id="trainkit\.(\w+)"', loop)
    assert first is not None and first.group(1) == "fit"
    heights = [len(page_html(site, p)) for p in reference]
    assert max(heights) < 0.5 * sum(heights)  # no page holds most of the reference


def page_html(site: Path, page: str) -> str:
    return (site / page).with_suffix(".html").read_text()


def test_the_home_pages_code_fits_the_page_width() -> None:
    """Material shows 80 characters of code beside its two sidebars (656 px of 8.2 px
    characters at its widest layout); "A first run" was cut off at 85."""
    for block in code_blocks("index.md"):
        long = [line for line in block.splitlines() if len(line) > 80]
        assert long == [], long


def test_the_getting_started_example_runs_and_writes_its_log_and_plot(tmp_path: Path) -> None:
    (example,) = code_blocks("index.md")
    assert len([line for line in example.splitlines() if line.strip()]) <= 16
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


def readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(rf"^## {re.escape(title)}.*?\n(.*?)(?=^## )", readme, re.S | re.M)
    assert found is not None, title
    return found.group(1)


def test_install_says_pypi_has_another_trainkit_and_how_to_install_from_the_clone(
    tmp_path: Path,
) -> None:
    """`pip install trainkit` installs an unrelated project (0.0.2, 2023) today."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    wheel = f"dist/trainkit-{version}-py3-none-any.whl"
    for text in (readme_section("Install"), (DOCS / "index.md").read_text()):
        flat = " ".join(text.split())
        assert "`pip install trainkit` installs an unrelated project" in flat
        assert "(version 0.0.2, 2023)" in flat
        assert "pip install ." in flat and "pip wheel --no-deps -w dist ." in flat
        assert f"pip install {wheel}" in flat
    # the wheel the pages name is the one that command builds (offline here: no isolation)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert [p.name for p in (tmp_path / "dist").iterdir()] == [Path(wheel).name]


def test_the_two_set_up_commands_come_with_their_cost_and_the_cpu_only_option() -> None:
    setup = readme_section("Set up")
    blocks = re.findall(r"```\n(.*?)```", setup, re.S)
    assert blocks == ["make demo\nmake test\n"]  # exactly the two commands
    flat = " ".join(setup.split())
    assert "about 6 GB of disk for `.venv` (`du -sh .venv` gives 6.0G" in flat
    assert "NVIDIA CUDA libraries (3.2G) and triton (0.9G)" in flat
    assert "--index-url https://download.pytorch.org/whl/cpu" in flat
    # "the make targets keep an installed torch": they reuse .venv and never upgrade it
    makefile = (ROOT / "Makefile").read_text()
    assert "test -x $(PY) || $(PYTHON) -m venv $(VENV)" in makefile
    installs = [line for line in makefile.splitlines() if "pip install" in line]
    assert [line for line in installs if "-e" in line and ("-U" in line or "upgrade" in line)] == []


def test_the_demos_load_weights_line_is_explained_where_a_user_reads() -> None:
    """The Quickstart's output line (checked in test_examples.py) reads as intended, and the
    README and the docs say why it is there."""
    example = (ROOT / "examples" / "quickstart.py").read_text()
    assert "as intended, load_weights refuses it (it reads weights only)" in example
    for text in (readme_section("Set up"), (DOCS / "index.md").read_text()):
        flat = " ".join(text.split())
        assert "as intended, load_weights refuses it (it reads weights only)" in flat
        assert "is the expected outcome, not an error" in flat
        assert "unsafe_load_pickled_model" in flat
