"""Several workers in one daemon process: what a hundred data owners on one machine need.

A supervised daemon costs about 250 MiB idle (an executor with torch, and its
supervisor), most of it torch itself; a hundred owners would take 25 GiB. A host
pays for torch once. Each worker it serves is served as a daemon of its own
would be — its own queue and channels, its own `WorkerRuntime`, `ObjectStore`,
identity, privacy policy, budget and ledger file, built from its own
`WorkerConfig`. Nothing mutable is shared between them but the process and the
connection: no store, no cache, no channel. A command reaches a worker only
through that worker's queue, and a pointer names its worker, so one hosted
worker's objects are as far from another's as from a worker on another machine
(a pointer to A's object sent to B's queue is an unknown object there).

One thread serves all the workers that log in to RabbitMQ alike (the same
addresses, user and connection settings), on one connection (`serve_workers`):
it reads the connection, lets each worker take what it received, then runs one
command of each in turn. Workers with users of their own (`torchrelay users`)
each get a thread and a connection, as RabbitMQ checks a connection's user once.
A thread and a connection per worker cost more than the workers' commands did at
a hundred owners: each wake-up of each thread was a context switch, about forty
per owner per FedAvg round, and a quarter of the host's CPU went to the kernel.

What hosting gives up, stated plainly: **containment**. The supervisor exists
because a native crash or a loop inside a kernel can only be contained by
another process; here the process is shared, so a command that crashes torch
takes every hosted worker down, with the objects they held in memory, and a
command past `command_timeout` is not stopped (nobody can kill a thread). That
is why `torchrelay worker` hosts several workers only when told `--unsupervised`.
Everything enforced per command (the allow-list, the checks, limits on bytes
and elements, privacy, pacing) is enforced as before; what is lost is the
recovery from what gets through. A long command holds up the other workers'
commands, as they take turns on one thread (torch kernels run on the threads
`torch_threads` gives them).

The host serves all its workers or none: one that cannot start, or stops
because of an error, stops the others (each finishing the command in hand), so
an operator never has half a host running. SIGTERM or SIGINT stops them all,
each as a daemon of its own would stop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from ..operations._config import ConfigError, WorkerConfig
from ._daemon import broker_settings, serve_workers, stop_on_signals

__all__ = ["host_workers"]

log = logging.getLogger("torchrelay.worker")

_JOIN_SECONDS = 0.5


def host_workers(configs: Sequence[WorkerConfig], stop: threading.Event | None = None) -> int:
    """Serve every worker of `configs` in this process until `stop` is set or a signal
    arrives, a thread and a connection for each group that logs in alike; the exit
    status (the worst of theirs)."""
    check_hosted(configs)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        stop_on_signals(stop)
    groups = _by_login(configs)
    statuses: dict[int, int] = {}
    # Groups take turns handling what they received. Each torch operation lets go of
    # the GIL; with every thread busy at once (a FedAvg round starts them together) the
    # GIL then changed hands at every operation, and waking the next thread each time
    # cost more CPU than the operations did. A host is meant for a core, and uses one.
    turn = threading.Lock()

    def serve(number: int, group: list[WorkerConfig]) -> None:
        name = "torchrelay host " + ", ".join(c.id for c in group)
        try:
            statuses[number] = serve_workers(group, stop, name=_shortened(name), turn=turn)
        except BaseException:
            log.exception("workers %s failed", ", ".join(c.id for c in group))
            statuses[number] = 1
        if statuses[number] != 0 and not stop.is_set():
            log.error("%s ended with status %d: stopping the other workers this process "
                      "hosts", name, statuses[number])
            stop.set()

    # Each thread is named after its first worker: log lines say whose they are.
    threads = [threading.Thread(target=serve, args=(number, group), name=group[0].id)
               for number, group in enumerate(groups)]
    for thread in threads:
        thread.start()
    log.info("hosting %d workers in one process on %d connections: %s", len(configs),
             len(groups), ", ".join(c.id for c in configs))
    for thread in threads:
        while thread.is_alive():  # (a timed join: signals reach the main thread meanwhile)
            thread.join(_JOIN_SECONDS)
    return max(statuses.values(), default=0)


def _by_login(configs: Sequence[WorkerConfig]) -> list[list[WorkerConfig]]:
    """The workers that can share a connection (the same addresses, user and settings),
    in the order given."""
    groups: dict[str, list[WorkerConfig]] = {}
    for config in configs:
        login = repr((config.broker, sorted(broker_settings(config).items())))
        groups.setdefault(login, []).append(config)
    return list(groups.values())


def _shortened(name: str, most: int = 200) -> str:
    return name if len(name) <= most else name[: most - 1] + "…"


def check_hosted(configs: Sequence[WorkerConfig]) -> None:
    """Refuse a set of workers one process cannot host side by side: the same id twice
    (two consumers of one queue), one ledger file for two (two budgets written over each
    other), or different torch thread counts (a setting of the process)."""
    if not configs:
        raise ConfigError("no worker to host")
    seen: dict[str, str] = {}
    for config in configs:
        if config.id in seen:
            raise ConfigError(f"worker {config.id!r} is listed twice")
        ledger = str(config.ledger.resolve())
        if ledger in seen.values():
            other = next(w for w, file in seen.items() if file == ledger)
            raise ConfigError(f"workers {other!r} and {config.id!r} would share the privacy "
                              f"ledger {ledger}: give each its own ([worker.privacy] ledger)")
        seen[config.id] = ledger
    threads = {config.torch_threads for config in configs}
    if len(threads) > 1:
        raise ConfigError("torch_threads is a setting of the whole process: the hosted "
                          f"workers ask for {sorted(threads, key=str)}; give them one value")
