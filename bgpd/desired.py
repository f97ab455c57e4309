"""Pure desired-state functions: what routes the node's kernel should hold, and the diff to get there."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface  # a node address with its subnet


@dataclass(frozen=True, order=True)
class RouteSpec:
    """A route we own. ``kind`` is ``unicast`` (via ``device``, optionally a ``gateway``; or via several
    ``nexthops``, each (gateway, device): equal-cost multipath) or ``blackhole``."""

    dst: str  # network text, so specs sort and hash across families
    kind: str = "unicast"
    device: str | None = None
    gateway: str | None = None
    nexthops: tuple[tuple[str, str], ...] = ()  # sorted; set only when there are two or more

    @property
    def learned(self) -> bool:
        """A route to another node (via a gateway), as BGP gives them."""
        return bool(self.gateway or self.nexthops)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d for _, d in self.nexthops) if self.nexthops else (self.device,) if self.device else ()

    @property
    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.dst)


@dataclass(frozen=True)
class LocalWorkload:
    interface: str
    addresses: tuple[IPAddress, ...]


def host_route(address: IPAddress, interface: str) -> RouteSpec:
    return RouteSpec(dst=f"{address}/{address.max_prefixlen}", device=interface)


@functools.lru_cache(maxsize=1024)
def _device_for(gateway: str, connected: tuple[tuple[str, IPInterface], ...]) -> str | None:
    address = ipaddress.ip_address(gateway)
    return next((name for name, interface in connected
                 if interface.version == address.version and address in interface.network), None)


def device_for(gateway: str, connected: Iterable[tuple[str, IPInterface]]) -> str | None:
    """The interface whose subnet holds ``gateway`` (BGP next hops are on a shared segment; an IPv6 next hop is
    looked for among the IPv6 subnets only), or None. Cached: a burst of routes has a handful of next hops."""
    return _device_for(gateway, tuple(connected))


def remote_route(prefix: str, next_hops: Sequence[str], connected: Iterable[tuple[str, IPInterface]],
                 own: set[str]) -> RouteSpec | None:
    """The kernel route for a prefix learned over BGP: via its next hops (several: ECMP) on the interfaces that
    reach them; None for one of our own blocks (ours are blackholed here) or when no next hop is reachable
    directly."""
    if prefix in own:
        return None
    connected = tuple(connected)
    if len(next_hops) == 1:  # the common case, kept cheap: bursts of routes come through here
        device = _device_for(next_hops[0], connected)
        return RouteSpec(dst=prefix, device=device, gateway=next_hops[0]) if device is not None else None
    hops = sorted({(gateway, device) for gateway in next_hops
                   if (device := _device_for(gateway, connected)) is not None})
    if not hops:
        return None
    if len(hops) == 1:
        return RouteSpec(dst=prefix, device=hops[0][1], gateway=hops[0][0])
    return RouteSpec(dst=prefix, nexthops=tuple(hops))


def remote_routes(learned: dict[str, tuple[str, ...]], connected: Iterable[tuple[str, IPInterface]],
                  own_blocks: Iterable[IPNetwork]) -> set[RouteSpec]:
    """Routes learned over BGP (prefix -> next hops), as :func:`remote_route` makes them."""
    connected = tuple(connected)
    own = {str(b) for b in own_blocks}
    return {route for prefix, next_hops in learned.items()
            if (route := remote_route(prefix, next_hops, connected, own)) is not None}


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
    route changed shape is only added: the add replaces it in place, with no gap in forwarding."""
    add = tuple(sorted(desired - actual))
    added = {spec.dst for spec in add}
    return RouteDiff(add=add, remove=tuple(sorted(s for s in actual - desired if s.dst not in added)))


# ------------------------------------------------------------------ routes kept over a daemon restart


def found_at_start(have: set[RouteSpec], want: set[RouteSpec]) -> dict[str, RouteSpec]:
    """The remote routes (of ours, via a gateway) in the kernel's first read that nothing wants yet, by
    prefix: what a restarted daemon keeps while BGP relearns them."""
    wanted = {spec.dst for spec in want}
    return {spec.dst: spec for spec in have if spec.learned and spec.dst not in wanted}


def still_retained(retained: Mapping[str, RouteSpec], have: set[RouteSpec],
                   want: set[RouteSpec]) -> dict[str, RouteSpec]:
    """Of the routes found at start, those still kept: still in the kernel as they were, and not taken over
    since by a route the node wants (learned over BGP, from the datastore). A prefix once wanted is BGP's from
    then on: withdrawn later, it goes."""
    wanted = {spec.dst for spec in want}
    return {dst: spec for dst, spec in retained.items() if dst not in wanted and spec in have}
