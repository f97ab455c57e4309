"""The one way tests wait: poll a condition until it holds, with a deadline, failing with what was awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

POLL_SECONDS = 0.02


def eventually(condition: Callable[[], bool], timeout: float, what: str, every: float = POLL_SECONDS) -> None:
    """Return once ``condition()`` is true; fail after ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


async def eventually_async(condition: Callable[[], bool], timeout: float, what: str,
                           every: float = POLL_SECONDS) -> None:
    """:func:`eventually` inside an event loop: the loop runs (a watch, a server) while it waits."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(every)
