"""What the measures share: the settings, and the fleet and baselines they run on.

One run starts two worker daemons (bob and alice) with ids that carry a random
suffix, so it never collides with a fleet already on the broker, one
torchrelay client, and the bare pika echo server and client. All of it is
opened once, in an `ExitStack`, and closed whatever happens.
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from dataclasses import dataclass, field
from typing import Any, cast

import torch

import torchrelay as tr
from torchrelay.client import Fleet, PointerTensor, WorkerHandle
from torchrelay.worker import WorkerProcesses

from . import baselines
from .baselines import EchoServer, PikaEcho

MIB = 1 << 20


def send(tensor: torch.Tensor, worker: WorkerHandle) -> PointerTensor:
    """`tensor.send(worker)`, the method `tr.hook(torch)` adds (typed for mypy)."""
    return cast(PointerTensor, cast(Any, tensor).send(worker))


@dataclass(frozen=True, slots=True)
class TransferPlan:
    """How one size of send+get is measured: `rounds` fresh processes per side."""

    mib: int
    reps: int
    warmup: int
    rounds: int


@dataclass(frozen=True, slots=True)
class Settings:
    """Repetition counts; `quick()` is a smoke run, the default keeps under ~6 minutes."""

    sync_iterations: int = 3000
    sync_blocks: int = 6
    sync_warmup: int = 200
    pipelined_ops: int = 5000
    pipelined_rounds: int = 5
    transfers: tuple[TransferPlan, ...] = (
        TransferPlan(1, reps=10, warmup=5, rounds=1),
        TransferPlan(16, reps=5, warmup=1, rounds=3),
        TransferPlan(64, reps=4, warmup=1, rounds=3),
        TransferPlan(256, reps=2, warmup=0, rounds=1),
        TransferPlan(1024, reps=1, warmup=0, rounds=1),
    )
    move_reps: int = 8
    embedded_iterations: int = 5000
    embedded_blocks: int = 5
    idle_workers: int = 3
    idle_settle_s: float = 2.0
    train_steps: int = 600
    train_blocks: int = 6
    fedavg_rounds: int = 20
    dpsgd_reps: int = 5
    dpsgd_rounds: int = 20
    load_clients: int = 10
    load_rounds: int = 50
    heavy_seconds: float = 10.0
    fairness_seconds: float = 60.0
    sidechannel_repetitions: int = 7
    sidechannel_budget_s: float = 400.0
    owner_counts: tuple[int, ...] = (3, 10, 30, 100)
    owner_rounds: int = 20
    flower_timeout_s: float = 900.0
    large_sizes: tuple[str, ...] = ("10 KB", "1 MB", "10 MB", "100 MB", "400 MB", "1 GB")
    """Model sizes of the large-model FedAvg (`large_model.SIZES`); 1 GB where it fits."""
    large_rounds: int = 3
    restart_broker: bool = False
    """Run the broker-restart faults (they restart the RabbitMQ node for everyone)."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            sync_iterations=600,
            sync_blocks=2,
            sync_warmup=50,
            pipelined_ops=1000,
            pipelined_rounds=1,
            transfers=(
                TransferPlan(1, reps=3, warmup=1, rounds=1),
                TransferPlan(16, reps=2, warmup=1, rounds=1),
                TransferPlan(64, reps=2, warmup=0, rounds=1),
                TransferPlan(256, reps=1, warmup=0, rounds=1),
            ),
            move_reps=2,
            embedded_iterations=1000,
            embedded_blocks=1,
            idle_workers=1,
            idle_settle_s=1.0,
            train_steps=100,
            train_blocks=2,
            fedavg_rounds=5,
            dpsgd_reps=1,
            dpsgd_rounds=5,
            load_clients=4,
            load_rounds=10,
            heavy_seconds=2.0,
            fairness_seconds=10.0,
            sidechannel_repetitions=3,
            sidechannel_budget_s=60.0,
            owner_counts=(3, 10),
            owner_rounds=3,
            flower_timeout_s=300.0,
            large_sizes=("10 KB", "1 MB", "100 MB", "400 MB"),
            large_rounds=2,
        )


@dataclass
class Session:
    """The broker URL, the run's suffix, and (once `open`) the shared fleet and baselines."""

    url: str
    settings: Settings
    suffix: str = field(default_factory=lambda: secrets.token_hex(4))
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    known_queues: set[str] = field(default_factory=set)
    fleet: Fleet | None = None
    bob: WorkerHandle | None = None
    alice: WorkerHandle | None = None
    pika: PikaEcho | None = None
    echo_queue: str = ""
    open_error: str | None = None
    _torch_rpc: dict[str, Any] | BaseException | None = None

    def name(self, role: str) -> str:
        """A name for something this run creates: `bench-<role>-<suffix>`."""
        return f"bench-{role}-{self.suffix}"

    def log_dir(self) -> str:
        return self.stack.enter_context(tempfile.TemporaryDirectory(prefix="torchrelay-bench-"))

    def workers(
        self, roles: list[str], extra_args: tuple[str, ...] = (),
        role_args: dict[str, list[str]] | None = None,
    ) -> tuple[WorkerProcesses, list[str]]:
        """Start daemons named after `roles` (`role_args[role]` added to one's command
        line); stopped when the session closes."""
        ids = [self.name(role) for role in roles]
        self.known_queues.update(f"torchrelay.worker.{i}" for i in ids)
        worker_args = {self.name(role): args for role, args in (role_args or {}).items()}
        processes = WorkerProcesses(self.url, ids, extra_args=extra_args,
                                    worker_args=worker_args, log_dir=self.log_dir())
        return self.stack.enter_context(processes), ids

    def open(self) -> None:
        """Start bob and alice, the torchrelay client and the bare pika echo pair."""
        _, (bob, alice) = self.workers(["bob", "alice"])
        fleet = tr.connect(self.url, name=self.name("client"))
        self.stack.callback(fleet.close)
        self.fleet, self.bob, self.alice = fleet, fleet.worker(bob), fleet.worker(alice)
        self.echo_queue = f"bench.echo.{self.suffix}"
        self.known_queues.add(self.echo_queue)
        self.stack.enter_context(EchoServer(self.url, self.echo_queue))
        self.pika = PikaEcho(self.url, self.echo_queue)
        self.stack.callback(self.pika.close)

    def require(self) -> tuple[Fleet, WorkerHandle, WorkerHandle, PikaEcho]:
        if self.fleet is None or self.bob is None or self.alice is None or self.pika is None:
            raise RuntimeError(f"the worker daemons and baselines did not start: {self.open_error}")
        return self.fleet, self.bob, self.alice, self.pika

    def torch_rpc(self) -> dict[str, Any]:
        """The torch.distributed.rpc reference, run once and shared by two measures."""
        if self._torch_rpc is None:
            s = self.settings
            try:
                self._torch_rpc = baselines.torch_rpc(
                    warmup=s.sync_warmup,
                    sync_iterations=s.sync_iterations,
                    pipelined=s.pipelined_ops,
                    rounds=s.pipelined_rounds,
                )
            except Exception as e:
                self._torch_rpc = e
        if isinstance(self._torch_rpc, BaseException):
            raise self._torch_rpc
        return self._torch_rpc

    def close(self) -> None:
        self.stack.close()
