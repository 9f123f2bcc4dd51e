"""The public surface: `__all__` matches the exports; every public name is documented."""

from __future__ import annotations

import inspect

import trainkit

# type aliases and constants: documented in the module, no runtime docstring of their own
ALIASES = {
    "Amp",
    "BatchMetric",
    "LossFn",
    "MetricArg",
    "Scheduler",
    "Status",
    "HOOKS",
    "__version__",
}


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(trainkit) if not name.startswith("_")}
    modules = {name for name in public if inspect.ismodule(getattr(trainkit, name))}
    assert set(trainkit.__all__) | {"__version__"} >= public - modules
    assert len(trainkit.__all__) == len(set(trainkit.__all__))
    for name in trainkit.__all__:
        assert hasattr(trainkit, name), name


def test_every_public_function_and_class_is_documented_with_an_example() -> None:
    missing = []
    for name in trainkit.__all__:
        if name in ALIASES:
            continue
        doc = inspect.getdoc(getattr(trainkit, name)) or ""
        if "Example" not in doc:
            missing.append(name)
    assert missing == []


def test_functions_document_their_arguments() -> None:
    for name in trainkit.__all__:
        obj = getattr(trainkit, name)
        if not inspect.isfunction(obj):
            continue
        params = [p for p in inspect.signature(obj).parameters if p not in ("self",)]
        doc = inspect.getdoc(obj) or ""
        for param in params:
            assert param in doc, f"{name}: argument {param!r} is not documented"


def test_package_is_typed() -> None:
    assert inspect.getfile(trainkit).endswith("__init__.py")
    from importlib.resources import files

    assert files("trainkit").joinpath("py.typed").is_file()
