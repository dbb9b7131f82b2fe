"""Child processes: running them with a deadline, and reading their memory.

Memory figures come from the kernel (`/proc/<pid>/status`), not from psutil, so
the benchmark needs nothing torchrelay itself does not. Peak figures are taken
inside fresh processes (`ru_maxrss`), because a peak never goes down: measured
in a long-lived process it would only ever report the largest case so far.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

BARE_TORCH = "import sys, time, torch; print('ready', flush=True); time.sleep(float(sys.argv[1]))"
"""The baseline for an idle worker: a Python process that imported torch and sleeps."""


class ChildFailed(RuntimeError):
    """A child process crashed, timed out or printed no result."""


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` now (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ChildFailed(f"no VmRSS for process {pid}")


def tree(pid: int) -> list[int]:
    """`pid` and every process descended from it (a supervised daemon's executor)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(
                    int(entry))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack += children.get(current, [])
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time (user and system, every thread) `pids` have used so far; a process that
    has ended counts nothing."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def processes_named(name: str) -> list[int]:
    """The processes of this machine whose command is `name` (RabbitMQ's `beam.smp`)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    found.append(int(entry))
    return found


def peak_rss_self() -> int:
    """The calling process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_port() -> int:
    """A TCP port nothing listens on right now (for torch.distributed's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_module(module: str, args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run `python -m module args...`; its last stdout line, parsed as JSON.

    The child's stderr is kept only to explain a failure.
    """
    argv = [sys.executable, "-m", module, *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"{module} did not finish within {timeout:.0f} s") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " ".join(done.stderr.strip().splitlines()[-3:])
        raise ChildFailed(f"{module} exited with status {done.returncode}: {tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@contextlib.contextmanager
def bare_torch_processes(count: int, timeout: float = 120.0) -> Iterator[list[int]]:
    """`count` Python processes that imported torch and sleep; yields their pids."""
    processes: list[subprocess.Popen[str]] = []
    try:
        for _ in range(count):
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", BARE_TORCH, str(timeout)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
        for process in processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise ChildFailed(f"the bare torch process exited with {process.wait()}")
        yield [p.pid for p in processes]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()

