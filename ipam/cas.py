"""Compare-and-swap writes for IPAM: one guarded etcd transaction, and a step redone after a lost race.

Every IPAM write (the allocator's, a node's removal) is a step that reads, decides and commits one transaction
guarded by the mod_revision of what it read. :meth:`CasWriter.commit` raises :class:`Conflict` when a guard
failed; :meth:`CasWriter.retry` runs the step again (jittered backoff) until it commits or ``max_retries`` ran out.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from ipam.datastore import Condition, Datastore, Operation
from ipam.errors import ConflictRetriesExhausted

Step = Callable[[], Awaitable[object]]


class Conflict(Exception):
    """A compare-and-swap lost a race: re-read and redo."""


class CasWriter:
    """Commits guarded transactions to ``store`` and redoes a step whose guard failed."""

    def __init__(self, store: Datastore, stats: Counter[str], *, max_retries: int = 100) -> None:
        self.store = store
        self.max_retries = max_retries
        self.stats = stats  # counts conflicts and ambiguous commits resolved, with the owner's other counters

    async def retry(self, step: Step) -> None:
        """Run ``step`` until it does not raise :class:`Conflict`, at most ``max_retries`` times."""
        # The first attempt runs bare: it nearly always succeeds, and tenacity's machinery costs about half a
        # millisecond a call, a tenth of a CNI ADD. Only a conflict brings in the jittered retries.
        try:
            await step()
            return
        except Conflict:
            if self.max_retries > 1:
                retrying = AsyncRetrying(stop=stop_after_attempt(self.max_retries - 1),
                                         wait=wait_random_exponential(multiplier=0.002, max=0.1),
                                         retry=retry_if_exception_type(Conflict), reraise=True)
                with contextlib.suppress(Conflict):
                    async for attempt in retrying:
                        with attempt:
                            await step()
                    return
        raise ConflictRetriesExhausted(
            f"gave up after {self.max_retries} conflicting concurrent IPAM writes; retry the request")

    async def commit(self, conditions: Sequence[Condition], operations: Sequence[Operation],
                     landed: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Commit or raise :class:`Conflict`. After an ambiguous failure, ``landed()`` says whether our earlier
        attempt did commit (the datastore retried across a broken connection)."""
        result = await self.store.txn(conditions, operations)
        if result.succeeded:
            return
        if result.ambiguous and landed is not None and await landed():
            self.stats["ambiguous_commits_resolved"] += 1
            return
        self.stats["conflicts"] += 1
        raise Conflict

    async def gone(self, key: str) -> bool:
        """Whether ``key`` no longer exists: the ``landed`` test of a delete."""
        return await self.store.get(key) is None
