"""A fake of the kernel's routing table, for unit tests of the route reconciler without root: it holds our routes,
the interfaces and connected subnets a test gives it, and records every diff applied (what a real kernel would
have been asked to change). It fakes only :class:`bgpd.dataplane.routes.RouteKernel`."""

from __future__ import annotations

from dataclasses import dataclass, field

from bgpd.dataplane.routes import KernelRoutes
from bgpd.desired import IPInterface, RouteDiff, RouteSpec


@dataclass
class FakeKernel:
    interfaces: set[str] = field(default_factory=lambda: {"lo", "eth0"})
    routes: set[RouteSpec] = field(default_factory=set)
    connected: list[tuple[str, IPInterface]] = field(default_factory=list)
    applied: list[RouteDiff] = field(default_factory=list)
    reads: int = 0

    async def read(self) -> KernelRoutes:
        self.reads += 1
        return KernelRoutes(frozenset(self.interfaces), frozenset(self.routes), tuple(self.connected))

    async def apply(self, diff: RouteDiff) -> list[tuple[RouteSpec | None, str]]:
        if not diff.empty:
            self.applied.append(diff)
        self.routes -= set(diff.remove)
        self.routes |= set(diff.add)
        return []
