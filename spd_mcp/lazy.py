"""Lazy package exports: a package names what it offers and where it lives, and a submodule is
imported only when one of its names is first used (so light entry points such as a package's
``cli`` load without torch)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]], all_names: Sequence[str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps submodule → names it provides;
    ``all_names`` (the package's ``__all__``) must list exactly those names."""
    where = {name: mod for mod, names in exports.items() for name in names}
    if sorted(where) != sorted(all_names):
        raise AssertionError(f"{package}.__all__ and its exports differ: "
                             f"{sorted(set(where) ^ set(all_names))}")

    def getattr_(name: str) -> Any:
        mod = where.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{mod}"), name)

    def dir_() -> list[str]:
        return list(all_names)

    return getattr_, dir_
