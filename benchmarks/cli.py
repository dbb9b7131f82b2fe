"""`python -m benchmarks`: every measure of the issue, in one run, as one table.

    PYTHONPATH=. python -m benchmarks [--quick] [--only sync,move] [--json out.json]

Prints the machine, then (on stdout, once all is done) the table: for each
figure torchrelay's number, the baseline's on the same broker and machine, the
ratio, the issue's target and whether it is met. Progress goes to stderr. A
measure that fails is a row saying so; the others still run. Nothing here
asserts on timings: it reports them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import torchrelay as tr

from . import machine, rabbitmq
from .measures import MEASURES
from .report import MeasureResult, Row, not_measured, render
from .session import Session, Settings
from .stats import progress

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"

NOTES = (
    "ratio = torchrelay / baseline; every baseline ran on the same RabbitMQ and machine.",
    "latency: median and nearest-rank p99 over all iterations, torchrelay and bare pika "
    "interleaved in blocks; bare pika = request/reply of a 64-byte body to an echo server "
    "in a child process (prefetch 16, as the anchor).",
    "send+get: MiB/s moved = 2 x size / median round trip; each size runs in fresh client "
    "processes (peak RSS = ru_maxrss of that process, + = growth over its RSS once torch was "
    "imported and the tensor made; both sides import torch).",
    "move: bytes via client = bytes_sent + bytes_received of fleet.endpoint around move().",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="torchrelay against bare pika and torch.distributed.rpc.",
        epilog="measures: " + "; ".join(f"{k}: {m.what}" for k, m in MEASURES.items()),
    )
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL),
                        help="RabbitMQ URL (default: $AMQP_URL or %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: fewer repetitions, no 1 GiB transfer")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help=f"run only these measures ({', '.join(MEASURES)})")
    parser.add_argument("--json", metavar="PATH", type=Path, help="write every raw number here")
    parser.add_argument("--restart-broker", action="store_true",
                        help="faults: also restart the local RabbitMQ node (rabbitmqctl "
                             "stop_app; start_app) while idle and with a pipeline in flight")
    return parser


def _selected(only: str | None, parser: argparse.ArgumentParser) -> list[str]:
    if not only:
        return list(MEASURES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        parser.error(f"unknown measure(s) {', '.join(unknown)}; choose from {', '.join(MEASURES)}")
    return [n for n in MEASURES if n in names]  # in the table's order


def _ray_note() -> str:
    if importlib.util.find_spec("ray") is None:
        return "ray: skipped, `import ray` fails here (not installed)."
    return "ray: installed, but not measured (see /work/shared/anchors/ray_ref.py)."


def _run(session: Session, names: list[str]) -> dict[str, MeasureResult]:
    results: dict[str, MeasureResult] = {}
    if any(MEASURES[n].needs_fleet for n in names):
        progress("starting worker daemons, the client and the bare pika echo server")
        try:
            session.open()
        except Exception as e:  # the measures that need them will say so
            session.open_error = f"{type(e).__name__}: {e}"
            progress(f"could not start them: {session.open_error}")
    for name in names:
        progress(f"{name}: {MEASURES[name].what}")
        start = time.monotonic()
        try:
            results[name] = MEASURES[name].run(session)
        except Exception as e:
            rows = [not_measured(f"{name}: all of it", e)]
            results[name] = MeasureResult(rows=rows, raw={"error": repr(e)})
        progress(f"{name}: done in {time.monotonic() - start:.1f} s")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    names = _selected(args.only, parser)
    settings = Settings.quick() if args.quick else Settings()
    if args.restart_broker:
        settings = dataclasses.replace(settings, restart_broker=True)
    tr.hook(torch)  # tensors get .send(worker), as in every user script
    started = time.monotonic()

    described = machine.describe(args.url)
    print(machine.render(described))
    print(flush=True)

    session = Session(args.url, settings)
    progress(f"run {session.suffix}: {', '.join(names)}{' (quick)' if args.quick else ''}")
    try:
        results = _run(session, names)
    finally:
        progress("closing the client, the daemons and the echo server; deleting our queues")
        session.close()
        try:
            deleted = rabbitmq.cleanup(args.url, session.suffix, session.known_queues)
            progress(f"deleted {len(deleted)} queue(s)")
        except Exception as e:
            progress(f"could not delete our queues: {type(e).__name__}: {e}")
    elapsed = time.monotonic() - started

    rows: list[Row] = [row for name in names for row in results[name].rows]
    print(render(rows))
    print()
    for note in (*NOTES, _ray_note()):
        print(f"- {note}")
    print(f"- run time {elapsed:.0f} s{' (--quick)' if args.quick else ''}.")

    if args.json is not None:
        document: dict[str, Any] = {
            "machine": described,
            "quick": args.quick,
            "settings": repr(settings),
            "elapsed_s": elapsed,
            "rows": [row.as_dict() for row in rows],
            "raw": {name: results[name].raw for name in names},
        }
        args.json.write_text(json.dumps(document, indent=1))
        progress(f"raw numbers written to {args.json}")
    return 0
