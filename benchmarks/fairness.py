"""A shared worker under one participant's heavy work: how long another waits.

One participant ("heavy") submits heavy commands back to back — matrix products
sized to take about `heavy_seconds` each on this machine, three in one message,
then three more as soon as those are answered — while another ("light") keeps
asking for a small tensor (`x.get()`) and a third asks for the worker's status.
Reported: the light `get`'s latency (median and worst) against the bound the
README states (one heavy command plus a round trip), and the status request's.
Before the fair share, the light `get` waited for every heavy command queued
ahead of it, and status was not answered at all while one ran.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from typing import Any

import torch

import torchrelay as tr

from .report import MeasureResult, Row, at_most
from .session import Session, send
from .stats import millis, progress


def _heavy_command(fleet: tr.Fleet, worker: tr.WorkerHandle, seconds: float) -> Any:
    """A matrix and a number of squarings whose `matrix_power` takes about `seconds`
    here (calibrated: a benchmark may). The exponent `2**squarings` must fit an int64,
    so the matrix grows until 60 squarings or fewer are enough."""
    side = 1500
    while True:
        matrix = send(torch.rand(side, side) / side, worker)
        started = time.monotonic()
        torch.linalg.matrix_power(matrix, 2**8)
        fleet.sync()
        per_squaring = (time.monotonic() - started) / 8
        squarings = round(seconds / per_squaring)
        if squarings <= 60:
            return matrix, max(1, squarings)
        side = int(side * (squarings / 60) ** (1 / 3)) + 1


def fairness(session: Session) -> MeasureResult:
    s = session.settings
    url = session.url
    _, bob, _, _ = session.require()
    worker_id = bob.id
    result = MeasureResult()
    with tr.connect(url, name=session.name("heavy"), timeout=600) as heavy, \
            tr.connect(url, name=session.name("light"), timeout=600) as light, \
            tr.connect(url, name=session.name("watch"), timeout=600) as watch:
        matrix, squarings = _heavy_command(heavy, heavy.worker(worker_id), s.heavy_seconds)
        started = time.monotonic()
        torch.linalg.matrix_power(matrix, 2**squarings)
        heavy.sync()
        one_heavy = time.monotonic() - started
        progress(f"fairness: a heavy command takes {one_heavy:.1f} s here")
        small = send(torch.ones(4), light.worker(worker_id))
        light.sync()
        round_trip = _round_trip(small)
        stop = threading.Event()

        batches: list[float] = []

        def heavy_load() -> None:
            while not stop.is_set():
                started = time.monotonic()
                for _ in range(3):  # back to back, in one message
                    torch.linalg.matrix_power(matrix, 2**squarings)
                heavy.sync()
                batches.append(time.monotonic() - started)

        loader = threading.Thread(target=heavy_load, daemon=True)
        loader.start()
        time.sleep(1.0)
        waits: list[float] = []
        statuses: list[float] = []
        deadline = time.monotonic() + s.fairness_seconds
        while time.monotonic() < deadline:
            waits.append(_timed_get(small))
            statuses.append(_timed(watch.worker(worker_id).status))
            # At a random point of the next heavy command: right after an answer is right
            # after a heavy command began, and every get would wait for all of one.
            time.sleep(random.uniform(0.0, one_heavy))
        stop.set()
        loader.join()
        small.get()
        matrix.get()
    # A heavy command's time under load (a batch holds 3, and light work runs between):
    # what a light command may have to wait for, at most.
    under_load = max(batches) / 3 if batches else one_heavy
    bound = max(one_heavy, under_load) + round_trip
    result.raw.update(heavy_s=one_heavy, heavy_batches_s=batches, round_trip_s=round_trip,
                      light_get_s=waits, status_s=statuses)
    result.rows.append(Row(
        "fairness: a light get while another sends heavy commands (worst)",
        millis(max(waits)), f"bound {millis(bound)}", max(waits) / bound, at_most(1.0),
        note=f"median {millis(statistics.median(waits))} over {len(waits)} gets at random "
             f"times; one heavy command {one_heavy:.1f} s alone, up to {under_load:.1f} s "
             "under load (bound: that and a round trip), three per message, back to back"))
    result.rows.append(Row(
        "fairness: status while a heavy command runs (worst)", millis(max(statuses)),
        f"bound {millis(bound)}", max(statuses) / bound, at_most(1.0),
        note=f"median {millis(statistics.median(statuses))}: answered beside the command"))
    return result


def _timed(run: Any) -> float:
    started = time.monotonic()
    run()
    return time.monotonic() - started


def _timed_get(x: Any) -> float:
    """A small operation on `x` and its result fetched: one round trip, timed."""
    started = time.monotonic()
    (x * 1).get()
    return time.monotonic() - started


def _round_trip(x: Any) -> float:
    return statistics.median(_timed_get(x) for _ in range(20))
