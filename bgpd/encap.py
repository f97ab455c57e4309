"""Pure encapsulation decisions: which remote blocks ride VXLAN or IPIP, which go plain, and what the VXLAN device
needs (neighbour and FDB entries) to reach each remote VTEP.

A pool's ``vxlanMode`` / ``ipipMode`` is ``Never``, ``Always`` or ``CrossSubnet`` (encapsulate only toward nodes
outside this node's subnet). VXLAN routes come from the datastore, not from BGP: every node knows every block's
owner and every node's VTEP, so a pool in VXLAN mode needs no BGP at all (``CALICO_NETWORKING_BACKEND=vxlan``).
With that backend, CrossSubnet's same-subnet blocks are routed plain, also from the datastore. IPIP follows Calico:
BGP carries the routes, and those inside an IPIP pool go through ``tunl0`` when encapsulation applies.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from bgpd.desired import IPNetwork, RouteSpec, device_for
from ipam.model import Block, IPPool

VXLAN_DEVICE = "vxlan.calico"
VXLAN_VNI = 4096
VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
IPIP_DEVICE = "tunl0"
IPIP_OVERHEAD = 20
NEVER, ALWAYS, CROSS_SUBNET = "Never", "Always", "CrossSubnet"
VXLAN_HANDLE = "vxlan-tunnel-addr-{node}"
IPIP_HANDLE = "ipip-tunnel-addr-{node}"
NAT_TABLE = "calico-py"
NAT_FAMILIES = {4: "ip", 6: "ip6"}


def vtep_mac(node: str) -> str:
    """The node's VTEP MAC, derived from its name (stable across restarts, locally administered, unicast)."""
    digest = hashlib.sha1(node.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x66, *digest[:5]))


@dataclass(frozen=True)
class TunnelNode:
    """What the datastore says about a node, as encapsulation needs it."""

    name: str
    address: ipaddress.IPv4Interface | None  # underlay address with its subnet (Node.spec.bgp.ipv4Address)
    vxlan_address: ipaddress.IPv4Address | None = None  # Node.spec.ipv4VXLANTunnelAddr
    vxlan_mac: str | None = None  # Node.spec.vxlanTunnelMACAddr

    @classmethod
    def from_v3(cls, resource: Mapping[str, object]) -> TunnelNode:
        spec = resource.get("spec") or {}
        assert isinstance(spec, dict)
        bgp = spec.get("bgp") or {}
        address = bgp.get("ipv4Address")
        vtep = spec.get("ipv4VXLANTunnelAddr")
        return cls(name=str((resource.get("metadata") or {}).get("name", "")),  # type: ignore[union-attr]
                   address=ipaddress.IPv4Interface(address) if address else None,
                   vxlan_address=ipaddress.IPv4Address(vtep) if vtep else None,
                   vxlan_mac=spec.get("vxlanTunnelMACAddr") or None)


@dataclass(frozen=True)
class Neighbor:
    """A permanent neighbour entry: the remote VTEP's address resolves to its MAC on the VXLAN device."""

    address: str
    mac: str
    device: str = VXLAN_DEVICE


@dataclass(frozen=True)
class Forwarding:
    """A permanent FDB entry: frames for the remote VTEP's MAC go to the remote node's underlay address."""

    mac: str
    destination: str
    device: str = VXLAN_DEVICE


@dataclass
class EncapState:
    routes: set[RouteSpec] = field(default_factory=set)
    neighbors: set[Neighbor] = field(default_factory=set)
    forwarding: set[Forwarding] = field(default_factory=set)


def encapsulates(mode: str, me: ipaddress.IPv4Interface, other: ipaddress.IPv4Interface) -> bool:
    """Whether traffic from ``me`` to ``other`` is encapsulated in ``mode``."""
    if mode == ALWAYS:
        return True
    if mode == CROSS_SUBNET:
        return other.ip not in me.network
    return False


def pool_of(prefix: IPNetwork, pools: Iterable[IPPool]) -> IPPool | None:
    return next((p for p in pools if prefix.version == p.cidr.version and prefix.subnet_of(p.cidr)  # type: ignore[arg-type]
                 and not p.disabled), None)


def vxlan_wanted(pools: Iterable[IPPool]) -> bool:
    return any(p.vxlan_mode != NEVER and p.version == 4 and not p.disabled for p in pools)


def ipip_wanted(pools: Iterable[IPPool]) -> bool:
    return any(p.ipip_mode != NEVER and p.version == 4 and not p.disabled for p in pools)


