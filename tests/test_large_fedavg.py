"""FedAvg of a model many chunks large, on RabbitMQ daemons: the exact local average, and
no process holding the owners' models side by side (`client/_streamed_sum.py`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import torchrelay as tr
from torchrelay._federated import one_torch_thread
from torchrelay.client import _streamed_sum as streamed
from torchrelay.client._streamed_sum import Piece, pieces, waves
from torchrelay.worker import WorkerProcesses

OWNERS = ("bob", "alice", "carol")
AGGREGATOR = "secure_worker"
WIDTH = 3200  # one 41 MB layer: six of the daemons' 8 MiB chunks, a wave of its own
SAMPLES = {"bob": 8, "alice": 4, "carol": 12}  # unequal: the weights of the average differ


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 4))


def _data(owner: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(len(owner))
    return {"data": torch.randn(SAMPLES[owner], WIDTH, generator=generator),
            "target": torch.randn(SAMPLES[owner], 4, generator=generator)}


@pytest.fixture(scope="module")
def large_fleet(daemons_factory: Any, tmp_path_factory: pytest.TempPathFactory,
                request: pytest.FixtureRequest) -> Iterator[tuple[tr.Fleet, WorkerProcesses]]:
    directory = tmp_path_factory.mktemp("large")
    args = {}
    for owner in OWNERS:
        path = directory / f"{owner}.safetensors"
        save_file(_data(owner), str(path))
        args[owner] = ["--public-dataset", f"{path}:#large"]
    daemons = daemons_factory((*OWNERS, AGGREGATOR), "--torch-threads", "1",
                              worker_args=args, request=request)
    with tr.connect(daemons.url, timeout=300) as fleet:
        yield fleet, daemons


def _fedavg(fleet: tr.Fleet) -> tuple[tr.FedAvg, list[Any]]:
    datasets = [d for owner in OWNERS for d in fleet.worker(owner).search("#large")]
    fedavg = tr.FedAvg(_model(), F.mse_loss, aggregator=fleet.worker(AGGREGATOR),
                       batch_size=8, shuffle=False, progress=False, round_timeout=300)
    return fedavg, datasets


def _local_rounds(rounds: int) -> nn.Module:
    """The one-process loop, on one thread as the daemons run: sequential batches of 8,
    SGD at 0.1, the average weighted by sample count, summed in owner order."""
    with one_torch_thread():
        model, local = _model(), _model()
        total = sum(SAMPLES.values())
        for _ in range(rounds):
            states = []
            for owner in OWNERS:
                local.load_state_dict(model.state_dict())
                optimizer = torch.optim.SGD(local.parameters(), lr=0.1)
                data = _data(owner)
                for start in range(0, SAMPLES[owner], 8):
                    optimizer.zero_grad()
                    loss = F.mse_loss(local(data["data"][start : start + 8]),
                                      data["target"][start : start + 8])
                    loss.backward()  # type: ignore[no-untyped-call]
                    optimizer.step()
                states.append((owner, {k: v.clone() for k, v in local.state_dict().items()}))
            model.load_state_dict({key: sum(state[key] * (SAMPLES[owner] / total)
                                            for owner, state in states)
                                   for key in model.state_dict()})
        return model


def test_fedavg_of_a_model_many_chunks_large_is_the_local_average(
    large_fleet: tuple[tr.Fleet, WorkerProcesses],
) -> None:
    fleet, _ = large_fleet
    fedavg, datasets = _fedavg(fleet)
    history = fedavg.fit(datasets, 2)
    assert all(r.participants == sorted(OWNERS) and not r.left_out for r in history)
    expected = _local_rounds(2)
    for (name, ours), theirs in zip(fedavg.model.state_dict().items(),
                                    expected.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_no_process_holds_the_owners_models_side_by_side(
    large_fleet: tuple[tr.Fleet, WorkerProcesses], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each process's peak during rounds, over its memory before them, stays within
    twice the model: the aggregator holds the sum and a wave or two of each owner's
    pieces, an owner its model and either the weights arriving or the gradients, the
    client the model and a wave of the average. (Holding the three owners' models, or
    flat copies of them, would take three to six times the model.) Waves of 4 MiB
    here, small beside this model as the default's are beside a large one."""
    monkeypatch.setattr(streamed, "WAVE_BYTES", 4 << 20)
    fleet, _ = large_fleet
    fedavg, datasets = _fedavg(fleet)
    model_bytes = sum(t.numel() * 4 for t in fedavg.model.state_dict().values())
    fedavg.fit(datasets, 1)  # the model sent, the plans recorded
    executors = [int(fleet.worker(w).status()["executor_pid"]) for w in (*OWNERS, AGGREGATOR)]
    pids = [*executors, os.getpid()]
    before = {pid: _rss(pid) for pid in pids}
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from now
    fedavg.fit(datasets, 2)
    growth = {pid: _peak_rss(pid) - before[pid] for pid in pids}
    assert max(growth.values()) < 2 * model_bytes, (growth, model_bytes)


def test_waves_group_pieces_in_order_up_to_a_size() -> None:
    assert waves([10, 10, 10, 10, 10], 20) == [[0, 1], [2, 3], [4]]
    assert waves([50, 1, 1, 50], 20) == [[0], [1, 2, 3]]
    assert waves([4], 20) == [[0]]
    assert pieces([5, 2, 0], 2) == [Piece(0, 0, 2), Piece(0, 2, 4), Piece(0, 4, 5),
                                     Piece(1, 0, 2), Piece(2, 0, 0)]
