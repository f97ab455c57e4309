"""The fault suite (``pytest tests/faults``): lab faults with real packets, and the report the suite ends with.

Each test records what it measured with the ``fault_report`` fixture; the session's terminal summary prints one
row per fault (runs, packets sent and lost, allocations lost or duplicated, time to recover), and writes the same
table as Markdown to ``$FAULTS_SUMMARY`` when that is set. What the tests share lives in tests/lab/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.report import FaultRecord, table

_records: list[FaultRecord] = []


@pytest.fixture
def fault_report() -> Iterator[FaultRecord]:
    """A record for this test's fault; it reaches the summary even when the test fails (with what was measured)."""
    record = FaultRecord(fault="?")
    yield record
    _records.append(record)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _records:
        return
    summary = table(_records)
    terminalreporter.write_sep("=", "fault suite summary")
    terminalreporter.write_line(summary)
    destination = os.environ.get("FAULTS_SUMMARY")
    if destination:
        Path(destination).write_text(summary + "\n")
