"""Keeps the node's view (:mod:`bgpd.view`) from one etcd watch: a list at start (and after a compaction), then
events, resumed after an outage where it stopped. Consumers subscribe and hear which prefixes changed; they read
:meth:`ViewKeeper.view`, which costs no request.

The IPAM blocks change with every allocation anywhere in the cluster, so they are watched (by a second watch)
only while ``wants_blocks(view)`` says the overlay needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from bgpd.resources import WorkloadEndpoint
from bgpd.view import BLOCKS, NodeView, ViewBuilder
from ipam.datastore import Datastore, WatchUpdate

log = logging.getLogger("calico-py-node.view")
# After a refusal that failing over does not cure (a certificate etcd rejects): try a new watch this often. The
# error is logged once per distinct message.
RESTART_SECONDS = 10.0

Listener = Callable[[set[str]], None]  # the prefixes whose contents changed


class ViewKeeper:
    def __init__(self, store: Datastore, node: str, wants_blocks: Callable[[NodeView], bool] = lambda view: False
                 ) -> None:
        self.store = store
        self.builder = ViewBuilder(node)
        self.wants_blocks = wants_blocks
        self.listeners: list[Listener] = []
        self.lists = 0  # resyncs: one list of the watched prefixes each
        self._ready = asyncio.Event()
        self._blocks_ready = asyncio.Event()
        self._blocks_task: asyncio.Task[None] | None = None

    def subscribe(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def view(self) -> NodeView:
        return self.builder.view()

    async def ready(self) -> NodeView:
        """The view once the first listing is in (of the blocks too, when the overlay needs them)."""
        await self._ready.wait()
        if self._blocks_task is not None:
            await self._blocks_ready.wait()
        return self.view()

    def local_endpoint(self, key: str, endpoint: WorkloadEndpoint | None) -> None:
        """The CNI handler wrote (or deleted) one of this node's endpoints: see :meth:`ViewBuilder.local_endpoint`."""
        self.builder.local_endpoint(key, endpoint)

    async def run(self) -> None:
        """Watch until cancelled."""
        prefixes = [p for p in self.builder.prefixes if p != BLOCKS]
        try:
            await self._watch(prefixes, self._ready)
        finally:
            await self._stop_blocks()  # the view stays as it was: stopping is no change to decide on

    async def _watch(self, prefixes: list[str], listed: asyncio.Event) -> None:
        last_error = ""
        while True:
            try:
                async for update in self.store.watch(prefixes):
                    self._apply(update, prefixes)
                    if BLOCKS not in prefixes:
                        await self._watch_blocks(self.wants_blocks(self.view()))
                    listed.set()
                    last_error = ""
            except Exception as exc:  # a refusal the watch cannot wait out: say so once, try again later
                if str(exc) != last_error:
                    log.warning("etcd watch of %s failed, trying again every %gs: %s", ", ".join(prefixes),
                                RESTART_SECONDS, exc)
                    last_error = str(exc)
                await asyncio.sleep(RESTART_SECONDS)

    def _apply(self, update: WatchUpdate, prefixes: list[str]) -> None:
        if update.resync is not None:
            self.lists += 1
            changed = self.builder.resync(update.revision, {
                prefix: [(kv.key, kv.value) for kv in update.resync.prefixes[prefix]] for prefix in prefixes})
        else:
            changed = {prefix for event in update.events
                       if (prefix := self.builder.event(event.revision, event.key,
                                                        None if event.deleted else event.kv.value)) is not None}
        if changed:
            self._tell(changed)

    def _tell(self, changed: set[str]) -> None:
        """Each listener hears of the change; one that fails is a bug to log, not a reason to stop watching."""
        for listener in self.listeners:
            try:
                listener(changed)
            except Exception:
                log.exception("a listener of the node's view failed on a change of %s", ", ".join(sorted(changed)))

    async def _watch_blocks(self, wanted: bool) -> None:
        if wanted and self._blocks_task is None:
            self.builder.with_blocks(True)
            self._blocks_ready.clear()
            self._blocks_task = asyncio.create_task(self._watch([BLOCKS], self._blocks_ready))
        elif not wanted and self._blocks_task is not None:
            await self._stop_blocks()
            self.builder.with_blocks(False)
            self._tell({BLOCKS})

    async def _stop_blocks(self) -> None:
        task, self._blocks_task = self._blocks_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
