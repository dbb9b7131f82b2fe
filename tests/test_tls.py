"""TLS: `amqps://` verified against the fleet's CA, with an optional client
certificate, for clients and daemons; anything else refused with a clear error.
(The contract suite runs over TLS too: `broker_url`'s "rabbitmq-tls".)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from tls import TLSListener

import torchrelay as tr
from torchrelay.broker import ManagementAPI
from torchrelay.worker import WorkerProcesses
from torchrelay.worker.operations._config import ConfigError, WorkerConfig

tr.hook(torch)


def test_a_session_over_tls_is_encrypted_end_to_end(
    session_daemons_tls: WorkerProcesses, rabbitmq: ManagementAPI,
) -> None:
    url = session_daemons_tls.url
    assert url.startswith("amqps://")
    with tr.connect(url) as fleet:
        x = torch.tensor([1.0, 2.0]).send(fleet.worker("bob")).move(fleet.worker("alice"))
        assert (x + x).get().tolist() == [2.0, 4.0]
        vhost = url.rsplit("/", 1)[1]
        connections = rabbitmq.wait_for_connections(
            lambda found: len(found) >= 4, vhost=vhost)  # the daemons and this session
    assert connections and all(c["ssl"] for c in connections)


def test_a_client_certificate_is_presented_and_verified(
    tls_listener: TLSListener, session_daemons_tls: WorkerProcesses, rabbitmq: ManagementAPI,
) -> None:
    c = tls_listener.certificates
    with tr.connect(session_daemons_tls.url, name="certified", tls_cert_file=str(c.client_cert),
                    tls_key_file=str(c.client_key)) as fleet:
        assert torch.ones(2).send(fleet.worker("bob")).get().tolist() == [1.0, 1.0]
        vhost = session_daemons_tls.url.rsplit("/", 1)[1]
        mine = rabbitmq.wait_for_connections(lambda found: any(
            "certified" in f.get("client_properties", {}).get("connection_name", "")
            and f.get("peer_cert_subject") for f in found), vhost=vhost)
    subjects = {f.get("peer_cert_subject") for f in mine
                if "certified" in f.get("client_properties", {}).get("connection_name", "")}
    assert any(s and "a torchrelay client" in s for s in subjects), subjects


def test_a_broker_certificate_from_another_ca_is_refused_at_once(
    tls_listener: TLSListener, session_daemons_tls: WorkerProcesses,
) -> None:
    with pytest.raises(tr.BrokerUnavailable, match=r"TLS with RabbitMQ .* failed: .*"
                                                   r"CERTIFICATE_VERIFY_FAILED"):
        tr.connect(session_daemons_tls.url,
                   tls_ca_file=str(tls_listener.certificates.other_ca), connect_timeout=60)


def test_tls_settings_without_amqps_are_refused(tmp_path: Path, tls_listener: TLSListener) -> None:
    ca = str(tls_listener.certificates.ca)
    with pytest.raises(ValueError, match="TLS settings need an amqps:// URL"):
        tr.connect("amqp://guest:guest@localhost:5672/", tls_ca_file=ca)
    with pytest.raises(ConfigError, match="need an amqps:// broker URL"):
        WorkerConfig(id="bob", broker="amqp://guest:guest@localhost/", tls_ca_file=ca)
    with pytest.raises(ConfigError, match="tls_ca_file: there is no file"):
        WorkerConfig(id="bob", broker="amqps://guest:guest@localhost/",
                     tls_ca_file=str(tmp_path / "missing.pem"))


def test_a_daemon_takes_its_tls_files_from_its_config_relative_to_it(
    tls_listener: TLSListener, vhost_factory: Any, tmp_path: Path,
) -> None:
    c = tls_listener.certificates
    for path in (c.ca, c.client_cert, c.client_key):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    url = tls_listener.url(vhost_factory())
    config = tmp_path / "dora.toml"
    config.write_text(f'[worker]\nid = "dora"\nbroker = "{url}"\n'
                      f'tls_ca_file = "{c.ca.name}"\ntls_cert_file = "{c.client_cert.name}"\n'
                      f'tls_key_file = "{c.client_key.name}"\n')
    resolved = WorkerConfig.resolve(config)
    assert resolved.tls_ca_file == str(tmp_path / c.ca.name)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TORCHRELAY_TLS_")}  # only what the config says
    with WorkerProcesses(url, ["dora"], worker_args={"dora": ["--config", str(config)]},
                         log_dir=tmp_path / "logs", env=env) as daemons, \
            tr.connect(daemons.url) as fleet:
        assert fleet.worker("dora").status()["id"] == "dora"
