"""Pure desired-state functions: what routes the node's kernel should hold, and the diff to get there."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, order=True)
class RouteSpec:
    """A route we own. ``kind`` is ``unicast`` (via ``device``, optionally a ``gateway``) or ``blackhole``."""

    dst: str  # network text, so specs sort and hash across families
    kind: str = "unicast"
    device: str | None = None
    gateway: str | None = None

    @property
    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.dst)


@dataclass(frozen=True)
class LocalWorkload:
    interface: str
    addresses: tuple[IPAddress, ...]


def host_route(address: IPAddress, interface: str) -> RouteSpec:
    return RouteSpec(dst=f"{address}/{address.max_prefixlen}", device=interface)


def device_for(gateway: str, connected: Iterable[tuple[str, ipaddress.IPv4Interface]]) -> str | None:
    """The interface whose subnet holds ``gateway`` (BGP next hops are on a shared segment), or None."""
    address = ipaddress.ip_address(gateway)
    return next((name for name, interface in connected if address in interface.network), None)


def remote_routes(learned: dict[str, str], connected: Iterable[tuple[str, ipaddress.IPv4Interface]],
                  own_blocks: Iterable[IPNetwork]) -> set[RouteSpec]:
    """Routes learned over BGP, via their next hop on the interface that reaches it; never one of our own
    blocks (ours are blackholed here), never a next hop we cannot reach directly."""
    connected = list(connected)
    own = {str(b) for b in own_blocks}
    routes = set()
    for prefix, gateway in learned.items():
        device = device_for(gateway, connected)
        if prefix not in own and device is not None:
            routes.add(RouteSpec(dst=prefix, device=device, gateway=gateway))
    return routes


def desired_routes(workloads: Iterable[LocalWorkload], affine_blocks: Iterable[IPNetwork],
                   existing_interfaces: set[str]) -> set[RouteSpec]:
    """A /32 (/128) per local workload address via its veth, and a blackhole per confirmed affine block so
    addresses of the block that no pod holds are dropped here instead of following a default route away.
    A workload whose veth is missing gets no route (a route to a missing device cannot exist; CHECK and the
    runtime deal with the workload)."""
    routes = {RouteSpec(dst=str(block), kind="blackhole") for block in affine_blocks
              if block.prefixlen < block.max_prefixlen}  # a /32 block would blackhole its only address
    for workload in workloads:
        if workload.interface in existing_interfaces:
            routes |= {host_route(a, workload.interface) for a in workload.addresses}
    return routes


@dataclass(frozen=True)
class RouteDiff:
    add: tuple[RouteSpec, ...]
    remove: tuple[RouteSpec, ...]

    @property
    def empty(self) -> bool:
        return not self.add and not self.remove


def diff_routes(desired: set[RouteSpec], actual: set[RouteSpec]) -> RouteDiff:
    """What to add and remove so the kernel's routes of our protocol equal ``desired``. A destination whose
    route changed shape is removed, then added."""
    return RouteDiff(add=tuple(sorted(desired - actual)), remove=tuple(sorted(actual - desired)))
