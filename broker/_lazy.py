"""Packages whose names are imported on first use.

A worker daemon is two processes: a supervisor that must stay small (it never
computes, so it never imports torch) and the executor that runs the operations.
Both start from this package, so its `__init__` modules must not import torch
themselves: they import their names lazily, on first use.

Each such `__init__` lists its names once, as ordinary imports inside an
`if TYPE_CHECKING:` block, which is what type checkers and readers see;
`lazy_exports` reads that block to learn where each name comes from. No second
list to keep in step.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, init_file: str) -> tuple[list[str], Callable[[str], Any]]:
    """`(__all__, __getattr__)` for `package` from the imports under its `TYPE_CHECKING`."""
    where: dict[str, tuple[str, str]] = {}  # exported name -> (module, name there)
    tree = ast.parse(Path(init_file).read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and (
            node.test.id == "TYPE_CHECKING"
        ):
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom):
                    module = "." * statement.level + (statement.module or "")
                    for alias in statement.names:
                        where[alias.asname or alias.name] = (module, alias.name)

    def __getattr__(name: str) -> Any:
        source = where.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, original = source
        if module == ".":  # `from . import submodule`: the submodule itself
            value = importlib.import_module(f"{package}.{original}")
        else:
            value = getattr(importlib.import_module(module, package), original)
        setattr(sys.modules[package], name, value)  # looked up once
        return value

    return sorted(where), __getattr__
