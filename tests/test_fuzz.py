"""The allow-list fuzz campaign (`fuzzing.py`): no allow-listed operation, called with
edge-case arguments the way a worker calls it, crashes or wedges the process."""

from __future__ import annotations

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
