"""What kube-controllers does, decided from what it observed (no I/O): which pods' addresses to release and
which gone nodes to remove, and the settings it runs with."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from bgpd.kube import KubePod
from bgpd.resources import WorkloadEndpoint
from ipam.check import IPAMState, is_tunnel_handle
from ipam.envvalues import env_number
from ipam.model import Block, IPAddress
from ipam.nodes import allocations

DEFAULT_INTERVAL = 30.0
DEFAULT_GC_GRACE = 300.0
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})  # the kubelet has torn the sandbox down: the address is free


class ControllerConfigError(Exception):
    """A bad setting; the message names it."""


@dataclass(frozen=True)
class Settings:
    interval: float = DEFAULT_INTERVAL
    gc_grace: float = DEFAULT_GC_GRACE

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return cls(interval=env_number(env, "CONTROLLER_INTERVAL", DEFAULT_INTERVAL, 0.1, 86400, ControllerConfigError),
                   gc_grace=env_number(env, "CONTROLLER_GC_GRACE", DEFAULT_GC_GRACE, 0, 604800, ControllerConfigError))


# ---------------------------------------------------------------------- what is observed


@dataclass(frozen=True)
class PodAllocation:
    """The addresses one pod handle holds, with their allocation sequence numbers."""

    handle: str
    namespace: str
    pod: str
    node: str | None  # the node that allocated (the attribute's ``node``)
    addresses: Mapping[IPAddress, int] = field(hash=False)

    @property
    def container_id(self) -> str:
        return self.handle.rpartition(".")[2]  # handles are ``<network>.<container id>``


@dataclass(frozen=True)
class EndpointRecord:
    """A stored WorkloadEndpoint, with the revision to guard its deletion by."""

    key: str
    mod_revision: int
    endpoint: WorkloadEndpoint


@dataclass(frozen=True)
class Observed:
    pods: Mapping[tuple[str, str], KubePod]
    kube_nodes: frozenset[str]
    calico_nodes: frozenset[str]
    allocations: tuple[PodAllocation, ...]
    endpoints: tuple[EndpointRecord, ...] = ()


def pod_allocations(blocks: Iterable[Block]) -> list[PodAllocation]:
    """Every handle that belongs to a Kubernetes pod: its allocations carry ``namespace`` and ``pod``.
    Tunnel addresses and plain-CNI workloads are never pods' to lose."""
    addresses: dict[str, dict[IPAddress, int]] = defaultdict(dict)
    identity: dict[str, tuple[str, str, str | None]] = {}
    for allocation in allocations(blocks):
        handle, secondary = allocation.attribute.handle_id, allocation.attribute.secondary
        namespace, pod = secondary.get("namespace"), secondary.get("pod")
        if not handle or not namespace or not pod or is_tunnel_handle(handle):
            continue
        identity[handle] = (namespace, pod, allocation.node)
        addresses[handle][allocation.address] = allocation.sequence_number
    return [PodAllocation(handle, *identity[handle], addresses=dict(found))
            for handle, found in sorted(addresses.items())]


def calico_nodes(state: IPAMState) -> frozenset[str]:
    """Nodes Calico knows: Node resources and holders of block affinities."""
    return frozenset(state.nodes | {affinity.node for affinity, _ in state.affinities})


# ---------------------------------------------------------------------- what to do (pure)


@dataclass(frozen=True)
class ReleasePod:
    allocation: PodAllocation
    reason: str  # pod-missing, pod-on-other-node, pod-finished, pod-replaced
    missing_for: float
    endpoints: tuple[EndpointRecord, ...] = ()


@dataclass(frozen=True)
class RemoveNode:
    node: str
    missing_for: float
    endpoints: tuple[EndpointRecord, ...] = ()


Action = ReleasePod | RemoveNode


@dataclass(frozen=True)
class Plan:
    actions: list[Action]
    # What is stale now, and since when ("pod:<handle>", "node:<name>"); whatever is not here is forgotten.
    missing_since: dict[str, float]


def current_sandboxes(endpoints: Iterable[EndpointRecord]) -> dict[tuple[str, str, str], set[str]]:
    """(namespace, pod, node) -> the container ids its WorkloadEndpoints name now. An ADD writes its endpoint in
    the same transaction as its addresses, so a newer sandbox of the pod has replaced the older one's id here."""
    found: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for record in endpoints:
        wep = record.endpoint
        found[(wep.namespace, wep.pod, wep.node)].add(wep.container_id)
    return found


def stale_reason(allocation: PodAllocation, pods: Mapping[tuple[str, str], KubePod],
                 sandboxes: Mapping[tuple[str, str, str], set[str]] | None = None) -> str | None:
    """Why the pod no longer needs this handle's addresses, or None while it does. ``sandboxes``: see
    :func:`current_sandboxes`."""
    pod = pods.get((allocation.namespace, allocation.pod))
    if pod is None:
        return "pod-missing"
    # A pod of the same name on another node (a StatefulSet's, recreated) has its own addresses.
    if pod.node and allocation.node and pod.node != allocation.node:
        return "pod-on-other-node"
    if pod.phase in FINISHED_PHASES:
        return "pod-finished"
    # The same pod name on the same node, recreated (or its sandbox restarted) without a DEL for the old sandbox:
    # the endpoint names a newer container, so this handle's sandbox is gone. No endpoint at all proves nothing.
    current = (sandboxes or {}).get((allocation.namespace, allocation.pod, allocation.node or ""))
    if current and allocation.container_id not in current:
        return "pod-replaced"
    return None


def plan_actions(observed: Observed, missing_since: Mapping[str, float], now: float, grace: float) -> Plan:
    """What to release, given what was observed and since when each stale thing has been seen stale."""
    pending: dict[str, float] = {}
    actions: list[Action] = []

    def overdue(key: str) -> float | None:
        since = pending[key] = missing_since.get(key, now)
        return now - since if now - since >= grace else None

    removed: set[str] = set()
    # An empty node list means a wrong cluster or a broken API more likely than a cluster with no nodes: never
    # remove every node for it.
    if observed.kube_nodes:
        for node in sorted(observed.calico_nodes - observed.kube_nodes):
            missing_for = overdue(f"node:{node}")
            if missing_for is not None:
                removed.add(node)
                actions.append(RemoveNode(node, missing_for,
                                          tuple(e for e in observed.endpoints if e.endpoint.node == node)))
    sandboxes = current_sandboxes(observed.endpoints)
    for allocation in observed.allocations:
        if allocation.node in removed:
            continue  # removing the node releases these
        reason = stale_reason(allocation, observed.pods, sandboxes)
        if reason is None:
            continue
        missing_for = overdue(f"pod:{allocation.handle}")
        if missing_for is not None:
            # Only this sandbox's endpoint: a newer sandbox of the same pod has rewritten it with its own id.
            endpoints = tuple(e for e in observed.endpoints
                              if e.endpoint.namespace == allocation.namespace
                              and e.endpoint.container_id == allocation.container_id)
            actions.append(ReleasePod(allocation, reason, missing_for, endpoints))
    return Plan(actions, pending)


# ---------------------------------------------------------------------- the loop


