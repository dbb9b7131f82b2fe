"""`torchrelay fleet up | status | down` against the real RabbitMQ, and the example
fleet, docker-compose.yml and configs checked against the repository."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import torchrelay as tr
from torchrelay._cli import main
from torchrelay.worker.operations._config import WorkerConfig
from torchrelay.worker.operations._local_fleet import FleetFile

tr.hook(torch)

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ("bob", "alice", "carol", "secure_worker")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_fleet_goes_up_serves_shows_and_comes_down(
    vhost_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    url = vhost_factory()
    for worker_id in ("bob", "alice"):
        (tmp_path / f"{worker_id}.toml").write_text(
            f'[worker]\nid = "{worker_id}"\nbroker = "amqp://set-by-the-fleet/"\n')
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(f'[fleet]\nbroker = "{url}"\nrun_dir = "run"\n'
                          'workers = ["bob.toml", "alice.toml"]\n')
    fleet = FleetFile.read(fleet_file)
    assert main(["fleet", "up", str(fleet_file)]) == 0
    try:
        pids = {w: int(fleet.pid_file(w).read_text()) for w in ("bob", "alice")}
        assert all(_alive(pid) for pid in pids.values())
        assert main(["fleet", "up", str(fleet_file)]) == 1  # a second fleet is refused
        assert "worker 'bob' already runs" in capsys.readouterr().err
        with tr.connect(url) as session:
            moved = torch.tensor([1.0, 2.0]).send(session.worker("bob")).move(
                session.worker("alice"))
            assert moved.get().tolist() == [1.0, 2.0]
        assert main(["fleet", "status", str(fleet_file)]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split("\t")[:3] == ["worker", "state", "pid"]
        rows = {line.split("\t")[0]: line.split("\t") for line in table[1:]}
        assert rows["bob"][1:3] == ["running", str(pids["bob"])]
        assert "worker bob serving on" in fleet.log_file("bob").read_text()
    finally:
        assert main(["fleet", "down", str(fleet_file)]) == 0
    said = capsys.readouterr().out
    assert f"bob\tstopped (pid {pids['bob']})" in said
    assert not any(_alive(pid) for pid in pids.values())
    assert not fleet.pid_file("bob").exists()
    assert main(["fleet", "status", str(fleet_file)]) == 0
    assert "bob\tstopped" in capsys.readouterr().out
    assert main(["fleet", "down", str(fleet_file)]) == 0
    assert "bob\twas not running" in capsys.readouterr().out


def test_a_new_user_s_session_from_the_readme(
    vhost_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README, "Your first fleet": the four workers of configs/ up with one command,
    the walkthrough and the federated demo run on them, status and its --watch, and
    everything down; on the real RabbitMQ, with configs/ as they are in the repository."""
    url = vhost_factory()
    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # (its run folder is beside it)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # the owners' ledgers
    fleet_file = str(tmp_path / "configs" / "fleet.toml")
    assert main(["fleet", "up", fleet_file, "--broker", url]) == 0
    try:
        assert main(["demo", "--running", "--broker", url]) == 0
        assert "every store matched the notebook" in capsys.readouterr().out
        assert main(["demo", "federated", "--running", "--broker", url, "--rounds", "2"]) == 0
        said = capsys.readouterr().out
        assert "Found 3 datasets tagged #digits" in said and "Privacy spent" in said
        assert main(["status", "--broker", url, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert {r["id"]: r["state"] for r in rows} == dict.fromkeys(WORKERS, "live")
        assert all(r["queue"] is not None for r in rows)  # the console's figures beside
        with subprocess.Popen([sys.executable, "-m", "torchrelay", "status", "--broker", url,
                               "--watch", "0.2"], stdout=subprocess.PIPE, text=True) as watch:
            assert watch.stdout is not None
            tables = 0
            for line in watch.stdout:  # it refreshes until interrupted
                tables += line.removeprefix("\x1b[2J\x1b[H").startswith("worker ")
                if tables == 3:
                    break
            watch.send_signal(signal.SIGINT)
            assert watch.wait(timeout=30) == 0
    finally:
        assert main(["fleet", "down", fleet_file]) == 0
    capsys.readouterr()
    assert main(["status", "--broker", url, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["id"]: r["state"] for r in rows} == dict.fromkeys(WORKERS, "gone")


def test_a_daemon_that_died_shows_as_dead(
    vhost_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    url = vhost_factory()
    (tmp_path / "dora.toml").write_text('[worker]\nid = "dora"\nbroker = "amqp://x/"\n')
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(f'[fleet]\nbroker = "{url}"\nworkers = ["dora.toml"]\n')
    fleet = FleetFile.read(fleet_file)
    assert main(["fleet", "up", str(fleet_file)]) == 0
    pid = int(fleet.pid_file("dora").read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    capsys.readouterr()
    assert main(["fleet", "status", str(fleet_file)]) == 0
    assert "dora\tdead" in capsys.readouterr().out
    assert main(["fleet", "up", str(fleet_file)]) == 0  # a dead one is started again
    assert main(["fleet", "down", str(fleet_file)]) == 0


def test_a_bad_fleet_file_is_refused_naming_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    fleet_file = tmp_path / "fleet.toml"
    assert main(["fleet", "up", str(fleet_file)]) == 1
    assert "does not exist" in capsys.readouterr().err
    fleet_file.write_text('[fleet]\nbroker = "amqp://x/"\nworkers = "bob.toml"\n')
    assert main(["fleet", "status", str(fleet_file)]) == 1
    assert "workers is a list of worker config files" in capsys.readouterr().err
    fleet_file.write_text('[fleet]\nbroker = "amqp://x/"\nworkers = ["missing.toml"]\n')
    assert main(["fleet", "up", str(fleet_file)]) == 1
    assert "missing.toml does not exist" in capsys.readouterr().err


def test_the_example_fleet_lists_the_four_workers_of_configs() -> None:
    fleet = FleetFile.read(ROOT / "configs" / "fleet.toml")
    assert list(fleet.workers) == ["bob", "alice", "carol", "secure_worker"]


def test_the_digits_shares_of_configs_are_the_ones_the_demo_writes(tmp_path: Path) -> None:
    from safetensors.torch import load_file  # noqa: PLC0415

    from torchrelay._federated import write_shares  # noqa: PLC0415

    for owner, written in write_shares(tmp_path).items():
        config = WorkerConfig.resolve(ROOT / "configs" / f"{owner}.toml")
        (dataset,) = config.datasets
        assert Path(dataset.path) == ROOT / "configs" / "data" / written.name
        assert dataset.private and "#digits" in dataset.tags
        assert config.privacy.trusted == ("secure_worker",)
        committed, fresh = load_file(dataset.path), load_file(str(written))
        assert committed.keys() == fresh.keys()
        assert all(torch.equal(committed[k], fresh[k]) for k in fresh)


def test_docker_compose_runs_the_four_workers_from_configs_and_rabbitmq_with_its_console() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    rabbitmq = next(s for s in services.values() if "rabbitmq" in str(s.get("image", "")))
    assert "management" in rabbitmq["image"]
    assert any("15672" in str(p) for p in rabbitmq.get("ports", []))
    assert "healthcheck" in rabbitmq
    for volume in rabbitmq.get("volumes", []):  # what it mounts from here exists
        assert (ROOT / volume.split(":")[0]).is_file(), volume
    for worker_id in ("bob", "alice", "carol", "secure_worker"):
        service = services[worker_id]
        assert service["build"] == "." and (ROOT / "Dockerfile").is_file()
        assert service["command"] == ["worker", "--config", f"configs/{worker_id}.toml"]
        broker = service["environment"]["TORCHRELAY_BROKER"]
        assert broker.startswith("amqp://") and "@rabbitmq:" in broker
        config = WorkerConfig.resolve(ROOT / "configs" / f"{worker_id}.toml", broker=broker)
        assert config.id == worker_id
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert service["healthcheck"]["test"] == ["CMD", "torchrelay", "status", worker_id]
        assert service["stop_signal"] == "SIGTERM"
    assert "COPY configs" in (ROOT / "Dockerfile").read_text()
