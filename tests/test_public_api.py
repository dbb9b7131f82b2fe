"""The public surface is small and deliberate; this guards it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

import torchrelay as tr
from torchrelay import broker, client, worker


def test_top_level_api_is_exactly_this() -> None:
    assert sorted(tr.__all__) == sorted([
        "BrokerError", "BrokerUnavailable", "ConnectionLost", "DatasetPointer", "DecodeError",
        "FedAvg", "FederatedDataLoader", "Fleet", "ModulePointer", "ObjectDescription",
        "ObjectNotFound", "OperationRefused", "Plan", "PointerTensor", "PrivateDataError",
        "ProtocolError", "Release", "RemoteError", "ReplyTimeout", "RoundResult",
        "TorchRelayError", "UnknownBrokerURL", "UnknownWorker", "WorkerHandle", "__version__",
        "aggregate", "connect", "dp_train", "hook", "optim", "plan",
    ])
    for name in tr.__all__:
        assert hasattr(tr, name), name


def test_every_error_has_one_root() -> None:
    errors = [getattr(tr, n) for n in tr.__all__ if n.endswith(("Error", "Refused", "Timeout",
                                                                 "Lost", "Unavailable", "URL",
                                                                 "Found", "Worker"))
              and isinstance(getattr(tr, n), type) and n not in ("WorkerHandle",)]
    assert len(errors) >= 11
    assert all(issubclass(e, tr.TorchRelayError) for e in errors)


def test_subpackages_declare_their_api() -> None:
    for package in (broker, client, worker):
        for name in package.__all__:
            assert hasattr(package, name), f"{package.__name__}.{name}"


_IMPORT_BROKER_ALONE = """
import importlib.util, pathlib, sys
# An empty torchrelay package (its __init__ imports everything), then broker alone.
root = pathlib.Path("torchrelay")
spec = importlib.util.spec_from_file_location(
    "torchrelay", root / "__init__.py", submodule_search_locations=[str(root)])
sys.modules["torchrelay"] = importlib.util.module_from_spec(spec)
import torchrelay.broker
print(sorted(m for m in sys.modules if m.startswith(("torchrelay.client", "torchrelay.worker"))))
"""


def test_the_broker_package_imports_neither_client_nor_worker() -> None:
    result = subprocess.run([sys.executable, "-c", _IMPORT_BROKER_ALONE],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_package_imports_one_way_only() -> None:
    # Its folders are not importable on their own: one copy of every class.
    for folder in ("broker", "worker", "client"):
        assert importlib.util.find_spec(folder) is None, folder
    assert broker.RemoteError is tr.RemoteError


def test_the_package_and_a_workers_config_load_without_torch() -> None:
    # A worker daemon's supervisor never computes: it must not pay for torch.
    code = ("import sys, torchrelay, torchrelay.worker.operations._config, torchrelay.broker, "
            "torchrelay._cli; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_unknown_broker_url_suggests_the_right_scheme() -> None:
    with pytest.raises(tr.UnknownBrokerURL, match="did you mean amqp://"):
        tr.connect("amqq://localhost")
