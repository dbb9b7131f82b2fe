"""Data that lives on a worker: loaded at start-up, found with search, used where it is.

On RabbitMQ the three owners are daemons: bob gets his file with `--public-dataset`,
alice a CSV with `--public-dataset`, carol a weights-only `.pt` through a config
file's `[[worker.datasets]]` table. In-process workers get the same files through
`tr.connect(datasets=...)`. The datasets here are public, so values may be
fetched to check them; what private ones allow is `test_privacy.py`'s.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import torchrelay as tr
from torchrelay.broker import Delete, Fetch, Transfer
from torchrelay.worker.operations._config import ConfigError, WorkerConfig
from torchrelay.worker.runtime._datasets import DatasetError, DatasetSpec, load_dataset

BOB_DATA = torch.arange(20, dtype=torch.float32).view(10, 2)
BOB_TARGET = torch.arange(10) % 3
ALICE_CSV = "a,label,b\n1,0,2\n3,1,4\n5,1,6\n7,0,8\n"
CAROL_DATA = torch.linspace(-1, 1, 12).view(6, 2)
CAROL_TARGET = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5, 5.5])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("datasets")
    save_file({"data": BOB_DATA, "target": BOB_TARGET}, str(folder / "bob.safetensors"))
    (folder / "alice.csv").write_text(ALICE_CSV)
    torch.save({"data": CAROL_DATA, "target": CAROL_TARGET}, folder / "carol.pt")
    (folder / "carol.toml").write_text(
        '[worker]\nid = "carol"\nbroker = "amqp://unused/"\n\n'
        '[[worker.datasets]]\npath = "carol.pt"\ntags = ["#toy", "#regression"]\n'
        'description = "carol\'s rows"\nprivate = false\n'
    )
    return {"bob": folder / "bob.safetensors", "alice": folder / "alice.csv",
            "carol": folder / "carol.pt", "carol.toml": folder / "carol.toml"}


@pytest.fixture(scope="module", params=["embedded", "rabbitmq"])
def data_url(request: pytest.FixtureRequest, files: dict[str, Path]) -> str | None:
    if request.param == "embedded":
        return None
    daemons = request.getfixturevalue("daemons_factory")(
        ("bob", "alice", "carol"),
        worker_args={"bob": ["--public-dataset", f"{files['bob']}:#toy,#train"],
                     "alice": ["--public-dataset", f"{files['alice']}:#toy"],
                     "carol": ["--config", str(files["carol.toml"])]}, request=request)
    url: str = daemons.url
    return url


@pytest.fixture
def fleet(data_url: str | None, files: dict[str, Path]) -> Iterator[tr.Fleet]:
    def public(path: Path, *tags: str) -> dict[str, Any]:
        return {"path": str(path), "tags": list(tags), "private": False}

    datasets = {"bob": [public(files["bob"], "#toy", "#train")],
                "alice": [public(files["alice"], "#toy")],
                "carol": [public(files["carol"], "#toy", "#regression")]}
    with tr.connect(data_url, datasets=datasets) as session:
        workers = [session.worker(w) for w in ("bob", "alice", "carol")]
        before = {w.id: set(w._objects) for w in workers}
        yield session
        gc.collect()
        session.sync()
        assert {w.id: set(w._objects) for w in workers} == before  # nothing left, nothing lost


def test_search_finds_datasets_and_shows_them_without_fetching(fleet: tr.Fleet) -> None:
    bob, alice, carol = (fleet.worker(w) for w in ("bob", "alice", "carol"))
    (found,) = bob.search("#toy")
    assert isinstance(found, tr.DatasetPointer)
    assert found.location is bob and found.tags == ("#toy", "#train")
    assert (found.shape, found.dtype, len(found)) == (torch.Size([10, 2]), torch.float32, 10)
    assert found.tensors["target"] == (torch.int64, torch.Size([10]))
    assert "bob:" in repr(found) and "data 10x2 float32" in repr(found)
    assert bob.search("#nothing") == []
    everyone = fleet.search("#toy")
    assert [d.location.id for d in everyone] == ["bob", "alice", "carol"]
    assert [d.location.id for d in fleet.search("#toy", "#train")] == ["bob"]
    (rows,) = carol.search("#regression")
    if fleet.broker.url.startswith("amqp"):  # from carol's config file
        assert rows.description == "carol's rows"
    (csv,) = alice.search("#toy")
    assert csv.tensors == {"data": (torch.float32, torch.Size([4, 2])),
                           "target": (torch.int64, torch.Size([4]))}


def test_a_dataset_is_used_where_it_is(fleet: tr.Fleet) -> None:
    (bob_data,) = fleet.worker("bob").search("#train")
    data, _ = bob_data
    assert data.location.id == "bob" and data.shape == torch.Size([10, 2])
    assert torch.equal((data * 2).sum(0).get(), (BOB_DATA * 2).sum(0))
    assert torch.equal(bob_data["target"][0:3].get(), BOB_TARGET[0:3])
    with pytest.raises(KeyError, match="not 'labels'"):
        bob_data["labels"]
    (csv,) = fleet.worker("alice").search("#toy")
    # The column named label is the target; the others, in order, the data.
    assert csv["data"].clone().get().tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert csv["target"].clone().get().tolist() == [0, 1, 1, 0]
    (rows,) = fleet.worker("carol").search("#regression")
    assert torch.equal(rows["target"].clone().get(), CAROL_TARGET)


def test_a_dataset_cannot_be_changed_deleted_or_taken_away(fleet: tr.Fleet) -> None:
    bob = fleet.worker("bob")
    (found,) = bob.search("#train")
    data = found["data"]
    data.add_(1)
    with pytest.raises(tr.RemoteError, match="datasets are read-only"):
        fleet.sync()
    data[0:2].mul_(0)  # a view of it is the dataset too
    with pytest.raises(tr.RemoteError, match="datasets are read-only"):
        fleet.sync()
    for command, what in ((Fetch(found.id_at_location), "fetched"),
                          (Transfer(found.id_at_location, "alice", 12345), "moved")):
        with pytest.raises(tr.RemoteError, match=f"is a dataset of worker 'bob'.*{what}"):
            fleet.request("bob", command)
    fleet.request("bob", Delete([found.id_at_location]))  # a forged delete: ignored
    del found, data
    gc.collect()
    fleet.sync()
    (again,) = bob.search("#train")
    assert torch.equal(again["data"].clone().get(), BOB_DATA)


def test_the_loader_cuts_batches_where_the_data_is(fleet: tr.Fleet) -> None:
    bob_data, alice_data = fleet.search("#toy")[:2]
    loader = tr.FederatedDataLoader([bob_data, alice_data], batch_size=4)
    assert len(loader) == 3 + 1
    batches = list(loader)
    assert [(d.location.id, t.location.id) for d, t in batches] == [("bob", "bob")] * 3 + [
        ("alice", "alice")]
    data = torch.cat([d.get() for d, _ in batches[:3]])
    assert torch.equal(data, BOB_DATA)
    assert torch.equal(torch.cat([t.get() for _, t in batches[:3]]), BOB_TARGET)
    del batches

    def shuffled(seed: int) -> list[list[int]]:
        loader = tr.FederatedDataLoader([bob_data], batch_size=4, shuffle=True, seed=seed,
                                        drop_last=True)
        # Row i of bob's data is [2i, 2i + 1]: which samples each batch holds.
        return [(d.get()[:, 0] / 2).int().tolist() for d, _ in loader]

    first, again, other = shuffled(7), shuffled(7), shuffled(8)
    assert first == again != other
    assert [len(b) for b in first] == [4, 4]  # drop_last: the last 2 left out
    samples = [i for batch in first for i in batch]
    assert len(set(samples)) == 8 and set(samples) <= set(range(10))
    assert samples != sorted(samples)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        tr.FederatedDataLoader([bob_data], batch_size=0)


# -- files that are not plain data ------------------------------------------------------


class _Payload:
    """Pickled into a .pt file: loading it would create `marker`."""

    marker = ""

    def __reduce__(self) -> Any:
        return (Path.touch, (Path(self.marker),))


def test_a_pickled_object_in_a_pt_file_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "it-ran"
    payload = _Payload()
    payload.marker = str(marker)
    evil = tmp_path / "evil.pt"
    torch.save({"data": torch.ones(2, 1), "target": torch.ones(2), "x": payload}, evil)
    with pytest.raises(DatasetError, match=r"evil\.pt cannot be loaded as plain data"):
        load_dataset(DatasetSpec.parse(f"{evil}:#x"))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("ragged.csv", "1,2,3\n4,5\n", "same number"),
        ("words.csv", "a,b\n1,x\n", "not a number"),
        ("empty.csv", "", "is empty"),
        ("truncated.safetensors", b"\x10\x00\x00", "cannot be loaded as plain data"),
        ("list.pt", [torch.ones(1)], "must hold a dict of named tensors"),
        ("notarget.pt", {"data": torch.ones(2)}, r"has no \['target'\]"),
        ("lengths.pt", {"data": torch.ones(2), "target": torch.ones(3)}, "different lengths"),
    ],
)
def test_malformed_dataset_files_are_refused_naming_the_file(
    tmp_path: Path, name: str, content: Any, message: str
) -> None:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(DatasetError, match=message) as refused:
        load_dataset(DatasetSpec.parse(f"{path}:#x"))
    assert name in str(refused.value)


def test_missing_files_and_unknown_formats_are_refused_before_start(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere\.csv does not exist"):
        DatasetSpec.parse(f"{tmp_path}/nowhere.csv:#x")
    (tmp_path / "data.npy").write_bytes(b"")
    with pytest.raises(DatasetError, match="format must be one of"):
        DatasetSpec.parse(f"{tmp_path}/data.npy")
    config = tmp_path / "w.toml"
    config.write_text('[worker]\nid = "bob"\nbroker = "amqp://x/"\n\n'
                      '[[worker.datasets]]\npath = "gone.safetensors"\nshape = 3\n')
    with pytest.raises(ConfigError,
                       match=r"takes path, tags, description and private, not \[.shape.\]"):
        WorkerConfig.resolve(config)


def test_config_paths_are_relative_to_the_config_file(files: dict[str, Path]) -> None:
    config = WorkerConfig.resolve(files["carol.toml"])
    (spec,) = config.datasets
    assert spec == DatasetSpec(str(files["carol"].resolve()), ("#toy", "#regression"),
                               "carol's rows", private=False)


def test_a_daemon_given_a_pickled_dataset_does_not_start_and_names_it(
    tmp_path: Path, vhost_factory: Any
) -> None:
    marker = tmp_path / "it-ran"
    payload = _Payload()
    payload.marker = str(marker)
    evil = tmp_path / "evil.pt"
    torch.save({"data": torch.ones(2, 1), "target": torch.ones(2), "x": payload}, evil)
    result = subprocess.run(
        [sys.executable, "-m", "torchrelay", "worker", "--id", "mallory", "--broker",
         vhost_factory(), "--dataset", f"{evil}:#x"],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert f"dataset file {evil} cannot be loaded as plain data" in result.stderr
    assert not marker.exists()
