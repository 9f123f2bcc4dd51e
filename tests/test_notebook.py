"""trainkit in a Jupyter notebook, executed by nbclient in a real kernel.

With ipywidgets, each epoch's bar is a widget that ends full and green; without it, importing
trainkit prints nothing (no tqdm warning) and the bar is text.
"""

from __future__ import annotations

import json
from typing import Any

import nbformat
from nbclient import NotebookClient

TRAIN = """\
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trainkit import accuracy, fit

torch.manual_seed(0)
x = torch.randn(2000, 4)
y = (x[:, 0] > 0).long()
train = DataLoader(TensorDataset(x, y), batch_size=8)  # 250 batches
valid = DataLoader(TensorDataset(x[:80], y[:80]), batch_size=16)  # 5 batches
model = nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
history = fit(2, model, nn.functional.cross_entropy, opt, train, valid, metrics=[accuracy])
"""


def execute(*sources: str) -> Any:
    """Run the cells in a fresh kernel (bounded in time) and return the executed notebook."""
    cells: list[dict[str, Any]] = [
        {"cell_type": "code", "id": f"cell-{i}", "execution_count": None, "metadata": {},
         "outputs": [], "source": source}
        for i, source in enumerate(sources)
    ]  # fmt: skip
    notebook = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    nb = nbformat.reads(json.dumps(notebook), as_version=4)  # type: ignore[no-untyped-call]
    client = NotebookClient(nb, timeout=180, startup_timeout=120, kernel_name="python3")
    client.execute()
    return nb


def widget_models(nb: Any, name: str) -> list[dict[str, Any]]:
    state = nb.metadata.get("widgets", {})
    models = state.get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    return [m["state"] for m in models.values() if m["model_name"] == name]


def text(outputs: list[Any], stream: str) -> str:
    return "".join(o["text"] for o in outputs if o.get("name") == stream)


def test_a_notebook_run_ends_with_every_bar_full_and_green() -> None:
    """Before: both epoch bars ended red ("danger") at 234/250 and 248/250."""
    nb = execute(TRAIN)
    outputs = nb.cells[0].outputs
    assert [o["output_type"] for o in outputs if o["output_type"] == "error"] == []
    bars = widget_models(nb, "FloatProgressModel")
    assert [(b["value"], b["max"], b["bar_style"]) for b in bars] == [(250, 250, "success")] * 2
    labels = [h["value"] for h in widget_models(nb, "HTMLModel")]
    assert sum("250/250" in v and "valid=5/5" in v for v in labels) == 2, labels
    assert text(outputs, "stdout").count("val_accuracy") == 2  # the epoch lines
    assert text(outputs, "stderr") == ""  # no warning


def test_without_ipywidgets_import_prints_nothing_and_the_bar_is_text() -> None:
    """Before: `import trainkit` printed "TqdmWarning: IProgress not found. Please update
    jupyter and ipywidgets." in a notebook without ipywidgets."""
    hide = "import sys\nsys.modules['ipywidgets'] = None  # as if it were not installed"
    nb = execute(hide, "import trainkit", TRAIN)
    assert nb.cells[1].outputs == []  # importing prints nothing
    outputs = nb.cells[2].outputs
    assert [o["output_type"] for o in outputs if o["output_type"] == "error"] == []
    assert widget_models(nb, "FloatProgressModel") == []  # no widget: text
    err = text(outputs, "stderr")
    assert "epoch 1/2" in err and "250/250" in err and "valid=5/5" in err  # the text bar
    assert "Warning" not in err and "IProgress" not in err
    assert text(outputs, "stdout").count("val_accuracy") == 2
