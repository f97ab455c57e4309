"""How the node's loops take a failed step, decided once: an outage (etcd unreachable, which the datastore has
already retried for its failover time) is one warning line and a retry that backs off; anything else is a bug,
logged with its traceback, and the next step is a full resync."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ipam.errors import DatastoreUnavailable

OUTAGES: tuple[type[BaseException], ...] = (DatastoreUnavailable,)


@dataclass
class Backoff:
    """Seconds to wait after each failure in a row: ``first``, doubling up to ``maximum``."""

    first: float = 1.0
    maximum: float = 10.0
    _next: float = 0.0

    def failed(self) -> float:
        wait = self._next or self.first
        self._next = min(wait * 2, self.maximum)
        return wait

    def succeeded(self) -> None:
        self._next = 0.0


async def guarded(step: Callable[[], Awaitable[object]], log: logging.Logger, what: str, outage: str,
                  backoff: Backoff) -> float | None:
    """Run ``step``; None when it succeeded, else how long to wait before the next try. ``outage`` says what is
    kept meanwhile (one line, no traceback); any other failure is logged as ``what`` failed, with its traceback."""
    try:
        await step()
    except OUTAGES as exc:
        wait = backoff.failed()
        log.warning("%s postponed, %s: %s; next try in %gs", what, outage, exc, wait)
        return wait
    except Exception:
        wait = backoff.failed()
        log.exception("%s failed; next try in %gs", what, wait)
        return wait
    backoff.succeeded()
    return None
