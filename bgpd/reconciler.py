"""Level-triggered reconciliation of the node's kernel routes: read desired state, diff, apply the difference."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bgpd import desired, encap
from bgpd.dataplane import routes
from bgpd.dataplane.route_table import (
    BGP_ROUTES,
    BLOCK_ROUTES,
    KEPT_ROUTES,
    OVERLAY_ROUTES,
    WORKLOAD_ROUTES,
    Applied,
    RouteTable,
)
from bgpd.loops import Backoff, guarded
from bgpd.overlay import Overlay
from bgpd.view import BLOCKS, ENDPOINTS, NodeView

log = logging.getLogger("calico-py-node.reconcile")
# After a failed run the next one comes sooner than the periodic one (first retry after RETRY_FIRST_SECONDS,
# doubling up to RETRY_MAX_SECONDS or the interval): drift the failed run could not repair, such as a route
# deleted while etcd was away, is repaired within seconds of the datastore answering again, not an interval
# later. A run that fails on an unreachable datastore has already spent the store's failover time retrying, so
# the pause only spaces out errors that come at once.
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 10.0


@dataclass
class ReconcileStats:
    runs: int = 0  # full runs (kernel and datastore read)
    fast_runs: int = 0  # BGP changes applied on their own
    errors: int = 0
    last_seconds: float = 0.0
    last_changes: int = 0
    routes: int = 0  # routes of ours the node should hold, as of the last run
    workloads: int = 0  # local workload endpoints, as of the last run
    by_type: dict[str, int] = field(default_factory=dict)  # routes of ours by route_type(), as of the last run


TUNNEL_DEVICES = ("vxlan.calico", "tunl0")


def route_type(route: desired.RouteSpec) -> str:
    """blackhole (an affine block), workload (a local pod), tunnel (to another node, encapsulated), remote."""
    if route.kind == "blackhole":
        return "blackhole"
    if route.device in TUNNEL_DEVICES:
        return "tunnel"
    return "remote" if route.learned else "workload"


Learned = dict[str, tuple[str, ...]]  # BGP routes: prefix -> next hops, already filtered to the pools


class RouteFeed(Protocol):
    """Where BGP's routes come from (:class:`bgpd.speaker.rib.Rib`)."""

    def learned(self) -> Learned: ...  # every route

    def changes(self) -> Learned: ...  # the prefixes changed since the last call (no next hop: withdrawn)

    def keeps_startup_routes(self, now: float) -> bool: ...  # a restart: BGP has not relearned its routes yet


class _NoRoutes:
    """The feed of a node without BGP."""

    def learned(self) -> Learned:
        return {}

    def changes(self) -> Learned:
        return {}

    def keeps_startup_routes(self, now: float) -> bool:
        return False


NO_ROUTES = _NoRoutes()


