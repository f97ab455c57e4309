"""The one way tests wait: poll a condition until it holds, with a deadline, failing with what was awaited.

``within`` is the poll itself (it answers whether the condition came true in time, for tests that measure or
report instead of failing); ``eventually`` and ``eventually_async`` fail the test naming what did not happen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

POLL_SECONDS = 0.02


def within(condition: Callable[[], bool], timeout: float, every: float = POLL_SECONDS) -> bool:
    """True once ``condition()`` is true, False if it is still false after ``timeout`` seconds (it is tried at
    least once, however short the timeout)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def eventually(condition: Callable[[], bool], timeout: float, what: str, every: float = POLL_SECONDS) -> None:
    """Return once ``condition()`` is true; fail after ``timeout`` seconds naming ``what``."""
    if not within(condition, timeout, every):
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


async def eventually_async(condition: Callable[[], bool], timeout: float, what: str,
                           every: float = POLL_SECONDS) -> None:
    """:func:`eventually` inside an event loop: the loop runs (a watch, a server) while it waits."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(every)
