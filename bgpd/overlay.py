"""Encapsulation and NAT outgoing on a node, kept as the pools want them (called by the full reconcile).

Each run takes pools, Nodes and IPAM blocks from the node's view (no etcd request), then: takes (or gives back)
this node's VXLAN tunnel address and records it with the VTEP MAC on its Node resource, keeps ``vxlan.calico``
and its neighbour / FDB entries as :func:`bgpd.encap.datastore_routes` computes them, and rewrites our NAT table
when it changed.
The routes are returned to the reconciler, which owns every route of ours.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
from collections.abc import Callable
from typing import Any

from bgpd import encap
from bgpd.dataplane import ipip, nat, vxlan
from bgpd.dataplane.kernel import Netlink
from bgpd.desired import RouteSpec
from bgpd.store import register_node
from bgpd.view import NodeView
from ipam import keys
from ipam.allocator import IPAM
from ipam.datastore import Datastore
from ipam.model import IPPool

log = logging.getLogger("calico-py-node.overlay")


def interface_mtu(address: ipaddress.IPv4Interface | None) -> int:
    """The MTU of the interface holding the node's address (the underlay), 1500 when unknown."""
    if address is None:
        return 1500
    result = subprocess.run(["ip", "-json", "-4", "addr", "show"], capture_output=True, text=True, timeout=30,
                            check=False)
    for link in json.loads(result.stdout or "[]") if result.returncode == 0 else []:
        if any(a.get("local") == str(address.ip) for a in link.get("addr_info") or []):
            return int(link.get("mtu") or 1500)
    return 1500


