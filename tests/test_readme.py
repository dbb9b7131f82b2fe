"""The README's tour runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torchrelay as tr

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_tour_runs() -> None:
    tour = re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert tour is not None
    namespace: dict[str, object] = {}
    exec(compile(tour.group(1), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    moved = namespace["w"]
    assert isinstance(moved, tr.PointerTensor)
    assert moved.location.id == "alice"
    assert isinstance(namespace["fleet"], tr.Fleet)
    assert namespace["fleet"].closed