class RouteReconciler:
    """Runs on start, whenever woken (a CNI ADD/DEL, a new block), and every ``interval`` seconds to repair
    drift: a full run reads the kernel, states every source of the route table from the view and BGP, and
    corrects every difference. BGP changes take a delta: only the prefixes that changed are restated and
    applied, so a burst of 10,000 routes is not re-read and re-diffed per UPDATE."""

    def __init__(self, view: Callable[[], NodeView], kernel: routes.RouteKernel, node: str, interval: float,
                 feed: RouteFeed | None = None, overlay: Overlay | None = None) -> None:
        # BGP's routes, from the node's table (bgpd/speaker/rib.py), already through the import filter.
        self.feed: RouteFeed = feed or NO_ROUTES
        self.overlay = overlay  # encapsulation and NAT: routes to other nodes from the datastore
        self.view = view
        self.kernel = kernel
        self.table = RouteTable(kernel)
        self.node = node
        self.interval = interval
        self.stats = ReconcileStats()
        self._wake = asyncio.Event()
        self._full_wanted = True
        # What BGP's routes are made against, as of the last full run: the node's addresses and its own blocks.
        self._connected: tuple[tuple[str, desired.IPInterface], ...] = ()
        self._own: set[str] = set()
        self._started = False  # the first full run has looked for routes to keep over a restart
        self._periodic = False
        self._held: dict[Any, str] = {}  # which node holds which block, as the IPAM blocks said last

    def _keeps_startup_routes(self) -> bool:
        """While true (a restart, BGP not relearned yet): the remote routes found in the kernel at start stay."""
        return self.feed.keeps_startup_routes(time.monotonic())

    def wake(self) -> None:
        """Run a full reconcile soon."""
        self._full_wanted = True
        self._wake.set()

    def on_view_change(self, changed: set[str]) -> None:
        """The view changed: this node's blocks, the pools, Nodes and (for VXLAN) the IPAM blocks decide its
        routes. Its endpoints do not wake a run: the CNI handler plumbs a pod's route itself, and a veth deleted
        takes its route along. A block change matters only when it moves which node holds what."""
        changed = changed - {ENDPOINTS}
        if changed == {BLOCKS}:
            held = encap.remote_prefixes(self.view().blocks or ())
            if held == self._held:
                return
            self._held = held
        if changed:
            self.wake()

    def wake_routes(self) -> None:
        """BGP routes changed: apply them soon."""
        self._wake.set()

    async def _state_sources(self, existing: set[str], connected: list[tuple[str, desired.IPInterface]]) -> None:
        """Every source of the route table but the kept ones, for the interfaces ``existing`` in the kernel."""
        view = self.view()
        affinities = list(view.affinities)
        local = [desired.LocalWorkload(w.interface, tuple(ipaddress.ip_interface(n).ip
                                                          for n in w.ip_networks)) for w in view.endpoints]
        self.stats.workloads = len(local)
        self._connected, self._own = tuple(connected), {str(a) for a in affinities}
        self.table.set_routes(WORKLOAD_ROUTES, desired.desired_routes(local, (), existing))
        self.table.set_routes(BLOCK_ROUTES, desired.desired_routes((), affinities, existing))
        self.table.set_routes(OVERLAY_ROUTES, await self.overlay.desired(view, self._connected, self._periodic)
                              if self.overlay else ())
        self.table.set_routes(BGP_ROUTES, {self._through_tunnel(r) for r in
                                    desired.remote_routes(self.feed.learned(), connected, affinities)})

    def _through_tunnel(self, route: desired.RouteSpec) -> desired.RouteSpec:
        return self.overlay.ipip_route(route) if self.overlay else route

    async def reconcile_once(self) -> int:
        """A full run: the kernel's routes of ours against everything the node should hold."""
        self._full_wanted = False
        started = time.monotonic()
        # The kernel is read first, in one netlink job, and the datastore after it. A CNI ADD records its
        # endpoint before it plumbs its host route (on the same netlink thread), so every route seen here has its
        # endpoint in the read that follows; read the other way round, a pod plumbed between the two reads has a
        # route but no endpoint yet, and would lose its route.
        kernel = await self.kernel.read()
        have = set(kernel.routes)
        self._forget_retained(self.feed.changes())  # BGP's own since the last run (learned() below forgets what)
        await self._state_sources(set(kernel.interfaces), list(kernel.connected))
        self._keep_startup_routes(have)
        wanted = self.table.desired()
        self.stats.routes = len(wanted)
        self.stats.by_type = dict(Counter(route_type(r) for r in wanted.values()))
        changes = self._log(await self.table.apply(actual=have))
        self.stats.runs += 1
        self.stats.last_seconds = time.monotonic() - started
        return changes

    def _keep_startup_routes(self, have: set[desired.RouteSpec]) -> None:
        """Just restarted: traffic to other nodes goes on over the routes the previous daemon left while the
        sessions come back; only those, and only until BGP has relearned what it has."""
        kept = self.table.routes(KEPT_ROUTES)
        others = {spec for prefix, spec in self.table.desired().items() if kept.get(prefix) != spec}
        if not self._started:
            self._started = True
            found = desired.found_at_start(have, others) if self._keeps_startup_routes() else {}
            if found:
                log.info("keeping %d remote routes found in the kernel until BGP has relearned them", len(found))
            self.table.set_routes(KEPT_ROUTES, found.values())
        elif kept:
            still = desired.still_retained(kept, have, others)
            if not self._keeps_startup_routes():
                log.info("BGP has relearned its routes: %d not relearned of those found in the kernel at start go",
                         len(still))
                still = {}
            self.table.set_routes(KEPT_ROUTES, still.values())

    async def apply_route_changes(self) -> int:
        """The delta: restate the BGP prefixes that changed since the last run and apply them, nothing else."""
        changes = self.feed.changes()
        self._forget_retained(changes)
        for prefix, next_hops in changes.items():
            want = desired.remote_route(prefix, next_hops, self._connected, self._own)
            self.table.set_route(BGP_ROUTES, prefix, self._through_tunnel(want) if want is not None else None)
            if want is None and self.table.installed(prefix) is None and self.table.winner(prefix) is None:
                # a withdrawal of a route we do not know we hold: let a full run compare with the kernel
                self._full_wanted = True
                self._wake.set()
        self.stats.fast_runs += 1
        applied = await self.table.apply()
        # Keep the counts by type (/metrics) current between full runs: most remote routes come this way.
        counts = Counter(self.stats.by_type)
        counts.subtract(route_type(r) for r in applied.diff.remove + applied.replaced)
        counts.update(route_type(r) for r in applied.diff.add)
        self.stats.by_type = {kind: count for kind, count in counts.items() if count > 0}
        self.stats.routes = sum(self.stats.by_type.values())
        return self._log(applied)

    def _forget_retained(self, changes: Learned) -> None:
        """A route found at start that BGP announced or withdrew since is BGP's: withdrawn, it goes."""
        kept = self.table.routes(KEPT_ROUTES)
        for prefix in [prefix for prefix in changes if prefix in kept]:
            self.table.set_route(KEPT_ROUTES, prefix, None)

    def _log(self, applied: Applied) -> int:
        diff, errors = applied.diff, applied.errors
        failed = {spec for spec, _ in errors}
        if len(diff.add) + len(diff.remove) > 20:  # a burst (BGP bulk): one line, not one per route
            log.info("routes changed: %d added, %d removed, %d failed", len(diff.add), len(diff.remove), len(errors))
        else:
            for spec in diff.add:
                if spec not in failed:
                    log.info("route added %s", spec)
            for spec in diff.remove:
                if spec not in failed:
                    log.info("route removed %s", spec)
        for _, error in errors:
            log.warning("route change failed: %s", error)
        if errors:
            self._full_wanted = True  # what the kernel holds is no longer what we think: read it again
        self.stats.errors += len(errors)
        self.stats.last_changes = len(diff.add) + len(diff.remove)
        return self.stats.last_changes

    async def run(self) -> None:
        backoff = Backoff(RETRY_FIRST_SECONDS, min(RETRY_MAX_SECONDS, self.interval))
        while True:
            retry_in = await guarded(self.step, log, "reconcile", "kernel routes kept as they are", backoff)
            if retry_in is not None:
                self.stats.errors += 1
                self._full_wanted = True  # the kernel keeps what it has; the retry repairs
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval if retry_in is None else retry_in)
            except TimeoutError:
                self._full_wanted = self._periodic = True  # the periodic run that repairs drift
            self._wake.clear()

    async def step(self) -> None:
        """One pass of the loop: a full run when one is wanted, or when the routes found at start stop being
        kept (those not relearned go); else the BGP delta."""
        if self._full_wanted or (self.table.routes(KEPT_ROUTES) and not self._keeps_startup_routes()):
            await self.reconcile_once()
            self._periodic = False
        else:
            await self.apply_route_changes()
