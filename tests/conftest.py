"""Fixtures: one contract suite, run against the embedded broker and a real RabbitMQ.

`fleet` is parametrized over both brokers, RabbitMQ twice: over plain AMQP and
over TLS (`amqps://`, verified against a throwaway CA, see `tls.py`). On
RabbitMQ, the workers bob, alice and carol are real daemon processes (`python -m
torchrelay worker`), started once per session in a virtual host of their own,
which is deleted afterwards.

RabbitMQ tests skip when no broker is reachable, except under `CI=true`, where
that is a failure. After every test the workers' stores must hold nothing the
test created: garbage collection is checked everywhere, for free.
"""

from __future__ import annotations

import functools
import gc
import os
import secrets
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tls import TLSListener, make_certificates

import torchrelay as tr
from torchrelay.broker import (
    BATCH,
    TLS_ENV,
    Endpoint,
    Frame,
    ManagementAPI,
    decode_batch,
    decode_command,
    decode_reply_batch,
)
from torchrelay.worker import WorkerProcesses

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/")
MANAGEMENT_URL = os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://localhost:15672")

WORKERS = ("bob", "alice", "carol")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Privacy ledgers of workers that name none (see worker/runtime/_privacy.py) go to a folder of
# this run, not the user's ~/.local/state.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="torchrelay-test-state-")


def vhost_of(url: str) -> str:
    """The virtual host of a broker URL (the tests' own, from `vhost_factory`)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path[1:])


TERMINAL_SUMMARY: list[str] = []
"""Lines tests want shown at the end of the run (the fuzz campaign's figures)."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "restarts_broker: restarts the local RabbitMQ node; "
                                       "runs after every other test")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A broker restart drops every connection and the TLS listener: nothing after it.
    items.sort(key=lambda item: item.get_closest_marker("restarts_broker") is not None)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in TERMINAL_SUMMARY:
        terminalreporter.write_line(line)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"report_{report.when}", report)
    if report.failed and report.when == "call":
        _attach_worker_logs(item, report)
    return report


def _attach_worker_logs(item: pytest.Item, report: pytest.TestReport, lines: int = 80) -> None:
    """A failed test's daemons' logs (`*.log` under its `tmp_path`, where tests that
    start daemons keep them) go with its report: CI keeps only what it printed."""
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if not isinstance(tmp_path, Path):
        return
    for log in sorted(tmp_path.rglob("*.log"))[:6]:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        report.sections.append((f"log {log.relative_to(tmp_path)} (last {lines} lines)",
                                "\n".join(tail)))


@pytest.fixture(scope="session")
def rabbitmq() -> ManagementAPI:
    """The RabbitMQ management API; skips (fails in CI) when there is no RabbitMQ."""
    api = ManagementAPI(AMQP_URL, base=MANAGEMENT_URL)
    if not api.available():
        message = f"no RabbitMQ management API at {api.base} (AMQP_URL={AMQP_URL})"
        if IN_CI:
            pytest.fail(message + "; under CI=true RabbitMQ tests must run")
        pytest.skip(message)
    return api


@pytest.fixture(scope="session")
def vhost_factory(rabbitmq: ManagementAPI) -> Iterator[Any]:
    """Makes fresh virtual hosts (returns their AMQP URLs); deletes them at the end."""
    created: list[str] = []

    def make() -> str:
        name = f"torchrelay-test-{secrets.token_hex(4)}"
        created.append(name)
        return rabbitmq.create_vhost(name)

    yield make
    for name in created:
        rabbitmq.delete_vhost(name)


