"""The random-generator states a checkpoint saves and a resume restores (Python, NumPy,
torch CPU and CUDA), shared by checkpoints, `fit` and `lr_find`."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) generator states, in loadable types."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            **np_state,
            "state": {
                **np_state["state"],
                "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            },
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def numpy_state(saved: Mapping[str, Any]) -> dict[str, Any]:
    np_state = dict(saved)
    np_state["state"] = {
        **np_state["state"],
        "key": np_state["state"]["key"].cpu().numpy().astype(np.uint32),
    }
    return np_state
