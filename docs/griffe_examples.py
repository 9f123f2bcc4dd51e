"""A griffe extension for the API reference: read `Example:` sections as `Examples:`.

trainkit's docstrings head their doctests `Example:`, as Google's style guide and napoleon
allow; griffe only reads `Examples:` as a section of code examples (the singular is taken for
an admonition of markdown text, where `>>> h["loss"]` and its output would be mangled). This
renames the heading before the docstring is parsed, so every doctest shows as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename `Example:` section headings to `Examples:` in every loaded docstring."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        _rename(pkg)  # the package itself: `on_object` only sees its members

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        _rename(obj)


def _rename(obj: griffe.Object) -> None:
    if obj.docstring is not None:
        obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