class Overlay:
    def __init__(self, store: Datastore, ipam: IPAM, netlink: Netlink, node: str,
                 address: ipaddress.IPv4Interface | None, backend: str, underlay_mtu: int,
                 mtu_override: int | None) -> None:
        self.store = store
        self.ipam = ipam
        self.netlink = netlink
        self.node = node
        self.address = address
        self.backend = backend
        self.underlay_mtu = underlay_mtu
        self.mtu_override = mtu_override
        self.pools: list[IPPool] = []
        self.pod_mtu = mtu_override or underlay_mtu
        self._nat_applied: str | None = None
        self.ipip_address: ipaddress.IPv4Address | None = None
        self.ipip_ready: bool | None = None  # None: not tried yet

    def overhead(self) -> int:
        if encap.vxlan_wanted(self.pools):
            return encap.VXLAN_OVERHEAD
        if encap.ipip_wanted(self.pools):
            return encap.IPIP_OVERHEAD
        return 0

    async def desired(self, view: NodeView, connected: tuple[tuple[str, ipaddress.IPv4Interface], ...],
                      repair: bool) -> set[RouteSpec]:
        """Bring tunnel device, entries and NAT in line with ``view``; the encapsulated (and, without BGP, plain)
        routes to other nodes. ``repair`` re-applies NAT even when unchanged (the periodic run)."""
        self.pools = list(view.pools)
        self.pod_mtu = self.mtu_override or self.underlay_mtu - self.overhead()
        nodes = dict(view.nodes)
        me = await self._tunnel_endpoint(nodes.get(self.node))
        await self._vtep_device(me)
        await self._ipip_device()
        state = encap.datastore_routes(
            me, [encap.TunnelNode.from_v3(n) for n in nodes.values()],
            encap.remote_prefixes(view.blocks or ()),
            self.pools, connected, plain_too=self.backend != "bird")
        if me.vxlan_address is not None:
            for error in await self.netlink.run(lambda ipr: vxlan.apply_entries(ipr, state)):
                log.warning("vxlan: %s", error)
        script = nat.render(self.pools)
        if repair or script != self._nat_applied:
            try:
                nat.apply(script)
                if script != self._nat_applied:
                    log.info("nat outgoing: %s", ", ".join(str(p.cidr) for p in self.pools if p.nat_outgoing)
                             or "off")
                self._nat_applied = script
            except (nat.NatError, OSError) as exc:
                log.warning("%s", exc)
        return state.routes

    def ipip_route(self, route: RouteSpec) -> RouteSpec:
        """A BGP-learned route through tunl0 when its pool is IPIP and the next hop needs encapsulation."""
        if self.ipip_ready and route.gateway and encap.ipip_device(route.dst, route.gateway, self.pools,
                                                                   self.address):
            return RouteSpec(dst=route.dst, device=encap.IPIP_DEVICE, gateway=route.gateway)
        return route

    async def _tunnel_endpoint(self, resource: dict[str, Any] | None) -> encap.TunnelNode:
        """This node as a tunnel endpoint: its VXLAN (and IPIP) tunnel addresses taken from IPAM, or given back,
        and recorded on its Node resource as Calico does."""
        if resource is None or self.address is None:
            return encap.TunnelNode(self.node, self.address)
        current = encap.TunnelNode.from_v3(resource)
        vxlan_address = await self._tunnel_address(
            encap.VXLAN_HANDLE, encap.vxlan_wanted(self.pools), current.vxlan_address,
            [str(p.cidr) for p in self.pools if p.vxlan_mode != encap.NEVER and p.version == 4], "vxlanTunnelAddress",
            lambda address: {"ipv4VXLANTunnelAddr": address,
                             "vxlanTunnelMACAddr": encap.vtep_mac(self.node) if address else None})
        bgp = (resource.get("spec") or {}).get("bgp") or {}
        ipip_now = bgp.get("ipv4IPIPTunnelAddr")
        self.ipip_address = await self._tunnel_address(
            encap.IPIP_HANDLE, encap.ipip_wanted(self.pools),
            ipaddress.IPv4Address(ipip_now) if ipip_now else None,
            [str(p.cidr) for p in self.pools if p.ipip_mode != encap.NEVER and p.version == 4], "ipipTunnelAddress",
            lambda address: {"bgp": {k: v for k, v in {**bgp, "ipv4IPIPTunnelAddr": address}.items() if v}})
        if vxlan_address is None:
            return encap.TunnelNode(self.node, self.address)
        return encap.TunnelNode(self.node, self.address, vxlan_address, encap.vtep_mac(self.node))

    async def _tunnel_address(self, handle_format: str, wanted: bool,
                              current: ipaddress.IPv4Address | None, pools: list[str], kind: str,
                              fields: Callable[[str | None], dict[str, Any]]) -> ipaddress.IPv4Address | None:
        handle = handle_format.format(node=self.node)
        if wanted and current is None:
            result = await self.ipam.auto_assign(handle, self.node, 1, 0, pools=pools, use="Tunnel",
                                                 attrs={"type": kind})
            address = result.ipv4[0]
            await self._record(fields(str(address)))
            log.info("%s %s for this node", kind, address)
            return address  # type: ignore[return-value]
        if not wanted and current is not None:
            await self.ipam.release_by_handle(handle)
            await self._record(fields(None))
            log.info("%s %s given back: no pool needs it", kind, current)
            return None
        return current

    async def _record(self, fields: dict[str, Any]) -> None:
        """Set (None: remove) fields of this node's Node spec, on what is stored now (another field may have
        just been written)."""
        kv = await self.store.get(keys.resource_key("nodes", self.node))
        resource = kv.json() if kv is not None else {}
        spec = {k: v for k, v in {**(resource.get("spec") or {}), **fields}.items() if v is not None}
        await register_node(self.store, {**resource, "spec": spec})

    async def _ipip_device(self) -> None:
        if self.ipip_address is None:
            self.ipip_ready = False
            return
        tunnel = ipip.Tunnel(str(self.ipip_address), self.underlay_mtu - encap.IPIP_OVERHEAD)
        try:
            await self.netlink.run(lambda ipr: ipip.ensure(ipr, tunnel))
            self.ipip_ready = True
        except ipip.IPIPUnavailable as exc:
            if self.ipip_ready is not False:
                log.warning("%s", exc)
            self.ipip_ready = False

    async def _vtep_device(self, me: encap.TunnelNode) -> None:
        if me.vxlan_address is None or self.address is None:
            if await self.netlink.run(vxlan.remove_device):
                log.info("vxlan: %s removed", encap.VXLAN_DEVICE)
            return
        vtep = vxlan.Vtep(local=str(self.address.ip), address=str(me.vxlan_address),
                          mac=me.vxlan_mac or encap.vtep_mac(self.node),
                          mtu=self.underlay_mtu - encap.VXLAN_OVERHEAD)
        if await self.netlink.run(lambda ipr: vxlan.ensure_device(ipr, vtep)):
            log.info("vxlan: %s up, VTEP %s %s, MTU %d", encap.VXLAN_DEVICE, vtep.address, vtep.mac, vtep.mtu)
