"""Pure BGP desired state: which peers a node has (Calico's semantics), what it announces, what it accepts,
and ExaBGP's configuration text for it."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ipam.model import IPNetwork, IPPool
from ipam.selector import parse_selector
from ipam.validation import is_selector

DEFAULT_AS = 64512
MESH = "node-to-node mesh"
GLOBAL = "global"
NODE_SPECIFIC = "node specific"


@dataclass(frozen=True)
class NodeInfo:
    name: str
    ipv4: ipaddress.IPv4Interface | None
    as_number: int | None
    labels: Mapping[str, str]
    rr_cluster_id: str | None = None
    ipv6: ipaddress.IPv6Interface | None = None

    def address(self, version: int) -> str | None:
        """The node's BGP address of that IP version, as text (None: it has none)."""
        interface = self.ipv4 if version == 4 else self.ipv6
        return str(interface.ip) if interface is not None else None

    @classmethod
    def from_v3(cls, obj: Mapping[str, Any]) -> NodeInfo:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        bgp = spec.get("bgp") or {}
        address, address6 = bgp.get("ipv4Address"), bgp.get("ipv6Address")
        return cls(name=meta.get("name", ""), ipv4=ipaddress.IPv4Interface(address) if address else None,
                   as_number=bgp.get("asNumber"), labels=meta.get("labels") or {},
                   rr_cluster_id=bgp.get("routeReflectorClusterID"),
                   ipv6=ipaddress.IPv6Interface(address6) if address6 else None)


@dataclass(frozen=True, order=True)
class PeerSpec:
    address: str
    peer_as: int
    local_as: int
    local_address: str
    kind: str  # MESH, GLOBAL, NODE_SPECIFIC
    name: str  # the peer node's name, or the BGPPeer's
    rr_client: bool = False  # we are a route reflector and this peer is one of our clients
    password: str | None = field(default=None, repr=False)  # TCP-MD5 (RFC 2385), from a secret

    @property
    def version(self) -> int:
        """The session's IP version: it carries that family's unicast routes only (Calico's BIRD runs separate
        IPv4 and IPv6 sessions too)."""
        return 6 if ":" in self.address else 4


def _as_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4294967295


def _address_problem(value: Any, kind: Callable[[Any], Any], name: str, what: str) -> str | None:
    """Why ``value`` (when given) is not what ``kind`` parses, naming the field ``name``; None when absent or good."""
    if value is None:
        return None
    try:
        kind(value)
    except (ValueError, TypeError):
        return f"{name} {value!r} is not {what}"
    return None


