"""What the numbers were measured on: printed above the table, saved in `--json`.

Benchmarks of a broker-based system depend on the CPU, the core count (the
broker, the worker and the client share them) and the versions of everything
on the path, so the table is meaningless without this header.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pika
import torch

from torchrelay.broker import redact_url

from .rabbitmq import server_version


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def describe(amqp_url: str) -> dict[str, str]:
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pika": str(pika.__version__),
        "rabbitmq": server_version(amqp_url),
        "broker": redact_url(amqp_url),
    }


def render(machine: dict[str, str]) -> str:
    width = max(len(k) for k in machine)
    return "\n".join(f"{key.ljust(width)} : {value}" for key, value in machine.items())
