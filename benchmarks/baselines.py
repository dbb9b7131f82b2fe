"""The baselines torchrelay is compared with.

- bare pika request/reply against an echo server in a child process, on the
  same RabbitMQ (`EchoServer`, `PikaEcho`): the issue's targets are ratios to it;
- torch.distributed.rpc with TensorPipe on loopback (`torch_rpc`), a reference
  with no target: what a point-to-point RPC without a broker costs.

Written after the anchors in /work/shared/anchors, measuring the same things.
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import time
import uuid
from types import TracebackType
from typing import Any

import pika

from torchrelay.broker import stamp

from .processes import ChildFailed, free_port, run_module
from .report import Skipped

ECHO_PREFETCH = 16
"""The anchor's prefetch for the echo server; pipelined throughput depends on it."""

_PIPELINED = "pipelined"
"""The correlation id of every pipelined request: their replies are only counted."""


class EchoServer:
    """The bare pika echo server (`benchmarks.echo_server`) as a child process."""

    def __init__(self, url: str, queue: str, prefetch: int = ECHO_PREFETCH,
                 env: dict[str, str] | None = None) -> None:
        self.url = url
        self.queue = queue
        self.prefetch = prefetch
        self.env = env
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> EchoServer:
        argv = [sys.executable, "-m", "benchmarks.echo_server", self.url, self.queue,
                str(self.prefetch)]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=self.env)
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            self.__exit__(None, None, None)
            raise ChildFailed("the pika echo server did not start")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
            self.process = None


class PikaEcho:
    """A bare pika client of `EchoServer`: exclusive reply queue, auto-ack, no framing."""

    def __init__(self, url: str, queue: str) -> None:
        self.queue = queue
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        declared = self.channel.queue_declare("", exclusive=True)
        self.reply_queue: str = declared.method.queue
        self._replies: dict[str, bytes] = {}
        self._counted = 0
        self.channel.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)

    def _on_reply(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        if props.correlation_id == _PIPELINED:
            self._counted += 1
        else:
            stamp("received", props.correlation_id)
            self._replies[props.correlation_id] = body

    def call(self, body: bytes) -> bytes:
        """One request/reply round trip."""
        correlation_id = uuid.uuid4().hex
        props = pika.BasicProperties(reply_to=self.reply_queue, correlation_id=correlation_id)
        stamp("publish", correlation_id)
        self.channel.basic_publish("", self.queue, body, props)
        stamp("published", correlation_id)
        while correlation_id not in self._replies:
            self.connection.process_data_events(time_limit=None)
        return self._replies.pop(correlation_id)

    def pipelined(self, count: int, body: bytes) -> float:
        """Publish `count` requests without waiting, then collect every reply; seconds."""
        self._counted = 0
        props = pika.BasicProperties(reply_to=self.reply_queue, correlation_id=_PIPELINED)
        start = time.perf_counter()
        for _ in range(count):
            self.channel.basic_publish("", self.queue, body, props)
        while self._counted < count:
            self.connection.process_data_events(time_limit=None)
        return time.perf_counter() - start

    def close(self) -> None:
        # A long measure elsewhere leaves this connection unpumped past its heartbeats:
        # the broker may have closed it. Nothing is lost then.
        with contextlib.suppress(pika.exceptions.AMQPError):
            if self.connection.is_open:
                self.connection.close()


def torch_rpc(
    *, warmup: int, sync_iterations: int, pipelined: int, rounds: int, timeout: float = 180.0
) -> dict[str, Any]:
    """Run `benchmarks.torch_rpc_child` (two ranks on loopback); its raw numbers.

    Raises `Skipped` without NumPy: TensorPipe's `init_rpc` exchanges device maps
    with `all_gather_object`, which decodes through `Tensor.numpy()`.
    """
    if importlib.util.find_spec("numpy") is None:
        raise Skipped(
            "reference skipped: torch.distributed.rpc cannot start without NumPy "
            "(init_rpc -> all_gather_object -> Tensor.numpy()), and NumPy is not installed"
        )
    args = [
        "--port", str(free_port()),
        "--warmup", str(warmup),
        "--sync-iterations", str(sync_iterations),
        "--pipelined", str(pipelined),
        "--rounds", str(rounds),
    ]
    return run_module("benchmarks.torch_rpc_child", args, timeout)
