"""The overlay of one node, planned from its view (no I/O): the tunnel addresses to take from IPAM or give back
(and the Node fields that record them, as Calico does), the VXLAN and IPIP devices, the neighbour and FDB entries
and encapsulated routes (:func:`bgpd.encap.datastore_routes`), the NAT outgoing ruleset, and the pods' MTU.
:class:`bgpd.overlay.Overlay` applies a plan."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bgpd import encap
from bgpd.desired import RouteSpec
from bgpd.view import NodeView
from ipam.model import IPPool


@dataclass(frozen=True)
class TunnelAddressChange:
    """A tunnel address to take from IPAM (``take``) or give back, and where the Node records it."""

    kind: str  # the allocation's type attribute: vxlanTunnelAddress or ipipTunnelAddress
    handle: str
    take: bool
    pools: tuple[str, ...]  # where it may come from
    current: ipaddress.IPv4Address | None

    def node_fields(self, node: str, resource: Mapping[str, Any], address: str | None) -> dict[str, Any]:
        """The Node spec fields that record ``address`` (None: remove them)."""
        if self.kind == VXLAN_KIND:
            return {"ipv4VXLANTunnelAddr": address, "vxlanTunnelMACAddr": encap.vtep_mac(node) if address else None}
        bgp = (resource.get("spec") or {}).get("bgp") or {}
        return {"bgp": {k: v for k, v in {**bgp, "ipv4IPIPTunnelAddr": address}.items() if v}}


VXLAN_KIND, IPIP_KIND = "vxlanTunnelAddress", "ipipTunnelAddress"


@dataclass(frozen=True)
class Tunnels:
    """This node's tunnel addresses as its Node resource records them."""

    vxlan: ipaddress.IPv4Address | None = None
    ipip: ipaddress.IPv4Address | None = None

    @classmethod
    def of(cls, resource: Mapping[str, Any] | None) -> Tunnels:
        spec = (resource or {}).get("spec") or {}
        vxlan, ipip = spec.get("ipv4VXLANTunnelAddr"), (spec.get("bgp") or {}).get("ipv4IPIPTunnelAddr")
        return cls(ipaddress.IPv4Address(vxlan) if vxlan else None, ipaddress.IPv4Address(ipip) if ipip else None)


def tunnel_address_changes(node: str, tunnels: Tunnels, pools: Iterable[IPPool]) -> tuple[TunnelAddressChange, ...]:
    """The addresses to take (a VXLAN or IPIP pool wants one and the node has none) or give back (none wants it)."""
    pools = list(pools)
    changes = []
    for kind, handle, wanted, current, mode in (
            (VXLAN_KIND, encap.VXLAN_HANDLE, encap.vxlan_wanted(pools), tunnels.vxlan, "vxlan"),
            (IPIP_KIND, encap.IPIP_HANDLE, encap.ipip_wanted(pools), tunnels.ipip, "ipip")):
        if wanted == (current is not None):
            continue
        sources = tuple(str(p.cidr) for p in pools if getattr(p, f"{mode}_mode") != encap.NEVER and p.version == 4)
        changes.append(TunnelAddressChange(kind, handle.format(node=node), wanted, sources, current))
    return tuple(changes)


@dataclass(frozen=True)
class OverlayPlan:
    vtep: encap.Vtep | None  # None: no VXLAN device
    tunnel: encap.Tunnel | None  # None: no IPIP device wanted
    state: encap.EncapState  # encapsulated routes, neighbour and FDB entries
    nat: str  # the nft script for NAT outgoing
    pod_mtu: int

    @property
    def routes(self) -> set[RouteSpec]:
        return self.state.routes


def overhead(pools: Iterable[IPPool]) -> int:
    """Bytes an encapsulation takes of the underlay's MTU."""
    pools = list(pools)
    if encap.vxlan_wanted(pools):
        return encap.VXLAN_OVERHEAD
    if encap.ipip_wanted(pools):
        return encap.IPIP_OVERHEAD
    return 0


def plan_overlay(view: NodeView, address: ipaddress.IPv4Interface | None, tunnels: Tunnels, backend: str,
                 underlay_mtu: int, mtu_override: int | None,
                 connected: Iterable[tuple[str, ipaddress.IPv4Interface]]) -> OverlayPlan:
    """The overlay ``view`` asks for, with this node's tunnel addresses as they now are."""
    me = encap.TunnelNode(view.node, address)
    if address is not None and tunnels.vxlan is not None and view.node in view.nodes:
        me = encap.TunnelNode(view.node, address, tunnels.vxlan, encap.vtep_mac(view.node))
    vtep = None
    if me.vxlan_address is not None and address is not None:
        vtep = encap.Vtep(local=str(address.ip), address=str(me.vxlan_address),
                          mac=me.vxlan_mac or encap.vtep_mac(view.node), mtu=underlay_mtu - encap.VXLAN_OVERHEAD)
    tunnel = encap.Tunnel(str(tunnels.ipip), underlay_mtu - encap.IPIP_OVERHEAD) if tunnels.ipip is not None else None
    state = encap.datastore_routes(me, [encap.TunnelNode.from_v3(n) for n in view.nodes.values()],
                                   encap.remote_prefixes(view.blocks or ()), view.pools, connected,
                                   plain_too=backend != "bird")
    return OverlayPlan(vtep, tunnel, state, encap.nat_ruleset(view.pools),
                       mtu_override or underlay_mtu - overhead(view.pools))
