"""Kernel routes of our protocol number: read with ``ip -json``, changed through pyroute2 (or one ``ip -batch`` for
large changes). Routes of other protocols are never touched."""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import subprocess
from dataclasses import dataclass
from typing import Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from bgpd.dataplane.kernel import ROUTE_PROTO, SCOPE_LINK, Netlink
from bgpd.desired import IPInterface, RouteDiff, RouteSpec

ONLINK = 4  # RTNH_F_ONLINK: the next hop is on the segment even if no route says so


def interfaces(ipr: IPRoute | None = None) -> dict[int, str]:
    """index -> name of the interfaces of this thread's network namespace. if_nameindex() costs microseconds;
    a full pyroute2 link dump costs 40 ms at 200 veths, and every reconcile needs this."""
    return dict(socket.if_nameindex())


def connected(ipr: IPRoute) -> list[tuple[str, IPInterface]]:
    """(interface, address) of every IPv4 address and every IPv6 address but link-local ones on the node: the
    subnets BGP next hops are looked for in (fe80::/64 is on every interface and would say nothing)."""
    names = interfaces(ipr)
    found: list[tuple[str, IPInterface]] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for a in ipr.get_addr(family=family):
            address = ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            if not address.ip.is_link_local or address.version == 4:
                found.append((names.get(a["index"], "?"), address))
    return found


def actual_routes(ipr: IPRoute | None = None) -> set[RouteSpec]:
    """Our routes (protocol 80) in the main table. Read with ``ip -json`` rather than a pyroute2 dump: with
    10,000 learned routes the dump and its parsing take over a second, ip about 50 ms."""
    found = set()
    for family in ("-4", "-6"):
        result = subprocess.run(["ip", "-json", family, "route", "show", "table", "main", "proto", str(ROUTE_PROTO)],
                                capture_output=True, text=True, timeout=60, check=False)
        for route in json.loads(result.stdout or "[]") if result.returncode == 0 else []:
            dst = route.get("dst", "")
            if dst == "default":
                dst = "0.0.0.0/0" if family == "-4" else "::/0"
            elif "/" not in dst:
                dst += "/32" if family == "-4" else "/128"
            if route.get("type") == "blackhole":
                found.add(RouteSpec(dst=dst, kind="blackhole"))
            elif route.get("nexthops"):
                found.add(RouteSpec(dst=dst, nexthops=tuple(sorted((hop.get("gateway", ""), hop.get("dev", ""))
                                                                   for hop in route["nexthops"]))))
            else:
                found.add(RouteSpec(dst=dst, device=route.get("dev"), gateway=route.get("gateway")))
    return found


def _request(spec: RouteSpec, names: dict[str, int]) -> dict[str, object]:
    network = spec.network
    request: dict[str, object] = {"dst": spec.dst, "proto": ROUTE_PROTO, "family": 2 if network.version == 4 else 10}
    if spec.kind == "blackhole":
        request["type"] = "blackhole"
    elif spec.nexthops:
        request["multipath"] = [{"gateway": gateway, "oif": names[device], "flags": ONLINK}
                                for gateway, device in spec.nexthops]
    else:
        request["oif"] = names[spec.device or ""]
        if spec.gateway:
            request["gateway"] = spec.gateway
            request["flags"] = ONLINK
        else:
            request["scope"] = SCOPE_LINK
    return request


BATCH_THRESHOLD = 32  # beyond this many changes, one `ip -batch` beats a netlink round trip per route


def ip_command(verb: str, spec: RouteSpec) -> str:
    """The ``ip route`` line for a spec (for ``ip -batch``). No ``-6``: a batch line takes no options (``ip``
    answers 'Object "-6" is unknown'), and ip infers the family from the destination (IPv6 too)."""
    if spec.kind == "blackhole":
        return f"route {verb} blackhole {spec.dst} proto {ROUTE_PROTO}"
    if spec.nexthops:
        hops = " ".join(f"nexthop via {gateway} dev {device} onlink" for gateway, device in spec.nexthops)
        return f"route {verb} {spec.dst} proto {ROUTE_PROTO} {hops}"
    if spec.gateway:
        return f"route {verb} {spec.dst} via {spec.gateway} dev {spec.device} proto {ROUTE_PROTO} onlink"
    return f"route {verb} {spec.dst} dev {spec.device} proto {ROUTE_PROTO} scope link"


def _devices_exist(spec: RouteSpec, names: dict[str, int]) -> bool:
    return all(device in names for device in spec.devices)


def apply_batch(diff: RouteDiff, names: dict[str, int]) -> list[tuple[RouteSpec | None, str]]:
    """Many changes in one ``ip -force -batch -`` (thousands of routes a second instead of hundreds)."""
    lines = [ip_command("del", s) for s in diff.remove if _devices_exist(s, names)]
    lines += [ip_command("replace", s) for s in diff.add if _devices_exist(s, names)]
    result = subprocess.run(["ip", "-force", "-batch", "-"], input="\n".join(lines) + "\n", capture_output=True,
                            text=True, timeout=120, check=False)
    return [(None, line) for line in result.stderr.splitlines() if line.strip() and "No such process" not in line]


def apply(ipr: IPRoute, diff: RouteDiff) -> list[tuple[RouteSpec | None, str]]:
    """Apply the diff; returns (route, message) per change that failed (the next reconcile retries). The route
    is None when a batch reported the failure."""
    names = {name: index for index, name in interfaces(ipr).items()}
    if len(diff.add) + len(diff.remove) > BATCH_THRESHOLD:
        return apply_batch(diff, names)
    errors: list[tuple[RouteSpec | None, str]] = []
    for spec in diff.remove:
        if not _devices_exist(spec, names):
            continue  # its device is gone, and the kernel took the route with it; deleting by destination
            # alone could hit a new pod's route to the same (reused) address
        try:
            ipr.route("del", **_request(spec, names))
        except NetlinkError as exc:
            if exc.code != errno.ESRCH:
                errors.append((spec, f"removing {spec}: {exc}"))
    for spec in diff.add:
        try:
            ipr.route("replace", **_request(spec, names))
        except NetlinkError as exc:
            errors.append((spec, f"adding {spec}: {exc}"))
        except KeyError as exc:
            errors.append((spec, f"adding {spec}: device {exc} is gone"))
    return errors


@dataclass(frozen=True)
class KernelRoutes:
    """What a full reconcile reads of the kernel, in one netlink job."""

    interfaces: frozenset[str]
    routes: frozenset[RouteSpec]  # ours (protocol 80)
    connected: tuple[tuple[str, IPInterface], ...]  # (interface, address): where next hops are looked for


class RouteKernel(Protocol):
    """The kernel's routing table as the route reconciler sees it; a fake in the unit tests records the diffs."""

    async def read(self) -> KernelRoutes: ...

    async def apply(self, diff: RouteDiff) -> list[tuple[RouteSpec | None, str]]: ...


class NetlinkRoutes:
    """:class:`RouteKernel` on the node's netlink thread."""

    def __init__(self, netlink: Netlink) -> None:
        self.netlink = netlink

    async def read(self) -> KernelRoutes:
        return await self.netlink.run(lambda ipr: KernelRoutes(frozenset(interfaces(ipr).values()),
                                                               frozenset(actual_routes(ipr)),
                                                               tuple(connected(ipr))))

    async def apply(self, diff: RouteDiff) -> list[tuple[RouteSpec | None, str]]:
        return await self.netlink.run(lambda ipr: apply(ipr, diff)) if not diff.empty else []