def node_problem(obj: Any) -> str | None:
    """Why a Node resource from the datastore cannot be used for peering (None: it can). The datastore is written
    by calicoctl-py, which validates, but also by other tools: one bad resource must not stop every peering."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    spec = obj.get("spec", {}) if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not isinstance(spec, dict):
        return "not a resource with metadata.name and a spec"
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        return "metadata.labels is not a mapping of strings"
    bgp = spec.get("bgp") or {}
    if not isinstance(bgp, dict):
        return "spec.bgp is not a mapping"
    problem = (_address_problem(bgp.get("ipv4Address"), ipaddress.IPv4Interface, "spec.bgp.ipv4Address",
                                "an IPv4 address with prefix length")
               or _address_problem(bgp.get("ipv6Address"), ipaddress.IPv6Interface, "spec.bgp.ipv6Address",
                                   "an IPv6 address with prefix length"))
    if problem:
        return problem
    if bgp.get("asNumber") is not None and not _as_number(bgp["asNumber"]):
        return f"spec.bgp.asNumber {bgp['asNumber']!r} is not an AS number"
    return _address_problem(bgp.get("routeReflectorClusterID"), ipaddress.IPv4Address,
                            "spec.bgp.routeReflectorClusterID", "an IPv4 address")


def peer_problem(resource: Any) -> str | None:
    """Why a BGPPeer resource from the datastore cannot be used (None: it can); see :func:`node_problem`."""
    meta = resource.get("metadata") if isinstance(resource, dict) else None
    spec = resource.get("spec") if isinstance(resource, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not isinstance(spec, dict):
        return "not a resource with metadata.name and a spec"
    if spec.get("node") is not None and not isinstance(spec["node"], str):
        return f"spec.node {spec['node']!r} is not a node name"
    for key in ("nodeSelector", "peerSelector"):
        if spec.get(key) and (problem := is_selector(spec[key])):
            return f"spec.{key}: {problem}"
    if spec.get("peerIP"):
        address = spec["peerIP"]
        if peer_host(address) is None:
            return f"spec.peerIP {address!r} is not an IP address"
        if not _as_number(spec.get("asNumber")):
            return f"spec.asNumber {spec.get('asNumber')!r} is not an AS number (required with peerIP)"
    return None


def config_problem(config: Any) -> str | None:
    """Why the BGPConfiguration cannot be used (None: it can); peering then goes on with the defaults."""
    spec = config.get("spec") if isinstance(config, dict) else None
    if not isinstance(spec, dict):
        return "not a resource with a spec"
    if spec.get("asNumber") is not None and not _as_number(spec["asNumber"]):
        return f"spec.asNumber {spec['asNumber']!r} is not an AS number"
    restart = spec.get("nodeMeshMaxRestartTime")
    if restart is not None and not isinstance(restart, str):
        return f"spec.nodeMeshMaxRestartTime {restart!r} is not a duration such as 120s"
    return None


def peer_host(peer_ip: Any) -> str | None:
    """A BGPPeer's ``peerIP`` without its port, canonical: ``10.0.0.1``, ``10.0.0.1:179``, ``fd00::1`` or
    ``[fd00::1]:179`` (Calico's forms); None if it is not an address."""
    if not isinstance(peer_ip, str):
        return None
    host = peer_ip
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def node_as(node: NodeInfo, global_as: int) -> int:
    return node.as_number or global_as


MESH_PASSWORD = ""  # the key of the mesh password in ``passwords`` (BGPPeer names are never empty)


def secret_ref(spec: Mapping[str, Any], field_name: str) -> tuple[str, str] | None:
    ref = ((spec.get(field_name) or {}).get("secretKeyRef") or {}) if isinstance(spec.get(field_name), dict) else {}
    if not isinstance(ref, dict):
        return None
    return (str(ref["name"]), str(ref["key"])) if ref.get("name") and ref.get("key") else None


class _Peering:
    """The sessions being collected for one node: one per peer address, the first BGPPeer to ask for it wins."""

    def __init__(self, me: NodeInfo, global_as: int) -> None:
        self.me, self.global_as = me, global_as
        self.local_as = node_as(me, global_as)
        self.peers: dict[str, PeerSpec] = {}

    def with_node(self, node: NodeInfo, kind: str, password: str | None) -> None:
        """One session per IP version both ends have an address of."""
        for version in (4, 6):
            local, remote = self.me.address(version), node.address(version)
            if local is not None and remote is not None:
                self.peers.setdefault(remote, PeerSpec(remote, node_as(node, self.global_as), self.local_as, local,
                                                       kind, node.name, password=password))

    def with_address(self, address: str | None, as_number: int, kind: str, name: str, password: str | None) -> None:
        """A session to a fixed ``peerIP``, when this node has an address of its IP version."""
        local = self.me.address(6 if ":" in (address or "") else 4)
        if address is not None and local is not None:
            self.peers.setdefault(address, PeerSpec(address, as_number, self.local_as, local, kind, name,
                                                    password=password))


def _kind_for(peer_spec: Mapping[str, Any], me: NodeInfo) -> str | None:
    """How a BGPPeer applies to this node (``node:`` or ``nodeSelector``), or None when it does not select it."""
    if peer_spec.get("node"):
        return NODE_SPECIFIC if peer_spec["node"] == me.name else None
    if peer_spec.get("nodeSelector") and not parse_selector(peer_spec["nodeSelector"]).matches(me.labels):
        return None
    return GLOBAL


def _peer_back(peering: _Peering, bgp_peers: Iterable[Mapping[str, Any]], others: list[NodeInfo],
               passwords: Mapping[str, str]) -> None:
    """The other side of a peerSelector peering: a selected node peers back with every node the BGPPeer applies
    to (this is how reflectors learn their clients)."""
    me = peering.me
    for resource in bgp_peers:
        peer_spec = resource.get("spec") or {}
        if not peer_spec.get("peerSelector") or not parse_selector(peer_spec["peerSelector"]).matches(me.labels):
            continue
        applies = parse_selector(peer_spec.get("nodeSelector") or "all()")
        password = passwords.get((resource.get("metadata") or {}).get("name", ""))
        for node in others:
            if (peer_spec.get("node") in (None, node.name)) and applies.matches(node.labels):
                peering.with_node(node, GLOBAL, password)


def desired_peers(me: NodeInfo, nodes: Iterable[NodeInfo], bgp_config: Mapping[str, Any] | None,
                  bgp_peers: Iterable[Mapping[str, Any]], passwords: Mapping[str, str] | None = None
                  ) -> list[PeerSpec]:
    """Calico's peering: the full mesh among nodes while nodeToNodeMeshEnabled, plus BGPPeer resources that
    select this node (global, ``node:``, ``nodeSelector``), to a fixed ``peerIP`` or every node matching
    ``peerSelector``. ``passwords`` holds resolved TCP-MD5 secrets by BGPPeer name ("" for the mesh).

    As with BIRD in Calico, IPv4 and IPv6 are separate sessions: two nodes peer over IPv4 when both have an
    IPv4 address, and over IPv6 when both have an IPv6 address; a ``peerIP`` of a version this node has no
    address of is skipped."""
    passwords = passwords or {}
    spec = (bgp_config or {}).get("spec") or {}
    if me.ipv4 is None and me.ipv6 is None:
        return []
    peering = _Peering(me, int(spec.get("asNumber") or DEFAULT_AS))
    others = [n for n in nodes if n.name != me.name and (n.ipv4 is not None or n.ipv6 is not None)]
    bgp_peers = list(bgp_peers)
    if spec.get("nodeToNodeMeshEnabled", True):
        for node in others:
            peering.with_node(node, MESH, passwords.get(MESH_PASSWORD))
    for resource in bgp_peers:
        peer_spec = resource.get("spec") or {}
        name = (resource.get("metadata") or {}).get("name", "")
        kind = _kind_for(peer_spec, me)
        if kind is None:
            continue
        if peer_spec.get("peerIP"):
            peering.with_address(peer_host(peer_spec["peerIP"]), int(peer_spec["asNumber"]), kind, name,
                                 passwords.get(name))
        elif peer_spec.get("peerSelector"):
            selector = parse_selector(peer_spec["peerSelector"])
            for node in others:
                if selector.matches(node.labels):
                    peering.with_node(node, kind, passwords.get(name))
    _peer_back(peering, bgp_peers, others, passwords)
    peers = peering.peers
    if me.rr_cluster_id:
        by_address = {address: n for n in others for address in (n.address(4), n.address(6)) if address}
        for address, peer in list(peers.items()):
            other = by_address.get(address)
            reflector = other is not None and other.rr_cluster_id is not None  # reflectors peer as non-clients
            peers[address] = dataclasses.replace(peer, rr_client=not reflector)
    return sorted(peers.values())


def announcements(affine_blocks: Iterable[IPNetwork], pools: Iterable[IPPool],
                  local_addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = ()) -> set[str]:
    """The node's confirmed blocks inside pools that allow BGP export, and a /32 (/128) for each local workload
    address outside them (borrowed from another node's block: longest prefix wins over that node's block)."""
    exportable = [p for p in pools if not p.disable_bgp_export]
    blocks = [b for b in affine_blocks
              if any(b.version == p.cidr.version and b.subnet_of(p.cidr) for p in exportable)]  # type: ignore[arg-type]
    routes = {str(b) for b in blocks}
    for address in local_addresses:
        if not any(address in b for b in blocks) and any(address in p.cidr for p in exportable):
            routes.add(f"{address}/{address.max_prefixlen}")
    return routes


def parse_prefix(text: str, family: int = socket.AF_INET) -> tuple[int, int] | None:
    """(address as an integer, prefix length) of a network in canonical or plain text; None if it is not one
    (host bits set included). inet_pton instead of ipaddress: a burst of 10,000 routes is parsed in
    milliseconds, not a tenth of a second."""
    address, slash, length = text.partition("/")
    bits = 32 if family == socket.AF_INET else 128
    try:
        value = int.from_bytes(socket.inet_pton(family, address), "big")
        prefixlen = int(length) if slash else bits
    except (OSError, ValueError, TypeError):
        return None
    if not 0 <= prefixlen <= bits or value & ((1 << (bits - prefixlen)) - 1):
        return None
    return value, prefixlen


def canonical_prefix(text: str, version: int = 4) -> str | None:
    """A network's canonical text (IPv6: compressed, lower case, as ``ipaddress`` and the kernel write it), or
    None if ``text`` is not a network of that IP version."""
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    parsed = parse_prefix(text, family)
    if parsed is None:
        return None
    return f"{socket.inet_ntop(family, parsed[0].to_bytes(16 if version == 6 else 4, 'big'))}/{parsed[1]}"


def prefix_version(prefix: str) -> int:
    return 6 if ":" in prefix else 4


# Why the import filter refuses a path (the ``reason`` label of calico_py_bgp_routes_rejected_total).
OUTSIDE_POOLS = "outside-pools"  # not inside any IP pool: a node, service or Internet prefix
DEFAULT_ROUTE = "default-route"  # 0.0.0.0/0 or ::/0: would take every destination the node has no route for
WHOLE_POOL = "whole-pool"  # a pool's own CIDR (of a pool of several blocks): no node owns it
MORE_SPECIFIC = "more-specific-than-block"  # between the block size and a host route: nodes never announce it
AS_PATH_TOO_LONG = "as-path-too-long"
MALFORMED = "malformed"  # the peer sent an UPDATE the speaker could not parse (the session is reset)
MAX_AS_PATH = 100  # ASNs; paths between pod networks are a handful long; prepending floods stop here


class PoolFilter:
    """The import filter (see docs/bgp.md, "What a peer may announce"). Accepted: prefixes inside a pool, that
    is an aggregate of blocks, a block (a pool's own CIDR only when the pool is one block), or a host route (an
    address borrowed from another node's block: the longest prefix wins over that block). Refused: anything
    outside the pools (a default route, node or service addresses), a prefix between the block size and a host
    route (a /28 inside a /26 block: calico-py never announces one, so it can only take part of another node's
    block away), and a path longer than :data:`MAX_AS_PATH` ASNs. Pools are kept as integers, so a burst of
    routes costs an integer comparison per pool each."""

    def __init__(self, pools: Iterable[IPPool]) -> None:
        self._pools = [(p.cidr.version, int(p.cidr.network_address), p.cidr.prefixlen, p.block_size) for p in pools]

    def __call__(self, prefix: str) -> bool:
        return self.reason(prefix) is None

    def reason(self, prefix: str, as_path_length: int = 0) -> str | None:
        """Why the path is refused, or None when it is accepted."""
        version = 6 if ":" in prefix else 4
        parsed = parse_prefix(prefix, socket.AF_INET6 if version == 6 else socket.AF_INET)
        if parsed is None:
            return MALFORMED
        value, prefixlen = parsed
        if prefixlen == 0:
            return DEFAULT_ROUTE
        bits = 32 if version == 4 else 128
        verdict = OUTSIDE_POOLS
        for pool_version, network, pool_len, block_size in self._pools:
            if (pool_version != version or prefixlen < pool_len
                    or value >> (bits - pool_len) != network >> (bits - pool_len)):
                continue
            if prefixlen == pool_len and block_size != pool_len:
                verdict = WHOLE_POOL
            elif block_size < prefixlen < bits:
                verdict = MORE_SPECIFIC
            else:
                verdict = None
                break
        if verdict is None and as_path_length > MAX_AS_PATH:
            return AS_PATH_TOO_LONG
        return verdict


def accepted(prefix: IPNetwork, pools: Iterable[IPPool]) -> bool:
    return PoolFilter(pools)(str(prefix))


def router_id_for(ipv4: str | None, node_name: str) -> str:
    """The BGP router id: the node's IPv4 address; an IPv6-only node has none, so one is derived from its name
    (Calico's ``CALICO_ROUTER_ID=hash``: four bytes of a hash, here SHA-256), stable across restarts and
    distinct between nodes unless two names collide in 32 bits."""
    if ipv4:
        return ipv4
    digest = hashlib.sha256(node_name.encode()).digest()
    return str(ipaddress.IPv4Address(digest[:4]))


DEFAULT_HOLD_TIME = 30  # seconds without a message before a session is declared down (CALICO_BGP_HOLD_TIME)


def render_exabgp(router_id: str, peers: Iterable[PeerSpec], relay: list[str], graceful_restart: int = 120,
                  hold_time: int = DEFAULT_HOLD_TIME) -> str:
    """ExaBGP 5 configuration: one neighbor per peer, all feeding our API process. An IPv4 session carries
    ``ipv4 unicast``, an IPv6 one ``ipv6 unicast``; the router id is the same 32-bit id on both."""
    lines = ["process calico {", f"    run {' '.join(relay)};", "    encoder json;", "}", ""]
    for peer in peers:
        lines += [
            f"neighbor {peer.address} {{",
            f"    router-id {router_id};",
            f"    local-address {peer.local_address};",
            f"    local-as {peer.local_as};",
            f"    peer-as {peer.peer_as};",
            f"    hold-time {hold_time};",  # keepalives every third of it
            "    manual-eor true;",  # End-of-RIB from the daemon, once our routes are out (see ExaBGP._api)
            *([f'    md5-password "{peer.password}";'] if peer.password else []),
            *([f"    capability {{ graceful-restart {graceful_restart}; }}"] if graceful_restart else []),
            f"    family {{ ipv{peer.version} unicast; }}",
            "    api { processes [ calico ]; receive { parsed; update; open; } neighbor-changes; }",
            "}",
            "",
        ]
    return "\n".join(lines)


ORIGINS = {"igp": 0, "egp": 1, "incomplete": 2}


@dataclass(frozen=True)
class BGPPath:
    """A route as learned from one peer: what best-path selection, reflection and loop detection need."""

    next_hop: str
    originator_id: str | None = None
    cluster_list: tuple[str, ...] = ()
    as_path: tuple[int, ...] = ()
    local_pref: int = 100
    med: int = 0
    origin: str = "igp"

    @property
    def rank(self) -> tuple[int, int, int, int]:
        """RFC 4271 9.1.2.2's order up to the IGP cost (smaller is better); paths of equal rank are equal-cost
        (multipath), as with BIRD's ``merge paths`` or FRR's ``maximum-paths``."""
        return -self.local_pref, len(self.as_path), ORIGINS.get(self.origin, 2), self.med

    def exabgp_attributes(self) -> str:
        """The attributes to repeat when re-advertising this path (ExaBGP's command syntax)."""
        parts = [f"origin {self.origin}"]
        if self.as_path:
            parts.append(f"as-path [ {' '.join(str(a) for a in self.as_path)} ]")
        if self.local_pref != 100:
            parts.append(f"local-preference {self.local_pref}")
        if self.med:
            parts.append(f"med {self.med}")
        return " ".join(parts)


def looped(path: BGPPath, router_id: str, cluster_id: str | None) -> bool:
    """RFC 4456: our own route coming back, or one that already passed through our cluster."""
    return path.originator_id == router_id or (cluster_id is not None and cluster_id in path.cluster_list)


def best_path(paths: Mapping[str, BGPPath]) -> tuple[str, BGPPath]:
    """Among peers offering a prefix: the best rank, then the shortest cluster list, then the lowest peer address
    (deterministic)."""
    return min(paths.items(), key=lambda item: (item[1].rank, len(item[1].cluster_list),
                                                ipaddress.ip_address(item[0])))


def multipath(paths: Mapping[str, BGPPath]) -> tuple[str, ...]:
    """The next hops to forward a prefix to: every distinct next hop among the paths of the best rank (ECMP),
    sorted; empty when there is no path."""
    if len(paths) <= 1:
        return tuple(p.next_hop for p in paths.values())
    best = best_path(paths)[1].rank
    return tuple(sorted({p.next_hop for p in paths.values() if p.rank == best}, key=ipaddress.ip_address))


def reflections(rib: Mapping[str, Mapping[str, BGPPath]], peers: Iterable[PeerSpec], cluster_id: str,
                router_id: str, accept: Callable[[str, str, BGPPath], bool] = lambda *_: True
                ) -> dict[str, dict[str, BGPPath]]:
    """What a route reflector re-advertises to each iBGP peer (RFC 4456): a route from a client goes to every
    other peer, a route from a non-client to clients only; ORIGINATOR_ID is kept or set to the peer the route
    came from, our cluster id is prepended to CLUSTER_LIST. Only paths ``accept(peer, prefix, path)`` passes are
    reflected (the import filter: what we refuse we do not hand to clients, which may not filter, as Calico's
    BIRD exports pool routes only). Returns peer address -> prefix -> path to send."""
    ibgp = {p.address: p for p in peers if p.peer_as == p.local_as}
    by_prefix: dict[str, dict[str, BGPPath]] = {}
    for peer, table in rib.items():
        if peer in ibgp:
            for prefix, path in table.items():
                if accept(peer, prefix, path):
                    by_prefix.setdefault(prefix, {})[peer] = path
    out: dict[str, dict[str, BGPPath]] = {address: {} for address in ibgp}
    for prefix, paths in by_prefix.items():
        source, path = best_path(paths)
        reflected = dataclasses.replace(path, originator_id=path.originator_id or source,
                                        cluster_list=(cluster_id, *path.cluster_list))
        version = prefix_version(prefix)
        for address, peer in ibgp.items():
            if address == source or (not ibgp[source].rr_client and not peer.rr_client) or peer.version != version:
                continue  # an IPv6 route goes over IPv6 sessions only (and IPv4 over IPv4)
            out[address][prefix] = reflected
    return out
