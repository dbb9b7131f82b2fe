"""The worker daemon and the command line, as users run them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pika
import pytest
import torch

import torchrelay as tr
from torchrelay.broker import Call, worker_queue
from torchrelay.worker import ConfigError, WorkerConfig

tr.hook(torch)

ROOT = Path(__file__).resolve().parent.parent


def stall(fleet: tr.Fleet, worker: str, seconds: float) -> None:
    """Have `worker` (a daemon started with `--fault-injection`) hold its command in hand
    for `seconds`, whatever the machine's speed (see worker/runtime/_faults.py)."""
    fleet.post(worker, Call("testing.stall", [seconds], {}, None))


def queued_messages(url: str, worker_id: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        ok = connection.channel().queue_declare(worker_queue(worker_id), passive=True)
        return int(ok.method.message_count)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_lets_the_command_in_hand_finish_then_exits_0(
    daemons_for_test: Any, signum: signal.Signals
) -> None:
    daemons = daemons_for_test(("erin",), "--fault-injection")
    process = daemons.processes["erin"]
    with tr.connect(daemons.url, timeout=2) as fleet:
        erin = fleet.worker("erin")
        big = torch.ones(3).send(erin)
        fleet.sync()
        stall(fleet, "erin", 5.0)  # starts now
        time.sleep(1.0)
        waiting = big.sum()  # delivered, not started: must go back to the queue
        time.sleep(0.5)

        process.send_signal(signum)
        assert process.wait(timeout=60) == 0

        # The command in hand was answered before the exit; the next one never started.
        with pytest.raises(tr.ReplyTimeout, match=r"to call Tensor\.sum"):
            fleet.sync()
        for pointer in (big, waiting):
            pointer.garbage_collect = False
    assert queued_messages(daemons.url, "erin") == 1
    log = daemons.log_tail("erin")
    assert f"received {signum.name}" in log
    assert "worker erin stopped" in log


def test_a_long_command_does_not_cost_the_worker_its_connection(daemons_for_test: Any) -> None:
    daemons = daemons_for_test(("frank",), "--heartbeat", "1", "--fault-injection")
    with tr.connect(daemons.url) as fleet:
        frank = fleet.worker("frank")
        # A command of more than three heartbeats: without the keeper thread the broker
        # would have closed the connection during it.
        stall(fleet, "frank", 4.0)
        fleet.sync()
        status = frank.status()
    assert status["reconnects"] == 0
    assert "lost its connection" not in daemons.log_tail("frank")


def test_status_command_prints_json(session_daemons: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "torchrelay", "status", "bob", "nobody",
         "--broker", session_daemons.url],
        capture_output=True, text=True, timeout=60, check=False,
    )
    bob, nobody = (json.loads(line) for line in result.stdout.splitlines())
    assert result.returncode == 1  # one of the two is not there
    assert bob["id"] == "bob"
    assert bob["pid"] == session_daemons.processes["bob"].pid
    assert bob["reconnects"] == 0
    assert "no worker 'nobody'" in nobody["error"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torchrelay", *args], capture_output=True,
                          text=True, timeout=60, check=False, env=env)


def test_worker_without_a_broker_says_how_to_give_one() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORCHRELAY_BROKER"}
    result = run_cli("worker", "--id", "bob", env=env)
    assert result.returncode == 2
    assert "no worker broker: pass --broker, set TORCHRELAY_BROKER" in result.stderr


def test_worker_with_a_bad_id_is_refused() -> None:
    result = run_cli("worker", "--id", "bob/../evil", "--broker", "amqp://localhost/")
    assert result.returncode == 2
    assert "worker id 'bob/../evil' must be" in result.stderr


def test_the_example_configs_load() -> None:
    configs = sorted(p for p in (ROOT / "configs").glob("*.toml") if p.name != "fleet.toml")
    assert configs
    for path in configs:  # (fleet.toml: tests/test_fleet.py)
        config = WorkerConfig.resolve(path)
        assert config.broker.startswith("amqp")


def test_flags_and_environment_override_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "w.toml"
    path.write_text('[worker]\nid = "bob"\nbroker = "amqp://file/"\nprefetch = 8\n')
    monkeypatch.setenv("TORCHRELAY_BROKER", "amqp://env/")
    config = WorkerConfig.resolve(path, prefetch=3, id=None)
    assert (config.id, config.broker, config.prefetch) == ("bob", "amqp://env/", 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[worker]\nid = "bob"\nbroker = "amqp://x/"\nprefetch = 0\n', "prefetch must be"),
        ('[worker]\nid = "bob"\nbroker = "amqp://x/"\ngone_after = 0\n',
         "gone_after must be positive"),
        ('[worker]\nid = "bob"\nbroker = "amqp://x/"\nreply_timeout = nan\n',
         "reply_timeout must be positive, not nan"),
        ('[worker]\nid = "bob"\nbroker = "amqp://x/"\nspeed = 3\n', "unknown settings ['speed']"),
        ('[worker]\nid = "bob"\nbroker = "amqp://x/"\nprefetch = "8"\n', "prefetch must be int"),
        ('[worker]\nid = "bob"\nbroker = "redis://x/"\n', "amqp:// or amqps://"),
        ("[worker\n", "not valid TOML"),
        ('[daemon]\nid = "bob"\n', "no [worker] table"),
        ('[worker]\nid = "bob"\nbroker = "amqp://x/"\n[worker.privacy]\nk = 0\n',
         "privacy k must be a whole number from 1"),
        ('[worker]\nid = "bob"\nbroker = "amqp://x/"\n[worker.privacy]\nnoise_multiplier = -1\n',
         "noise_multiplier must be a number from 0"),
        ('[worker]\nid = "bob"\nbroker = "amqp://x/"\n[worker.privacy]\neps = 3\n',
         "[worker.privacy] takes"),
        ('[worker]\nid = "bob"\nbroker = "amqp://x/"\n[worker.privacy]\ntrusted = "w"\n',
         "trusted must be a list of worker ids"),
    ],
)
def test_bad_config_files_are_refused_naming_the_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    monkeypatch.delenv("TORCHRELAY_BROKER", raising=False)
    path = tmp_path / "w.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        WorkerConfig.resolve(path)
