"""The allow-list fuzz campaign (`fuzzing.py`): no allow-listed operation, called with
edge-case arguments the way a worker calls it, crashes or wedges the process."""

from __future__ import annotations

import collections

import noninterference
import pytest
from conftest import TERMINAL_SUMMARY
from fuzzing import KNOWN_BAD, all_cases, operation_names, run_campaign


def test_every_known_finding_is_refused_by_the_worker_checks() -> None:
    cases = all_cases()
    known = list(range(len(cases) - len(KNOWN_BAD), len(cases)))

    report = run_campaign(known, workers=1)

    assert not report.findings, "\n".join(map(str, report.findings))
    not_refused = [str(cases[i]) for i in known if report.outcome_of.get(i) != "refused"]
    assert not not_refused, f"the worker's checks let these through: {not_refused}"


@pytest.mark.slow
def test_no_allow_listed_operation_crashes_or_overruns_on_edge_cases() -> None:
    report = run_campaign()

    TERMINAL_SUMMARY.append(f"allow-list fuzz campaign: {report.summary()}")
    assert report.operations == len(operation_names())
    assert report.cases == len(all_cases())
    assert sum(report.outcomes.values()) + len(report.findings) == report.cases
    assert not report.findings, "\n".join(map(str, report.findings))


@pytest.mark.slow
def test_nothing_observable_of_an_operation_depends_on_private_values() -> None:
    """The noninterference campaign (`noninterference.py`): every allow-listed operation,
    each tensor argument in turn private, run on values of every kind; what a client
    could observe is the same for all of them."""
    report = run_campaign(campaign="noninterference")
    cases = noninterference.all_cases()

    by_operation: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter)
    for index, outcome in report.outcome_of.items():
        by_operation[cases[index].op][outcome] += 1
    ran = sorted(op for op, seen in by_operation.items() if seen["safe"])
    refused = sorted(op for op, seen in by_operation.items()
                     if not seen["safe"] and set(seen) == {"refused"})
    leaking = [i for i, outcome in report.outcome_of.items()
               if outcome not in ("safe", "refused")]
    leaks = [f"{cases[i]}: {report.details.get(i, '')}" for i in leaking]
    TERMINAL_SUMMARY.append(
        f"noninterference campaign: {report.summary()}; per operation: {len(ran)} safe "
        f"(run on private data with no observable difference), {len(refused)} refused on "
        f"private data whatever the values, {len({cases[i].op for i in leaking})} leaking")
    TERMINAL_SUMMARY.append("  refused on private data: " + ", ".join(refused))
    for leak in leaks:
        TERMINAL_SUMMARY.append(f"  LEAK {leak}")
    assert report.cases == len(cases)
    assert not report.outcomes["harness"], [report.details[i] for i, o in
                                            report.outcome_of.items() if o == "harness"][:3]
    assert sum(report.outcomes.values()) + len(report.findings) == report.cases
    assert not report.findings, "\n".join(map(str, report.findings))
    assert not leaks, "\n".join(leaks)