@pytest.fixture(scope="session")
def daemons_factory(vhost_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Starts worker daemons in a fresh virtual host; stops them when the fixture or test
    whose `request` is given ends, else at the end of the session. (Each supervised
    daemon is ~350 MiB: kept to the session's end, a whole run's came to 23 GiB, and the
    machine's memory ran out.)"""
    started: list[WorkerProcesses] = []

    def make(worker_ids: tuple[str, ...] = WORKERS, *extra_args: str,
             worker_args: dict[str, list[str]] | None = None,
             request: pytest.FixtureRequest | None = None) -> WorkerProcesses:
        url = vhost_factory()
        log_dir = tmp_path_factory.mktemp("daemons")
        daemons = WorkerProcesses(url, worker_ids, extra_args=extra_args,
                                  worker_args=worker_args, log_dir=log_dir)
        started.append(daemons)
        if request is not None:
            request.addfinalizer(daemons.stop_all)
        daemons.start()
        return daemons

    yield make
    for daemons in started:
        daemons.stop_all()


@pytest.fixture
def daemons_for_test(daemons_factory: Any, request: pytest.FixtureRequest) -> Any:
    """`daemons_factory` for one test: its daemons stop when the test ends."""
    return functools.partial(daemons_factory, request=request)


@pytest.fixture(scope="session")
def session_daemons(daemons_factory: Any) -> WorkerProcesses:
    """bob, alice and carol, shared by the contract suite."""
    daemons: WorkerProcesses = daemons_factory()
    return daemons


@pytest.fixture(scope="session")
def tls_listener(rabbitmq: ManagementAPI) -> Iterator[TLSListener]:
    """A TLS listener on the local RabbitMQ; its CA is what `amqps://` connections of this
    process and the daemons it starts verify against (`$TORCHRELAY_TLS_CA_FILE`)."""
    if not TLSListener.available():
        message = "no rabbitmqctl here to start a TLS listener with"
        if IN_CI:
            pytest.fail(message + "; under CI=true the TLS tests must run")
        pytest.skip(message)
    listener = TLSListener(make_certificates())
    listener.start()
    os.environ[TLS_ENV[0]] = str(listener.certificates.ca)
    yield listener
    os.environ.pop(TLS_ENV[0], None)
    listener.stop()


@pytest.fixture(scope="session")
def session_daemons_tls(
    vhost_factory: Any, tls_listener: TLSListener, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcesses]:
    """bob, alice and carol again, connected over TLS."""
    daemons = WorkerProcesses(tls_listener.url(vhost_factory()), WORKERS,
                              log_dir=tmp_path_factory.mktemp("daemons-tls"))
    daemons.start()
    yield daemons
    daemons.stop_all()


@pytest.fixture(params=["embedded", "rabbitmq", "rabbitmq-tls"])
def broker_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "embedded":
        return None
    name = "session_daemons" if request.param == "rabbitmq" else "session_daemons_tls"
    daemons: WorkerProcesses = request.getfixturevalue(name)
    return daemons.url


@pytest.fixture
def fleet(broker_url: str | None, request: pytest.FixtureRequest) -> Iterator[tr.Fleet]:
    """A client session whose workers are bob, alice and carol; checks nothing leaks."""
    session = tr.connect(broker_url, timeout=30)
    workers = [session.worker(w) for w in WORKERS]
    before = {w.id: set(w._objects) for w in workers}
    yield session
    try:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.passed:
            gc.collect()
            session.sync()
            leaked = {w.id: set(w._objects) - before[w.id] for w in workers}
            leaked = {k: v for k, v in leaked.items() if v}
            assert not leaked, f"objects left behind on workers: {leaked}"
    finally:
        session.close()


@pytest.fixture
def bob(fleet: tr.Fleet) -> tr.WorkerHandle:
    return fleet.worker("bob")


@pytest.fixture
def alice(fleet: tr.Fleet) -> tr.WorkerHandle:
    return fleet.worker("alice")


@pytest.fixture
def carol(fleet: tr.Fleet) -> tr.WorkerHandle:
    return fleet.worker("carol")


class Recorder:
    """Wraps a fleet's endpoint; records what it publishes and receives, in order.

    `events` has one line per command or reply (the commands of a batch each have
    theirs), `messages` one per message, and `garbage` what rode along."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.events: list[str] = []
        self.messages: list[str] = []
        self.garbage: list[int] = []

    def send_command(self, worker_id: str, type: str, frame: Frame, correlation_id: str,
                     **options: Any) -> None:
        if type == BATCH:
            items = decode_batch(frame.tobytes())
            names = [item.name for item in items]
            self.garbage += [i for item in items for i in item.envelope.garbage]
        else:
            names = [type]
            self.garbage += decode_command(type, frame.tobytes())[1].garbage
        self.events += [f"send {name} to {worker_id}" for name in names]
        self.messages.append(f"send {' + '.join(names)} to {worker_id}")
        self.endpoint.send_command(worker_id, type, frame, correlation_id, **options)

    def receive(self, timeout: float) -> Any:
        delivery = self.endpoint.receive(timeout)
        if delivery is not None:
            if delivery.type == f"{BATCH}.reply":
                names = [f"{name}.reply" for _, name, _ in decode_reply_batch(delivery.body)]
            else:
                names = [delivery.type]
            self.events += [f"receive {name}" for name in names]
            self.messages.append(f"receive {' + '.join(names)}")
        return delivery

    def clear(self) -> None:
        self.events.clear()
        self.messages.clear()
        self.garbage.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.endpoint, name)


@pytest.fixture
def recorder(fleet: tr.Fleet) -> Iterator[Recorder]:
    """Records the fleet's traffic (see `Recorder`)."""
    recorder = Recorder(fleet.endpoint)
    fleet.endpoint = recorder  # type: ignore[assignment]
    yield recorder
    fleet.endpoint = recorder.endpoint
