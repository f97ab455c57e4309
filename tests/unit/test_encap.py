"""Encapsulation and NAT decisions, pure: which remote prefixes ride VXLAN or IPIP, the VXLAN entries, NAT rules."""

from __future__ import annotations

import ipaddress

from bgpd import encap
from bgpd.dataplane import ipip
from bgpd.desired import RouteSpec
from bgpd.encap import Tunnel, nat_ruleset
from ipam.model import AllocationAttribute, Block, IPPool

ME = encap.TunnelNode("node1", ipaddress.IPv4Interface("10.0.10.11/24"), ipaddress.IPv4Address("10.244.1.0"),
                      encap.vtep_mac("node1"))
SAME = encap.TunnelNode("node2", ipaddress.IPv4Interface("10.0.10.12/24"), ipaddress.IPv4Address("10.244.2.0"),
                        encap.vtep_mac("node2"))
OTHER = encap.TunnelNode("node3", ipaddress.IPv4Interface("10.0.20.13/24"), ipaddress.IPv4Address("10.244.3.0"),
                         encap.vtep_mac("node3"))
CONNECTED = (("eth1", ipaddress.IPv4Interface("10.0.10.11/24")),)
BLOCKS = {ipaddress.ip_network("10.244.1.0/26"): "node1", ipaddress.ip_network("10.244.2.0/26"): "node2",
          ipaddress.ip_network("10.244.3.0/26"): "node3", ipaddress.ip_network("10.244.3.64/32"): "node2"}


def pool(vxlan: str = "Never", ipip_mode: str = "Never", nat_outgoing: bool = False, cidr: str = "10.244.0.0/16"
         ) -> IPPool:
    return IPPool("p", ipaddress.ip_network(cidr), 26, ipip_mode=ipip_mode, vxlan_mode=vxlan,
                  nat_outgoing=nat_outgoing)


def test_vtep_mac_is_stable_local_and_unicast() -> None:
    mac = encap.vtep_mac("node1")
    assert mac == encap.vtep_mac("node1") != encap.vtep_mac("node2")
    assert mac.startswith("66:") and int(mac[:2], 16) & 0x01 == 0 and int(mac[:2], 16) & 0x02


def test_cross_subnet_encapsulates_toward_other_subnets_only() -> None:
    state = encap.datastore_routes(ME, [ME, SAME, OTHER], BLOCKS, [pool("CrossSubnet")], CONNECTED, plain_too=True)
    assert state.routes == {
        RouteSpec("10.244.3.0/26", device="vxlan.calico", gateway="10.244.3.0"),
        RouteSpec("10.244.2.0/26", device="eth1", gateway="10.0.10.12"),  # same subnet: plain, from the datastore
        RouteSpec("10.244.3.64/32", device="eth1", gateway="10.0.10.12"),  # borrowed by node2: follows node2
    }
    assert state.neighbors == {encap.Neighbor("10.244.3.0", encap.vtep_mac("node3"))}
    assert state.forwarding == {encap.Forwarding(encap.vtep_mac("node3"), "10.0.20.13")}
    with_bgp = encap.datastore_routes(ME, [ME, SAME, OTHER], BLOCKS, [pool("CrossSubnet")], CONNECTED,
                                      plain_too=False)
    assert {r.dst for r in with_bgp.routes} == {"10.244.3.0/26"}  # BGP routes the same-subnet blocks


def test_always_encapsulates_everything_and_waits_for_a_vtep() -> None:
    no_vtep = encap.TunnelNode("node2", SAME.address)
    state = encap.datastore_routes(ME, [ME, no_vtep, OTHER], BLOCKS, [pool("Always")], CONNECTED, plain_too=True)
    assert {r.dst for r in state.routes} == {"10.244.3.0/26"}  # node2's VTEP is not up yet: no route into nowhere
    never = encap.datastore_routes(ME, [ME, SAME, OTHER], BLOCKS, [pool()], CONNECTED, plain_too=True)
    assert not never.routes and not never.neighbors


def test_remote_prefixes_follow_affinity_and_borrowing() -> None:
    block = Block.from_json({"cidr": "10.244.3.0/26", "affinity": "host:node3", "allocations": [0, 1] + [None] * 62,
                             "unallocated": list(range(2, 64)),
                             "attributes": [{"handle_id": "a", "secondary": {"node": "node3"}},
                                            {"handle_id": "b", "secondary": {"node": "node2"}}]})
    assert encap.remote_prefixes([block]) == {ipaddress.ip_network("10.244.3.0/26"): "node3",
                                              ipaddress.ip_network("10.244.3.1/32"): "node2"}
    assert isinstance(block.attribute_of(1), AllocationAttribute)


def test_ipip_applies_to_learned_routes_of_ipip_pools() -> None:
    me = ipaddress.IPv4Interface("10.0.10.11/24")
    assert encap.ipip_device("10.244.3.0/26", "10.0.20.13", [pool(ipip_mode="CrossSubnet")], me)
    assert not encap.ipip_device("10.244.2.0/26", "10.0.10.12", [pool(ipip_mode="CrossSubnet")], me)
    assert encap.ipip_device("10.244.2.0/26", "10.0.10.12", [pool(ipip_mode="Always")], me)
    assert not encap.ipip_device("10.245.0.0/26", "10.0.10.12", [pool(ipip_mode="Always")], me)  # outside pools
    assert ipip.link_request(Tunnel("10.244.1.1", 1480)) == {"ifname": "tunl0", "mtu": 1480, "state": "up"}


def test_nat_masquerades_from_nat_pools_to_outside_every_pool_only() -> None:
    script = nat_ruleset([pool(nat_outgoing=True), pool(cidr="10.245.0.0/16"),
                         pool(nat_outgoing=True, cidr="fd00:10::/48")])
    assert "add table ip calico-py\ndelete table ip calico-py\n" in script  # atomic replace, even when absent
    assert "elements = { 10.244.0.0/16, 10.245.0.0/16 }" in script  # between pools: no NAT
    assert "set nat-pools { type ipv4_addr; flags interval; elements = { 10.244.0.0/16 } }" in script
    assert "ip saddr @nat-pools ip daddr != @all-pools masquerade" in script
    assert "ip6 saddr @nat-pools ip6 daddr != @all-pools masquerade" in script
    off = nat_ruleset([pool()])
    assert "masquerade" not in off and "delete table ip calico-py" in off  # NAT off: our table goes
