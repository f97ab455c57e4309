"""bgpd/loops.py: an outage is one line and a backed-off retry; a bug is a traceback and a retry too."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bgpd.loops import Backoff, guarded
from ipam.errors import DatastoreUnavailable

log = logging.getLogger("test-loops")


def test_backoff_doubles_to_its_maximum_and_starts_again_after_a_success() -> None:
    backoff = Backoff(1.0, 5.0)
    assert [backoff.failed() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    backoff.succeeded()
    assert backoff.failed() == 1.0


def test_an_outage_is_one_line_and_a_bug_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def outage() -> None:
        raise DatastoreUnavailable("etcd unreachable after 30s")

    async def bug() -> None:
        raise KeyError("spec")

    async def fine() -> None:
        return None

    backoff = Backoff(1.0, 10.0)
    with caplog.at_level(logging.WARNING, logger="test-loops"):
        assert asyncio.run(guarded(outage, log, "reconcile", "routes kept", backoff)) == 1.0
        assert asyncio.run(guarded(bug, log, "reconcile", "routes kept", backoff)) == 2.0
        assert asyncio.run(guarded(fine, log, "reconcile", "routes kept", backoff)) is None
    first, second = caplog.records
    assert first.getMessage() == "reconcile postponed, routes kept: etcd unreachable after 30s; next try in 1s"
    assert first.exc_info is None and second.exc_info is not None
    assert backoff.failed() == 1.0  # the success reset it
