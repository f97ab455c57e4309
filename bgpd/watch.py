"""Wake a consumer (the BGP sync, the full reconcile) when something it reads changes in etcd.

An etcd watch (:meth:`ipam.datastore.Datastore.watch`) replaces the once-a-second poll each consumer had: an idle
cluster costs nothing, and a change is seen as soon as etcd commits it instead of up to a second later. The
consumers keep reading the datastore as before; only what triggers that read changed. They keep a slow safety
re-read of their own, in case a change slipped past (see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ipam.datastore import Datastore, WatchEvent

log = logging.getLogger("calico-py-node.watch")
# A change wakes the consumer this long after it arrives, together with whatever else arrives meanwhile: one
# CNI ADD that claims a block writes its affinity twice (pending, then confirmed) and the WorkloadEndpoint within
# a few milliseconds; one sync after them, instead of one per write run in the middle of the ADD.
SETTLE_SECONDS = 0.1
# After a refusal that failing over does not cure (a certificate etcd rejects): try a new watch this often. The
# error is logged once per distinct message; the consumer's safety re-read still runs meanwhile.
RESTART_SECONDS = 10.0


async def wake_on_change(store: Datastore, prefixes: list[str], on_change: Callable[[], None],
                         relevant: Callable[[WatchEvent], bool] | None = None,
                         settle: float = SETTLE_SECONDS) -> None:
    """Call ``on_change`` ``settle`` seconds after anything under ``prefixes`` is created, changed or deleted
    (only the events ``relevant`` accepts, when given), once for all the changes in that time, and after every
    re-listing (at start, after a compaction): the state may have changed in any way then. Runs until
    cancelled."""
    loop = asyncio.get_running_loop()
    pending: asyncio.TimerHandle | None = None

    def fire() -> None:
        nonlocal pending
        pending = None
        on_change()

    last_error = ""
    try:
        while True:
            try:
                async for update in store.watch(prefixes, prev_kv=relevant is not None):
                    if pending is None and (update.resync is not None or relevant is None
                                            or any(map(relevant, update.events))):
                        pending = loop.call_later(settle, fire)
                    last_error = ""
            except Exception as exc:  # a refusal the watch cannot wait out: say so once, try again later
                if str(exc) != last_error:
                    log.warning("etcd watch of %s failed, trying again every %gs: %s", ", ".join(prefixes),
                                RESTART_SECONDS, exc)
                    last_error = str(exc)
                await asyncio.sleep(RESTART_SECONDS)
    finally:
        if pending is not None:
            pending.cancel()
