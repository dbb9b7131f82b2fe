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


def test_the_federated_flow_runs() -> None:
    import torch  # noqa: PLC0415

    tr.hook(torch)
    flow = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)[1]
    assert "secure_worker" in flow
    with tr.connect() as fleet:
        namespace: dict[str, object] = {"fleet": fleet, "torch": torch}
        exec(compile(flow, "README.md", "exec"), namespace)  # noqa: S102 - our own README
        model = namespace["model"]
        assert isinstance(model, torch.nn.Linear) and torch.isfinite(model.weight).all()
        # Both trained models are on the aggregator now, none on bob or alice.
        assert len(fleet.worker("secure_worker")._objects) == 4
