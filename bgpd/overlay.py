"""Encapsulation and NAT outgoing on a node, applied as :func:`bgpd.overlay_plan.plan_overlay` plans them from the
node's view (called by the full reconcile): tunnel addresses taken from IPAM or given back and recorded on the Node
resource, ``vxlan.calico`` and ``tunl0``, the VXLAN neighbour / FDB entries, and our NAT table when it changed.
The routes are returned to the reconciler, which owns every route of ours.
"""

from __future__ import annotations

import ipaddress
import logging

from bgpd import encap
from bgpd.dataplane import ipip, nat
from bgpd.dataplane.overlay_kernel import OverlayKernel
from bgpd.desired import RouteSpec
from bgpd.overlay_plan import OverlayPlan, TunnelAddressChange, Tunnels, plan_overlay, tunnel_address_changes
from bgpd.store import register_node
from bgpd.view import NodeView
from ipam import keys
from ipam.allocator import IPAM
from ipam.datastore import Datastore
from ipam.model import IPPool

log = logging.getLogger("calico-py-node.overlay")


class Overlay:
    def __init__(self, store: Datastore, ipam: IPAM, kernel: OverlayKernel, node: str,
                 address: ipaddress.IPv4Interface | None, backend: str, underlay_mtu: int,
                 mtu_override: int | None) -> None:
        self.store = store
        self.ipam = ipam
        self.kernel = kernel
        self.node = node
        self.address = address
        self.backend = backend
        self.underlay_mtu = underlay_mtu
        self.mtu_override = mtu_override
        self.pools: list[IPPool] = []
        self.pod_mtu = mtu_override or underlay_mtu
        self._nat_applied: str | None = None
        self.ipip_ready: bool | None = None  # None: not tried yet
        # The tunnel addresses this node last recorded, and at which revision: until the view has caught up with
        # that write, they are what the node holds (taking one again would hand the node a second address).
        self._recorded: tuple[int, Tunnels] | None = None

    async def desired(self, view: NodeView, connected: tuple[tuple[str, ipaddress.IPv4Interface], ...],
                      repair: bool) -> set[RouteSpec]:
        """Bring tunnel addresses, devices, entries and NAT in line with ``view``; the encapsulated (and, without
        BGP, plain) routes to other nodes. ``repair`` re-applies NAT even when unchanged (the periodic run)."""
        resource = view.nodes.get(self.node)
        tunnels = Tunnels.of(resource)
        if self._recorded is not None and view.revision < self._recorded[0]:
            tunnels = self._recorded[1]
        if resource is not None and self.address is not None:
            for change in tunnel_address_changes(self.node, tunnels, view.pools):
                tunnels = await self._change(change, tunnels)
        plan = plan_overlay(view, self.address, tunnels, self.backend, self.underlay_mtu, self.mtu_override,
                            connected)
        self.pools, self.pod_mtu = list(view.pools), plan.pod_mtu
        await self._apply(plan, repair)
        return plan.routes

    def ipip_route(self, route: RouteSpec) -> RouteSpec:
        """A BGP-learned route through tunl0 when its pool is IPIP and the next hop needs encapsulation."""
        if self.ipip_ready and route.gateway and encap.ipip_device(route.dst, route.gateway, self.pools,
                                                                   self.address):
            return RouteSpec(dst=route.dst, device=encap.IPIP_DEVICE, gateway=route.gateway)
        return route

    async def _change(self, change: TunnelAddressChange, tunnels: Tunnels) -> Tunnels:
        """Take a tunnel address from IPAM, or give it back, and record that on this node's Node resource."""
        if change.take:
            result = await self.ipam.auto_assign(change.handle, self.node, 1, 0, pools=list(change.pools),
                                                 use="Tunnel", attrs={"type": change.kind})
            address = result.ipv4[0]
            log.info("%s %s for this node", change.kind, address)
        else:
            await self.ipam.release_by_handle(change.handle)
            address = None
            log.info("%s %s given back: no pool needs it", change.kind, change.current)
        revision = await self._record(change, None if address is None else str(address))
        field = "vxlan" if change.kind == "vxlanTunnelAddress" else "ipip"
        tunnels = Tunnels(**{**tunnels.__dict__, field: address})
        self._recorded = (revision, tunnels)
        return tunnels

    async def _record(self, change: TunnelAddressChange, address: str | None) -> int:
        """Set (None: remove) the fields of this node's Node spec that record a tunnel address, on what is stored
        now (another field may have just been written)."""
        kv = await self.store.get(keys.resource_key(keys.NODES, self.node))
        resource = kv.json() if kv is not None else {}
        fields = change.node_fields(self.node, resource, address)
        spec = {k: v for k, v in {**(resource.get("spec") or {}), **fields}.items() if v is not None}
        return await register_node(self.store, {**resource, "spec": spec})

    async def _apply(self, plan: OverlayPlan, repair: bool) -> None:
        if plan.vtep is None:
            if await self.kernel.remove_vtep():
                log.info("vxlan: %s removed", encap.VXLAN_DEVICE)
        else:
            vtep = plan.vtep
            if await self.kernel.ensure_vtep(vtep):
                log.info("vxlan: %s up, VTEP %s %s, MTU %d", encap.VXLAN_DEVICE, vtep.address, vtep.mac, vtep.mtu)
            for error in await self.kernel.apply_entries(plan.state):
                log.warning("vxlan: %s", error)
        await self._ipip_device(plan)
        if repair or plan.nat != self._nat_applied:
            try:
                await self.kernel.apply_nat(plan.nat)
                if plan.nat != self._nat_applied:
                    log.info("nat outgoing: %s", ", ".join(str(p.cidr) for p in self.pools if p.nat_outgoing)
                             or "off")
                self._nat_applied = plan.nat
            except (nat.NatError, OSError) as exc:
                log.warning("%s", exc)

    async def _ipip_device(self, plan: OverlayPlan) -> None:
        if plan.tunnel is None:
            self.ipip_ready = False
            return
        try:
            await self.kernel.ensure_tunnel(plan.tunnel)
            self.ipip_ready = True
        except ipip.IPIPUnavailable as exc:
            if self.ipip_ready is not False:
                log.warning("%s", exc)
            self.ipip_ready = False
