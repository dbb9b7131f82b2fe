"""The `torchrelay` command: run a worker daemon, the demo, or ask workers for status.

    torchrelay worker --id bob --broker amqp://guest:guest@localhost:5672/
    torchrelay worker --config configs/bob.toml
    torchrelay worker --unsupervised --config a.toml --config b.toml   # one process, two workers
    torchrelay demo [--broker URL]
    torchrelay demo federated [--broker URL] [--rounds N] [--plot FILE.png]
                              [--privacy record|owner|none] [--epsilon E]
    torchrelay status bob alice --broker URL
    torchrelay users add bob --role worker [--password P] [--broker ADMIN_URL]
    torchrelay users remove bob | torchrelay users list
    torchrelay fleet up|down|status [configs/fleet.toml] [--broker URL]
    torchrelay keygen --out alice.key [--id alice] [--show]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from torchrelay.broker import QUEUE_TYPES, default_url
from torchrelay.worker.operations._config import JoinedFlag, add_flags

LOCAL_BROKER = "amqp://guest:guest@localhost:5672/"
"""The local RabbitMQ as guest, as configs/ use it: where commands go when none is named."""

# torch warns on import when NumPy is absent; torchrelay never needs NumPy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__all__ = ["main"]

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrelay", description="Privacy-preserving remote execution of PyTorch."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run one worker daemon in the foreground")
    worker.add_argument("--config", action="append",
                        help="a TOML file with a [worker] table; several (repeated), with "
                             "--unsupervised: one process hosts a worker for each")
    worker.add_argument("--dataset", action="append", metavar="PATH:TAG[,TAG]",
                        help="a dataset file the worker loads and offers, private to it "
                             "(repeatable)")
    worker.add_argument("--public-dataset", action="append", metavar="PATH:TAG[,TAG]",
                        help="a dataset file the worker offers as public data (repeatable)")
    worker.add_argument("--unsupervised", action="store_true",
                        help="serve in this one process, without the supervisor: a crash "
                             "inside torch then takes the worker down (for measuring and "
                             "debugging, and to host several workers in one process: many "
                             "data owners on one machine)")
    add_flags(worker)  # one per setting, from its declaration in WorkerConfig

    demo = commands.add_parser("demo", help="run the remote-execution walkthrough, or the "
                                            "federated digits demo")
    demo.add_argument("which", nargs="?", choices=["walkthrough", "federated"],
                      default="walkthrough")
    demo.add_argument(
        "--broker", action=JoinedFlag,
        help="amqp[s]:// URL; starts and stops the worker daemons "
             "itself (default: in-process workers)")
    demo.add_argument("--running", action="store_true",
                      help="use the workers already serving on the broker (`torchrelay fleet "
                           "up configs/fleet.toml`, docker compose) rather than start any; "
                           "--broker defaults to $TORCHRELAY_BROKER, else the local RabbitMQ")
    demo.add_argument("--rounds", type=int, default=20, help="federated: FedAvg rounds (20)")
    demo.add_argument("--plot", metavar="FILE.png",
                      help="federated: save the loss and accuracy curves there")
    demo.add_argument("--workdir", help="federated: where the workers' data files and "
                                        "configs are written (default: a new temporary folder)")
    demo.add_argument("--privacy", choices=["record", "owner", "none"], default="record",
                      help="federated: what the owners' differential privacy protects: each "
                           "record (DP-SGD run by each owner's worker; the default), each "
                           "owner's whole share (DP aggregation through secure_worker), or "
                           "nothing (public shares, the Flower comparison's setting)")
    demo.add_argument("--epsilon", type=float,
                      help="federated: the owners' budget at delta 1e-5 (default 3 per "
                           "record; 250 per owner)")
    demo.add_argument("--public", action="store_true",
                      help="federated: the same as --privacy none")
    demo.add_argument("--noise-multiplier", type=float,
                      help="federated: the owners' noise multiplier (default: with --privacy "
                           "record, the least that fits the budget over the rounds; with "
                           "owner, 0.3)")

    status = commands.add_parser(
        "status", help="the live workers, their figures and their queues (or, given ids, "
                       "those workers' status as JSON lines)")
    status.add_argument("workers", nargs="*", help="worker ids (default: every live worker)")
    status.add_argument(
        "--broker", action=JoinedFlag,
        help="amqp[s]:// URL (default: $TORCHRELAY_BROKER, else "
             "the local RabbitMQ as guest)")
    status.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                        help="refresh every SECONDS (2) until Ctrl-C")
    status.add_argument("--management-url",
                        help="the management API, for queue figures (default: port 15672 "
                             "of the broker's host)")

    fleet = commands.add_parser("fleet", help="start, stop or show the worker daemons a fleet "
                                              "file lists, on this machine")
    fleet.add_argument("action", choices=["up", "down", "status"])
    fleet.add_argument("file", nargs="?", default="configs/fleet.toml",
                       help="the fleet file (default configs/fleet.toml)")
    fleet.add_argument(
        "--broker", action=JoinedFlag,
        help="amqp[s]:// URL for every worker (default: the "
             "file's, or $TORCHRELAY_BROKER)")
    fleet.add_argument("--timeout", type=float,
                       help="up: seconds to wait for the daemons (120); down: seconds "
                            "before a daemon still running is killed (40)")

    users = commands.add_parser(
        "users", help="one RabbitMQ user per participant, with only its own permissions "
                      "(through the management API, as an administrator)")
    users.add_argument("action", choices=["add", "remove", "list"])
    users.add_argument("name", nargs="?", help="the participant (a worker's id, a client's "
                                               "name)")
    users.add_argument("--role", choices=["worker", "client"], help="add: what it is")
    users.add_argument("--password", help="add: its password (default: a new random one, "
                                          "printed)")
    users.add_argument("--queue-type", choices=QUEUE_TYPES, default=QUEUE_TYPES[0],
                       help="add, a worker: its queue's type (quorum for a cluster)")
    users.add_argument("--queue-expires", type=float,
                       help="add, a worker: seconds its queue outlives its last daemon (a week)")
    users.add_argument(
        "--broker", action=JoinedFlag,
        help="an administrator's amqp[s]:// URL naming the virtual "
             "host (default: $TORCHRELAY_BROKER; add and remove "
             "need one of them, list falls back to guest on "
             "localhost and says so)")
    users.add_argument("--management-url",
                       help="the management API, http[s]://[USER:PASSWORD@]HOST:PORT (default: "
                            "port 15672 of the broker's host, with the broker's credentials)")
    keygen = commands.add_parser(
        "keygen", help="make a data owner's Ed25519 key pair, for secure aggregation through "
                       "a broker that is not trusted (signing_key and peer_keys in "
                       "[worker.privacy])")
    keygen.add_argument("--out", required=True, metavar="FILE.key",
                        help="where the private key goes (PEM, readable by you only; an "
                             "existing file is never overwritten)")
    keygen.add_argument("--id", help="the owner's worker id, to name the printed line "
                                     "(default: the file's name without its suffix)")
    keygen.add_argument("--show", action="store_true",
                        help="make nothing: print the public key of the key in --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "worker":
        return _worker(args)
    if args.command == "demo":
        if args.which == "federated":
            return _federated_demo(args)
        return _demo(args.broker, running=args.running)
    if args.command == "users":
        return _users(args)
    if args.command == "fleet":
        return _fleet(args)
    if args.command == "keygen":
        return _keygen(args)
    url = _broker_url(args.broker)
    if args.workers:
        return _status(args.workers, url)
    return _live_status(url, args)


def _worker(args: argparse.Namespace) -> int:
    from torchrelay.worker.operations._config import ConfigError

    try:
        configs = _worker_configs(args)
    except ConfigError as e:
        print(f"torchrelay worker: {e}", file=sys.stderr)
        return 2
    from torchrelay.worker.operations._logs import configure_logging

    config = configs[0]
    # pika narrates every connection and channel at INFO: the daemon's own lines are
    # what an operator reads (configure_logging keeps pika's from WARNING on).
    configure_logging(config.log_level, config.log_format,
                      config.id if len(configs) == 1 else None, "supervisor")
    if len(configs) > 1:
        from torchrelay.worker.containment._host import host_workers

        try:
            return host_workers(configs)
        except ConfigError as e:
            print(f"torchrelay worker: {e}", file=sys.stderr)
            return 2
    if args.unsupervised:
        from torchrelay.worker.containment._daemon import run_worker

        return run_worker(config)
    from torchrelay.worker.containment._supervisor import supervise

    return supervise(config)


def _worker_configs(args: argparse.Namespace) -> list[Any]:
    """The workers one `torchrelay worker` serves: one per `--config` file, or one per
    id of `--id` (repeated or comma-separated) with the one file's settings; the other
    flags apply to each. Several only `--unsupervised`: they share one process."""
    from torchrelay.worker.operations._config import ConfigError, WorkerConfig, flags_given

    files: list[str | None] = args.config or [None]
    flags = flags_given(args)
    ids = [i for i in (flags.pop("id") or "").split(",") if i] or [None]
    if len(files) > 1 and ids != [None]:
        raise ConfigError("--id with several --config files: each file names its worker")
    configs = [WorkerConfig.resolve(file, dataset_flags=args.dataset,
                                    public_dataset_flags=args.public_dataset, id=worker_id,
                                    **flags)
               for file in files for worker_id in ids]
    if len(configs) > 1 and not args.unsupervised:
        raise ConfigError(
            f"{len(configs)} workers in one process share it: a crash inside torch in one "
            "takes them all down, and no command past command_timeout is stopped. Pass "
            "--unsupervised to host them so (about 2 MiB each, against ~250 MiB for a "
            "supervised daemon each), or start a daemon for each")
    return configs


def _demo(url: str | None, *, running: bool = False) -> int:
    import torchrelay as tr
    from torchrelay._walkthrough import run_walkthrough
    from torchrelay.worker import WorkerProcesses

    logging.basicConfig(level=logging.WARNING, format=_LOG_FORMAT)
    if running:
        url = _broker_url(url)
        print(f"Using workers bob and alice already serving on {tr.broker.redact_url(url)}.")
        with tr.connect(url) as fleet:
            run_walkthrough(fleet)
    elif url is None:
        print("Workers bob and alice run in this process (embedded broker).")
        with tr.connect() as fleet:
            run_walkthrough(fleet)
    else:
        print(f"Starting worker daemons bob and alice on {tr.broker.redact_url(url)} ...")
        with WorkerProcesses(url, ["bob", "alice"]) as daemons, tr.connect(url) as fleet:
            print(f"(daemon logs in {daemons.log_dir})")
            run_walkthrough(fleet)
    print("\nThe walkthrough ran; every store matched the notebook at every step.")
    return 0


def _federated_demo(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    import torch

    import torchrelay as tr
    from torchrelay._federated import (
        AGGREGATOR,
        DEMO_PRIVACY,
        DIGIT_OWNERS,
        NoDatasets,
        record_privacy,
        run_federated,
        write_configs,
        write_shares,
    )
    from torchrelay.worker import WorkerProcesses

    if args.rounds < 1:
        print("torchrelay demo federated: --rounds must be at least 1", file=sys.stderr)
        return 2
    if args.epsilon is not None and not args.epsilon > 0:
        print("torchrelay demo federated: --epsilon must be positive", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format=_LOG_FORMAT)
    tr.hook(torch)
    plot = Path(args.plot) if args.plot else None
    if args.running:  # the owners' own configs say what they offer, and under what rules
        url = _broker_url(args.broker)
        print(f"Using workers {', '.join(DIGIT_OWNERS)} and {AGGREGATOR} already serving on "
              f"{tr.broker.redact_url(url)}, with the datasets their configs list.")
        with tr.connect(url) as fleet:
            try:
                run_federated(fleet, args.rounds, plot=plot)
            except NoDatasets as e:
                print(f"torchrelay demo federated: {e}", file=sys.stderr)
                return 1
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="torchrelay-federated-"))
    files = write_shares(workdir)
    unit = "none" if args.public else args.privacy
    privacy: dict[str, Any] | None = None
    if unit == "record":
        privacy = record_privacy(3.0 if args.epsilon is None else args.epsilon, args.rounds)
    elif unit == "owner":
        privacy = dict(DEMO_PRIVACY)
        if args.epsilon is not None:
            privacy["epsilon"] = args.epsilon
    if privacy is not None and args.noise_multiplier is not None:
        privacy["noise_multiplier"] = args.noise_multiplier
    print(f"The digits' training part, split in three: {', '.join(DIGIT_OWNERS)} each get a "
          f"dataset file of their own in {workdir}.")
    if args.broker is None:
        print(f"Workers {', '.join(DIGIT_OWNERS)} and {AGGREGATOR} run in this process "
              "(embedded broker), each loading its own file.\n")
        offered = {owner: [{"path": str(path), "tags": ["#digits", "#train"],
                            "private": privacy is not None}] for owner, path in files.items()}
        rules = dict.fromkeys(files, privacy) if privacy else None
        with tr.connect(datasets=offered, privacy=rules) as fleet:
            run_federated(fleet, args.rounds, plot=plot)
        return 0
    configs = write_configs(workdir, files, args.broker, privacy=privacy)
    print(f"Starting worker daemons {', '.join(DIGIT_OWNERS)} and {AGGREGATOR} on "
          f"{tr.broker.redact_url(args.broker)}, each with its config in {workdir} ...")
    worker_args = {worker: ["--config", str(path)] for worker, path in configs.items()}
    with WorkerProcesses(args.broker, list(configs), worker_args=worker_args,
                         log_dir=workdir / "logs") as daemons, \
            tr.connect(args.broker) as fleet:
        print(f"(daemon logs in {daemons.log_dir})\n")
        run_federated(fleet, args.rounds, plot=plot)
    return 0


def _broker_url(url: str | None) -> str:
    """The broker a command talks to: `--broker`, else $TORCHRELAY_BROKER, else the
    local RabbitMQ as guest, as configs/ use it."""
    return url or default_url() or LOCAL_BROKER


def _status(worker_ids: Sequence[str], url: str) -> int:
    import torchrelay as tr

    failed = 0
    with tr.connect(url, name="status") as fleet:
        for worker_id in worker_ids:
            try:
                report = fleet.worker(worker_id).status()
            except tr.TorchRelayError as e:
                report, failed = {"id": worker_id, "error": str(e)}, failed + 1
            print(json.dumps(report, sort_keys=True))
    return 1 if failed else 0


def _fleet(args: argparse.Namespace) -> int:
    from torchrelay.broker import BrokerError, redact_url
    from torchrelay.worker.operations._config import ConfigError
    from torchrelay.worker.operations._local_fleet import (
        FleetFile,
        fleet_down,
        fleet_status,
        fleet_up,
    )

    try:
        fleet = FleetFile.read(args.file, args.broker)
        if args.action == "up":
            pids = fleet_up(fleet, **({"timeout": args.timeout} if args.timeout else {}))
            for worker_id, pid in pids.items():
                print(f"{worker_id}\tup (pid {pid}, log {fleet.log_file(worker_id)})")
            print(f"fleet up on {redact_url(fleet.broker)}; stop it with "
                  f"`torchrelay fleet down {args.file}`")
        elif args.action == "down":
            outcome = fleet_down(fleet, **({"timeout": args.timeout} if args.timeout else {}))
            for worker_id, how in outcome.items():
                print(f"{worker_id}\t{how}")
        else:
            print("worker\tstate\tpid\tobjects\tbytes\tcommands\tfailed\tuptime_s")
            for state in fleet_status(fleet):
                s = state.status or {}
                print("\t".join(str(v) for v in (
                    state.worker_id, state.state, state.pid or "-", s.get("objects", "-"),
                    s.get("tensor_bytes", "-"), s.get("commands_handled", "-"),
                    s.get("commands_failed", "-"), s.get("uptime_s", "-"))))
    except (ConfigError, BrokerError) as e:
        print(f"torchrelay fleet {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from pathlib import Path

    from torchrelay.worker.runtime._signing import (
        KeyFileError,
        SigningKey,
        new_key_file,
        public_key_text,
    )

    path = Path(args.out)
    owner = args.id or path.stem
    try:
        if args.show:
            public = public_key_text(SigningKey.load(path).public)
        else:
            public = new_key_file(path)
            print(f"wrote {path}: {owner}'s Ed25519 private key. Keep it to {owner}'s worker "
                  f"(in its [worker.privacy]: signing_key = \"{path.name}\"). The line for "
                  "the other owners' [worker.privacy.peer_keys]:")
    except FileExistsError:
        print(f"torchrelay keygen: {path} exists; a key is never overwritten (--show prints "
              "its public key)", file=sys.stderr)
        return 2
    except (KeyFileError, OSError) as e:
        print(f"torchrelay keygen: {e}", file=sys.stderr)
        return 2
    print(f'{owner} = "{public}"')
    return 0


def _users(args: argparse.Namespace) -> int:
    from torchrelay.broker import ManagementAPI, ManagementError, redact_url
    from torchrelay.broker._rabbitmq import _users as users
    from torchrelay.broker._rabbitmq._topology import DEFAULT_QUEUE_EXPIRES, QueueSettings

    url = args.broker or default_url()
    if url is None and args.action != "list":
        # Changing users on a guessed broker (guest@localhost) could change the wrong one.
        print(f"torchrelay users {args.action}: which broker? Pass --broker "
              "amqp://ADMIN:PASSWORD@HOST/VHOST (or set TORCHRELAY_BROKER)", file=sys.stderr)
        return 2
    if args.action != "list" and not args.name:
        print(f"torchrelay users {args.action}: name whom", file=sys.stderr)
        return 2
    try:
        api = ManagementAPI(_broker_url(url), args.management_url)
    except ValueError as e:
        print(f"torchrelay users {args.action}: {e}", file=sys.stderr)
        return 2
    print(f"on {redact_url(api.amqp_url)} (virtual host {api.vhost!r}), through {api.base} "
          f"as {api.user}", file=sys.stderr)
    try:
        if args.action == "add":
            if args.role is None:
                print("torchrelay users add: pass --role worker or --role client",
                      file=sys.stderr)
                return 2
            queue = QueueSettings(args.queue_type, args.queue_expires or DEFAULT_QUEUE_EXPIRES)
            password = users.add_user(api, args.name, args.role, args.password, queue)
            print(f"{args.role} {args.name} may connect to virtual host {api.vhost!r} as "
                  f"{args.name}" + ("" if args.password else f" with password {password}"))
        elif args.action == "remove":
            users.remove_user(api, args.name)
            print(f"removed {args.name}")
        else:
            for user in users.list_users(api):
                print(f"{user.name}\t{user.role}")
    except (ManagementError, ValueError) as e:
        print(f"torchrelay users {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


def _live_status(url: str, args: argparse.Namespace) -> int:
    import contextlib
    import time

    import torchrelay as tr
    from torchrelay.broker import ManagementAPI, ManagementError

    api = ManagementAPI(url, args.management_url)
    with tr.connect(url, name=None) as fleet, contextlib.suppress(KeyboardInterrupt):
        while True:  # (Ctrl-C ends --watch, whatever it was doing)
            workers = {w["id"]: w for w in fleet.workers()}
            try:
                queues = {q["name"].removeprefix("torchrelay.worker."): q for q in api.queues()
                          if q["name"].startswith("torchrelay.worker.")}
            except ManagementError:
                queues = {}  # (no console here, or no rights to it: figures of workers only)
            for worker_id, queue in queues.items():
                if worker_id not in workers:  # gone, or silent? The console's figures lag
                    with contextlib.suppress(tr.TorchRelayError):  # (by up to 5 s): ask now
                        queue["consumers"] = fleet.endpoint.queue_consumers(queue["name"])
            rows = _status_rows(workers, queues)
            if args.json:
                print(json.dumps(rows, sort_keys=True, default=str))
            else:
                if args.watch:
                    print("\x1b[2J\x1b[H", end="")  # clear the terminal, as watch(1) does
                _print_table(rows)
            if not args.watch:
                return 0
            time.sleep(args.watch)
    return 0  # interrupted


def _status_rows(workers: dict[str, Any], queues: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per worker: live ones with their figures, and queues nobody serves (a
    worker that is gone) as such."""
    rows = []
    for worker_id in sorted(set(workers) | set(queues)):
        figures = workers.get(worker_id, {})
        queue = queues.get(worker_id, {})
        stats = queue.get("message_stats", {})
        rows.append({
            # gone: nobody consumes its queue; silent: someone does, but did not answer
            "id": worker_id, **figures, "state": "live" if figures else (
                "silent" if queue.get("consumers") else "gone"),
            "queue": {"messages": queue.get("messages"), "consumers": queue.get("consumers"),
                      "in_per_s": stats.get("publish_details", {}).get("rate"),
                      "out_per_s": stats.get("deliver_get_details", {}).get("rate")}
            if queue else None,
        })
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = ("worker", "state", "pid", "objects", "bytes", "served", "failed", "uptime_s",
              "queued", "consumers", "in/s", "out/s")
    table: list[tuple[str, ...]] = [header]
    for row in rows:
        queue = row.get("queue") or {}
        table.append(tuple("-" if v is None else str(v) for v in (
            row["id"], row["state"], row.get("pid"), row.get("objects"), row.get("tensor_bytes"),
            row.get("commands_handled"), row.get("commands_failed"), row.get("uptime_s"),
            queue.get("messages"), queue.get("consumers"), queue.get("in_per_s"),
            queue.get("out_per_s"))))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))


if __name__ == "__main__":
    sys.exit(main())
