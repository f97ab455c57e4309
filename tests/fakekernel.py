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
    refuse: set[str] = field(default_factory=set)  # destinations whose add the kernel refuses (a device gone)

    async def read(self) -> KernelRoutes:
        self.reads += 1
        return KernelRoutes(frozenset(self.interfaces), frozenset(self.routes), tuple(self.connected))

    async def apply(self, diff: RouteDiff) -> list[tuple[RouteSpec | None, str]]:
        if not diff.empty:
            self.applied.append(diff)
        self.routes -= set(diff.remove)
        refused = [spec for spec in diff.add if spec.dst in self.refuse]
        added = {spec for spec in diff.add if spec.dst not in self.refuse}
        replaced = {spec.dst for spec in added}  # an add replaces the route to its destination, as `replace` does
        self.routes = {spec for spec in self.routes if spec.dst not in replaced} | added
        return [(spec, f"adding {spec}: No such device") for spec in refused]


@dataclass
class FakeOverlayKernel:
    """Fakes :class:`bgpd.dataplane.overlay_kernel.OverlayKernel`: the VXLAN device, ``tunl0`` (``ipip`` False:
    a kernel without the module) and the NAT table, recording each request."""

    vtep: object | None = None
    tunnel: object | None = None
    entries: object | None = None
    nat: str | None = None
    ipip: bool = True
    calls: list[str] = field(default_factory=list)

    async def ensure_vtep(self, vtep: object) -> bool:
        self.calls.append("ensure_vtep")
        changed, self.vtep = vtep != self.vtep, vtep
        return changed

    async def remove_vtep(self) -> bool:
        self.calls.append("remove_vtep")
        had, self.vtep = self.vtep is not None, None
        return had

    async def ensure_tunnel(self, tunnel: object) -> None:
        from bgpd.dataplane.ipip import IPIPUnavailable
        self.calls.append("ensure_tunnel")
        if not self.ipip:
            raise IPIPUnavailable("no ipip module in this kernel")
        self.tunnel = tunnel

    async def apply_entries(self, state: object) -> list[str]:
        self.calls.append("apply_entries")
        self.entries = state
        return []

    async def apply_nat(self, script: str) -> None:
        self.calls.append("apply_nat")
        self.nat = script


@dataclass
class FakePodKernel:
    """Fakes :class:`bgpd.dataplane.pod_kernel.PodKernel`: the host veths by name (and their pod side), with the
    requests recorded; ``fail`` names a step that raises a plumbing error."""

    veths: dict[str, object] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    fail: str | None = None

    def _step(self, name: str) -> None:
        from bgpd.dataplane.workloads import PlumbingError
        self.calls.append(name)
        if self.fail == name:
            raise PlumbingError(f"{name}: refused by the fake kernel")

    async def create_link(self, workload: object, families: tuple[int, ...]) -> int:
        self._step("create_link")
        self.veths[workload.host_if] = workload  # type: ignore[attr-defined]
        return len(self.veths)

    async def configure_pod(self, workload: object) -> None:
        self._step("configure_pod")
        self.veths[workload.host_if] = workload  # type: ignore[attr-defined]

    async def route_to_pod(self, workload: object, index: int) -> None:
        self._step("route_to_pod")

    async def remove(self, host_if: str) -> bool:
        self.calls.append("remove")
        return self.veths.pop(host_if, None) is not None

    async def check(self, workload: object) -> list[str]:
        self.calls.append("check")
        return [] if workload.host_if in self.veths else [f"{workload.host_if} is missing"]  # type: ignore[attr-defined]