def datastore_routes(me: TunnelNode, nodes: Iterable[TunnelNode], remote_blocks: Mapping[IPNetwork, str],
                     pools: Iterable[IPPool], connected: Iterable[tuple[str, ipaddress.IPv4Interface]],
                     plain_too: bool) -> EncapState:
    """Routes to other nodes' blocks (and borrowed addresses: /32 keys) computed from the datastore.

    ``remote_blocks`` maps each block (or borrowed /32) to the node that holds it. A block in a VXLAN pool toward
    a node that needs encapsulation goes ``via <its VTEP> dev vxlan.calico onlink``, with the neighbour and FDB
    entries that make it work. ``plain_too`` (no BGP to do it) adds plain routes for the rest of the VXLAN
    pools' blocks: same-subnet nodes under CrossSubnet, via the node's underlay address."""
    pools = list(pools)
    connected = tuple(connected)
    by_name = {n.name: n for n in nodes}
    state = EncapState()
    if me.address is None:
        return state
    for prefix, host in remote_blocks.items():
        node = by_name.get(host)
        pool = pool_of(prefix, pools)
        if host == me.name or node is None or node.address is None or pool is None or pool.vxlan_mode == NEVER:
            continue
        if encapsulates(pool.vxlan_mode, me.address, node.address):
            if node.vxlan_address is None or not node.vxlan_mac:
                continue  # its VTEP is not up yet: no route rather than a route into nowhere
            vtep = str(node.vxlan_address)
            state.routes.add(RouteSpec(dst=str(prefix), device=VXLAN_DEVICE, gateway=vtep))
            state.neighbors.add(Neighbor(vtep, node.vxlan_mac))
            state.forwarding.add(Forwarding(node.vxlan_mac, str(node.address.ip)))
        elif plain_too:
            device = device_for(str(node.address.ip), connected)
            if device is not None:
                state.routes.add(RouteSpec(dst=str(prefix), device=device, gateway=str(node.address.ip)))
    return state


def ipip_device(prefix: str, gateway: str, pools: Iterable[IPPool], me: ipaddress.IPv4Interface | None) -> bool:
    """Whether a BGP-learned route goes through ``tunl0``: its pool is IPIP and the next hop needs encapsulation."""
    pool = pool_of(ipaddress.ip_network(prefix), pools)
    if pool is None or pool.ipip_mode == NEVER or me is None:
        return False
    return encapsulates(pool.ipip_mode, me, ipaddress.IPv4Interface(f"{gateway}/32"))


def remote_prefixes(blocks: Iterable[Block]) -> dict[IPNetwork, str]:
    """Which node holds what, from the IPAM blocks: each affine block -> its node, and each address a node holds
    in another node's block (borrowed) -> the borrowing node, as a /32 (/128) that wins over the block."""
    held: dict[IPNetwork, str] = {}
    for block in blocks:
        if block.host:
            held[block.cidr] = block.host
        for ordinal in range(block.size):
            attribute = block.attribute_of(ordinal)
            node = attribute.secondary.get("node") if attribute is not None else None
            if node and node != block.host:
                address = block.address(ordinal)
                held[ipaddress.ip_network(f"{address}/{address.max_prefixlen}")] = node
    return held


@dataclass(frozen=True)
class Vtep:
    """What this node's VXLAN device must look like."""

    local: str  # underlay address
    address: str  # the VTEP's own address (from the node's block)
    mac: str
    mtu: int


@dataclass(frozen=True)
class Tunnel:
    """What ``tunl0`` must look like."""

    address: str  # the node's IPIP tunnel address (from its block)
    mtu: int


def nat_ruleset(pools: Iterable[IPPool]) -> str:
    """The nft script that makes our tables match ``pools`` (idempotent: safe to apply again): traffic from a
    ``natOutgoing`` pool to anywhere outside every pool is masqueraded."""
    enabled = [p for p in pools if not p.disabled]
    lines = []
    for version, family in NAT_FAMILIES.items():
        mine = [p for p in enabled if p.version == version]
        nat = sorted(str(p.cidr) for p in mine if p.nat_outgoing)
        # "add" then "delete": deleting a table that does not exist would fail the whole transaction.
        lines += [f"add table {family} {NAT_TABLE}", f"delete table {family} {NAT_TABLE}"]
        if not nat:
            continue
        address = "ipv4_addr" if version == 4 else "ipv6_addr"
        every = ", ".join(sorted(str(p.cidr) for p in mine))
        lines += [
            f"table {family} {NAT_TABLE} {{",
            f"  set all-pools {{ type {address}; flags interval; elements = {{ {every} }} }}",
            f"  set nat-pools {{ type {address}; flags interval; elements = {{ {', '.join(nat)} }} }}",
            "  chain nat-outgoing {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    {family} saddr @nat-pools {family} daddr != @all-pools masquerade fully-random",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"
