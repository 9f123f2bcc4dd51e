"""Calling callbacks' hooks, shared by `fit`, `evaluate` and `predict`: which hooks run, and
how a stop or a failure raised by one is acted on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from trainkit.callbacks.base import HOOKS, Callback, StopTraining, overrides
from trainkit.state import EvalState, TrainState


def hook_lists(callbacks: Sequence[Callback]) -> dict[str, list[Callable[..., None]]]:
    """Each hook's bound methods, of the callbacks that override it, in firing order."""
    return {name: [getattr(cb, name) for cb in callbacks if overrides(cb, name)] for name in HOOKS}


def call(hooks: list[Callable[..., None]], state: TrainState) -> None:
    """Run an event's hooks; a stop requested by any lets the others run, then stops the run."""
    call_in_step(hooks, state)
    if state.should_stop:
        raise StopTraining(state.stop_reason)


def call_eval(hooks: list[Callable[..., None]], state: EvalState) -> None:
    for hook in hooks:
        hook(state)


def call_any(hooks: list[Callable[..., None]], state: TrainState | EvalState) -> None:
    if isinstance(state, TrainState):
        call(hooks, state)
    else:
        call_eval(hooks, state)


def call_in_step(hooks: list[Callable[..., None]], state: TrainState) -> None:
    """Run the hooks of an event inside a training step: a stop is acted on after the step."""
    for hook in hooks:
        try:
            hook(state)
        except StopTraining as stop:  # as Keras' stop_training flag: finish, then stop
            state.stop(str(stop))


def note_failure(exc: BaseException, hook: Callable[..., None], *args: Any) -> None:
    # A hook failing while the run fails must not hide the original error: note it instead.
    try:
        hook(*args)
    except Exception as err:
        exc.add_note(f"trainkit: {hook.__qualname__} also failed: {type(err).__name__}: {err}")
