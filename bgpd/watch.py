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
# After a refusal that failing over does not cure (a certificate etcd rejects): try a new watch this often. The
# error is logged once per distinct message; the consumer's safety re-read still runs meanwhile.
RESTART_SECONDS = 10.0


async def wake_on_change(store: Datastore, prefixes: list[str], on_change: Callable[[], None],
                         relevant: Callable[[WatchEvent], bool] | None = None) -> None:
    """Call ``on_change`` whenever anything under ``prefixes`` is created, changed or deleted (only the events
    ``relevant`` accepts, when given), and after every re-listing (at start, after a compaction): the state
    may have changed in any way then. Runs until cancelled."""
    last_error = ""
    while True:
        try:
            async for update in store.watch(prefixes, prev_kv=relevant is not None):
                if update.resync is not None or relevant is None or any(map(relevant, update.events)):
                    on_change()
                last_error = ""
        except Exception as exc:  # a refusal the watch cannot wait out: say so once, try again later
            if str(exc) != last_error:
                log.warning("etcd watch of %s failed, trying again every %gs: %s", ", ".join(prefixes),
                            RESTART_SECONDS, exc)
                last_error = str(exc)
            await asyncio.sleep(RESTART_SECONDS)
