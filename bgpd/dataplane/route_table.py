"""The node's routes of our protocol, kept by source as Felix's route table keeps them: each source (pods,
affine blocks, the overlay, BGP, the routes kept over a restart) states its routes, wholly or by prefix; one
route wins per prefix; :meth:`RouteTable.apply` writes to the kernel only the prefixes whose winner changed, or,
after a resync, everything that differs from a fresh read of the kernel."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bgpd.dataplane.routes import RouteKernel
from bgpd.desired import RouteDiff, RouteSpec, diff_routes

WORKLOAD_ROUTES = "workloads"  # a /32 (/128) per local pod address, via its veth
BLOCK_ROUTES = "blocks"  # a blackhole per affine block
OVERLAY_ROUTES = "overlay"  # routes to other nodes from the datastore (VXLAN, or no BGP)
BGP_ROUTES = "bgp"  # routes learned over BGP, through tunl0 where the pool is IPIP
KEPT_ROUTES = "kept"  # routes a restarted daemon found in the kernel, kept while BGP relearns them
# First wins for a prefix: a local pod over anything, the datastore's encapsulated route over BGP's.
SOURCES = (WORKLOAD_ROUTES, BLOCK_ROUTES, OVERLAY_ROUTES, BGP_ROUTES, KEPT_ROUTES)


@dataclass(frozen=True)
class Applied:
    """What one :meth:`RouteTable.apply` changed: ``replaced`` are the routes ``diff.add`` took the place of."""

    diff: RouteDiff
    replaced: tuple[RouteSpec, ...]
    errors: tuple[tuple[RouteSpec | None, str], ...]


class RouteTable:
    """Desired routes by source, the routes we installed by prefix, and the prefixes changed since the last
    apply. A resync is due at first, after a failed change, and whenever asked for (the periodic repair)."""

    def __init__(self, kernel: RouteKernel) -> None:
        self.kernel = kernel
        self._by_source: dict[str, dict[str, RouteSpec]] = {source: {} for source in SOURCES}
        self._installed: dict[str, RouteSpec] = {}
        self._dirty: set[str] = set()
        self._resync = True

    def set_routes(self, source: str, routes: Iterable[RouteSpec]) -> None:
        """All the routes of ``source``, replacing what it said before."""
        old, new = self._by_source[source], {route.dst: route for route in routes}
        self._dirty |= {prefix for prefix in old.keys() | new.keys() if old.get(prefix) != new.get(prefix)}
        self._by_source[source] = new

    def set_route(self, source: str, prefix: str, route: RouteSpec | None) -> None:
        """One prefix of ``source``: its route, or None for none."""
        routes = self._by_source[source]
        if routes.get(prefix) == route:
            return
        if route is None:
            del routes[prefix]
        else:
            routes[prefix] = route
        self._dirty.add(prefix)

    def routes(self, source: str) -> Mapping[str, RouteSpec]:
        return self._by_source[source]

    def installed(self, prefix: str) -> RouteSpec | None:
        """The route of ours to ``prefix`` as the last apply left it."""
        return self._installed.get(prefix)

    def winner(self, prefix: str) -> RouteSpec | None:
        return next((routes[prefix] for routes in self._by_source.values() if prefix in routes), None)

    def desired(self) -> dict[str, RouteSpec]:
        """The winning route of every prefix."""
        wanted: dict[str, RouteSpec] = {}
        for routes in reversed(self._by_source.values()):
            wanted.update(routes)
        return wanted

    def queue_resync(self) -> None:
        self._resync = True

    @property
    def resync_due(self) -> bool:
        return self._resync

    async def apply(self, actual: Iterable[RouteSpec] | None = None) -> Applied:
        """Write the difference. With ``actual`` (the kernel's routes of ours, just read) or when a resync is
        due, the whole desired table is compared with the kernel; otherwise only the prefixes changed since."""
        if actual is not None or self._resync:
            have = set(actual) if actual is not None else set((await self.kernel.read()).routes)
            wanted = self.desired()
            diff = diff_routes(set(wanted.values()), have)
            added = {spec.dst for spec in diff.add}
            replaced = tuple(spec for spec in have if spec.dst in added)
            self._installed = wanted
        else:
            diff, replaced = self._delta()
        self._dirty.clear()
        self._resync = False
        errors = tuple(await self.kernel.apply(diff)) if not diff.empty else ()
        if errors:
            self._resync = True  # the kernel no longer holds what we think: read it again
        return Applied(diff, replaced, errors)

    def _delta(self) -> tuple[RouteDiff, tuple[RouteSpec, ...]]:
        add: list[RouteSpec] = []
        remove: list[RouteSpec] = []
        replaced: list[RouteSpec] = []
        for prefix in self._dirty:
            want, have = self.winner(prefix), self._installed.get(prefix)
            if want == have:
                continue
            if want is None:
                remove.append(have)  # type: ignore[arg-type]
                del self._installed[prefix]
                continue
            add.append(want)  # replaces a changed route in place: no gap in forwarding
            if have is not None:
                replaced.append(have)
            self._installed[prefix] = want
        return RouteDiff(add=tuple(add), remove=tuple(remove)), tuple(replaced)
