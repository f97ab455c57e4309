"""The fault suite (``pytest tests/faults``): lab faults with real packets, and the report the suite ends with.

Each test records what it measured with the ``fault_report`` fixture; the session's terminal summary prints one
row per fault (runs, packets sent and lost, allocations lost or duplicated, time to recover), and writes the same
table as Markdown to ``$FAULTS_SUMMARY`` when that is set.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_cni import Pods
from tests.labfixture import lab  # noqa: F401 - the fixture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fault tests need root (network namespaces)")


@dataclass
class FaultRecord:
    """One fault's figures, summed over its runs. ``recovery_seconds`` holds one entry per run that recovered."""

    fault: str
    runs: int = 0
    packets_sent: int = 0
    packets_lost: int = 0
    allocations_lost: int = 0
    allocations_duplicated: int = 0
    recovery_seconds: list[float] = field(default_factory=list)
    notes: str = ""

    def row(self) -> str:
        times = sorted(self.recovery_seconds)
        recovery = f"{times[-1]:.1f} ({times[len(times) // 2]:.1f})" if times else "-"
        return (f"| {self.fault} | {self.runs} | {self.packets_sent} | {self.packets_lost} | {self.allocations_lost}"
                f" | {self.allocations_duplicated} | {recovery} | {self.notes} |")


HEADER = ("| fault | runs | packets sent | packets lost | allocations lost | allocations duplicated"
          " | recovery s, worst (median) | notes |\n|---|---|---|---|---|---|---|---|")
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
    table = "\n".join([HEADER, *(r.row() for r in _records)])
    terminalreporter.write_sep("=", "fault suite summary")
    terminalreporter.write_line(table)
    destination = os.environ.get("FAULTS_SUMMARY")
    if destination:
        Path(destination).write_text(table + "\n")


@pytest.fixture
def pods() -> Iterator[Pods]:
    made = Pods()
    yield made
    made.cleanup()


def interrupt(process: subprocess.Popen[Any]) -> None:
    """Stop a measuring tool (ping, tcpdump) as Ctrl-C would, so it writes its summary; kill it if it hangs."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Pinger:
    """``ping -i interval`` from a pod namespace to a target for as long as the ``with`` block lasts; afterwards
    ``sent`` and ``lost`` hold ping's own count. A packet still in flight when the block ends is not counted lost
    (ping's summary counts only answers that were due)."""

    def __init__(self, netns: str, target: str, interval: float = 0.05) -> None:
        self.argv = ["ip", "netns", "exec", netns, "ping", "-n", "-i", f"{interval:g}", target]
        self.sent = 0
        self.lost = 0
        self.output = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Pinger:
        # A file, not a pipe: nobody reads a pipe until the end, and ping blocks once 64 KiB (~1000 replies) of it
        # are unread, silently ending the measurement.
        self._log = tempfile.TemporaryFile("w+")
        self._process = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        interrupt(self._process)
        self._log.seek(0)
        self.output = self._log.read()
        self._log.close()
        counts = re.search(r"(\d+) packets transmitted, (\d+) received", self.output)
        if counts:
            self.sent, received = map(int, counts.groups())
            self.lost = self.sent - received

    def summary(self) -> str:
        return "\n".join(self.output.splitlines()[-3:])
