"""Level-triggered reconciliation of the node's kernel routes: read desired state, diff, apply the difference."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from bgpd import desired
from bgpd.cni.handler import Netlink
from bgpd.dataplane import routes
from bgpd.resources import list_node_weps
from ipam import keys
from ipam.datastore import Datastore
from ipam.model import BlockAffinity

log = logging.getLogger("calico-py-node.reconcile")


@dataclass
class ReconcileStats:
    runs: int = 0
    errors: int = 0
    last_seconds: float = 0.0
    last_changes: int = 0
    routes: int = 0  # routes of ours the node should hold, as of the last run
    workloads: int = 0  # local workload endpoints, as of the last run


class RouteReconciler:
    """Runs on start, whenever woken (a CNI ADD/DEL), and every ``interval`` seconds to repair drift."""

    def __init__(self, store: Datastore, netlink: Netlink, node: str, interval: float,
                 learned: Callable[[], dict[str, str]] = dict,
                 bgp_converged: Callable[[], bool] = lambda: True) -> None:
        self.learned = learned  # BGP routes: prefix -> next hop, already filtered to the pools
        self.bgp_converged = bgp_converged
        self.store = store
        self.netlink = netlink
        self.node = node
        self.interval = interval
        self.stats = ReconcileStats()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def desired_state(self, existing: set[str],
                            connected: list[tuple[str, ipaddress.IPv4Interface]]) -> set[desired.RouteSpec]:
        """The routes the node should hold, for the interfaces ``existing`` in its kernel."""
        weps = await list_node_weps(self.store, self.node)
        affinities = []
        for version in (4, 6):
            for kv in await self.store.get_prefix(keys.affinities_prefix(self.node, version)):
                _, cidr = keys.parse_affinity_key(kv.key)
                if BlockAffinity.from_json(self.node, cidr, kv.json()).confirmed:
                    affinities.append(cidr)
        local = [desired.LocalWorkload(w.interface, tuple(ipaddress.ip_interface(n).ip
                                                          for n in w.ip_networks)) for w in weps]
        self.stats.workloads = len(local)
        return (desired.desired_routes(local, affinities, existing)
                | desired.remote_routes(self.learned(), connected, affinities))

    async def reconcile_once(self) -> int:
        started = time.monotonic()
        # The kernel is read first, in one netlink job, and the datastore after it. A CNI ADD records its
        # endpoint before it plumbs (in one job on the same netlink thread), so every route seen here has its
        # endpoint in the read that follows; read the other way round, a pod plumbed between the two reads has a
        # route but no endpoint yet, and would lose its route.
        names, have, connected = await self.netlink.run(
            lambda ipr: (routes.interfaces(ipr), routes.actual_routes(ipr), routes.connected(ipr)))
        want = await self.desired_state(set(names.values()), connected)
        if not self.bgp_converged():
            # Just restarted, BGP not relearned yet: keep the remote routes already in the kernel, so traffic to
            # other nodes does not stop while the sessions come back (they are checked again once converged).
            wanted = {spec.dst for spec in want}
            want |= {spec for spec in have if spec.gateway and spec.dst not in wanted}
        diff = desired.diff_routes(want, have)
        self.stats.routes = len(want)
        errors = await self.netlink.run(lambda ipr: routes.apply(ipr, diff)) if not diff.empty else []
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
        self.stats.runs += 1
        self.stats.errors += len(errors)
        self.stats.last_seconds = time.monotonic() - started
        self.stats.last_changes = len(diff.add) + len(diff.remove)
        return self.stats.last_changes

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except Exception:  # the datastore may be away; the next run retries
                self.stats.errors += 1
                log.exception("reconcile failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
            self._wake.clear()
