"""`fit(compile=True)`: the training step through `torch.compile`, or eager with a warning.

The step is compiled as PyTorch's recipes do it: the forward pass and the loss as one function
given to `torch.compile` (TorchDynamo captures them, AOTAutograd derives their backward, and
Inductor compiles both), and `opt.step()` inside a function given to `torch.compile` (the
"compiled optimizer" recipe). Validation runs the model compiled on its own. Callbacks see
the model's output and the loss as they do without compiling. Compiling happens at the first
call; where it fails (no C++ compiler, an unsupported platform or Python), that part runs
eagerly from then on, after a warning that says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__: list[str] = []

# what torch.compile raises when it cannot compile, at once or at the first call; anything
# else (an error in the model, a shape mismatch) is the caller's and propagates unchanged
_COMPILE_ERRORS: tuple[type[BaseException], ...] = (
    torch._dynamo.exc.BackendCompilerFailed,
    torch._dynamo.exc.InternalTorchDynamoError,
    torch._inductor.exc.InductorError,
)


class FirstCallFallback:
    """Call `compiled`; if its first call fails to compile, warn and call `eager` from then on.

    The first call's error is one of `_COMPILE_ERRORS`, raised before the compiled code ran,
    so running `eager` on the same arguments instead does the step once, not twice.
    """

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any], what: str) -> None:
        self.compiled: Callable[..., Any] = compiled
        self.eager: Callable[..., Any] = eager
        self.what: str = what
        self.call: Callable[..., Any] = self._first

    def __call__(self, *args: Any) -> Any:
        return self.call(*args)

    def _first(self, *args: Any) -> Any:
        try:
            out = self.compiled(*args)
        except _COMPILE_ERRORS as err:
            reason = " ".join(str(err).split())  # Inductor's messages run over many lines
            if len(reason) > 500:
                reason = reason[:500] + " ..."
            warnings.warn(
                f"fit(compile=True): {self.what} runs eagerly; torch.compile failed: "
                f"{type(err).__name__}: {reason}",
                stacklevel=4,
            )
            self.call = self.eager
            return self.eager(*args)
        self.call = self.compiled
        return out


def compile_step(
    forward_loss: Callable[[Any, Any], tuple[Any, Any]],
    evaluate_forward: Callable[[Any], Any],
    opt: Optimizer,
    has_scheduler: bool,
) -> tuple[Callable[[Any, Any], tuple[Any, Any]], Callable[[Any], Any], Callable[[], object]]:
    """The training step's parts through `torch.compile`: `forward_loss` (the model, or its DDP
    wrapper, and the loss: one graph, whose backward AOTAutograd derives), `evaluate_forward`
    (the model for validation) and `opt.step`.

    The optimizer step is compiled as in PyTorch's compiled-optimizer recipe (`opt.step()` in
    a function given to `torch.compile`). A learning rate that is a Python float is a constant
    of the compiled step: every new value would compile it again (after 8, torch gives up on
    its own), so with a scheduler the step is compiled only when every group's `lr` is a
    tensor. Where `torch.compile` refuses at once (this Python or platform), all stay eager,
    with one warning.
    """

    def step() -> None:
        opt.step()

    compile_opt = not has_scheduler or all(isinstance(g["lr"], Tensor) for g in opt.param_groups)
    try:
        compiled_train = torch.compile(forward_loss)
        compiled_eval = torch.compile(evaluate_forward)
        compiled_step = torch.compile(step) if compile_opt else None  # graph breaks allowed
    except RuntimeError as err:  # raised at once where this Python/platform can't compile
        warnings.warn(f"fit(compile=True): running eagerly: {err}", stacklevel=4)
        return forward_loss, evaluate_forward, opt.step
    return (
        FirstCallFallback(compiled_train, forward_loss, "the forward pass with the loss"),
        FirstCallFallback(compiled_eval, evaluate_forward, "the model in validation"),
        opt.step
        if compiled_step is None
        else FirstCallFallback(compiled_step, opt.step, "the optimizer step"),
    )
