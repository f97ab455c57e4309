"""What a node decides from, as one immutable value, and the pure bookkeeping that keeps it from an etcd watch.

The daemon watches (list, then events: :mod:`bgpd.viewsync`) the pools, Nodes, BGPPeers, the BGPConfiguration,
this node's block affinities and its WorkloadEndpoints, and the IPAM blocks when the overlay needs them. Every
change goes through :class:`ViewBuilder`, which parses each resource once and turns one that cannot be used into
"absent" with one warning; :meth:`ViewBuilder.view` hands the planners a :class:`NodeView`. Reconcile and BGP
sync read that value: in steady state they make no etcd request.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bgpd.resources import WorkloadEndpoint
from bgpd.speaker.peers import config_problem, node_problem, peer_problem
from ipam import keys
from ipam.errors import InvalidResource, IPAMError
from ipam.model import Block, BlockAffinity, IPAddress, IPNetwork, IPPool

log = logging.getLogger("calico-py-node.view")

NODES = keys.resource_prefix(keys.NODES)
POOLS = keys.resource_prefix(keys.IP_POOLS)
BGP_PEERS = keys.resource_prefix(keys.BGP_PEERS)
BGP_CONFIGURATIONS = keys.resource_prefix(keys.BGP_CONFIGURATIONS)
ENDPOINTS = keys.resource_prefix(keys.WORKLOAD_ENDPOINTS)
BLOCKS = keys.blocks_prefix(4)
DEFAULT_BGP_CONFIGURATION = keys.resource_key(keys.BGP_CONFIGURATIONS, "default")


@dataclass(frozen=True)
class NodeView:
    """The datastore as this node uses it, at ``revision``; unusable resources are absent (see ``problems``)."""

    node: str
    revision: int = 0
    nodes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # Node resources by name
    pools: tuple[IPPool, ...] = ()
    bgp_peers: tuple[Mapping[str, Any], ...] = ()
    bgp_configuration: Mapping[str, Any] | None = None  # the "default" one
    affinities: tuple[IPNetwork, ...] = ()  # this node's confirmed blocks
    endpoints: tuple[WorkloadEndpoint, ...] = ()  # this node's
    blocks: tuple[Block, ...] | None = None  # every IPv4 block, when watched (None: not watched)
    borrowed: frozenset[IPAddress] = frozenset()  # this node's workload addresses outside its own blocks
    problems: tuple[str, ...] = ()  # "<key>: <why>" for each resource left out


Parser = Callable[[str, Any], Any]  # (key, JSON value) -> the parsed value; raises ValueError when unusable


def _resource(problem: Callable[[Any], str | None]) -> Parser:
    def parse(key: str, obj: Any) -> Any:
        if (reason := problem(obj)) is not None:
            raise ValueError(reason)
        return obj
    return parse


def _pool(key: str, obj: Any) -> IPPool:
    try:
        return IPPool.from_v3(obj)
    except InvalidResource as exc:
        raise ValueError(str(exc)) from None


def _endpoint(node: str) -> Parser:
    def parse(key: str, obj: Any) -> WorkloadEndpoint | None:
        try:
            endpoint = WorkloadEndpoint.from_v3(obj)
        except (KeyError, TypeError, AttributeError):
            raise ValueError("not a WorkloadEndpoint with metadata and spec.node, spec.interfaceName") from None
        return endpoint if endpoint.node == node else None  # another node's: not kept
    return parse


def _affinity(node: str) -> Parser:
    def parse(key: str, obj: Any) -> IPNetwork | None:
        _, cidr = keys.parse_affinity_key(key)
        return cidr if BlockAffinity.from_json(node, cidr, obj).confirmed else None
    return parse


def _block(key: str, obj: Any) -> Block:
    try:
        return Block.from_json(obj)
    except (KeyError, TypeError, AttributeError, InvalidResource) as exc:
        raise ValueError(f"not an IPAM block ({type(exc).__name__}: {exc})") from None


class ViewBuilder:
    """The parsed contents of the watched prefixes, kept from resyncs and events (no I/O)."""

    def __init__(self, node: str, with_blocks: bool = False) -> None:
        self.node = node
        self.parsers: dict[str, Parser] = {
            NODES: _resource(node_problem), POOLS: _pool, BGP_PEERS: _resource(peer_problem),
            BGP_CONFIGURATIONS: _resource(config_problem), keys.host_prefix(node): _affinity(node),
            ENDPOINTS: _endpoint(node)}
        if with_blocks:
            self.parsers[BLOCKS] = _block
        self.entries: dict[str, dict[str, Any]] = {prefix: {} for prefix in self.parsers}
        self.problems: dict[str, str] = {}  # key -> why it is left out
        # Endpoint key -> its addresses outside this node's blocks (borrowed), kept as each endpoint changes: every
        # pod started is an event, and looking at all of them each time cost the CNI path.
        self._outside: dict[str, frozenset[IPAddress]] = {}
        self.revision = 0
        self._view: NodeView | None = None
        self._warned: set[str] = set()

    @property
    def prefixes(self) -> list[str]:
        return list(self.parsers)

    def with_blocks(self, watched: bool) -> None:
        """Start (empty, until their listing comes) or stop keeping the IPAM blocks."""
        if watched and BLOCKS not in self.parsers:
            self.parsers[BLOCKS] = _block
            self.entries[BLOCKS] = {}
        elif not watched and BLOCKS in self.parsers:
            del self.parsers[BLOCKS]
            del self.entries[BLOCKS]
            for key in [k for k in self.problems if k.startswith(BLOCKS)]:
                del self.problems[key]
        self._view = None

    def resync(self, revision: int, prefixes: Mapping[str, Iterable[tuple[str, bytes]]]) -> set[str]:
        """Replace what is known of ``prefixes`` by their listing at ``revision``; the prefixes whose contents
        changed."""
        changed = set()
        for prefix, kvs in prefixes.items():
            before = self.entries[prefix]
            self.entries[prefix] = {}
            for key in [k for k in self.problems if k.startswith(prefix)]:
                del self.problems[key]
            for key, value in kvs:
                self._put(prefix, key, value)
            if self.entries[prefix] != before:
                changed.add(prefix)
        self.revision = max(self.revision, revision)
        self._view = None
        self._all_outside()
        return changed

    def event(self, revision: int, key: str, value: bytes | None) -> str | None:
        """One key created, changed (``value``) or deleted (None); the prefix when what is known changed."""
        prefix = self.prefix_of(key)
        self.revision = max(self.revision, revision)
        if prefix is None:
            return None
        before = self.entries[prefix].get(key)
        self.problems.pop(key, None)
        if value is None:
            self.entries[prefix].pop(key, None)
        else:
            self._put(prefix, key, value)
        if self.entries[prefix].get(key) == before:
            return None
        self._view = None
        if prefix == ENDPOINTS:
            self._endpoint_outside(key)
        elif prefix == keys.host_prefix(self.node):
            self._all_outside()
        return prefix

    def local_endpoint(self, key: str, endpoint: WorkloadEndpoint | None) -> None:
        """This node's own write of one of its endpoints (None: deleted), known before its watch event comes:
        a reconcile run in between must not take the new pod's route for a stale one."""
        if endpoint is None:
            self.entries[ENDPOINTS].pop(key, None)
        else:
            self.entries[ENDPOINTS][key] = endpoint
        self._view = None
        self._endpoint_outside(key)

    def _endpoint_outside(self, key: str) -> None:
        endpoint = self.entries[ENDPOINTS].get(key)
        blocks = list(self.entries[keys.host_prefix(self.node)].values())
        addresses = [ipaddress.ip_interface(network).ip for network in (endpoint.ip_networks if endpoint else ())]
        outside = frozenset(a for a in addresses if not any(a in block for block in blocks))
        if outside:
            self._outside[key] = outside
        else:
            self._outside.pop(key, None)

    def _all_outside(self) -> None:
        self._outside = {}
        for key in self.entries[ENDPOINTS]:
            self._endpoint_outside(key)

    def prefix_of(self, key: str) -> str | None:
        return next((prefix for prefix in self.parsers if key.startswith(prefix)), None)

    def _put(self, prefix: str, key: str, value: bytes) -> None:
        try:
            parsed = self.parsers[prefix](key, json.loads(value) if value else None)
        except (ValueError, TypeError, KeyError, AttributeError, IPAMError, RecursionError) as exc:
            self.problems[key] = str(exc) or type(exc).__name__
            self.entries[prefix].pop(key, None)
            return
        if parsed is None:
            self.entries[prefix].pop(key, None)
        else:
            self.entries[prefix][key] = parsed

    def view(self) -> NodeView:
        """The current view (the same value until something changes)."""
        if self._view is None:
            for key, why in sorted(self.problems.items()):
                if f"{key}: {why}" not in self._warned:
                    log.warning("resource %s: %s; ignored until it is fixed", key, why)
            self._warned = {f"{k}: {w}" for k, w in self.problems.items()}
            nodes = {obj["metadata"]["name"]: obj for obj in self.entries[NODES].values()}
            configuration = self.entries[BGP_CONFIGURATIONS].get(DEFAULT_BGP_CONFIGURATION)
            self._view = NodeView(
                node=self.node, revision=self.revision, nodes=nodes,
                pools=tuple(sorted(self.entries[POOLS].values(), key=lambda p: p.name)),
                bgp_peers=tuple(obj for _, obj in sorted(self.entries[BGP_PEERS].items())),
                bgp_configuration=configuration,
                affinities=tuple(sorted(self.entries[keys.host_prefix(self.node)].values(),
                                        key=lambda c: (c.version, c))),
                endpoints=tuple(e for _, e in sorted(self.entries[ENDPOINTS].items())),
                blocks=tuple(self.entries[BLOCKS].values()) if BLOCKS in self.entries else None,
                borrowed=frozenset().union(*self._outside.values()),
                problems=tuple(f"{k}: {w}" for k, w in sorted(self.problems.items())))
        return self._view
