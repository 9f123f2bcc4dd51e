"""Layers from the tutorial: `Lambda` turns a function into an `nn.Module`."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

__all__ = ["Lambda"]


class Lambda(nn.Module):
    """Wrap a tensor function as a layer, so it can sit inside `nn.Sequential`.

    This is the `Lambda` of "What is torch.nn really?": `forward(x)` returns `func(x)`.

    Args:
        func: Any callable from tensor to tensor. Use a function defined at module level
            (`def flatten(x): ...`) if the model must be pickled with `torch.save(model, path)`;
            lambdas and nested functions cannot be pickled (saving the `state_dict` always works).

    Raises:
        TypeError: `func` is not callable.
        pickle.PicklingError: when a model holding a lambda or nested function is pickled; the
            message says which function and what to use instead.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(Lambda(lambda x: x.view(-1, 1, 28, 28)), nn.Flatten())
        >>> model(torch.zeros(2, 784)).shape
        torch.Size([2, 784])
    """

    def __init__(self, func: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        if not callable(func):
            raise TypeError(f"Lambda(func): func must be callable, got {type(func).__name__}")
        self.func = func

    def forward(self, x: Tensor) -> Tensor:
        """Return `func(x)`."""
        return self.func(x)

    def extra_repr(self) -> str:
        """The function's qualified name (a lambda's file and line), shown in the model's repr."""
        return _describe(self.func)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]  # torch: unannotated
        if _is_local(self.func):
            # Pickle would fail deep inside with "Can't pickle <function <lambda>>"; the
            # wrapper fails with a message that says what to do, and is transparent to deepcopy.
            state["func"] = _LocalFunction(self.func)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        func = state.get("func")
        if isinstance(func, _LocalFunction):
            state = {**state, "func": func.func}
        super().__setstate__(state)  # type: ignore[no-untyped-call]  # torch: unannotated


class _LocalFunction:
    """Stands in for a lambda or nested function while a `Lambda` is pickled or copied."""

    def __init__(self, func: Callable[[Tensor], Tensor]) -> None:
        self.func = func

    def __deepcopy__(self, memo: dict[int, object]) -> Callable[[Tensor], Tensor]:
        return self.func

    def __reduce__(self) -> tuple[Any, ...]:
        raise pickle.PicklingError(
            f"cannot pickle Lambda({_describe(self.func)}): pickle cannot save lambdas or "
            "nested functions. Save the weights instead (torch.save(model.state_dict(), path)), "
            "or define the function at module level (def preprocess(x): ...) and pass it to Lambda."
        )


def _is_local(func: Callable[..., Any]) -> bool:
    qualname = getattr(func, "__qualname__", "")
    return "<lambda>" in qualname or "<locals>" in qualname


def _describe(func: Callable[..., Any]) -> str:
    name = getattr(func, "__qualname__", None) or type(func).__name__
    code = getattr(func, "__code__", None)
    if code is not None and "<lambda>" in name:
        return f"<lambda> at {Path(code.co_filename).name}:{code.co_firstlineno}"
    return str(name)
