"""The overlay planner (bgpd/overlay_plan.py) and its applier (bgpd/overlay.py) against a fake overlay kernel and
fake IPAM and Node storage: what a pool change makes the node take, record, build and give back."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field, replace
from typing import Any

from bgpd import encap
from bgpd.overlay import Overlay
from bgpd.overlay_plan import Tunnels, plan_overlay, tunnel_address_changes
from bgpd.view import NodeView
from ipam.allocator import AssignResult
from ipam.model import IPPool
from tests.fakekernel import FakeOverlayKernel

ADDRESS = ipaddress.IPv4Interface("10.0.10.11/24")
VXLAN = IPPool("v", ipaddress.ip_network("10.244.0.0/16"), 26, vxlan_mode="Always", nat_outgoing=True)
IPIP = IPPool("i", ipaddress.ip_network("10.245.0.0/16"), 26, ipip_mode="CrossSubnet")
PLAIN = IPPool("p", ipaddress.ip_network("10.246.0.0/16"), 26)
NODE1 = {"metadata": {"name": "node1"}, "spec": {"bgp": {"ipv4Address": str(ADDRESS)}}}
NODE2 = {"metadata": {"name": "node2"}, "spec": {"bgp": {"ipv4Address": "10.0.20.12/24"},
                                                 "ipv4VXLANTunnelAddr": "10.244.2.0",
                                                 "vxlanTunnelMACAddr": encap.vtep_mac("node2")}}


def view(*pools: IPPool, me: dict[str, Any] = NODE1, revision: int = 1) -> NodeView:
    return NodeView("node1", revision=revision, nodes={"node1": me, "node2": NODE2}, pools=pools)


def test_a_vxlan_pool_asks_for_a_tunnel_address_and_no_pool_gives_it_back() -> None:
    wanted = tunnel_address_changes("node1", Tunnels(), [VXLAN, IPIP])
    assert [(c.kind, c.take, c.pools) for c in wanted] == [("vxlanTunnelAddress", True, ("10.244.0.0/16",)),
                                                            ("ipipTunnelAddress", True, ("10.245.0.0/16",))]
    held = Tunnels(vxlan=ipaddress.IPv4Address("10.244.1.0"))
    assert tunnel_address_changes("node1", held, [VXLAN]) == ()
    (back,) = tunnel_address_changes("node1", held, [PLAIN])
    assert not back.take and back.current == held.vxlan and back.handle == "vxlan-tunnel-addr-node1"
    assert back.node_fields("node1", NODE1, None) == {"ipv4VXLANTunnelAddr": None, "vxlanTunnelMACAddr": None}


def test_the_plan_has_the_vtep_its_entries_nat_and_the_pod_mtu() -> None:
    plan = plan_overlay(view(VXLAN), ADDRESS, Tunnels(vxlan=ipaddress.IPv4Address("10.244.1.0")), "bird", 1500,
                        None, [("eth0", ADDRESS)])
    assert plan.vtep == encap.Vtep("10.0.10.11", "10.244.1.0", encap.vtep_mac("node1"), 1450)
    assert plan.pod_mtu == 1450 and plan.tunnel is None and "masquerade" in plan.nat
    no_overlay = plan_overlay(view(PLAIN), ADDRESS, Tunnels(), "bird", 1500, None, [])
    assert no_overlay.vtep is None and no_overlay.pod_mtu == 1500 and no_overlay.routes == set()


@dataclass
class FakeIPAM:
    """Fakes the IPAM calls the overlay makes: auto_assign of one tunnel address, release_by_handle."""

    held: dict[str, ipaddress.IPv4Address] = field(default_factory=dict)
    assigned: int = 0

    async def auto_assign(self, handle: str, node: str, num_v4: int, num_v6: int, **kwargs: Any) -> AssignResult:
        self.assigned += 1
        self.held[handle] = ipaddress.IPv4Address(f"10.244.1.{len(self.held)}")
        return AssignResult(ipv4=[self.held[handle]])

    async def release_by_handle(self, handle: str) -> None:
        self.held.pop(handle, None)


class RecordingOverlay(Overlay):
    """The applier with the Node write recorded instead of stored (the etcd side has its own tests)."""

    records: list[tuple[str, str | None]]

    async def _record(self, change: Any, address: str | None) -> int:
        self.records.append((change.kind, address))
        return 100 + len(self.records)


def overlay(kernel: FakeOverlayKernel, ipam: FakeIPAM) -> RecordingOverlay:
    applier = RecordingOverlay(None, ipam, kernel, "node1", ADDRESS, "bird", 1500, None)  # type: ignore[arg-type]
    applier.records = []
    return applier


def test_the_applier_takes_records_and_builds_once_and_gives_back_when_no_pool_wants_it() -> None:
    kernel, ipam = FakeOverlayKernel(), FakeIPAM()
    applier = overlay(kernel, ipam)
    asyncio.run(applier.desired(view(VXLAN), (("eth0", ADDRESS),), repair=False))
    assert applier.records == [("vxlanTunnelAddress", "10.244.1.0")] and kernel.vtep is not None
    assert kernel.nat is not None and "masquerade" in kernel.nat
    # The view has not caught up with the Node write yet: the address is not taken a second time.
    asyncio.run(applier.desired(view(VXLAN, revision=50), (("eth0", ADDRESS),), repair=False))
    assert ipam.assigned == 1 and kernel.calls.count("apply_nat") == 1  # NAT unchanged: not rewritten
    recorded = replace(view(VXLAN, revision=200), nodes={"node1": {**NODE1, "spec": {
        **NODE1["spec"], "ipv4VXLANTunnelAddr": "10.244.1.0"}}, "node2": NODE2})
    asyncio.run(applier.desired(recorded, (("eth0", ADDRESS),), repair=True))
    assert ipam.assigned == 1 and kernel.calls.count("apply_nat") == 2  # the periodic run repairs NAT
    asyncio.run(applier.desired(replace(recorded, pools=(PLAIN,)), (), repair=False))
    assert applier.records[-1] == ("vxlanTunnelAddress", None) and kernel.vtep is None and ipam.held == {}


def test_a_kernel_without_ipip_leaves_bgp_routes_plain() -> None:
    kernel, ipam = FakeOverlayKernel(ipip=False), FakeIPAM()
    applier = overlay(kernel, ipam)
    asyncio.run(applier.desired(view(IPIP), (("eth0", ADDRESS),), repair=False))
    assert applier.ipip_ready is False and applier.records == [("ipipTunnelAddress", "10.244.1.0")]
    from bgpd.desired import RouteSpec
    route = RouteSpec("10.245.3.0/26", device="eth0", gateway="10.0.20.13")
    assert applier.ipip_route(route) == route
